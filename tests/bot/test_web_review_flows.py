"""The web page over other front ends' work: a case the terminal bot opened is seen and approved by the operator
signed in with ``python -m bot web link`` (the real command line), and appeals are accepted or rejected through
AppealService as in Discord; on SQLite (the terminal's) and on both databases for the appeal."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

from aiohttp.test_utils import TestClient, TestServer

from bot.config import load_settings
from bot.terminal import run
from bot.web.config import WebConfig
from bot.web.serve import StandAlone
from store.models import ModerationAction, ModerationCase
from tests.bot.webkit import CSRF, GUILD_A, OPERATOR, make_app, make_service, sign_in
from tests.fakes.botkit import rows_of
from tests.fakes.engine import FakeEngine

ROOT = Path(__file__).resolve().parents[2]


async def test_web_review_operator_link_sees_and_approves_a_terminal_case(tmp_path):
    env = {"DATABASE_URL": f"sqlite:///{tmp_path / 'local.db'}", "OUTPUT_DIR": str(tmp_path / "outputs"),
           "RATE_LIMIT_USER": "100 per minute", "DAILY_QUOTA": "0", "DEFAULT_IMAGES": "2"}
    settings = load_settings(env, dotenv_path=None)
    await run(settings, stdin=io.StringIO("/dalle an unsafe cat --seed 3\n"), out=io.StringIO(), engine=FakeEngine())
    child_env = {k: v for k, v in os.environ.items() if not k.startswith(("DALLE_", "DISCORD_", "DATABASE_", "WEB_"))}
    child_env.update({"PYTHONPATH": str(ROOT), "DALLE_MODE": "local", **env,
                      "WEB_BASE_URL": "http://127.0.0.1:8099"})
    out = subprocess.run([sys.executable, "-m", "bot", "web", "link"], cwd=tmp_path, env=child_env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    link = out.stdout.strip()
    assert link.startswith("http://127.0.0.1:8099/signin/") and "one use, valid 10 minutes" in out.stderr
    token = link.rsplit("/", 1)[1]

    page = StandAlone(settings, WebConfig(secret_key="k" * 40))
    client = TestClient(TestServer(await page.open()))
    await client.start_server()
    try:
        csrf = CSRF.search(await (await client.get(f"/signin/{token}")).text())[1]
        assert (await client.post("/signin", data={"token": token, "csrf": csrf}, allow_redirects=False)).status == 303
        queue = await (await client.get("/")).text()
        [case] = await rows_of(page.repo, ModerationCase)
        assert f'data-case="{case.id}"' in queue and "an unsafe cat" in queue
        csrf = CSRF.search(queue)[1]
        r = await client.post(f"/case/{case.id}/decide", data={"csrf": csrf, "action": "approve"})
        assert f"Case #{case.id} approved." in await r.text()
        [action] = await rows_of(page.repo, ModerationAction)
        assert (action.action, action.moderator_id) == ("approve", 1)
        out = io.StringIO()  # the terminal sees the decision
        await run(settings, stdin=io.StringIO(f"/case {case.id}\n"), out=out, engine=FakeEngine())
        assert f"case {case.id} (approved, auto)" in out.getvalue()
    finally:
        await client.close()
        await page.close()


async def test_web_review_appeals_accept_and_reject(repo, tmp_path):
    svc, front = make_service(repo, tmp_path)
    await repo.ban_in_guild(GUILD_A, 71, 9, reason="spam", expires_at=None)
    await svc.appeals.appeal(71, GUILD_A, "it was my brother")
    await svc.appeals.appeal(72, GUILD_A, "please")
    client = TestClient(TestServer(make_app(svc)))
    await client.start_server()
    try:
        csrf = await sign_in(client, repo, OPERATOR)
        page = await (await client.get("/appeals")).text()
        cases = sorted((c for c in await rows_of(repo, ModerationCase) if c.source == "appeal"), key=lambda c: c.id)
        assert len(cases) == 2 and all(f'data-case="{c.id}"' in page for c in cases)
        assert "it was my brother" in page and "act-accept" in page and "act-approve" not in page
        r = await client.post(f"/case/{cases[0].id}/decide", data={"csrf": csrf, "action": "approve"})
        assert r.status == 400 and "accept or reject" in await r.text()  # an appeal is not approved
        r = await client.post(f"/case/{cases[0].id}/decide", data={"csrf": csrf, "action": "accept"})
        assert r.status == 200
        r = await client.post(f"/case/{cases[1].id}/decide", data={"csrf": csrf, "action": "reject", "reason": "no"})
        assert r.status == 200
        assert [(await repo.get_case(c.id)).status for c in cases] == ["accepted", "rejected"]
        assert await repo.active_guild_ban(GUILD_A, 71) is None  # accepting lifted the ban
        assert {a.action for a in await repo.audit_log(None)} >= {"accept", "reject"}
    finally:
        await client.close()
