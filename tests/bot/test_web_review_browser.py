"""The moderators' web page in a real browser (Playwright driving Debian's /usr/bin/chromium, never a downloaded
one) against the bot process serving it (WEB_PORT) and the fake Discord: a moderator gets a one-time link from
``/dalle-mod web``, signs in, sees the cases the Discord bot opened, approves one with the keyboard and removes
another, and the review posts, the public messages and the audit log change; another guild's case stays out of
reach (by URL too); a reused link and a form without its CSRF token are refused. Screenshots are kept in the
test's tmp dir."""

from __future__ import annotations

import asyncio
import re
import shutil
import socket
from pathlib import Path

import pytest

from bench.fakes.discord import MEMBER_PERMISSIONS
from store.models import ModerationAction, ModerationCase
from tests.bot.webkit import GUILD_B, flagged_result
from tests.fakes.botkit import make_repo, rows_of
from tests.fakes.discordkit import CHANNEL, discord_settings, start_bot
from tests.fakes.engine import FakeEngine

CHROMIUM = Path("/usr/bin/chromium")
REVIEW = 3100
MANAGE_MESSAGES = str(int(MEMBER_PERMISSIONS) | 1 << 13)

pytestmark = pytest.mark.skipif(not CHROMIUM.exists() or shutil.which("chromium") is None,
                                reason="Debian's chromium is not installed (.ci/run installs it)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def flagged_post(fake, prompt: str, user_id: int, seen: int) -> dict:
    """Send ``/dalle`` with an unsafe prompt; the public message once the ``seen``+1-th result is posted."""
    await fake.slash("dalle", {"prompt": prompt, "images": 2, "seed": 3}, user_id=user_id)
    for _ in range(400):
        posted = [m for m in fake.messages.values() if m["attachments"] and m["channel_id"] == str(CHANNEL)]
        if len(posted) > seen:
            return posted[seen]
        await asyncio.sleep(0.05)
    raise AssertionError("no result posted")


async def link_from_discord(fake) -> str:
    rec = await fake.slash("dalle-mod", {}, subcommand="web", user_id=60, permissions=MANAGE_MESSAGES)
    edit = await fake.wait_for(lambda c: c.method == "PATCH" and rec.token in c.path)
    return re.search(r"http://\S+/signin/\S+", edit.json["content"])[0]


async def test_web_review_browser_sign_in_approve_remove_audit(fake, bot_db_url, tmp_path, monkeypatch):
    from playwright.async_api import async_playwright

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    monkeypatch.setenv("WEB_PORT", str(port))
    monkeypatch.setenv("WEB_BASE_URL", base)
    monkeypatch.setenv("WEB_SECRET_KEY", "s" * 48)
    repo = make_repo(bot_db_url)
    run = await start_bot(discord_settings(tmp_path, REVIEW_CHANNEL_ID=str(REVIEW)), FakeEngine(), repo)
    shots = tmp_path / "screenshots"
    shots.mkdir()
    try:
        first = await flagged_post(fake, "an unsafe cat", 11, 0)
        second = await flagged_post(fake, "an unsafe dog", 12, 1)
        for _ in range(200):
            if len([c for c in fake.calls if c.method == "POST" and c.path == f"/channels/{REVIEW}/messages"]) >= 2:
                break
            await asyncio.sleep(0.05)
        cases = sorted(await rows_of(repo, ModerationCase), key=lambda c: c.id)
        assert [c.guild_id for c in cases] == [2000, 2000]
        other = await flagged_result(repo, run.bot.service, tmp_path, GUILD_B, "another server's image")
        link = await link_from_discord(fake)
        assert link.startswith(base + "/signin/")

        async with async_playwright() as pw:
            browser = await pw.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
            try:
                context = await browser.new_context(viewport={"width": 1280, "height": 800})
                page = await context.new_page()
                await page.goto(link)
                await page.click("#signin")
                await page.wait_for_selector("#queue")
                rows = page.locator("#queue tbody tr[data-case]")
                assert await rows.count() == 2
                assert await page.locator(f'tr[data-case="{other.case_id}"]').count() == 0
                assert "an unsafe cat" in await page.inner_text("#queue")
                await page.screenshot(path=str(shots / "queue.png"), full_page=True)

                # the keyboard: the first (oldest) case is selected; "a" approves it
                await page.keyboard.press("a")
                await page.wait_for_selector(f"text=Case #{cases[0].id} approved.")
                # the mouse: Remove on the other
                await page.click(f'tr[data-case="{cases[1].id}"] form.act-remove button')
                await page.wait_for_selector(f"text=Case #{cases[1].id} removed.")
                await page.screenshot(path=str(shots / "after.png"), full_page=True)
                assert (await repo.get_case(cases[0].id)).status == "approved"
                assert (await repo.get_case(cases[1].id)).status == "removed"

                # Discord shows it as the buttons would: review posts edited, the removed image's public message
                # re-rendered without it
                review_edits = [c for c in fake.calls if c.method == "PATCH"
                                and c.path.startswith(f"/channels/{REVIEW}/messages/")]
                assert any("approve by <@60>" in str(c.json["embeds"][0]["fields"]) for c in review_edits)
                assert any("remove by <@60>" in str(c.json["embeds"][0]["fields"]) for c in review_edits)
                removed = await repo.get_case(cases[1].id)
                public_edit = await fake.wait_for(lambda c: c.method == "PATCH" and c.path ==
                                                  f"/channels/{CHANNEL}/messages/{second['id']}")
                assert not any(f"image{removed.image_id}" in name for name in public_edit.files)
                assert first["id"] != second["id"]

                await page.goto(base + "/audit")
                audit = await page.inner_text("#audit")
                assert "approve" in audit and "remove" in audit
                await page.screenshot(path=str(shots / "audit.png"), full_page=True)
                actions = {(a.action, a.moderator_id) for a in await rows_of(repo, ModerationAction)}
                assert {("approve", 60), ("remove", 60)} <= actions

                # another server's case, by URL: refused, nothing changed
                response = await page.goto(f"{base}/case/{other.case_id}")
                assert response.status == 403
                response = await page.goto(f"{base}/image/{other.image_ids[0]}")
                assert response.status == 403
                # a form posted without its CSRF token (same cookies): refused
                forged = await page.request.post(f"{base}/case/{other.case_id}/decide", form={"action": "remove"})
                assert forged.status == 403
                assert (await repo.get_case(other.case_id)).status == "open"

                # the link again, in another browser: refused
                stranger = await browser.new_context()
                page2 = await stranger.new_page()
                await page2.goto(link)
                await page2.click("#signin")
                assert "already used or expired" in await page2.inner_text("main")
                await page2.goto(base + "/")
                assert "/signin" in page2.url
                await stranger.close()
            finally:
                await browser.close()
    finally:
        await run.stop()
        await repo.close()
