"""The terminal front end's ``/privacy``: the local user opts out, exports their data to a file and deletes it
after a confirmation, through the same PrivacyService as ``/dalle-privacy``."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

from bot.config import load_settings
from bot.terminal import TERMINAL_USER_ID, run
from store.models import Generation
from tests.fakes.botkit import make_repo, rows_of
from tests.fakes.engine import FakeEngine


async def test_terminal_privacy_optout_export_delete(tmp_path):
    settings = load_settings({"DATABASE_URL": f"sqlite:///{tmp_path / 'local.db'}",
                              "OUTPUT_DIR": str(tmp_path / "outputs"), "RATE_LIMIT_USER": "100 per minute",
                              "DAILY_QUOTA": "0", "DEFAULT_IMAGES": "2"}, dotenv_path=None)
    await run(settings, stdin=io.StringIO("/dalle a quiet harbour --seed 3\n"), out=io.StringIO(), engine=FakeEngine())
    pngs = list((tmp_path / "outputs").rglob("*.png"))
    assert len(pngs) == 2

    script = "/help\n/privacy optout\n/privacy export\n/privacy delete\n/privacy frobnicate\n"
    out = io.StringIO()
    await run(settings, stdin=io.StringIO(script), out=out, engine=FakeEngine())
    text = out.getvalue()
    assert "/privacy optout|optin|export|delete [confirm]" in text and "You are opted out" in text
    [path] = re.findall(r"written to (\S+\.json)", text)
    doc = json.loads(Path(path).read_text())
    assert doc["user_id"] == str(TERMINAL_USER_ID) and doc["generations"][0]["prompt"] == "a quiet harbour"
    assert "This deletes 1 generation(s) with 2 image(s)" in text and "Type /privacy delete confirm" in text
    assert "usage: /privacy optout|optin|export|delete [confirm]" in text
    repo = make_repo(settings.database_url)
    try:
        assert len(await rows_of(repo, Generation)) == 1  # nothing deleted without the confirmation
        assert (await repo.get_user_state(TERMINAL_USER_ID)).opted_out
        out = io.StringIO()
        await run(settings, stdin=io.StringIO("/privacy delete confirm\n"), out=out, engine=FakeEngine())
        assert "Deleted 1 generation(s) with 2 image(s)" in out.getvalue()
        assert await rows_of(repo, Generation) == [] and not any(p.exists() for p in pngs)
    finally:
        await repo.close()
