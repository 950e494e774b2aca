"""A database the process can read but not write stops ``python -m bot`` at start-up: one line, exit code 2.

Without the check such a bot starts, reads its schema, says it is ready, and then fails every ``/dalle`` when it
first writes. Each case below is a state users really end up in. The tests run as root in CI, where file modes do
not stop writes, so each case makes the state real in a way that holds for root too:

- *wrong permissions*: a database file owned by another user with mode 0444 (e.g. created by ``sudo python -m store
  upgrade``), and the bot run as an unprivileged user (``nobody``: ``setpriv`` drops root's uid and capabilities
  before the bot starts). Run as a normal user the test only needs the mode.
- *read-only file*: the file made immutable (``chattr +i``), which stops root as well (skipped where the
  filesystem or the container does not allow the attribute).
- *read-only PostgreSQL*: the database set ``default_transaction_read_only = on`` (what a read-only database or a
  hot standby replica looks like to a client).

A full disk is refused by the same check (it commits a real write), but is not made here.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from store.db import upgrade

ROOT = Path(__file__).resolve().parents[2]
NOBODY = 65534


def _run_bot(env_extra: dict[str, str], cwd: Path, as_user: int | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DALLE_", "DISCORD_", "DATABASE_"))}
    env.update(PYTHONPATH=str(ROOT), DALLE_MODE="local", LOG_LEVEL="ERROR", HOME=str(cwd), OUTPUT_DIR=str(cwd / "out"),
               DALLE_ENGINE_FACTORY="tests.fakes.engine:inprocess_fake_engine", **env_extra)

    prefix = []
    if as_user is not None:  # util-linux's setpriv: the process runs as that user, with no capabilities
        prefix = ["setpriv", f"--reuid={as_user}", f"--regid={as_user}", "--clear-groups"]
    return subprocess.run([*prefix, sys.executable, "-m", "bot"], cwd=cwd, env=env, input="", capture_output=True,
                          text=True, timeout=120)


def _assert_refused(out: subprocess.CompletedProcess, start: str) -> None:
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith(start), out.stderr[-2000:]
    assert "local mode: type /help" not in out.stdout  # it never accepted work


@pytest.fixture
def shared_dir():
    """A folder another user can enter (pytest's tmp_path sits under a 0700 folder of root's)."""
    path = Path(tempfile.mkdtemp(prefix="dalle-ro-"))
    path.chmod(0o777)
    try:
        yield path
    finally:
        subprocess.run(["chattr", "-i", str(path / "ro.db")], capture_output=True)
        shutil.rmtree(path, ignore_errors=True)


def test_a_database_file_the_bot_user_cannot_write_is_refused_at_start(shared_dir):
    db = shared_dir / "ro.db"
    url = f"sqlite:///{db}"
    upgrade(url, "head")  # at head: the schema check alone would let it start
    (shared_dir / "out").mkdir(mode=0o777)
    (shared_dir / "out").chmod(0o777)
    db.chmod(0o444)
    for extra in ("-wal", "-shm"):
        Path(f"{db}{extra}").unlink(missing_ok=True)
    as_user = NOBODY if os.geteuid() == 0 else None
    if as_user is not None and shutil.which("setpriv") is None:
        pytest.skip("running as root without setpriv: no way to run the bot as another user")
    out = _run_bot({"DATABASE_URL": url}, shared_dir, as_user)
    _assert_refused(out, f"database error: cannot write to {url}: attempt to write a readonly database")

    # the same database made writable (SQLite gave the -wal/-shm files the read-only run made the file's mode,
    # so they are fixed too): the bot starts, and exits cleanly at the end of its input
    for path in shared_dir.glob("ro.db*"):
        path.chmod(0o666)
    out = _run_bot({"DATABASE_URL": url}, shared_dir, as_user)
    assert out.returncode == 0 and "local mode" in out.stdout, out.stderr[-2000:]


def test_an_immutable_database_file_is_refused_even_for_root(shared_dir):
    db = shared_dir / "ro.db"
    url = f"sqlite:///{db}"
    upgrade(url, "head")
    for extra in ("-wal", "-shm"):
        Path(f"{db}{extra}").unlink(missing_ok=True)
    made = subprocess.run(["chattr", "+i", str(db)], capture_output=True, text=True) if shutil.which("chattr") else None
    if made is None or made.returncode != 0:
        pytest.skip(f"chattr +i is not available here: {made.stderr.strip() if made else 'no chattr'}")
    out = _run_bot({"DATABASE_URL": url}, shared_dir)
    _assert_refused(out, f"database error: cannot write to {url}: attempt to write a readonly database")


def test_a_read_only_postgresql_database_is_refused_at_start(pg_url, tmp_path):
    import psycopg
    from sqlalchemy.engine import make_url

    upgrade(pg_url, "head")
    u = make_url(pg_url)
    with psycopg.connect(host=u.host, port=u.port, user=u.username, dbname=u.database, autocommit=True) as conn:
        conn.execute(f'ALTER DATABASE "{u.database}" SET default_transaction_read_only = on')
    try:
        out = _run_bot({"DATABASE_URL": pg_url}, tmp_path)
        _assert_refused(out, "database error: cannot write to postgresql://")
        assert "read-only transaction" in out.stderr
    finally:
        with psycopg.connect(host=u.host, port=u.port, user=u.username, dbname=u.database, autocommit=True) as conn:
            conn.execute("SET default_transaction_read_only = off")  # this session only, to undo it
            conn.execute(f'ALTER DATABASE "{u.database}" RESET default_transaction_read_only')
