"""Chaos: two bot processes on one PostgreSQL database, and one of them gets ``kill -9`` in the middle of its
queue. The other takes its jobs over once their leases run out (JOB_LEASE_SECONDS=6 here, 60 by default), runs
the queued and the interrupted ones, and every result is posted exactly once: nothing lost, nothing twice. The kill
lands while no result of the victim is posted but unrecorded (between those two steps delivery is at least once:
a terminal line cannot be taken back; on Discord the message's nonce makes a second post return the first)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from sqlalchemy import text

from store.db import make_sync_engine

ROOT = Path(__file__).resolve().parents[2]
JOBS = 5
DONE = re.compile(r"^\[(\d+)\] done: ")
QUEUED = re.compile(r"^\[(\d+)\] queued at position ")


class BotProcess:
    """``python -m bot`` in terminal mode, its stdout read line by line in the background."""

    def __init__(self, env: dict[str, str], cwd: Path, stderr_path: Path | None = None) -> None:
        """``stderr_path``: the log goes to this file (read it with :meth:`log`) instead of a pipe."""
        self.stderr_path = stderr_path
        stderr = open(stderr_path, "w") if stderr_path else subprocess.PIPE  # noqa: SIM115 - the child holds it
        self.proc = subprocess.Popen([sys.executable, "-m", "bot"], cwd=cwd, env=env, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=stderr, text=True)
        self.lines: list[str] = []
        self.reader = threading.Thread(target=lambda: self.lines.extend(iter(self.proc.stdout.readline, "")),
                                       daemon=True)
        self.reader.start()

    def wait_for(self, pattern: str, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while not any(re.search(pattern, line) for line in list(self.lines)):
            assert time.monotonic() < deadline and self.proc.poll() is None, (pattern, self.lines)
            time.sleep(0.05)

    def log(self) -> str:
        return self.stderr_path.read_text() if self.stderr_path else ""

    def send(self, *lines: str) -> None:
        self.proc.stdin.write("".join(f"{line}\n" for line in lines))
        self.proc.stdin.flush()

    def done_ids(self) -> list[int]:
        return [int(m.group(1)) for line in list(self.lines) if (m := DONE.match(line))]

    def wait_queued(self, count: int, timeout: float = 60.0) -> None:
        """Until this process has answered ``count`` submissions (each queued or already under way)."""
        deadline = time.monotonic() + timeout
        while sum(bool(QUEUED.match(line)) for line in list(self.lines)) < count:
            assert time.monotonic() < deadline and self.proc.poll() is None, self.lines
            time.sleep(0.05)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)


def test_kill_9_of_one_of_two_bot_processes_on_postgresql(pg_url, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DALLE_", "DISCORD_", "DATABASE_"))}
    env.update(PYTHONPATH=str(ROOT), DALLE_MODE="local", LOG_LEVEL="WARNING", DATABASE_URL=pg_url,
               AUTO_MIGRATE="true", JOB_LEASE_SECONDS="6", MAX_QUEUE_PER_USER="10", RATE_LIMIT_USER="100/minute",
               DAILY_QUOTA="0", OUTPUT_DIR=str(tmp_path / "out"),
               DALLE_ENGINE_FACTORY="tests.fakes.engine:slow_inprocess_fake_engine")
    survivor = BotProcess(env, tmp_path)
    victim = None
    try:
        survivor.wait_for("local mode")
        victim = BotProcess(env, tmp_path)
        victim.wait_for("local mode")
        victim.send(*(f"chaos job {i} --n 1 --seed {i}" for i in range(JOBS)))
        victim.wait_queued(JOBS)  # every job is in the database (a slow machine reads the lines slowly)
        victim.wait_for(r"^\[\d+\] done: ")  # one finished: the others are queued or running
        # The kill must not land between a post and its record (delivery is at least once in that window, and
        # terminal output cannot be taken back): freeze the victim, look, and kill only if no result of it is
        # finished but unrecorded; else let it run on a moment and look again.
        engine = make_sync_engine(pg_url)
        try:
            deadline = time.monotonic() + 30
            while True:
                victim.proc.send_signal(signal.SIGSTOP)
                with engine.connect() as conn:
                    unrecorded = conn.execute(text("SELECT count(*) FROM generations WHERE status = 'done' "
                                                   "AND delivered_at IS NULL")).scalar()
                if not unrecorded:
                    break
                victim.proc.send_signal(signal.SIGCONT)
                assert time.monotonic() < deadline, "the victim never came out of a post"
                time.sleep(0.05)
        finally:
            engine.dispose()
        victim.proc.send_signal(signal.SIGKILL)
        victim.proc.wait(timeout=10)
        victim.reader.join(5)
        killed_at = time.monotonic()

        engine = make_sync_engine(pg_url)
        try:
            deadline = time.monotonic() + 90
            while True:
                with engine.connect() as conn:
                    rows = conn.execute(text("SELECT id, status, delivered_at FROM generations ORDER BY id")).all()
                if len(rows) == JOBS and all(r.status == "done" and r.delivered_at is not None for r in rows):
                    break
                assert time.monotonic() < deadline, rows
                time.sleep(0.2)
        finally:
            engine.dispose()
        took_over_in = time.monotonic() - killed_at
        time.sleep(1.0)  # a late duplicate would show here
        survivor.proc.stdin.close()
        assert survivor.proc.wait(timeout=60) == 0, survivor.proc.stderr.read()[-3000:]
        survivor.reader.join(5)
    finally:
        survivor.stop()
        if victim is not None:
            victim.stop()

    ids = [r.id for r in rows]
    posted = victim.done_ids() + survivor.done_ids()
    assert sorted(posted) == sorted(ids), (victim.lines, survivor.lines)  # each exactly once, across both
    assert survivor.done_ids(), "the survivor posted the victim's remaining jobs"
    print(f"bot kill -9 on PostgreSQL: {JOBS} jobs, {len(victim.done_ids())} posted before the kill, "
          f"{len(survivor.done_ids())} taken over and posted by the other process in {took_over_in:.1f} s, "
          "0 lost, 0 duplicated")
