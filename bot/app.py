"""The discord.py bot: ``create_bot`` builds it, ``main`` runs it.

``setup_hook`` (after login, before the gateway) opens the database, builds the service with the Discord
publisher, registers the persistent ``DynamicItem``s, loads the cogs, syncs the commands when SYNC_COMMANDS is
set (to each guild of DISCORD_GUILD_IDS, where they appear at once, else globally), and resumes queued and
interrupted jobs (results are posted as new channel messages when the original interaction expired). ``close``
stops the workers first, so no job is left half-recorded.
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

from bot.config import Settings
from bot.metrics import BotMetrics, start_metrics_server
from bot.outcome import from_discord
from bot.publish import DiscordPublisher
from bot.service import GenerationService
from bot.views import DYNAMIC_ITEMS
from bot.wiring import engine_for_settings, open_repository, service_from_settings
from engine.api import Engine
from engine.client import EngineUnavailable

log = logging.getLogger(__name__)

EXTENSIONS = ("bot.cogs.generate",)
OPTIONAL_EXTENSIONS = ("bot.cogs.moderation", "bot.cogs.admin", "bot.cogs.privacy")  # loaded where this build has them


class DalleBot(commands.AutoShardedBot):
    def __init__(self, settings: Settings, engine: Engine, *, repo: Any = None,
                 service_overrides: dict[str, Any] | None = None, progress_interval: float = 2.0,
                 shutdown_grace: float = 10.0, **kwargs: Any) -> None:
        intents = discord.Intents.default()
        intents.message_content = False
        kwargs.setdefault("chunk_guilds_at_startup", False)
        kwargs.setdefault("heartbeat_timeout", 150.0)
        if settings.shard_count is not None:  # else discord.py asks Discord (GET /gateway/bot) and runs them all
            kwargs.setdefault("shard_count", settings.shard_count)
            kwargs.setdefault("shard_ids", list(settings.shard_ids) if settings.shard_ids is not None else None)
        super().__init__(command_prefix=commands.when_mentioned, intents=intents, **kwargs)
        self.settings = settings
        self.engine = engine
        self.repo = repo
        self._owns_repo = repo is None
        self.service_overrides = service_overrides or {}
        self.progress_interval = progress_interval
        self.shutdown_grace = shutdown_grace
        self.service: GenerationService | None = None
        self.metrics = BotMetrics()
        self._metrics_runner: Any = None
        self._web_runner: Any = None
        self.resumed: list[int] = []
        self._close_task: asyncio.Future | None = None
        self.tree.on_error = self.on_app_command_error  # type: ignore[method-assign]

    async def setup_hook(self) -> None:
        if self.repo is None:
            self.repo = await open_repository(self.settings)
        overrides = {"owns": from_discord, **self.service_overrides}  # the terminal's jobs are not Discord's to post
        self.service = service_from_settings(self.settings, self.repo, self.engine,
                                             DiscordPublisher(self, self.progress_interval), **overrides)
        self.service.use_metrics(self.metrics)
        if self.settings.metrics_port is not None:
            self._metrics_runner = await start_metrics_server(self.metrics, self.repo, self.settings.metrics_host,
                                                              self.settings.metrics_port)
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
        if self.settings.sync_commands:
            await self.sync_commands()
        from bot.web.serve import start_in_bot  # WEB_PORT: the moderators' page, on this process's services

        self._web_runner = await start_in_bot(self)
        self.resumed = await self.service.start()
        if self.resumed:
            log.info("resumed %d queued generation(s)", len(self.resumed))

    async def sync_commands(self) -> None:
        """Register the slash commands with Discord: in each guild of DISCORD_GUILD_IDS (they appear there at once:
        for development), else globally (Discord may take a while to show them everywhere)."""
        if not self.settings.discord_guild_ids:
            await self.tree.sync()
            return
        for guild_id in self.settings.discord_guild_ids:
            guild = discord.Object(id=guild_id)
            self.tree.copy_global_to(guild=guild)
            await self.tree.sync(guild=guild)

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
        if self._metrics_runner is not None:
            await self._metrics_runner.cleanup()
        if self._web_runner is not None:
            await self._web_runner.cleanup()
        if self._owns_repo and self.repo is not None:
            await self.repo.close()


def create_bot(settings: Settings, engine: Engine, **kwargs: Any) -> DalleBot:
    """The bot, not yet started. Tests pass ``repo=``, ``guild_ready_timeout=`` and service overrides."""
    return DalleBot(settings, engine, **kwargs)


def main(settings: Settings) -> int:
    """Entry point used by ``python -m bot`` when DISCORD_TOKEN is set. Returns the exit status.

    SIGTERM and SIGINT close the bot gracefully: workers stop, running jobs get ``shutdown_grace`` seconds
    and are otherwise put back in the queue for the next start."""
    token = settings.discord_token
    if not token:
        print("error: DISCORD_TOKEN is not set", file=sys.stderr)
        return 2
    api_base = settings.discord_api_base
    gateway = settings.discord_gateway_url
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
                await bot.start(token)
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
