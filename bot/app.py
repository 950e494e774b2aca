"""The discord.py bot: ``create_bot`` builds it, ``main`` runs it.

``setup_hook`` (after login, before the gateway) opens the database, builds the service with the Discord
publisher, registers the persistent ``DynamicItem``s, loads the cogs, syncs commands only when
SYNC_COMMANDS is set, and resumes queued and interrupted jobs (results are posted as new channel messages
when the original interaction expired). ``close`` stops the workers first, so no job is left half-recorded.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys
from typing import Any

import aiohttp
import discord
from discord import app_commands
from discord.ext import commands

from bot.service import (
    EngineUnavailable,
    GenerationService,
    _setting,
    engine_for_settings,
    from_discord,
    open_repository,
)
from bot.service import service_from_settings as _service_from_settings
from bot.views import DYNAMIC_ITEMS
from engine.api import Engine
from store.repository import Repository

log = logging.getLogger(__name__)

EXTENSIONS = ("bot.cogs.generate",)
OPTIONAL_EXTENSIONS = ("bot.cogs.moderation", "bot.cogs.admin")  # written by other helpers; loaded if present


class DalleBot(commands.AutoShardedBot):
    def __init__(self, settings: Any, engine: Engine, *, repo: Repository | None = None,
                 service_overrides: dict[str, Any] | None = None, progress_interval: float = 2.0,
                 shutdown_grace: float = 10.0, **kwargs: Any) -> None:
        intents = discord.Intents.default()
        intents.message_content = False
        kwargs.setdefault("chunk_guilds_at_startup", False)
        kwargs.setdefault("heartbeat_timeout", 150.0)
        super().__init__(command_prefix=commands.when_mentioned, intents=intents, **kwargs)
        self.settings = settings
        self.engine = engine
        self.repo = repo
        self._owns_repo = repo is None
        self.service_overrides = service_overrides or {}
        self.progress_interval = progress_interval
        self.shutdown_grace = shutdown_grace
        self.service: GenerationService | None = None
        self.resumed: list[int] = []
        self._close_task: asyncio.Future | None = None
        self.tree.on_error = self.on_app_command_error  # type: ignore[method-assign]

    async def setup_hook(self) -> None:
        from bot.cogs.generate import DiscordPublisher

        if self.repo is None:
            self.repo = await open_repository(self.settings)
        self.service = _service_from_settings(self.settings, self.repo, self.engine,
                                              DiscordPublisher(self, self.progress_interval), **self.service_overrides)
        self.service.owns = from_discord  # jobs typed at the terminal front end cannot be posted to Discord
        self.add_dynamic_items(*DYNAMIC_ITEMS)
        for ext in EXTENSIONS:
            await self.load_extension(ext)
        for ext in OPTIONAL_EXTENSIONS:
            try:
                await self.load_extension(ext)
            except commands.ExtensionNotFound:
                pass
            except commands.ExtensionError:
                log.exception("extension %s failed to load", ext)
        if _setting(self.settings, "sync_commands", False):
            guild = _setting(self.settings, "sync_guild_id")
            if guild:
                g = discord.Object(id=int(guild))
                self.tree.copy_global_to(guild=g)
                await self.tree.sync(guild=g)
            else:
                await self.tree.sync()
        self.resumed = await self.service.start()
        if self.resumed:
            log.info("resumed %d queued generation(s)", len(self.resumed))

    async def on_app_command_error(self, interaction: discord.Interaction, error: app_commands.AppCommandError) -> None:
        """The user gets a short message; the log gets the details."""
        if isinstance(error, app_commands.CommandOnCooldown):
            text = f"Slow down: try again in {error.retry_after:.0f} s."
        elif isinstance(error, app_commands.CheckFailure):
            text = "You can't use this command here."
        elif isinstance(error, app_commands.TransformerError):
            text = f"That value isn't valid: {error.value!r}."
        else:
            log.error("command %s failed", getattr(interaction.command, "qualified_name", "?"),
                      exc_info=(type(error), error, error.__traceback__))
            text = "Something went wrong on our side. Please try again later."
        try:
            if interaction.response.is_done():
                await interaction.followup.send(text, ephemeral=True)
            else:
                await interaction.response.send_message(text, ephemeral=True)
        except discord.HTTPException:
            log.warning("could not tell the user about the error", exc_info=True)

    async def close(self) -> None:
        """Idempotent: a signal handler and ``async with`` may both call it; the work runs once, to the end."""
        if self._close_task is None:
            self._close_task = asyncio.ensure_future(self._close_once())
        await asyncio.shield(self._close_task)

    async def wait_closed(self) -> None:
        """Wait until a close that is under way (service stop, database dispose) has finished."""
        if self._close_task is not None:
            await asyncio.shield(self._close_task)

    async def _close_once(self) -> None:
        if self.service is not None:
            await self.service.stop(grace=self.shutdown_grace)
        await super().close()
        if self._owns_repo and self.repo is not None:
            await self.repo.close()


def create_bot(settings: Any, engine: Engine, **kwargs: Any) -> DalleBot:
    """The bot, not yet started. Tests pass ``repo=``, ``guild_ready_timeout=`` and service overrides."""
    return DalleBot(settings, engine, **kwargs)


def main(settings: Any) -> int:
    """Entry point used by ``python -m bot`` when DISCORD_TOKEN is set. Returns the exit status.

    SIGTERM and SIGINT close the bot gracefully: workers stop, running jobs get ``shutdown_grace`` seconds
    and are otherwise put back in the queue for the next start."""
    token = _setting(settings, "discord_token")
    if not token:
        print("error: DISCORD_TOKEN is not set", file=sys.stderr)
        return 2
    api_base = _setting(settings, "discord_api_base")
    gateway = _setting(settings, "discord_gateway_url")
    if api_base:  # test-only: a loopback fake Discord (config accepts loopback URLs only)
        discord.http.Route.BASE = str(api_base).rstrip("/")
    if gateway:
        import yarl

        discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY = yarl.URL(str(gateway))

    async def _run() -> None:
        engine = await asyncio.to_thread(engine_for_settings, settings)
        bot = create_bot(settings, engine)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, lambda: asyncio.ensure_future(bot.close()))
        try:
            async with bot:
                await bot.start(str(token))
        finally:
            await bot.wait_closed()  # ``async with`` returns once discord.py is closed, before our cleanup is
            await engine.close()

    try:
        asyncio.run(_run())
    except EngineUnavailable as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except discord.LoginFailure:
        print("error: Discord rejected DISCORD_TOKEN (login failed)", file=sys.stderr)
        return 2
    except (OSError, aiohttp.ClientError) as exc:  # DNS, refused, TLS...: before the bot ever connected
        print(f"error: cannot reach Discord: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        pass
    return 0
