"""What the front ends see of a request's life: the answer to a submit, progress, the finished result, and the
``Publisher`` a front end implements to show them.

Everything a front end needs to deliver a result later (after a restart, after the interaction token expired) is
on the ``Generation`` row that ``Outcome.generation`` carries.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol

from engine.api import GRID_IMAGES

MAX_IMAGES = GRID_IMAGES  # images per result: the default of a request and its upper bound (a 3x3 grid)
MAX_FEEDBACK_NOTE = 500  # characters of a report's note: the Discord form's limit, enforced by the service


def from_discord(gen: Any) -> bool:
    """A job that came through a Discord interaction (it carries the application id): only the Discord bot can
    deliver it; jobs without one were typed at the terminal front end."""
    return getattr(gen, "application_id", None) is not None


@dataclass(frozen=True)
class Delivery:
    """Where and how to post the result (Discord: interaction token and channel; terminal: nothing)."""

    channel_id: int | None = None
    application_id: int | None = None
    interaction_token: str | None = None
    token_expires_at: datetime | None = None
    upload_limit: int | None = None  # bytes of attachments per message (Discord's attachment_size_limit)


@dataclass(frozen=True)
class Admission:
    """The answer to a submit: either a queued generation with its position, or a refusal with a reason."""

    ok: bool
    generation_id: int | None = None
    position: int | None = None
    seed: int | None = None
    category: str | None = None  # filter category, "rate:<scope>", "queue", "banned", "invalid", "private"
    message: str = ""
    retry_after: float | None = None


@dataclass
class StoredImage:
    id: int
    index: int
    rank: int
    path: Path
    sha256: str
    clip_score: float
    flagged: bool
    hidden: bool  # shown behind a spoiler
    withheld: bool  # not posted at all (guild flagged_mode = withhold, or removed)
    png: bytes = field(repr=False, default=b"")
    removed: bool = False  # taken out by a moderator (withheld too)


def is_withheld(flagged: bool, hidden: bool, withhold_flagged: bool, critical: bool = False) -> bool:
    """Whether a stored image stays out of its public message: a hidden image the safety check flagged where the
    guild withholds flagged images, or flagged for a critical concept (whatever the guild's mode), and any hidden
    image it did not flag (withheld as a blocked hash's near-duplicate). Approved images are no longer hidden;
    removed ones are withheld by the caller."""
    return hidden and (withhold_flagged or not flagged or critical)


@dataclass
class Outcome:
    """A finished generation, ready to publish."""

    generation: Any  # store.models.Generation
    images: list[StoredImage]  # best CLIP score first
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass(frozen=True)
class ProgressUpdate:
    generation_id: int
    state: str  # queued / running
    position: int | None = None
    tokens_done: int = 0
    tokens_total: int = 0

    @property
    def text(self) -> str:
        if self.state == "queued":
            return f"Queued, position {self.position}." if self.position else "Queued."
        if self.tokens_total:
            return f"Generating… {100 * self.tokens_done // self.tokens_total}%"
        return "Generating…"


class Publisher(Protocol):
    """A front end's side of the lifecycle; every method must tolerate being called after a restart."""

    async def progress(self, generation: Any, update: ProgressUpdate) -> None: ...

    async def publish(self, outcome: Outcome) -> int | None:
        """Post the result (or the failure); return the message id if there is one."""


@dataclass(frozen=True)
class FeedbackResult:
    ok: bool
    message: str
    case_id: int | None = None
