"""Parse and flatten the CloudEvents that KServe's inference logger sends.

KServe's logger (and driftloop's local gateway) posts every request and every response as a
CloudEvent v1 in *binary* mode: attributes in ``ce-*`` headers, the V1 or V2 inference payload
as the JSON body. A request and its response share ``ce-id``; pairing them (in the store) gives
one row per instance: the features that went in and the prediction that came out.

Two parsers produce the same attributes:

* :func:`attributes_from_headers` — the hot path. ``cloudevents.http.from_http`` builds a
  ``CloudEvent`` object, re-decodes the body, fills in a ``time`` it invents when the sender
  sent none, and reports a missing ``ce-id`` as "Failed to find specversion". At 5k+ events/s on
  one core that costs a large share of the budget, and its messages do not name the header that
  is missing. This function reads the headers once and names exactly what is wrong.
* :func:`attributes_via_sdk` — the same attributes through ``cloudevents.http.from_http``; the
  tests prove both give the same result on real events built with the ``cloudevents`` package.

Bad events raise :class:`EventError` carrying the HTTP status the sink answers with.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import logging
import math
import re
import time
from collections.abc import Collection, Iterable, KeysView, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote

import orjson

from driftloop.core.errors import MonitorError
from driftloop.core.shadow import REQUEST_ID_HEADER, ROLE_ANNOTATION, SHADOW_ROLE, SHADOW_SUFFIX, VERSION_ANNOTATION

__all__ = [
    "REQUEST_TYPE",
    "RESPONSE_TYPE",
    "REQUIRED_HEADERS",
    "EventError",
    "ParsedEvent",
    "attributes_from_headers",
    "attributes_from_raw_headers",
    "attributes_via_sdk",
    "parse_binary",
    "parse_binary_attributes",
    "parse_structured",
    "parse_batch",
    "check_numeric",
    "check_predictions",
    "RowSchema",
    "MAX_ID_CHARS",
    "flatten_request",
    "flatten_response",
    "shadow_identity",
]

log = logging.getLogger(__name__)

REQUEST_TYPE = "org.kubeflow.serving.inference.request"
RESPONSE_TYPE = "org.kubeflow.serving.inference.response"
_KINDS = {REQUEST_TYPE: "request", RESPONSE_TYPE: "response"}
REQUIRED_HEADERS = ("ce-id", "ce-type", "ce-source", "ce-specversion")
_MAX_ROWS = 100_000  # one inference call with more instances than this is refused (413)
MAX_ID_CHARS = 256  # a ce-id longer than this is refused (400): ids are keys, joined with labels
_INT64 = 2 ** 63
# RFC 3339 date-time (CloudEvents' ``time``): a date, "T", a time, an offset or "Z"
_RFC3339 = re.compile(r"\d{4}-\d{2}-\d{2}[Tt]\d{2}:\d{2}:\d{2}(\.\d+)?([Zz]|[+-]\d{2}:\d{2})")


class EventError(MonitorError):
    """An event the sink refuses; ``status`` is the HTTP status, ``reason`` a short metric label."""

    def __init__(self, status: int, message: str, *, reason: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.reason = reason or _reason_for(status)


def _reason_for(status: int) -> str:
    return {400: "bad_request", 404: "unknown_model", 413: "too_large", 422: "unprocessable"}.get(status, "error")


@dataclass(slots=True)
class ParsedEvent:
    """One accepted CloudEvent, flattened.

    ``rows`` holds the feature rows of a request (dicts column → value), ``predictions`` the
    per-instance predictions of a response; the other is ``None``. ``request_key`` joins a shadow's
    answer with the primary's (see :func:`shadow_identity`).
    """

    id: str
    kind: str  # "request" | "response"
    source: str
    model_name: str
    model_version: str | None
    role: str | None
    attributes: dict[str, Any]  # CloudEvent attributes (ce-* headers without the prefix, datacontenttype)
    body: bytes
    rows: list[dict[str, Any]] | None = None
    predictions: list[Any] | None = None
    received_at: float = field(default_factory=time.time)
    request_key: str | None = None  # the request's X-Request-Id (KServe's ``metadata``); set for every shadow event

    @property
    def n(self) -> int:
        """Number of instances carried by the event."""
        return len(self.rows if self.rows is not None else self.predictions or [])


# --------------------------------------------------------------------------- attributes


def attributes_from_headers(headers: Mapping[str, str]) -> dict[str, str]:
    """CloudEvent attributes of a binary-mode event from its (lower-cased) HTTP headers.

    Returns ``{"id", "type", "source", "specversion", <extensions>...}`` — the same keys
    ``cloudevents.http.from_http(...).get_attributes()`` gives, without ``datacontenttype``/
    invented ``time``. Raises ``EventError(400)`` naming the first missing required header.
    """
    attrs = {k[3:]: (_percent_decoded(v) if "%" in v else v) for k, v in headers.items() if k[:3] == "ce-"}
    _require(attrs, "header 'ce-")
    return attrs


def _percent_decoded(value: str) -> str:
    """A ``ce-*`` header value as the CloudEvents HTTP binding sends it (percent-encoded UTF-8), decoded."""
    try:
        return unquote(value, errors="strict")
    except UnicodeDecodeError as exc:
        raise EventError(400, f"CloudEvent header value {value[:80]!r} is not percent-encoded UTF-8",
                         reason="bad_header") from exc


def attributes_from_raw_headers(raw: Iterable[tuple[bytes, bytes]]) -> tuple[dict[str, str], str | None]:
    """Attributes and content type straight from an ASGI scope's header list (lower-case bytes).

    The sink's hot path: one pass, decoding only the ``ce-*`` headers; the same attributes as
    :func:`attributes_from_headers` on the decoded headers. Not validated here:
    :func:`parse_binary_attributes` checks the required ones.
    """
    attrs: dict[str, str] = {}
    ctype = None
    for k, v in raw:
        if k[:3] == b"ce-":
            value = v.decode("latin-1")
            attrs[k[3:].decode("latin-1")] = _percent_decoded(value) if "%" in value else value
        elif k == b"content-type":
            ctype = v.decode("latin-1")
    return attrs, ctype


def _require(attrs: Mapping[str, Any], what: str) -> None:
    for name in ("id", "type", "source", "specversion"):
        if not attrs.get(name):
            raise EventError(400, f"missing CloudEvent {what}{name}'", reason="missing_header")
    if attrs["specversion"] != "1.0":
        raise EventError(400, f"unsupported CloudEvent specversion {attrs['specversion']!r} (expected '1.0')",
                         reason="bad_header")
    ce_id = attrs["id"]
    if not isinstance(ce_id, str) or len(ce_id) > MAX_ID_CHARS:
        size = len(ce_id) if isinstance(ce_id, str) else type(ce_id).__name__
        raise EventError(400, f"CloudEvent {what}id' must be a string of at most {MAX_ID_CHARS} characters "
                              f"(got {size})", reason="bad_header")
    when = attrs.get("time")
    if when is not None and not _is_rfc3339(when):
        raise EventError(400, f"CloudEvent {what}time' must be an RFC 3339 timestamp, got {str(when)[:80]!r}",
                         reason="bad_header")


def _is_rfc3339(value: Any) -> bool:
    if not isinstance(value, str) or not _RFC3339.fullmatch(value):
        return False
    try:
        dt.datetime.fromisoformat(value.upper().replace("Z", "+00:00"))
    except ValueError:  # e.g. month 13, hour 25
        return False
    return True


def attributes_via_sdk(headers: Mapping[str, str], body: bytes) -> dict[str, str]:
    """The same attributes as :func:`attributes_from_headers`, parsed by ``cloudevents.http.from_http``."""
    from cloudevents.exceptions import GenericException
    from cloudevents.http import from_http

    try:
        event = from_http(dict(headers), body, data_unmarshaller=lambda b: b)
    except GenericException as exc:
        raise EventError(400, f"not a CloudEvent: {exc}", reason="missing_header") from exc
    attrs = {k: str(v) for k, v in event.get_attributes().items()}
    attrs.pop("datacontenttype", None)
    if "ce-time" not in headers:
        attrs.pop("time", None)  # the SDK invents one when the sender sent none
    return attrs


# --------------------------------------------------------------------------- flattening


def _loads(body: bytes | str) -> Any:
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise EventError(400, f"body is not JSON: {exc}", reason="bad_json") from exc


def _tensor_rows(data: Any, shape: Any, name: str) -> list[Any]:
    """A V2 tensor's data as one entry per instance (flat data reshaped by ``shape``)."""
    if not isinstance(data, list):
        raise EventError(422, f"tensor {name!r}: 'data' must be a list", reason="bad_payload")
    if data and isinstance(data[0], list):  # already nested, row-major
        return data
    if isinstance(shape, list) and len(shape) == 2 and isinstance(shape[1], int) and shape[1] > 1:
        k = shape[1]
        if len(data) % k:
            raise EventError(422, f"tensor {name!r}: {len(data)} values do not fit shape {shape}", reason="bad_payload")
        return [data[i:i + k] for i in range(0, len(data), k)]
    return data


_REFERENCE_SETS: dict[int, tuple[list[str], frozenset[str]]] = {}


def _reference_set(reference: list[str]) -> frozenset[str]:
    """``frozenset(reference)``, built once per reference list (the sink passes the same list each time)."""
    hit = _REFERENCE_SETS.get(id(reference))
    if hit is None or hit[0] is not reference:
        if len(_REFERENCE_SETS) > 64:
            _REFERENCE_SETS.clear()
        hit = _REFERENCE_SETS[id(reference)] = (reference, frozenset(reference))
    return hit[1]


def _check_columns(got: Iterable[str], reference: list[str] | None) -> None:
    if reference is None:
        return
    ref_set = _reference_set(reference)
    got_set = got if isinstance(got, KeysView) else set(got)
    if got_set != ref_set:
        got_set = set(got_set)
        parts = []
        if ref_set - got_set:
            parts.append(f"missing {sorted(ref_set - got_set)}")
        if got_set - ref_set:
            parts.append(f"unexpected {sorted(got_set - ref_set)}")
        raise EventError(422, "columns do not match the reference: " + ", ".join(parts), reason="columns")


def _positional(rows: list[list[Any]], reference: list[str] | None) -> list[dict[str, Any]]:
    width = len(rows[0])
    if any(not isinstance(r, list) or len(r) != width for r in rows):
        raise EventError(422, "instances have different lengths", reason="bad_payload")
    if reference is None:
        names = [str(i) for i in range(width)]
    elif width != len(reference):
        raise EventError(422, f"rows have {width} unnamed columns but the reference has {len(reference)}: "
                              f"{reference}", reason="columns")
    else:
        names = reference
    return [dict(zip(names, r)) for r in rows]


def flatten_request(payload: Any, reference_columns: list[str] | None = None) -> list[dict[str, Any]]:
    """Feature rows of a V1 (``instances``) or V2 (``inputs``) request payload.

    V1 instances may be dicts (named columns) or lists (columns in reference order). V2 inputs are
    either one tensor per column (named by the tensor) or one 2-D tensor of unnamed columns, which
    are mapped by ``reference_columns``. Column names are checked against the reference.
    """
    if not isinstance(payload, dict):
        raise EventError(422, "request body must be a JSON object with 'instances' or 'inputs'", reason="bad_payload")
    if "instances" in payload:
        inst = payload["instances"]
        if not isinstance(inst, list) or not inst:
            raise EventError(422, "'instances' must be a non-empty list", reason="bad_payload")
        if len(inst) > _MAX_ROWS:
            raise EventError(413, f"{len(inst)} instances in one event (at most {_MAX_ROWS})")
        if isinstance(inst[0], dict):
            cols = inst[0].keys()
            _check_columns(cols, reference_columns)
            for r in inst if len(inst) > 1 else ():
                if not isinstance(r, dict) or r.keys() != cols:
                    raise EventError(422, "instances do not all have the same columns", reason="columns")
            return inst
        if isinstance(inst[0], list):
            return _positional(inst, reference_columns)
        raise EventError(422, "each instance must be an object or a list", reason="bad_payload")
    if "inputs" in payload:
        inputs = payload["inputs"]
        if not isinstance(inputs, list) or not inputs or not all(isinstance(t, dict) and "data" in t for t in inputs):
            raise EventError(422, "'inputs' must be a non-empty list of tensors with 'name' and 'data'",
                             reason="bad_payload")
        if len(inputs) == 1:
            t = inputs[0]
            shape = t.get("shape")
            data = _tensor_rows(t["data"], shape, str(t.get("name")))
            if data and isinstance(data[0], list):  # one 2-D tensor of unnamed columns
                return _positional(data, reference_columns)
        names = [str(t.get("name")) for t in inputs]
        _check_columns(names, reference_columns)
        cols = [_tensor_rows(t["data"], t.get("shape"), n) for t, n in zip(inputs, names)]
        n = len(cols[0])
        if any(len(c) != n for c in cols):
            raise EventError(422, "input tensors have different lengths", reason="bad_payload")
        if n > _MAX_ROWS:
            raise EventError(413, f"{n} instances in one event (at most {_MAX_ROWS})")
        return [dict(zip(names, vals)) for vals in zip(*cols)]
    raise EventError(422, "request body has neither 'instances' (V1) nor 'inputs' (V2)", reason="bad_payload")


def check_numeric(events: Sequence["ParsedEvent"], numeric_columns: Collection[str] | None) -> None:
    """Refuse (422, naming the column) a request row whose numeric column holds anything but a
    number or null: the champion's reference says which columns are numeric."""
    if not numeric_columns:
        return
    for pos, ev in enumerate(events):
        if ev.kind != "request" or not ev.rows:
            continue
        for i, row in enumerate(ev.rows):
            for col in numeric_columns:
                value = row.get(col)
                if value is not None and (value.__class__ is bool or not isinstance(value, (int, float))):
                    where = f"event {ev.id!r}" if len(events) == 1 else f"batch event #{pos} (id {ev.id!r})"
                    raise EventError(422, f"{where}, row {i}: column {col!r} is numeric in the reference, got "
                                          f"{value!r}", reason="schema")


_SCALARS = (str, int, float, bool)


@dataclass(frozen=True)
class RowSchema:
    """What the champion's model server accepts, column by column, and what its answers must be.

    ``kinds`` maps a feature column to ``float`` (a finite number), ``int`` (a number within
    int64), ``str``, ``bool`` or ``any`` (a scalar: no object or list); null is a missing value
    and always allowed. ``task`` (``classification``/``regression``) says what a prediction is: a
    finite number for regression, a scalar (or a one-element list of one) for a classifier.
    Built from the champion's reference sample (its dtypes) by the monitor.
    """

    kinds: Mapping[str, str]
    task: str | None = None

    def problem(self, column: str, value: Any) -> str | None:
        """Why ``value`` does not fit ``column`` (None when it does)."""
        if value is None:
            return None
        kind = self.kinds.get(column, "any")
        if kind in ("float", "int"):
            if value.__class__ is bool or not isinstance(value, (int, float)):
                return f"is numeric in the reference, got {_short(value)}"
            if isinstance(value, float) and not math.isfinite(value):
                return f"must be a finite number, got {value!r}"
            if kind == "int" and not -_INT64 <= value < _INT64:
                return f"is an integer column (int64) in the reference, got {_short(value)} (out of range)"
            return None
        if kind == "str":
            return None if isinstance(value, str) else f"is categorical (text) in the reference, got {_short(value)}"
        if kind == "bool":
            return None if value.__class__ is bool else f"is boolean in the reference, got {_short(value)}"
        if not isinstance(value, _SCALARS):
            return f"must be a single value, got {_short(value)}"
        if isinstance(value, float) and not math.isfinite(value):
            return f"must be a finite number, got {value!r}"
        return None

    def check(self, events: Sequence["ParsedEvent"]) -> None:
        """Refuse (422, naming the event, row and column) a value the model server would refuse."""
        kinds = self.kinds
        for pos, ev in enumerate(events):
            if ev.kind == "request" and ev.rows:
                for i, row in enumerate(ev.rows):
                    for col, value in row.items():
                        if col in kinds and (reason := self.problem(col, value)) is not None:
                            raise EventError(422, f"{_where(events, pos, ev)}, row {i}: column {col!r} {reason}",
                                             reason="schema")
        check_predictions(events, self.task)


def _short(value: Any) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= 60 else text[:57] + '...'}"


def _where(events: Sequence["ParsedEvent"], pos: int, ev: "ParsedEvent") -> str:
    return f"event {ev.id!r}" if len(events) == 1 else f"batch event #{pos} (id {ev.id!r})"


def check_predictions(events: Sequence["ParsedEvent"], task: str | None) -> None:
    """Refuse (422) a response whose predictions are not what ``task``'s model answers: a finite
    number for regression, a single value (or a list of one) for a classifier."""
    if task not in ("classification", "regression"):
        return
    for pos, ev in enumerate(events):
        if ev.kind != "response" or not ev.predictions:
            continue
        for i, pred in enumerate(ev.predictions):
            value = pred[0] if isinstance(pred, list) and len(pred) == 1 else pred
            if task == "regression":
                bad = value.__class__ is bool or not isinstance(value, (int, float)) or \
                    (isinstance(value, float) and not math.isfinite(value))
            else:
                bad = not isinstance(value, _SCALARS)
            if bad:
                want = "a finite number" if task == "regression" else "a single class value"
                raise EventError(422, f"{_where(events, pos, ev)}: prediction {i} must be {want} for a {task} "
                                      f"model, got {_short(pred)}", reason="schema")


def flatten_response(payload: Any) -> tuple[list[Any], str | None]:
    """Per-instance predictions of a V1 (``predictions``) or V2 (``outputs``) response, and the
    ``model_version`` the body names (or ``None``)."""
    if not isinstance(payload, dict):
        raise EventError(422, "response body must be a JSON object with 'predictions' or 'outputs'",
                         reason="bad_payload")
    version = payload.get("model_version")
    version = None if version in (None, "") else str(version)
    if "predictions" in payload:
        preds = payload["predictions"]
        if not isinstance(preds, list):
            raise EventError(422, "'predictions' must be a list", reason="bad_payload")
        return preds, version
    if "outputs" in payload:
        outs = payload["outputs"]
        if not isinstance(outs, list) or not outs or not isinstance(outs[0], dict) or "data" not in outs[0]:
            raise EventError(422, "'outputs' must be a non-empty list of tensors", reason="bad_payload")
        t = outs[0]
        return _tensor_rows(t["data"], t.get("shape"), str(t.get("name"))), version
    raise EventError(422, "response body has neither 'predictions' (V1) nor 'outputs' (V2)", reason="bad_payload")


# --------------------------------------------------------------------------- events


def _json_extension(value: Any) -> Any:
    """A JSON-valued extension attribute (KServe's ``metadata``, ``annotations``): a JSON string as
    KServe's logger sends it (sdk-go writes it into the header as is), percent-encoded as the
    CloudEvents HTTP binding allows, or already an object in a structured event. None if unreadable."""
    if not isinstance(value, str):
        return value
    for text in (value, unquote(value) if "%" in value else None):
        if text:
            try:
                return orjson.loads(text)
            except orjson.JSONDecodeError:
                continue
    log.debug("extension value is not JSON: %.80r", value)
    return None


_REQUEST_ID = REQUEST_ID_HEADER.lower()


def _request_id(attrs: Mapping[str, Any]) -> str | None:
    """The ``X-Request-Id`` KServe's logger put into the ``metadata`` extension (``{header: [values]}``)."""
    metadata = _json_extension(attrs.get("metadata")) if attrs.get("metadata") else None
    if not isinstance(metadata, dict):
        return None
    for name, values in metadata.items():
        if str(name).lower() == _REQUEST_ID:
            value = values[0] if isinstance(values, list) and values else values
            return str(value) if isinstance(value, (str, int)) and str(value) else None
    return None


def shadow_identity(attrs: Mapping[str, Any]) -> tuple[str, str | None, str | None, str | None]:
    """(id, role, version, request key) of an event, as the store keeps it.

    * role and version: ``ce-servingrole``/``ce-modelversion`` (the local gateway), else the
      ``driftloop.io/serving-role``/``model-version`` annotations a shadow InferenceService's
      logger sends in the ``annotations`` extension (``metadataAnnotations``);
    * request key: the ``X-Request-Id`` of the ``metadata`` extension (``metadataHeaders``; a
      mirrored copy keeps the header, while each pod's logger makes its own ``ce-id``); a shadow
      event without it falls back to its ``ce-id`` less the ``-shadow`` suffix the gateway adds;
    * id: a shadow's events are kept under ``<ce-id>-shadow``, as the gateway sends them, so a
      client-set ``Ce-Id`` (mirrored with the request) never makes them duplicates of the primary's.
    """
    ce_id = str(attrs["id"])
    role = str(attrs["servingrole"]) if attrs.get("servingrole") else None
    version = str(attrs["modelversion"]) if attrs.get("modelversion") else None
    if (role is None or version is None) and attrs.get("annotations"):
        annotations = _json_extension(attrs["annotations"])
        if isinstance(annotations, dict):
            role = role or (str(annotations[ROLE_ANNOTATION]) if annotations.get(ROLE_ANNOTATION) else None)
            version = version or (str(annotations[VERSION_ANNOTATION]) if annotations.get(VERSION_ANNOTATION)
                                  else None)
    key = _request_id(attrs)
    if role == SHADOW_ROLE:
        if not ce_id.endswith(SHADOW_SUFFIX):
            ce_id += SHADOW_SUFFIX
        key = key or ce_id[:-len(SHADOW_SUFFIX)]
    return ce_id, role, version, key


def _build(attrs: dict[str, Any], body: bytes, payload: Any, *,
           model_names: set[str] | None, reference_columns: list[str] | None,
           received_at: float | None) -> ParsedEvent:
    kind = _KINDS.get(attrs["type"])
    if kind is None:
        raise EventError(400, f"unknown ce-type {attrs['type']!r} (expected {REQUEST_TYPE!r} or {RESPONSE_TYPE!r})",
                         reason="bad_header")
    model = str(attrs.get("inferenceservicename") or "")
    if not model:
        raise EventError(400, "missing CloudEvent header 'ce-inferenceservicename'", reason="missing_header")
    if model_names is not None and model not in model_names:
        raise EventError(404, f"unknown model {model!r} (this monitor watches {sorted(model_names)})",
                         reason="unknown_model")
    rows = preds = None
    ce_id, role, version, key = shadow_identity(attrs)
    if kind == "request":
        rows = flatten_request(payload, reference_columns)
    else:
        preds, body_version = flatten_response(payload)
        version = version or body_version
    return ParsedEvent(
        id=ce_id, kind=kind, source=str(attrs["source"]), model_name=model, model_version=version,
        role=role, attributes=attrs, body=body, rows=rows, predictions=preds,
        received_at=time.time() if received_at is None else received_at, request_key=key,
    )


def parse_binary(headers: Mapping[str, str], body: bytes, *, model_names: set[str] | None = None,
                 reference_columns: list[str] | None = None, received_at: float | None = None,
                 use_sdk: bool = False) -> ParsedEvent:
    """One binary-mode event (lower-cased ``headers`` + raw ``body``) → :class:`ParsedEvent`.

    ``use_sdk=True`` reads the attributes with ``cloudevents.http.from_http`` instead of the fast
    path; the result is the same.
    """
    attrs = attributes_via_sdk(headers, body) if use_sdk else attributes_from_headers(headers)
    return parse_binary_attributes(attrs, headers.get("content-type"), body, model_names=model_names,
                                   reference_columns=reference_columns, received_at=received_at)


def parse_binary_attributes(attrs: dict[str, str], content_type: str | None, body: bytes, *,
                            model_names: set[str] | None = None, reference_columns: list[str] | None = None,
                            received_at: float | None = None) -> ParsedEvent:
    """A binary-mode event whose attributes were already read from its headers."""
    _require(attrs, "header 'ce-")
    payload = _loads(body)
    if content_type is not None:
        attrs["datacontenttype"] = content_type
    return _build(attrs, body, payload, model_names=model_names, reference_columns=reference_columns,
                  received_at=received_at)


def parse_structured(event: Any, *, model_names: set[str] | None = None,
                     reference_columns: list[str] | None = None, received_at: float | None = None) -> ParsedEvent:
    """One structured-mode event (a decoded JSON object with attributes and ``data``).

    The object is consumed: its ``data`` is taken out and the rest kept as the attributes.
    """
    if not isinstance(event, dict):
        raise EventError(400, "each event in a batch must be a JSON object", reason="bad_payload")
    payload = event.pop("data", None)
    encoded = event.pop("data_base64", None)
    _require(event, "attribute '")
    if payload is None and encoded is not None:  # binary data in a structured event (spec: base64)
        if not isinstance(encoded, str):
            raise EventError(400, f"event {event['id']!r}: 'data_base64' must be a base64 string", reason="bad_payload")
        try:
            payload = _loads(base64.b64decode(encoded, validate=True))
        except binascii.Error as exc:
            raise EventError(400, f"event {event['id']!r}: 'data_base64' is not base64: {exc}",
                             reason="bad_payload") from exc
    if payload is None:
        raise EventError(400, f"event {event['id']!r} has neither 'data' nor 'data_base64'", reason="bad_payload")
    if isinstance(payload, str):  # data sent as a JSON string
        payload = _loads(payload)
    return _build(event, orjson.dumps(payload), payload, model_names=model_names,
                  reference_columns=reference_columns, received_at=received_at)


def parse_batch(body: bytes, *, model_names: set[str] | None = None, reference_columns: list[str] | None = None,
                received_at: float | None = None) -> list[ParsedEvent]:
    """A structured-mode batch (``application/cloudevents-batch+json``: a JSON list of events).

    The batch is all-or-nothing: the first bad event raises, naming its position and id.
    """
    items = _loads(body)
    if not isinstance(items, list) or not items:
        raise EventError(400, "a cloudevents batch must be a non-empty JSON list", reason="bad_payload")
    now = time.time() if received_at is None else received_at
    out = []
    for i, item in enumerate(items):
        try:
            out.append(parse_structured(item, model_names=model_names, reference_columns=reference_columns,
                                        received_at=now))
        except EventError as exc:
            ident = item.get("id") if isinstance(item, dict) else None
            raise EventError(exc.status, f"batch event #{i} (id {ident!r}): {exc.message}", reason=exc.reason) from exc
    return out
