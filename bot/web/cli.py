"""``python -m bot web [--host H] [--port P]`` serves the page; ``python -m bot web link`` prints a one-time
sign-in link for the operator (every guild, full rights) at WEB_BASE_URL."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys

from bot.config import Settings
from bot.web.config import WebConfigError, load_web_config
from bot.web.serve import StandAlone
from bot.webaccess import LINK_TTL, Rights, SignInLinks
from bot.wiring import open_repository

OPERATOR_ID = 1  # the terminal's user id: the operator is one person whatever the front end


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bot web", description="The moderators' web page")
    parser.add_argument("command", nargs="?", choices=["serve", "link"], default="serve")
    parser.add_argument("--host", default=None, help="address to listen on (default WEB_HOST or 127.0.0.1)")
    parser.add_argument("--port", type=int, default=None, help="port (default WEB_PORT or 8080)")
    return parser.parse_args(argv)


async def print_link(settings: Settings, base_url: str) -> None:
    repo = await open_repository(settings)
    try:
        token = await SignInLinks(repo).create(Rights(user_id=OPERATOR_ID, operator=True))
    finally:
        await repo.close()
    minutes = int(LINK_TTL.total_seconds() // 60)
    print(f"{base_url}/signin/{token}")
    print(f"(one use, valid {minutes} minutes: every server, full rights)", file=sys.stderr)


async def serve(settings: Settings, app: StandAlone) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    await app.serve()
    print(f"serving the moderators' page on http://{app.config.host}:{app.config.port}/ "
          f"(sign in: python -m bot web link)", file=sys.stderr, flush=True)
    try:
        await stop.wait()
    finally:
        await app.close()


def main(settings: Settings, argv: list[str]) -> int:
    args = parse(argv)
    if args.port is not None and not 1 <= args.port <= 65535:
        print("config error: --port must be 1-65535", file=sys.stderr)
        return 2
    try:
        config = load_web_config(settings.database_url, host=args.host, port=args.port)
    except WebConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    if args.command == "link":
        asyncio.run(print_link(settings, config.base_url))
        return 0
    try:
        asyncio.run(serve(settings, StandAlone(settings, config)))
    except KeyboardInterrupt:
        return 130
    except WebConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"error: cannot listen on {config.host}:{config.port}: {exc}", file=sys.stderr)
        return 2
    return 0
