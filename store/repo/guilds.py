"""Per-guild settings: overrides of the global flagged-image mode, review channel, rate limits, quotas, prompt
lists, where ``/dalle`` may be used and how members are told outcomes; a NULL column means "use the global
setting"."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession

from store.models import FlaggedMode, GuildSettings, ModAction, ModerationAction, NotifyMode
from store.repo.base import RepositoryBase, check_choice

_GUILD_FIELDS = frozenset(
    {
        "flagged_mode",
        "review_channel_id",
        "moderator_role_id",
        "rate_limit_user",
        "rate_limit_guild",
        "daily_quota",
        "max_queue_per_user",
        "block_list",
        "allow_list",
        "max_images",
        "notify_mode",
        "channel_ids",
        "private_results",
        "automod",
        "reping_hours",  # open cases older than this are re-pinged once (bot.case_upkeep); 0: never
        *("strike_days", "strikes_to_cooldown", "cooldown_minutes", "strikes_to_ban", "ban_days", "appeal_days"),
    }
)
#: counts and periods of the strike rules (``bot.strikes``): whole numbers, 0 or more (0: off, or permanent bans)
_STRIKE_FIELDS = ("strike_days", "strikes_to_cooldown", "cooldown_minutes", "strikes_to_ban", "ban_days", "appeal_days")
#: the JSON list columns :meth:`GuildRepository.edit_guild_list` edits in place
_LIST_FIELDS = frozenset({"block_list", "allow_list", "channel_ids"})


class GuildRepository(RepositoryBase):
    """Guild settings."""

    async def get_guild_settings(self, guild_id: int) -> GuildSettings | None:
        async with self._read() as s:
            return await s.get(GuildSettings, guild_id)

    async def update_guild_settings(self, guild_id: int, **fields: Any) -> GuildSettings:
        """Create or update a guild's overrides (None clears an override back to the global setting)."""
        return await self._upsert(GuildSettings, guild_id, _checked(fields), _new_row())

    async def change_guild_settings(
        self, guild_id: int, moderator_id: int, action: str, *, fields: dict[str, Any] | None = None,
        lists: dict[str, ListEdit] | None = None,
        reason: Callable[[dict[str, tuple[list[Any], list[Any]]]], str | None],
    ) -> tuple[GuildSettings, dict[str, tuple[list[Any], list[Any]]]]:
        """An admin's change and its audit row (``action`` by ``moderator_id``) in one transaction, so that no
        change is ever left unaudited: ``fields`` as :meth:`update_guild_settings` takes them, ``lists`` edited as
        :meth:`edit_guild_list` does. ``reason(edits)`` gets each list's ``(added, removed)`` and returns the audit
        row's reason, or None when nothing changed (then no row). Returns the row and the edits."""
        check_choice("action", action, ModAction)
        fields = _checked(dict(fields or {}))
        lists = lists or {}
        if set(lists) - _LIST_FIELDS:
            raise ValueError(f"{', '.join(sorted(set(lists) - _LIST_FIELDS))} is not a list setting")

        async def work(s: AsyncSession) -> tuple[tuple[GuildSettings, dict[str, tuple[list[Any], list[Any]]]], bool]:
            row = await s.get(GuildSettings, guild_id, with_for_update=True)
            created = row is None
            if row is None:
                row = GuildSettings(guild_id=guild_id, **_new_row())
                s.add(row)
            for name, value in fields.items():
                setattr(row, name, value)
            edits = {column: _edit_list(row, column, e.add, e.remove, e.clear) for column, e in lists.items()}
            now = self.now()
            row.updated_at = now
            why = reason(edits)
            if why is not None:
                s.add(ModerationAction(case_id=None, moderator_id=moderator_id, guild_id=guild_id, action=action,
                                       reason=why, created_at=now))
            return (row, edits), created

        return await self._insert_race(work)

    async def edit_guild_list(self, guild_id: int, column: str, *, add: Iterable[Any] = (), remove: Iterable[Any] = (),
                              clear: bool = False) -> tuple[GuildSettings, list[Any], list[Any]]:
        """Add to and remove from one of a guild's list settings in one transaction (the row locked), so two admins
        editing at once lose neither change. Returns ``(row, added, removed)``: only what actually changed (an entry
        already there is not added twice; one not there is not removed)."""
        if column not in _LIST_FIELDS:
            raise ValueError(f"{column} is not a list setting")

        async def work(s: AsyncSession) -> tuple[tuple[GuildSettings, list[Any], list[Any]], bool]:
            row = await s.get(GuildSettings, guild_id, with_for_update=True)
            created = row is None
            if row is None:
                row = GuildSettings(guild_id=guild_id, **_new_row())
                s.add(row)
            added, dropped = _edit_list(row, column, add, remove, clear)
            row.updated_at = self.now()
            return (row, added, dropped), created

        return await self._insert_race(work)


@dataclass(frozen=True)
class ListEdit:
    """What to do to one list setting: entries to add, entries to remove, or empty it first (``clear``)."""

    add: tuple[Any, ...] = ()
    remove: tuple[Any, ...] = ()
    clear: bool = False


def _edit_list(row: GuildSettings, column: str, add: Iterable[Any], remove: Iterable[Any],
               clear: bool) -> tuple[list[Any], list[Any]]:
    """Edit ``row``'s list ``column`` in place; returns what was actually added and removed."""
    cast = int if column == "channel_ids" else str
    to_add, to_remove = [cast(a) for a in add], {cast(r) for r in remove}
    current = [cast(x) for x in (getattr(row, column) or [])]
    dropped = list(current) if clear else [x for x in current if x in to_remove]
    kept = [x for x in current if x not in dropped]
    added: list[Any] = []
    for x in to_add:
        if x not in kept and x not in added:
            added.append(x)
    setattr(row, column, kept + added)  # a new list: the JSON column sees the change
    return added, dropped


def _checked(fields: dict[str, Any]) -> dict[str, Any]:
    """``fields`` validated (ValueError, nothing written, for anything out of range) and normalised."""
    unknown = set(fields) - _GUILD_FIELDS
    if unknown:
        raise ValueError(f"unknown guild setting(s): {', '.join(sorted(unknown))}")
    if "flagged_mode" in fields:
        check_choice("flagged_mode", fields["flagged_mode"], FlaggedMode, nullable=True)
    if "notify_mode" in fields:
        check_choice("notify_mode", fields["notify_mode"], NotifyMode, nullable=True)
    for key in _STRIKE_FIELDS:
        least = 1 if key == "strike_days" else 0
        if fields.get(key) is not None and (isinstance(fields[key], bool) or int(fields[key]) < least):
            raise ValueError(f"{key} must be a whole number >= {least}; got {fields[key]}")
    if fields.get("reping_hours") is not None and not 0 <= int(fields["reping_hours"]) <= 8760:
        raise ValueError(f"reping_hours must be a whole number from 0 to 8760; got {fields['reping_hours']}")
    if fields.get("max_images") is not None and int(fields["max_images"]) < 1:
        raise ValueError(f"max_images must be >= 1; got {fields['max_images']}")
    for quota in ("daily_quota", "max_queue_per_user"):
        if fields.get(quota) is not None and int(fields[quota]) < 0:
            raise ValueError(f"{quota} must be >= 0; got {fields[quota]}")
    for key in ("block_list", "allow_list"):
        if key in fields:
            fields[key] = [str(x) for x in (fields[key] or [])]
    if "channel_ids" in fields:
        fields["channel_ids"] = [int(x) for x in (fields["channel_ids"] or [])]
    return fields


def _new_row() -> dict[str, Any]:
    return {"block_list": [], "allow_list": [], "channel_ids": []}
