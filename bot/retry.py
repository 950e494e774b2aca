"""Riding out a database that cannot be reached for a while (a PostgreSQL restart, a failover)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

from store.db import is_connection_error

log = logging.getLogger(__name__)

T = TypeVar("T")

UNREACHABLE_RETRY_S = 60.0  # how long a step waits for the database to come back before its error is raised


async def while_unreachable(what: str, step: Callable[[], Awaitable[T]], *, limit_s: float = UNREACHABLE_RETRY_S,
                            first_delay: float = 0.5, max_delay: float = 5.0) -> T:
    """``await step()``, tried again (backing off from ``first_delay`` to ``max_delay``) while it fails because the
    database cannot be reached, for up to ``limit_s``; any other error, or the last one, is raised. A step whose
    transactions were all refused is simply run again; one that got partly through fails again on what it already
    wrote (a unique row), which is raised like any other error."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + limit_s
    delay = first_delay
    while True:
        try:
            return await step()
        except Exception as exc:
            if not is_connection_error(exc) or loop.time() + delay > deadline:
                raise
            log.warning("%s: the database is unreachable (%s); trying again in %.1f s", what, type(exc).__name__,
                        delay)
        await asyncio.sleep(delay)
        delay = min(delay * 2, max_delay)
