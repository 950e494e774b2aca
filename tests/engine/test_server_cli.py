"""``python -m engine serve`` as a real process: fake pipeline, token from the environment, SIGTERM shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parents[2]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "ENGINE_TOKEN"}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra)
    return env


def test_serve_refuses_a_public_address_without_a_token():
    proc = subprocess.run(
        [sys.executable, "-m", "engine", "serve", "--fake", "--host", "0.0.0.0"],
        cwd=ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert "without a token" in proc.stderr


def test_serve_refuses_a_model_nice_outside_0_to_19():
    proc = subprocess.run([sys.executable, "-m", "engine", "serve", "--fake", "--model-nice", "-1"], cwd=ROOT,
                          env=_env(), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "model_nice must be between 0 (off) and 19" in proc.stderr


def test_serve_without_checkpoint_dir_says_so(tmp_path):
    missing = tmp_path / "nope"
    proc = subprocess.run(
        [sys.executable, "-m", "engine", "serve", "--checkpoint", str(missing), "--port", "0"],
        cwd=ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode != 0 and "checkpoint directory not found" in proc.stderr


@contextlib.asynccontextmanager
async def _served(args: list[str], env: dict[str, str], *, up_tries: int, stop_timeout: float):
    """``python -m engine serve ARGS --port P`` as a real process: yields (client session, first /healthz body)
    once it answers 200, then stops it with SIGTERM and requires a clean exit."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "engine", "serve", *args, "--port", str(port)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        async with aiohttp.ClientSession(f"http://127.0.0.1:{port}") as http:
            for _ in range(up_tries):
                try:
                    async with http.get("/healthz") as resp:
                        if resp.status == 200:
                            health = await resp.json()
                            break
                except aiohttp.ClientConnectionError:
                    await asyncio.sleep(0.05)
            else:
                raise AssertionError("engine did not come up")
            yield http, health
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=stop_timeout) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        proc.stderr.close()


async def _finished(http, rid: str, *, tries: int, pause: float, headers=None, states=("done",)) -> dict:
    """Poll a generation until its state is one of ``states`` (or the tries run out); its last body."""
    for _ in range(tries):
        async with http.get(f"/v1/generations/{rid}", headers=headers) as resp:
            body = await resp.json()
        if body["state"] in states:
            break
        await asyncio.sleep(pause)
    return body


async def test_serve_fake_with_env_token_and_sigterm():
    args = ["--fake", "--window-ms", "5"]
    async with _served(args, _env(ENGINE_TOKEN="from-env"), up_tries=300, stop_timeout=20) as (http, _):
        async with http.post("/v1/generations", json={"prompt": "cli"}) as resp:
            assert resp.status == 401
        auth = {"Authorization": "Bearer from-env"}
        async with http.post("/v1/generations", json={"prompt": "cli", "n": 2}, headers=auth) as resp:
            assert resp.status == 202
            rid = (await resp.json())["id"]
        body = await _finished(http, rid, tries=200, pause=0.02, headers=auth)
        assert body["state"] == "done" and len(body["result"]["images"]) == 2


async def test_serve_a_checkpoint_in_bfloat16(tmp_path):
    from training.fixtures import random_checkpoint

    ckpt = random_checkpoint(tmp_path / "ckpt", with_clip=False)
    args = ["--checkpoint", str(ckpt), "--dtype", "bfloat16", "--no-warmup", "--xla-cache-dir", "off"]
    async with _served(args, _env(), up_tries=1200, stop_timeout=30) as (http, health):
        assert health["dtype"] == "bfloat16" and health["checkpoint_id"] == "random-0"
        async with http.post("/v1/generations", json={"prompt": "a red circle", "n": 2, "seed": 1}) as resp:
            assert resp.status == 202
            rid = (await resp.json())["id"]
        body = await _finished(http, rid, tries=1200, pause=0.05, states=("done", "failed"))
        assert body["state"] == "done" and len(body["result"]["images"]) == 2
