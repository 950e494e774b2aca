"""One-time sign-in links to the moderators' web page (``bot.web``).

Only a hash of the link's secret is stored, so a database dump signs nobody in. A link is good for one use before
``expires_at``; ``used_at`` is set atomically by the one redemption that wins, and the row then stands for the
session the link opened: ``expires_at`` becomes the session's end, and signing out sets it to now (the page checks
it on every request, so a copied cookie ends too). Discord sign-ins get such a row as well. ``grants`` holds the
rights the link carries: ``{"guild id": {"roles": [...], "manage_messages": bool, "admin": bool}}``; ``operator``
links hold every guild.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import BigInteger, Boolean, Index, String
from sqlalchemy.orm import Mapped, mapped_column

from store.models.base import Base, utcnow


class WebSignIn(Base):
    __tablename__ = "web_sign_ins"

    token_hash: Mapped[str] = mapped_column(String(64), primary_key=True)  # sha256 hex of the link's secret
    user_id: Mapped[int] = mapped_column(BigInteger)
    operator: Mapped[bool] = mapped_column(Boolean, default=False)
    grants: Mapped[dict[str, Any]] = mapped_column(default=dict)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    expires_at: Mapped[datetime]
    used_at: Mapped[datetime | None]

    __table_args__ = (Index("ix_web_sign_ins_expires_at", "expires_at"),)
