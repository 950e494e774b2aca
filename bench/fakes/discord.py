"""A strict loopback fake of Discord's REST API and gateway for end-to-end tests with the real discord.py client.

Design from shared/reference/discord-testing.md §3: aiohttp on 127.0.0.1 (ephemeral port); tests point
``discord.http.Route.BASE`` and ``DiscordWebSocket.DEFAULT_GATEWAY`` at it. Strict on purpose:

- every REST call is recorded (method, path, query, JSON or ``payload_json``, uploaded files);
- unknown routes answer 404 and are listed in ``unknown`` (tests assert it stays empty);
- the first interaction response must arrive within ``ack_deadline`` seconds of dispatch (else 404/10062),
  a second one is 400/40060, webhook calls with a token older than ``token_ttl`` are 401/50027;
- uploads above the interaction's ``attachment_size_limit`` are 413/40005, content over 2000 chars 400/50035;
- JSON responses carry exactly ``Content-Type: application/json`` (discord.py decodes nothing else);
- ``storm(method, path, answers)`` makes the next matching calls fail as Discord does under load: 429 with
  ``retry_after`` (body and ``Retry-After``) or a 5xx, each used once, in order, before the call is handled.

The gateway speaks JSON TEXT frames: HELLO → heartbeats/ACK → IDENTIFY → READY (+``shard``) + GUILD_CREATE,
RESUME → RESUMED, and ``dispatch()`` pushes events such as INTERACTION_CREATE. A socket that identified with a
``shard`` gets only its shard's guilds and their events, as Discord does.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import re
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl

from aiohttp import WSMsgType, web

DISCORD_EPOCH_MS = 1420070400000
APP_ID = 1000
BOT_ID = 1000
MOD_ROLE_ID = 2500  # a role every fake guild has ("moderators"); members hold it when a test says so
MEMBER_PERMISSIONS = "2248473465835073"  # an ordinary member's: no Manage Messages (1 << 13)


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(status=status, body=json.dumps(data).encode(), headers={"Content-Type": "application/json"})


def _error(status: int, code: int, message: str) -> web.Response:
    return _json({"code": code, "message": message}, status)


@dataclass
class Call:
    method: str
    path: str
    query: dict[str, str]
    json: Any
    files: dict[str, bytes] = field(default_factory=dict)
    status: int = 200
    at: float = field(default_factory=time.monotonic)


@dataclass
class InteractionRecord:
    id: int
    token: str
    type: int
    dispatched_at: float
    created_ms: int
    acked: bool = False
    ack_type: int | None = None
    original_message_id: int | None = None
    channel_id: int | None = None
    ephemeral: bool = False


class FakeDiscord:
    def __init__(self, *, ack_deadline: float = 3.0, token_ttl: float = 900.0, attachment_limit: int = 10 * 1024 * 1024,
                 heartbeat_ms: int = 41250, guilds: tuple[int, ...] = (2000,), channel_id: int = 3000) -> None:
        self.ack_deadline = ack_deadline
        self.token_ttl = token_ttl
        self.attachment_limit = attachment_limit
        self.heartbeat_ms = heartbeat_ms
        self.guild_ids = guilds
        self.channel_id = channel_id
        self.forbidden_channels: set[int] = set()  # the bot lacks Send Messages there: posts get 403/50013
        self.automod_rules: dict[int, list[dict]] = {}  # guild id → its AutoMod rules (see automod_rule())
        self.automod_forbidden: set[int] = set()  # guilds where the bot lacks Manage Server: rules are 403/50013
        self.followup_error: tuple[int, int, str] | None = None  # (status, code, message) for follow-up POSTs
        self.storms: list[tuple[str, re.Pattern[str], list[tuple[int, float]]]] = []  # see storm()
        # OAuth2 (the web page's sign-in): who approves at /oauth2/authorize, codes and bearer tokens issued, the
        # client secret the token endpoint wants, and members' roles as GET /guilds/{g}/members/{u} shows them
        self.oauth_user: int | None = None  # None: the user denies (redirect with error=access_denied)
        self.oauth_secret = "fake-oauth-secret"
        self.oauth_codes: dict[str, tuple[int, str]] = {}  # code → (user id, redirect_uri)
        self.oauth_tokens: dict[str, int] = {}  # access token → user id
        self.member_roles: dict[tuple[int, int], list[int]] = {}  # (guild, user) → role ids; absent: not a member
        self.guild_roles: dict[int, list[dict]] = {}  # extra roles per guild beyond @everyone and moderators
        self.calls: list[Call] = []
        self.unknown: list[Call] = []
        self.errors: list[Call] = []  # calls the fake refused (deadline, expiry, size...)
        self.messages: dict[int, dict] = {}
        self.nonces: dict[str, int] = {}  # nonce of a message the bot created → its id (for enforce_nonce)
        self.files: dict[str, bytes] = {}
        self.interactions: dict[int, InteractionRecord] = {}
        self.commands: list[dict] = []  # registered globally
        self.guild_commands: dict[int, list[dict]] = {}  # guild id → commands registered in that guild only
        self.identifies: list[dict] = []
        self.resumes: list[dict] = []
        self.sockets: list[web.WebSocketResponse] = []
        self.shards: dict[int, tuple[int, int]] = {}  # id(socket) → (shard id, shard count) from its IDENTIFY
        self.recommended_shards = 1  # GET /gateway/bot's "shards"
        self.session_seq = itertools.count(1)
        self.seq = 0
        self._counter = itertools.count(1)
        self._changed = asyncio.Condition()
        self._runner: web.AppRunner | None = None
        self.port = 0

    # -- lifecycle -----------------------------------------------------------------------------------

    async def start(self) -> FakeDiscord:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_get("/gateway", self._gateway)
        app.router.add_get("/cdn/{name}", self._cdn)
        app.router.add_get("/oauth2/authorize", self._oauth_authorize)
        app.router.add_route("*", "/api/v10/{tail:.*}", self._api)
        app.router.add_route("*", "/{tail:.*}", self._unknown_route)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return self

    async def close(self) -> None:
        for ws in list(self.sockets):
            await ws.close()
        if self._runner is not None:
            await self._runner.cleanup()

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def api_base(self) -> str:
        return f"{self.base}/api/v10"

    @property
    def gateway_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/gateway"

    # -- ids -----------------------------------------------------------------------------------------

    def snowflake(self, at_ms: int | None = None) -> int:
        ms = int(time.time() * 1000) if at_ms is None else at_ms
        return ((ms - DISCORD_EPOCH_MS) << 22) | (next(self._counter) % 4096)

    # -- payload builders ----------------------------------------------------------------------------

    def user(self, uid: int, name: str | None = None, bot: bool = False) -> dict:
        return {"id": str(uid), "username": name or f"user{uid}", "discriminator": "0", "global_name": None,
                "avatar": None, "bot": bot, "public_flags": 0}

    def guild_payload(self, gid: int) -> dict:
        return {
            "id": str(gid), "name": f"guild{gid}", "icon": None, "owner_id": "1", "afk_timeout": 300,
            "verification_level": 0, "default_message_notifications": 0, "explicit_content_filter": 0,
            "features": [], "mfa_level": 0, "system_channel_flags": 0, "premium_tier": 0, "nsfw_level": 0,
            "preferred_locale": "en-US", "unavailable": False, "member_count": 2, "large": False,
            "roles": [{"id": str(gid), "name": "@everyone", "permissions": MEMBER_PERMISSIONS, "position": 0,
                       "color": 0, "hoist": False, "managed": False, "mentionable": False, "flags": 0},
                      {"id": str(MOD_ROLE_ID), "name": "moderators", "permissions": "0", "position": 1,
                       "color": 0, "hoist": False, "managed": False, "mentionable": False, "flags": 0}],
            "emojis": [], "stickers": [], "members": [], "voice_states": [], "presences": [], "threads": [],
            "stage_instances": [], "guild_scheduled_events": [],
            "channels": [{"id": str(self.channel_id + (gid - self.guild_ids[0])), "type": 0, "name": "general",
                          "position": 0, "permission_overwrites": [], "nsfw": False, "parent_id": None,
                          "guild_id": str(gid)}],
        }

    def message(self, channel_id: int, content: str | None, *, components=None, attachments=None, flags: int = 0,
                author_id: int = BOT_ID, webhook_id: int | None = None, interaction_id: int | None = None,
                embeds: list | None = None) -> dict:
        mid = self.snowflake()
        msg = {
            "id": str(mid), "channel_id": str(channel_id), "author": self.user(author_id, "dalle", bot=True),
            "content": content or "", "timestamp": "2026-11-23T09:00:00.000000+00:00", "edited_timestamp": None,
            "tts": False, "mention_everyone": False, "mentions": [], "mention_roles": [], "attachments": [],
            "embeds": embeds or [], "pinned": False, "type": 0 if interaction_id is None else 20, "flags": flags,
            "components": components or [],
        }
        if webhook_id is not None:
            msg["webhook_id"] = str(webhook_id)
        self._attach(msg, attachments or [])
        self.messages[mid] = msg
        return msg

    def _attach(self, msg: dict, attachments: list[tuple[str, bytes]]) -> None:
        out = []
        for filename, data in attachments:
            aid = self.snowflake()
            key = f"{aid}-{filename}"
            self.files[key] = data
            out.append({"id": str(aid), "filename": filename, "size": len(data), "url": f"{self.base}/cdn/{key}",
                        "proxy_url": f"{self.base}/cdn/{key}", "content_type": "image/png"})
        msg["attachments"] = out

    # -- test-side helpers ---------------------------------------------------------------------------

    async def dispatch(self, t: str, d: dict) -> None:
        """Send an event to every socket, or, on a sharded connection, to the shard of the event's guild
        (``(guild_id >> 22) % shard_count``, as Discord routes them; events without a guild go to shard 0)."""
        self.seq += 1
        frame = json.dumps({"op": 0, "t": t, "s": self.seq, "d": d})
        guild_id = d.get("guild_id") if isinstance(d, dict) else None
        for ws in list(self.sockets):
            if not ws.closed and self._shard_wants(ws, int(guild_id) if guild_id else None):
                await ws.send_str(frame)

    def _shard_wants(self, ws: web.WebSocketResponse, guild_id: int | None) -> bool:
        shard = self.shards.get(id(ws))
        if shard is None:
            return True
        shard_id, count = shard
        return (guild_id >> 22) % count == shard_id if guild_id is not None else shard_id == 0

    async def delete_message(self, message_id: int) -> None:
        """The message is deleted (through the API, or by a member in their client): it goes, and the gateway
        gets MESSAGE_DELETE as Discord sends it."""
        msg = self.messages.pop(int(message_id), None)
        if msg is None:
            return
        event = {"id": msg["id"], "channel_id": msg["channel_id"]}
        guild = self.guild_ids[0] + int(msg["channel_id"]) - self.channel_id if self.guild_ids else None
        if guild in self.guild_ids:
            event["guild_id"] = str(guild)
        elif self.guild_ids and int(msg["channel_id"]) < 50_000:  # the review channel and the like: the first guild
            event["guild_id"] = str(self.guild_ids[0])
        await self.dispatch("MESSAGE_DELETE", event)

    async def automod_rule(self, guild_id: int, name: str, *, keywords: list[str] | None = None,
                           regexes: list[str] | None = None, allow: list[str] | None = None,
                           trigger_type: int = 1, enabled: bool = True, announce: bool = True) -> dict:
        """Add an AutoMod rule to a guild (``trigger_type`` 1: keyword) and, with ``announce``, dispatch
        AUTO_MODERATION_RULE_CREATE as Discord does to bots with Manage Server."""
        rule = {"id": str(self.snowflake()), "guild_id": str(guild_id), "name": name, "creator_id": "1",
                "event_type": 1, "trigger_type": trigger_type, "enabled": enabled, "exempt_roles": [],
                "exempt_channels": [], "actions": [{"type": 1, "metadata": {}}],
                "trigger_metadata": {"keyword_filter": keywords or [], "regex_patterns": regexes or [],
                                     "allow_list": allow or []}}
        self.automod_rules.setdefault(guild_id, []).append(rule)
        if announce:
            await self.dispatch("AUTO_MODERATION_RULE_CREATE", rule)
        return rule

    async def request_reconnect(self) -> None:
        """op 7 RECONNECT: the client opens a new socket and RESUMEs its session."""
        for ws in list(self.sockets):
            if not ws.closed:
                await ws.send_str(json.dumps({"op": 7, "d": None}))

    def _interaction_base(self, itype: int, user_id: int, guild_id: int | None, channel_id: int | None,
                          permissions: str | None = None, roles: list[int] | None = None) -> dict:
        """``permissions``: the member's in the channel (default an ordinary member's); ``roles``: their role ids."""
        iid = self.snowflake()
        token = f"tok-{iid}"
        channel_id = channel_id or self.channel_id
        payload = {
            "id": str(iid), "application_id": str(APP_ID), "type": itype, "token": token, "version": 1,
            "attachment_size_limit": self.attachment_limit, "locale": "en-US", "entitlements": [],
            "authorizing_integration_owners": {"0": str(guild_id)} if guild_id else {"1": str(user_id)},
            "context": 0 if guild_id else 1, "app_permissions": "2248473465835073",
            "channel_id": str(channel_id), "channel": {"id": str(channel_id), "type": 0 if guild_id else 1},
        }
        if guild_id is not None:
            payload["guild_id"] = str(guild_id)
            payload["guild_locale"] = "en-US"
            payload["channel"].update(guild_id=str(guild_id), name="general", position=0,
                                      permission_overwrites=[], nsfw=False, parent_id=None)
            payload["member"] = {"user": self.user(user_id), "roles": [str(r) for r in roles or ()],
                                 "joined_at": "2026-01-01T00:00:00+00:00", "deaf": False, "mute": False, "flags": 0,
                                 "permissions": permissions or MEMBER_PERMISSIONS,
                                 "nick": None, "avatar": None, "pending": False}
        else:
            payload["user"] = self.user(user_id)
        return payload

    async def send_interaction(self, payload: dict) -> InteractionRecord:
        iid = int(payload["id"])
        rec = InteractionRecord(id=iid, token=payload["token"], type=payload["type"], dispatched_at=time.monotonic(),
                                created_ms=(iid >> 22) + DISCORD_EPOCH_MS, channel_id=int(payload["channel_id"]))
        if payload.get("message"):  # a component's @original is its message until a reply of its own replaces it
            rec.original_message_id = int(payload["message"]["id"])
        self.interactions[iid] = rec
        await self.dispatch("INTERACTION_CREATE", payload)
        return rec

    async def slash(self, name: str, options: dict[str, Any], *, user_id: int = 1, guild_id: int | None = 2000,
                    channel_id: int | None = None, subcommand: str | None = None, users: dict[str, int] | None = None,
                    channels: dict[str, int] | None = None, role_options: dict[str, int] | None = None,
                    permissions: str | None = None, roles: list[int] | None = None) -> InteractionRecord:
        """``subcommand``: the group's command to run ("group command" for a subgroup's); ``users``, ``channels``,
        ``role_options``: user, channel and role options (name → id), sent with their resolved objects as Discord
        sends them."""
        types = {str: 3, int: 4, bool: 5}
        payload = self._interaction_base(2, user_id, guild_id, channel_id, permissions, roles)
        registered = self.guild_commands.get(guild_id, []) + self.commands if guild_id else self.commands
        cmd = next((c for c in registered if c["name"] == name), None)
        opts = [{"name": k, "type": types[type(v)], "value": v} for k, v in options.items()]
        opts += [{"name": k, "type": 6, "value": str(uid)} for k, uid in (users or {}).items()]
        opts += [{"name": k, "type": 7, "value": str(cid)} for k, cid in (channels or {}).items()]
        opts += [{"name": k, "type": 8, "value": str(rid)} for k, rid in (role_options or {}).items()]
        for depth, part in enumerate(reversed((subcommand or "").split())):
            opts = [{"name": part, "type": 1 if depth == 0 else 2, "options": opts}]
        payload["data"] = {"id": cmd["id"] if cmd else str(self.snowflake()), "name": name, "type": 1, "options": opts}
        resolved: dict[str, Any] = {}
        if channels:
            resolved["channels"] = {str(cid): {"id": str(cid), "type": 0, "name": f"channel{cid}",
                                               "permissions": MEMBER_PERMISSIONS, "guild_id": str(guild_id)}
                                    for cid in channels.values()}
        if role_options:
            resolved["roles"] = {str(rid): {"id": str(rid), "name": f"role{rid}", "permissions": "0", "position": 1,
                                            "color": 0, "hoist": False, "managed": False, "mentionable": False,
                                            "flags": 0} for rid in role_options.values()}
        if resolved:
            payload["data"]["resolved"] = resolved
        if users:
            ids = {str(uid) for uid in users.values()}
            payload["data"].setdefault("resolved", {}).update({
                "users": {uid: self.user(int(uid)) for uid in ids},
                "members": {uid: {"roles": [], "joined_at": "2026-01-01T00:00:00+00:00", "deaf": False,
                                  "mute": False, "flags": 0, "nick": None, "avatar": None, "pending": False,
                                  "permissions": MEMBER_PERMISSIONS} for uid in ids}})
        if guild_id is not None:
            payload["data"]["guild_id"] = str(guild_id)
        return await self.send_interaction(payload)

    async def click(self, message: dict, custom_id: str, *, user_id: int = 1, guild_id: int | None = 2000,
                    component_type: int = 2, values: list[str] | None = None, permissions: str | None = None,
                    roles: list[int] | None = None) -> InteractionRecord:
        payload = self._interaction_base(3, user_id, guild_id, int(message["channel_id"]), permissions, roles)
        payload["message"] = message
        payload["data"] = {"custom_id": custom_id, "component_type": component_type}
        if values is not None:
            payload["data"]["values"] = values
        return await self.send_interaction(payload)

    async def submit_modal(self, custom_id: str, fields: dict[str, str], *, user_id: int = 1,
                           guild_id: int | None = 2000, message: dict | None = None, permissions: str | None = None,
                           roles: list[int] | None = None) -> InteractionRecord:
        payload = self._interaction_base(5, user_id, guild_id, int(message["channel_id"]) if message else None,
                                         permissions, roles)
        payload["data"] = {"custom_id": custom_id, "components": [
            {"type": 1, "components": [{"type": 4, "custom_id": k, "value": v}]} for k, v in fields.items()]}
        if message is not None:
            payload["message"] = message
        return await self.send_interaction(payload)

    async def wait_for(self, predicate, timeout: float = 10.0) -> Call:
        """The first recorded call matching ``predicate`` (waits for it)."""
        async def _find():
            async with self._changed:
                while True:
                    for c in self.calls:
                        if predicate(c):
                            return c
                    await self._changed.wait()

        return await asyncio.wait_for(_find(), timeout)

    async def wait_count(self, predicate, n: int, timeout: float = 20.0) -> list[Call]:
        async def _find():
            async with self._changed:
                while True:
                    found = [c for c in self.calls if predicate(c)]
                    if len(found) >= n:
                        return found
                    await self._changed.wait()

        return await asyncio.wait_for(_find(), timeout)

    def calls_for(self, method: str, fragment: str) -> list[Call]:
        return [c for c in self.calls if c.method == method and fragment in c.path]

    # -- HTTP ----------------------------------------------------------------------------------------

    async def _read(self, request: web.Request) -> tuple[Any, dict[str, bytes]]:
        files: dict[str, bytes] = {}
        body: Any = None
        ctype = request.headers.get("Content-Type", "")
        if ctype.startswith("multipart/"):
            reader = await request.multipart()
            while (part := await reader.next()) is not None:
                data = await part.read()
                if part.name == "payload_json":
                    body = json.loads(data)
                else:
                    files[part.filename or part.name or "file"] = bytes(data)
        elif ctype.startswith("application/x-www-form-urlencoded"):  # the OAuth2 token endpoint's form
            body = dict(parse_qsl((await request.read()).decode()))
        elif request.can_read_body:
            raw = await request.read()
            body = json.loads(raw) if raw else None
        return body, files

    async def _record(self, call: Call) -> None:
        self.calls.append(call)
        if call.status >= 400:
            self.errors.append(call)
        async with self._changed:
            self._changed.notify_all()

    async def _unknown_route(self, request: web.Request) -> web.Response:
        call = Call(request.method, request.path, dict(request.query), None, status=404)
        self.unknown.append(call)
        await self._record(call)
        return _error(404, 0, f"fake discord: unknown route {request.method} {request.path}")

    # -- OAuth2 and members (the web page's sign-in) ---------------------------------------------------------

    async def _oauth_authorize(self, request: web.Request) -> web.Response:
        """Discord's consent page, answered at once for ``oauth_user``: back to redirect_uri with a code."""
        q = request.query
        call = Call("GET", "/oauth2/authorize", dict(q), None)
        await self._record(call)
        if q.get("client_id") != str(APP_ID) or q.get("response_type") != "code" or not q.get("redirect_uri"):
            call.status = 400
            return _error(400, 0, "invalid OAuth2 request")
        if q.get("scope") != "identify":  # the page asks for nothing more than who the user is
            call.status = 400
            return _error(400, 0, f"unexpected scope {q.get('scope')!r}")
        sep = "&" if "?" in q["redirect_uri"] else "?"
        if self.oauth_user is None:
            raise web.HTTPFound(f"{q['redirect_uri']}{sep}error=access_denied&state={q.get('state', '')}")
        code = f"code{self.snowflake()}"
        self.oauth_codes[code] = (self.oauth_user, q["redirect_uri"])
        raise web.HTTPFound(f"{q['redirect_uri']}{sep}code={code}&state={q.get('state', '')}")

    def _oauth_route(self, request: web.Request, call: Call) -> web.Response | None:
        p = call.path.strip("/").split("/")
        auth = request.headers.get("Authorization", "")
        if request.method == "POST" and p == ["oauth2", "token"]:
            form = call.json if isinstance(call.json, dict) else dict(call.query)
            form = form or {}
            code = self.oauth_codes.pop(str(form.get("code", "")), None)  # a code works once
            if (form.get("grant_type") != "authorization_code" or code is None or form.get("redirect_uri") != code[1]
                    or form.get("client_id") != str(APP_ID) or form.get("client_secret") != self.oauth_secret):
                return _json({"error": "invalid_grant"}, status=400)
            token = f"bearer{self.snowflake()}"
            self.oauth_tokens[token] = code[0]
            return _json({"access_token": token, "token_type": "Bearer", "expires_in": 604800,
                          "refresh_token": "unused", "scope": "identify"})
        if auth.startswith("Bearer "):
            uid = self.oauth_tokens.get(auth[7:])
            if request.method == "GET" and p == ["users", "@me"] and uid is not None:
                return _json(self.user(uid))
            return _error(401, 0, "401: Unauthorized")  # a bearer token reaches users/@me only (scope identify)
        if request.method == "GET" and p == ["users", "@me", "guilds"]:  # pages of at most 200, as Discord's
            after, limit = int(call.query.get("after", 0)), min(int(call.query.get("limit", 200)), 200)
            return _json([{"id": str(g), "name": f"guild{g}", "icon": None, "owner": False, "permissions": "8",
                           "features": []} for g in sorted(self.guild_ids) if g > after][:limit])
        if request.method == "GET" and len(p) == 3 and p[0] == "guilds" and p[2] == "roles":
            gid = int(p[1])
            return _json([{"id": str(gid), "name": "@everyone", "permissions": MEMBER_PERMISSIONS, "position": 0},
                          {"id": str(MOD_ROLE_ID), "name": "moderators", "permissions": "0", "position": 1},
                          *self.guild_roles.get(gid, [])])
        if request.method == "GET" and len(p) == 4 and p[0] == "guilds" and p[2] == "members":
            roles = self.member_roles.get((int(p[1]), int(p[3])))
            if int(p[1]) not in self.guild_ids or roles is None:
                return _error(404, 10007, "Unknown Member")
            return _json({"user": self.user(int(p[3])), "roles": [str(r) for r in roles], "nick": None,
                          "joined_at": "2026-01-01T00:00:00+00:00", "deaf": False, "mute": False, "flags": 0})
        return None

    async def _cdn(self, request: web.Request) -> web.Response:
        data = self.files.get(request.match_info["name"])
        if data is None:
            return web.Response(status=404)
        return web.Response(body=data, content_type="image/png")

    def storm(self, method: str, path: str, answers: list[tuple[int, float]]) -> None:
        """The next calls of ``method`` whose path fully matches the regex ``path`` get ``answers`` first, one each,
        in order: ``(429, retry_after_s)`` is a (non-global) rate limit, ``(5xx, 0)`` a server error."""
        self.storms.append((method, re.compile(path), list(answers)))

    def _storm_answer(self, call: Call) -> web.Response | None:
        for method, pattern, answers in self.storms:
            if answers and method == call.method and pattern.fullmatch(call.path):
                status, retry_after = answers.pop(0)
                if status == 429:
                    body = {"message": "You are being rate limited.", "retry_after": retry_after, "global": False,
                            "code": 0}
                    return web.Response(status=429, body=json.dumps(body).encode(), headers={
                        "Content-Type": "application/json", "Retry-After": str(retry_after), "Via": "1.1 google",
                        "X-RateLimit-Scope": "user"})
                return _error(status, 0, "fake discord: server error (storm)")
        return None

    async def _api(self, request: web.Request) -> web.Response:
        body, files = await self._read(request)
        call = Call(request.method, "/" + request.match_info["tail"], dict(request.query), body, files)
        try:
            resp = self._storm_answer(call)  # (a Response is an empty mapping: falsy, so no `or` here)
            if resp is None:
                resp = self._oauth_route(request, call)
            if resp is None:
                resp = await self._route(request.method, call.path.strip("/").split("/"), call)
        except _Refuse as r:
            resp = r.response
        if resp is None:
            call.status = 404
            self.unknown.append(call)
            resp = _error(404, 0, f"fake discord: unknown route {request.method} {call.path}")
        call.status = resp.status
        await self._record(call)
        return resp

    async def _route(self, method: str, p: list[str], call: Call) -> web.Response | None:
        if method == "GET" and p == ["users", "@me"]:
            return _json(self.user(BOT_ID, "dalle", bot=True))
        if method == "GET" and p == ["oauth2", "applications", "@me"]:
            return _json({"id": str(APP_ID), "name": "dalle", "icon": None, "description": "", "bot_public": True,
                          "bot_require_code_grant": False, "verify_key": "0" * 64, "flags": 0,
                          "owner": self.user(1, "owner"), "team": None})
        if method == "GET" and p == ["gateway", "bot"]:
            return _json({"url": self.gateway_url, "shards": self.recommended_shards, "session_start_limit": {
                "total": 1000, "remaining": 999, "reset_after": 0, "max_concurrency": 1}})
        if method == "PUT" and len(p) == 3 and p[0] == "applications" and p[2] == "commands":
            self.commands = self._registered(call.json)
            return _json(self.commands)
        if method == "PUT" and len(p) == 5 and p[0] == "applications" and p[2] == "guilds" and p[4] == "commands":
            self.guild_commands[int(p[3])] = self._registered(call.json, guild_id=p[3])
            return _json(self.guild_commands[int(p[3])])
        if method == "POST" and p[:1] == ["interactions"] and p[-1] == "callback":
            return self._callback(int(p[1]), p[2], call)
        if p[:1] == ["webhooks"] and len(p) >= 3:
            return await self._webhook(method, p, call)
        if method == "POST" and p[:1] == ["channels"] and p[-1] == "messages":
            if int(p[1]) in self.forbidden_channels:
                raise _Refuse(_error(403, 50013, "Missing Permissions"))
            self._check_message(call, self.attachment_limit)
            payload = call.json or {}
            nonce = payload.get("nonce")
            if payload.get("enforce_nonce") and nonce is not None and self.nonces.get(str(nonce)) in self.messages:
                return _json(self.messages[self.nonces[str(nonce)]])  # Discord returns the message it made before
            msg = self.message(int(p[1]), payload.get("content"), components=payload.get("components"),
                               attachments=list(call.files.items()), embeds=payload.get("embeds"))
            if nonce is not None:
                msg["nonce"] = nonce
                self.nonces[str(nonce)] = int(msg["id"])
            return _json(msg)
        if method == "PATCH" and p[:1] == ["channels"] and p[-2] == "messages":
            return self._edit(int(p[-1]), call)
        if method == "GET" and len(p) == 4 and p[0] == "guilds" and p[2:] == ["auto-moderation", "rules"]:
            if int(p[1]) in self.automod_forbidden:
                raise _Refuse(_error(403, 50013, "Missing Permissions"))
            return _json(self.automod_rules.get(int(p[1]), []))
        if method == "DELETE" and len(p) == 4 and p[0] == "channels" and p[2] == "messages":
            if int(p[3]) not in self.messages:
                return _error(404, 10008, "Unknown Message")
            await self.delete_message(int(p[3]))
            return web.Response(status=204)
        if method == "POST" and p == ["users", "@me", "channels"]:
            rid = int((call.json or {})["recipient_id"])
            return _json({"id": str(50_000 + rid), "type": 1, "recipients": [self.user(rid)], "last_message_id": None})
        return None

    def _registered(self, commands: list[dict] | None, **extra: str) -> list[dict]:
        """Commands as Discord answers a bulk overwrite: each with its id, application id and version."""
        return [dict(c, id=str(self.snowflake()), application_id=str(APP_ID), version="1", **extra)
                for c in (commands or [])]

    def _check_message(self, call: Call, limit: int) -> None:
        payload = call.json or {}
        if len(payload.get("content") or "") > 2000:
            raise _Refuse(_error(400, 50035, "Invalid Form Body: content must be 2000 or fewer in length."))
        if sum(len(b) for b in call.files.values()) > limit:
            raise _Refuse(_error(413, 40005, "Request entity too large"))

    def _record_for_token(self, token: str) -> InteractionRecord | None:
        return next((r for r in self.interactions.values() if r.token == token), None)

    def _callback(self, iid: int, token: str, call: Call) -> web.Response:
        rec = self.interactions.get(iid)
        if rec is None or rec.token != token:
            return _error(404, 10062, "Unknown interaction")
        if time.monotonic() - rec.dispatched_at > self.ack_deadline:
            return _error(404, 10062, "Unknown interaction")
        if rec.acked:
            return _error(400, 40060, "Interaction has already been acknowledged.")
        self._check_message(call, self.attachment_limit)
        body = call.json or {}
        rtype = body.get("type")
        data = body.get("data") or {}
        rec.acked = True
        rec.ack_type = rtype
        rec.ephemeral = bool(data.get("flags", 0) & 64)
        interaction = {"id": str(iid), "type": rec.type, "response_message_loading": rtype == 5,
                       "response_message_ephemeral": rec.ephemeral}
        resource: dict[str, Any] = {"type": rtype}
        if rtype in (4, 5):
            msg = self.message(rec.channel_id or self.channel_id, data.get("content"),
                               components=data.get("components"), attachments=list(call.files.items()),
                               flags=data.get("flags", 0) | (128 if rtype == 5 else 0), webhook_id=APP_ID,
                               interaction_id=iid)
            rec.original_message_id = int(msg["id"])
            interaction["response_message_id"] = msg["id"]
            resource["message"] = msg
        return _json({"interaction": interaction, "resource": resource})

    async def _webhook(self, method: str, p: list[str], call: Call) -> web.Response | None:
        app, token = p[1], p[2]
        if app != str(APP_ID):
            return _error(404, 10015, "Unknown Webhook")
        rec = self._record_for_token(token)
        if rec is None:
            return _error(401, 50027, "Invalid Webhook Token")
        if time.time() * 1000 - rec.created_ms > self.token_ttl * 1000:
            return _error(401, 50027, "Invalid Webhook Token")
        if not rec.acked:
            return _error(404, 10015, "Unknown Webhook: interaction not acknowledged")
        if method == "POST" and len(p) == 3:
            if self.followup_error is not None:
                return _error(*self.followup_error)
            self._check_message(call, self.attachment_limit)
            payload = call.json or {}
            msg = self.message(rec.channel_id or self.channel_id, payload.get("content"),
                               components=payload.get("components"), attachments=list(call.files.items()),
                               flags=payload.get("flags", 0), webhook_id=APP_ID)
            return _json(msg)
        if len(p) == 5 and p[3] == "messages":
            mid = rec.original_message_id if p[4] == "@original" else int(p[4])
            if mid is None or mid not in self.messages:
                return _error(404, 10008, "Unknown Message")
            if method == "PATCH":
                return self._edit(mid, call)
            if method == "GET":
                return _json(self.messages[mid])
            if method == "DELETE":
                await self.delete_message(mid)
                return web.Response(status=204)
        return None

    def _edit(self, mid: int, call: Call) -> web.Response:
        msg = self.messages.get(mid)
        if msg is None:
            return _error(404, 10008, "Unknown Message")
        self._check_message(call, self.attachment_limit)
        payload = call.json or {}
        for key in ("content", "components", "flags", "embeds"):
            if key in payload:
                msg[key] = payload[key] if payload[key] is not None else ([] if key != "content" else "")
        if call.files or "attachments" in payload:
            self._attach(msg, list(call.files.items()))
        msg["edited_timestamp"] = "2026-11-23T09:00:01.000000+00:00"
        return _json(msg)

    # -- gateway -------------------------------------------------------------------------------------

    async def _gateway(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        self.sockets.append(ws)
        await ws.send_str(json.dumps({"op": 10, "d": {"heartbeat_interval": self.heartbeat_ms}}))
        try:
            async for msg in ws:
                if msg.type != WSMsgType.TEXT:
                    continue
                frame = json.loads(msg.data)
                op = frame.get("op")
                if op == 1:
                    await ws.send_str(json.dumps({"op": 11}))
                elif op == 2:
                    self.identifies.append(frame["d"])
                    if frame["d"].get("shard"):
                        self.shards[id(ws)] = tuple(frame["d"]["shard"])
                    await self._ready(ws, frame["d"])
                elif op == 6:
                    self.resumes.append(frame["d"])
                    self.seq += 1
                    await ws.send_str(json.dumps({"op": 0, "t": "RESUMED", "s": self.seq, "d": {}}))
        finally:
            if ws in self.sockets:
                self.sockets.remove(ws)
            self.shards.pop(id(ws), None)
        return ws

    async def _ready(self, ws: web.WebSocketResponse, identify: dict) -> None:
        self.seq += 1
        ready = {
            "v": 10, "user": self.user(BOT_ID, "dalle", bot=True), "session_id": f"session-{next(self.session_seq)}",
            "resume_gateway_url": self.gateway_url, "application": {"id": str(APP_ID), "flags": 0},
            "guilds": [{"id": str(g), "unavailable": True} for g in self._guilds_of(ws)], "private_channels": [],
            "relationships": [], "presences": [],
        }
        if "shard" in identify:
            ready["shard"] = identify["shard"]
        await ws.send_str(json.dumps({"op": 0, "t": "READY", "s": self.seq, "d": ready}))
        for g in self._guilds_of(ws):
            self.seq += 1
            await ws.send_str(json.dumps({"op": 0, "t": "GUILD_CREATE", "s": self.seq, "d": self.guild_payload(g)}))

    def _guilds_of(self, ws: web.WebSocketResponse) -> list[int]:
        return [g for g in self.guild_ids if self._shard_wants(ws, g)]


class _Refuse(Exception):
    def __init__(self, response: web.Response) -> None:
        self.response = response
