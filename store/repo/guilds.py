"""Per-guild settings: overrides of the global flagged-image mode, review channel, rate limits, quotas and
prompt lists; a NULL column means "use the global setting"."""

from __future__ import annotations

from typing import Any

from store.models import FlaggedMode, GuildSettings
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
    }
)


class GuildRepository(RepositoryBase):
    """Guild settings."""

    async def get_guild_settings(self, guild_id: int) -> GuildSettings | None:
        async with self._read() as s:
            return await s.get(GuildSettings, guild_id)

    async def update_guild_settings(self, guild_id: int, **fields: Any) -> GuildSettings:
        """Create or update a guild's overrides (None clears an override back to the global setting)."""
        unknown = set(fields) - _GUILD_FIELDS
        if unknown:
            raise ValueError(f"unknown guild setting(s): {', '.join(sorted(unknown))}")
        if "flagged_mode" in fields:
            check_choice("flagged_mode", fields["flagged_mode"], FlaggedMode, nullable=True)
        for key in ("block_list", "allow_list"):
            if key in fields:
                fields[key] = [str(x) for x in (fields[key] or [])]
        return await self._upsert(GuildSettings, guild_id, fields, {"block_list": [], "allow_list": []})
