"""The page's routes. Each handler parses its input (BadInput: 400), asks ``bot.webaccess.WebModeration`` (which
checks the reader's rights: 403, and names nothing that does not exist: 404) and renders a template. Decisions
redirect back with a notice (post/redirect/get), so a reload never acts twice."""

from __future__ import annotations

import csv
import io
from datetime import timedelta
from typing import Any

import aiohttp_jinja2
import aiohttp_session
from aiohttp import web

from bot.web.app import CONFIG_KEY, LINKS_KEY, RIGHTS_KEY, WEB_KEY, BadInput, int_param, oauth_directory, sign_in
from bot.web.charts import bar_chart
from bot.webaccess import SETTINGS, Rights

KINDS = ("auto", "report", "blocklist", "refusals", "appeal")
STATUSES = ("open", "approved", "removed", "dismissed", "accepted", "rejected", "closed", "all")
ACTIONS = ("approve", "remove", "dismiss", "accept", "reject")
BULK_ACTIONS = ("approve", "remove", "dismiss")
AUDIT_ACTIONS = ("approve", "remove", "ban", "unban", "dismiss", "settings", "filter", "strike", "strikes_reset",
                 "cooldown", "purge", "block", "unblock", "accept", "reject", "close", "delete", "model_train",
                 "model_promote", "model_rollback", "model_reject")
MAX_BULK = 100
MAX_AGE_HOURS = 24 * 365 * 10  # the queue's age filter (a larger one overflows timedelta)
DISCORD_ONLY = ("review_channel_id", "channel_ids")  # a typed id could name another server's channel

routes = web.RouteTableDef()


def add_routes(app: web.Application) -> None:
    app.add_routes(routes)


def _rights(request: web.Request) -> Rights:
    return request[RIGHTS_KEY]


def _web(request: web.Request) -> Any:
    return request.app[WEB_KEY]


def _safe_next(value: Any, default: str) -> str:
    """Only a path on this site (no scheme, no //host); no backslash or control character either, which browsers
    drop or turn into ``/`` (``/<TAB>/evil.example`` would reach another host)."""
    text = str(value or "")
    if any(c == "\\" or ord(c) < 32 or ord(c) == 127 for c in text):
        return default
    return text if text.startswith("/") and not text.startswith("//") else default


async def _flash(request: web.Request, message: str) -> None:
    session = await aiohttp_session.get_session(request)
    session["flash"] = [*session.get("flash", []), message][-20:]


async def _take_flash(request: web.Request) -> list[str]:
    session = await aiohttp_session.get_session(request)
    return session.pop("flash", []) if "flash" in session else []


async def _render(request: web.Request, template: str, context: dict[str, Any]) -> web.Response:
    context.setdefault("flash", await _take_flash(request))
    context.setdefault("guild_choices", sorted(_rights(request).grants) if RIGHTS_KEY in request else [])
    return aiohttp_jinja2.render_template(template, request, context)


def _choice(value: Any, allowed: tuple[str, ...], name: str) -> str | None:
    if value in (None, ""):
        return None
    if value not in allowed:
        raise BadInput(f"{name} must be one of {', '.join(allowed)}; got {str(value)[:40]!r}")
    return str(value)


# -- health and sign-in ----------------------------------------------------------------------------------------


@routes.get("/healthz")
async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"ok": True})


@routes.get("/signin")
async def signin_page(request: web.Request) -> web.Response:
    return await _render(request, "signin.html", {"token": None, "next": _safe_next(request.query.get("next"), "/")})


@routes.get("/signin/{token}")
async def signin_link(request: web.Request) -> web.Response:
    """A confirmation button, not a sign-in: a link preview fetching the URL must not use the link up."""
    return await _render(request, "signin.html", {"token": request.match_info["token"], "next": "/"})


@routes.post("/signin")
async def signin_post(request: web.Request) -> web.StreamResponse:
    form = await request.post()
    token, links = str(form.get("token", "")), request.app[LINKS_KEY]
    rights = await links.redeem(token, session_ttl=_lifetime(request))
    if rights is None:
        response = aiohttp_jinja2.render_template(
            "error.html", request, {"status": 403, "message": "This sign-in link is unknown, already used or expired "
                                    "(links last 10 minutes and work once). Ask for a new one."}, status=403)
        return response
    await sign_in(request, rights, links.session_id(token))
    raise web.HTTPSeeOther(_safe_next(form.get("next"), "/"))


def _lifetime(request: web.Request) -> timedelta:
    return timedelta(hours=request.app[CONFIG_KEY].session_hours)


@routes.get("/oauth/discord")
async def oauth_start(request: web.Request) -> web.StreamResponse:
    from bot.web.oauth import start

    directory = oauth_directory(request.app)
    if directory is None:
        raise web.HTTPNotFound(text="Discord sign-in is not set up here (WEB_OAUTH_CLIENT_ID).")
    return await start(request, directory, request.app[CONFIG_KEY].base_url)


@routes.get("/oauth/discord/callback")
async def oauth_callback(request: web.Request) -> web.StreamResponse:
    from bot.web.oauth import DiscordUnavailable, finish

    directory = oauth_directory(request.app)
    if directory is None:
        raise web.HTTPNotFound(text="Discord sign-in is not set up here (WEB_OAUTH_CLIENT_ID).")
    try:
        outcome = await finish(request, directory, request.app[CONFIG_KEY].base_url, _web(request))
    except DiscordUnavailable as exc:
        return aiohttp_jinja2.render_template("error.html", request, {"status": 503, "message": str(exc)},
                                              status=503)
    if isinstance(outcome, str):
        return aiohttp_jinja2.render_template("error.html", request, {"status": 403, "message": outcome},
                                              status=403)
    await sign_in(request, outcome, await request.app[LINKS_KEY].open_session(outcome, _lifetime(request)))
    session = await aiohttp_session.get_session(request)
    session["oauth"] = True
    raise web.HTTPSeeOther("/")


@routes.post("/signout")
async def signout(request: web.Request) -> web.StreamResponse:
    session = await aiohttp_session.get_session(request)
    await request.app[LINKS_KEY].end(str(session.get("sid") or ""))
    session.invalidate()
    raise web.HTTPSeeOther("/signin")


# -- the queue -------------------------------------------------------------------------------------------------


def _queue_filters(query: Any) -> dict[str, Any]:
    status = _choice(query.get("status"), STATUSES, "status") or "open"
    hours = int_param(query.get("age"), "age (hours)", required=False, maximum=MAX_AGE_HOURS)
    search = (query.get("q") or "").strip()
    if len(search) > 200:
        raise BadInput("search is at most 200 characters")
    return {"status": None if status == "all" else status, "source": _choice(query.get("kind"), KINDS, "kind"),
            "guild_id": int_param(query.get("guild"), "guild", required=False),
            "older_than": timedelta(hours=hours) if hours else None, "search": search or None}


@routes.get("/")
async def queue(request: web.Request) -> web.Response:
    filters = _queue_filters(request.query)
    rows = await _web(request).queue(_rights(request), **filters)
    return await _render(request, "queue.html", {"rows": rows, "q": request.query, "kinds": KINDS,
                                                 "statuses": STATUSES, "title": "Open cases"})


@routes.get("/appeals")
async def appeals(request: web.Request) -> web.Response:
    filters = {**_queue_filters(request.query), "source": "appeal"}
    rows = await _web(request).queue(_rights(request), **filters)
    return await _render(request, "queue.html", {"rows": rows, "q": request.query, "kinds": KINDS,
                                                 "statuses": STATUSES, "title": "Appeals"})


@routes.get("/api/queue")
async def api_queue(request: web.Request) -> web.Response:
    rows = await _web(request).queue(_rights(request), **_queue_filters(request.query))
    return web.json_response([{"case_id": r.case.id, "guild_id": str(r.case.guild_id), "source": r.case.source,
                               "status": r.case.status, "prompt": r.prompt, "author_id": str(r.author_id),
                               "seed": r.seed, "model_id": r.model_id, "safety_scores": r.safety_scores,
                               "report_reasons": r.report_reasons, "opened_at": r.case.opened_at.isoformat()}
                              for r in rows])


@routes.post("/bulk")
async def bulk(request: web.Request) -> web.StreamResponse:
    form = await request.post()
    action = _choice(form.get("action"), BULK_ACTIONS, "action")
    if action is None:
        raise BadInput("choose approve, remove or dismiss")
    ids = [int_param(v, "case") for v in form.getall("case", [])]
    if not ids:
        raise BadInput("select at least one case")
    if len(ids) > MAX_BULK:
        raise BadInput(f"at most {MAX_BULK} cases at once")
    web_mod, rights = _web(request), _rights(request)
    for case_id in ids:  # every case is checked before any is decided: a forbidden one refuses the whole batch
        await web_mod.check_case(rights, case_id)
    reason = str(form.get("reason", "")).strip()[:500] or None
    for case_id in ids:
        try:
            await _flash(request, await web_mod.decide(rights, case_id, action, reason))
        except ValueError as exc:  # e.g. an appeal in the batch: said, the others go on
            await _flash(request, f"Case #{case_id}: {exc}")
    raise web.HTTPSeeOther(_safe_next(form.get("next"), "/"))


# -- one case --------------------------------------------------------------------------------------------------


@routes.get("/case/{case_id}")
async def case_page(request: web.Request) -> web.Response:
    case_id = int_param(request.match_info["case_id"], "case")
    view, images, record = await _web(request).case(_rights(request), case_id)
    return await _render(request, "case.html", {"case": view, "images": images, "record": record})


@routes.post("/case/{case_id}/decide")
async def decide(request: web.Request) -> web.StreamResponse:
    case_id = int_param(request.match_info["case_id"], "case")
    form = await request.post()
    action = _choice(form.get("action"), ACTIONS, "action")
    if action is None:
        raise BadInput(f"action must be one of {', '.join(ACTIONS)}")
    reason = str(form.get("reason", "")).strip()[:500] or None
    await _flash(request, await _web(request).decide(_rights(request), case_id, action, reason))
    raise web.HTTPSeeOther(_safe_next(form.get("next"), f"/case/{case_id}"))


@routes.post("/case/{case_id}/ban")
async def ban(request: web.Request) -> web.StreamResponse:
    case_id = int_param(request.match_info["case_id"], "case")
    form = await request.post()
    duration, reason = str(form.get("duration", "")).strip(), str(form.get("reason", "")).strip()[:500]
    if not reason:
        raise BadInput("a ban needs a reason")
    await _flash(request, await _web(request).ban(_rights(request), case_id, duration, reason))
    raise web.HTTPSeeOther(f"/case/{case_id}")


@routes.post("/case/{case_id}/unblock")
async def unblock(request: web.Request) -> web.StreamResponse:
    case_id = int_param(request.match_info["case_id"], "case")
    form = await request.post()
    reason = str(form.get("reason", "")).strip()[:500] or None
    await _flash(request, await _web(request).unblock(_rights(request), case_id, reason))
    raise web.HTTPSeeOther(_safe_next(form.get("next"), f"/case/{case_id}"))


@routes.get("/image/{image_id}")
async def image(request: web.Request) -> web.Response:
    image_id = int_param(request.match_info["image_id"], "image")
    data = await _web(request).image_png(_rights(request), image_id)
    return web.Response(body=data, content_type="image/png", headers={"Cache-Control": "private, no-store"})


# -- lists: blocklist, user, audit log -------------------------------------------------------------------------


@routes.get("/blocklist")
async def blocklist(request: web.Request) -> web.Response:
    rights = _rights(request)
    guild_id = int_param(request.query.get("guild"), "guild", required=False)
    if guild_id is None and not rights.operator:
        guild_id = min(rights.grants) if rights.grants else None
    blocks = await _web(request).blocklist(rights, guild_id)
    return await _render(request, "blocklist.html", {"blocks": blocks, "guild_id": guild_id})


@routes.get("/user/{guild_id}/{user_id}")
async def user_page(request: web.Request) -> web.Response:
    guild_id = int_param(request.match_info["guild_id"], "guild")
    user_id = int_param(request.match_info["user_id"], "user")
    found = await _web(request).user(_rights(request), guild_id, user_id)
    actions = await _web(request).audit(_rights(request), guild_id=guild_id, user_id=user_id, limit=50)
    return await _render(request, "user.html", {**found, "guild_id": guild_id, "actions": actions})


async def _audit_rows(request: web.Request) -> list[Any]:
    q = request.query
    return await _web(request).audit(
        _rights(request), guild_id=int_param(q.get("guild"), "guild", required=False),
        action=_choice(q.get("action"), AUDIT_ACTIONS, "action"),
        moderator_id=int_param(q.get("moderator"), "moderator", required=False),
        case_id=int_param(q.get("case"), "case", required=False),
        user_id=int_param(q.get("user"), "user", required=False))


@routes.get("/audit")
async def audit(request: web.Request) -> web.Response:
    rows = await _audit_rows(request)
    return await _render(request, "audit.html", {"rows": rows, "q": request.query, "actions": AUDIT_ACTIONS})


@routes.get("/audit.csv")
async def audit_csv(request: web.Request) -> web.Response:
    rows = await _audit_rows(request)
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["id", "at", "guild_id", "moderator_id", "action", "case_id", "target_user_id", "reason"])
    for a in rows:
        reason = (a.reason or "")
        if reason[:1] in ("=", "+", "-", "@"):  # a spreadsheet must not run a reason as a formula
            reason = "'" + reason
        writer.writerow([a.id, a.created_at.isoformat(), a.guild_id or "", a.moderator_id, a.action,
                         a.case_id or "", a.target_user_id or "", reason])
    return web.Response(text=out.getvalue(), content_type="text/csv",
                        headers={"Content-Disposition": 'attachment; filename="audit.csv"'})


# -- guild settings and the dashboard --------------------------------------------------------------------------


@routes.get("/settings/{guild_id}")
async def settings_page(request: web.Request) -> web.Response:
    guild_id = int_param(request.match_info["guild_id"], "guild")
    values = await _web(request).settings(_rights(request), guild_id)
    return await _render(request, "settings.html", {"guild_id": guild_id, "values": values, "labels": SETTINGS,
                                                    "discord_only": DISCORD_ONLY})


@routes.post("/settings/{guild_id}")
async def settings_post(request: web.Request) -> web.StreamResponse:
    guild_id = int_param(request.match_info["guild_id"], "guild")
    form = await request.post()
    key, value = str(form.get("key", "")), str(form.get("value", ""))
    if key in DISCORD_ONLY:
        raise BadInput(f"{key} is set in Discord (/dalle-admin settings set), where only this server's channels "
                       "can be picked")
    if key not in SETTINGS:
        raise BadInput(f"not a setting you can set here: {key[:40]!r}")
    if not value.strip():
        raise BadInput("give a value")
    await _flash(request, await _web(request).set_setting(_rights(request), guild_id, key, value))
    raise web.HTTPSeeOther(f"/settings/{guild_id}")


@routes.get("/dashboard")
async def dashboard(request: web.Request) -> web.Response:
    guild_id = int_param(request.query.get("guild"), "guild", required=False)
    counts = await _web(request).dashboard(_rights(request), guild_id)
    chart = bar_chart(counts.days, {"requests": counts.requests, "flags": counts.flags, "reports": counts.reports})
    return await _render(request, "dashboard.html", {"counts": counts, "chart": chart, "guild_id": guild_id})
