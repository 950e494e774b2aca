"""The terminal's ``/admin``: the operator changes a guild's settings and filter terms through the same AdminService
as ``/dalle-admin`` (checked, audited under the terminal user, bad input changes nothing)."""

from __future__ import annotations

import io

from bot.config import load_settings
from bot.terminal import run
from store.models import ModerationAction
from tests.fakes.botkit import make_repo, rows_of
from tests.fakes.engine import FakeEngine


async def test_terminal_admin_settings_and_filter_terms(tmp_path):
    settings = load_settings({"DATABASE_URL": f"sqlite:///{tmp_path / 'local.db'}",
                              "OUTPUT_DIR": str(tmp_path / "outputs")}, dotenv_path=None)
    script = "\n".join([
        "/help", "/admin 2000 set max_images=4 private_results=no rate_limit_user=2_per_minute add_channel=3001",
        "/admin 2000 set max_images=lots", "/admin 2000 set karma=3", "/admin 2000 filter add cabbage",
        "/admin 2000 filter allow child porn", "/admin 2000 filter list", "/admin 2000 reset max_images",
        "/admin 2000 settings", "/admin model", "/admin nonsense"]) + "\n"
    out = io.StringIO()
    await run(settings, stdin=io.StringIO(script), out=out, engine=FakeEngine())
    text = out.getvalue()
    assert "/admin <guild-id> settings | set key=value…" in text
    assert ("Changed: rate limit per user → 2 per minute, images per request at most → 4, private results allowed → "
            "False, /dalle works in <#3001>.") in text
    assert "error: max_images must be a whole number" in text and "error: not a setting: 'karma=3'" in text
    assert "“cabbage” is now blocked in this server's prompts." in text
    assert "error: “child porn” touches the minors category, which no server can allow." in text
    assert "blocked: cabbage\nallowed: none" in text and "images per request at most: back to the default." in text
    assert "channels where /dalle works: [3001]\n" in text and "images per request at most: 9 (default)" in text
    assert "AutoMod: not available: not available in this front end" in text
    assert "model: checkpoint " in text and "error: usage: /admin <guild-id>" in text

    repo = make_repo(settings.database_url)
    try:
        gs = await repo.get_guild_settings(2000)
        assert (gs.max_images, gs.private_results, gs.rate_limit_user, gs.channel_ids, gs.block_list) == (
            None, False, "2 per minute", [3001], ["cabbage"])
        assert [(a.action, a.moderator_id, a.guild_id) for a in await rows_of(repo, ModerationAction)] == [
            ("settings", 1, 2000), ("filter", 1, 2000), ("settings", 1, 2000)]
    finally:
        await repo.close()
