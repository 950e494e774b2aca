"""The terminal front end and strikes: blocked prompts put the terminal user on a cooldown that a restart keeps, and
the operator's moderator side (a user's record, strikes reset, appeal decisions, purge), audited like Discord's."""

from __future__ import annotations

import io
import re
from datetime import timedelta

from bot.config import load_settings
from bot.terminal import run
from store.models import ModerationAction
from store.repository import NewImage
from tests.fakes.botkit import make_repo, rows_of
from tests.fakes.engine import FakeEngine


async def session(settings, *lines: str) -> str:
    out = io.StringIO()
    await run(settings, stdin=io.StringIO("\n".join(lines) + "\n"), out=out, engine=FakeEngine())
    return out.getvalue()


async def test_terminal_strikes_moderation_cooldown_restart_and_operator_commands(tmp_path):
    settings = load_settings({"DATABASE_URL": f"sqlite:///{tmp_path / 'local.db'}",
                              "OUTPUT_DIR": str(tmp_path / "outputs"), "RATE_LIMIT_USER": "100 per minute",
                              "DAILY_QUOTA": "0", "DEFAULT_IMAGES": "1"}, dotenv_path=None)
    text = await session(settings, "n.u.d.e beach", "f u c k", "n.u.d.e party", "a cat")
    assert "You're on a cooldown for 10 min after 3 strikes." in text
    assert text.rstrip().endswith("refused: You're on a cooldown after blocked prompts. Try again in 10 min.")

    text = await session(settings, "/help", "a cat", "/user 1", "/user x", "/strikes 1", "/strikes reset 1",
                         "/user 1", "a cat")
    assert "/strikes reset <user-id> [guild-id]" in text and "/case <id> accept|reject" in text
    assert "refused: You're on a cooldown after blocked prompts." in text  # the restart kept it
    assert "user 1: 0 generation(s), 5 refusal(s), 3 live strike(s) (3 ever), 0 report(s) made" in text
    assert "usage: /user <user-id> [guild-id]" in text and "usage: /strikes reset <user-id> [guild-id]" in text
    assert "<@1>: 3 strike(s) cleared and 1 cooldown(s) lifted." in text
    assert "5 refusal(s), 0 live strike(s)" in text and re.search(r"\[\d+\] queued at position", text)

    repo = make_repo(settings.database_url)
    try:
        appeal = await repo.open_appeal(71, 2000, "let me back", period=timedelta(days=7))
        gen = await repo.create_generation(user_id=71, prompt="a fish", guild_id=2000, channel_id=3000)
        await repo.add_images(gen.id, [NewImage(index=0, tokens=[1])])
        await repo.mark_delivered(gen.id, result_message_id=5555)
    finally:
        await repo.close()
    text = await session(settings, f"/case {appeal.id} accept fair enough", f"/case {appeal.id} reject",
                         "/purge 71", "/purge 71 2000", "/user 71 2000")
    assert f"Appeal #{appeal.id} accepted" in text and "already closed (accepted)" in text
    assert "usage: /purge <user-id> <guild-id>" in text
    assert "<@71>: 1 image(s) taken down from 1 public message(s)." in text
    assert f"case {appeal.id}: appeal, accepted" in text

    repo = make_repo(settings.database_url)
    try:
        audit = [(a.action, a.moderator_id, a.guild_id, a.target_user_id)
                 for a in await rows_of(repo, ModerationAction)]
        assert audit == [("cooldown", 0, None, 1), ("strikes_reset", 1, None, 1), ("accept", 1, 2000, 71),
                         ("purge", 1, 2000, 71)]
        assert (await repo.get_image((await repo.get_generation(gen.id)).images[0].id)).hidden
    finally:
        await repo.close()
