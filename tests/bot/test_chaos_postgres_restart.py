"""Chaos: PostgreSQL restarts under load. A bot process works through a queue on its own PostgreSQL server (started
by the test, so the shared one is never touched); the server is stopped in the middle and started again a few
seconds later. The bot stays up, reconnects, and every job is posted exactly once: nothing lost, nothing twice."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
from sqlalchemy import text

from store.db import make_sync_engine
from tests.bot.test_chaos_bot_kill import ROOT, BotProcess

JOBS = 6
OUTAGE_S = 3.0


def _pg_bin(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"))
    return str(candidates[-1]) if candidates else None


class PrivateServer:
    """A throwaway PostgreSQL cluster on a free port (as the ``postgres`` user when the tests run as root)."""

    def __init__(self) -> None:
        self.initdb, self.pg_ctl = _pg_bin("initdb"), _pg_bin("pg_ctl")
        if not (self.initdb and self.pg_ctl):
            if os.environ.get("DALLE_REQUIRE_POSTGRES") == "1":
                pytest.fail("DALLE_REQUIRE_POSTGRES=1 but initdb/pg_ctl are not installed")
            pytest.skip("initdb/pg_ctl not installed")
        # not under pytest's tmp dir: its parents are private to root, and the server runs as postgres
        self.dir = Path(tempfile.mkdtemp(prefix="dalle-pg-"))
        self.prefix = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        if self.prefix:
            shutil.chown(self.dir, "postgres")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self._run(self.initdb, "-D", str(self.dir / "data"), "-A", "trust", "-U", "postgres", "--no-sync")
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, *args: str) -> None:
        done = subprocess.run([*self.prefix, *args], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, (args, done.stdout[-2000:], done.stderr[-2000:])

    def start(self) -> None:
        self._run(self.pg_ctl, "-D", str(self.dir / "data"), "-l", str(self.dir / "log"), "-w", "start", "-o",
                  f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c fsync=off")

    def stop(self) -> None:
        self._run(self.pg_ctl, "-D", str(self.dir / "data"), "-m", "fast", "-w", "stop")


@pytest.fixture
def private_pg():
    server = PrivateServer()
    try:
        server.start()
        yield server
    finally:
        with contextlib.suppress(AssertionError):
            server.stop()
        shutil.rmtree(server.dir, ignore_errors=True)


def test_postgresql_restart_under_load_loses_and_duplicates_nothing(private_pg, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DALLE_", "DISCORD_", "DATABASE_"))}
    env.update(PYTHONPATH=str(ROOT), DALLE_MODE="local", LOG_LEVEL="INFO", DATABASE_URL=private_pg.url,
               AUTO_MIGRATE="true", MAX_QUEUE_PER_USER="10", RATE_LIMIT_USER="100/minute", DAILY_QUOTA="0",
               JOB_LEASE_SECONDS="600",  # the jobs must finish by reconnecting, not by a lease running out
               OUTPUT_DIR=str(tmp_path / "out"), DALLE_ENGINE_FACTORY="tests.fakes.engine:slow_inprocess_fake_engine")
    bot = BotProcess(env, tmp_path, stderr_path=tmp_path / "bot.log")
    try:
        bot.wait_for("local mode")
        bot.send(*(f"restart job {i} --n 1 --seed {i}" for i in range(JOBS)))
        bot.wait_queued(JOBS)  # every job is in the database before it goes away
        bot.wait_for(r"^\[\d+\] done: ")  # one finished: the others are queued or running
        private_pg.stop()
        down_at = time.monotonic()
        time.sleep(OUTAGE_S)
        private_pg.start()
        engine = make_sync_engine(private_pg.url)
        try:
            deadline = time.monotonic() + 120
            while True:
                with engine.connect() as conn:
                    rows = conn.execute(text("SELECT id, status, delivered_at FROM generations ORDER BY id")).all()
                if len(rows) == JOBS and all(r.status == "done" and r.delivered_at is not None for r in rows):
                    break
                assert time.monotonic() < deadline and bot.proc.poll() is None, (rows, bot.lines, bot.log()[-4000:])
                time.sleep(0.2)
        finally:
            engine.dispose()
        recovered_in = time.monotonic() - down_at
        time.sleep(1.0)  # a late duplicate would show here
        bot.proc.stdin.close()
        assert bot.proc.wait(timeout=60) == 0, bot.log()[-3000:]
        bot.reader.join(5)
    finally:
        bot.stop()
    ids = [r.id for r in rows]
    assert sorted(bot.done_ids()) == sorted(ids), bot.lines  # each exactly once
    print(f"PostgreSQL restart ({OUTAGE_S:.0f} s down) under load: {JOBS} jobs, all done {recovered_in:.1f} s after "
          "the stop, 0 lost, 0 duplicated")
