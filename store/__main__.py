"""``python -m store upgrade|downgrade|current``: Alembic on the bot's DATABASE_URL (env, .env or default)."""

from __future__ import annotations

import argparse
import os
import sys

from sqlalchemy.exc import SQLAlchemyError

from store.db import (
    DatabaseURLError,
    default_sqlite_url,
    downgrade,
    redact_url,
    schema_revisions,
    upgrade,
    url_secrets,
)


def database_url() -> str:
    """DATABASE_URL from the environment, else from ./.env, else the default SQLite file (as the bot does)."""
    url = os.environ.get("DATABASE_URL")
    if not url and os.path.exists(".env"):
        from dotenv import dotenv_values

        url = dotenv_values(".env").get("DATABASE_URL")
    return url or default_sqlite_url()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m store", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("upgrade", help="migrate to a revision (default: head)")
    up.add_argument("revision", nargs="?", default="head")
    down = sub.add_parser("downgrade", help="migrate down to a revision (default: one step, -1; 'base' = empty)")
    down.add_argument("revision", nargs="?", default="-1")
    sub.add_parser("current", help="print the database's revision and the code's head")
    parser.add_argument("--url", help="database URL (default: DATABASE_URL / .env / ./data/dalle.db)")
    args = parser.parse_args(argv)
    url = args.url or database_url()
    try:
        if args.command == "upgrade":
            upgrade(url, args.revision, configure_logging=True)
        elif args.command == "downgrade":
            downgrade(url, args.revision, configure_logging=True)
        current, heads = schema_revisions(url)
    except DatabaseURLError as exc:
        print(f"store: DATABASE_URL: {exc}", file=sys.stderr)
        return 2
    except (SQLAlchemyError, OSError) as exc:  # one line, the password and secret query values hidden
        reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
        for secret in url_secrets(url):
            reason = reason.replace(secret, "***")
        print(f"store: cannot open {redact_url(url)}: {reason}", file=sys.stderr)
        return 2
    state = "at head" if current == heads else "NOT at head"
    print(f"{redact_url(url)}: current={','.join(sorted(current)) or 'empty'} "
          f"head={','.join(sorted(heads))} ({state})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
