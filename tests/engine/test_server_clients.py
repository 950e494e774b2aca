"""Named client tokens (ENGINE_TOKENS beside ENGINE_TOKEN): each client reads, follows and cancels only its own
jobs; admin routes take only the operator's token; the tokens never show in settings or errors."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest

from engine.api import EngineError, GenerationRequest
from engine.auth import DEFAULT_CLIENT, Clients, JobOwners, parse_client_tokens
from engine.client import HttpEngine
from engine.fake import FakePipeline
from engine.server import ServerSettings, start_server

ROOT = Path(__file__).resolve().parents[2]
OPERATOR = "operator-token-0"
TOKENS = {"bot-eu": "client-token-eu", "bot-us": "client-token-us"}


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def test_a_job_is_seen_and_cancelled_only_by_the_client_that_made_it():
    fake = FakePipeline(fixed_latency=0.5, chunk_tokens=16, batch_buckets=(1,))
    server = await start_server(fake, ServerSettings(port=0, token=OPERATOR, tokens=TOKENS))
    try:
        async with aiohttp.ClientSession(server.url) as http:
            eu, us, op = bearer("client-token-eu"), bearer("client-token-us"), bearer(OPERATOR)
            async with http.post("/v1/generations", json={"prompt": "eu's", "request_id": "job-eu"}, headers=eu) as r:
                assert r.status == 202
            async with http.post("/v1/generations", json={"prompt": "us's"}, headers=us) as r:
                assert r.status == 202
                us_job = (await r.json())["id"]
            # the other client and the operator's token: the same 404 as an id that never existed
            for other in (us, op):
                for method, path in (("GET", "/v1/generations/job-eu"), ("GET", "/v1/generations/job-eu/events"),
                                     ("DELETE", "/v1/generations/job-eu")):
                    async with http.request(method, path, headers=other) as r:
                        assert r.status == 404, (method, path)
                        assert (await r.json())["error"] == "unknown request id 'job-eu'"
                async with http.get("/v1/generations/never-made", headers=other) as r:
                    assert r.status == 404 and (await r.json())["error"] == "unknown request id 'never-made'"
            async with http.get("/v1/generations/job-eu", headers=eu) as r:  # still there, not cancelled
                assert r.status == 200 and (await r.json())["state"] in ("queued", "running")
            async with http.delete(f"/v1/generations/{us_job}", headers=us) as r:
                assert r.status == 200 and (await r.json())["cancelled"]
            async with http.get("/v1/generations/job-eu", headers=bearer("not-a-client")) as r:
                assert r.status == 401
            async with http.get("/v1/status", headers=us) as r:  # shared, job-less routes: any client
                assert r.status == 200

        # the bot's own client (HttpEngine) with a named token: a full generation, and no reach into others' jobs
        engine = HttpEngine(server.url, "client-token-eu", timeout=10, retries=0)
        other = HttpEngine(server.url, "client-token-us", timeout=10, retries=0)
        try:
            assert len((await engine.result("job-eu", timeout=30)).images) == 9  # the default n
            rid = await engine.submit(GenerationRequest(prompt="a red circle", n=2, seed=1))
            assert not await other.cancel(rid)
            with pytest.raises(EngineError):
                await other.result(rid, timeout=5)
            assert len((await engine.result(rid, timeout=10)).images) == 2
        finally:
            await engine.close()
            await other.close()
    finally:
        await server.stop()


async def test_admin_routes_need_the_operators_token(tmp_path):
    server = await start_server(FakePipeline(), ServerSettings(port=0, token=OPERATOR, tokens=TOKENS))
    try:
        async with aiohttp.ClientSession(server.url) as http:
            body = {"checkpoint_dir": str(tmp_path / "missing")}
            async with http.post("/admin/reload", json=body, headers=bearer("client-token-eu")) as r:
                assert r.status == 403 and "ENGINE_TOKEN" in (await r.json())["error"]
            async with http.post("/admin/reload", json=body, headers=bearer(OPERATOR)) as r:
                assert r.status == 400  # allowed in: the directory is what is wrong
    finally:
        await server.stop()


def test_client_token_settings_are_checked_and_never_shown():
    ok = ServerSettings(host="0.0.0.0", tokens=TOKENS)  # named clients alone may serve a public address
    ok.validate()
    assert "client-token" not in repr(ok) and "bot-eu" in repr(ok)
    assert OPERATOR not in repr(ServerSettings(token=OPERATOR))
    bad = [
        ({"token": "same", "tokens": {"a": "same"}}, "same token"),
        ({"token": OPERATOR, "tokens": {DEFAULT_CLIENT: "x-token"}}, "ENGINE_TOKEN's"),
        ({"tokens": {"a": "  "}}, "must not be empty"),
        ({"tokens": {"bad name": "t-1"}}, "client name"),
        ({"host": "0.0.0.0"}, "without a token"),
    ]
    for fields, message in bad:
        with pytest.raises(ValueError, match=message) as info:
            ServerSettings(**fields).validate()
        assert "x-token" not in str(info.value) and "t-1" not in str(info.value)
    clients = Clients(OPERATOR, TOKENS)
    assert clients.identify(b"client-token-us") == "bot-us" and clients.identify(OPERATOR.encode()) == DEFAULT_CLIENT
    assert clients.identify(b"client-token") is None and clients.names == ["bot-eu", "bot-us", DEFAULT_CLIENT]


def test_parse_client_tokens():
    assert parse_client_tokens(" a:tok-1 , b.2:tok:with:colons ,") == {"a": "tok-1", "b.2": "tok:with:colons"}
    assert parse_client_tokens(None) == {} and parse_client_tokens("") == {}
    for text, message in (("a:tok-1,a:tok-2", "given twice"), ("justatoken-xyz", "name:token"),
                          ("a:", "name:token"), ("a b:tok-3", "client name")):
        with pytest.raises(ValueError, match=message) as info:
            parse_client_tokens(text)
        assert "tok-" not in str(info.value) and "justatoken" not in str(info.value)


def test_job_owners_forget_jobs_the_batcher_forgot():
    alive = set()
    owners = JobOwners(alive=lambda j: j in alive, floor=4)
    for i in range(5):
        owners.record(f"j{i}", "a")
    assert len(owners) == 0  # the 5th passed the floor: a sweep ran, and none of them is alive
    alive.update({"k0", "k1"})
    owners.record("k0", "a")
    owners.record("k1", "b")
    assert owners.allows("k0", "a") and not owners.allows("k0", "b") and owners.allows("k1", "b")
    assert not owners.allows("never", "a") and not owners.allows("never", None)
    for i in range(100):  # bounded: forgotten jobs are swept as the map grows
        owners.record(f"x{i}", "a")
    assert len(owners) <= 5 and owners.allows("k0", "a") and owners.allows("k1", "b")  # the living are kept


def test_python_m_engine_serve_reads_engine_tokens_and_refuses_a_bad_one():
    env = {k: v for k, v in os.environ.items() if not k.startswith("ENGINE_TOKEN")}
    env.update(PYTHONPATH=str(ROOT), ENGINE_TOKENS="bot-eu:secret-eu-1,bot-eu:secret-eu-2")
    proc = subprocess.run([sys.executable, "-m", "engine", "serve", "--fake", "--port", "0"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip() == "error: ENGINE_TOKENS: client 'bot-eu' is given twice"


async def test_python_m_engine_serve_with_engine_tokens():
    from tests.engine.test_server_cli import _env, _served

    env = _env(ENGINE_TOKENS="bot-eu:secret-eu-1,bot-us:secret-us-2")
    async with _served(["--fake", "--window-ms", "5"], env, up_tries=300, stop_timeout=20) as (http, _):
        async with http.post("/v1/generations", json={"prompt": "cli", "n": 1}, headers=bearer("secret-eu-1")) as r:
            assert r.status == 202
            rid = (await r.json())["id"]
        async with http.get(f"/v1/generations/{rid}", headers=bearer("secret-us-2")) as r:
            assert r.status == 404
        for _ in range(200):
            async with http.get(f"/v1/generations/{rid}", headers=bearer("secret-eu-1")) as r:
                assert r.status == 200
                if (await r.json())["state"] == "done":
                    break
            await asyncio.sleep(0.02)
        else:
            raise AssertionError("the job did not finish")
