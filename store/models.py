"""SQLAlchemy 2.0 typed ORM models: the bot's durable state and the training loop's feedback source.

Portability rules (SQLite is the embedded default, PostgreSQL the production database):
- Discord snowflakes are ``BigInteger``; internal ids are ``Integer`` autoincrement (SQLite rowids).
- enum-like columns are short strings guarded by named CHECK constraints; the allowed values live in the
  ``StrEnum`` classes below so code and schema agree (members compare equal to the stored strings).
- every timestamp is a timezone-aware UTC ``datetime`` in Python (``UTCDateTime`` adds the zone back on
  SQLite, which stores naive text).
- one naming convention for constraints and indexes so Alembic batch migrations can find them by name.
"""

from __future__ import annotations

import enum
from datetime import UTC, datetime
from typing import Any

import numpy as np
from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    CheckConstraint,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship
from sqlalchemy.types import TypeDecorator

NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

TOKEN_DTYPE = np.dtype("<i2")  # image codes as little-endian int16: 2 bytes per token, VQGAN codes < 32768


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """``DateTime(timezone=True)`` that always hands back aware UTC datetimes, on SQLite too.

    Naive datetimes are rejected on the way in: silently guessing a zone is how queues get reordered.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None or value.utcoffset() is None:
            raise ValueError(f"naive datetime {value!r}: store timezone-aware datetimes (datetime.now(UTC))")
        value = value.astimezone(UTC)
        if dialect.name == "sqlite":
            return value.replace(tzinfo=None)  # stored as UTC text; zone restored on load
        return value

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {
        datetime: UTCDateTime(),
        dict[str, Any]: JSON(),
        list[Any]: JSON(),
        list[str]: JSON(),
        bytes: LargeBinary(),
    }


def _check_in(column: str, values: type[enum.StrEnum], name: str, nullable: bool = False) -> CheckConstraint:
    allowed = ", ".join(f"'{v.value}'" for v in values)
    expr = f"{column} IN ({allowed})"
    if nullable:
        expr = f"{column} IS NULL OR {expr}"
    return CheckConstraint(expr, name=name)


# --- enum-like values ---------------------------------------------------------------------------------------


class GenerationKind(enum.StrEnum):
    NEW = "new"
    REROLL = "reroll"
    VARIATION = "variation"


class Status(enum.StrEnum):
    """Life cycle of a generation job or a training run."""

    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"


FINISHED_STATUSES = frozenset({Status.DONE, Status.FAILED, Status.CANCELLED})


class FeedbackKind(enum.StrEnum):
    UP = "up"
    DOWN = "down"
    REPORT = "report"


class FeedbackReason(enum.StrEnum):
    NSFW = "nsfw"
    BIAS = "bias"
    QUALITY = "quality"
    OTHER = "other"


class CaseSource(enum.StrEnum):
    AUTO = "auto"
    REPORT = "report"


class CaseStatus(enum.StrEnum):
    OPEN = "open"
    APPROVED = "approved"
    REMOVED = "removed"


class ModAction(enum.StrEnum):
    APPROVE = "approve"
    REMOVE = "remove"
    BAN = "ban"
    UNBAN = "unban"


class FlaggedMode(enum.StrEnum):
    SPOILER = "spoiler"
    WITHHOLD = "withhold"


class CheckpointStatus(enum.StrEnum):
    CANDIDATE = "candidate"
    ACTIVE = "active"
    RETIRED = "retired"


# --- tables -------------------------------------------------------------------------------------------------


class Generation(Base):
    """One `/dalle` request (or reroll / variation): a durable queue entry before it is acknowledged."""

    __tablename__ = "generations"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    # who and where
    user_id: Mapped[int] = mapped_column(BigInteger)
    guild_id: Mapped[int | None] = mapped_column(BigInteger)
    channel_id: Mapped[int | None] = mapped_column(BigInteger)
    # what
    prompt: Mapped[str] = mapped_column(Text)
    normalized_prompt: Mapped[str] = mapped_column(Text)
    n_images: Mapped[int] = mapped_column(Integer, default=9)
    seed: Mapped[int] = mapped_column(BigInteger, default=0)
    params: Mapped[dict[str, Any]] = mapped_column(default=dict)
    kind: Mapped[str] = mapped_column(String(16), default=GenerationKind.NEW.value)
    parent_generation_id: Mapped[int | None] = mapped_column(ForeignKey("generations.id", ondelete="SET NULL"))
    parent_image_id: Mapped[int | None] = mapped_column(
        ForeignKey("images.id", ondelete="SET NULL", use_alter=True)
    )
    checkpoint_id: Mapped[str | None] = mapped_column(String(128))  # which model made it (registry id or name)
    attention: Mapped[str | None] = mapped_column(String(16))  # the engine's decode-attention backend
    # life cycle
    status: Mapped[str] = mapped_column(String(16), default=Status.QUEUED.value)
    private: Mapped[bool] = mapped_column(Boolean, default=False)
    queued_at: Mapped[datetime] = mapped_column(default=utcnow)
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]
    error: Mapped[str | None] = mapped_column(Text)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    # while running: the bot process working on it, and until when it vouches for it (renewed as it works);
    # a running job whose lease ran out was left by a dead process and goes back to the queue
    owner: Mapped[str | None] = mapped_column(String(96))
    lease_until: Mapped[datetime | None]
    # delivery: enough to post the result later, after a restart
    application_id: Mapped[int | None] = mapped_column(BigInteger)
    interaction_token: Mapped[str | None] = mapped_column(Text)  # secret-ish: never log it
    token_expires_at: Mapped[datetime | None]
    upload_limit: Mapped[int | None] = mapped_column(BigInteger)  # bytes per message, from the interaction
    ack_message_id: Mapped[int | None] = mapped_column(BigInteger)
    result_message_id: Mapped[int | None] = mapped_column(BigInteger)
    delivered_at: Mapped[datetime | None]

    images: Mapped[list[Image]] = relationship(
        back_populates="generation",
        foreign_keys="Image.generation_id",
        order_by="Image.index",
        cascade="all, delete-orphan",
        passive_deletes=True,
    )

    __table_args__ = (
        _check_in("status", Status, "status"),
        _check_in("kind", GenerationKind, "kind"),
        CheckConstraint("n_images >= 1", name="n_images_positive"),
        CheckConstraint("attempts >= 0", name="attempts_nonnegative"),
        Index("ix_generations_status_queued_at", "status", "queued_at"),  # queue scan
        Index("ix_generations_user_id_status", "user_id", "status"),  # per-user queue / history
        Index("ix_generations_guild_id_status", "guild_id", "status"),  # per-guild queue
    )

    def __repr__(self) -> str:  # no prompt, no token: reprs end up in logs
        return f"Generation(id={self.id}, user_id={self.user_id}, status={self.status!r}, kind={self.kind!r})"


class Image(Base):
    """One candidate image of a generation, with the exact image tokens the model sampled."""

    __tablename__ = "images"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    generation_id: Mapped[int] = mapped_column(ForeignKey("generations.id", ondelete="CASCADE"))
    index: Mapped[int] = mapped_column(Integer)  # candidate index: the (seed, index) random stream
    rank: Mapped[int | None] = mapped_column(Integer)  # 0 = best CLIP score
    token_bytes: Mapped[bytes | None] = mapped_column("tokens", LargeBinary)
    file_path: Mapped[str | None] = mapped_column(Text)
    sha256: Mapped[str | None] = mapped_column(String(64))
    clip_score: Mapped[float | None] = mapped_column(Float)
    safety_scores: Mapped[dict[str, Any]] = mapped_column(default=dict)
    flagged: Mapped[bool] = mapped_column(Boolean, default=False)
    hidden: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    generation: Mapped[Generation] = relationship(back_populates="images", foreign_keys=[generation_id])

    __table_args__ = (UniqueConstraint("generation_id", "index"),)

    @property
    def tokens(self) -> np.ndarray | None:
        """Image tokens as a 1-D ``int16`` array (a fresh copy), or None if none were stored."""
        if self.token_bytes is None:
            return None
        return np.frombuffer(self.token_bytes, dtype=TOKEN_DTYPE).astype(np.int16)

    @tokens.setter
    def tokens(self, value: np.ndarray | list[int] | None) -> None:
        self.token_bytes = encode_tokens(value)

    def __repr__(self) -> str:
        return f"Image(id={self.id}, generation_id={self.generation_id}, index={self.index}, rank={self.rank})"


def encode_tokens(value: np.ndarray | list[int] | None) -> bytes | None:
    """Pack image tokens (any int array, flattened) as little-endian int16; refuse values that don't fit."""
    if value is None:
        return None
    arr = np.asarray(value)
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"image tokens must be integers, got dtype {arr.dtype}")
    arr = arr.reshape(-1)
    if arr.size and (int(arr.min()) < 0 or int(arr.max()) > np.iinfo(np.int16).max):
        raise ValueError(f"image tokens must be in [0, 32767], got [{int(arr.min())}, {int(arr.max())}]")
    return arr.astype(TOKEN_DTYPE).tobytes()


def decode_tokens(blob: bytes | None) -> np.ndarray | None:
    if blob is None:
        return None
    return np.frombuffer(blob, dtype=TOKEN_DTYPE).astype(np.int16)


class Feedback(Base):
    """A 👍 / 👎 vote (one per user per image, changeable) or a report (one per user per image)."""

    __tablename__ = "feedback"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    image_id: Mapped[int] = mapped_column(ForeignKey("images.id", ondelete="CASCADE"))
    user_id: Mapped[int] = mapped_column(BigInteger)
    kind: Mapped[str] = mapped_column(String(16))
    reason: Mapped[str | None] = mapped_column(String(16))
    note: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    __table_args__ = (
        _check_in("kind", FeedbackKind, "kind"),
        _check_in("reason", FeedbackReason, "reason", nullable=True),
        Index("ix_feedback_image_id_kind", "image_id", "kind"),
        Index(
            "uq_feedback_vote",
            "image_id",
            "user_id",
            unique=True,
            sqlite_where=text("kind IN ('up', 'down')"),
            postgresql_where=text("kind IN ('up', 'down')"),
        ),
        Index(
            "uq_feedback_report",
            "image_id",
            "user_id",
            unique=True,
            sqlite_where=text("kind = 'report'"),
            postgresql_where=text("kind = 'report'"),
        ),
    )


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
        _check_in("source", CaseSource, "source"),
        _check_in("status", CaseStatus, "status"),
        Index("ix_moderation_cases_status_opened_at", "status", "opened_at"),  # open cases, oldest first
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
    action: Mapped[str] = mapped_column(String(16))
    target_user_id: Mapped[int | None] = mapped_column(BigInteger)
    reason: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    case: Mapped[ModerationCase | None] = relationship(back_populates="actions")

    __table_args__ = (
        _check_in("action", ModAction, "action"),
        Index("ix_moderation_actions_case_id", "case_id"),
        Index("ix_moderation_actions_target_user_id", "target_user_id"),
    )


class GuildSettings(Base):
    """Per-guild overrides; NULL means "use the global setting"."""

    __tablename__ = "guild_settings"

    guild_id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    flagged_mode: Mapped[str | None] = mapped_column(String(16))
    review_channel_id: Mapped[int | None] = mapped_column(BigInteger)
    rate_limit_user: Mapped[str | None] = mapped_column(String(64))
    rate_limit_guild: Mapped[str | None] = mapped_column(String(64))
    daily_quota: Mapped[int | None] = mapped_column(Integer)
    max_queue_per_user: Mapped[int | None] = mapped_column(Integer)
    block_list: Mapped[list[str]] = mapped_column(default=list)
    allow_list: Mapped[list[str]] = mapped_column(default=list)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)

    __table_args__ = (
        _check_in("flagged_mode", FlaggedMode, "flagged_mode", nullable=True),
        CheckConstraint("daily_quota IS NULL OR daily_quota >= 0", name="daily_quota_nonnegative"),
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


class Checkpoint(Base):
    """Model checkpoint registry; at most one row is ``active`` (the one the engine should serve)."""

    __tablename__ = "checkpoints"

    id: Mapped[str] = mapped_column(String(128), primary_key=True)
    path: Mapped[str] = mapped_column(Text)
    parent_id: Mapped[str | None] = mapped_column(ForeignKey("checkpoints.id", ondelete="SET NULL"))
    metrics: Mapped[dict[str, Any]] = mapped_column(default=dict)
    status: Mapped[str] = mapped_column(String(16), default=CheckpointStatus.CANDIDATE.value)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    __table_args__ = (
        _check_in("status", CheckpointStatus, "status"),
        Index(
            "uq_checkpoints_one_active",
            "status",
            unique=True,
            sqlite_where=text("status = 'active'"),
            postgresql_where=text("status = 'active'"),
        ),
    )


class TrainingRun(Base):
    """One training / fine-tuning run: what went in, what came out, where the log is."""

    __tablename__ = "training_runs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    kind: Mapped[str] = mapped_column(String(32))  # e.g. vqgan, dallebart, clip, feedback
    config: Mapped[dict[str, Any]] = mapped_column(default=dict)
    status: Mapped[str] = mapped_column(String(16), default=Status.QUEUED.value)
    input_checkpoint_id: Mapped[str | None] = mapped_column(ForeignKey("checkpoints.id", ondelete="SET NULL"))
    output_checkpoint_id: Mapped[str | None] = mapped_column(ForeignKey("checkpoints.id", ondelete="SET NULL"))
    metrics: Mapped[dict[str, Any]] = mapped_column(default=dict)
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]
    log_path: Mapped[str | None] = mapped_column(Text)

    __table_args__ = (_check_in("status", Status, "status"),)
