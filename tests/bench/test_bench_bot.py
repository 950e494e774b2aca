"""``python -m bench bot`` in quick mode: the whole bot against the fake Discord in its own process.

Speed targets are not asserted here (they belong to the bench output); these tests check that the bench
measures what it says: every user acknowledged and answered with all images, the figures printed, and the
fake's verdicts (errors, unknown routes) carried through.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from bench.bot import summarise_bot

ROOT = Path(__file__).resolve().parents[2]


def _run(*args: str, timeout: float = 120, **env_extra: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, **env_extra)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return subprocess.run([sys.executable, "-m", "bench", "bot", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_quick_bench_serves_every_user_and_prints_the_figures(tmp_path):
    out_json = tmp_path / "bot.json"
    proc = _run("--users", "10", "--quick", "--images", "3", "--workers", "2,6", "--json", str(out_json))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    text = proc.stdout
    assert "engine alone" in text and "load average before" in text
    rows = [line for line in text.splitlines() if re.match(r"\| \d+ \| 10 \|", line)]
    assert len(rows) == 2, text
    for row, workers in zip(rows, (2, 6), strict=True):
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[0] == str(workers)
        assert cells[2] == "10" and cells[3] == "10"  # acked, results
        ack_p50, ack_p99 = float(cells[4]), float(cells[6])
        assert 0 <= ack_p50 <= ack_p99 < 3000  # every ack beat the fake's 3 s deadline
        assert float(cells[10]) > 0 and float(cells[11]) > 0 and cells[12].endswith("%") and cells[13].endswith("%")
        assert 0 < float(cells[14].rstrip("%")) < 400  # the fake Discord's own CPU (it parses every upload)

    data = json.loads(out_json.read_text())
    assert data["ok"] is True and len(data["engine_runs"]) == 1  # quick: one engine baseline
    assert data["engine_runs"][0]["images"] == 30
    for r in data["rounds"]:
        assert r["images"] == 30 and r["complete_users"] == 10 and r["acked"] == 10
        assert r["fake_errors"] == 0 and r["unknown_routes"] == []
        assert 0 < r["ack_p99_s"] <= r["result_max_s"] <= r["wall_s"] + 1e-6
        assert r["images_per_s"] == pytest.approx(30 / r["wall_s"])
    assert [r["workers"] for r in data["rounds"]] == [2, 6]


def test_engine_url_mode_measures_a_separate_engine_service(tmp_path):
    """``--engine-url``: the baseline and the bot both go through ``HttpEngine`` to ``python -m engine serve``."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, PYTHONPATH=str(ROOT), ENGINE_TOKEN="bench-secret")
    server = subprocess.Popen([sys.executable, "-m", "engine", "serve", "--fake", "--port", str(port),
                               "--fake-latency-ms", "10", "--fake-per-candidate-ms", "0.5"],
                              cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                with urllib.request.urlopen(f"{url}/healthz", timeout=1) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                time.sleep(0.05)
        else:
            raise AssertionError("engine service did not come up")
        out_json = tmp_path / "bot.json"
        proc = _run("--engine-url", url, "--users", "6", "--images", "2", "--quick", "--json", str(out_json),
                    ENGINE_TOKEN="bench-secret")  # the bench reads the service token from the environment
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert f"engine service at {url}" in proc.stdout
        data = json.loads(out_json.read_text())
        assert data["engine_runs"][0]["images"] == 12
        (r,) = data["rounds"]
        assert r["images"] == 12 and r["complete_users"] == 6 and r["fake_errors"] == 0
    finally:
        server.terminate()
        server.wait(timeout=20)


def test_bad_arguments_get_a_clear_error():
    proc = _run("--images", "12")
    assert proc.returncode == 2 and "--images must be between 1 and 9" in proc.stderr
    proc = _run("--workers", "two")
    assert proc.returncode == 2 and "--workers must be a comma list of integers" in proc.stderr
    proc = _run("--engine-url", "http://127.0.0.1:1", "--checkpoint", "x")
    assert proc.returncode == 2 and "exclusive" in proc.stderr
    proc = _run("--checkpoint", "/nonexistent/checkpoint")
    assert proc.returncode == 2 and "nothing measured" in proc.stderr


def _seen(**over):
    user = {"user": 1, "dispatched_s": 0.0, "ack_s": 0.02, "ack_status": 200, "ack_type": 5, "result_s": 1.0,
            "result_at_s": 1.0, "result_status": 200, "images": 4}
    users = [dict(user, user=k, ack_s=0.01 * (k + 1), result_at_s=0.5 + 0.1 * k) for k in range(5)]
    seen = {"complete": True, "users": users, "error_count": 0, "errors": [], "unknown": [], "workers": 2}
    seen.update(over)
    return seen


def test_summary_counts_only_real_acks_and_complete_results():
    s = summarise_bot(_seen(), users=5, images=4)
    assert s["acked"] == 5 and s["complete_users"] == 5 and s["images"] == 20
    assert s["wall_s"] == pytest.approx(0.9) and s["images_per_s"] == pytest.approx(20 / 0.9)
    assert s["ack_p50_s"] == pytest.approx(0.03) and s["ack_max_s"] == pytest.approx(0.05)

    seen = _seen()
    seen["users"][0].update(ack_status=404, ack_type=None)  # a refused (late) ack is not an ack
    seen["users"][1].update(images=2)  # a short result is not a complete one
    seen["users"][2].update(result_s=None, result_at_s=None, result_status=None, images=0)
    s = summarise_bot(seen, users=5, images=4)
    assert s["acked"] == 4 and s["complete_users"] == 3 and s["answered"] == 4 and s["images"] == 14


@pytest.mark.slow
def test_checkpoint_mode_runs_on_a_tiny_random_checkpoint(tmp_path):
    """``--checkpoint DIR`` loads the real pipeline (here a tiny random one, the published layout) and warms it
    up before timing; the bot still acknowledges and answers every user."""
    from training.fixtures import random_checkpoint

    ckpt = random_checkpoint(tmp_path / "ckpt", with_clip=False)
    out_json = tmp_path / "bot.json"
    proc = _run("--checkpoint", str(ckpt), "--users", "3", "--images", "2", "--quick", "--json", str(out_json),
                timeout=240)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"checkpoint {ckpt}" in proc.stdout
    data = json.loads(out_json.read_text())
    assert data["ok"] is True and data["engine_runs"][0]["images"] == 6
    (r,) = data["rounds"]
    assert r["images"] == 6 and r["complete_users"] == 3 and r["acked"] == 3 and r["fake_errors"] == 0
