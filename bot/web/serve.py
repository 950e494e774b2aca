"""Running the page: inside the bot process (WEB_PORT: the bot's own services, so its Discord front end edits the
posts) or on its own (``python -m bot web``: the same database; Discord edits through the bot's REST client,
logged in with DISCORD_TOKEN but never connected to the gateway)."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import discord
from aiohttp import web
from discord.ext import commands

from bot.cogs.moderation import DiscordReviewer
from bot.config import Settings
from bot.publish import DiscordPublisher
from bot.web.app import create_app, start_site
from bot.web.config import WebConfig, WebConfigError, load_web_config, web_env
from bot.web.oauth import DiscordDirectory
from bot.webaccess import SignInLinks, WebModeration
from bot.wiring import open_repository, service_from_settings

log = logging.getLogger(__name__)


class NoEngine:
    """The stand-alone page generates nothing: ``/dalle-admin model`` belongs to the bot."""

    async def info(self) -> Any:
        raise ValueError("the web page's own process runs no model: ask the bot (/dalle-admin model show)")

    async def close(self) -> None:
        return None


def build_app(service: Any, config: WebConfig, *, bot_token: str | None = None,
              api_base: str | None = None) -> web.Application:
    """The page over a ``GenerationService`` (its moderation, appeals, blocklist and admin parts); Discord sign-in
    when WEB_OAUTH_CLIENT_ID/SECRET are set. With ``bot_token`` every moderator's session has its roles read again
    from Discord (cached ``role_cache_s``), sign-in links' too: a demoted or departed moderator loses the page."""
    directory = None
    if config.oauth_client_id and config.oauth_client_secret and not bot_token:
        raise WebConfigError("Discord sign-in (WEB_OAUTH_CLIENT_ID) needs DISCORD_TOKEN: the bot's token reads "
                             "members' roles")
    if bot_token:
        directory = DiscordDirectory(client_id=config.oauth_client_id, client_secret=config.oauth_client_secret,
                                     bot_token=bot_token, api_base=api_base, cache_s=config.role_cache_s)
    else:
        log.warning("no DISCORD_TOKEN: moderators' sessions keep the roles their sign-in link was made with")
    return create_app(WebModeration(service), SignInLinks(service.repo), config, directory)


async def start_in_bot(bot: Any) -> web.AppRunner | None:
    """Called from the bot's setup: serve the page when WEB_PORT is set in the environment or ./.env (None
    otherwise). A bad setting or a port already taken is logged and the bot goes on without its page."""
    env = await asyncio.to_thread(web_env)
    if not env.get("WEB_PORT"):
        return None
    try:
        config = load_web_config(bot.settings.database_url, env=env)
        app = build_app(bot.service, config, bot_token=bot.settings.discord_token,
                        api_base=bot.settings.discord_api_base)
        return await start_site(app, config.host, config.port)
    except (WebConfigError, OSError) as exc:  # the bot goes on without its page
        log.error("the moderators' web page is not served: %s", exc)
        return None


class StandAlone:
    """The page's own process: repository, services, and (with DISCORD_TOKEN) a REST-only Discord client."""

    def __init__(self, settings: Settings, config: WebConfig, *, repo: Any = None) -> None:
        """``repo``: an open repository to use (tests); else one on DATABASE_URL, closed with the page."""
        self.settings = settings
        self.config = config
        self.repo: Any = repo
        self._owns_repo = repo is None
        self.discord: commands.Bot | None = None
        self.runner: web.AppRunner | None = None
        self.service: Any = None

    async def open(self) -> web.Application:
        if self.repo is None:
            self.repo = await open_repository(self.settings)
        publisher = None
        if self.settings.discord_token:
            if self.settings.discord_api_base:  # test-only: the loopback fake Discord
                discord.http.Route.BASE = str(self.settings.discord_api_base).rstrip("/")
            self.discord = commands.Bot(command_prefix=commands.when_mentioned, intents=discord.Intents.none())
            await self.discord.login(self.settings.discord_token)  # REST only: no gateway connection
            publisher = DiscordPublisher(self.discord)
        self.service = service_from_settings(self.settings, self.repo, NoEngine(), publisher)  # type: ignore[arg-type]
        if self.discord is not None:
            self.service.moderation.front_end = DiscordReviewer(self.discord, publisher)
        else:
            log.warning("no DISCORD_TOKEN: decisions are recorded but review posts and public messages are not "
                        "edited until the bot acts on them")
        return build_app(self.service, self.config, bot_token=self.settings.discord_token,
                         api_base=self.settings.discord_api_base)

    async def serve(self) -> None:
        self.runner = await start_site(await self.open(), self.config.host, self.config.port)

    async def close(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
        if self.discord is not None:
            await self.discord.close()
        if self._owns_repo and self.repo is not None:
            await self.repo.close()
