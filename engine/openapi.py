"""The engine service's API as an OpenAPI 3.1 description, served at ``GET /openapi.json`` (engine.server).

Written from the same constants the server validates with (prompt length, image count, seed range, id pattern),
and checked against the running server by tests/engine/test_openapi.py: every route is described, every status a
route answers is listed, and a bounded property-based fuzzer finds no 5xx and no hang.
"""

from __future__ import annotations

from typing import Any

from engine.api import MAX_IMAGE_CODES, MAX_IMAGE_PREFIX, MAX_IMAGES_PER_REQUEST, MAX_PROMPT_CHARS, SEED_LIMIT

ID_PATTERN = r"^[A-Za-z0-9_.-]{1,64}$"
_STATES = ["queued", "running", "done", "failed", "cancelled"]


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _error(description: str) -> dict[str, Any]:
    return _json({"$ref": "#/components/schemas/Error"}, description)


_UNAUTHORIZED = _error("missing or invalid bearer token (when the service has tokens)")
_NOT_FOUND = _error("no such job, its result outlived the TTL, or another client's job")
_ID_PARAM = {"name": "id", "in": "path", "required": True, "schema": {"type": "string"},
             "description": "the job id (``request_id``)"}
_NUMBER_OR_NULL = {"type": ["number", "null"]}


def openapi_spec() -> dict[str, Any]:
    """The description as a JSON-ready dict."""
    schemas: dict[str, Any] = {
        "Error": {"type": "object", "required": ["error"], "properties": {"error": {"type": "string"}}},
        "SamplingParams": {
            "type": "object", "additionalProperties": False,
            "properties": {
                "condition_scale": {"type": ["number", "null"], "minimum": 0, "maximum": 100},
                "top_k": {"type": ["integer", "null"], "minimum": 0, "maximum": 16384},
                "top_p": {"type": ["number", "null"], "exclusiveMinimum": 0, "maximum": 1},
                "temperature": {"type": ["number", "null"], "minimum": 0.01, "maximum": 10},
            },
        },
        "GenerationRequest": {
            "type": "object", "additionalProperties": False, "required": ["prompt"],
            "properties": {
                "prompt": {"type": "string", "minLength": 1, "maxLength": MAX_PROMPT_CHARS,
                           "description": "not only spaces; valid Unicode (no lone surrogates)"},
                "n": {"type": "integer", "minimum": 1, "maximum": MAX_IMAGES_PER_REQUEST},
                "seed": {"type": "integer", "minimum": 0, "maximum": SEED_LIMIT - 1},
                "params": {"$ref": "#/components/schemas/SamplingParams"},
                "request_id": {"type": "string", "pattern": ID_PATTERN, "not": {"enum": [".", ".."]}},
                "preview_every": {"type": "integer", "minimum": 0},
                "first_index": {"type": "integer", "minimum": 0, "maximum": 2**31 - 1},
                "image_prefix": {
                    "type": "array", "maxItems": MAX_IMAGE_PREFIX,
                    "items": {"type": "integer", "minimum": 0, "maximum": MAX_IMAGE_CODES - 1},
                    "description": "image tokens every candidate starts with; shorter than the model's image and "
                                   "within its codebook (else 400)",
                },
            },
        },
        "Accepted": {
            "type": "object", "required": ["id", "state", "links"],
            "properties": {"id": {"type": "string"}, "state": {"enum": _STATES},
                           "queue_position": {"type": ["integer", "null"]}, "links": {"type": "object"}},
        },
        "JobStatus": {
            "type": "object", "required": ["id", "state", "request", "result"],
            "properties": {
                "id": {"type": "string"}, "state": {"enum": _STATES},
                "queue_position": {"type": ["integer", "null"]},
                "tokens_done": {"type": "integer"}, "tokens_total": {"type": "integer"},
                "error": {"type": ["string", "null"]},
                "request": {"$ref": "#/components/schemas/GenerationRequest"},
                "result": {"oneOf": [{"type": "null"}, {"$ref": "#/components/schemas/GenerationResult"}]},
            },
        },
        "GenerationResult": {
            "type": "object", "required": ["request_id", "images", "checkpoint_id"],
            "properties": {
                "request_id": {"type": "string"}, "prompt": {"type": "string"}, "seed": {"type": "integer"},
                "checkpoint_id": {"type": "string"}, "attention": {"type": ["string", "null"]},
                "timings": {"type": "object", "additionalProperties": {"type": "number"}},
                "images": {"type": "array", "items": {
                    "type": "object", "required": ["index", "rank", "png", "tokens"],
                    "properties": {"index": {"type": "integer"}, "rank": {"type": "integer"},
                                   "png": {"type": "string", "contentEncoding": "base64"},
                                   "tokens": {"type": "array", "items": {"type": "integer"}},
                                   "clip_score": {"type": "number"}, "flagged": {"type": "boolean"},
                                   "critical": {"type": "boolean"},
                                   "safety": {"type": "object", "additionalProperties": {"type": "number"}}}}},
            },
        },
        "Cancelled": {"type": "object", "required": ["id", "cancelled", "state"],
                      "properties": {"id": {"type": "string"}, "cancelled": {"type": "boolean"},
                                     "state": {"type": "string"}}},
        "EngineInfo": {"type": "object", "required": ["checkpoint_id"],
                       "properties": {"checkpoint_id": {"type": "string"}, "attention": {"type": ["string", "null"]},
                                      "dtype": {"type": ["string", "null"]}}},
        "Load": {"type": "object", "required": ["queue_depth", "capacity"],
                 "properties": {"queue_depth": {"type": "integer"}, "capacity": {"type": "integer"},
                                "running": {"type": "integer"}, "uptime_s": {"type": "number"},
                                "results_bytes": {"type": "integer"}}},
        "Health": {"type": "object", "required": ["status"],
                   "properties": {"status": {"enum": ["ok", "draining"]}, "checkpoint_id": {"type": "string"},
                                  "queue_depth": {"type": "integer"}, "warming_up": {"type": "boolean"},
                                  "dtype": {"type": ["string", "null"]}, "attention": {"type": ["string", "null"]}}},
    }
    job = "/v1/generations/{id}"
    paths: dict[str, Any] = {
        "/v1/generations": {"post": {
            "summary": "queue a generation",
            "requestBody": {"required": True, "content": {"application/json": {
                "schema": {"$ref": "#/components/schemas/GenerationRequest"}}}},
            "responses": {
                "202": _json({"$ref": "#/components/schemas/Accepted"}, "queued"),
                "400": _error("malformed JSON or an invalid request"),
                "401": _UNAUTHORIZED,
                "409": _error("this request_id is in use"),
                "413": _error("the body is larger than the service allows"),
                "503": _error("the queue is full (Retry-After) or the service is shutting down"),
            }}},
        job: {
            "get": {"summary": "a job's state, progress and, once done, its result", "parameters": [_ID_PARAM],
                    "responses": {"200": _json({"$ref": "#/components/schemas/JobStatus"}, "the job"),
                                  "401": _UNAUTHORIZED, "404": _NOT_FOUND}},
            "delete": {"summary": "cancel a queued or running job", "parameters": [_ID_PARAM],
                       "responses": {"200": _json({"$ref": "#/components/schemas/Cancelled"}, "what happened"),
                                     "401": _UNAUTHORIZED, "404": _NOT_FOUND}},
        },
        f"{job}/events": {"get": {
            "summary": "Server-Sent Events of the job's progress, ending at a final state", "parameters": [_ID_PARAM],
            "responses": {"200": {"description": "event: progress, data: a progress object",
                                  "content": {"text/event-stream": {"schema": {"type": "string"}}}},
                          "401": _UNAUTHORIZED, "404": _NOT_FOUND,
                          "429": _error("too many event streams open on this job (Retry-After)")}}},
        "/v1/status": {"get": {"summary": "load, for least-loaded routing",
                               "responses": {"200": _json({"$ref": "#/components/schemas/Load"}, "the load"),
                                             "401": _UNAUTHORIZED}}},
        "/v1/info": {"get": {"summary": "the active checkpoint",
                             "responses": {"200": _json({"$ref": "#/components/schemas/EngineInfo"}, "the model"),
                                           "401": _UNAUTHORIZED}}},
        "/admin/reload": {"post": {
            "summary": "serve another checkpoint (the operator's ENGINE_TOKEN only)",
            "requestBody": {"required": True, "content": {"application/json": {"schema": {
                "type": "object", "additionalProperties": False, "required": ["checkpoint_dir"],
                "properties": {"checkpoint_dir": {"type": "string", "minLength": 1}}}}}},
            "responses": {"200": _json({"$ref": "#/components/schemas/EngineInfo"}, "now serving"),
                          "400": _error("malformed body, or a checkpoint that cannot be loaded"),
                          "401": _UNAUTHORIZED,
                          "403": _error("no ENGINE_TOKEN set, or a client's token rather than the operator's"),
                          "413": _error("the body is larger than the service allows"),
                          "500": _error("the reload failed inside the engine"),
                          "503": _error("shutting down")}}},
        "/healthz": {"get": {"summary": "liveness (no token needed)", "security": [],
                             "responses": {"200": _json({"$ref": "#/components/schemas/Health"}, "serving"),
                                           "503": _json({"$ref": "#/components/schemas/Health"}, "draining")}}},
        "/metrics": {"get": {"summary": "Prometheus metrics",
                             "responses": {"200": {"description": "Prometheus text format",
                                                   "content": {"text/plain": {"schema": {"type": "string"}}}},
                                           "401": _UNAUTHORIZED}}},
        "/openapi.json": {"get": {"summary": "this description (no token needed)", "security": [],
                                  "responses": {"200": {"description": "OpenAPI 3.1",
                                                        "content": {"application/json": {}}}}}},
    }
    return {
        "openapi": "3.1.0",
        "info": {"title": "dalle-bot engine", "version": "1",
                 "description": "Generation jobs over HTTP: queue, follow, fetch and cancel (engine/server.py)."},
        "components": {"schemas": schemas,
                       "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
        "security": [{"bearer": []}],
        "paths": paths,
    }
