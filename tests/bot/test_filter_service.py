"""The service and the prompt filter: the encoder is loaded once, at start-up, off the event loop, and every check
runs off the loop too (a check reaching the encoder costs milliseconds)."""

from __future__ import annotations

import threading

from bot.filters import FilterDecision, PromptFilter
from bot.service import GenerationService
from tests.fakes.botkit import make_repo
from tests.fakes.engine import FakeEngine


class RecordingFilter(PromptFilter):
    """The real filter, recording the thread each warm-up and check ran on."""

    def __post_init__(self) -> None:
        super().__post_init__()
        self.threads: list[tuple[str, int]] = []

    def warm(self) -> None:
        self.threads.append(("warm", threading.get_ident()))
        super().warm()

    def check(self, prompt, policy=None) -> FilterDecision:
        self.threads.append(("check", threading.get_ident()))
        return super().check(prompt, policy)


async def test_the_filter_warms_at_start_and_checks_off_the_event_loop(bot_db_url, tmp_path):
    repo = make_repo(bot_db_url)
    engine = FakeEngine()
    flt = RecordingFilter()
    svc = GenerationService(repo, engine, None, output_dir=tmp_path / "o", prompt_filter=flt)
    loop_thread = threading.get_ident()
    try:
        await svc.start()
        assert [k for k, _ in flt.threads] == ["warm"]
        refused = await svc.submit(user_id=1, prompt="a woman without any clothes")
        assert not refused.ok and refused.category == "sexual"
        assert (await svc.submit(user_id=1, prompt="a red fox in the snow")).ok
        assert [k for k, _ in flt.threads] == ["warm", "check", "check"]
        assert all(t != loop_thread for _, t in flt.threads), flt.threads
    finally:
        await svc.stop(grace=1)
        await engine.close()
        await repo.close()
