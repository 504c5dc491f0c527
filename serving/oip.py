"""The Open Inference Protocol routes the gateway lets through, and its binary tensors as JSON.

The gateway forwards a request to a model server only when its *raw* path (as the client sent
it, before percent-decoding) is one of the routes below with a model name made of
``[A-Za-z0-9][A-Za-z0-9._-]*`` (no ``..``, no encoded ``/``): whatever else the model server
serves (its repository extension, ``/metrics``, ``/docs``) is never reachable through it.

:func:`json_body` turns a V2 request or response sent with the binary tensor data extension
(``Inference-Header-Content-Length`` + raw bytes after the JSON header, as kserve's
``InferenceRESTClient`` and tritonclient send) into the JSON form of the same tensors, decoded by
kserve's own ``InferRequest``/``InferResponse``, so the inference log gets a JSON document.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from typing import Any

import orjson

__all__ = ["Match", "match_route", "json_body", "without_binary_scores", "HEADER_LENGTH", "NAME_PATTERN"]

HEADER_LENGTH = "inference-header-content-length"
NAME_PATTERN = r"[A-Za-z0-9][A-Za-z0-9._-]*"
_N = NAME_PATTERN
_V = rf"(?:/versions/(?P<version>{_N}))?"
_GET = ("GET", "HEAD")
# (pattern on the raw path, methods, kind): "infer" is logged and split; "get" goes to the primary
_ROUTES: list[tuple[re.Pattern[str], tuple[str, ...], str]] = [
    (re.compile(r"/"), _GET, "get"),
    (re.compile(r"/v1/models"), _GET, "get"),
    (re.compile(rf"/v1/models/(?P<name>{_N})"), _GET, "get"),
    (re.compile(rf"/v1/models/(?P<name>{_N}):predict"), ("POST",), "infer"),
    (re.compile(r"/v2"), _GET, "get"),
    (re.compile(r"/v2/health/(?:live|ready)"), _GET, "get"),
    (re.compile(rf"/v2/models/(?P<name>{_N}){_V}"), _GET, "get"),
    (re.compile(rf"/v2/models/(?P<name>{_N}){_V}/ready"), _GET, "get"),
    (re.compile(rf"/v2/models/(?P<name>{_N}){_V}/infer"), ("POST",), "infer"),
]
ROUTES_HELP = ("GET /, GET /v1/models, GET /v1/models/{name}, POST /v1/models/{name}:predict, GET /v2, "
               "GET /v2/health/live|ready, GET /v2/models/{name}[/versions/{v}][/ready], "
               "POST /v2/models/{name}[/versions/{v}]/infer")


@dataclass(frozen=True)
class Match:
    """What a request may do: ``kind`` "infer" or "get", else ``status``/``error`` (and ``allow`` for 405)."""

    kind: str | None = None
    path: str = ""
    name: str | None = None
    status: int = 200
    error: str = ""
    allow: str = ""


def match_route(method: str, raw_path: bytes | str, served: str | None) -> Match:
    """Check a request against the allow-list; ``served`` is the one model name this gateway serves
    (None: any name passes, for a gateway that dispatches by the name itself)."""
    path = raw_path.decode("latin-1") if isinstance(raw_path, bytes) else raw_path
    path = path.split("?", 1)[0]
    for pattern, methods, kind in _ROUTES:
        found = pattern.fullmatch(path)
        if found is None:
            continue
        groups = found.groupdict()
        for part in (groups.get("name"), groups.get("version")):
            if part is not None and ".." in part:
                return Match(status=404, error=f"no route {path!r:.200}: a model name or version may not hold '..'")
        if method not in methods:
            return Match(status=405, error=f"{method} is not allowed on {path}; use {' or '.join(methods)}",
                         allow=", ".join(methods))
        name = groups.get("name")
        if name is not None and served is not None and name != served:
            return Match(status=404, error=f"model {name!r} is not served here; this gateway serves {served!r}")
        return Match(kind=kind, path=path, name=name)
    return Match(status=404, error=f"no route {method} {path!r:.200} here; the gateway forwards only the Open "
                                   f"Inference Protocol routes ({ROUTES_HELP}), model names matching {NAME_PATTERN}")


def _infer_types() -> Any:
    """kserve's ``infer_type`` module (heavy; imported on the first binary body, off the request path)."""
    if "kserve.protocol.infer_type" not in sys.modules:
        argv, sys.argv = sys.argv, sys.argv[:1]  # kserve.model_server parses sys.argv when imported
        try:
            import kserve.protocol.infer_type  # noqa: F401
        finally:
            sys.argv = argv
    return sys.modules["kserve.protocol.infer_type"]


def _json_tensors(header: dict[str, Any], key: str, decoded: list[Any]) -> None:
    """Put the decoded tensors' values in the header's tensors, without the binary size parameter."""
    for doc, tensor in zip(header.get(key) or [], decoded):
        params = doc.get("parameters")
        if isinstance(params, dict) and "binary_data_size" in params:
            values = tensor.data if tensor.data is not None else tensor.as_numpy().tolist()
            doc["data"] = [v.decode("utf-8", "replace") if isinstance(v, bytes) else v for v in values]
            params.pop("binary_data_size")
            if not params:
                doc.pop("parameters")


def json_body(body: bytes, header_length: int, kind: str, model_name: str = "") -> bytes:
    """A V2 body sent with binary tensors (``kind`` "request" or "response") as one JSON document.

    Raises ``ValueError`` when the body does not hold what its header says.
    """
    types = _infer_types()
    try:
        header = orjson.loads(body[:header_length])
        if kind == "request":
            decoded = types.InferRequest.from_bytes(body, header_length, model_name).inputs
        else:
            decoded = types.InferResponse.from_bytes(body, header_length).outputs
    except Exception as exc:  # noqa: BLE001 - kserve raises several kinds for a malformed body
        raise ValueError(f"binary {kind} body not decodable: {exc}") from exc
    _json_tensors(header, "inputs" if kind == "request" else "outputs", decoded)
    return orjson.dumps(header, option=orjson.OPT_SERIALIZE_NUMPY)


def without_binary_scores(body: bytes, header_length: int, scores: str = "scores") -> tuple[bytes, int]:
    """A binary V2 response without its ``scores`` output (the gateway asked for them, the client did
    not): the JSON header and the raw bytes of the other outputs, and the new header length."""
    header = orjson.loads(body[:header_length])
    outputs, chunks, start = [], [], header_length
    for out in header.get("outputs") or []:
        size = (out.get("parameters") or {}).get("binary_data_size")
        chunk = body[start:start + size] if size is not None else b""
        start += size or 0
        if out.get("name") != scores:
            outputs.append(out)
            chunks.append(chunk)
    header["outputs"] = outputs
    head = orjson.dumps(header)
    return head + b"".join(chunks), len(head)
