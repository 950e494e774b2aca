"""The Discord-independent side of moderation: cases, the moderators' actions, guild bans, a user's record.

A case (an image the safety check flagged, or one a user reported) is posted once to its guild's review channel
through a :class:`ReviewFrontEnd` (``bot.cogs.moderation`` for Discord); a second report of the same image joins
the open case and refreshes its post. Every action method takes the acting :class:`Moderator`, refuses anyone who
is not one of the guild's moderators (:class:`NotModerator`, nothing changed), and is recorded as an audited
``ModerationAction`` in the same transaction as its effect. Approve and Remove re-render the public result message;
the reporters are told the outcome.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Protocol

from bot.guildrules import notify_privately
from bot.outcome import Delivery, Outcome, StoredImage, is_withheld
from bot.ratelimit import human_duration
from store.models import BanKind, CaseSource, CaseStatus, FlaggedMode, ModAction
from store.repository import CaseClosed, Repository, UserRecord

log = logging.getLogger(__name__)

_UNITS = {"m": timedelta(minutes=1), "h": timedelta(hours=1), "d": timedelta(days=1), "w": timedelta(weeks=1)}
_DURATION = re.compile(r"\s*(\d{1,5})\s*(m|min|mins|minutes?|h|hours?|d|days?|w|weeks?)\s*", re.IGNORECASE)
PERMANENT = frozenset({"permanent", "perm", "forever", "never", "p"})


def parse_duration(text: str) -> timedelta | None:
    """``"30m"``, ``"12h"``, ``"7d"``, ``"2w"`` → a timedelta; ``"permanent"`` (or empty) → None.
    Anything else raises ValueError with a message a moderator can act on."""
    text = (text or "").strip().lower()
    if not text or text in PERMANENT:
        return None
    match = _DURATION.fullmatch(text)
    if match is None or int(match[1]) == 0:
        raise ValueError(f"duration {text!r} not understood: use e.g. 30m, 12h, 7d, 2w or permanent")
    return int(match[1]) * _UNITS[match[2][0].lower()]


def format_until(until: datetime | None) -> str:
    return "permanently" if until is None else f"until {until.strftime('%Y-%m-%d %H:%M')} UTC"


class NotModerator(PermissionError):
    """The actor is not one of the guild's moderators; nothing was changed."""

    def __init__(self, message: str = "Only this server's moderators (the moderator role or Manage Messages) "
                                      "can do that.") -> None:
        super().__init__(message)


class CaseNotFound(LookupError):
    pass


@dataclass(frozen=True)
class Moderator:
    """Who acts, as the front end saw them: their guild, their role ids and whether they hold Manage Messages
    (Discord computes that from the clicker's roles and the channel's overwrites)."""

    user_id: int
    guild_id: int | None
    role_ids: tuple[int, ...] = ()
    can_manage_messages: bool = False
    operator: bool = False  # the bot's operator (the terminal front end): moderates every case, bans globally
    channel_id: int | None = None  # where they act (the central review channel moderates the cases sent there)


@dataclass(frozen=True)
class Report:
    user_id: int
    reason: str | None
    note: str | None


@dataclass(frozen=True)
class ActionRecord:
    moderator_id: int
    action: str
    reason: str | None
    at: datetime


@dataclass
class CaseView:
    """What a review post shows of a case."""

    case_id: int
    status: str
    source: str
    reason: str | None
    guild_id: int | None
    image_id: int | None
    generation_id: int | None
    author_id: int | None = None
    prompt: str = ""
    seed: int | None = None
    model_id: str | None = None
    safety_scores: dict[str, float] = field(default_factory=dict)
    channel_id: int | None = None
    public_message_id: int | None = None
    review_message_id: int | None = None
    reports: list[Report] = field(default_factory=list)
    actions: list[ActionRecord] = field(default_factory=list)
    png: bytes = field(default=b"", repr=False)
    note: str | None = None  # why the bot closed it (e.g. the public message was deleted)
    details: list[str] = field(default_factory=list)  # a refusals case: the user's latest refused prompts

    @property
    def open(self) -> bool:
        return self.status == CaseStatus.OPEN.value


@dataclass(frozen=True)
class ActionResult:
    case: CaseView
    action: str
    message: str  # for the moderator


class ReviewFrontEnd(Protocol):
    """A front end's side of the review queue (Discord: the review channel). Every method must work after a
    restart from the arguments alone."""

    async def post_case(self, channel_id: int, case: CaseView) -> int:
        """Post the case; return the post's message id."""

    async def update_case(self, channel_id: int, message_id: int, case: CaseView) -> None: ...

    async def refresh_result(self, outcome: Outcome) -> None:
        """Re-render the public result message with the images as they are now."""

    async def tell_user(self, user_id: int, text: str, contact: Delivery | None) -> None:
        """Tell a user privately (through ``contact``'s interaction while it is valid, else a DM)."""


class ModerationService:
    def __init__(self, repo: Repository, *, guild_settings: Callable[[int | None], Awaitable[Any]],
                 flagged_mode: Callable[[int | None], Awaitable[str]], review_channel_id: int | None = None,
                 front_end: ReviewFrontEnd | None = None) -> None:
        """``guild_settings``/``flagged_mode``: the generation service's cached per-guild settings;
        ``review_channel_id``: where cases of guilds without their own review channel go."""
        self.repo = repo
        self.guild_settings = guild_settings
        self.flagged_mode = flagged_mode
        self.review_channel_id = review_channel_id
        self.front_end = front_end
        # reporters to tell the outcome, with the interaction they reported through (lost on a restart: a DM then)
        self.reporters: dict[int, dict[int, Delivery | None]] = {}
        # called as (case, author id, reason) after a Remove: the author's strike (``bot.strikes``)
        self.on_removed: Callable[[Any, int, str | None], Awaitable[None]] | None = None
        self.on_decided: Callable[[int], Awaitable[None]] | None = None  # a case on this generation was decided
        self._case_locks: dict[int, asyncio.Lock] = {}
        self.blocklist: Any = None  # bot.blocklist.BlocklistService: Remove blocks the image's hash
        # whether this process posts a guild's waiting cases at start (several processes, each its own shards)
        self.serves: Callable[[int | None], bool] = lambda guild_id: True

    # -- who may act ---------------------------------------------------------------------------------

    async def is_moderator(self, guild_id: int | None, role_ids: tuple[int, ...] | list[int],
                           can_manage_messages: bool) -> bool:
        """Manage Messages, or the guild's moderator role. Outside a guild nobody moderates."""
        if guild_id is None:
            return False
        if can_manage_messages:
            return True
        gs = await self.guild_settings(guild_id)
        role = getattr(gs, "moderator_role_id", None) if gs is not None else None
        return role is not None and int(role) in {int(r) for r in role_ids}

    async def _require(self, actor: Moderator, case: Any) -> None:
        if actor.operator:
            return
        if case.guild_id is not None and actor.guild_id != case.guild_id and not (
                actor.channel_id is not None and actor.channel_id == self.review_channel_id
                and await self.review_channel(case.guild_id) == self.review_channel_id):
            # another server's case, unless it was sent to the central review channel (REVIEW_CHANNEL_ID) the
            # actor moderates in: then they are judged as moderators of that channel's server
            raise NotModerator("That case belongs to another server.")
        if not await self.is_moderator(actor.guild_id, actor.role_ids, actor.can_manage_messages):
            raise NotModerator()

    async def _case(self, case_id: int) -> Any:
        case = await self.repo.get_case(case_id)
        if case is None:
            raise CaseNotFound(f"Case #{case_id} does not exist.")
        return case

    # -- the review queue ----------------------------------------------------------------------------

    async def review_channel(self, guild_id: int | None) -> int | None:
        gs = await self.guild_settings(guild_id)
        channel = getattr(gs, "review_channel_id", None) if gs is not None else None
        return int(channel) if channel else self.review_channel_id

    async def case_view(self, case_id: int, *, with_png: bool = True) -> CaseView:
        case = await self._case(case_id)
        view = CaseView(case_id=case.id, status=case.status, source=case.source, reason=case.reason,
                        guild_id=case.guild_id, image_id=case.image_id, generation_id=case.generation_id,
                        review_message_id=case.review_message_id, note=case.note,
                        actions=[ActionRecord(a.moderator_id, a.action, a.reason, a.created_at)
                                 for a in case.actions])
        gen = await self.repo.get_generation(case.generation_id, with_images=False) if case.generation_id else None
        if gen is not None:
            view.author_id, view.prompt, view.seed = gen.user_id, gen.prompt, gen.seed
            view.model_id, view.channel_id = gen.checkpoint_id, gen.channel_id
            view.public_message_id = None if gen.private or gen.deleted_at else gen.result_message_id
        if view.author_id is None and case.user_id is not None:  # a case about a user (refusals, appeal)
            view.author_id = case.user_id
            if case.source == CaseSource.REFUSALS.value:
                view.details = [r.prompt for r in await self.repo.recent_refusals(case.user_id, case.guild_id)]
        image = await self.repo.get_image(case.image_id) if case.image_id is not None else None
        if image is not None:
            view.safety_scores = dict(image.safety_scores or {})
            if with_png and image.file_path:
                view.png = await asyncio.to_thread(_read, Path(image.file_path))
        view.reports = [Report(f.user_id, f.reason, f.note) for f in await self.repo.case_reports(case.id)]
        return view

    async def open_case(self, source: str, *, image_id: int, reason: str | None = None, reporter: int | None = None,
                        contact: Delivery | None = None) -> tuple[int, bool]:
        """Open a case on an image, or join the one open on it (a second report adds to it, no second case), and
        post it or refresh its post. Returns ``(case id, created)``."""
        case, created = await self.repo.open_case(source, image_id=image_id, reason=reason)
        await self.case_opened(case.id, created, reporter=reporter, contact=contact)
        return case.id, created

    async def case_opened(self, case_id: int, created: bool, reporter: int | None = None,
                          contact: Delivery | None = None) -> None:
        """A case was opened (``created``) or a report joined it: remember the reporter, post the case or
        refresh its post. Posting is best effort (the case stays unposted and is posted at the next start)."""
        if reporter is not None:
            self.reporters.setdefault(case_id, {})[reporter] = contact
        try:
            await self._post_or_update(case_id)
        except Exception:  # noqa: BLE001 - the report is recorded; the post is retried at the next start
            log.warning("posting case %s to the review channel failed", case_id, exc_info=True)

    async def outcome_delivered(self, outcome: Outcome) -> None:
        """A result was posted: post its flagged images' cases (now the public message can be linked)."""
        if any(im.flagged or im.withheld for im in outcome.images):  # withheld: a blocked hash's case too
            await self.post_pending(outcome.generation.id)

    async def post_pending(self, generation_id: int | None = None) -> list[int]:
        """Post the open cases no review message carries yet (of one generation, or all); returns their ids."""
        if self.front_end is None:
            return []
        posted = []
        for case in await self.repo.list_unposted_cases(generation_id):
            if generation_id is None and not self.serves(case.guild_id):
                continue  # another process runs that guild's shard: it posts the case
            try:
                if await self._post_or_update(case.id):
                    posted.append(case.id)
            except Exception:  # noqa: BLE001 - one case's failure must not hold back the others
                log.warning("posting case %s to the review channel failed", case.id, exc_info=True)
        return posted

    async def _post_or_update(self, case_id: int) -> bool:
        """Post the case once (a lock per case: a report racing the flagged post joins it), else edit its post.
        Returns whether a new post was made."""
        if self.front_end is None:
            return False
        lock = self._case_locks.setdefault(case_id, asyncio.Lock())
        async with lock:
            case = await self._case(case_id)
            channel = await self.review_channel(case.guild_id)
            if channel is None:
                log.info("case %s: guild %s has no review channel", case_id, case.guild_id)
                return False
            view = await self.case_view(case_id, with_png=case.review_message_id is None)  # the bytes go once
            if view.review_message_id is not None:
                await self.front_end.update_case(channel, view.review_message_id, view)
                return False
            message_id = await self.front_end.post_case(channel, view)
            await self.repo.set_case_review_message(case_id, message_id)
            log.info("case %s posted to review channel %s", case_id, channel)
            return True

    # -- actions -------------------------------------------------------------------------------------

    async def approve(self, case_id: int, actor: Moderator, reason: str | None = None) -> ActionResult:
        """Close the case; the image is shown again (un-spoilered, back in the grid)."""
        return await self._close(case_id, actor, ModAction.APPROVE.value, reason)

    async def remove(self, case_id: int, actor: Moderator, reason: str | None = None) -> ActionResult:
        """Close the case; the image is taken out of the public message."""
        return await self._close(case_id, actor, ModAction.REMOVE.value, reason)

    async def dismiss(self, case_id: int, actor: Moderator, reason: str | None = None) -> ActionResult:
        """Close the case with nothing changed."""
        return await self._close(case_id, actor, ModAction.DISMISS.value, reason)

    async def _close(self, case_id: int, actor: Moderator, action: str, reason: str | None) -> ActionResult:
        case = await self._case(case_id)
        await self._require(actor, case)
        if case.source == CaseSource.APPEAL.value:
            raise ValueError(f"Case #{case_id} is an appeal: accept or reject it.")
        if case.image_id is None and action != ModAction.DISMISS.value:
            raise ValueError(f"Case #{case_id} has no image to {action}.")
        try:
            await self.repo.add_action(case_id, actor.user_id, action, reason=reason,
                                       guild_id=case.guild_id if case.guild_id is not None else actor.guild_id)
        except CaseClosed:
            view = await self.case_view(case_id, with_png=False)
            return ActionResult(view, "none", f"Case #{case_id} was already closed ({view.status}); nothing changed.")
        self._case_locks.pop(case_id, None)
        if action == ModAction.REMOVE.value and self.blocklist is not None:
            await self.blocklist.block_removed(case, actor, reason)  # audited ``block``; never undoes the removal
        if action != ModAction.DISMISS.value and case.generation_id is not None:
            await self._refresh_public(case.generation_id)
        view = await self._after_action(case_id)
        word = {"approve": "approved", "remove": "removed", "dismiss": "dismissed"}[action]
        await self._tell_reporters(case_id, f"Thanks for your report: a moderator reviewed the image and {word} "
                                            f"it{' (it was taken down)' if action == 'remove' else ''}.",
                                  guild_id=case.guild_id)
        if action == ModAction.REMOVE.value and view.author_id is not None and self.on_removed is not None:
            await self.on_removed(case, view.author_id, reason)
        if action == ModAction.REMOVE.value and view.author_id is not None and self.front_end is not None:
            why = f" Reason: {reason}" if reason else ""
            try:  # the author hears why their image went (a DM: their interaction is long gone)
                await self.front_end.tell_user(view.author_id, f"A moderator removed one of your images (prompt: "
                                                               f"“{view.prompt[:200]}”).{why}", None)
            except Exception:  # noqa: BLE001 - closed DMs must not undo the action
                log.info("could not tell the author of case %s", case_id, exc_info=True)
        if case.generation_id is not None and self.on_decided is not None:  # last: the steps above read its rows
            await self.on_decided(case.generation_id)
        return ActionResult(view, action, f"Case #{case_id} {word}.")

    async def ban_author(self, case_id: int, actor: Moderator, duration: str, reason: str) -> ActionResult:
        """Ban the author of the case's image from generating in this guild for ``duration`` ("7d", "permanent")."""
        case = await self._case(case_id)
        await self._require(actor, case)
        if not reason or not reason.strip():
            raise ValueError("a ban needs a reason")
        length = parse_duration(duration)
        view = await self.case_view(case_id, with_png=False)
        guild_id = case.guild_id if case.guild_id is not None else actor.guild_id  # the server the image was in
        if view.author_id is None or guild_id is None:
            raise ValueError(f"case #{case_id} has no author or server to ban them from")
        until = self.repo.now() + length if length is not None else None
        await self.repo.ban_in_guild(guild_id, view.author_id, actor.user_id, reason=reason.strip(),
                                     expires_at=until, case_id=case_id)
        view = await self._after_action(case_id)
        where = "here" if guild_id == actor.guild_id else f"in server {guild_id}"
        return ActionResult(view, ModAction.BAN.value,
                            f"<@{view.author_id}> is banned from generating {where} {format_until(until)}.")

    async def history(self, case_id: int, actor: Moderator) -> tuple[int | None, UserRecord | None]:
        """The case author's record in this guild, for a moderator's eyes only."""
        case = await self._case(case_id)
        await self._require(actor, case)
        view = await self.case_view(case_id, with_png=False)
        if view.author_id is None:
            return None, None
        guild_id = case.guild_id if case.guild_id is not None else actor.guild_id
        return view.author_id, await self.repo.user_record(view.author_id, guild_id=guild_id)

    # -- commands (``/dalle-mod``): the same checks, no case needed ---------------------------------------

    async def _require_guild(self, actor: Moderator) -> int:
        if actor.guild_id is None or not await self.is_moderator(actor.guild_id, actor.role_ids,
                                                                 actor.can_manage_messages):
            raise NotModerator()
        return actor.guild_id

    async def cases(self, actor: Moderator, *, open_only: bool = True, limit: int = 20) -> list[Any]:
        """The guild's cases (open ones oldest first, or all newest first); the operator's: every open case."""
        if actor.operator:
            return await self.repo.list_open_cases(limit=limit)
        guild_id = await self._require_guild(actor)
        return await self.repo.list_guild_cases(guild_id, open_only=open_only, limit=limit)

    async def case(self, actor: Moderator, case_id: int) -> CaseView:
        case = await self._case(case_id)
        await self._require(actor, case)
        return await self.case_view(case_id, with_png=False)

    async def user_history(self, actor: Moderator, user_id: int) -> UserRecord:
        return await self.repo.user_record(user_id, guild_id=await self._require_guild(actor))

    async def ban_user(self, actor: Moderator, user_id: int, duration: str, reason: str) -> str:
        """Ban a member from generating in the actor's guild for ``duration``; returns what to tell the moderator."""
        guild_id = await self._require_guild(actor)
        if not reason or not reason.strip():
            raise ValueError("a ban needs a reason")
        length = parse_duration(duration)
        until = self.repo.now() + length if length is not None else None
        await self.repo.ban_in_guild(guild_id, user_id, actor.user_id, reason=reason.strip(), expires_at=until)
        return f"<@{user_id}> is banned from generating here {format_until(until)}."

    async def operator_ban(self, actor: Moderator, user_id: int, reason: str, *, lift: bool = False) -> str:
        """The operator's global ban (every guild, the terminal too), or its lifting; audited."""
        if not actor.operator:
            raise NotModerator("Only the bot's operator bans globally.")
        if not lift and (not reason or not reason.strip()):
            raise ValueError("a ban needs a reason")
        action = ModAction.UNBAN.value if lift else ModAction.BAN.value
        await self.repo.add_action(None, actor.user_id, action, reason=reason or None, target_user_id=user_id)
        return f"user {user_id} may generate again." if lift else f"user {user_id} is banned everywhere: {reason}"

    async def unban_user(self, actor: Moderator, user_id: int, reason: str | None = None) -> str:
        lifted = await self.repo.lift_guild_bans(await self._require_guild(actor), user_id, actor.user_id, reason)
        return f"<@{user_id}> may generate here again." if lifted else f"<@{user_id}> was not banned here."

    async def _after_action(self, case_id: int) -> CaseView:
        """Edit the review post to show the action (best effort)."""
        view = await self.case_view(case_id, with_png=False)
        if self.front_end is not None and view.review_message_id is not None:
            channel = await self.review_channel(view.guild_id)
            if channel is not None:
                try:
                    await self.front_end.update_case(channel, view.review_message_id, view)
                except Exception:  # noqa: BLE001 - the action is recorded; the post is cosmetic
                    log.warning("updating the review post of case %s failed", case_id, exc_info=True)
        return view

    async def _tell_reporters(self, case_id: int, text: str, guild_id: int | None = None) -> None:
        if self.front_end is None:
            return
        known = self.reporters.pop(case_id, {})
        for report in await self.repo.case_reports(case_id):
            known.setdefault(report.user_id, None)
        privately = notify_privately(await self.guild_settings(guild_id))  # the guild's notify_mode
        for user_id, contact in known.items():
            try:
                await self.front_end.tell_user(user_id, text, contact if privately else None)
            except Exception:  # noqa: BLE001 - a closed DM must not undo the action
                log.info("could not tell reporter %s the outcome of case %s", user_id, case_id, exc_info=True)

    async def refresh_public(self, generation_id: int) -> None:
        """Re-render a public result after a change made outside its cases (``/dalle-mod purge``)."""
        await self._refresh_public(generation_id)

    async def _refresh_public(self, generation_id: int) -> None:
        """Re-render the public result: removed images out, approved ones back, flagged ones as before."""
        if self.front_end is None:
            return
        gen = await self.repo.get_generation(generation_id)
        if gen is None or gen.private or not gen.result_message_id or gen.deleted_at is not None:
            return
        removed = await self.repo.removed_image_ids(generation_id)
        withhold = await self.flagged_mode(gen.guild_id) == FlaggedMode.WITHHOLD.value
        images = []
        for row in sorted(gen.images, key=lambda r: (r.rank if r.rank is not None else r.index)):
            path = Path(row.file_path) if row.file_path else Path()
            png = await asyncio.to_thread(_read, path) if row.file_path else b""
            images.append(StoredImage(id=row.id, index=row.index, rank=row.rank or 0, path=path,
                                      sha256=row.sha256 or "", clip_score=row.clip_score or 0.0,
                                      flagged=row.hidden, hidden=row.hidden,
                                      withheld=row.id in removed
                                      or is_withheld(row.flagged, row.hidden, withhold, row.critical),
                                      png=png, removed=row.id in removed))
        try:
            await self.front_end.refresh_result(Outcome(gen, images))
        except Exception:  # noqa: BLE001 - recorded; the message edit is retried by the next action
            log.warning("re-rendering the result of generation %s failed", generation_id, exc_info=True)

    # -- admission -----------------------------------------------------------------------------------

    async def ban_message(self, user_id: int, guild_id: int | None) -> str | None:
        """Why the user may not generate in this guild now (a ban in force), or None."""
        if guild_id is None:
            return None
        ban = await self.repo.active_guild_ban(guild_id, user_id)
        if ban is None:
            return None
        why = f": {ban.reason}" if ban.reason else "."
        if ban.kind == BanKind.COOLDOWN.value and ban.expires_at is not None:
            left = human_duration((ban.expires_at - self.repo.now()).total_seconds())
            return f"You're on a cooldown in this server for another {left} ({format_until(ban.expires_at)}){why}"
        return f"You are banned from generating images in this server {format_until(ban.expires_at)}{why}"


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError:
        return b""
