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
    AUTO = "auto"  # the safety check flagged the image
    REPORT = "report"  # a user reported it
    BLOCKLIST = "blocklist"  # near-duplicate of a blocked image hash, withheld
    REFUSALS = "refusals"  # escalated from a user's pattern of refused prompts (no image)
    APPEAL = "appeal"  # a user appeals a ban, cooldown or removal (no image)


class CaseStatus(enum.StrEnum):
    OPEN = "open"
    APPROVED = "approved"
    REMOVED = "removed"
    DISMISSED = "dismissed"  # closed with no change: the image stays as it was
    ACCEPTED = "accepted"  # appeal granted
    REJECTED = "rejected"  # appeal turned down
    CLOSED = "closed"  # closed by the bot, with a note (e.g. the public message was deleted)


class ModAction(enum.StrEnum):
    APPROVE = "approve"
    REMOVE = "remove"
    BAN = "ban"
    UNBAN = "unban"
    DISMISS = "dismiss"
    SETTINGS = "settings"  # a guild setting changed (/dalle-admin)
    FILTER = "filter"  # a guild's block/allow term changed (/dalle-admin filter)
    STRIKE = "strike"  # a strike added by hand
    STRIKES_RESET = "strikes_reset"
    COOLDOWN = "cooldown"  # a cooldown imposed (by a strike threshold or by hand)
    PURGE = "purge"  # a member's images taken out of public messages
    BLOCK = "block"  # an image hash blocked
    UNBLOCK = "unblock"
    ACCEPT = "accept"  # appeal accepted
    REJECT = "reject"  # appeal rejected
    CLOSE = "close"  # a case closed by the bot (moderator_id = SYSTEM_MODERATOR)
    DELETE = "delete"  # the author deleted their own result
    # the model registry (every guild's model): who changed the served checkpoint, and the gate's verdicts
    MODEL_TRAIN = "model_train"  # a fine-tune started (its training run)
    MODEL_PROMOTE = "model_promote"  # a checkpoint made active (the reason says when the gate was overridden)
    MODEL_ROLLBACK = "model_rollback"  # the active checkpoint's parent made active again
    MODEL_REJECT = "model_reject"  # the promotion gate rejected a candidate (moderator_id = SYSTEM_MODERATOR)


SYSTEM_MODERATOR = 0
"""``moderator_id`` of actions the bot takes by itself (strike thresholds, auto-closed cases, the model gate)."""

OPERATOR_MODERATOR = 1
"""``moderator_id`` of the operator at the terminal or on the command line (``python -m training feedback``): the
terminal's user id (``bot.terminal.TERMINAL_USER_ID``, ``bot.web.cli.OPERATOR_ID``)."""


class StrikeSource(enum.StrEnum):
    REFUSAL = "refusal"  # a prompt the filter refused
    REMOVAL = "removal"  # a moderator removed one of their images
    MANUAL = "manual"  # a moderator added it by hand


class BanKind(enum.StrEnum):
    BAN = "ban"
    COOLDOWN = "cooldown"  # a short, automatic or manual pause; same effect as a ban while it lasts


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
    user_id: Mapped[int | None] = mapped_column(BigInteger)  # whom the case is about (author / appellant)
    note: Mapped[str | None] = mapped_column(Text)  # the closing note (e.g. "public message deleted")
    repinged_at: Mapped[datetime | None]  # when the review channel was reminded of it (once)

    actions: Mapped[list[ModerationAction]] = relationship(
        back_populates="case", order_by="ModerationAction.id", passive_deletes=True
    )

    __table_args__ = (
        check_in("source", CaseSource, "source"),
        check_in("status", CaseStatus, "status"),
        Index("ix_moderation_cases_status_opened_at", "status", "opened_at"),  # open cases, oldest first
        Index("ix_moderation_cases_guild_id_status", "guild_id", "status"),  # a guild's queue
        Index("ix_moderation_cases_user_id_source", "user_id", "source"),  # a user's appeals and record
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
    """A guild's ban (or cooldown) of a user from generating there, until ``expires_at`` (None: permanent) or until
    lifted. ``user_state.banned`` is the operator's global ban; this is a guild moderator's or a strike threshold's."""

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
    kind: Mapped[str] = mapped_column(String(16), default=BanKind.BAN.value, server_default=BanKind.BAN.value)

    __table_args__ = (
        check_in("kind", BanKind, "kind"),
        Index("ix_guild_bans_guild_id_user_id", "guild_id", "user_id"),
    )


class Strike(Base):
    """One offence, counted until ``expires_at``; per-guild thresholds turn live strikes into a cooldown or a ban.
    ``guild_id`` None: outside any guild (DMs, the terminal)."""

    __tablename__ = "strikes"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    guild_id: Mapped[int | None] = mapped_column(BigInteger)
    user_id: Mapped[int] = mapped_column(BigInteger)
    source: Mapped[str] = mapped_column(String(16))
    reason: Mapped[str | None] = mapped_column(Text)
    case_id: Mapped[int | None] = mapped_column(ForeignKey("moderation_cases.id", ondelete="SET NULL"))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    expires_at: Mapped[datetime]
    cleared_at: Mapped[datetime | None]  # a moderator reset them

    __table_args__ = (
        check_in("source", StrikeSource, "source"),
        Index("ix_strikes_user_id_guild_id_expires_at", "user_id", "guild_id", "expires_at"),
    )


class ImageBlock(Base):
    """A blocked perceptual hash: later images within a small Hamming distance are withheld and open a case.
    ``guild_id`` None: blocked in every guild (the operator's). ``phash`` is 16 hex digits (64 bits)."""

    __tablename__ = "image_blocks"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    guild_id: Mapped[int | None] = mapped_column(BigInteger)
    phash: Mapped[str] = mapped_column(String(16))
    image_id: Mapped[int | None] = mapped_column(ForeignKey("images.id", ondelete="SET NULL"))
    case_id: Mapped[int | None] = mapped_column(ForeignKey("moderation_cases.id", ondelete="SET NULL"))
    moderator_id: Mapped[int] = mapped_column(BigInteger)
    reason: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    lifted_at: Mapped[datetime | None]
    lifted_by: Mapped[int | None] = mapped_column(BigInteger)

    __table_args__ = (Index("ix_image_blocks_guild_id_lifted_at", "guild_id", "lifted_at"),)
