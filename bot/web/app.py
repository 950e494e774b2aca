"""The aiohttp application: templates, encrypted-cookie sessions, sign-in, CSRF, and errors as pages.

A session holds the reader's rights (``bot.webaccess.Rights``), when they signed in and a CSRF token. Every POST
must carry that token (a form field ``csrf``): a form posted from elsewhere, or without it, is refused with 403
and changes nothing. Anonymous requests to a page are sent to the sign-in page; to a JSON endpoint (``/api/``)
they get 401. Cookies are HttpOnly, SameSite=Lax, Secure when WEB_BASE_URL is https, and a session ends after
WEB_SESSION_HOURS.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp_jinja2
import aiohttp_session
import jinja2
from aiohttp import web
from aiohttp_session.cookie_storage import EncryptedCookieStorage

from bot.admin import NotAdmin
from bot.moderation import CaseNotFound, NotModerator
from bot.web.config import WebConfig
from bot.webaccess import NoSuchThing, Rights, SignInLinks, WebModeration

log = logging.getLogger(__name__)

TEMPLATES = Path(__file__).with_name("templates")
COOKIE = "dalle_session"
OPEN_PATHS = ("/healthz", "/signin")

WEB_KEY = web.AppKey("web", WebModeration)
LINKS_KEY = web.AppKey("links", SignInLinks)
CONFIG_KEY = web.AppKey("config", WebConfig)
RIGHTS_KEY = web.RequestKey("rights", Rights)
DIRECTORY_KEY = web.AppKey("directory", object)  # bot.web.oauth.DiscordDirectory, or None without a bot token


class BadInput(ValueError):
    """A malformed request (a 400)."""


MAX_ID = 2**63 - 1  # the databases' BIGINT: a larger id names nothing (and would overflow SQLite)


def int_param(value: Any, name: str, *, required: bool = True, maximum: int | None = None) -> int | None:
    """A whole number from a URL or form field; BadInput names the field otherwise (or one over ``maximum``). An
    id (no ``maximum``) beyond BIGINT names nothing: NoSuchThing (404)."""
    if value is None or value == "":
        if required:
            raise BadInput(f"{name} is missing")
        return None
    text = str(value).strip().lstrip("#")
    if not text.isascii() or not text.isdigit() or len(text) > 20:
        raise BadInput(f"{name} must be a whole number; got {str(value)[:40]!r}")
    number = int(text)
    if maximum is not None and number > maximum:
        raise BadInput(f"{name} is at most {maximum}; got {number}")
    if number > MAX_ID:
        raise NoSuchThing(f"No {name} {number}.")
    return number


async def rights_of(request: web.Request) -> Rights | None:
    session = await aiohttp_session.get_session(request)
    data = session.get("rights")
    if not data:
        return None
    return Rights.from_json(data)


async def sign_in(request: web.Request, rights: Rights, session_id: str) -> None:
    """A fresh session (a new identity for the cookie, a new CSRF token) for ``rights``; ``session_id`` names its
    row in the database, which sign-out ends (so a copied cookie dies with it)."""
    session = await aiohttp_session.new_session(request)
    session["rights"] = rights.to_json()
    session["sid"] = session_id
    session["at"] = time.time()
    session["csrf"] = secrets.token_urlsafe(32)


async def csrf_token(request: web.Request) -> str:
    session = await aiohttp_session.get_session(request)
    if "csrf" not in session:
        session["csrf"] = secrets.token_urlsafe(32)
    return session["csrf"]


@web.middleware
async def errors_middleware(request: web.Request, handler: Any) -> web.StreamResponse:
    """Service errors as pages (or JSON under /api/) with the right status; nothing is half done."""
    try:
        return await handler(request)
    except (CaseNotFound, NoSuchThing) as exc:
        return await _error(request, 404, str(exc))
    except (NotModerator, NotAdmin) as exc:
        return await _error(request, 403, str(exc))
    except BadInput as exc:
        return await _error(request, 400, str(exc))
    except ValueError as exc:  # a service refusing bad input (a duration, a setting): nothing changed
        return await _error(request, 400, str(exc))


async def _error(request: web.Request, status: int, message: str) -> web.StreamResponse:
    if request.path.startswith("/api/"):
        return web.json_response({"error": message}, status=status)
    response = aiohttp_jinja2.render_template("error.html", request, {"status": status, "message": message},
                                              status=status)
    return response


@web.middleware
async def auth_middleware(request: web.Request, handler: Any) -> web.StreamResponse:
    """Signed-in readers only (except /healthz and the sign-in pages); sessions past their lifetime end."""
    if request.path in ("/healthz", "/signin") or request.path.startswith(("/signin/", "/oauth/")):
        return await handler(request)
    session = await aiohttp_session.get_session(request)
    config = request.app[CONFIG_KEY]
    if session.get("rights") and (time.time() - float(session.get("at", 0)) > config.session_hours * 3600
                                  or not await request.app[LINKS_KEY].live(str(session.get("sid") or ""))):
        session.invalidate()  # past its lifetime, or signed out (perhaps from another copy of this cookie)
    if not session.get("rights"):
        if request.path.startswith("/api/"):
            return web.json_response({"error": "sign in first"}, status=401)
        raise web.HTTPSeeOther(f"/signin?next={quote(request.path_qs, safe='')}")
    rights = Rights.from_json(session["rights"])
    directory = request.app[DIRECTORY_KEY]
    if not rights.operator and directory is not None:  # Discord's roles again (cached for minutes), link or OAuth
        from bot.web.oauth import DiscordUnavailable, grants_of

        try:
            fresh = await request.app[WEB_KEY].rights_from_discord(rights.user_id, grants_of(
                await directory.memberships(rights.user_id, guild_ids=sorted(rights.grants))))
        except DiscordUnavailable as exc:
            return await _error(request, 503, f"{exc}; try again in a moment.")
        if not fresh.grants:
            session.invalidate()
            raise web.HTTPSeeOther("/signin")
        if fresh != rights:
            session["rights"] = fresh.to_json()
        rights = fresh
    request[RIGHTS_KEY] = rights
    return await handler(request)


@web.middleware
async def csrf_middleware(request: web.Request, handler: Any) -> web.StreamResponse:
    """Every state-changing request carries the session's CSRF token."""
    if request.method in ("POST", "PUT", "PATCH", "DELETE"):
        session = await aiohttp_session.get_session(request)
        form = await request.post()
        sent = str(form.get("csrf", "")) or request.headers.get("X-CSRF-Token", "")
        expected = session.get("csrf") or ""
        if not expected or not hmac.compare_digest(sent.encode(), expected.encode()):
            return await _error(request, 403, "This form has expired or did not come from this page (missing or "
                                              "wrong CSRF token). Reload the page and try again.")
    return await handler(request)


@web.middleware
async def headers_middleware(request: web.Request, handler: Any) -> web.StreamResponse:
    response = await handler(request)
    response.headers.setdefault("X-Frame-Options", "DENY")
    response.headers.setdefault("X-Content-Type-Options", "nosniff")
    response.headers.setdefault("Referrer-Policy", "same-origin")
    response.headers.setdefault("Content-Security-Policy",
                                "default-src 'self'; img-src 'self' data:; style-src 'self' 'unsafe-inline'; "
                                "script-src 'self' 'unsafe-inline'; frame-ancestors 'none'")
    return response


def session_key(secret: str) -> bytes:
    """32 bytes for Fernet from any long secret."""
    return hashlib.sha256(("dalle-bot web session:" + secret).encode()).digest()


def create_app(web_moderation: WebModeration, links: SignInLinks, config: WebConfig,
               directory: Any = None) -> web.Application:
    """``directory``: a ``bot.web.oauth.DiscordDirectory`` reading members' roles, and Discord sign-in when it has
    OAuth2 credentials (None: one-time links only, their roles as given)."""
    from bot.web import pages

    app = web.Application(middlewares=[headers_middleware], client_max_size=1024 * 1024)
    app[WEB_KEY] = web_moderation
    app[LINKS_KEY] = links
    app[CONFIG_KEY] = config
    app[DIRECTORY_KEY] = directory
    if directory is not None:
        app.on_cleanup.append(lambda _app: directory.close())
    storage = EncryptedCookieStorage(session_key(config.secret_key), cookie_name=COOKIE,
                                     max_age=int(config.session_hours * 3600), httponly=True,
                                     secure=config.secure_cookies, samesite="Lax")
    aiohttp_session.setup(app, storage)
    app.middlewares.extend([errors_middleware, auth_middleware, csrf_middleware])
    env = aiohttp_jinja2.setup(app, loader=jinja2.FileSystemLoader(str(TEMPLATES)), autoescape=True,
                               context_processors=[_context])
    env.filters["when"] = lambda dt: dt.strftime("%Y-%m-%d %H:%M") if dt else "–"
    pages.add_routes(app)
    return app


def oauth_directory(app: web.Application) -> Any:
    """The directory when Discord sign-in is set up, else None."""
    directory = app[DIRECTORY_KEY]
    return directory if directory is not None and directory.oauth else None


async def _context(request: web.Request) -> dict[str, Any]:
    return {"rights": request.get(RIGHTS_KEY), "oauth": oauth_directory(request.app) is not None,
            "csrf": await csrf_token(request), "path": request.path}


async def start_site(app: web.Application, host: str, port: int) -> web.AppRunner:
    """Serve ``app`` on host:port (the caller cleans the runner up)."""
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
    except OSError:  # e.g. the port is taken: nothing is left half open
        await runner.cleanup()
        raise
    log.info("the moderators' web page is at http://%s:%s/", host, port)
    return runner
