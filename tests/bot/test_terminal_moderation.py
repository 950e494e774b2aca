"""The terminal front end's moderator side: the operator lists and decides cases and bans users, through the same
ModerationService as Discord's moderators (audited the same way)."""

from __future__ import annotations

import io
import re

from bot.config import load_settings
from bot.terminal import run
from store.models import ModerationAction, ModerationCase
from tests.fakes.botkit import make_repo, rows_of
from tests.fakes.engine import FakeEngine


async def test_terminal_moderation_cases_decisions_and_bans(tmp_path):
    settings = load_settings({"DATABASE_URL": f"sqlite:///{tmp_path / 'local.db'}",
                              "OUTPUT_DIR": str(tmp_path / "outputs"), "RATE_LIMIT_USER": "100 per minute",
                              "DAILY_QUOTA": "0", "DEFAULT_IMAGES": "2"}, dotenv_path=None)
    await run(settings, stdin=io.StringIO("/dalle an unsafe cat --seed 3\n"), out=io.StringIO(), engine=FakeEngine())
    out = io.StringIO()
    await run(settings, stdin=io.StringIO("/help\n/cases\n"), out=out, engine=FakeEngine())
    text = out.getvalue()
    assert "/case <id> [approve|remove|dismiss [reason...]]" in text
    [case_id] = [int(x) for x in re.findall(r"case (\d+): auto", text)]

    script = "\n".join([f"/case {case_id}", f"/case {case_id} remove not for this server", f"/case {case_id} approve",
                        "/case 999", f"/case {case_id} frobnicate", "/ban 42 spamming", "/unban 42", "/ban 43",
                        "/cases"]) + "\n"
    out = io.StringIO()
    await run(settings, stdin=io.StringIO(script), out=out, engine=FakeEngine())
    text = out.getvalue()
    assert f"case {case_id} (open, auto): 'an unsafe cat' by user 1, seed 3" in text and "nsfw" in text
    assert f"Case #{case_id} removed." in text and "already closed (removed); nothing changed" in text
    assert "error: Case #999 does not exist." in text and "usage: /case <id> [approve" in text
    assert "user 42 is banned everywhere: spamming" in text and "user 42 may generate again." in text
    assert "error: a ban needs a reason" in text and text.rstrip().endswith("No open cases.")

    repo = make_repo(settings.database_url)
    try:
        [case] = await rows_of(repo, ModerationCase)
        assert case.status == "removed" and (await repo.get_image(case.image_id)).hidden
        actions = [(a.action, a.moderator_id, a.target_user_id, a.reason)
                   for a in await rows_of(repo, ModerationAction)]
        assert actions == [("remove", 1, None, "not for this server"), ("ban", 1, 42, "spamming"),
                           ("unban", 1, 42, None)]
        assert (await repo.get_user_state(42)).banned is False
    finally:
        await repo.close()
