"""Guild administration, Discord-independent: a guild's settings shown and changed by its admins (Manage Server),
each change audited like a moderator's action (``ModerationAction`` ``settings``: who, when, what)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from store.models import FlaggedMode, ModAction
from store.repository import Repository

#: what ``/dalle-admin settings set`` may change, with what the admin sees
SETTINGS = {
    "review_channel_id": "review channel",
    "moderator_role_id": "moderator role",
    "flagged_mode": "flagged images",
    "daily_quota": "daily quota per user",
    "max_queue_per_user": "queued requests per user",
}


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
                 update_settings: Callable[..., Awaitable[Any]], defaults: dict[str, Any] | None = None) -> None:
        """``guild_settings``/``update_settings``: the generation service's cached reads and its writes (which
        take effect at once in this process); ``defaults``: the global values a guild falls back to."""
        self.repo = repo
        self.guild_settings = guild_settings
        self.update_settings = update_settings
        self.defaults = defaults or {}

    def _require(self, actor: Admin) -> int:
        if actor.guild_id is None or not actor.can_manage_guild:
            raise NotAdmin()
        return actor.guild_id

    async def show(self, actor: Admin) -> dict[str, tuple[Any, bool]]:
        """Each setting as ``(value, is_the_guild's_own)``: the guild's override, else the global default."""
        gs = await self.guild_settings(self._require(actor))
        out = {}
        for key in SETTINGS:
            own = getattr(gs, key, None) if gs is not None else None
            out[key] = (own, True) if own is not None else (self.defaults.get(key), False)
        return out

    async def set(self, actor: Admin, **fields: Any) -> str:
        """Change some settings (None values are left alone); audited. Returns what to tell the admin."""
        guild_id = self._require(actor)
        changes = {k: v for k, v in fields.items() if v is not None}
        unknown = set(changes) - set(SETTINGS)
        if unknown:
            raise ValueError(f"unknown setting(s): {', '.join(sorted(unknown))}")
        if not changes:
            raise ValueError("nothing to change: give at least one setting")
        if "flagged_mode" in changes and changes["flagged_mode"] not in {m.value for m in FlaggedMode}:
            raise ValueError("flagged images must be spoiler or withhold")
        for key in ("daily_quota", "max_queue_per_user"):
            if key in changes and int(changes[key]) < 0:
                raise ValueError(f"{SETTINGS[key]} cannot be negative")
        await self.update_settings(guild_id, **changes)
        what = ", ".join(f"{k}={v}" for k, v in sorted(changes.items()))
        await self.repo.add_action(None, actor.user_id, ModAction.SETTINGS.value, reason=what, guild_id=guild_id)
        return "Changed: " + ", ".join(f"{label} → {changes[k]}" for k, label in SETTINGS.items() if k in changes) + "."
