"""Ownership in the service, whatever the front end: another user's private generation cannot be rerolled or
varied (a private result is shown to its owner alone, but a button's custom_id or a terminal ``/reroll <id>`` names
any generation), and a feedback note is capped by the service, not only by the Discord form."""

from __future__ import annotations

from bot.outcome import MAX_FEEDBACK_NOTE
from bot.service import cap_note
from store.models import Feedback, Generation, Refusal
from tests.fakes.botkit import rows_of


async def test_reroll_and_variation_of_another_users_private_generation_are_refused(running_service):
    svc, repo, engine, pub = running_service
    mine = await svc.submit(user_id=5, prompt="my secret garden", n=2, seed=11, private=True)
    [o] = await pub.wait_for(1)
    image = o.images[1].id

    for refused in (await svc.reroll(mine.generation_id, user_id=6), await svc.variation(image, user_id=6)):
        assert not refused.ok and refused.category == "private" and refused.generation_id is None
        assert "private" in refused.message and "only the user who made it" in refused.message
    assert [g.id for g in await rows_of(repo, Generation)] == [mine.generation_id]  # nothing was queued
    assert await rows_of(repo, Refusal) == []  # and the private prompt was not copied under user 6

    rr = await svc.reroll(mine.generation_id, user_id=5)  # the owner may, and the result stays private
    var = await svc.variation(image, user_id=5)
    assert rr.ok and var.ok
    await pub.wait_for(3)
    for gid in (rr.generation_id, var.generation_id):
        gen = await repo.get_generation(gid)
        assert gen.private and gen.user_id == 5 and gen.parent_generation_id == mine.generation_id


async def test_a_public_generation_stays_open_to_everyone(running_service):
    svc, repo, engine, pub = running_service
    public = await svc.submit(user_id=5, prompt="a public square", n=2, seed=3)
    [o] = await pub.wait_for(1)
    assert (await svc.reroll(public.generation_id, user_id=6)).ok
    assert (await svc.variation(o.images[0].id, user_id=6)).ok
    await pub.wait_for(3)


async def test_feedback_notes_are_capped_by_the_service(running_service):
    svc, repo, engine, pub = running_service
    await svc.submit(user_id=7, prompt="a yellow star", n=2, seed=3)
    [o] = await pub.wait_for(1)
    first, second = (im.id for im in o.images)
    long_note = "x" * 5000  # what a front end without the form's limit (the terminal, a script) could send
    rep = await svc.feedback(first, 9, "report", reason="other", note=long_note)
    assert rep.ok
    assert (await svc.feedback(second, 9, "report", reason="bias", note="   ")).ok
    notes = {r.image_id: r.note for r in await rows_of(repo, Feedback)}
    assert len(notes[first]) == MAX_FEEDBACK_NOTE and notes[first].endswith("…")
    assert notes[second] is None
    case = await repo.get_case(rep.case_id)
    assert len(case.reason) <= MAX_FEEDBACK_NOTE + len("other: ")


def test_cap_note():
    assert cap_note(None) is None and cap_note("  ") is None
    assert cap_note("  all the same  ") == "all the same"
    assert cap_note("y" * MAX_FEEDBACK_NOTE) == "y" * MAX_FEEDBACK_NOTE
    capped = cap_note("word " * 200)
    assert len(capped) <= MAX_FEEDBACK_NOTE and capped.endswith("word…")
