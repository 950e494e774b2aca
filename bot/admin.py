"""Guild administration, Discord-independent: a guild's settings, its own filter terms and the model that serves it,
shown and changed by its admins (Manage Server). Each change is audited like a moderator's action
(``ModerationAction`` ``settings`` / ``filter``: who, when, what) and takes effect at once."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from bot.guildrules import MAX_TERMS, clean_term, critical_category, same_term
from bot.ratelimit import LimitPolicy
from store.models import FlaggedMode, ModAction, NotifyMode
from store.repository import ListEdit, Repository

#: what ``/dalle-admin settings set`` may change, with what the admin sees
SETTINGS = {
    "review_channel_id": "review channel",
    "moderator_role_id": "moderator role",
    "flagged_mode": "flagged images",
    "daily_quota": "daily quota per user",
    "max_queue_per_user": "queued requests per user",
    "rate_limit_user": "rate limit per user",
    "rate_limit_guild": "rate limit for the server",
    "max_images": "images per request at most",
    "channel_ids": "channels where /dalle works",
    "private_results": "private results allowed",
    "notify_mode": "members told outcomes",
    "automod": "AutoMod rules applied to prompts",
    "reping_hours": "hours before an open case is re-pinged (0: never)",
    "strike_days": "days a strike counts",
    "strikes_to_cooldown": "strikes before a cooldown (0: never)",
    "cooldown_minutes": "first cooldown in minutes (doubles with each further strike)",
    "strikes_to_ban": "strikes before a ban (0: never)",
    "ban_days": "days of that ban (0: permanent)",
    "appeal_days": "days between a member's appeals",
}
MAX_CHANNELS = 25


class NotAdmin(PermissionError):
    def __init__(self) -> None:
        super().__init__("Only this server's admins (Manage Server) can change its settings.")


@dataclass(frozen=True)
class Admin:
    """Who acts: their guild and whether they hold Manage Server (as Discord computed it for the interaction)."""

    user_id: int
    guild_id: int | None
    can_manage_guild: bool = False


class AdminService:
    def __init__(self, repo: Repository, *, guild_settings: Callable[[int | None], Awaitable[Any]],
                 update_settings: Callable[..., Awaitable[Any]], defaults: dict[str, Any] | None = None,
                 invalidate: Callable[[int], None] | None = None, automod: Any = None,
                 engine_info: Callable[[], Awaitable[Any]] | None = None) -> None:
        """``guild_settings``/``update_settings``: the generation service's cached reads and its writes (which
        take effect at once in this process); ``invalidate``: drop a guild's cached settings after a list edit;
        ``defaults``: the global values a guild falls back to; ``automod``: a ``bot.automod.AutoModRules``;
        ``engine_info``: ``Engine.info``."""
        self.repo = repo
        self.guild_settings = guild_settings
        self.update_settings = update_settings
        self.defaults = defaults or {}
        self.invalidate = invalidate or (lambda guild_id: None)
        self.automod = automod
        self.engine_info = engine_info

    def _require(self, actor: Admin) -> int:
        if actor.guild_id is None or not actor.can_manage_guild:
            raise NotAdmin()
        return actor.guild_id

    # -- settings --------------------------------------------------------------------------------------

    async def show(self, actor: Admin) -> dict[str, tuple[Any, bool]]:
        """Each setting as ``(value, is_the_guild's_own)``: the guild's override, else the global default."""
        gs = await self.guild_settings(self._require(actor))
        out = {}
        for key in SETTINGS:
            own = getattr(gs, key, None) if gs is not None else None
            if key == "channel_ids" and not own:
                own = None  # an empty list: anywhere, the default
            out[key] = (own, True) if own is not None else (self.defaults.get(key), False)
        return out

    async def automod_status(self, actor: Admin) -> str:
        guild_id = self._require(actor)
        if self.automod is None:
            return "not available in this front end"
        gs = await self.guild_settings(guild_id)
        return await self.automod.status(guild_id, getattr(gs, "automod", None) is not False)

    async def set(self, actor: Admin, *, add_channel: int | None = None, remove_channel: int | None = None,
                  any_channel: bool = False, **fields: Any) -> str:
        """Change some settings (None values are left alone); audited. ``add_channel``/``remove_channel`` edit the
        list of channels where ``/dalle`` works, ``any_channel`` empties it (anywhere). Returns what to tell the
        admin; bad input raises ValueError and changes nothing."""
        guild_id = self._require(actor)
        changes = {k: v for k, v in fields.items() if v is not None}
        unknown = set(changes) - set(SETTINGS) | ({"channel_ids"} & set(changes))
        if unknown:
            raise ValueError(f"unknown setting(s): {', '.join(sorted(unknown))}")
        channel_edit = add_channel is not None or remove_channel is not None or any_channel
        if not changes and not channel_edit:
            raise ValueError("nothing to change: give at least one setting")
        self._validate(changes)
        if add_channel is not None and remove_channel is not None and int(add_channel) == int(remove_channel):
            raise ValueError("a channel cannot be added and removed at once")
        if add_channel is not None:
            gs = await self.guild_settings(guild_id)
            current = [int(c) for c in (getattr(gs, "channel_ids", None) or [])]
            if int(add_channel) not in current and len(current) >= MAX_CHANNELS:
                raise ValueError(f"at most {MAX_CHANNELS} channels; remove one first")
        lists = {"channel_ids": ListEdit(add=(add_channel,) if add_channel is not None else (),
                                         remove=(remove_channel,) if remove_channel is not None else (),
                                         clear=any_channel)} if channel_edit else {}

        def audited(edits: dict[str, tuple[list[Any], list[Any]]]) -> str:
            shown = dict(changes)
            if "channel_ids" in edits:
                shown["channel_ids"] = "+{} -{}".format(*edits["channel_ids"])
            return ", ".join(f"{k}={v}" for k, v in sorted(shown.items()))

        _, edits = await self._change(guild_id, actor, ModAction.SETTINGS, audited, fields=changes, lists=lists)
        said = [f"{label} → {changes[k]}" for k, label in SETTINGS.items() if k in changes]
        if channel_edit:
            added, removed = edits["channel_ids"]
            said += [f"/dalle works in <#{c}>" for c in added] + [f"/dalle no longer listed in <#{c}>" for c in removed]
            if any_channel:
                said.append("/dalle works in every channel")
        return "Changed: " + ", ".join(said) + "." if said else "Nothing changed."

    async def _change(self, guild_id: int, actor: Admin, action: ModAction, reason: Callable[..., str | None],
                      **what: Any) -> Any:
        """The change and its audit row in one transaction (``Repository.change_guild_settings``); this
        process's cached settings are dropped before and after, so a read racing the write keeps no old row."""
        self.invalidate(guild_id)
        try:
            return await self.repo.change_guild_settings(guild_id, actor.user_id, action.value, reason=reason, **what)
        finally:
            self.invalidate(guild_id)

    async def reset(self, actor: Admin, key: str) -> str:
        """Drop the guild's own value of one setting: the global default applies again. Audited."""
        guild_id = self._require(actor)
        if key not in SETTINGS:
            raise ValueError(f"unknown setting {key!r}")
        what = {"lists": {key: ListEdit(clear=True)}} if key == "channel_ids" else {"fields": {key: None}}
        await self._change(guild_id, actor, ModAction.SETTINGS, lambda _: f"{key}=default", **what)
        return f"{SETTINGS[key]}: back to the default."

    @staticmethod
    def _validate(changes: dict[str, Any]) -> None:
        if "flagged_mode" in changes and changes["flagged_mode"] not in {m.value for m in FlaggedMode}:
            raise ValueError("flagged images must be spoiler or withhold")
        if "notify_mode" in changes and changes["notify_mode"] not in {m.value for m in NotifyMode}:
            raise ValueError("members are told outcomes ephemeral (privately, when possible) or by dm")
        for key in ("daily_quota", "max_queue_per_user"):
            if key in changes and int(changes[key]) < 0:
                raise ValueError(f"{SETTINGS[key]} cannot be negative")
        if "max_images" in changes and not 1 <= int(changes["max_images"]) <= 9:
            raise ValueError("images per request must be between 1 and 9")
        for key in ("rate_limit_user", "rate_limit_guild"):
            if key in changes:
                text = str(changes[key]).strip()
                try:
                    items = LimitPolicy(user=text, guild="", daily_quota=None).items()[0]
                except ValueError:
                    items = []
                if not items:
                    raise ValueError(f"{SETTINGS[key]}: {text!r} not understood; write e.g. `5 per minute` or "
                                     f"`2 per 10 seconds; 20 per hour`")
                if any(item.amount < 1 for item in items):
                    raise ValueError(f"{SETTINGS[key]}: at least 1 request per period (to stop /dalle in a channel, "
                                     f"list the channels where it works)")
                changes[key] = text

    # -- the guild's own filter terms --------------------------------------------------------------------

    async def filter_add(self, actor: Admin, term: str) -> str:
        """Block ``term`` in this guild's prompts (on top of the bot's own list)."""
        return await self._add_term(actor, "block_list", term)

    async def filter_allow(self, actor: Admin, term: str) -> str:
        """Allow ``term`` despite the bot's list (a false positive for this guild); never a critical category."""
        category = critical_category(clean_term(term))
        if category is not None:
            raise ValueError(f"“{term.strip()}” touches the {category} category, which no server can allow.")
        return await self._add_term(actor, "allow_list", term)

    async def _add_term(self, actor: Admin, column: str, term: str) -> str:
        guild_id = self._require(actor)
        term = clean_term(term)
        gs = await self.guild_settings(guild_id)
        current = list(getattr(gs, column, None) or [])
        other = "allow_list" if column == "block_list" else "block_list"
        word = "blocked" if column == "block_list" else "allowed"
        if any(same_term(term, t) for t in current):
            return f"“{term}” is {word} already."
        if any(same_term(term, t) for t in getattr(gs, other, None) or []):
            raise ValueError(f"“{term}” is on the {'allow' if other == 'allow_list' else 'block'} list: "
                             f"remove it there first")
        if len(current) >= MAX_TERMS:
            raise ValueError(f"at most {MAX_TERMS} terms per list; remove one first")
        name = "block" if column == "block_list" else "allow"
        await self._change(guild_id, actor, ModAction.FILTER, lambda e: f"{name} +{term}" if e[column][0] else None,
                           lists={column: ListEdit(add=(term,))})
        return f"“{term}” is now {word} in this server's prompts."

    async def filter_remove(self, actor: Admin, term: str) -> str:
        """Take ``term`` off the guild's block or allow list (whichever holds it)."""
        guild_id = self._require(actor)
        term = clean_term(term)
        gs = await self.guild_settings(guild_id)
        said = []
        for column, name in (("block_list", "block"), ("allow_list", "allow")):
            stored = [t for t in getattr(gs, column, None) or [] if same_term(term, t)]
            if stored:
                _, edits = await self._change(
                    guild_id, actor, ModAction.FILTER,
                    lambda e, c=column, n=name: f"{n} -{', '.join(e[c][1])}" if e[c][1] else None,
                    lists={column: ListEdit(remove=tuple(stored))})
                removed = edits[column][1]
                if removed:
                    said.append(f"“{removed[0]}” is off the {name} list")
        if not said:
            raise ValueError(f"“{term}” is on neither of this server's lists")
        return "; ".join(said) + "."

    async def filter_list(self, actor: Admin) -> tuple[list[str], list[str]]:
        """The guild's own (block, allow) terms."""
        gs = await self.guild_settings(self._require(actor))
        return list(getattr(gs, "block_list", None) or []), list(getattr(gs, "allow_list", None) or [])

    # -- the model ------------------------------------------------------------------------------------------

    async def model(self, actor: Admin) -> Any:
        """``Engine.info()``: the checkpoint serving this guild, its attention backend and dtype."""
        self._require(actor)
        if self.engine_info is None:
            raise ValueError("the engine cannot say which model it serves")
        return await self.engine_info()
