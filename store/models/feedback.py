"""Votes and reports on images."""

from __future__ import annotations

import enum
from datetime import datetime

from sqlalchemy import (
    BigInteger,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    text,
)
from sqlalchemy.orm import Mapped, mapped_column

from store.models.base import Base, check_in, utcnow


class FeedbackKind(enum.StrEnum):
    UP = "up"
    DOWN = "down"
    REPORT = "report"


class FeedbackReason(enum.StrEnum):
    NSFW = "nsfw"
    BIAS = "bias"
    QUALITY = "quality"
    OTHER = "other"


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
        check_in("kind", FeedbackKind, "kind"),
        check_in("reason", FeedbackReason, "reason", nullable=True),
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
