"""The queries the bot and the training loop run, as one async :class:`Repository`.

The repository is composed of one part per kind of data (``store/repo/``); callers use this class and import
the names below from here. See :mod:`store.repo.base` for the transaction rules every method follows and the
database clock, and :mod:`store.repo.generations` for the job queue and its leases.
"""

from __future__ import annotations

from store.repo.base import NotFound, RepositoryBase
from store.repo.blocklist import BlocklistRepository
from store.repo.case_upkeep import CaseUpkeepRepository
from store.repo.dataset import DatasetRepository, DatasetSource, JudgedImage
from store.repo.feedback import FeedbackRecord, FeedbackRepository
from store.repo.generations import (
    ALLOWED_TRANSITIONS,
    ActiveLimitReached,
    GenerationRepository,
    QueuedJob,
    StatusError,
    TakenOver,
)
from store.repo.guilds import GuildRepository, ListEdit
from store.repo.images import ImageRepository, NewImage
from store.repo.moderation import CaseClosed, ModerationRepository, UserRecord
from store.repo.privacy import Deletion, PrivacyRepository, UserData
from store.repo.registry import CheckpointRejected, ModelAudit, RegistryRepository
from store.repo.stats import StatsRepository
from store.repo.strikes import AppealTooSoon, Escalation, StrikeRepository, StrikeResult
from store.repo.web import DailyCounts, QueueRow, WebRepository

__all__ = [
    "ALLOWED_TRANSITIONS",
    "ActiveLimitReached",
    "AppealTooSoon",
    "CaseClosed",
    "CheckpointRejected",
    "DailyCounts",
    "DatasetSource",
    "Deletion",
    "Escalation",
    "FeedbackRecord",
    "JudgedImage",
    "ListEdit",
    "ModelAudit",
    "NewImage",
    "NotFound",
    "QueuedJob",
    "QueueRow",
    "Repository",
    "StatusError",
    "StrikeResult",
    "TakenOver",
    "UserData",
    "UserRecord",
]


class Repository(
    GenerationRepository,
    ImageRepository,
    FeedbackRepository,
    ModerationRepository,
    StrikeRepository,
    BlocklistRepository,
    CaseUpkeepRepository,
    GuildRepository,
    RegistryRepository,
    DatasetRepository,
    PrivacyRepository,
    StatsRepository,
    WebRepository,
    RepositoryBase,
):
    """Async data access for the bot and training; construct with a session factory or :meth:`from_url`.

    Timestamps and leases are on the database's clock once :meth:`sync_clock` has run (see
    :class:`store.repo.base.RepositoryBase`)."""
