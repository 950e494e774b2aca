"""``python -m bot``: load settings, make sure the database schema is current, start the front end.

Discord mode runs ``bot.app.main(settings)``; local (terminal) mode runs ``bot.terminal.main(settings)``;
``python -m bot web [link]`` runs the moderators' web page (``bot.web.cli``) on the same database. A bad
setting, a database that needs migrating or that the process cannot write is one line on stderr and exit code 2,
never a traceback.
"""

from __future__ import annotations

import asyncio
import importlib
import inspect
import logging
import sys

EXIT_CONFIG = 2
EXIT_NO_FRONT_END = 3
FRONT_ENDS = {"discord": "bot.app", "local": "bot.terminal"}


def _fail(message: str, code: int, secrets: list[str] | None = None) -> int:
    from bot.logsafe import redact

    print(redact(message, secrets or ()), file=sys.stderr)
    return code


def main(argv: list[str] | None = None) -> int:
    from bot.config import SettingsError, load_settings

    try:
        settings = load_settings()
    except SettingsError as exc:
        return _fail(f"config error: {exc}", EXIT_CONFIG)

    logging.basicConfig(
        level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    from bot.logsafe import install

    secrets = settings.secrets()
    install(secrets)  # every record, any library, any level: no token or password reaches a log
    logging.captureWarnings(True)  # warnings (e.g. SQLAlchemy's about a URL) go through the redacting handlers
    # aiosqlite logs every statement WITH its bound values at DEBUG (prompts, interaction tokens): never shown
    logging.getLogger("aiosqlite").setLevel(max(logging.INFO, logging.getLogger().level))
    logging.getLogger("alembic.runtime.plugins").setLevel(logging.WARNING)
    # JAX logs backend probing (e.g. "Unable to initialize backend 'tpu'") at INFO: noise for bot users
    logging.getLogger("jax").setLevel(max(logging.WARNING, logging.getLogger().level))
    log = logging.getLogger("bot")
    log.info("starting in %s mode with %r", settings.mode, settings)

    from bot.preflight import check_output_dir, check_redis, lock_sqlite

    argv = sys.argv[1:] if argv is None else argv
    web_page = argv[:1] == ["web"]  # the page runs no jobs: it shares a SQLite file with the bot
    problem = None if web_page else lock_sqlite(settings.database_url)  # first: a second bot must not even migrate
    if problem:
        return _fail(problem, EXIT_CONFIG, secrets)

    from store.db import DatabaseUnavailable, MigrationRequired, check_writable, ensure_migrated

    try:
        if ensure_migrated(settings.database_url, settings.auto_migrate):
            log.info("database migrated to the latest schema")
        check_writable(settings.database_url)  # readable but not writable: refuse now, not at every request
    except (MigrationRequired, DatabaseUnavailable) as exc:
        return _fail(f"database error: {exc}", EXIT_CONFIG, secrets)

    if web_page:
        from bot.web.cli import main as web_main

        return web_main(settings, argv[1:])

    problem = check_output_dir(settings.output_dir) or (check_redis(settings.redis_url) if settings.redis_url else None)
    if problem:
        return _fail(f"config error: {problem}", EXIT_CONFIG, secrets)

    module_name = FRONT_ENDS[settings.mode]
    try:
        front_end = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name != module_name:
            raise  # the front end exists but one of ITS imports is missing: show the real error
        message = f"dalle-bot: the {settings.mode} front end ({module_name}) is not available in this build"
        return _fail(message, EXIT_NO_FRONT_END)
    try:
        result = front_end.main(settings)
        if inspect.isawaitable(result):
            result = asyncio.run(result)
    except KeyboardInterrupt:
        return 130
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
