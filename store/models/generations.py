"""Generations (the job queue's rows) and their images with the exact image tokens the model sampled."""

from __future__ import annotations

import enum
from datetime import datetime
from typing import Any

import numpy as np
from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
    false,
)
from sqlalchemy.orm import Mapped, mapped_column, relationship

from store.models.base import Base, check_in, utcnow


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


TOKEN_DTYPE = np.dtype("<i2")  # image codes as little-endian int16: 2 bytes per token, VQGAN codes < 32768


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
    # taken down with 🗑 by its author (or a moderator): the rows wait only for the open cases on it to be decided
    deleted_at: Mapped[datetime | None]

    images: Mapped[list[Image]] = relationship(
        back_populates="generation",
        foreign_keys="Image.generation_id",
        order_by="Image.index",
        cascade="all, delete-orphan",
        passive_deletes=True,
    )

    __table_args__ = (
        check_in("status", Status, "status"),
        check_in("kind", GenerationKind, "kind"),
        CheckConstraint("n_images >= 1", name="n_images_positive"),
        CheckConstraint("attempts >= 0", name="attempts_nonnegative"),
        Index("ix_generations_status_queued_at", "status", "queued_at"),  # queue scan
        Index("ix_generations_user_id_status", "user_id", "status"),  # per-user queue / history
        Index("ix_generations_guild_id_status", "guild_id", "status"),  # per-guild queue
        {"sqlite_autoincrement": True},  # a deleted result's id is never handed to a new one (old buttons)
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
    phash: Mapped[str | None] = mapped_column(String(16))  # perceptual hash (16 hex digits), for the blocklist
    clip_score: Mapped[float | None] = mapped_column(Float)
    safety_scores: Mapped[dict[str, Any]] = mapped_column(default=dict)
    flagged: Mapped[bool] = mapped_column(Boolean, default=False)
    critical: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())  # a critical concept
    hidden: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    generation: Mapped[Generation] = relationship(back_populates="images", foreign_keys=[generation_id])

    __table_args__ = (UniqueConstraint("generation_id", "index"), {"sqlite_autoincrement": True})

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
