"""Build KServe-logger CloudEvents with the ``cloudevents`` package, as the logger sends them."""

from __future__ import annotations

import json
from typing import Any

from cloudevents.conversion import to_binary, to_structured
from cloudevents.http import CloudEvent

from monitoring.events import REQUEST_TYPE, RESPONSE_TYPE

COLUMNS = ["tenure", "monthly_spend", "sessions", "support_calls", "latency_ms", "region", "plan"]


def instance(i: int) -> dict[str, Any]:
    """One raw feature row of the churn scenario (a None among the numerics, like production)."""
    return {"tenure": float(i % 50), "monthly_spend": 20.0 + i % 7, "sessions": None if i % 11 == 0 else float(i % 9),
            "support_calls": float(i % 3), "latency_ms": 100.0 + i, "region": ["eu", "us", "apac"][i % 3],
            "plan": None if i % 13 == 0 else ["basic", "pro"][i % 2]}


def attributes(ce_id: str, kind: str, model: str = "churn", version: str | None = None,
               role: str | None = None) -> dict[str, str]:
    attrs = {"id": ce_id, "type": REQUEST_TYPE if kind == "request" else RESPONSE_TYPE,
             "source": "http://localhost:9081/", "inferenceservicename": model, "namespace": "default",
             "component": "predictor", "endpoint": ""}
    if version:
        attrs["modelversion"] = version
    if role:
        attrs["servingrole"] = role
    return attrs


def binary(ce_id: str, kind: str, data: Any, **kw: Any) -> tuple[dict[str, str], bytes]:
    """(headers, body) of a binary-mode event, built by cloudevents.conversion.to_binary."""
    event = CloudEvent(attributes(ce_id, kind, **kw), data)
    headers, body = to_binary(event, data_marshaller=lambda d: json.dumps(d).encode())
    headers = {k.lower(): v for k, v in headers.items()}
    headers["content-type"] = "application/json"
    return headers, body


def structured(ce_id: str, kind: str, data: Any, **kw: Any) -> dict[str, Any]:
    """One structured-mode event as a JSON object (an item of a cloudevents batch)."""
    _, body = to_structured(CloudEvent(attributes(ce_id, kind, **kw), data))
    return json.loads(body)


def pair(ce_id: str, n: int = 1, start: int = 0, version: str = "1", role: str = "champion"):
    """The request and response events of one V1 inference with ``n`` instances."""
    rows = [instance(start + i) for i in range(n)]
    preds = [(start + i) % 2 for i in range(n)]
    return (binary(ce_id, "request", {"instances": rows}),
            binary(ce_id, "response", {"predictions": preds}, version=version, role=role))


def kserve_logged(kind: str, data: Any, *, isvc: str, request_id: str | None, ce_id: str,
                  annotations: dict[str, str] | None = None, namespace: str = "default"
                  ) -> tuple[dict[str, str], bytes]:
    """(headers, body) of one event as KServe's logger sends it (pkg/logger/worker.go, handler.go).

    Binary mode; ``ce-id`` is the pod logger's own (a uuid unless the client sent ``Ce-Id``), so a
    primary's and a shadow's events of one mirrored request differ there. Extensions:
    ``inferenceservicename``, ``namespace``, ``component``, ``endpoint`` (empty), ``recordedtime``,
    ``metadata`` — Go's ``json.Marshal`` of the matched ``metadataHeaders`` as ``{name: [values]}``
    with Go's canonical names (``{}`` when none matched) — and ``annotations``, the JSON of the
    ``metadataAnnotations`` when there are any. sdk-go writes JSON-valued extensions into the headers
    as they are (no percent-encoding), as ``to_binary`` does here.
    """
    attrs = {"id": ce_id, "type": REQUEST_TYPE if kind == "request" else RESPONSE_TYPE,
             "source": "http://localhost:9081/", "recordedtime": "2026-12-01T10:00:00.000000001Z",
             "inferenceservicename": isvc, "namespace": namespace, "component": "predictor", "endpoint": "",
             "metadata": json.dumps({"X-Request-Id": [request_id]} if request_id else {}, separators=(",", ":"))}
    if annotations:
        attrs["annotations"] = json.dumps(annotations, separators=(",", ":"), sort_keys=True)
    headers, body = to_binary(CloudEvent(attrs, data), data_marshaller=lambda d: json.dumps(d).encode())
    headers = {k.lower(): v for k, v in headers.items()}
    headers["content-type"] = "application/json"
    return headers, body
