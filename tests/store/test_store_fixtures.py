"""The shared ``pg_url`` fixture skips visibly when PostgreSQL is unreachable, and fails when it is required."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TARGET = "tests/store/test_migrations.py::test_upgrade_downgrade_upgrade[postgresql]"


def _pytest(extra_env: dict[str, str]) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "DALLE_REQUIRE_POSTGRES"}  # CI sets it
    env.update({"PYTHONPATH": str(ROOT), "DALLE_TEST_PG_PORT": "1", **extra_env})  # nothing listens on port 1
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", TARGET],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )


def test_pg_unreachable_skips_with_reason():
    out = _pytest({})
    assert out.returncode == 0, out.stdout + out.stderr
    assert "1 skipped" in out.stdout
    assert "PostgreSQL at 127.0.0.1:1 unreachable" in out.stdout


def test_pg_unreachable_fails_when_required():
    out = _pytest({"DALLE_REQUIRE_POSTGRES": "1"})
    assert out.returncode != 0
    assert "DALLE_REQUIRE_POSTGRES=1 but PostgreSQL at 127.0.0.1:1 unreachable" in out.stdout
