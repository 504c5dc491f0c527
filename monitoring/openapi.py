"""The monitor's OpenAPI 3.0 document (``GET /openapi.json``): every route of the sink and the service.

Written out rather than generated: ``POST /events`` is a bare ASGI endpoint taking CloudEvents in
three content types, which no route introspection can describe. Request bodies, the ``ce-*``
headers of binary mode, the bearer tokens and the 4xx/5xx answers are what the code accepts and
answers (``tests/test_trust_monitor.py`` checks the document against the app).
"""

from __future__ import annotations

from typing import Any

from monitoring.events import MAX_ID_CHARS, REQUEST_TYPE, RESPONSE_TYPE

__all__ = ["monitor_openapi", "sink_openapi"]

_ERROR = {"type": "object", "required": ["error"], "properties": {"error": {"type": "string"}}}
_REASONS = {
    400: "malformed request (not JSON, a missing or bad CloudEvent attribute), naming the problem",
    401: "the bearer token is missing or wrong",
    404: "unknown model, or nothing found",
    409: "conflicts with what is stored (a reused ce-id with another body, a second different label)",
    413: "body over the limit",
    415: "wrong content type",
    422: "the payload does not fit the champion's schema or the model's task, naming the column or label",
    503: "the store cannot commit now (e.g. disk full); retry later",
}


def _answers(ok: dict[str, Any], *codes: int) -> dict[str, Any]:
    out: dict[str, Any] = {"200": ok}
    for code in codes:
        out[str(code)] = {"description": _REASONS[code], "content": {"application/json": {"schema": _ERROR}}}
    return out


def _json_ok(description: str, schema: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema or {"type": "object"}}}}


_SCALAR = {"oneOf": [{"type": "string"}, {"type": "number"}, {"type": "boolean"}]}
_PAYLOAD = {
    "type": "object",
    "description": "a V1 ({instances} / {predictions}) or V2 ({inputs} / {outputs}) inference payload",
    "properties": {
        "instances": {"type": "array", "minItems": 1, "items": {}},
        "inputs": {"type": "array", "minItems": 1, "items": {"type": "object"}},
        "predictions": {"type": "array", "items": {}},
        "outputs": {"type": "array", "minItems": 1, "items": {"type": "object"}},
        "model_version": {"type": "string"},
    },
}
_CLOUDEVENT = {
    "type": "object",
    "required": ["id", "type", "source", "specversion"],
    "properties": {
        "id": {"type": "string", "minLength": 1, "maxLength": MAX_ID_CHARS},
        "type": {"type": "string", "enum": [REQUEST_TYPE, RESPONSE_TYPE]},
        "source": {"type": "string", "minLength": 1},
        "specversion": {"type": "string", "enum": ["1.0"]},
        "time": {"type": "string", "format": "date-time"},
        "inferenceservicename": {"type": "string", "minLength": 1},
        "modelversion": {"type": "string"},
        "servingrole": {"type": "string"},
        "datacontenttype": {"type": "string"},
        "data": _PAYLOAD,
        "data_base64": {"type": "string", "format": "byte"},
    },
    "additionalProperties": True,
}
_FEEDBACK_ITEM = {
    "type": "object",
    "required": ["id", "label"],
    "properties": {
        "id": {"type": "string", "minLength": 1, "maxLength": MAX_ID_CHARS, "description": "the prediction's ce-id"},
        "label": {**_SCALAR, "description": "ground truth: one of the model's classes, or a finite number "
                                             "for regression"},
        "row_index": {"type": "integer", "minimum": 0, "default": 0},
        "ts": {"type": "number"},
    },
}


def _header(name: str, description: str) -> dict[str, Any]:
    return {"name": name, "in": "header", "required": False, "description": description,
            "schema": {"type": "string", "maxLength": MAX_ID_CHARS if name == "ce-id" else 2048}}


def _query(name: str, description: str, schema: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"name": name, "in": "query", "required": False, "description": description,
            "schema": schema or {"type": "string"}}


def sink_openapi(*, events_auth: str = "token") -> dict[str, Any]:
    """The sink's routes: /events, /feedback, /quality, /healthz, /readyz, /metrics."""
    ingest = [{"ingestToken": []}]
    events_security = ingest if events_auth == "token" else [{}, *ingest]
    binary = "binary mode (what KServe's logger sends): attributes in ce-* headers (percent-encoded), the payload "
    stored = {"type": "object", "properties": {"stored": {"type": "integer"}, "duplicates": {"type": "integer"}}}
    paths: dict[str, Any] = {
        "/events": {"post": {
            "summary": "Store CloudEvents of inference requests and responses (answered once committed)",
            "security": events_security,
            "parameters": [
                _header("ce-id", "binary mode: the event id, shared by a request and its response"),
                _header("ce-type", f"binary mode: {REQUEST_TYPE} or {RESPONSE_TYPE}"),
                _header("ce-source", "binary mode: the sender"),
                _header("ce-specversion", "binary mode: 1.0"),
                _header("ce-inferenceservicename", "binary mode: the model's InferenceService name"),
                _header("ce-time", "binary mode, optional: RFC 3339"),
                _header("ce-modelversion", "optional: the model version that answered"),
            ],
            "requestBody": {"required": True, "content": {
                "application/json": {"schema": _PAYLOAD, "description": binary + "as the body"},
                "application/cloudevents+json": {"schema": _CLOUDEVENT},
                "application/cloudevents-batch+json": {"schema": {"type": "array", "minItems": 1,
                                                                  "items": _CLOUDEVENT}},
            }},
            "responses": _answers(_json_ok("stored (new events, and repeats of stored ones)", stored),
                                  400, 401, 404, 409, 413, 422, 503),
        }},
        "/feedback": {"post": {
            "summary": "Ground-truth labels of logged predictions, by ce-id and row (one label per row)",
            "security": ingest,
            "requestBody": {"required": True, "content": {"application/json": {"schema": {"oneOf": [
                _FEEDBACK_ITEM, {"type": "array", "minItems": 1, "items": _FEEDBACK_ITEM}]}}}},
            "responses": _answers(_json_ok("labels stored", {"type": "object", "properties": {
                "stored": {"type": "integer"}, "duplicates": {"type": "integer"},
                "unknown_ids": {"type": "array", "items": {"type": "string"}}}}), 400, 401, 409, 413, 415, 422, 503),
        }},
        "/quality": {"get": {
            "summary": "Quality of labelled predictions per model version",
            "parameters": [_query("since", "ISO time or epoch seconds"),
                           _query("task", "classification or regression",
                                  {"type": "string", "enum": ["classification", "regression"]})],
            "responses": _answers(_json_ok("quality per version"), 400, 503),
        }},
        "/healthz": {"get": {"summary": "Liveness", "responses": {"200": _json_ok("alive")}}},
        "/readyz": {"get": {"summary": "Readiness: the store can commit",
                            "responses": _answers(_json_ok("ready"), 503)}},
        "/metrics": {"get": {"summary": "Prometheus metrics", "responses": {"200": {
            "description": "Prometheus text format", "content": {"text/plain": {"schema": {"type": "string"}}}}}}},
    }
    return {
        "openapi": "3.0.3",
        "info": {"title": "driftloop monitor", "version": "1",
                 "description": "The inference-log sink and the drift/quality monitor."},
        "paths": paths,
        "components": {"securitySchemes": {
            "ingestToken": {"type": "http", "scheme": "bearer",
                            "description": "DRIFTLOOP_INGEST_TOKEN, else <workspace>/monitor/ingest.token"},
            "webhookToken": {"type": "http", "scheme": "bearer", "description": "DRIFTLOOP_WEBHOOK_TOKEN"},
        }},
    }


def monitor_openapi(*, events_auth: str = "token") -> dict[str, Any]:
    """The sink's routes plus the monitor's: checks, alerts, reports, shadow, predictions and labelled rows."""
    doc = sink_openapi(events_auth=events_auth)
    ingest, webhook = [{"ingestToken": []}], [{"webhookToken": []}]
    since = _query("since", "ISO time or epoch seconds")
    doc["paths"].update({
        "/alerts/alertmanager": {"post": {
            "summary": "Prometheus Alertmanager webhook: alerts to the retraining trigger",
            "security": webhook,
            "requestBody": {"required": True, "content": {"application/json": {"schema": {
                "type": "object", "required": ["alerts"],
                "properties": {"alerts": {"type": "array", "items": {"type": "object"}}}}}}},
            "responses": _answers(_json_ok("the trigger's decisions"), 400, 401),
        }},
        "/alerts": {"get": {
            "summary": "Recent alerts with their decisions and runs",
            "parameters": [_query("limit", "how many", {"type": "integer", "minimum": 1, "maximum": 10_000})],
            "responses": _answers(_json_ok("alerts"), 400),
        }},
        "/check": {"post": {
            "summary": "Run a drift check now (may raise an alert and start a run)",
            "security": ingest,
            "parameters": [_query("report", "render Evidently's report even without drift",
                                  {"type": "string", "enum": ["true", "false"]})],
            "responses": _answers(_json_ok("the check's outcome"), 401, 409),
        }},
        "/quality/check": {
            "get": {"summary": "The last quality check's outcome (runs nothing)",
                    "responses": {"200": _json_ok("the last outcome, or none yet")}},
            "post": {"summary": "Run a quality check now (may raise an alert and start a run)",
                     "security": ingest, "responses": _answers(_json_ok("the check's outcome"), 401, 409)},
        },
        "/reports/{alert_id}": {"get": {
            "summary": "An alert's Evidently HTML report",
            "parameters": [{"name": "alert_id", "in": "path", "required": True, "schema": {"type": "string"}}],
            "responses": {"200": {"description": "the report", "content": {"text/html": {"schema": {
                "type": "string"}}}}, "404": {"description": _REASONS[404],
                                              "content": {"application/json": {"schema": _ERROR}}}},
        }},
        "/shadow": {"get": {
            "summary": "A shadow's answers joined with the primary's and compared",
            "security": webhook,
            "parameters": [since, _query("version", "the shadow's model version")],
            "responses": _answers(_json_ok("comparison"), 400, 401, 503),
        }},
        "/predictions": {"get": {
            "summary": "Predictions each model version served since a time",
            "security": webhook,
            "parameters": [since, {**_query("versions", "comma-separated model versions"), "required": True},
                           _query("limit", "per version", {"type": "integer", "minimum": 1, "maximum": 50_000})],
            "responses": _answers(_json_ok("predictions per version"), 400, 401, 503),
        }},
        "/labelled": {"get": {
            "summary": "Labelled requests served since a time: features, version, prediction, label",
            "security": webhook + ingest,
            "parameters": [since, _query("model", "the served model's name"),
                           _query("limit", "the latest rows", {"type": "integer", "minimum": 1, "maximum": 50_000})],
            "responses": _answers(_json_ok("labelled rows, oldest first"), 400, 401, 503),
        }},
        "/openapi.json": {"get": {"summary": "This document", "responses": {"200": _json_ok("OpenAPI 3.0")}}},
    })
    return doc
