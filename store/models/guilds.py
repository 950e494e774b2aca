"""Per-guild settings."""

from __future__ import annotations

import enum
from datetime import datetime

from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    Integer,
    String,
)
from sqlalchemy.orm import Mapped, mapped_column

from store.models.base import Base, check_in, utcnow


class FlaggedMode(enum.StrEnum):
    SPOILER = "spoiler"
    WITHHOLD = "withhold"


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
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)

    __table_args__ = (
        check_in("flagged_mode", FlaggedMode, "flagged_mode", nullable=True),
        CheckConstraint("daily_quota IS NULL OR daily_quota >= 0", name="daily_quota_nonnegative"),
    )
