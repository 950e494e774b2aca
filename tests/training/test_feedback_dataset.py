"""The feedback dataset from a seeded store (SQLite and PostgreSQL): consent, deduplication, labels, pairs within
one prompt, removed images as negatives, a stable held-out split, the Parquet files and the manifest, the CLI."""

from __future__ import annotations

import asyncio
import json
import sqlite3

import numpy as np
import pyarrow.parquet as pq
import pytest

from store.repository import DatasetSource, JudgedImage, NewImage, Repository
from training.__main__ import main
from training.feedback import (
    REMOVED_WEIGHT,
    build_dataset,
    content_hash,
    export_feedback,
    label_of,
    split_of,
    write_dataset,
)

MOD = 900
OPTED_OUT_AUTHOR, OPTED_OUT_VOTER = 2, 13


def tokens(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 16384, 16).astype(np.int16)


async def make_gen(repo: Repository, user_id: int, prompt: str, toks: list[np.ndarray | None], checkpoint: str):
    gen = await repo.create_generation(user_id=user_id, prompt=prompt, checkpoint_id=checkpoint, n_images=len(toks))
    rows = await repo.add_images(gen.id, [NewImage(index=i, tokens=t, rank=i) for i, t in enumerate(toks)])
    return [r.id for r in rows]


async def seed(repo: Repository) -> dict[str, int]:
    """A small community's feedback; returns the image ids by role."""
    red = await make_gen(repo, 1, "a red square", [tokens(0), tokens(1), tokens(2)], "ckpt-a")
    red_again = await make_gen(repo, 1, "a red square", [tokens(0)], "ckpt-b")  # the same seed, re-posted
    blue = await make_gen(repo, OPTED_OUT_AUTHOR, "a blue circle", [tokens(3)], "ckpt-a")
    green = await make_gen(repo, 1, "a green triangle", [tokens(4), tokens(5), tokens(6), None], "ckpt-a")
    ids = {"liked": red[0], "disliked": red[1], "removed": red[2], "duplicate": red_again[0], "opted_out": blue[0],
           "dismissed": green[0], "tied": green[1], "green_liked": green[2], "no_tokens": green[3]}
    await repo.record_feedback(ids["liked"], 10, "up")
    await repo.record_feedback(ids["liked"], 11, "up")
    await repo.record_feedback(ids["duplicate"], 12, "up")
    await repo.record_feedback(ids["liked"], OPTED_OUT_VOTER, "down")  # left out: the voter opted out
    await repo.record_feedback(ids["disliked"], 10, "down", reason="bias")
    await repo.record_feedback(ids["removed"], 12, "report", reason="nsfw")
    await repo.record_feedback(ids["removed"], 10, "up")  # a moderator's removal outweighs a vote
    case, _ = await repo.open_case("report", image_id=ids["removed"])
    await repo.add_action(case.id, MOD, "remove", reason="nsfw")
    await repo.record_feedback(ids["opted_out"], 10, "up")  # left out: the author opted out
    await repo.record_feedback(ids["dismissed"], 10, "report", reason="quality")
    case, _ = await repo.open_case("report", image_id=ids["dismissed"])
    await repo.add_action(case.id, MOD, "dismiss")  # a dismissed report does not count
    await repo.record_feedback(ids["tied"], 10, "up")
    await repo.record_feedback(ids["tied"], 11, "down")
    await repo.record_feedback(ids["green_liked"], 11, "up")
    await repo.record_feedback(ids["no_tokens"], 11, "up")  # no tokens: nothing to train on
    await repo.update_user_state(OPTED_OUT_AUTHOR, opted_out=True)
    await repo.update_user_state(OPTED_OUT_VOTER, opted_out=True)
    return ids


async def test_dataset_consent_dedupe_labels_and_pairs(repo):
    ids = await seed(repo)
    source = await repo.dataset_source()
    seen = {i.image_id for i in source.images}
    assert ids["opted_out"] not in seen and ids["no_tokens"] not in seen
    assert source.opted_out_images == 1 and source.opted_out_feedback == 1

    ds = build_dataset(source, holdout=0.0)
    by_image = {i: e for e in ds.unpaired for i in e.image_ids}
    liked = by_image[ids["liked"]]
    assert liked is by_image[ids["duplicate"]] and liked.image_ids == [ids["liked"], ids["duplicate"]]
    assert (liked.up, liked.down, liked.label, liked.weight) == (3, 0, "desirable", 3.0)  # the opted-out 👎 is gone
    assert liked.checkpoint_ids == ["ckpt-a", "ckpt-b"]
    np.testing.assert_array_equal(liked.tokens, tokens(0))
    assert (by_image[ids["disliked"]].label, by_image[ids["disliked"]].weight) == ("undesirable", 1.0)
    assert by_image[ids["disliked"]].down_reasons == ["bias"] and liked.down_reasons == []  # the 👎's reason
    removed = by_image[ids["removed"]]
    assert (removed.label, removed.weight, removed.report_reasons) == ("undesirable", REMOVED_WEIGHT, ["nsfw"])
    assert ids["dismissed"] not in by_image and ids["tied"] not in by_image  # nothing either way
    assert by_image[ids["green_liked"]].label == "desirable"
    assert ds.counts == {"judged_images": 7, "duplicates_merged": 1, "examples": 4, "desirable": 2,
                         "undesirable": 2, "removed_negatives": 1, "unlabelled": 2, "pairs": 2,
                         "opted_out_images": 1, "opted_out_feedback": 1}

    # pairs only within one prompt: the liked red square against the removed one (strongest first) and the
    # disliked one; the green prompt has no negative, so no pair
    pairs = [(c.image_ids[0], r.image_ids[0], w, c.normalized_prompt == r.normalized_prompt) for c, r, w in ds.pairs]
    assert pairs == [(ids["liked"], ids["removed"], 3.0, True), (ids["liked"], ids["disliked"], 1.0, True)]
    assert build_dataset(source, max_pairs_per_prompt=1).counts["pairs"] == 1


async def test_parquet_round_trip_and_manifest(repo, tmp_path):
    ids = await seed(repo)
    source_url = "postgresql://dalle:s3cret@db:5432/dalle"
    from store.db import redact_url

    manifest = await export_feedback(repo, tmp_path / "fb", source=redact_url(source_url), holdout=0.0)
    assert "s3cret" not in json.dumps(manifest) and manifest["source"] == "postgresql://dalle:***@db:5432/dalle"
    assert json.loads((tmp_path / "fb" / "manifest.json").read_text()) == manifest
    assert manifest["counts"]["examples"] == 4 and manifest["counts"]["pairs"] == 2
    assert manifest["splits"]["unpaired"] == {"train": 4, "eval": 0}
    assert manifest["checkpoint_ids"] == {"ckpt-a": 4, "ckpt-b": 1}
    assert manifest["created_at"].endswith("+00:00")

    unpaired = pq.read_table(tmp_path / "fb" / "unpaired.parquet")
    pairs = pq.read_table(tmp_path / "fb" / "pairs.parquet")
    assert str(unpaired.schema.field("tokens").type) == "list<element: int16>"
    rows = unpaired.to_pylist()
    liked = next(r for r in rows if ids["liked"] in r["image_ids"])
    assert liked["tokens"] == tokens(0).tolist() and liked["label"] == "desirable" and liked["desirable"]
    assert liked["prompt"] == "a red square" and liked["split"] == "train"
    disliked = next(r for r in rows if ids["disliked"] in r["image_ids"])
    assert disliked["down_reasons"] == ["bias"] and liked["down_reasons"] == []
    pair_rows = pairs.to_pylist()
    assert [(p["chosen_tokens"], p["rejected_tokens"]) for p in pair_rows] == [
        (tokens(0).tolist(), tokens(2).tolist()), (tokens(0).tolist(), tokens(1).tolist())]
    assert all(p["same_checkpoint"] for p in pair_rows)  # both made by ckpt-a
    assert content_hash(rows, pair_rows) == manifest["content_sha256"]  # the files hold what was hashed

    again = await export_feedback(repo, tmp_path / "fb2", source="x", holdout=0.0)
    assert again["content_sha256"] == manifest["content_sha256"]  # same data, same hash
    await repo.record_feedback(ids["disliked"], 11, "down")
    changed = await export_feedback(repo, tmp_path / "fb3", source="x", holdout=0.0)
    assert changed["content_sha256"] != manifest["content_sha256"]


def judged(image_id: int, prompt: str, up: int = 1, down: int = 0) -> JudgedImage:
    from datetime import UTC, datetime

    return JudgedImage(image_id=image_id, generation_id=image_id, author_id=1, prompt=prompt,
                       normalized_prompt=prompt, tokens=tokens(image_id), checkpoint_id="c", clip_score=None, up=up,
                       down=down, report_reasons=(), decisions=(), created_at=datetime.now(UTC))


def test_split_is_stable_and_by_prompt():
    prompts = [f"prompt {i}" for i in range(200)]
    images = [judged(2 * i, p) for i, p in enumerate(prompts)] + [judged(2 * i + 1, p, up=0, down=1)
                                                                   for i, p in enumerate(prompts)]
    ds = build_dataset(DatasetSource(images, 0, 0), holdout=0.2)
    splits: dict[str, set[str]] = {}
    for e in ds.unpaired:
        splits.setdefault(e.normalized_prompt, set()).add(e.split)
    assert all(len(s) == 1 for s in splits.values())  # a prompt never lands in both
    assert all(c.split == r.split for c, r, _ in ds.pairs)
    held = sum(s == {"eval"} for s in splits.values())
    assert 20 <= held <= 60  # about 20% of 200 prompts
    # the same prompt lands in the same split whatever else the export holds, and on every run
    alone = build_dataset(DatasetSource(images[:3], 0, 0), holdout=0.2)
    assert [e.split for e in alone.unpaired] == [split_of(e.normalized_prompt, 0.2) for e in alone.unpaired]
    assert {e.normalized_prompt: e.split for e in alone.unpaired}.items() <= \
        {e.normalized_prompt: e.split for e in ds.unpaired}.items()
    with pytest.raises(ValueError, match="holdout"):
        build_dataset(DatasetSource(images, 0, 0), holdout=1.0)


def test_labels():
    assert label_of(2, 0, 0, ()) == ("desirable", 2.0)
    assert label_of(9, 0, 0, ()) == ("desirable", 3.0)  # capped
    assert label_of(0, 1, 1, ()) == ("undesirable", 2.0)  # a report counts against the image
    assert label_of(1, 0, 1, ("approved",)) == ("desirable", 1.0)  # ... until a moderator approves it
    assert label_of(5, 0, 0, ("approved", "removed")) == ("undesirable", REMOVED_WEIGHT)
    assert label_of(1, 1, 0, ()) == (None, 0.0)


def test_empty_store_writes_empty_files(tmp_path):
    manifest = write_dataset(build_dataset(DatasetSource([], 0, 0)), tmp_path, source="sqlite:///x.db")
    assert manifest["counts"]["examples"] == 0 and pq.read_table(tmp_path / "pairs.parquet").num_rows == 0


def test_cli_exports_from_a_database_url(sqlite_url, tmp_path, capsys):
    from store.db import upgrade

    upgrade(sqlite_url, "head")

    async def seeded():
        repo = Repository.from_url(sqlite_url)
        try:
            await seed(repo)
        finally:
            await repo.close()

    asyncio.run(seeded())
    out = tmp_path / "runs" / "feedback"
    assert main(["feedback", "--database-url", sqlite_url, "--out", str(out), "--holdout", "0"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads((out / "manifest.json").read_text()) and printed["counts"]["pairs"] == 2
    assert {p.name for p in out.iterdir()} == {"unpaired.parquet", "pairs.parquet", "manifest.json"}


def test_cli_refuses_bad_input(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("DATABASE_URL", raising=False)
    assert main(["feedback", "--out", str(tmp_path / "o")]) == 2
    assert "no database" in capsys.readouterr().err
    stale = f"sqlite:///{tmp_path / 'stale.db'}"
    assert main(["feedback", "--database-url", stale, "--out", str(tmp_path / "o")]) == 2
    assert "no database file at" in capsys.readouterr().err and not (tmp_path / "stale.db").exists()
    sqlite3.connect(tmp_path / "stale.db").close()  # a database without the bot's schema
    assert main(["feedback", "--database-url", stale, "--out", str(tmp_path / "o")]) == 2
    assert "python -m store upgrade" in capsys.readouterr().err
    assert main(["feedback", "--database-url", "mysql://u:pw@h/db", "--out", str(tmp_path / "o")]) == 2
    assert "unsupported database" in capsys.readouterr().err
    assert main(["feedback", "--database-url", stale, "--out", str(tmp_path / "o"), "--holdout", "1.5"]) == 2
    assert not (tmp_path / "o").exists()
