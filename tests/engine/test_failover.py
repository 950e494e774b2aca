"""Chaos: one of two engine services (``ENGINE_URLS``) is killed (SIGKILL) in the middle of its batches. The jobs
it held finish on the other (MultiEngine's fail-over: the same request, so the same images), none is lost, none
runs twice, and the client never sees the loss."""

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

from engine.api import GenerationRequest
from engine.client import MultiEngine

ROOT = Path(__file__).resolve().parents[2]
JOBS = 8


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.asynccontextmanager
async def engine_service():
    """``python -m engine serve --fake`` (slow passes, so a kill lands mid-batch): yields (url, process)."""
    port = _port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("ENGINE_TOKEN")}
    env["PYTHONPATH"] = str(ROOT)
    proc = subprocess.Popen([sys.executable, "-m", "engine", "serve", "--fake", "--fake-latency-ms", "400",
                             "--window-ms", "5", "--port", str(port)], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession() as http:
            for _ in range(600):
                try:
                    async with http.get(f"{url}/healthz") as resp:
                        if resp.status == 200:
                            break
                except aiohttp.ClientConnectionError:
                    await asyncio.sleep(0.05)
            else:
                raise AssertionError("engine service did not come up")
        yield url, proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)


async def test_jobs_of_a_killed_engine_service_finish_on_the_other():
    async with engine_service() as (url_a, proc_a), engine_service() as (url_b, _):
        engine = MultiEngine.from_urls([url_a, url_b], timeout=2.0, retries=1, probe_interval=0.05, dead_retry=30.0)
        try:
            requests = [GenerationRequest(prompt=f"job {i}", n=2, seed=100 + i, request_id=f"chaos-{i}")
                        for i in range(JOBS)]
            ids = []
            for request in requests:  # one at a time, so the least-loaded routing spreads them over both
                ids.append(await engine.submit(request))
                await asyncio.sleep(0.02)
            on_a = [rid for rid in ids if engine.engine_for(rid).base_url == url_a]
            assert on_a and len(on_a) < JOBS, "both services should hold jobs"
            async with aiohttp.ClientSession() as http:  # kill A once it is in the middle of a pass
                for _ in range(200):
                    async with http.get(f"{url_a}/v1/status") as resp:
                        if (await resp.json())["running"]:
                            break
                    await asyncio.sleep(0.02)
            proc_a.send_signal(signal.SIGKILL)
            proc_a.wait(timeout=10)

            results = await asyncio.wait_for(asyncio.gather(*(engine.result(rid) for rid in ids)), 120)
            assert sorted(r.request_id for r in results) == sorted(ids)  # 0 lost, each once
            assert all(len(r.images) == 2 for r in results)
            assert all(engine.engine_for(rid).base_url == url_b for rid in on_a)  # moved to the survivor

            # the moved jobs made the same images they would have made anywhere: same request, same seed
            again = [GenerationRequest(prompt=r.prompt, n=2, seed=r.seed, request_id=f"again-{r.request_id}")
                     for r in results if r.request_id in on_a]
            for request, result in zip(again, [r for r in results if r.request_id in on_a], strict=True):
                rerun = await engine.result(await engine.submit(request))
                assert [im.png for im in rerun.images] == [im.png for im in result.images]
            print(f"engine killed mid-batch: {JOBS} jobs, {len(on_a)} moved, 0 lost, 0 duplicated")
        finally:
            await engine.close()
