"""The terminal operator's side of the image-hash blocklist: ``/block`` blocks a case's image in every guild, the
same picture drawn again is withheld with a ``blocklist`` case, ``/blocklist`` lists and ``/unblock`` (with the
near-copy's case) lifts it; bad input changes nothing; every step is audited."""

from __future__ import annotations

import io
import re

from bot.config import load_settings
from bot.terminal import run
from store.models import ModerationAction, ModerationCase
from tests.fakes.botkit import make_repo, rows_of
from tests.fakes.engine import FakeEngine


async def terminal(settings, *lines: str) -> str:
    out = io.StringIO()
    await run(settings, stdin=io.StringIO("\n".join(lines) + "\n"), out=out, engine=FakeEngine(patterned=True))
    return out.getvalue()


async def test_terminal_moderation_block_withholds_and_unblock_lifts(tmp_path):
    settings = load_settings({"DATABASE_URL": f"sqlite:///{tmp_path / 'local.db'}",
                              "OUTPUT_DIR": str(tmp_path / "outputs"), "RATE_LIMIT_USER": "100 per minute",
                              "DAILY_QUOTA": "0", "DEFAULT_IMAGES": "2"}, dotenv_path=None)
    text = await terminal(settings, "/dalle a checkered cat --seed 3")
    image_id = int(re.findall(r"image (\d+)  rank 0", text)[0])
    text = await terminal(settings, f"/feedback {image_id} report nsfw", "/cases", "/help")
    [case_id] = [int(x) for x in re.findall(r"case (\d+): report", text)]
    assert "/unblock <case-id>" in text

    text = await terminal(settings, "/block", "/block 999", f"/block {case_id} known bad", f"/block {case_id}",
                          "/blocklist", "/dalle a tiled dog --seed 3")
    assert "usage: /block <id>" in text and "error: Case #999 does not exist." in text
    assert f"(case #{case_id}) is blocked in every server" in text and "already blocked in every server" in text
    assert f"every server · case #{case_id} · by <@1>" in text and "known bad" in text
    assert text.count("WITHHELD (near-duplicate of a blocked image)") == 1

    text = await terminal(settings, "/cases")
    [blocked_case] = [int(x) for x in re.findall(r"case (\d+): blocklist", text)]
    text = await terminal(settings, f"/unblock {blocked_case} harmless", "/blocklist", f"/unblock {blocked_case}",
                          "/dalle a tiled bird --seed 3")
    assert "Unblocked 1 image hash(es)" in text and "No image hashes are blocked." in text
    assert "nothing changed" in text and "WITHHELD" not in text

    repo = make_repo(settings.database_url)
    try:
        actions = [(a.action, a.moderator_id, a.guild_id, a.case_id) for a in await rows_of(repo, ModerationAction)]
        assert actions == [("block", 1, None, case_id), ("unblock", 1, None, blocked_case)]
        assert {c.source for c in await rows_of(repo, ModerationCase)} == {"report", "blocklist"}
        assert await repo.active_blocks(None) == []
    finally:
        await repo.close()
