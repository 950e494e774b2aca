"""``GET /openapi.json`` against the server it describes: every route is described (and nothing else), and a
bounded property-based fuzzer (hypothesis) sends well-formed and malformed requests built from the description to
a live service: every answer is a status the description lists for that route, never a 500, never a hang, and
every JSON success body has the shape the description gives."""

from __future__ import annotations

import asyncio
import http.client
import json
import threading
from urllib.parse import quote, urlsplit

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from engine.api import MAX_IMAGES_PER_REQUEST, MAX_PROMPT_CHARS, SEED_LIMIT
from engine.fake import FakePipeline
from engine.openapi import openapi_spec
from engine.server import ServerSettings, start_server

TOKEN = "openapi-token"
SPEC = openapi_spec()
FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def live():
    """A real service on a loop in a background thread, so hypothesis drives it with plain blocking calls."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="engine-loop", daemon=True)
    thread.start()
    settings_ = ServerSettings(port=0, token=TOKEN, max_queue=256, result_ttl=30, max_body_bytes=8192)
    server = asyncio.run_coroutine_threadsafe(start_server(FakePipeline(), settings_), loop).result(60)
    try:
        yield server
    finally:
        asyncio.run_coroutine_threadsafe(server.stop(), loop).result(60)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)


def call(server, method: str, path: str, body: bytes | None = None, auth: bool = True,
         timeout: float = 15.0) -> tuple[int, str, bytes]:
    """One request; a hang fails the test through the socket timeout."""
    url = urlsplit(server.url)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=timeout)
    headers = {"Content-Type": "application/json"} if body is not None else {}
    if auth:
        headers["Authorization"] = f"Bearer {TOKEN}"
    try:
        conn.request(method, path, body=body, headers=headers)
        resp = conn.getresponse()
        return resp.status, resp.getheader("Content-Type") or "", resp.read()
    finally:
        conn.close()


def resolve(schema: dict) -> dict:
    while "$ref" in schema:
        schema = SPEC["components"]["schemas"][schema["$ref"].rsplit("/", 1)[1]]
    return schema


_TYPES = {"object": dict, "array": list, "string": str, "boolean": bool, "null": type(None),
          "integer": int, "number": (int, float)}


def conforms(schema: dict, value, where: str = "$") -> None:
    """The subset of JSON Schema the description uses: $ref, oneOf, type, enum, required, properties, items."""
    schema = resolve(schema)
    if "oneOf" in schema:
        errors = []
        for option in schema["oneOf"]:
            try:
                conforms(option, value, where)
                return
            except AssertionError as exc:
                errors.append(str(exc))
        raise AssertionError(f"{where}: matches no option: {errors}")
    if "type" in schema:
        types = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
        ok = any(isinstance(value, _TYPES[t]) and not (t in ("integer", "number") and isinstance(value, bool))
                 for t in types)
        assert ok, f"{where}: {value!r} is not {types}"
    if "enum" in schema:
        assert value in schema["enum"], f"{where}: {value!r} not in {schema['enum']}"
    if isinstance(value, dict):
        for key in schema.get("required", []):
            assert key in value, f"{where}: {key} missing"
        for key, sub in schema.get("properties", {}).items():
            if key in value:
                conforms(sub, value[key], f"{where}.{key}")
    if isinstance(value, list) and "items" in schema:
        for i, item in enumerate(value):
            conforms(schema["items"], item, f"{where}[{i}]")


def check_answer(path_key: str, method: str, status: int, ctype: str, body: bytes) -> None:
    responses = SPEC["paths"][path_key][method]["responses"]
    assert status != 500, body[:300]
    assert str(status) in responses, f"{method.upper()} {path_key}: undocumented {status}: {body[:300]!r}"
    content = responses[str(status)].get("content", {})
    if ctype.startswith("application/json"):
        data = json.loads(body)
        if "application/json" in content and "schema" in content["application/json"]:
            conforms(content["application/json"]["schema"], data)


def test_every_route_is_described_and_nothing_else(live):
    status, ctype, body = call(live, "GET", "/openapi.json", auth=False)
    assert status == 200 and json.loads(body) == json.loads(json.dumps(SPEC))
    served = set()
    for route in live.app.router.routes():
        if route.method != "HEAD":
            served.add((route.resource.canonical, route.method.lower()))
    described = {(path, method) for path, ops in SPEC["paths"].items() for method in ops}
    assert served == described
    for ops in SPEC["paths"].values():  # the refs all resolve
        for op in ops.values():
            for answer in op["responses"].values():
                for media in answer.get("content", {}).values():
                    if "schema" in media:
                        resolve(media["schema"])


# -- request bodies: valid ones from the description, and each way of breaking them -----------------------------

_valid_fields = {
    "prompt": st.text(min_size=1, max_size=40).filter(str.strip),
    "n": st.integers(1, MAX_IMAGES_PER_REQUEST),
    "seed": st.integers(0, SEED_LIMIT - 1),
    "params": st.fixed_dictionaries({}, optional={"top_k": st.integers(0, 16384) | st.none(),
                                                  "temperature": st.floats(0.01, 10) | st.none()}),
    "preview_every": st.integers(0, 64),
}
_any_json = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
                         lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner,
                                                                                     max_size=3), max_leaves=8)
_broken_fields = {
    "prompt": st.just("") | st.just("  ") | st.text(min_size=MAX_PROMPT_CHARS + 1, max_size=MAX_PROMPT_CHARS + 5)
    | st.integers() | st.just("a\ud800b"),
    "n": st.integers(-5, 0) | st.integers(MAX_IMAGES_PER_REQUEST + 1, 10**6) | st.text(max_size=3) | st.booleans(),
    "seed": st.integers(-(2**70), -1) | st.integers(SEED_LIMIT, 2**80) | st.floats(),
    "params": _any_json,
    "request_id": st.text(max_size=70),
    "first_index": st.integers(-3, -1) | st.integers(2**31, 2**40),
}


@st.composite
def request_bodies(draw) -> bytes:
    body = draw(st.fixed_dictionaries({"prompt": _valid_fields["prompt"]},
                                      optional={k: v for k, v in _valid_fields.items() if k != "prompt"}))
    mode = draw(st.sampled_from(["valid", "broken", "extra", "missing", "not-an-object", "not-json"]))
    if mode == "broken":
        name = draw(st.sampled_from(sorted(_broken_fields)))
        body[name] = draw(_broken_fields[name])
    elif mode == "extra":
        body[draw(st.text(min_size=1, max_size=10).filter(lambda k: k not in _valid_fields))] = draw(_any_json)
    elif mode == "missing":
        body.pop("prompt")
    elif mode == "not-an-object":
        return json.dumps(draw(st.lists(_any_json, max_size=3) | st.integers() | st.text(max_size=10))).encode()
    elif mode == "not-json":
        return draw(st.binary(max_size=200))
    body.pop("n", None) if draw(st.booleans()) else None
    return json.dumps(body).encode("utf-8", "surrogatepass")


@FUZZ
@given(body=request_bodies(), auth=st.booleans())
@example(body=b'{"prompt": "a red circle", "n": 1, "params": {"top_k": 5}}', auth=True)  # the 202 path, always
def test_fuzz_submissions(live, body, auth):
    status, ctype, answer = call(live, "POST", "/v1/generations", body, auth=auth)
    check_answer("/v1/generations", "post", status, ctype, answer)
    assert auth or status == 401
    if status == 202:
        rid = json.loads(answer)["id"]
        status, ctype, answer = call(live, "GET", f"/v1/generations/{quote(rid, safe='')}")
        check_answer("/v1/generations/{id}", "get", status, ctype, answer)
        assert status == 200


@FUZZ
@given(job=st.text(max_size=80) | st.sampled_from(["", ".", "..", "%", "a/b", "x" * 65]),
       route=st.sampled_from([("get", ""), ("delete", ""), ("get", "/events")]), auth=st.booleans())
def test_fuzz_job_routes_with_any_id(live, job, route, auth):
    method, tail = route
    status, ctype, answer = call(live, method.upper(), f"/v1/generations/{quote(job, safe='')}{tail}", auth=auth)
    if status in (404, 405) and not ctype.startswith("application/json"):
        raise AssertionError(f"a non-JSON {status}: {answer[:200]!r}")
    if status == 404 and json.loads(answer)["error"] in ("Not Found", "Method Not Allowed"):
        return  # aiohttp's router: the id made the path match no route (e.g. an empty id)
    check_answer("/v1/generations/{id}" + tail, method, status, ctype, answer)


@FUZZ
@given(body=st.binary(max_size=300) | st.just(b"{" * 5000) | st.just(b'{"prompt": "' + b"x" * 9000 + b'"}'))
def test_fuzz_admin_and_oversized_bodies(live, body):
    status, ctype, answer = call(live, "POST", "/admin/reload", body)
    check_answer("/admin/reload", "post", status, ctype, answer)
    status, ctype, answer = call(live, "POST", "/v1/generations", body)
    check_answer("/v1/generations", "post", status, ctype, answer)


def test_the_open_routes_and_the_rest_answer_as_described(live):
    for path, key in (("/healthz", "/healthz"), ("/openapi.json", "/openapi.json")):
        status, ctype, answer = call(live, "GET", path, auth=False)
        check_answer(key, "get", status, ctype, answer)
    for path in ("/v1/status", "/v1/info", "/metrics"):
        for auth in (True, False):
            status, ctype, answer = call(live, "GET", path, auth=auth)
            check_answer(path, "get", status, ctype, answer)
            assert status == (200 if auth else 401)
