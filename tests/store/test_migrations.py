"""Alembic migrations: up/down/up on both databases, models == migrated schema, the start-up gate."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect

from store.db import (
    DatabaseUnavailable,
    MigrationRequired,
    downgrade,
    ensure_migrated,
    make_sync_engine,
    schema_revisions,
    upgrade,
)
from store.models import Base

ROOT = Path(__file__).resolve().parents[2]
TABLES = set(Base.metadata.tables)


def _tables(url: str) -> set[str]:
    engine = make_sync_engine(url)
    try:
        with engine.connect() as conn:
            return set(inspect(conn).get_table_names())
    finally:
        engine.dispose()


def test_upgrade_downgrade_upgrade(db_url):
    upgrade(db_url, "head")
    assert TABLES <= _tables(db_url)
    current, heads = schema_revisions(db_url)
    assert current == heads and len(heads) == 1

    downgrade(db_url, "base")
    assert _tables(db_url) - {"alembic_version"} == set()
    assert schema_revisions(db_url)[0] == set()

    upgrade(db_url, "head")
    assert TABLES <= _tables(db_url)
    assert schema_revisions(db_url)[0] == heads


def test_models_match_migrated_schema(db_url):
    """Autogenerate against the migrated database finds nothing to do: models and migrations agree."""

    def diff():
        engine = make_sync_engine(db_url)
        try:
            with engine.connect() as conn:
                ctx = MigrationContext.configure(conn, opts={"compare_type": True, "target_metadata": Base.metadata})
                return compare_metadata(ctx, Base.metadata)
        finally:
            engine.dispose()

    before = diff()  # control: an empty database differs by every table
    assert {op[1].name for op in before if op[0] == "add_table"} == TABLES
    upgrade(db_url, "head")
    assert diff() == []


def test_downgrade_keeps_data_safe_round_trip_with_rows(db_url):
    """A populated database can go down to base and back (foreign keys and the images<->generations cycle)."""
    import asyncio

    from store.repository import NewImage, Repository

    upgrade(db_url, "head")

    async def fill():
        repo = Repository.from_url(db_url)
        try:
            gen = await repo.create_generation(user_id=1, prompt="p")
            [img] = await repo.add_images(gen.id, [NewImage(index=0, tokens=[1, 2, 3])])
            await repo.create_generation(user_id=1, prompt="p", kind="variation", parent_generation_id=gen.id,
                                         parent_image_id=img.id)
        finally:
            await repo.close()

    asyncio.run(fill())
    downgrade(db_url, "base")
    assert _tables(db_url) - {"alembic_version"} == set()
    upgrade(db_url, "head")


def test_ensure_migrated_gate(sqlite_url):
    with pytest.raises(MigrationRequired) as info:
        ensure_migrated(sqlite_url, auto=False)
    assert "python -m store upgrade" in str(info.value)
    assert ensure_migrated(sqlite_url, auto=True) is True
    assert ensure_migrated(sqlite_url, auto=False) is False
    assert ensure_migrated(sqlite_url, auto=True) is False


def test_ensure_migrated_rejects_unknown_revision(sqlite_url):
    upgrade(sqlite_url, "head")
    engine = make_sync_engine(sqlite_url)
    with engine.begin() as conn:
        conn.exec_driver_sql("UPDATE alembic_version SET version_num = 'ffffffffffff'")
    engine.dispose()
    with pytest.raises(MigrationRequired, match="ffffffffffff"):
        ensure_migrated(sqlite_url, auto=True)


def test_ensure_migrated_hides_password():
    url = "postgresql://alice:s3cret-pw@127.0.0.1:1/nowhere"
    with pytest.raises(DatabaseUnavailable) as info:
        ensure_migrated(url, auto=False)
    assert "s3cret-pw" not in str(info.value) and str(info.value).startswith("cannot open postgresql://alice:***@")


def test_python_m_store_cli(tmp_path):
    url = f"sqlite:///{tmp_path / 'cli.db'}"
    env = {**os.environ, "DATABASE_URL": url, "PYTHONPATH": str(ROOT)}
    run = lambda *a: subprocess.run([sys.executable, "-m", "store", *a], cwd=tmp_path, env=env,
                                    capture_output=True, text=True, timeout=60)
    out = run("current")
    assert out.returncode == 0 and "current=empty" in out.stdout and "NOT at head" in out.stdout
    out = run("upgrade")
    assert out.returncode == 0, out.stderr
    assert "(at head)" in out.stdout
    out = run("downgrade", "base")
    assert out.returncode == 0 and "current=empty" in out.stdout
    bad = subprocess.run([sys.executable, "-m", "store", "current"], cwd=tmp_path, capture_output=True, text=True,
                         env={**env, "DATABASE_URL": "mysql://x@y/z"}, timeout=60)
    assert bad.returncode == 2 and "DATABASE_URL" in bad.stderr and "Traceback" not in bad.stderr


def test_ensure_migrated_refuses_unversioned_tables(sqlite_url):
    engine = make_sync_engine(sqlite_url)
    Base.metadata.create_all(engine)  # a schema made outside Alembic
    engine.dispose()
    with pytest.raises(MigrationRequired, match="alembic stamp head"):
        ensure_migrated(sqlite_url, auto=True)


def test_migrations_do_not_import_application_code():
    """Revisions must keep working after the models change, so they use plain sqlalchemy types only."""
    for path in (ROOT / "migrations" / "versions").glob("*.py"):
        source = path.read_text()
        assert not re.search(r"^\s*(from|import)\s+(store|bot)\b", source, re.M), path
        assert "UTCDateTime" not in source, path
