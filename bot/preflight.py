"""Start-up checks that turn a doomed configuration into one clear line before any work is accepted.

Each returns ``None`` when fine or a one-line problem. They catch what validation of the values alone cannot:
an output folder the process cannot write (every generation would be computed, then lost), a Redis that does
not answer (the first ``/dalle`` would fail), and a second bot process on the same SQLite file (SQLite has no
way to tell a live process's running jobs from a crashed one's, so the second would take the first's over).
"""

from __future__ import annotations

import fcntl
import os
import tempfile
from pathlib import Path
from typing import IO, Any

_locks: list[IO[Any]] = []  # held for the life of the process


def check_output_dir(path: Path) -> str | None:
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-check-"):
            pass
    except OSError as exc:
        return f"OUTPUT_DIR: cannot write images to {path}: {exc.strerror or exc}"
    return None


def check_redis(url: str, timeout: float = 3.0) -> str | None:
    import redis

    try:
        client = redis.Redis.from_url(url, socket_connect_timeout=timeout, socket_timeout=timeout)
        try:
            client.ping()
        finally:
            client.close()
    except (redis.RedisError, OSError, ValueError) as exc:
        return f"REDIS_URL: Redis does not answer ({type(exc).__name__}); rate limits need it (value not shown)"
    return None


def lock_sqlite(database_url: str) -> str | None:
    """One bot process per SQLite file: an exclusive ``flock`` on ``<file>.lock``, released when the process ends."""
    from store.db import parse_url

    url = parse_url(database_url)
    if url.get_backend_name() != "sqlite" or not url.database or url.database == ":memory:":
        return None
    lock_path = Path(url.database).expanduser().resolve().with_name(Path(url.database).name + ".lock")
    try:
        lock_path.parent.mkdir(parents=True, exist_ok=True)
    except OSError:
        return None  # opening the database will report the real problem
    try:
        handle = open(lock_path, "a+")  # noqa: SIM115 - kept open on purpose: the lock lives as long as it
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        return (f"database error: another dalle-bot process is using {url.database} (one process per SQLite "
                "file; stop it, or use PostgreSQL to run several)")
    except OSError as exc:
        return f"database error: cannot lock {lock_path}: {exc.strerror or exc}"
    handle.seek(0)
    handle.truncate()
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    _locks.append(handle)
    return None
