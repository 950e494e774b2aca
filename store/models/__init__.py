"""SQLAlchemy 2.0 typed ORM models: the bot's durable state and the training loop's feedback source.

One module per kind of data (``base``: the declarative base, UTC timestamps, naming and CHECK helpers ·
``generations``: generations and images · ``feedback`` · ``moderation``: refusals, cases, actions, user state,
guild bans · ``guilds``: guild settings · ``registry``: checkpoints and training runs). Every name is re-exported
here, so ``from store.models import X`` is the way to import them; see :mod:`store.models.base` for the
portability rules.
"""

from __future__ import annotations

from store.models.base import NAMING_CONVENTION, Base, UTCDateTime, check_in, utcnow
from store.models.feedback import Feedback, FeedbackKind, FeedbackReason
from store.models.generations import (
    FINISHED_STATUSES,
    TOKEN_DTYPE,
    Generation,
    GenerationKind,
    Image,
    Status,
    decode_tokens,
    encode_tokens,
)
from store.models.guilds import FlaggedMode, GuildSettings, NotifyMode
from store.models.moderation import (
    OPERATOR_MODERATOR,
    SYSTEM_MODERATOR,
    BanKind,
    CaseSource,
    CaseStatus,
    GuildBan,
    ImageBlock,
    ModAction,
    ModerationAction,
    ModerationCase,
    Refusal,
    Strike,
    StrikeSource,
    UserState,
)
from store.models.registry import Checkpoint, CheckpointStatus, TrainingRun
from store.models.web import WebSignIn

__all__ = [
    "FINISHED_STATUSES",
    "NAMING_CONVENTION",
    "OPERATOR_MODERATOR",
    "SYSTEM_MODERATOR",
    "TOKEN_DTYPE",
    "BanKind",
    "Base",
    "CaseSource",
    "CaseStatus",
    "Checkpoint",
    "CheckpointStatus",
    "Feedback",
    "FeedbackKind",
    "FeedbackReason",
    "FlaggedMode",
    "Generation",
    "GenerationKind",
    "GuildBan",
    "GuildSettings",
    "Image",
    "ImageBlock",
    "ModAction",
    "ModerationAction",
    "ModerationCase",
    "NotifyMode",
    "Refusal",
    "Status",
    "Strike",
    "StrikeSource",
    "TrainingRun",
    "UTCDateTime",
    "UserState",
    "WebSignIn",
    "check_in",
    "decode_tokens",
    "encode_tokens",
    "utcnow",
]
