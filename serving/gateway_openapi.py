"""The gateway's OpenAPI 3.1 document (``GET /openapi.json``): every route it answers, with the request
bodies of the Open Inference Protocol (V1 ``instances``, V2 ``inputs`` tensors), ``/feedback`` and the
``/admin`` routes (bearer token), and the errors each may answer."""

from __future__ import annotations

from typing import Any

from serving.oip import NAME_PATTERN

__all__ = ["gateway_openapi"]

_ERROR = {"$ref": "#/components/schemas/Error"}
_DATATYPES = ["BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64", "FP16", "FP32",
              "FP64", "BYTES"]


def _json(schema: dict[str, Any]) -> dict[str, Any]:
    return {"application/json": {"schema": schema}}


def _answers(ok: dict[str, Any] | None, *errors: int, ok_status: str = "200") -> dict[str, Any]:
    text = {400: "The request is malformed; the message names the problem", 401: "Missing or wrong bearer token",
            404: "Unknown route or model, or unknown request id", 405: "Method not allowed on this route",
            409: "Conflict (a reused request id, or a label given twice)", 413: "The body is too large",
            415: "Unsupported Content-Type or Content-Encoding",
            422: "The monitor refused the labels (e.g. not one of the model's classes); the message names the label",
            502: "The model server failed or is unreachable"}
    out: dict[str, Any] = {ok_status: {"description": "OK", "content": _json(ok or {"type": "object"})}}
    for code in errors:
        out[str(code)] = {"description": text[code], "content": _json(_ERROR)}
    return out


def _name(served: str) -> dict[str, Any]:
    return {"name": "name", "in": "path", "required": True, "description": "the served model's name",
            "schema": {"type": "string", "pattern": f"^{NAME_PATTERN}$", "example": served}}


_VERSION = {"name": "version", "in": "path", "required": True,
            "schema": {"type": "string", "pattern": f"^{NAME_PATTERN}$"}}
_LENGTH = {"name": "Inference-Header-Content-Length", "in": "header", "required": False,
           "description": "binary tensor extension: byte length of the JSON header before the raw tensor bytes",
           "schema": {"type": "integer", "minimum": 1}}


def _get(summary: str, ok: dict[str, Any] | None = None, *errors: int, params: list[Any] | None = None
         ) -> dict[str, Any]:
    op: dict[str, Any] = {"summary": summary, "responses": _answers(ok, *errors)}
    if params:
        op["parameters"] = params
    return {"get": op}


def _admin(summary: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"summary": summary, "security": [{"bearer": []}],
            "requestBody": {"required": True, "content": _json(schema)},
            "responses": _answers({"type": "object"}, 400, 401, 413)}


def _inference_paths(served: str) -> dict[str, Any]:
    """The Open Inference Protocol routes (V1 and V2) forwarded to the model servers."""
    name = _name(served)
    v2_infer = {
        "summary": "V2 (Open Inference Protocol) inference; logged and split between primary and canary",
        "parameters": [name, _LENGTH],
        "requestBody": {"required": True, "content": {
            "application/json": {"schema": {"$ref": "#/components/schemas/InferenceRequest"}},
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}},
        "responses": _answers({"$ref": "#/components/schemas/InferenceResponse"}, 400, 404, 405, 409, 413, 415, 502),
    }
    v2_infer_version = {**v2_infer, "parameters": [name, _VERSION, _LENGTH]}
    meta = {"$ref": "#/components/schemas/ModelMetadata"}
    ready = {"type": "object", "properties": {"name": {"type": "string"}, "ready": {"type": "boolean"}}}
    return {
        "/": _get("Liveness of the model server (KServe V1)", {"type": "object", "properties": {
            "status": {"type": "string"}}}, 502),
        "/v1/models": _get("Models served (V1)", {"type": "object", "properties": {
            "models": {"type": "array", "items": {"type": "string"}}}}, 502),
        "/v1/models/{name}": _get("Model readiness (V1)", ready, 404, 502, params=[name]),
        "/v1/models/{name}:predict": {"post": {
            "summary": "V1 prediction; logged and split between primary and canary",
            "parameters": [name],
            "requestBody": {"required": True, "content": _json({"$ref": "#/components/schemas/V1Request"})},
            "responses": _answers({"$ref": "#/components/schemas/V1Response"}, 400, 404, 405, 409, 413, 415, 502)}},
        "/v2": _get("Server metadata (V2)", {"type": "object"}, 502),
        "/v2/health/live": _get("Server liveness (V2)", {"type": "object", "properties": {"live": {"type": "boolean"}}},
                                502),
        "/v2/health/ready": _get("Server readiness (V2)", {"type": "object", "properties": {
            "ready": {"type": "boolean"}}}, 502),
        "/v2/models/{name}": _get("Model metadata: inputs and outputs with datatype and shape (V2)", meta, 404, 502,
                                  params=[name]),
        "/v2/models/{name}/versions/{version}": _get("Model metadata of a version (V2)", meta, 404, 502,
                                                     params=[name, _VERSION]),
        "/v2/models/{name}/ready": _get("Model readiness (V2)", ready, 404, 502, params=[name]),
        "/v2/models/{name}/versions/{version}/ready": _get("Model readiness of a version (V2)", ready, 404, 502,
                                                           params=[name, _VERSION]),
        "/v2/models/{name}/infer": {"post": v2_infer},
        "/v2/models/{name}/versions/{version}/infer": {"post": v2_infer_version},
    }


def _feedback_paths() -> dict[str, Any]:
    """``POST /feedback``: labels for served requests (the ingest token)."""
    return {
        "/feedback": {"post": {
            "summary": "Ground truth for served requests, joined by x-request-id and forwarded to the monitor "
                       "(bearer: the workspace's ingest token)",
            "security": [{"ingestToken": []}],
            "requestBody": {"required": True, "content": _json({"oneOf": [
                {"$ref": "#/components/schemas/Label"},
                {"type": "array", "minItems": 1, "items": {"$ref": "#/components/schemas/Label"}}]})},
            "responses": {**_answers({"type": "object", "properties": {
                "accepted": {"type": "integer"}, "unknown": {"type": "array", "items": {"type": "string"}},
                "duplicate": {"type": "array", "items": {"type": "string"}}}}, 400, 401, 404, 409, 413, 415, 422),
                "202": {"description": "Kept in the gateway's durable outbox until the monitor takes them",
                        "content": _json({"type": "object"})}}}},
    }


def _admin_paths() -> dict[str, Any]:
    """The ``/admin`` routes: the split, the upstreams, the replicas and the shadow mirror (admin token), status
    and statistics."""
    upstream = {"type": "object", "required": ["url", "version"], "additionalProperties": False,
                "properties": {"url": {"type": "string", "format": "uri"}, "version": {"type": "string", "minLength": 1}}}
    percent = {"type": "number", "minimum": 0, "maximum": 100}
    return {
        "/admin/split": {"put": _admin("Set the canary's share of traffic", {
            "type": "object", "required": ["canary_percent"], "additionalProperties": False,
            "properties": {"canary_percent": percent}})},
        "/admin/upstreams": {"put": _admin("Replace the primary and/or the canary model server", {
            "type": "object", "additionalProperties": False, "anyOf": [{"required": ["primary"]},
                                                                       {"required": ["canary"]}], "properties": {
                "primary": upstream, "canary": {"oneOf": [upstream, {"type": "null"}]}, "canary_percent": percent}})},
        "/admin/replicas": {"put": _admin("Set the primary's extra replicas", {
            "type": "object", "required": ["replicas"], "additionalProperties": False,
            "properties": {"replicas": {"type": "array", "maxItems": 256, "items": upstream}}})},
        "/admin/shadow": {
            "put": _admin("Mirror a share of served requests to the canary (0 stops)", {
                "type": "object", "required": ["percent"], "additionalProperties": False,
                "properties": {"percent": percent}}),
            "get": {"summary": "The shadow mirror's joined statistics", "parameters": [
                {"name": "since", "in": "query", "required": False, "schema": {"type": "string"}}],
                "responses": _answers({"type": "object"}, 400)}},
        "/admin/status": _get("Split, upstreams, replicas, requests in flight"),
        "/admin/stats": {"get": {"summary": "Per-version request, error, latency and quality statistics",
                                 "parameters": [{"name": "since", "in": "query", "required": False,
                                                 "schema": {"type": "string"}}],
                                 "responses": _answers({"type": "object"}, 400)}},
    }


def _service_paths() -> dict[str, Any]:
    """The gateway's own routes: metrics, health and this document."""
    return {
        "/metrics": {"get": {"summary": "Prometheus metrics", "responses": {"200": {
            "description": "OK", "content": {"text/plain": {"schema": {"type": "string"}}}}}}},
        "/healthz": _get("The gateway is up", {"type": "object", "properties": {"ok": {"type": "boolean"}}}),
        "/openapi.json": _get("This document"),
    }


def _schemas() -> dict[str, Any]:
    """The bodies the routes take and answer: OIP requests and responses, labels, errors."""
    tensor = {"type": "object", "required": ["name", "shape", "datatype"], "properties": {
        "name": {"type": "string"}, "shape": {"type": "array", "items": {"type": "integer", "minimum": 0}},
        "datatype": {"type": "string", "enum": _DATATYPES}, "parameters": {"type": ["object", "null"]},
        "data": {"type": "array"}}}
    scalar = [{"type": "string", "maxLength": 256}, {"type": "number"}, {"type": "boolean"}]
    return {
        "Error": {"type": "object", "required": ["error"], "properties": {"error": {"type": "string"}}},
        "V1Request": {"type": "object", "required": ["instances"], "properties": {"instances": {
            "type": "array", "minItems": 1, "items": {"oneOf": [{"type": "object"}, {"type": "array"}]},
            "description": "rows as {column: value} or as lists in the model's column order"}}},
        "V1Response": {"type": "object", "properties": {"predictions": {"type": "array"},
                                                        "model_version": {"type": "string"}}},
        "InferenceRequest": {"type": "object", "required": ["inputs"], "properties": {
            "id": {"type": "string"}, "parameters": {"type": "object"},
            "inputs": {"type": "array", "minItems": 1, "items": tensor},
            "outputs": {"type": "array", "items": {"type": "object", "required": ["name"], "properties": {
                "name": {"type": "string"}, "parameters": {"type": "object"}}}}}},
        "InferenceResponse": {"type": "object", "required": ["model_name", "outputs"], "properties": {
            "model_name": {"type": "string"}, "model_version": {"type": ["string", "null"]}, "id": {"type": "string"},
            "parameters": {"type": ["object", "null"]}, "outputs": {"type": "array", "items": tensor}}},
        "ModelMetadata": {"type": "object", "required": ["name", "platform", "inputs", "outputs"], "properties": {
            "name": {"type": "string"}, "versions": {"type": ["array", "null"], "items": {"type": "string"}},
            "platform": {"type": "string"},
            "inputs": {"type": "array", "items": {"$ref": "#/components/schemas/TensorMetadata"}},
            "outputs": {"type": "array", "items": {"$ref": "#/components/schemas/TensorMetadata"}}}},
        "TensorMetadata": {"type": "object", "required": ["name", "datatype", "shape"], "properties": {
            "name": {"type": "string"}, "datatype": {"type": "string"},
            "shape": {"type": "array", "items": {"type": "integer"}}}},
        "Label": {"type": "object", "required": ["id", "label"], "additionalProperties": False, "properties": {
            "id": {"type": "string", "minLength": 1, "maxLength": 256},
            "label": {"anyOf": [*scalar, {"type": "array", "minItems": 1, "items": {"anyOf": scalar}}]}}},
    }


def gateway_openapi(served: str) -> dict[str, Any]:
    """The document for a gateway serving the model named ``served``."""
    return {
        "openapi": "3.1.0",
        "info": {"title": "driftloop gateway", "version": "1",
                 "description": "Routes a request to the primary or canary model server of one model and logs it. "
                                "Only the routes listed here are answered; nothing else reaches a model server."},
        "paths": {**_inference_paths(served), **_feedback_paths(), **_admin_paths(), **_service_paths()},
        "components": {"schemas": _schemas(),
                       "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer",
                                                      "description": "DRIFTLOOP_GATEWAY_TOKEN"},
                                           "ingestToken": {"type": "http", "scheme": "bearer",
                                                           "description": "DRIFTLOOP_INGEST_TOKEN"}}},
    }
