"""Deleted results never lend their ids: on SQLite the generations and images tables are AUTOINCREMENT (migration
a3c7e9f1b5d8, which rebuilds them with their rows), so a button of a deleted result's old message cannot act on a
newer generation or image that would otherwise get the same id."""

from __future__ import annotations

from sqlalchemy import text

from store.db import downgrade, make_sync_engine, upgrade

BEFORE = "d6a2f8c4e0b5"


def _rows(url: str, sql: str) -> list:
    engine = make_sync_engine(url)
    try:
        with engine.begin() as conn:
            result = conn.execute(text(sql))
            return [tuple(r) for r in result] if result.returns_rows else []
    finally:
        engine.dispose()


def test_the_rebuild_keeps_every_row_and_ids_are_not_reused_after_a_delete(sqlite_url):
    upgrade(sqlite_url, BEFORE)
    _rows(sqlite_url, "INSERT INTO generations (id, user_id, prompt, normalized_prompt, n_images, seed, params, kind, "
                      "status, private, queued_at, attempts) VALUES (1, 5, 'a', 'a', 1, 0, '{}', 'new', 'done', 0, "
                      "'2026-12-07 09:00:00', 0), (2, 5, 'b', 'b', 1, 0, '{}', 'new', 'done', 0, "
                      "'2026-12-07 09:00:00', 0)")
    _rows(sqlite_url, "INSERT INTO images (id, generation_id, \"index\", safety_scores, flagged, hidden, critical, "
                      "created_at) VALUES (10, 1, 0, '{}', 0, 0, 0, '2026-12-07 09:00:00'), "
                      "(11, 2, 0, '{}', 0, 0, 0, '2026-12-07 09:00:00')")
    upgrade(sqlite_url)
    assert [r[0] for r in _rows(sqlite_url, "SELECT id FROM generations ORDER BY id")] == [1, 2]
    assert [tuple(r) for r in _rows(sqlite_url, "SELECT id, generation_id FROM images ORDER BY id")] == [(10, 1),
                                                                                                      (11, 2)]
    _rows(sqlite_url, "DELETE FROM generations WHERE id = 2")  # the newest result, deleted (its image goes too)
    assert _rows(sqlite_url, "SELECT id FROM images") == [(10,)]
    _rows(sqlite_url, "INSERT INTO generations (user_id, prompt, normalized_prompt, n_images, seed, params, kind, "
                      "status, private, queued_at, attempts) VALUES (6, 'c', 'c', 1, 0, '{}', 'new', 'queued', 0, "
                      "'2026-12-07 09:01:00', 0)")
    _rows(sqlite_url, "INSERT INTO images (generation_id, \"index\", safety_scores, flagged, hidden, critical, "
                      "created_at) VALUES (1, 1, '{}', 0, 0, 0, '2026-12-07 09:01:00')")
    assert [r[0] for r in _rows(sqlite_url, "SELECT id FROM generations ORDER BY id")] == [1, 3]
    assert [r[0] for r in _rows(sqlite_url, "SELECT id FROM images ORDER BY id")] == [10, 12]
    downgrade(sqlite_url, BEFORE)  # and back: the rows stay
    assert [r[0] for r in _rows(sqlite_url, "SELECT id FROM generations ORDER BY id")] == [1, 3]
