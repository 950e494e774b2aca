"""The moderators' web page's service side (``bot.web`` is its front end): one-time sign-in links and what a
signed-in reader may see and do. Every decision goes through the same services as Discord's buttons and commands
(``ModerationService``, ``AppealService``, ``BlocklistService``, ``AdminService``), with the reader as the acting
``Moderator``; this module only adds who may see what, guild by guild.

Rights come from the sign-in: an operator link (``python -m bot web link``) holds every guild; a moderator's link
(``/dalle-mod web``) holds the guilds, roles and permissions Discord showed for them when they asked; with the bot's
token the page reads them again from Discord every few minutes (``bot.web.app.auth_middleware``). The roles are
judged by ``ModerationService.is_moderator`` on every action, so a guild that changes its moderator role locks out a
link holder who no longer has it.
"""

from __future__ import annotations

import asyncio
import hashlib
import secrets
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

from bot.admin import SETTINGS, Admin, NotAdmin
from bot.moderation import CaseNotFound, CaseView, Moderator, NotModerator
from bot.terminal_admin import admin_command

__all__ = ["LINK_TTL", "SETTINGS", "Grant", "NoSuchThing", "Rights", "SignInLinks", "WebModeration", "moderator_link"]

LINK_TTL = timedelta(minutes=10)


@dataclass(frozen=True)
class Grant:
    """A reader's rights in one guild, as Discord showed them."""

    roles: tuple[int, ...] = ()
    manage_messages: bool = False
    admin: bool = False  # Manage Server: the guild's settings


@dataclass(frozen=True)
class Rights:
    """Who is signed in: the operator (every guild) or a moderator of the guilds in ``grants``."""

    user_id: int
    operator: bool = False
    grants: dict[int, Grant] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"user_id": self.user_id, "operator": self.operator,
                "grants": {str(g): {"roles": list(v.roles), "manage_messages": v.manage_messages, "admin": v.admin}
                           for g, v in self.grants.items()}}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Rights:
        grants = {int(g): Grant(tuple(int(r) for r in v.get("roles", ())), bool(v.get("manage_messages")),
                                bool(v.get("admin"))) for g, v in (data.get("grants") or {}).items()}
        return cls(int(data["user_id"]), bool(data.get("operator")), grants)

    def guild_ids(self) -> list[int] | None:
        """The guilds this reader sees; None: all of them."""
        return None if self.operator else sorted(self.grants)


class NoSuchThing(LookupError):
    """An id that names nothing (a 404 on the page)."""


def _hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class SignInLinks:
    """One-time sign-in links: the secret goes into the URL, only its hash into the database."""

    def __init__(self, repo: Any, *, ttl: timedelta = LINK_TTL) -> None:
        self.repo = repo
        self.ttl = ttl

    async def create(self, rights: Rights) -> str:
        token = secrets.token_urlsafe(32)
        data = rights.to_json()
        await self.repo.create_sign_in(_hash(token), rights.user_id, operator=rights.operator,
                                       grants=data["grants"], ttl=self.ttl)
        return token

    async def redeem(self, token: str, *, session_ttl: timedelta | None = None) -> Rights | None:
        """The link's rights if it is unused and not expired (it is used up now), else None. ``session_ttl``: the
        link's row then stands for the session it opens (``session_id``), live that long unless ended."""
        if not token or len(token) > 128:
            return None
        row = await self.repo.redeem_sign_in(_hash(token), session_ttl=session_ttl)
        if row is None:
            return None
        return Rights.from_json({"user_id": row.user_id, "operator": row.operator, "grants": row.grants})

    @staticmethod
    def session_id(token: str) -> str:
        return _hash(token)

    async def open_session(self, rights: Rights, lifetime: timedelta) -> str:
        """A session without a link (Discord sign-in): its id, revocable like a link's."""
        token = await self.create(rights)
        await self.redeem(token, session_ttl=lifetime)
        return _hash(token)

    async def live(self, session_id: str) -> bool:
        return bool(session_id) and await self.repo.sign_in_live(session_id)

    async def end(self, session_id: str) -> None:
        if session_id:
            await self.repo.end_sign_in(session_id)


async def moderator_link(service: Any, actor: Moderator, can_manage_guild: bool, base_url: str) -> str:
    """``/dalle-mod web``: a one-time link for a moderator, bound to the rights Discord showed for them in this
    guild (their roles, Manage Messages, Manage Server). Anyone else is refused (NotModerator)."""
    if actor.guild_id is None or not await service.moderation.is_moderator(actor.guild_id, actor.role_ids,
                                                                           actor.can_manage_messages):
        raise NotModerator()
    grant = Grant(tuple(actor.role_ids), actor.can_manage_messages, bool(can_manage_guild))
    token = await SignInLinks(service.repo).create(Rights(actor.user_id, grants={actor.guild_id: grant}))
    minutes = int(LINK_TTL.total_seconds() // 60)
    return (f"Your sign-in link to the moderators' page (one use, {minutes} minutes; don't share it): "
            f"{base_url.rstrip('/')}/signin/{token}")


class WebModeration:
    """What the page reads and does, each call checked against the reader's rights."""

    def __init__(self, service: Any) -> None:
        """``service``: the ``bot.service.GenerationService`` whose moderation, appeals, blocklist, strikes and
        admin parts the page uses (so its decisions are those of the Discord buttons)."""
        self.service = service
        self.repo = service.repo
        self.moderation = service.moderation

    # -- who acts ----------------------------------------------------------------------------------------

    async def actor(self, rights: Rights, guild_id: int | None) -> Moderator:
        """The reader as a moderator of ``guild_id``; NotModerator if they hold no right there (or lost it)."""
        if rights.operator:
            return Moderator(user_id=rights.user_id, guild_id=guild_id, can_manage_messages=True, operator=True)
        grant = rights.grants.get(guild_id) if guild_id is not None else None
        if grant is None:
            raise NotModerator("That belongs to a server you don't moderate.")
        if not await self.moderation.is_moderator(guild_id, grant.roles, grant.manage_messages):
            raise NotModerator()
        return Moderator(user_id=rights.user_id, guild_id=guild_id, role_ids=grant.roles,
                         can_manage_messages=grant.manage_messages)

    async def rights_from_discord(self, user_id: int,
                                  grants: dict[int, tuple[tuple[int, ...], bool, bool]]) -> Rights:
        """A Discord sign-in's rights: the guilds where Discord shows them as a moderator (the guild's moderator
        role, Manage Messages) or an admin (Manage Server). ``grants``: guild → (roles, Manage Messages,
        Manage Server)."""
        kept = {}
        for guild_id, (roles, manage_messages, admin) in grants.items():
            if admin or await self.moderation.is_moderator(guild_id, roles, manage_messages):
                kept[guild_id] = Grant(tuple(roles), manage_messages or admin, admin)
        return Rights(user_id, grants=kept)

    def admin(self, rights: Rights, guild_id: int) -> Admin:
        grant = rights.grants.get(guild_id)
        if not rights.operator and grant is None:
            raise NotModerator("That belongs to a server you don't moderate.")
        return Admin(user_id=rights.user_id, guild_id=guild_id, can_manage_guild=rights.operator or grant.admin)

    async def _case_actor(self, rights: Rights, case_id: int) -> tuple[Any, Moderator]:
        case = await self.repo.get_case(case_id)
        if case is None:
            raise CaseNotFound(f"Case #{case_id} does not exist.")
        return case, await self.actor(rights, case.guild_id)

    async def check_case(self, rights: Rights, case_id: int) -> None:
        """404 for a case that does not exist, 403 for one of another guild: before a batch acts at all."""
        await self._case_actor(rights, case_id)

    # -- reading -----------------------------------------------------------------------------------------

    async def queue(self, rights: Rights, *, status: str | None = "open", source: str | None = None,
                    guild_id: int | None = None, older_than: timedelta | None = None, search: str | None = None,
                    limit: int = 100) -> list[Any]:
        guilds = rights.guild_ids()
        if guild_id is not None:
            await self.actor(rights, guild_id)
            guilds = [guild_id]
        return await self.repo.queue(guilds, status=status, source=source, older_than=older_than, search=search,
                                     limit=limit)

    async def case(self, rights: Rights, case_id: int) -> tuple[CaseView, list[Any], Any]:
        """The case, every image of its generation and its author's record in the case's guild."""
        case, actor = await self._case_actor(rights, case_id)
        view = await self.moderation.case(actor, case_id)
        images = await self.repo.generation_images(case.generation_id) if case.generation_id else []
        record = (await self.repo.user_record(view.author_id, guild_id=case.guild_id)
                  if view.author_id is not None else None)
        return view, images, record

    async def image_png(self, rights: Rights, image_id: int) -> bytes:
        """An image's bytes, for a reader with rights in the guild it was made in."""
        image = await self.repo.get_image(image_id)
        if image is None:
            raise NoSuchThing(f"Image {image_id} does not exist.")
        gen = await self.repo.get_generation(image.generation_id, with_images=False)
        await self.actor(rights, gen.guild_id if gen is not None else None)
        data = await asyncio.to_thread(_read, image.file_path) if image.file_path else b""
        if not data:
            raise NoSuchThing(f"Image {image_id} has no file any more.")
        return data

    async def audit(self, rights: Rights, *, guild_id: int | None = None, action: str | None = None,
                    moderator_id: int | None = None, case_id: int | None = None, user_id: int | None = None,
                    limit: int = 500) -> list[Any]:
        guilds = rights.guild_ids()
        if guild_id is not None:
            await self.actor(rights, guild_id)
            guilds = [guild_id]
        return await self.repo.audit_log(guilds, action=action, moderator_id=moderator_id, case_id=case_id,
                                         user_id=user_id, limit=limit)

    async def dashboard(self, rights: Rights, guild_id: int | None = None, days: int = 14) -> Any:
        guilds = rights.guild_ids()
        if guild_id is not None:
            await self.actor(rights, guild_id)
            guilds = [guild_id]
        return await self.repo.daily_counts(guilds, days=days)

    async def blocklist(self, rights: Rights, guild_id: int | None) -> list[Any]:
        if guild_id is None:
            if not rights.operator:
                raise NotModerator("Choose one of your servers.")
            return await self.repo.active_blocks(None, every_guild=True)
        return await self.service.blocklist.blocks(await self.actor(rights, guild_id))

    async def user(self, rights: Rights, guild_id: int, user_id: int) -> dict[str, Any]:
        """A member's record in a guild: the counts moderators see in Discord, and their latest generations,
        refusals and strikes there."""
        record = await self.moderation.user_history(await self.actor(rights, guild_id), user_id)
        return {"record": record, "generations": await self.repo.user_generations(user_id, guild_id),
                "refusals": await self.repo.recent_refusals(user_id, guild_id, limit=20),
                "strikes": await self.repo.list_strikes(user_id, guild_id)}

    async def settings(self, rights: Rights, guild_id: int) -> dict[str, tuple[Any, bool]]:
        await self.actor(rights, guild_id)
        return await self.service.admin.show(self.admin(rights, guild_id))

    # -- acting: the very methods Discord's buttons call ---------------------------------------------------

    async def decide(self, rights: Rights, case_id: int, action: str, reason: str | None = None) -> str:
        """approve / remove / dismiss / accept / reject a case; returns what to tell the reader."""
        _, actor = await self._case_actor(rights, case_id)
        methods = {"approve": self.moderation.approve, "remove": self.moderation.remove,
                   "dismiss": self.moderation.dismiss, "accept": self.service.appeals.accept,
                   "reject": self.service.appeals.reject}
        if action not in methods:
            raise ValueError(f"unknown action {action!r}: use one of {', '.join(methods)}")
        result = await methods[action](case_id, actor, reason or None)
        return result.message

    async def ban(self, rights: Rights, case_id: int, duration: str, reason: str) -> str:
        _, actor = await self._case_actor(rights, case_id)
        return (await self.moderation.ban_author(case_id, actor, duration, reason)).message

    async def unblock(self, rights: Rights, case_id: int, reason: str | None = None) -> str:
        case, actor = await self._case_actor(rights, case_id)
        return await self.service.blocklist.unblock(actor, case_id, reason or None)

    async def set_setting(self, rights: Rights, guild_id: int, key: str, value: str) -> str:
        """One setting from a form, parsed as the terminal's ``/admin <guild> set key=value`` does; an admin's
        right (Manage Server) is needed, as for ``/dalle-admin settings set``."""
        await self.actor(rights, guild_id)
        if not self.admin(rights, guild_id).can_manage_guild:
            raise NotAdmin()
        if not key or any(c.isspace() for c in key + value) and not key.startswith("rate_limit"):
            raise ValueError("a setting and a value without spaces (rate limits: e.g. 2 per minute)")
        text = value.strip().replace(" ", "_") if key.startswith("rate_limit") else value.strip()
        return await admin_command(self.service.admin, rights.user_id, [str(guild_id), "set", f"{key}={text}"])


def _read(path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError:
        return b""
