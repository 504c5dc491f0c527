"""The inference-log sink: an HTTP endpoint for KServe's logger that stores every event durably.

``create_sink_app`` returns a **Starlette** app (FastAPI is a Starlette subclass too, but its
dependency injection and validation cost more per request than the whole store). Other parts of
the monitor add their routes with ``app.add_route(...)``/``app.mount(...)``, or take the routes
from :func:`build_routes` into their own app; the group-commit writer starts lazily on the first
event, so no lifespan wiring is needed there.

Routes:

* ``POST /events`` — one CloudEvent in binary mode (what KServe's logger and the local gateway
  send), one structured event (``application/cloudevents+json``) or a batch
  (``application/cloudevents-batch+json``). Answered 200 only after the events are committed.
* ``POST /feedback`` — ``{"id": <ce-id>, "label": v, "row_index": 0}`` or a list of them.
* ``GET /quality?since=<iso|epoch>&task=`` — quality of labelled predictions per model version.
* ``GET /healthz``, ``GET /readyz``, ``GET /metrics`` (Prometheus text).

Throughput: requests hand their parsed events to a :class:`GroupCommitter`; one writer task
collects everything that arrived while the previous commit ran and stores it in ONE transaction,
then wakes every waiting request. Bad input gets a 4xx JSON ``{"error": ...}`` naming the
problem and is counted in ``driftloop_monitor_events_rejected_total{reason}``; the service keeps
running, and nothing already stored is touched.

Run alone: ``python -m monitoring.sink --store log.db --port 8090``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import gc
import hmac
import logging
import math
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from monitoring.events import (MAX_ID_CHARS, EventError, ParsedEvent, RowSchema, attributes_from_raw_headers,
                               check_numeric, parse_batch, parse_binary_attributes, parse_structured)
from monitoring.group_commit import GroupLoop
from monitoring.labels import label_problem
from monitoring.metrics import MonitorMetrics
from monitoring.store import GroupResult, InferenceStore

__all__ = ["create_sink_app", "build_routes", "SinkApp", "EventsEndpoint", "GroupCommitter", "DEFAULT_MAX_BODY_BYTES",
           "INGEST_TOKEN_ENV", "IngestAuth", "LabelPolicy", "since_param", "sink_http_protocol", "main"]

log = logging.getLogger(__name__)

DEFAULT_MAX_BODY_BYTES = 16 * 1024 * 1024
_BATCH_TYPE = "application/cloudevents-batch+json"
_STRUCTURED_TYPE = "application/cloudevents+json"
INGEST_TOKEN_ENV = "DRIFTLOOP_INGEST_TOKEN"


@dataclass(frozen=True)
class IngestAuth:
    """The ingest bearer token that ``POST /events`` and ``POST /feedback`` (and the monitor's other
    state-changing routes) require.

    ``events``: ``token`` — /events needs it too; ``network`` — /events without an
    ``Authorization`` header is accepted (KServe's logger cannot send one; on a cluster the
    NetworkPolicy is the boundary), a wrong token is still refused. The token comes from
    ``DRIFTLOOP_INGEST_TOKEN``, else ``<workspace>/monitor/ingest.token``.
    """

    token: str
    events: str = "token"

    def refusal(self, authorization: str | None, what: str, *, header_optional: bool = False) -> EventError | None:
        """None when ``authorization`` carries the token; else the 401 to answer, naming what is missing."""
        if not authorization:
            if header_optional:
                return None
            return EventError(401, f"{what} needs 'Authorization: Bearer <ingest token>' ({INGEST_TOKEN_ENV}, or "
                                   "the workspace's monitor/ingest.token)", reason="unauthorized")
        scheme, _, given = authorization.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode("utf-8", "replace"),
                                                                 self.token.encode()):
            return EventError(401, f"{what}: wrong bearer token (expected the ingest token)", reason="unauthorized")
        return None


@dataclass(frozen=True)
class LabelPolicy:
    """What a label must be: the model's ``task`` and, for a classifier, its classes (asked for
    each request: they follow the champion). None classes: any single value is accepted."""

    task: str = "classification"
    classes: Callable[[], list[Any] | None] = lambda: None


def _json(status: int, payload: Any) -> Response:
    return Response(orjson.dumps(payload), status_code=status, media_type="application/json")


class GroupCommitter(GroupLoop[Sequence[ParsedEvent]]):
    """Collects the events of concurrent requests and commits them together (:class:`GroupLoop`).

    ``submit(events)`` returns once the events are durable (or raises ``EventError``). With a
    ``journal`` (a fleet monitor's :class:`monitoring.intake.IntakeJournal`), a request of fewer than
    ``journal.direct_events`` events is durable once in the fleet's journal, committed together with every
    other model's events of the round (the journal moves them into this committer's store in batches,
    before any read of the store); a bigger batch is a commit worth its own and goes straight to the store.
    """

    name = "sink-group-commit"

    def __init__(self, store: InferenceStore, metrics: MonitorMetrics, *, max_group_events: int = 20_000):
        super().__init__(max_group_events=max_group_events)
        self.store = store
        self.metrics = metrics
        self.journal: Any = None  # an IntakeJournal, set by the fleet monitor hosting this model
        # the labelled children once: a fleet's monitor makes many small commits, each counted
        self._requests = metrics.events_ingested.labels(type="request")
        self._responses = metrics.events_ingested.labels(type="response")

    async def submit(self, events: Sequence[ParsedEvent]) -> GroupResult:
        """Store ``events`` (all or nothing) and return what was stored once it is committed."""
        if self.journal is not None and len(events) < self.journal.direct_events:
            return await self.journal.submit(self, events)
        return await self._submit(events, len(events))  # a batch is a commit worth its own (no journal)

    def _commit(self, batch: list[tuple[Sequence[ParsedEvent], asyncio.Future]], size: int) -> None:
        started = time.perf_counter()
        try:
            results = self.store.append_groups([events for events, _ in batch])
        except Exception as exc:  # the database failed: nothing of this batch is acknowledged
            error = self.store_error(exc, size)
            for _, future in batch:
                if not future.done():
                    future.set_exception(error)
            return
        self.metrics.commit_seconds.observe(time.perf_counter() - started)
        self.metrics.commit_group_events.observe(size)
        self.account(results)
        for (_, future), result in zip(batch, results):
            if not future.done():  # the waiting request may have been cancelled (client gone)
                if isinstance(result, EventError):
                    future.set_exception(result)
                else:
                    future.set_result(result)

    @staticmethod
    def store_error(exc: Exception, size: int) -> EventError:
        """The refusal to answer for ``size`` events whose commit raised ``exc`` (logged once here)."""
        if isinstance(exc, EventError):
            log.error("group commit of %d events refused: %s", size, exc.message)
            return exc
        log.exception("group commit of %d events failed", size)
        return EventError(503, f"the store could not commit: {exc}", reason="store_error")

    def account(self, results: Sequence[GroupResult | EventError]) -> None:
        """Count what ``append_groups`` stored (events by type, rows, duplicates)."""
        m = self.metrics
        requests = responses = rows = duplicates = 0
        for result in results:
            if isinstance(result, GroupResult):
                requests += result.requests
                responses += result.responses
                rows += result.rows
                duplicates += result.duplicates
        if requests:
            self._requests.inc(requests)
        if responses:
            self._responses.inc(responses)
        if rows:
            m.rows_stored.inc(rows)
        if duplicates:
            m.events_duplicate.inc(duplicates)


def _count_refusal(metrics: MonitorMetrics, exc: EventError) -> None:
    metrics.events_rejected.labels(reason=exc.reason).inc()
    if exc.status >= 500:
        log.error("refused: %s", exc.message)
    else:
        log.info("refused (%d): %s", exc.status, exc.message)


class EventsEndpoint:
    """``POST /events`` as a bare ASGI app — the hot path.

    A Starlette ``Request``/``Response`` pair, its body stream and the middleware stack cost more
    per event than parsing and storing it; this reads the scope's raw header list once (only the
    ``ce-*`` ones are decoded), receives the body and answers with two ``send`` calls.
    """

    def __init__(self, committer: GroupCommitter, *, model_names: set[str] | None = None,
                 reference_columns: list[str] | None = None, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
                 numeric_columns: list[str] | None = None, auth: IngestAuth | None = None,
                 schema: RowSchema | None = None):
        self.committer = committer
        self.metrics = committer.metrics
        self.model_names = set(model_names) if model_names is not None else None
        self.columns = list(reference_columns) if reference_columns is not None else None
        self.numeric = tuple(numeric_columns) if numeric_columns else None
        self.max_body_bytes = max_body_bytes
        self.auth = auth
        self.schema = schema

    def _authorize(self, scope: dict) -> None:
        if self.auth is None:
            return
        given = next((v.decode("latin-1") for k, v in scope["headers"] if k == b"authorization"), None)
        refusal = self.auth.refusal(given, "POST /events", header_optional=self.auth.events == "network")
        if refusal is not None:
            raise refusal

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        try:
            self._authorize(scope)
            body = await self._body(scope, receive)
            attrs, ctype = attributes_from_raw_headers(scope["headers"])
            if ctype is not None and ctype.startswith(_BATCH_TYPE):
                parsed = parse_batch(body, model_names=self.model_names, reference_columns=self.columns)
            elif ctype is not None and ctype.startswith(_STRUCTURED_TYPE):
                parsed = [parse_structured(_loads_object(body), model_names=self.model_names,
                                           reference_columns=self.columns)]
            else:
                parsed = [parse_binary_attributes(attrs, ctype, body, model_names=self.model_names,
                                                  reference_columns=self.columns)]
            check_numeric(parsed, self.numeric)
            if self.schema is not None:
                self.schema.check(parsed)
            result = await self.committer.submit(parsed)
        except EventError as exc:
            _count_refusal(self.metrics, exc)
            await _send(send, exc.status, orjson.dumps({"error": exc.message}))
            return
        await _send(send, 200, b'{"stored":%d,"duplicates":%d}' % (result.stored, result.duplicates))

    async def _body(self, scope: dict, receive: Any) -> bytes:
        limit = self.max_body_bytes
        for k, v in scope["headers"]:
            if k == b"content-length" and v.isdigit() and int(v) > limit:
                raise EventError(413, f"body of {int(v)} bytes is over the limit of {limit}", reason="too_large")
        message = await receive()
        body = message.get("body", b"")
        if not message.get("more_body", False):
            return body
        chunks = [body]
        size = len(body)
        while message.get("more_body", False):
            message = await receive()
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise EventError(413, f"body is over the limit of {limit} bytes", reason="too_large")
            chunks.append(chunk)
        return b"".join(chunks)


_JSON_HEADERS = [(b"content-type", b"application/json")]


async def _send(send: Any, status: int, body: bytes) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [*_JSON_HEADERS, (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


class SinkApp(Starlette):
    """The sink's Starlette app; ``POST /events`` is dispatched before the middleware stack.

    Everything else (more routes added with ``add_route``/``mount``, lifespan, 404/405) is plain
    Starlette. Mounted under a path (``root_path`` set, as a fleet's monitor mounts each model's), the
    path below it is matched.
    """

    def __init__(self, *args: Any, events: EventsEndpoint, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._events = events

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            path, root = scope["path"], scope.get("root_path")
            if root and path.startswith(root):  # mounted (a fleet's model under /models/<name>): its own path
                path = path[len(root):]
            if path == "/events":
                await self._events(scope, receive, send)
                return
        await super().__call__(scope, receive, send)


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise EventError(413, f"body of {declared} bytes is over the limit of {limit}", reason="too_large")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise EventError(413, f"body is over the limit of {limit} bytes", reason="too_large")
        chunks.append(chunk)
    return b"".join(chunks)


def since_param(value: str | None) -> float | None:
    """A ``since`` query parameter: epoch seconds or an ISO time (naive = UTC); None when absent."""
    if value in (None, ""):
        return None
    try:
        return float(value)
    except ValueError:
        pass
    import pandas as pd

    try:
        ts = pd.Timestamp(value)
    except (ValueError, TypeError) as exc:
        raise EventError(400, f"'since' must be an ISO time or epoch seconds, got {value!r}",
                         reason="bad_query") from exc
    return (ts.tz_localize("UTC") if ts.tzinfo is None else ts).timestamp()


def build_routes(store: InferenceStore, *, metrics: MonitorMetrics, model_names: set[str] | None = None,
                 reference_columns: list[str] | None = None, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
                 task: str = "classification", committer: GroupCommitter | None = None,
                 numeric_columns: list[str] | None = None, auth: IngestAuth | None = None,
                 schema: RowSchema | None = None, labels: LabelPolicy | None = None) -> list[Route]:
    """The sink's routes, sharing one :class:`GroupCommitter` (made here unless given).

    ``auth`` None leaves /events and /feedback open: only for an app embedded behind another
    boundary (tests); the monitor and ``python -m monitoring.sink`` always pass one.
    """
    committer = committer or GroupCommitter(store, metrics)
    events = EventsEndpoint(committer, model_names=model_names, reference_columns=reference_columns,
                            max_body_bytes=max_body_bytes, numeric_columns=numeric_columns, auth=auth, schema=schema)
    policy = labels or LabelPolicy(task)

    def refuse(exc: EventError) -> Response:
        _count_refusal(metrics, exc)
        headers = {"www-authenticate": "Bearer"} if exc.status == 401 else None
        return Response(orjson.dumps({"error": exc.message}), status_code=exc.status, media_type="application/json",
                        headers=headers)

    async def feedback(request: Request) -> Response:
        try:
            items = await _feedback_items(request, auth, max_body_bytes, policy)
            result = await asyncio.to_thread(store.add_labels, items)
        except EventError as exc:
            return refuse(exc)
        metrics.labels_stored.inc(result.stored)
        return _json(200, {"stored": result.stored, "duplicates": result.duplicates,
                           "unknown_ids": result.unknown_ids})

    async def quality(request: Request) -> Response:
        try:
            since = since_param(request.query_params.get("since"))
            kind = request.query_params.get("task", task)
            if kind not in ("classification", "regression"):
                raise EventError(400, f"task must be classification or regression, got {kind!r}", reason="bad_query")
        except EventError as exc:
            return refuse(exc)
        q = await asyncio.to_thread(store.quality_by_version, since, kind)
        clean = {v: {k: (None if isinstance(x, float) and math.isnan(x) else x) for k, x in d.items()}
                 for v, d in q.items()}
        return _json(200, {"task": kind, "since": since, "versions": clean})

    async def healthz(request: Request) -> Response:
        return _json(200, {"status": "ok"})

    async def readyz(request: Request) -> Response:
        try:
            problem = await asyncio.to_thread(store.health)
            if problem is None:
                await asyncio.to_thread(store.count)
        except Exception as exc:  # noqa: BLE001 - readiness reports any store failure
            problem = getattr(exc, "message", None) or str(exc)
        if problem is not None:
            return _json(503, {"status": "store unavailable", "error": problem})
        return _json(200, {"status": "ready"})

    async def metrics_route(request: Request) -> Response:
        data, ctype = metrics.render()
        return Response(data, media_type=ctype)

    return [
        Route("/events", events, methods=["POST"]),  # an ASGI app: Starlette passes scope/receive/send
        Route("/feedback", feedback, methods=["POST"]),
        Route("/quality", quality, methods=["GET"]),
        Route("/healthz", healthz, methods=["GET"]),
        Route("/readyz", readyz, methods=["GET"]),
        Route("/metrics", metrics_route, methods=["GET"]),
    ]


async def _feedback_items(request: Request, auth: IngestAuth | None, max_body_bytes: int,
                          policy: LabelPolicy) -> list[Any]:
    """The feedback items of a ``POST /feedback``; raises :class:`EventError` (401, 413, 415, 400, 422)
    for a request without the token, of another content type, or with a body or label that cannot be used."""
    if auth is not None and (refusal := auth.refusal(request.headers.get("authorization"),
                                                     "POST /feedback")) is not None:
        raise refusal
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype != "application/json":  # a cross-site form can post text/plain, never application/json
        raise EventError(415, f"POST /feedback takes application/json, got {ctype or 'no content type'!r}",
                         reason="bad_content_type")
    payload = _loads_any(await _read_body(request, max_body_bytes))
    items = payload if isinstance(payload, list) else [payload]
    if not items:
        raise EventError(422, "feedback is an empty list", reason="bad_feedback")
    _check_labels(items, policy)
    return items


def _check_labels(items: list[Any], policy: LabelPolicy) -> None:
    """Refuse (422, naming the item, its label and what is allowed) a label the quality checks cannot use."""
    classes = policy.classes() if policy.task == "classification" else None
    for pos, item in enumerate(items):
        if not isinstance(item, dict) or "id" not in item or "label" not in item:
            raise EventError(422, f"feedback item #{pos}: needs 'id' and 'label'", reason="bad_feedback")
        ident = item["id"]
        if not isinstance(ident, str) or not ident or len(ident) > MAX_ID_CHARS:
            raise EventError(422, f"feedback item #{pos}: 'id' must be a non-empty string of at most "
                                  f"{MAX_ID_CHARS} characters (the ce-id)", reason="bad_feedback")
        problem = label_problem(item["label"], policy.task, classes)
        if problem is not None:
            raise EventError(422, f"feedback for {ident!r}: {problem}", reason="bad_label")


def _loads_any(body: bytes) -> Any:
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise EventError(400, f"body is not JSON: {exc}", reason="bad_json") from exc


def _loads_object(body: bytes) -> dict:
    value = _loads_any(body)
    if not isinstance(value, dict):
        raise EventError(400, "a structured CloudEvent must be a JSON object", reason="bad_payload")
    return value


def create_sink_app(store: InferenceStore, *, metrics: MonitorMetrics, model_names: set[str] | None = None,
                    reference_columns: list[str] | None = None, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
                    task: str = "classification", close_store: bool = False,
                    numeric_columns: list[str] | None = None, auth: IngestAuth | None = None,
                    schema: RowSchema | None = None, labels: LabelPolicy | None = None) -> Starlette:
    """The sink as a Starlette app; ``app.state`` holds ``store``, ``metrics`` and ``committer``.

    ``auth``: the ingest token /events and /feedback require (see :class:`IngestAuth`); ``schema``:
    what each column and prediction must be (:class:`~monitoring.events.RowSchema`, 422 otherwise);
    ``labels``: what a label must be (:class:`LabelPolicy`).
    ``model_names``: the InferenceService names this monitor accepts (others → 404).
    ``reference_columns``: the champion's feature columns (rows must have exactly these; unnamed
    rows are mapped in this order). ``numeric_columns``: those of them that must hold a number or
    null (anything else is refused with a 422 naming the column). On shutdown the writer finishes what is queued; the store is
    closed too when ``close_store``.
    """
    committer = GroupCommitter(store, metrics)
    routes = build_routes(store, metrics=metrics, model_names=model_names, reference_columns=reference_columns,
                          max_body_bytes=max_body_bytes, task=task, committer=committer,
                          numeric_columns=numeric_columns, auth=auth, schema=schema, labels=labels)
    events = next(r.endpoint for r in routes if r.path == "/events")

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        await committer.aclose()
        if close_store:
            store.close()

    from monitoring.openapi import sink_openapi

    document = orjson.dumps(sink_openapi(events_auth=auth.events if auth is not None else "token"))

    async def openapi(request: Request) -> Response:
        return Response(document, media_type="application/json")

    routes.append(Route("/openapi.json", openapi, methods=["GET"]))
    app = SinkApp(routes=routes, lifespan=lifespan, events=events)
    app.state.store = store
    app.state.metrics = metrics
    app.state.committer = committer
    return app


class _OneWriteTransport:
    """A socket transport that holds a response's header block until its body is written — at the
    latest until the event loop's next turn — so that each answer leaves in one ``send()``.

    uvicorn writes the status line and headers, then the body, each straight to the socket: for the
    sink's small answers that is two system calls and two TCP segments per request, and the client
    wakes twice. Everything else passes through unchanged (``100 Continue`` is never held).
    """

    __slots__ = ("_transport", "_held", "_loop")

    def __init__(self, transport: asyncio.Transport) -> None:
        self._transport = transport
        self._held: bytes | None = None
        self._loop = asyncio.get_running_loop()

    def write(self, data: bytes) -> None:
        if self._held is not None:
            data, self._held = self._held + data, None
        elif data[:9] == b"HTTP/1.1 " and data[9:13] != b"100 " and data[-4:] == b"\r\n\r\n":
            self._held = data
            self._loop.call_soon(self._flush)
            return
        self._transport.write(data)

    def _flush(self) -> None:
        if self._held is not None:
            data, self._held = self._held, None
            self._transport.write(data)

    def close(self) -> None:
        self._flush()
        self._transport.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


@functools.cache
def sink_http_protocol() -> type[asyncio.Protocol]:
    """uvicorn's httptools protocol, answering through :class:`_OneWriteTransport`; pass it as
    ``uvicorn.run(..., http=sink_http_protocol())``."""
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    class SinkHttpProtocol(HttpToolsProtocol):
        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(_OneWriteTransport(transport))  # type: ignore[arg-type]

    return SinkHttpProtocol


def main(argv: list[str] | None = None) -> None:
    """Run the sink alone: ``python -m monitoring.sink --store PATH [--port N] ...``."""
    import uvicorn

    p = argparse.ArgumentParser(prog="python -m monitoring.sink", description=__doc__.splitlines()[0])
    p.add_argument("--store", required=True, type=Path, help="SQLite file of the inference log")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8090)
    p.add_argument("--model", action="append", dest="models", help="accepted model name (repeatable)")
    p.add_argument("--columns", help="reference feature columns, comma-separated")
    p.add_argument("--synchronous", default="NORMAL", choices=["OFF", "NORMAL", "FULL", "EXTRA"])
    p.add_argument("--token-file", type=Path, help=f"the ingest token, when {INGEST_TOKEN_ENV} is not set "
                                                  "(default: ingest.token beside the store; made if missing)")
    p.add_argument("--events-auth", default="token", choices=["token", "network"])
    p.add_argument("--log-level", default="warning")
    args = p.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper())
    from driftloop.core.files import private_umask, workspace_token

    private_umask()
    store = InferenceStore(args.store, synchronous=args.synchronous)
    token = workspace_token(args.token_file or args.store.parent / "ingest.token", INGEST_TOKEN_ENV)
    app = create_sink_app(store, metrics=MonitorMetrics(), model_names=set(args.models) if args.models else None,
                          reference_columns=args.columns.split(",") if args.columns else None, close_store=True,
                          auth=IngestAuth(token, args.events_auth))
    gc.freeze()  # the objects of the imports and the app live as long as the process: keep them out of each GC pass
    uvicorn.run(app, host=args.host, port=args.port, loop="uvloop", http=sink_http_protocol(), access_log=False,
                proxy_headers=False, log_level=args.log_level, lifespan="on")


if __name__ == "__main__":
    main()
