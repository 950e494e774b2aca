"""Per-guild settings."""

from __future__ import annotations

import enum
from datetime import datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    Integer,
    String,
)
from sqlalchemy.orm import Mapped, mapped_column

from store.models.base import Base, check_in, utcnow


class FlaggedMode(enum.StrEnum):
    SPOILER = "spoiler"
    WITHHOLD = "withhold"


class NotifyMode(enum.StrEnum):
    """How the bot tells an author or reporter about a moderator's decision."""

    EPHEMERAL = "ephemeral"  # on their next interaction, falling back to a DM
    DM = "dm"


class GuildSettings(Base):
    """Per-guild overrides; NULL means "use the global setting"."""

    __tablename__ = "guild_settings"

    guild_id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    flagged_mode: Mapped[str | None] = mapped_column(String(16))
    review_channel_id: Mapped[int | None] = mapped_column(BigInteger)
    moderator_role_id: Mapped[int | None] = mapped_column(BigInteger)  # besides Manage Messages
    rate_limit_user: Mapped[str | None] = mapped_column(String(64))
    rate_limit_guild: Mapped[str | None] = mapped_column(String(64))
    daily_quota: Mapped[int | None] = mapped_column(Integer)
    max_queue_per_user: Mapped[int | None] = mapped_column(Integer)
    block_list: Mapped[list[str]] = mapped_column(default=list)
    allow_list: Mapped[list[str]] = mapped_column(default=list)
    max_images: Mapped[int | None] = mapped_column(Integer)
    notify_mode: Mapped[str | None] = mapped_column(String(16))
    channel_ids: Mapped[list[Any]] = mapped_column(default=list)  # where /dalle may be used; empty: anywhere
    private_results: Mapped[bool | None] = mapped_column(Boolean)  # whether `private: true` is allowed
    automod: Mapped[bool | None] = mapped_column(Boolean)  # apply the guild's AutoMod keyword rules to prompts
    strike_days: Mapped[int | None] = mapped_column(Integer)  # how long a strike counts
    strikes_to_cooldown: Mapped[int | None] = mapped_column(Integer)
    cooldown_minutes: Mapped[int | None] = mapped_column(Integer)
    strikes_to_ban: Mapped[int | None] = mapped_column(Integer)
    ban_days: Mapped[int | None] = mapped_column(Integer)  # 0: permanent
    reping_hours: Mapped[int | None] = mapped_column(Integer)  # re-ping open cases older than this, once
    appeal_days: Mapped[int | None] = mapped_column(Integer)  # one appeal per user per this many days
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)

    __table_args__ = (
        check_in("flagged_mode", FlaggedMode, "flagged_mode", nullable=True),
        check_in("notify_mode", NotifyMode, "notify_mode", nullable=True),
        CheckConstraint("daily_quota IS NULL OR daily_quota >= 0", name="daily_quota_nonnegative"),
    )
