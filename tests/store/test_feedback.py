"""Votes and reports (one per user per image, also under concurrency) and the export for training."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import numpy as np
import pytest
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from store.models import Feedback
from store.repository import NotFound


async def test_feedback_votes_upsert_and_reports(repo, gen_with_images):
    _gen, rows, _ = await gen_with_images()
    image = rows[0].id
    up = await repo.record_feedback(image, 100, "up")
    down = await repo.record_feedback(image, 100, "down", reason="quality", note="blurry")
    assert up.id == down.id and down.kind == "down" and down.reason == "quality"
    await repo.record_feedback(image, 101, "up")
    rep = await repo.record_feedback(image, 100, "report", reason="nsfw")
    rep2 = await repo.record_feedback(image, 100, "report", reason="bias", note="again")
    assert rep.id == rep2.id and rep2.reason == "bias" and rep.id != up.id
    async with repo.sessions() as s:  # one vote per user, one report per user
        stored = (await s.execute(select(Feedback.user_id, Feedback.kind).where(Feedback.image_id == image))).all()
    assert sorted(stored) == [(100, "down"), (100, "report"), (101, "up")]
    with pytest.raises(ValueError, match="kind"):
        await repo.record_feedback(image, 1, "meh")
    with pytest.raises(ValueError, match="reason"):
        await repo.record_feedback(image, 1, "down", reason="ugly")
    with pytest.raises(NotFound):
        await repo.record_feedback(10**9, 1, "up")


async def test_one_vote_per_user_enforced_by_database(repo, gen_with_images):
    _gen, rows, _ = await gen_with_images(n=1)
    async with repo.sessions.begin() as s:
        s.add(Feedback(image_id=rows[0].id, user_id=5, kind="up"))
    with pytest.raises(IntegrityError):
        async with repo.sessions.begin() as s:
            s.add(Feedback(image_id=rows[0].id, user_id=5, kind="down"))


async def test_concurrent_votes_leave_one_row(repo, gen_with_images):
    _gen, rows, _ = await gen_with_images(n=1)
    kinds = ["up", "down"] * 10
    await asyncio.gather(*(repo.record_feedback(rows[0].id, 7, k) for k in kinds))
    async with repo.sessions() as s:
        votes = (await s.execute(select(Feedback).where(Feedback.user_id == 7))).scalars().all()
    assert len(votes) == 1 and votes[0].kind in ("up", "down")


async def test_feedback_export_for_training(repo, gen_with_images):
    _gen, rows, images = await gen_with_images(prompt="a blue circle")
    _gen2, rows2, _ = await gen_with_images(user_id=2, prompt="opted out prompt")
    await repo.record_feedback(rows[0].id, 10, "up")
    await repo.record_feedback(rows[1].id, 11, "down", reason="bias")
    await repo.record_feedback(rows[1].id, 12, "report", reason="nsfw")
    await repo.record_feedback(rows2[0].id, 10, "up")  # author 2 opts out below
    await repo.record_feedback(rows[2].id, 13, "up")  # voter 13 opts out below
    await repo.update_user_state(2, opted_out=True)
    await repo.update_user_state(13, opted_out=True)

    records = await repo.feedback_export()
    assert [(r.image_id, r.kind, r.reason) for r in records] == [
        (rows[0].id, "up", None),
        (rows[1].id, "down", "bias"),
        (rows[1].id, "report", "nsfw"),
    ]
    assert records[0].prompt == "a blue circle" and records[0].checkpoint_id == "demo"
    assert records[0].tokens.dtype == np.int16
    assert np.array_equal(records[0].tokens, np.asarray(images[0].tokens))
    votes = await repo.feedback_export(kinds=["up", "down"])
    assert [r.kind for r in votes] == ["up", "down"]
    assert len(await repo.feedback_export(include_opted_out=True)) == 5
    future = datetime.now(UTC) + timedelta(hours=1)
    assert await repo.feedback_export(since=future) == []
