"""Moderation: refusals, review cases, the moderators' audited actions, user state and per-guild bans."""

from __future__ import annotations

import enum
from datetime import datetime

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    text,
)
from sqlalchemy.orm import Mapped, mapped_column, relationship

from store.models.base import Base, check_in, utcnow


class CaseSource(enum.StrEnum):
    AUTO = "auto"
    REPORT = "report"


class CaseStatus(enum.StrEnum):
    OPEN = "open"
    APPROVED = "approved"
    REMOVED = "removed"
    DISMISSED = "dismissed"  # closed with no change: the image stays as it was


class ModAction(enum.StrEnum):
    APPROVE = "approve"
    REMOVE = "remove"
    BAN = "ban"
    UNBAN = "unban"
    DISMISS = "dismiss"
    SETTINGS = "settings"  # a guild setting changed (/dalle-admin)


class Refusal(Base):
    """Every prompt-filter or limit refusal, so moderators and bias evaluation can see what was turned away."""

    __tablename__ = "refusals"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    user_id: Mapped[int] = mapped_column(BigInteger)
    guild_id: Mapped[int | None] = mapped_column(BigInteger)
    prompt: Mapped[str] = mapped_column(Text)
    normalized: Mapped[str | None] = mapped_column(Text)
    reason: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    __table_args__ = (Index("ix_refusals_user_id_created_at", "user_id", "created_at"),)


class ModerationCase(Base):
    """A flagged or reported image awaiting (or after) a moderator's decision; at most one open case per image."""

    __tablename__ = "moderation_cases"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    image_id: Mapped[int | None] = mapped_column(ForeignKey("images.id", ondelete="SET NULL"))
    generation_id: Mapped[int | None] = mapped_column(ForeignKey("generations.id", ondelete="SET NULL"))
    guild_id: Mapped[int | None] = mapped_column(BigInteger)  # where the image was posted (None: a DM)
    source: Mapped[str] = mapped_column(String(16))
    status: Mapped[str] = mapped_column(String(16), default=CaseStatus.OPEN.value)
    reason: Mapped[str | None] = mapped_column(Text)
    opened_at: Mapped[datetime] = mapped_column(default=utcnow)
    closed_at: Mapped[datetime | None]
    review_message_id: Mapped[int | None] = mapped_column(BigInteger)

    actions: Mapped[list[ModerationAction]] = relationship(
        back_populates="case", order_by="ModerationAction.id", passive_deletes=True
    )

    __table_args__ = (
        check_in("source", CaseSource, "source"),
        check_in("status", CaseStatus, "status"),
        Index("ix_moderation_cases_status_opened_at", "status", "opened_at"),  # open cases, oldest first
        Index("ix_moderation_cases_guild_id_status", "guild_id", "status"),  # a guild's queue
        Index(
            "uq_moderation_cases_open_image",
            "image_id",
            unique=True,
            sqlite_where=text("status = 'open'"),
            postgresql_where=text("status = 'open'"),
        ),
    )


class ModerationAction(Base):
    """Who did what, why and when. ``case_id`` is empty for a ban/unban issued outside a case."""

    __tablename__ = "moderation_actions"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    case_id: Mapped[int | None] = mapped_column(ForeignKey("moderation_cases.id", ondelete="CASCADE"))
    moderator_id: Mapped[int] = mapped_column(BigInteger)
    guild_id: Mapped[int | None] = mapped_column(BigInteger)  # the guild the action was taken in
    action: Mapped[str] = mapped_column(String(16))
    target_user_id: Mapped[int | None] = mapped_column(BigInteger)
    reason: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    case: Mapped[ModerationCase | None] = relationship(back_populates="actions")

    __table_args__ = (
        check_in("action", ModAction, "action"),
        Index("ix_moderation_actions_case_id", "case_id"),
        Index("ix_moderation_actions_target_user_id", "target_user_id"),
    )


class UserState(Base):
    """Per-user moderation and quota state (a row exists only once something is set)."""

    __tablename__ = "user_state"

    user_id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    banned: Mapped[bool] = mapped_column(Boolean, default=False)
    ban_reason: Mapped[str | None] = mapped_column(Text)
    opted_out: Mapped[bool] = mapped_column(Boolean, default=False)  # no feedback/training use of their data
    strikes: Mapped[int] = mapped_column(Integer, default=0)
    cooldown_until: Mapped[datetime | None]
    daily_quota: Mapped[int | None] = mapped_column(Integer)  # override of the guild/global quota
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)

    __table_args__ = (CheckConstraint("daily_quota IS NULL OR daily_quota >= 0", name="daily_quota_nonnegative"),)


class GuildBan(Base):
    """A guild's ban of a user from generating there, until ``expires_at`` (None: permanent) or until lifted.
    ``user_state.banned`` is the operator's global ban; this is a guild moderator's."""

    __tablename__ = "guild_bans"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    guild_id: Mapped[int] = mapped_column(BigInteger)
    user_id: Mapped[int] = mapped_column(BigInteger)
    reason: Mapped[str | None] = mapped_column(Text)
    moderator_id: Mapped[int] = mapped_column(BigInteger)
    case_id: Mapped[int | None] = mapped_column(ForeignKey("moderation_cases.id", ondelete="SET NULL"))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    expires_at: Mapped[datetime | None]
    lifted_at: Mapped[datetime | None]

    __table_args__ = (Index("ix_guild_bans_guild_id_user_id", "guild_id", "user_id"),)
