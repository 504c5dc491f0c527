"""The local gateway: one port in front of the primary and canary model servers.

On the embedded default it plays the part that Knative/Istio and KServe's inference logger
play on a cluster:

* splits traffic between the primary and the canary by the canary percentage (weighted
  random, or sticky by a request header when ``sticky_key`` is set);
* forwards KServe V1 and V2 requests unchanged (bytes in, bytes out) over keep-alive
  ``aiohttp`` connections;
* logs every served request and its response with the attributes the KServe logger sends —
  CloudEvents v1, ``ce-id`` shared by request and response — plus two extension attributes
  KServe's logger leaves out: ``ce-modelversion`` (the MLflow version that answered) and
  ``ce-servingrole`` (``primary`` or ``canary``). Events go through a bounded queue to
  background senders that post them in ``application/cloudevents-batch+json`` batches (see
  :class:`EventLogger`): a slow or dead sink drops events (counted), never predictions;
* returns the request id in ``x-request-id`` and ``ce-id`` so that a client can send the
  ground truth later to ``POST /feedback``; the gateway joins it with the prediction it
  served and keeps per-version quality for the rollout controller;
* balances the primary's traffic over its replicas (``--replica-url``, ``PUT /admin/replicas``:
  more model-server processes of the same version), each request to the one with the fewest
  requests in flight; a replica taken out receives nothing new and ``GET /admin/status`` shows
  its requests in flight until they are answered, so it can be stopped without dropping one;
* exposes ``PUT /admin/split``, ``PUT /admin/upstreams``, ``PUT /admin/replicas`` (all need the
  bearer token from ``DRIFTLOOP_GATEWAY_TOKEN``), ``GET /admin/status``, ``GET /admin/stats`` and
  Prometheus ``/metrics``.

Bad input never takes it down: every refusal is one 4xx with a JSON ``error`` naming the problem,
and what was accepted before (labels, statistics, the split) stays as it was. A pooled
keep-alive connection that the model server closed is retried once on a fresh one, so a stale
connection never reaches the client as a 502; a 502 the gateway makes for a dropped connection
is not counted as the model server's error.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hmac
import json
import logging
import math
import os
import time
import uuid
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Any

import aiohttp
import orjson
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from serving.feedback import FeedbackForwarder
from serving.traffic import CANARY, PRIMARY, Splitter, TrafficStats

__all__ = ["Upstream", "GatewayConfig", "EventLogger", "create_gateway_app", "main", "check_upstream",
           "REQUEST_TYPE", "RESPONSE_TYPE", "ADMIN_TOKEN_ENV"]

log = logging.getLogger(__name__)

REQUEST_TYPE = "org.kubeflow.serving.inference.request"
RESPONSE_TYPE = "org.kubeflow.serving.inference.response"
# KServe's logger names the endpoint of the InferenceService that answered.
_ENDPOINT = {PRIMARY: "default", CANARY: "canary", "shadow": "canary"}
_FORWARD_HEADERS = ("content-type", "accept", "inference-header-content-length")
_BATCH_TYPE = "application/cloudevents-batch+json"
_STRUCTURED_TYPE = "application/cloudevents+json"
# Asks the predictor for class scores (serving.predictor.SCORES_HEADER; not imported: kserve is heavy).
SCORES_HEADER = "x-driftloop-scores"
# The bearer token that PUT /admin/* needs; read from the environment only.
ADMIN_TOKEN_ENV = "DRIFTLOOP_GATEWAY_TOKEN"
_MAX_ADMIN_BYTES = 64 * 1024
_MAX_ID_CHARS = 256
_MAX_LABEL_CHARS = 256
_LOOPBACK = {"localhost", "127.0.0.1", "::1", "0.0.0.0", "::"}


@dataclass
class Upstream:
    """One model server behind the gateway."""

    url: str
    version: str

    def __post_init__(self) -> None:
        self.url = self.url.rstrip("/")


@dataclass
class GatewayConfig:
    name: str
    primary: Upstream
    canary: Upstream | None = None
    canary_percent: float = 0.0
    namespace: str = "default"
    sticky_key: str | None = None
    sink_url: str | None = None
    max_payload_bytes: int = 8 * 1024 * 1024
    upstream_timeout: float = 30.0
    queue_size: int = 10_000
    senders: int = 2  # concurrent batch POSTs to the sink
    sink_timeout: float = 2.0
    sink_linger: float = 0.05  # seconds a sender waits for more events before it posts a batch
    seed: int | None = None
    source: str = field(default="")
    admin_token: str | None = field(default=None, repr=False)
    max_feedback_bytes: int = 1024 * 1024
    feedback_url: str | None = None  # the monitor's POST /feedback; labels are forwarded there
    feedback_outbox: str | None = None  # SQLite file keeping labels the monitor has not taken yet
    replicas: list[Upstream] = field(default_factory=list)  # more servers of the primary's version
    shadow_percent: float = 0.0  # share of served requests mirrored to the canary upstream (serving.shadow)
    shadow_timeout: float = 2.0

    def __post_init__(self) -> None:
        check_percent(self.canary_percent)
        if self.canary_percent > 0 and self.canary is None:
            raise ValueError("a canary percentage above 0 needs a canary upstream")


def check_upstream(doc: Any, role: str, own: tuple[str, int] | None = None) -> Upstream:
    """``{"url": "http(s)://host:port", "version": "<str>"}`` → an :class:`Upstream`, or ``ValueError``
    naming the problem; ``own`` (host, port) is the gateway itself, which may not be its own upstream."""
    from urllib.parse import urlsplit

    if not isinstance(doc, dict) or set(doc) - {"url", "version"} or "url" not in doc or "version" not in doc:
        raise ValueError(f'{role} must be {{"url": "http://host:port", "version": "<model version>"}}, got {doc!r:.120}')
    url, version = doc["url"], doc["version"]
    if not isinstance(version, str) or not version.strip() or len(version) > 200:
        raise ValueError(f"{role} version must be a non-empty string (the MLflow version), got {version!r:.60}")
    if not isinstance(url, str):
        raise ValueError(f"{role} url must be a string, got {url!r:.60}")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"{role} url {url!r:.120} is not a URL: {exc}") from exc
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{role} url {url!r:.120} must be http:// or https:// with a host")
    if parts.query or parts.fragment or parts.username or parts.password:
        raise ValueError(f"{role} url {url!r:.120} must be a plain http(s)://host:port without query or credentials")
    port = port or (443 if parts.scheme == "https" else 80)
    host = parts.hostname
    if own is not None and port == own[1] and (host == own[0] or (host in _LOOPBACK and own[0] in _LOOPBACK)):
        raise ValueError(f"{role} url {url!r:.120} is this gateway itself; requests would loop")
    return Upstream(url, version)


def check_percent(value: Any) -> float:
    """A canary percentage in [0, 100], or ``ValueError`` naming the problem."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"canary_percent must be a number between 0 and 100, got {value!r}")
    if not 0 <= value <= 100:
        raise ValueError(f"canary_percent must be between 0 and 100, got {value}")
    return float(value)


class _Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("driftloop_gateway_requests_total", "Inference requests by role, version and status",
                                ["role", "version", "code"], registry=r)
        self.latency = Histogram("driftloop_gateway_request_seconds", "Upstream round trip by role", ["role"], registry=r,
                                 buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5))
        self.events_sent = Counter("driftloop_gateway_events_sent_total", "Inference-log events accepted by the sink",
                                   registry=r)
        self.events_dropped = Counter("driftloop_gateway_events_dropped_total", "Inference-log events not delivered",
                                      ["reason"], registry=r)
        self.queue_depth = Gauge("driftloop_gateway_event_queue_depth", "Events waiting to be sent", registry=r)
        self.canary_percent = Gauge("driftloop_gateway_canary_percent", "Share of traffic sent to the canary", registry=r)
        self.rejected = Counter("driftloop_gateway_rejected_total", "Requests refused by the gateway", ["reason"],
                                registry=r)
        self.retries = Counter("driftloop_gateway_upstream_retries_total",
                               "Requests sent again because a pooled connection dropped before a response",
                               registry=r)
        self.feedback_outbox = Gauge("driftloop_gateway_feedback_outbox", "Label batches in the gateway's outbox: "
                                     "waiting for the monitor (pending) or refused by it and set aside (dead)",
                                     ["state"], registry=r)


class EventLogger:
    """Sends KServe-logger CloudEvents to the sink from a bounded queue, off the request path.

    Events go out in ``application/cloudevents-batch+json`` batches (structured mode: the same
    attributes KServe's logger sends as ``ce-*`` headers, plus ``modelversion``/``servingrole``,
    with the request or response body spliced in as ``data`` byte for byte): whatever is queued
    when a sender is free goes in one POST, so under load a batch carries many requests and the
    sink stores them in one transaction. A batch the sink refuses with a 4xx (one bad event
    refuses all) is sent again event by event, so only the refused events are dropped. A full
    queue drops the new pair and counts it (``driftloop_gateway_events_dropped_total{reason=
    "queue_full"}``); an unreachable or failing sink drops what it was sent and counts it
    (``sink_unreachable``, ``sink_<status>``). Nothing here ever waits on the request path.
    A sender that finds fewer than ``max_batch`` pairs queued waits ``linger`` seconds for more
    first, so at a low request rate the sink still gets few, large POSTs.
    """

    def __init__(self, sink_url: str, *, name: str, namespace: str, source: str, metrics: _Metrics,
                 queue_size: int = 10_000, senders: int = 2, timeout: float = 2.0, max_batch: int = 256,
                 max_batch_bytes: int = 4 * 1024 * 1024, linger: float = 0.05) -> None:
        self.sink_url = sink_url
        self.name = name
        self.namespace = namespace
        self.source = source
        self.metrics = metrics
        self.queue: asyncio.Queue[tuple[str, str, str, str, bytes, bytes, float]] = asyncio.Queue(maxsize=queue_size)
        self.senders = senders
        self.timeout = timeout
        self.max_batch = max_batch  # request/response pairs per POST
        self.max_batch_bytes = max_batch_bytes
        self.linger = linger
        self._held = 0  # events taken from the queue by a sender and not yet sent or counted
        self._tasks: list[asyncio.Task[None]] = []
        self._session: aiohttp.ClientSession | None = None

    def submit(self, request_id: str, role: str, version: str, path: str, request_body: bytes,
               response_body: bytes) -> None:
        """Queue one request/response pair; drops (and counts) when the queue is full."""
        try:
            self.queue.put_nowait((request_id, role, version, path, request_body, response_body, time.time()))
        except asyncio.QueueFull:
            self.metrics.events_dropped.labels(reason="queue_full").inc(2)

    def start(self) -> None:
        self._session = _session(self.senders, self.timeout)
        self._tasks = [asyncio.create_task(self._send_loop()) for _ in range(self.senders)]

    async def close(self, drain_seconds: float = 2.0) -> None:
        """Give queued events a short time to go out, then stop the senders; what is still queued or
        in flight then is counted as dropped (``reason="shutdown"``)."""
        deadline = time.monotonic() + drain_seconds
        while (not self.queue.empty() or self._held) and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        left = 2 * self.queue.qsize() + self._held
        if left:
            self.metrics.events_dropped.labels(reason="shutdown").inc(left)
            log.warning("gateway stopping: %d inference-log events not sent", left)
        if self._session is not None:
            await self._session.close()

    def events(self, item: tuple[str, str, str, str, bytes, bytes, float]) -> list[bytes]:
        """The pair as two structured-mode CloudEvents (JSON objects, ``data`` = the body as sent)."""
        request_id, role, version, path, request_body, response_body, at = item
        stamp = datetime.fromtimestamp(at, timezone.utc).isoformat()
        out = []
        for ce_type, body in ((REQUEST_TYPE, request_body), (RESPONSE_TYPE, response_body)):
            attrs = orjson.dumps({
                "specversion": "1.0", "id": request_id, "type": ce_type, "source": self.source, "time": stamp,
                "datacontenttype": "application/json", "inferenceservicename": self.name,
                "namespace": self.namespace, "component": "predictor", "endpoint": _ENDPOINT[role],
                "modelversion": version, "servingrole": role, "inferencepath": path,
            })
            out.append(attrs[:-1] + b',"data":' + body + b"}")
        return out

    async def _send_loop(self) -> None:
        while True:
            items = [await self.queue.get()]
            self._held += 2
            try:
                size = len(items[0][4]) + len(items[0][5])
                if self.linger > 0 and self.queue.qsize() < self.max_batch:
                    await asyncio.sleep(self.linger)  # at a low rate, one POST carries many requests, not one
                while len(items) < self.max_batch and size < self.max_batch_bytes and not self.queue.empty():
                    item = self.queue.get_nowait()
                    items.append(item)
                    self._held += 2
                    size += len(item[4]) + len(item[5])
                self.metrics.queue_depth.set(self.queue.qsize())
                events = [e for item in items for e in self.events(item)]
                await self._post(events)
            except Exception:  # never let one batch stop a sender (cancellation goes through: close() counts)
                log.exception("inference-log batch of %d events not sent", 2 * len(items))
                self.metrics.events_dropped.labels(reason="error").inc(2 * len(items))
            self._held -= 2 * len(items)

    async def _post(self, events: list[bytes]) -> None:
        batch = len(events) > 1
        body = b"[" + b",".join(events) + b"]" if batch else events[0]
        ctype = _BATCH_TYPE if batch else _STRUCTURED_TYPE
        assert self._session is not None
        try:
            async with self._session.post(self.sink_url, data=body, headers={"content-type": ctype}) as resp:
                status = resp.status
                # read the answer whole even when it is not used: aiohttp closes a connection whose
                # response body was left unread, and the next batch would pay a new TCP connection
                detail = (await resp.read())[:200]
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            self.metrics.events_dropped.labels(reason="sink_unreachable").inc(len(events))
            log.debug("inference-log sink %s unreachable: %r", self.sink_url, exc)
            return
        if status < 300:
            self.metrics.events_sent.inc(len(events))
        elif batch and 400 <= status < 500 and status != 429:
            for event in events:  # one bad event refuses a batch: find it, keep the others
                await self._post([event])
        else:
            self.metrics.events_dropped.labels(reason=f"sink_{status}").inc(len(events))
            log.warning("inference-log sink refused %d event(s): %s %s", len(events), status,
                        detail.decode(errors="replace"))


def _session(connections: int, timeout: float) -> aiohttp.ClientSession:
    """A keep-alive aiohttp session for loopback HTTP (no proxies from the environment, no cookies)."""
    connector = aiohttp.TCPConnector(limit=connections, keepalive_timeout=30, ttl_dns_cache=300)
    return aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=timeout),
                                 cookie_jar=aiohttp.DummyCookieJar(), auto_decompress=False, trust_env=False,
                                 skip_auto_headers=("User-Agent", "Accept-Encoding"))


class _JSON(JSONResponse):
    """JSON that is always valid: a NaN/Infinity that slipped into a document becomes null instead of
    failing the response (Starlette's JSONResponse refuses them with a 500)."""

    def render(self, content: Any) -> bytes:
        try:
            return json.dumps(content, allow_nan=False, separators=(",", ":")).encode()
        except ValueError:
            return json.dumps(_finite(content), allow_nan=False, separators=(",", ":")).encode()


def _finite(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _error(status: int, message: str, **extra: Any) -> JSONResponse:
    return _JSON({"error": message, **extra}, status_code=status)


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not JSON (send a finite number)")


def _loads(body: bytes, what: str) -> Any:
    """Strict JSON (NaN/Infinity refused), or ``ValueError`` naming ``what``."""
    try:
        return json.loads(body, parse_constant=_no_constants)
    except ValueError as exc:
        raise ValueError(f"{what} is not valid JSON: {exc}") from exc


class _UpstreamFailed(Exception):
    """No usable answer from a model server. ``counts``: the model server's fault (unreachable,
    too slow), as opposed to a connection that dropped under the gateway."""

    def __init__(self, message: str, counts: bool) -> None:
        super().__init__(message)
        self.counts = counts


def _is_json(request: Request) -> bool:
    ctype = request.headers.get("content-type", "")
    return ctype.split(";")[0].strip().lower() == "application/json"


def _label_problem(label: Any) -> str | None:
    """Why a label value is not acceptable, or None: a string, a bool or a finite number, or a
    non-empty list of them (one per row of the request)."""
    values = label if isinstance(label, list) else [label]
    if not values:
        return "label is an empty list"
    for v in values:
        if isinstance(v, str):
            if len(v) > _MAX_LABEL_CHARS:
                return f"label {v[:20]!r}… is longer than {_MAX_LABEL_CHARS} characters"
        elif isinstance(v, float):
            if not math.isfinite(v):
                return f"label {v!r} is not a finite number"
        elif not isinstance(v, (bool, int)):
            return f"label must be a string, a boolean or a number (or a list of them, one per row), got {v!r:.60}"
    return None


class _Gateway:
    """Request handling; one per app."""

    def __init__(self, cfg: GatewayConfig) -> None:
        self.cfg = cfg
        self.metrics = _Metrics()
        self.splitter = Splitter(cfg.canary_percent, seed=cfg.seed)
        self.metrics.canary_percent.set(cfg.canary_percent)
        self.stats = TrafficStats()
        self.client: aiohttp.ClientSession | None = None
        self.events: EventLogger | None = None
        self.forwarder: FeedbackForwarder | None = None
        self.shadow: Any = None  # serving.shadow.ShadowMirror while a shadow phase runs
        self.inflight: dict[str, int] = {}  # requests in flight per upstream URL
        self._rr = 0

    def _pick_primary(self) -> Upstream:
        """The primary replica with the fewest requests in flight (round robin among equals)."""
        pool = [self.cfg.primary, *self.cfg.replicas]
        if len(pool) == 1:
            return pool[0]
        self._rr = (self._rr + 1) % len(pool)
        order = pool[self._rr:] + pool[:self._rr]
        return min(order, key=lambda u: self.inflight.get(u.url, 0))

    # -- lifecycle ------------------------------------------------------------------
    async def startup(self) -> None:
        self.client = _session(256, self.cfg.upstream_timeout)
        if self.cfg.sink_url:
            self.events = EventLogger(self.cfg.sink_url, name=self.cfg.name, namespace=self.cfg.namespace,
                                      source=self.cfg.source or f"driftloop-gateway/{self.cfg.name}",
                                      metrics=self.metrics, queue_size=self.cfg.queue_size,
                                      senders=self.cfg.senders, timeout=self.cfg.sink_timeout,
                                      linger=self.cfg.sink_linger)
            self.events.start()
        if self.cfg.feedback_url and self.cfg.feedback_outbox:
            self.forwarder = FeedbackForwarder(self.cfg.feedback_url, self.cfg.feedback_outbox)
            self.forwarder.start()
            forwarder = self.forwarder  # read when scraped: a dead letter (> 0) is worth an alert
            for state in ("pending", "dead"):
                self.metrics.feedback_outbox.labels(state).set_function(lambda s=state: forwarder.counts()[s])
        if self.cfg.shadow_percent > 0 and self.cfg.canary is not None:
            await self._set_shadow(self.cfg.shadow_percent)

    async def shutdown(self) -> None:
        if self.shadow is not None:
            await self.shadow.close()
        if self.events is not None:
            await self.events.close()
        if self.forwarder is not None:
            await self.forwarder.close()
        if self.client is not None:
            await self.client.close()

    @contextlib.asynccontextmanager
    async def lifespan(self, app: Starlette):  # noqa: ANN201
        await self.startup()
        try:
            yield
        finally:
            await self.shutdown()

    # -- inference ------------------------------------------------------------------
    async def _read_body(self, request: Request, limit: int | None = None) -> bytes | None:
        limit = self.cfg.max_payload_bytes if limit is None else limit
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > limit:
            return None
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                return None
            chunks.append(chunk)
        return b"".join(chunks)

    async def infer(self, request: Request) -> Response:
        body = await self._read_body(request)
        if body is None:
            self.metrics.rejected.labels(reason="too_large").inc()
            return _error(413, f"payload larger than serving.max_payload_bytes ({self.cfg.max_payload_bytes} bytes)")
        headers = request.headers
        request_id = headers.get("x-request-id") or headers.get("ce-id") or uuid.uuid4().hex
        key = headers.get(self.cfg.sticky_key) if self.cfg.sticky_key else None
        role = self.splitter.choose(key)
        upstream = self.cfg.canary if role == CANARY and self.cfg.canary is not None else self.cfg.primary
        if upstream is self.cfg.primary:
            role = PRIMARY
            upstream = self._pick_primary()
        path = request.url.path
        fwd = {k: v for k, v in headers.items() if k in _FORWARD_HEADERS}
        fwd["x-request-id"] = request_id
        client_scores = headers.get(SCORES_HEADER, "").lower() in ("1", "true", "yes")
        if self.events is not None:  # the log gets the class scores (quality estimate); the client only if asked
            fwd[SCORES_HEADER] = "true"
        start = time.perf_counter()
        server_error: bool | None = None
        self.inflight[upstream.url] = self.inflight.get(upstream.url, 0) + 1
        try:
            status, content, resp_headers = await self._send("POST", upstream.url + path, body, fwd)
            ctype = resp_headers.get("content-type", "application/json")
        except _UpstreamFailed as exc:
            status, ctype, server_error = 502, "application/json", exc.counts
            content = json.dumps({"error": f"{role} model server at {upstream.url} failed: {exc}"}).encode()
        finally:
            self.inflight[upstream.url] -= 1
            if not self.inflight[upstream.url]:
                del self.inflight[upstream.url]
        elapsed = time.perf_counter() - start
        self.stats.record(role=role, version=upstream.version, request_id=request_id, status=status,
                          latency_ms=elapsed * 1000.0, body=content, server_error=server_error)
        self.metrics.requests.labels(role, upstream.version, str(status)).inc()
        self.metrics.latency.labels(role).observe(elapsed)
        if self.shadow is not None and role == PRIMARY and 200 <= status < 300:
            self.shadow.offer(request_id, path, body, fwd, content)  # after the answer; never waits on the shadow
        if self.events is not None and 200 <= status < 300:
            self.events.submit(request_id, role, upstream.version, path, body, content)
            if not client_scores:
                content = _without_scores(content)
        return Response(content, status_code=status, media_type=None, headers={
            "content-type": ctype, "x-request-id": request_id, "ce-id": request_id,
            "x-model-version": upstream.version, "x-serving-role": role})

    async def _send(self, method: str, url: str, body: bytes | None = None,
                    headers: dict[str, str] | None = None) -> tuple[int, bytes, Any]:
        """One upstream round trip. A pooled keep-alive connection that the model server closed
        fails before any response byte arrives; that is retried once, on a fresh connection."""
        assert self.client is not None
        for attempt in (1, 2):
            try:
                async with self.client.request(method, url, data=body, headers=headers) as resp:
                    try:
                        content = await resp.read()
                    except asyncio.TimeoutError as exc:
                        raise _UpstreamFailed(f"too slow: {exc!r}", counts=True) from exc
                    except aiohttp.ClientError as exc:
                        raise _UpstreamFailed(f"connection dropped during the response: {exc!r}",
                                              counts=False) from exc
                    return resp.status, content, resp.headers
            except _UpstreamFailed:
                raise
            except aiohttp.ClientConnectorError as exc:
                raise _UpstreamFailed(f"unreachable: {exc!r}", counts=True) from exc
            except asyncio.TimeoutError as exc:  # aiohttp's timeouts are asyncio.TimeoutError subclasses
                raise _UpstreamFailed(f"too slow: {exc!r}", counts=True) from exc
            except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError) as exc:
                if attempt == 1:
                    log.debug("connection to %s dropped before a response (%r); retrying once", url, exc)
                    self.metrics.retries.inc()
                    continue
                raise _UpstreamFailed(f"connection dropped twice before a response: {exc!r}", counts=False) from exc
            except aiohttp.ClientError as exc:
                raise _UpstreamFailed(repr(exc), counts=False) from exc
        raise AssertionError("unreachable")

    async def passthrough(self, request: Request) -> Response:
        """Health, readiness and metadata: answered by the primary."""
        try:
            status, content, headers = await self._send("GET", self.cfg.primary.url + request.url.path)
        except _UpstreamFailed as exc:
            return _error(502, f"primary model server at {self.cfg.primary.url} failed: {exc}")
        return Response(content, status_code=status,
                        headers={"content-type": headers.get("content-type", "application/json")})

    async def models(self, request: Request) -> Response:
        if request.method == "POST":
            return await self.infer(request)
        return await self.passthrough(request)

    # -- feedback -------------------------------------------------------------------
    async def feedback(self, request: Request) -> Response:
        """``{"id": <x-request-id>, "label": <value or one per row>}`` or a list of them.

        Refused whole (4xx, nothing recorded) when the body is not ``application/json`` (a
        cross-site form post cannot send that type), too large, not strict JSON, or an item is
        malformed. Otherwise each item is accepted once per request id; unknown ids and repeats
        are reported, not counted.
        """
        if not _is_json(request):
            self.metrics.rejected.labels(reason="feedback_content_type").inc()
            return _error(415, "feedback must be sent as application/json, got "
                               f"{request.headers.get('content-type') or 'no content-type'!r}")
        body = await self._read_body(request, self.cfg.max_feedback_bytes)
        if body is None:
            self.metrics.rejected.labels(reason="feedback_too_large").inc()
            return _error(413, f"feedback larger than {self.cfg.max_feedback_bytes} bytes; send it in smaller batches")
        try:
            items = self._feedback_items(_loads(body, "feedback"))
        except ValueError as exc:
            self.metrics.rejected.labels(reason="feedback_malformed").inc()
            return _error(400, str(exc))
        try:
            outcome = self.stats.feedback_many(items)
        except ValueError as exc:
            self.metrics.rejected.labels(reason="feedback_rows").inc()
            return _error(400, f"{exc}; nothing was recorded")
        if self.shadow is not None:
            for (rid, label), (kind, _) in zip(items, outcome):
                if kind == "accepted":
                    self.shadow.stats.label(rid, label)
        accepted = sum(1 for kind, _ in outcome if kind == "accepted")
        unknown = [v for kind, v in outcome if kind == "unknown"]
        duplicate = [v for kind, v in outcome if kind == "duplicate"]
        doc = {"accepted": accepted, "unknown": unknown, "duplicate": duplicate}
        if self.forwarder is not None and (accepted or unknown):
            return await self._forward_labels(items, outcome, doc)
        if not accepted and unknown:
            return _error(404, f"unknown request id(s) {', '.join(unknown[:5])}: not served here or expired", **doc)
        if not accepted and duplicate:
            return _error(409, f"request id(s) {', '.join(duplicate[:5])} already have a label; one label per request",
                          **doc)
        return _JSON(doc)

    async def _forward_labels(self, items: list[tuple[str, Any]], outcome: list[tuple[str, str]],
                              doc: dict[str, Any]) -> Response:
        """Send the labels to the monitor (one item per row, with the version that answered); answer
        200 once it stored them, 202 once they are in the durable outbox (see serving.feedback).
        Ids this gateway does not know (served before a restart) go too: the monitor's log knows them."""
        rows = []
        for (rid, label), (kind, value) in zip(items, outcome):
            if kind == "duplicate":
                continue
            version = value if kind == "accepted" else None
            for i, lab in enumerate(label if isinstance(label, list) else [label]):
                rows.append({"id": rid, "row_index": i, "label": lab, **({"model_version": version} if version else {})})
        assert self.forwarder is not None
        result = await self.forwarder.forward(rows)
        if result.outcome == "refused":
            self.metrics.rejected.labels(reason="feedback_monitor_refused").inc()
            detail = result.detail.get("error") if isinstance(result.detail, dict) else result.detail
            return _error(result.status, f"the monitor refused the labels: {detail}", **doc)
        doc = {**doc, "monitor": result.outcome, "rows_forwarded": len(rows)}
        if result.outcome == "stored" and isinstance(result.detail, dict):
            doc["monitor_unknown"] = result.detail.get("unknown_ids", [])  # predictions not logged there yet
        return _JSON(doc, status_code=result.status)

    @staticmethod
    def _feedback_items(doc: Any) -> list[tuple[str, Any]]:
        """The (request id, label) pairs of a feedback body, or ``ValueError`` naming the bad item."""
        shape = 'feedback must be {"id": <request id>, "label": <value>} or a list of them'
        items = doc if isinstance(doc, list) else [doc]
        if not items:
            raise ValueError(f"{shape}; the list is empty")
        out = []
        for i, item in enumerate(items):
            where = f"item {i}: " if isinstance(doc, list) else ""
            if not isinstance(item, dict) or "id" not in item or "label" not in item:
                raise ValueError(f"{where}{shape}")
            if set(item) - {"id", "label"}:
                raise ValueError(f"{where}unknown key(s) {sorted(set(item) - {'id', 'label'})}; {shape}")
            rid = item["id"]
            if not isinstance(rid, str) or not rid or len(rid) > _MAX_ID_CHARS:
                raise ValueError(f"{where}id must be the request's x-request-id (a non-empty string), got {rid!r:.60}")
            problem = _label_problem(item["label"])
            if problem:
                raise ValueError(f"{where}{problem}")
            out.append((rid, item["label"]))
        return out

    # -- admin ----------------------------------------------------------------------
    def status_doc(self) -> dict[str, Any]:
        return {
            "name": self.cfg.name,
            "canary_percent": self.splitter.canary_percent,
            "sticky_key": self.cfg.sticky_key,
            "primary": asdict(self.cfg.primary),
            "canary": asdict(self.cfg.canary) if self.cfg.canary else None,
            "replicas": [asdict(u) for u in self.cfg.replicas],
            "inflight": dict(self.inflight),
            "sink_url": self.cfg.sink_url,
            "events_queued": self.events.queue.qsize() if self.events else 0,
        }

    async def status(self, request: Request) -> Response:
        return _JSON(self.status_doc())

    def _unauthorized(self, request: Request) -> Response | None:
        """401 unless the request carries the admin bearer token."""
        token = self.cfg.admin_token
        if not token:
            self.metrics.rejected.labels(reason="admin_not_configured").inc()
            return _error(401, f"admin endpoints are locked: {ADMIN_TOKEN_ENV} is not set on the gateway")
        given = request.headers.get("authorization", "")
        if not given.lower().startswith("bearer ") or not hmac.compare_digest(given[7:].strip().encode(),
                                                                               token.encode()):
            self.metrics.rejected.labels(reason="admin_unauthorized").inc()
            return _error(401, f"missing or wrong bearer token (the gateway's {ADMIN_TOKEN_ENV})")
        return None

    async def _admin_doc(self, request: Request) -> Any:
        body = await self._read_body(request, _MAX_ADMIN_BYTES)
        if body is None:
            raise ValueError(f"body larger than {_MAX_ADMIN_BYTES} bytes")
        return _loads(body, "body")

    async def split(self, request: Request) -> Response:
        if (denied := self._unauthorized(request)) is not None:
            return denied
        try:
            doc = await self._admin_doc(request)
            if not isinstance(doc, dict) or set(doc) != {"canary_percent"}:
                raise ValueError('expected {"canary_percent": <0-100>}')
            pct = check_percent(doc["canary_percent"])
            if pct > 0 and self.cfg.canary is None:
                raise ValueError("no canary upstream is set; PUT /admin/upstreams first")
        except ValueError as exc:
            return _error(400, str(exc))
        self.splitter.canary_percent = pct
        self.cfg.canary_percent = pct
        self.metrics.canary_percent.set(pct)
        log.info("canary split set to %s%%", pct)
        return _JSON(self.status_doc())

    async def upstreams(self, request: Request) -> Response:
        """Replace primary and/or canary (``{"primary": {"url", "version"}, "canary": {...} | null}``)."""
        if (denied := self._unauthorized(request)) is not None:
            return denied
        own = request.scope.get("server")
        own = (str(own[0]), int(own[1])) if own and own[1] is not None else None
        try:
            doc = await self._admin_doc(request)
            if not isinstance(doc, dict) or not ({"primary", "canary"} & doc.keys()):
                raise ValueError('expected {"primary": {"url": .., "version": ..}} and/or {"canary": {...} | null}')
            if set(doc) - {"primary", "canary", "canary_percent"}:
                raise ValueError(f"unknown key(s) {sorted(set(doc) - {'primary', 'canary', 'canary_percent'})}")
            primary = check_upstream(doc["primary"], "primary", own) if "primary" in doc else self.cfg.primary
            canary = ((check_upstream(doc["canary"], "canary", own) if doc["canary"] is not None else None)
                      if "canary" in doc else self.cfg.canary)
            pct = check_percent(doc.get("canary_percent", self.splitter.canary_percent))
            if canary is None:
                pct = 0.0
        except ValueError as exc:
            return _error(400, f"bad upstreams: {exc}")
        if primary.url != self.cfg.primary.url or primary.version != self.cfg.primary.version:
            self.cfg.replicas = []  # they served the primary that was replaced
        self.cfg.primary, self.cfg.canary = primary, canary
        self.splitter.canary_percent = self.cfg.canary_percent = pct
        self.metrics.canary_percent.set(pct)
        if self.shadow is not None and (canary is None or canary.url != self.shadow.url):
            await self._set_shadow(0.0 if canary is None else self.cfg.shadow_percent)  # the mirror follows the canary
        return _JSON(self.status_doc())

    async def _set_shadow(self, percent: float) -> None:
        from driftloop.core.shadow import SHADOW_SUFFIX
        from serving.shadow import SHADOW, ShadowMirror

        if self.shadow is not None:
            await self.shadow.close()
            self.shadow = None
        if percent > 0 and self.cfg.canary is not None:
            events = self.events
            self.shadow = ShadowMirror(
                self.cfg.canary.url, self.cfg.canary.version, percent, timeout=self.cfg.shadow_timeout,
                seed=self.cfg.seed, log_event=(lambda rid, version, path, body, content: events.submit(
                    f"{rid}{SHADOW_SUFFIX}", SHADOW, version, path, body, content)) if events is not None else None)
            self.shadow.start()
        self.cfg.shadow_percent = percent if self.shadow is not None else 0.0

    async def shadow_route(self, request: Request) -> Response:
        """``PUT {"percent": 0-100}``: mirror that share of served requests to the canary upstream (0 stops);
        ``GET ?since=``: the joined shadow statistics."""
        if request.method == "GET":
            since_raw = request.query_params.get("since")
            try:
                since = _parse_since(since_raw) if since_raw else None
            except ValueError as exc:
                return _error(400, str(exc))
            summary = self.shadow.stats.summary(since) if self.shadow is not None else None
            return _JSON({"percent": self.cfg.shadow_percent, "version": self.cfg.canary.version
                          if self.shadow is not None and self.cfg.canary else None, "stats": summary})
        if (denied := self._unauthorized(request)) is not None:
            return denied
        try:
            doc = await self._admin_doc(request)
            if not isinstance(doc, dict) or set(doc) != {"percent"}:
                raise ValueError('expected {"percent": <0-100>}')
            pct = check_percent(doc["percent"])
            if pct > 0 and self.cfg.canary is None:
                raise ValueError("no canary upstream to mirror to; PUT /admin/upstreams first")
        except ValueError as exc:
            return _error(400, str(exc).replace("canary_percent", "percent"))
        await self._set_shadow(pct)
        log.info("shadow mirror set to %s%%", pct)
        return _JSON({"percent": self.cfg.shadow_percent})

    async def replicas(self, request: Request) -> Response:
        """Set the primary's extra replicas: ``{"replicas": [{"url", "version"}, ...]}`` (``[]``: the
        primary alone). Each must serve the primary's version. Requests in flight on a replica that
        is taken out are still answered; ``GET /admin/status`` shows them under ``inflight``."""
        if (denied := self._unauthorized(request)) is not None:
            return denied
        own = request.scope.get("server")
        own = (str(own[0]), int(own[1])) if own and own[1] is not None else None
        try:
            doc = await self._admin_doc(request)
            if not isinstance(doc, dict) or set(doc) != {"replicas"} or not isinstance(doc["replicas"], list):
                raise ValueError('expected {"replicas": [{"url": .., "version": ..}, ...]}')
            if len(doc["replicas"]) > 256:
                raise ValueError("at most 256 replicas")
            found = [check_upstream(d, f"replica {i}", own) for i, d in enumerate(doc["replicas"])]
            urls = [u.url for u in found] + [self.cfg.primary.url]
            if len(set(urls)) != len(urls):
                raise ValueError("replica urls must be distinct and differ from the primary's")
            for u in found:
                if u.version != self.cfg.primary.version:
                    raise ValueError(f"replica {u.url} serves version {u.version}, the primary serves "
                                     f"{self.cfg.primary.version}")
        except ValueError as exc:
            return _error(400, f"bad replicas: {exc}")
        self.cfg.replicas = found
        log.info("primary replicas: %d", 1 + len(found))
        return _JSON(self.status_doc())

    async def stats_route(self, request: Request) -> Response:
        since_raw = request.query_params.get("since")
        try:
            since = _parse_since(since_raw) if since_raw else None
        except ValueError as exc:
            return _error(400, str(exc))
        return _JSON({"status": self.status_doc(), "versions": self.stats.summary(since)})

    async def metrics_route(self, request: Request) -> Response:
        if self.events is not None:
            self.metrics.queue_depth.set(self.events.queue.qsize())
        return Response(generate_latest(self.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    async def healthz(self, request: Request) -> Response:
        return _JSON({"ok": True})


def _without_scores(content: bytes) -> bytes:
    """The response as the client would have had it without the scores the gateway asked for
    (V1 ``scores``/``classes`` keys, the V2 ``scores`` output)."""
    if b'"scores"' not in content:
        return content
    try:
        doc = orjson.loads(content)
    except ValueError:
        try:
            doc = json.loads(content)  # NaN/Infinity, which orjson refuses
        except ValueError:
            return content
    if not isinstance(doc, dict):
        return content
    if "scores" in doc:
        doc.pop("scores", None)
        doc.pop("classes", None)
    elif isinstance(doc.get("outputs"), list):
        doc["outputs"] = [o for o in doc["outputs"] if not (isinstance(o, dict) and o.get("name") == "scores")]
    try:
        return orjson.dumps(doc)
    except TypeError:
        return json.dumps(doc, separators=(",", ":")).encode()


def _feedback_url(sink_url: str | None) -> str | None:
    """The monitor's ``/feedback`` next to its ``/events`` sink."""
    if not sink_url or not sink_url.rstrip("/").endswith("/events"):
        return None
    return sink_url.rstrip("/")[: -len("/events")] + "/feedback"


def _parse_since(raw: str) -> float:
    """Epoch seconds or an ISO timestamp."""
    try:
        return float(raw)
    except ValueError:
        pass
    from datetime import datetime, timezone

    try:
        parsed = datetime.fromisoformat(raw)
    except ValueError as exc:
        raise ValueError(f"since={raw!r} is neither epoch seconds nor an ISO timestamp") from exc
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=timezone.utc)
    return parsed.timestamp()


def create_gateway_app(cfg: GatewayConfig) -> Starlette:
    """The gateway as an ASGI app (serve it with uvicorn on 127.0.0.1)."""
    gw = _Gateway(cfg)
    routes = [
        Route("/v1/models/{tail:path}", gw.models, methods=["GET", "POST"]),
        Route("/v2/models/{tail:path}", gw.models, methods=["GET", "POST"]),
        Route("/v1/models", gw.passthrough, methods=["GET"]),
        Route("/v2/health/{tail:path}", gw.passthrough, methods=["GET"]),
        Route("/v2", gw.passthrough, methods=["GET"]),
        Route("/feedback", gw.feedback, methods=["POST"]),
        Route("/admin/split", gw.split, methods=["PUT"]),
        Route("/admin/upstreams", gw.upstreams, methods=["PUT"]),
        Route("/admin/replicas", gw.replicas, methods=["PUT"]),
        Route("/admin/status", gw.status, methods=["GET"]),
        Route("/admin/stats", gw.stats_route, methods=["GET"]),
        Route("/admin/shadow", gw.shadow_route, methods=["GET", "PUT"]),
        Route("/metrics", gw.metrics_route, methods=["GET"]),
        Route("/healthz", gw.healthz, methods=["GET"]),
    ]
    app = Starlette(routes=routes, lifespan=gw.lifespan)
    app.state.gateway = gw
    return app


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m serving.gateway", description=__doc__.splitlines()[0])
    p.add_argument("--name", required=True, help="InferenceService name reported in the events")
    p.add_argument("--namespace", default="default")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--primary-url", required=True)
    p.add_argument("--primary-version", required=True)
    p.add_argument("--replica-url", action="append", default=[], help="another server of the primary's version "
                   "(repeat); traffic is balanced over the primary and these")
    p.add_argument("--canary-url")
    p.add_argument("--canary-version")
    p.add_argument("--canary-percent", type=float, default=0.0)
    p.add_argument("--sticky-key")
    p.add_argument("--sink-url", help="inference-log sink (POST /events); unset = no logging")
    p.add_argument("--feedback-url", help="the monitor's POST /feedback (default: the sink URL's /feedback)")
    p.add_argument("--feedback-outbox", help="SQLite file for labels the monitor has not taken yet; "
                                             "unset = labels stay in the gateway only")
    p.add_argument("--max-payload-bytes", type=int, default=8 * 1024 * 1024)
    return p


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    args = _parser().parse_args(argv)
    canary = Upstream(args.canary_url, args.canary_version or "") if args.canary_url else None
    cfg = GatewayConfig(name=args.name, namespace=args.namespace, primary=Upstream(args.primary_url, args.primary_version),
                        canary=canary, canary_percent=args.canary_percent, sticky_key=args.sticky_key,
                        sink_url=args.sink_url, max_payload_bytes=args.max_payload_bytes,
                        feedback_url=args.feedback_url or _feedback_url(args.sink_url),
                        feedback_outbox=args.feedback_outbox,
                        replicas=[Upstream(u, args.primary_version) for u in args.replica_url],
                        admin_token=os.environ.get(ADMIN_TOKEN_ENV) or None)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if cfg.admin_token is None:
        log.warning("%s is not set: PUT /admin/split and /admin/upstreams refuse every call", ADMIN_TOKEN_ENV)
    uvicorn.run(create_gateway_app(cfg), host=args.host, port=args.port, log_level="warning", access_log=False,
                proxy_headers=False, server_header=False)


if __name__ == "__main__":
    main()
