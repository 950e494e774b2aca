"""Typed settings → the repository, the engine client and the generation service, for every front end."""

from __future__ import annotations

import asyncio
import importlib
import os
from typing import Any

from bot.config import Settings
from bot.outcome import Publisher
from bot.ratelimit import LimitPolicy, RateLimiter
from bot.scheduler import Scheduler
from bot.service import GenerationService
from engine.api import Engine
from engine.client import EngineOptions, EngineUnavailable, connect
from store.db import ensure_migrated
from store.repository import Repository

ENGINE_FACTORY_VARIABLE = "DALLE_ENGINE_FACTORY"


def engine_options(settings: Settings, *, warmup: bool | None = None) -> EngineOptions:
    """``warmup`` None: ENGINE_WARMUP."""
    return EngineOptions(
        mode=settings.engine_mode, urls=settings.engine_urls, token=settings.engine_token,
        checkpoint_dir=str(settings.checkpoint_dir), dtype=settings.engine_dtype,
        warmup=settings.engine_warmup if warmup is None else warmup,
        native_attention=settings.engine_native_attention, model_nice=settings.engine_model_nice,
        xla_cache_dir=settings.xla_cache_dir,
    )


def engine_from_settings(settings: Settings, *, warmup: bool | None = None) -> Engine:
    """The engine the settings ask for: engine services over HTTP (ENGINE_MODE=http, ENGINE_URLS) or the model
    in-process from CHECKPOINT_DIR (``engine.client.connect``). Raises ``EngineUnavailable`` (one line)."""
    return connect(engine_options(settings, warmup=warmup))


def engine_for_settings(settings: Settings, *, warmup: bool | None = None) -> Engine:
    """DALLE_ENGINE_FACTORY = ``module:callable`` (development and tests: e.g. a fake engine), else the
    configured engine."""
    spec = os.environ.get(ENGINE_FACTORY_VARIABLE)
    if spec:
        module, _, attr = spec.partition(":")
        try:
            return getattr(importlib.import_module(module), attr or "create_engine")()
        except (ImportError, AttributeError) as exc:
            raise EngineUnavailable(f"engine factory {spec!r} could not be loaded: {exc}") from exc
    return engine_from_settings(settings, warmup=warmup)


async def open_repository(settings: Settings) -> Repository:
    """Repository on DATABASE_URL, migrated when AUTO_MIGRATE allows."""
    await asyncio.to_thread(ensure_migrated, settings.database_url, settings.auto_migrate)
    return Repository.from_url(settings.database_url)


def service_from_settings(settings: Settings, repo: Repository, engine: Engine, publisher: Publisher | None,
                          **overrides: Any) -> GenerationService:
    """The generation service with the settings' limits, queue caps and engine concurrency; ``overrides`` are
    ``GenerationService`` keyword arguments (``owns``, and tests' knobs)."""
    limiter = RateLimiter(
        storage_uri=settings.redis_url,
        policy=LimitPolicy(user=settings.rate_limit_user, guild=settings.rate_limit_guild,
                           daily_quota=settings.daily_quota),
    )
    scheduler = Scheduler(per_user_cap=settings.max_queue_per_user, total_cap=settings.max_queue_total)
    kwargs: dict[str, Any] = dict(
        output_dir=settings.output_dir, limiter=limiter, scheduler=scheduler,
        concurrency=settings.engine_concurrency, engine_stall_timeout=float(settings.engine_stall_timeout),
        default_images=settings.default_images, flagged_mode=settings.flagged_mode,
        review_channel_id=settings.review_channel_id, lease_s=float(settings.job_lease_seconds),
        reping_hours=settings.case_reping_hours, upkeep_interval_s=float(settings.case_upkeep_seconds),
    )
    kwargs.update(overrides)
    return GenerationService(repo, engine, publisher, **kwargs)
