"""The moderators' web page over HTTP, on SQLite and PostgreSQL: every route's sign-in, rights and bad input, and a
decision on the page being the moderation service's own action (review post edited, public result re-rendered,
audited)."""

from __future__ import annotations

import time as _time
from datetime import timedelta

import pytest
from aiohttp.test_utils import TestClient, TestServer

from bot.web import app as web_app
from bot.webaccess import SignInLinks
from tests.bot.webkit import (
    ADMIN_A,
    CSRF,
    GUILD_A,
    GUILD_B,
    MOD_A,
    MOD_ROLE,
    OPERATOR,
    flagged_result,
    make_app,
    make_service,
    sign_in,
)


@pytest.fixture
async def site(repo, tmp_path):
    """(client, repo, service, front end, case in guild A, case in guild B)."""
    svc, front = make_service(repo, tmp_path)
    await repo.update_guild_settings(GUILD_A, moderator_role_id=MOD_ROLE)
    a = await flagged_result(repo, svc, tmp_path, GUILD_A, "a red square")
    b = await flagged_result(repo, svc, tmp_path, GUILD_B, "a blue circle", color=50)
    client = TestClient(TestServer(make_app(svc)))
    await client.start_server()
    yield client, repo, svc, front, a, b
    await client.close()


ROUTES_GET = ["/", "/appeals", "/case/1", "/image/1", "/blocklist", "/user/2000/77", "/audit", "/audit.csv",
              "/settings/2000", "/dashboard"]
ROUTES_POST = ["/bulk", "/case/1/decide", "/case/1/ban", "/case/1/unblock", "/settings/2000", "/signout"]


async def test_web_review_anonymous_is_sent_to_sign_in(site):
    client, repo, *_ = site
    health = await client.get("/healthz")
    assert health.status == 200 and (await health.json()) == {"ok": True}
    for path in ROUTES_GET:
        r = await client.get(path, allow_redirects=False)
        assert r.status == 303 and r.headers["Location"].startswith("/signin?next="), path
    for path in ROUTES_POST:
        r = await client.post(path, data={"action": "approve"}, allow_redirects=False)
        assert r.status == 303 and r.headers["Location"].startswith("/signin"), path
    api = await client.get("/api/queue")
    assert api.status == 401 and "sign in" in (await api.json())["error"]
    assert (await repo.audit_log(None)) == []


async def test_web_review_links_work_once_and_expire(site):
    client, repo, *_ = site
    token = await SignInLinks(repo).create(MOD_A)
    csrf = CSRF.search(await (await client.get(f"/signin/{token}")).text())[1]
    first = await client.post("/signin", data={"token": token, "csrf": csrf}, allow_redirects=False)
    assert first.status == 303
    other = TestClient(TestServer(client.app))  # another browser reusing the link
    await other.start_server()
    try:
        csrf2 = CSRF.search(await (await other.get(f"/signin/{token}")).text())[1]
        again = await other.post("/signin", data={"token": token, "csrf": csrf2}, allow_redirects=False)
        assert again.status == 403 and "already used or expired" in await again.text()
        expired = await SignInLinks(repo, ttl=timedelta(seconds=-1)).create(MOD_A)
        late = await other.post("/signin", data={"token": expired, "csrf": csrf2}, allow_redirects=False)
        assert late.status == 403
        bogus = await other.post("/signin", data={"token": "x" * 500, "csrf": csrf2}, allow_redirects=False)
        assert bogus.status == 403
        assert (await other.get("/", allow_redirects=False)).status == 303  # still signed out
        no_csrf = await other.post("/signin", data={"token": token}, allow_redirects=False)
        assert no_csrf.status == 403 and "CSRF" in await no_csrf.text()
    finally:
        await other.close()


async def test_web_review_session_cookie_flags_and_sign_out(site):
    client, repo, *_ = site
    token = await SignInLinks(repo).create(MOD_A)
    page = await client.get(f"/signin/{token}")
    cookie = page.headers["Set-Cookie"]
    assert "HttpOnly" in cookie and "SameSite=Lax" in cookie and "Secure" not in cookie
    csrf = CSRF.search(await page.text())[1]
    await client.post("/signin", data={"token": token, "csrf": csrf}, allow_redirects=False)
    csrf = CSRF.search(await (await client.get("/")).text())[1]
    out = await client.post("/signout", data={"csrf": csrf}, allow_redirects=False)
    assert out.status == 303 and out.headers["Location"] == "/signin"
    assert (await client.get("/", allow_redirects=False)).status == 303


async def test_web_review_sign_out_ends_copies_of_the_cookie(site):
    """A session lives in the database too: signing out ends it for every copy of its cookie."""
    client, repo, *_ = site
    await sign_in(client, repo, MOD_A)
    copy = TestClient(TestServer(client.app))  # the same cookie, copied into another browser
    await copy.start_server()
    try:
        copy.session.cookie_jar.update_cookies({c.key: c.value for c in client.session.cookie_jar})
        assert (await copy.get("/", allow_redirects=False)).status == 200
        csrf = CSRF.search(await (await client.get("/")).text())[1]
        assert (await client.post("/signout", data={"csrf": csrf}, allow_redirects=False)).status == 303
        r = await copy.get("/", allow_redirects=False)
        assert r.status == 303 and r.headers["Location"].startswith("/signin")
        assert (await copy.get("/api/queue")).status == 401
    finally:
        await copy.close()


class _MovableClock:
    """``time`` for bot.web.app with a hand that moves: the lifetime check is tested without racing a real clock."""

    def __init__(self) -> None:
        self.ahead = 0.0

    def time(self) -> float:
        return _time.time() + self.ahead


async def test_web_review_secure_cookie_behind_https_and_session_lifetime(repo, tmp_path, monkeypatch):
    svc, _ = make_service(repo, tmp_path)
    client = TestClient(TestServer(make_app(svc, base_url="https://mod.example", session_hours=1)))
    await client.start_server()
    try:
        token = await SignInLinks(repo).create(OPERATOR)
        page = await client.get(f"/signin/{token}")
        assert "Secure" in page.headers["Set-Cookie"]
    finally:
        await client.close()
    clock = _MovableClock()
    monkeypatch.setattr(web_app, "time", clock)
    client = TestClient(TestServer(make_app(svc, session_hours=1)))
    await client.start_server()
    try:
        await sign_in(client, repo, OPERATOR)
        clock.ahead = 3590.0  # still inside the hour
        assert (await client.get("/", allow_redirects=False)).status == 200
        clock.ahead = 3610.0  # the session's hour is over; the cookie itself would still be sent
        assert (await client.get("/", allow_redirects=False)).status == 303
    finally:
        await client.close()


async def test_web_review_moderator_sees_and_acts_only_in_their_guild(site):
    client, repo, svc, front, a, b = site
    csrf = await sign_in(client, repo, MOD_A)
    queue = await (await client.get("/")).text()
    assert f'data-case="{a.case_id}"' in queue and "a red square" in queue and "nsfw 0.91" in queue
    assert f'data-case="{b.case_id}"' not in queue and "a blue circle" not in queue
    api = await (await client.get("/api/queue")).json()
    assert [row["case_id"] for row in api] == [a.case_id]
    for path in (f"/case/{b.case_id}", f"/image/{b.image_ids[0]}", f"/settings/{GUILD_B}", f"/user/{GUILD_B}/77",
                 f"/?guild={GUILD_B}", f"/audit?guild={GUILD_B}", f"/blocklist?guild={GUILD_B}",
                 f"/dashboard?guild={GUILD_B}"):
        assert (await client.get(path)).status == 403, path
    for path, data in ((f"/case/{b.case_id}/decide", {"action": "remove"}),
                       (f"/case/{b.case_id}/ban", {"duration": "7d", "reason": "x"}),
                       (f"/case/{b.case_id}/unblock", {}), ("/bulk", {"action": "remove", "case": [a.case_id,
                                                                                                    b.case_id]})):
        r = await client.post(path, data={"csrf": csrf, **data})
        assert r.status == 403, path
    assert (await repo.get_case(b.case_id)).status == "open" and (await repo.get_case(a.case_id)).status == "open"
    image = await client.get(f"/image/{a.image_ids[0]}")
    assert image.status == 200 and image.headers["Content-Type"] == "image/png"
    assert "no-store" in image.headers["Cache-Control"]


async def test_web_review_bad_input_and_unknown_ids(site):
    client, repo, svc, front, a, b = site
    csrf = await sign_in(client, repo, ADMIN_A)
    huge = "99999999999999999999"  # beyond BIGINT: names nothing (and must not overflow the database)
    for path in ("/case/999999", "/image/999999", f"/case/{huge}", f"/image/{huge}", f"/user/{GUILD_A}/{huge}",
                 f"/?guild={huge}", f"/audit?case={huge}"):
        assert (await client.get(path)).status == 404, path
    assert (await client.post(f"/case/{huge}/decide", data={"csrf": csrf, "action": "approve"})).status == 404
    assert (await client.post("/case/999999/decide", data={"csrf": csrf, "action": "approve"})).status == 404
    for path in ("/case/abc", "/image/-1", "/user/2000/abc", "/?age=soon", "/?kind=nonsense", "/?status=x",
                 "/audit?action=explode", "/audit?case=x", "/settings/x", "/?q=" + "x" * 300,
                 "/?age=99999999999999", "/appeals?age=87601", "/case/１２"):
        assert (await client.get(path)).status == 400, path
    bad_posts = [(f"/case/{a.case_id}/decide", {"action": "explode"}), (f"/case/{a.case_id}/decide", {}),
                 (f"/case/{a.case_id}/ban", {"duration": "7d"}),
                 (f"/case/{a.case_id}/ban", {"duration": "soon", "reason": "spam"}),
                 ("/bulk", {"action": "approve"}), ("/bulk", {"action": "nuke", "case": [a.case_id]}),
                 ("/bulk", {"action": "approve", "case": ["x"]}),
                 (f"/settings/{GUILD_A}", {"key": "nonsense", "value": "1"}),
                 (f"/settings/{GUILD_A}", {"key": "daily_quota", "value": "lots"}),
                 (f"/settings/{GUILD_A}", {"key": "daily_quota", "value": ""})]
    for path, data in bad_posts:
        r = await client.post(path, data={"csrf": csrf, **data})
        assert r.status == 400, (path, data, r.status)
    no_csrf = await client.post(f"/case/{a.case_id}/decide", data={"action": "remove"})
    wrong_csrf = await client.post(f"/case/{a.case_id}/decide", data={"action": "remove", "csrf": "forged"})
    assert no_csrf.status == 403 and wrong_csrf.status == 403
    assert (await repo.get_case(a.case_id)).status == "open"
    assert (await repo.audit_log(None)) == [] and front.updates == []


async def test_web_review_next_stays_on_this_site(site):
    """A sign-in or bulk form's ``next`` is a path here: never a host, however it is disguised."""
    client, repo, svc, front, a, b = site
    token = await SignInLinks(repo).create(MOD_A)
    csrf = CSRF.search(await (await client.get(f"/signin/{token}")).text())[1]
    r = await client.post("/signin", data={"token": token, "csrf": csrf, "next": "/\t/evil.example"},
                          allow_redirects=False)
    assert r.status == 303 and r.headers["Location"] == "/"
    csrf = CSRF.search(await (await client.get("/")).text())[1]
    for bad in ("/\t/evil.example", "/\n/evil.example", "/\\evil.example", "//evil.example", "https://evil.example",
                "/\x7f/evil.example"):
        r = await client.post("/bulk", data={"csrf": csrf, "action": "approve", "case": [a.case_id], "next": bad},
                              allow_redirects=False)
        assert r.status == 303 and r.headers["Location"] == "/", bad
    r = await client.post("/bulk", data={"csrf": csrf, "action": "dismiss", "case": [a.case_id],
                                         "next": "/?kind=auto"}, allow_redirects=False)
    assert r.headers["Location"] == "/?kind=auto"


async def test_web_review_approve_is_the_buttons_action(site):
    client, repo, svc, front, a, b = site
    csrf = await sign_in(client, repo, MOD_A)
    page = await (await client.get(f"/case/{a.case_id}")).text()
    assert all(f"/image/{i}" in page for i in a.image_ids) and "a red square" in page
    r = await client.post(f"/case/{a.case_id}/decide", data={"csrf": csrf, "action": "approve", "reason": "fine"})
    assert r.status == 200 and f"Case #{a.case_id} approved." in await r.text()
    assert (await repo.get_case(a.case_id)).status == "approved"
    assert front.updates[-1][2].status == "approved"  # the review post edited, as the button does
    assert front.refreshed and front.refreshed[-1].generation.id == a.generation_id  # the public message re-rendered
    (action,) = await repo.audit_log([GUILD_A])
    assert (action.action, action.moderator_id, action.reason) == ("approve", MOD_A.user_id, "fine")
    audit = await (await client.get("/audit?action=approve")).text()
    assert f'href="/case/{a.case_id}"' in audit
    csv_text = await (await client.get("/audit.csv")).text()
    assert csv_text.splitlines()[0].startswith("id,at,guild_id") and f",approve,{a.case_id}," in csv_text
    again = await client.post(f"/case/{a.case_id}/decide", data={"csrf": csrf, "action": "remove"})
    assert "already closed" in await again.text() and len(await repo.audit_log(None)) == 1


async def test_web_review_bulk_remove_blocklist_and_unblock(site, tmp_path):
    client, repo, svc, front, a, b = site
    c = await flagged_result(repo, svc, tmp_path, GUILD_A, "a green star", color=120)
    csrf = await sign_in(client, repo, OPERATOR)
    queue = await (await client.get("/?q=green")).text()
    assert f'data-case="{c.case_id}"' in queue and f'data-case="{a.case_id}"' not in queue
    assert f'data-case="{b.case_id}"' in await (await client.get(f"/?q=%23{b.case_id}")).text()
    assert 'data-case=' not in await (await client.get("/?kind=report")).text()
    assert 'data-case=' not in await (await client.get("/?age=1")).text()  # none open for an hour yet
    only_a = await (await client.get(f"/?guild={GUILD_A}")).text()
    assert f'data-case="{a.case_id}"' in only_a and f'data-case="{b.case_id}"' not in only_a
    r = await client.post("/bulk", data={"csrf": csrf, "action": "remove", "case": [a.case_id, c.case_id]})
    assert r.status == 200
    assert {(await repo.get_case(i)).status for i in (a.case_id, c.case_id)} == {"removed"}
    assert (await repo.get_case(b.case_id)).status == "open"
    strikes = await (await client.get(f"/user/{GUILD_A}/77")).text()
    assert "removal" in strikes  # a removed image is a strike for its author
    blocks = await (await client.get("/blocklist")).text()
    assert f"/case/{a.case_id}/unblock" in blocks
    r = await client.post(f"/case/{a.case_id}/unblock", data={"csrf": csrf, "reason": "mistake"})
    assert r.status == 200
    assert "unblock" in [x.action for x in await repo.audit_log(None)]
    dash = await (await client.get("/dashboard")).text()
    assert "<svg" in dash and 'id="open-cases">1<' in dash


async def test_web_review_settings_need_admin_and_ban_from_case(site):
    client, repo, svc, front, a, b = site
    csrf = await sign_in(client, repo, MOD_A)
    assert (await client.get(f"/settings/{GUILD_A}")).status == 403  # as /dalle-admin: Manage Server only
    r = await client.post(f"/settings/{GUILD_A}", data={"csrf": csrf, "key": "daily_quota", "value": "5"})
    assert r.status == 403
    r = await client.post(f"/case/{a.case_id}/ban", data={"csrf": csrf, "duration": "7d", "reason": "spam"})
    assert r.status == 200 and "banned from generating" in await r.text()
    await repo.record_refusal(user_id=77, guild_id=GUILD_A, prompt="a forbidden thing", reason="blocked term")
    user = await (await client.get(f"/user/{GUILD_A}/77")).text()
    assert "ban" in user and "spam" in user
    assert "a red square" in user and f"/image/{a.image_ids[0]}" in user and "a forbidden thing" in user
    client.session.cookie_jar.clear()
    csrf = await sign_in(client, repo, ADMIN_A)
    r = await client.post(f"/settings/{GUILD_A}", data={"csrf": csrf, "key": "daily_quota", "value": "5"})
    assert r.status == 200 and "daily quota per user → 5" in await r.text()
    assert "5" in await (await client.get(f"/settings/{GUILD_A}")).text()
    assert (await repo.get_guild_settings(GUILD_A)).daily_quota == 5
    assert [x.action for x in await repo.audit_log([GUILD_A], action="settings")] == ["settings"]


async def test_web_review_settings_refuse_channel_ids(site):
    """A typed channel id could be another server's: the review channel (and /dalle's channels) are picked in
    Discord, where only this server's channels are offered."""
    client, repo, *_ = site
    csrf = await sign_in(client, repo, ADMIN_A)
    page = await (await client.get(f"/settings/{GUILD_A}")).text()
    assert 'aria-label="review_channel_id"' not in page and "set in Discord" in page
    for key in ("review_channel_id", "channel_ids"):
        r = await client.post(f"/settings/{GUILD_A}", data={"csrf": csrf, "key": key, "value": "3999"})
        assert r.status == 400 and "/dalle-admin settings set" in await r.text(), key
    settings = await repo.get_guild_settings(GUILD_A)
    assert settings.review_channel_id is None and not settings.channel_ids
    assert await repo.audit_log([GUILD_A], action="settings") == []
