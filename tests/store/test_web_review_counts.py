"""The moderators' dashboard counts per UTC day in the database (GROUP BY), on SQLite and PostgreSQL: right across
midnight and the window's edge, scoped by guild, and never one row per generation brought into Python."""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import event

from store.repository import NewImage, Repository


async def test_web_review_daily_counts_grouped_in_sql(migrated_url):
    clock = [datetime(2026, 12, 7, 12, 0, tzinfo=UTC)]
    repo = Repository.from_url(migrated_url, clock=lambda: clock[0])
    statements: list[str] = []

    def seen(conn, cursor, statement, *args):
        statements.append(statement)

    try:
        made = []
        for when, guild in ((datetime(2026, 11, 23, 23, 59), 2000),  # before the 14-day window
                            (datetime(2026, 11, 24, 0, 0), 2000),  # the window's first day
                            (datetime(2026, 12, 6, 23, 59, 59), 2000), (datetime(2026, 12, 7, 0, 0), 2000),
                            (datetime(2026, 12, 7, 11, 0), 2000), (datetime(2026, 12, 7, 11, 0), 2001)):
            clock[0] = when.replace(tzinfo=UTC)
            gen = await repo.create_generation(user_id=77, prompt="p", guild_id=guild, channel_id=3000, seed=1,
                                               checkpoint_id="demo-1")
            [image] = await repo.add_images(gen.id, [NewImage(index=0, tokens=[1], rank=0, clip_score=0.3,
                                                              safety_scores={}, flagged=True, hidden=True)])
            await repo.record_feedback(image.id, 5, "report", reason="nsfw")
            made.append(gen.id)
        clock[0] = datetime(2026, 12, 7, 12, 0, tzinfo=UTC)
        event.listen(repo._engine.sync_engine, "before_cursor_execute", seen)
        counts = await repo.daily_counts([2000])
        assert counts.days[0] == "2026-11-24" and counts.days[-1] == "2026-12-07" and len(counts.days) == 14
        expected = [1] + [0] * 11 + [1, 2]
        assert counts.requests == expected and counts.flags == expected and counts.reports == expected
        assert (await repo.daily_counts(None)).requests[-1] == 3
        assert (await repo.daily_counts([])).requests == [0] * 14
        grouped = [s for s in statements if "GROUP BY" in s.upper() and "count(" in s.lower()]
        assert sum("JOIN generations" in s or "FROM generations" in s for s in grouped) == 9  # 3 series × 3 calls
        assert not any(" ".join(s.split()).startswith("SELECT generations.queued_at") for s in statements)
    finally:
        await repo.close()
