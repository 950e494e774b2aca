"""Discord OAuth2 sign-in (authorization-code flow, ``identify`` scope only) and members' rights read with the bot's
own token. The user's access token is used once, for ``users/@me``, and never kept. Rights are read again when a
session's cached copy is older than ``cache_s`` (every request checks), so a moderator who loses the role loses
the page within minutes."""

from __future__ import annotations

import asyncio
import secrets
import time
from typing import Any
from urllib.parse import urlencode

import aiohttp
import aiohttp_session
from aiohttp import web

from bot.webaccess import Rights

DISCORD_API = "https://discord.com/api/v10"
ADMINISTRATOR, MANAGE_GUILD, MANAGE_MESSAGES = 1 << 3, 1 << 5, 1 << 13
GUILDS_PAGE = 200  # Discord's most guilds per /users/@me/guilds page


Memberships = dict[int, tuple[tuple[int, ...], int]]  # guild → (role ids, guild-wide permission bits)


class DiscordUnavailable(RuntimeError):
    pass


class DiscordDirectory:
    """Who a Discord user is (OAuth2) and what they hold in the bot's guilds (the bot's token)."""

    def __init__(self, *, client_id: str | None, client_secret: str | None, bot_token: str, api_base: str | None = None,
                 cache_s: float = 300.0) -> None:
        self.client_id = client_id
        self.client_secret = client_secret
        self.bot_token = bot_token
        self.api_base = (api_base or DISCORD_API).rstrip("/")
        site = self.api_base.rsplit("/api", 1)[0]
        self.authorize_url = f"{site}/oauth2/authorize"
        self.cache_s = cache_s
        self._cache: dict[tuple[int, tuple[int, ...] | None], tuple[float, Memberships]] = {}
        self._inflight: dict[tuple[int, tuple[int, ...] | None], asyncio.Future[Memberships]] = {}
        self._roles: dict[int, tuple[float, dict[int, int]]] = {}
        self._http: aiohttp.ClientSession | None = None

    def http(self) -> aiohttp.ClientSession:
        if self._http is None or self._http.closed:
            self._http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=15))
        return self._http

    async def close(self) -> None:
        if self._http is not None:
            await self._http.close()

    def authorize(self, redirect_uri: str, state: str) -> str:
        query = urlencode({"client_id": self.client_id, "redirect_uri": redirect_uri, "response_type": "code",
                           "scope": "identify", "state": state, "prompt": "none"})
        return f"{self.authorize_url}?{query}"

    async def user_of_code(self, code: str, redirect_uri: str) -> int | None:
        """The Discord user id behind an authorization code (None: Discord refused the code); the access token
        is dropped here."""
        form = {"grant_type": "authorization_code", "code": code, "redirect_uri": redirect_uri,
                "client_id": self.client_id, "client_secret": self.client_secret}
        try:
            async with self.http().post(f"{self.api_base}/oauth2/token", data=form) as r:
                if r.status >= 400:
                    return None
                token = (await r.json())["access_token"]
            async with self.http().get(f"{self.api_base}/users/@me",
                                       headers={"Authorization": f"Bearer {token}"}) as r:
                if r.status >= 400:
                    return None
                return int((await r.json())["id"])
        except (aiohttp.ClientError, TimeoutError, KeyError, ValueError) as exc:
            raise DiscordUnavailable(f"Discord could not be asked who you are: {type(exc).__name__}") from None

    async def _bot_get(self, path: str) -> Any:
        async with self.http().get(f"{self.api_base}{path}", headers={"Authorization": f"Bot {self.bot_token}"}) as r:
            if r.status == 404:
                return None
            if r.status >= 400:
                raise DiscordUnavailable(f"Discord answered {r.status} to {path.split('/')[1]}")
            return await r.json()

    @property
    def oauth(self) -> bool:
        """Whether Discord sign-in is set up (else this only reads members' roles for sign-in links' sessions)."""
        return bool(self.client_id and self.client_secret)

    async def memberships(self, user_id: int, *, fresh: bool = False,
                          guild_ids: list[int] | None = None) -> Memberships:
        """guild id → (the member's role ids, their guild-wide permissions) in each of the bot's guilds they are
        in (``guild_ids``: only these, a session's); cached ``cache_s`` seconds unless ``fresh``. One lookup per
        user at a time: the requests that find the cache stale together (a page's thumbnails) share it, so the
        bot's token is not spent, and rate-limited, once per request."""
        key = (user_id, None if guild_ids is None else tuple(sorted(guild_ids)))
        hit = self._cache.get(key)
        if hit is not None and not fresh and time.monotonic() - hit[0] < self.cache_s:
            return hit[1]
        task = self._inflight.get(key)
        if task is None:
            task = asyncio.ensure_future(self._look_up(key, user_id, guild_ids))
            self._inflight[key] = task
            task.add_done_callback(lambda t: (self._inflight.pop(key, None), t.cancelled() or t.exception()))
        return await asyncio.shield(task)  # a reader who leaves does not cancel the others' lookup

    async def _look_up(self, key: Any, user_id: int, guild_ids: list[int] | None) -> Memberships:
        out: Memberships = {}
        try:
            for gid in await self._bot_guilds() if guild_ids is None else guild_ids:
                member = await self._bot_get(f"/guilds/{gid}/members/{user_id}")
                if member is None:
                    continue
                roles = tuple(int(r) for r in member.get("roles", []))
                perms = await self._role_permissions(gid)
                total = perms.get(gid, 0)  # @everyone's id is the guild's
                for role in roles:
                    total |= perms.get(role, 0)
                out[gid] = ((gid, *roles), total)
        except (aiohttp.ClientError, TimeoutError, KeyError, ValueError) as exc:
            raise DiscordUnavailable(f"Discord could not be asked for your roles: {type(exc).__name__}") from None
        self._cache[key] = (time.monotonic(), out)
        return out

    async def _bot_guilds(self) -> list[int]:
        """Every guild of the bot: Discord lists at most 200 a page."""
        ids: list[int] = []
        while True:
            page = await self._bot_get(f"/users/@me/guilds?limit={GUILDS_PAGE}&after={ids[-1] if ids else 0}") or []
            ids += [int(g["id"]) for g in page]
            if len(page) < GUILDS_PAGE:
                return ids

    async def _role_permissions(self, guild_id: int) -> dict[int, int]:
        """role id → permission bits in a guild, shared by every member's lookup for ``cache_s``."""
        hit = self._roles.get(guild_id)
        if hit is not None and time.monotonic() - hit[0] < self.cache_s:
            return hit[1]
        perms = {int(r["id"]): int(r.get("permissions", 0)) for r in await self._bot_get(
            f"/guilds/{guild_id}/roles") or []}
        self._roles[guild_id] = (time.monotonic(), perms)
        return perms


def grants_of(memberships: Memberships) -> dict[int, tuple[tuple[int, ...], bool, bool]]:
    """guild → (roles, Manage Messages, Manage Server) from Discord's permission bits (Administrator: both)."""
    return {g: (roles, bool(p & (MANAGE_MESSAGES | ADMINISTRATOR)), bool(p & (MANAGE_GUILD | ADMINISTRATOR)))
            for g, (roles, p) in memberships.items()}


async def start(request: web.Request, directory: DiscordDirectory, base_url: str) -> web.StreamResponse:
    session = await aiohttp_session.get_session(request)
    state = secrets.token_urlsafe(24)
    session["oauth_state"] = state
    raise web.HTTPSeeOther(directory.authorize(f"{base_url}/oauth/discord/callback", state))


async def finish(request: web.Request, directory: DiscordDirectory, base_url: str, web_mod: Any) -> Rights | str:
    """The callback: the user's rights, or why sign-in failed (a state that is not this browser's, a refusal)."""
    session = await aiohttp_session.get_session(request)
    expected = session.pop("oauth_state", None)
    state, code = request.query.get("state", ""), request.query.get("code", "")
    if not expected or not secrets.compare_digest(state, expected):
        return "This sign-in did not start in this browser (state mismatch). Start again."
    if not code:
        return "Discord did not sign you in (" + request.query.get("error", "no code") + ")."
    user_id = await directory.user_of_code(code, f"{base_url}/oauth/discord/callback")
    if user_id is None:
        return "Discord refused the sign-in code. Start again."
    rights = await web_mod.rights_from_discord(user_id, grants_of(await directory.memberships(user_id, fresh=True)))
    if not rights.grants:
        return "You moderate none of the bot's servers (moderator role, Manage Messages or Manage Server)."
    return rights
