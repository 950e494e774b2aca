"""``python -m engine serve`` as a real process: fake pipeline, token from the environment, SIGTERM shutdown."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parents[1]


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


async def test_serve_fake_with_env_token_and_sigterm():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "engine", "serve", "--fake", "--port", str(port), "--window-ms", "5"],
        cwd=ROOT,
        env=_env(ENGINE_TOKEN="from-env"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession(url) as http:
            for _ in range(300):
                try:
                    async with http.get("/healthz") as resp:
                        if resp.status == 200:
                            break
                except aiohttp.ClientConnectionError:
                    await asyncio.sleep(0.05)
            else:
                raise AssertionError("engine did not come up")
            async with http.post("/v1/generations", json={"prompt": "cli"}) as resp:
                assert resp.status == 401
            auth = {"Authorization": "Bearer from-env"}
            async with http.post("/v1/generations", json={"prompt": "cli", "n": 2}, headers=auth) as resp:
                assert resp.status == 202
                rid = (await resp.json())["id"]
            for _ in range(200):
                async with http.get(f"/v1/generations/{rid}", headers=auth) as resp:
                    body = await resp.json()
                if body["state"] == "done":
                    break
                await asyncio.sleep(0.02)
            assert body["state"] == "done" and len(body["result"]["images"]) == 2
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        proc.stderr.close()


async def test_serve_a_checkpoint_in_bfloat16(tmp_path):
    from engine.checkpoint import random_checkpoint

    ckpt = random_checkpoint(tmp_path / "ckpt", with_clip=False)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "engine", "serve", "--checkpoint", str(ckpt), "--port", str(port), "--dtype",
         "bfloat16", "--no-warmup", "--xla-cache-dir", "off"],
        cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession(url) as http:
            for _ in range(1200):
                try:
                    async with http.get("/healthz") as resp:
                        if resp.status == 200:
                            health = await resp.json()
                            break
                except aiohttp.ClientConnectionError:
                    await asyncio.sleep(0.05)
            else:
                raise AssertionError("engine did not come up")
            assert health["dtype"] == "bfloat16" and health["checkpoint_id"] == "random-0"
            async with http.post("/v1/generations", json={"prompt": "a red circle", "n": 2, "seed": 1}) as resp:
                assert resp.status == 202
                rid = (await resp.json())["id"]
            for _ in range(1200):
                async with http.get(f"/v1/generations/{rid}") as resp:
                    body = await resp.json()
                if body["state"] in ("done", "failed"):
                    break
                await asyncio.sleep(0.05)
            assert body["state"] == "done" and len(body["result"]["images"]) == 2
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        proc.stderr.close()
