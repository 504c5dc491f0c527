"""The local gateway: one port in front of the primary and canary model servers.

On the embedded default it plays the part that Knative/Istio and KServe's inference logger
play on a cluster:

* splits traffic between the primary and the canary by the canary percentage (weighted
  random, or sticky by a request header when ``sticky_key`` is set);
* forwards only the Open Inference Protocol routes of the one model it serves (V1 and V2, see
  :mod:`serving.oip`; matched on the raw path, so no ``..%2F`` reaches anything else on a model
  server) over keep-alive ``aiohttp`` connections, bodies as sent (a gzip body inflated);
* logs every served request and its response with the attributes the KServe logger sends —
  CloudEvents v1, ``ce-id`` shared by request and response — plus two extension attributes
  KServe's logger leaves out: ``ce-modelversion`` (the MLflow version that answered) and
  ``ce-servingrole`` (``primary`` or ``canary``). Events go through a bounded queue to
  background senders that post them in ``application/cloudevents-batch+json`` batches with the
  ingest bearer token (see :class:`EventLogger`; binary V2 tensors become JSON): a slow or dead
  sink never delays a prediction; its events wait in the ``--event-outbox`` SQLite file, or
  without one are dropped (counted);
* returns the request id in ``x-request-id`` and ``ce-id`` (a client's own id, refused with 409
  when it comes again with another body) so that a client can send the
  ground truth later to ``POST /feedback``; the gateway joins it with the prediction it
  served and keeps per-version quality for the rollout controller;
* balances the primary's traffic over its replicas (``--replica-url``, ``PUT /admin/replicas``:
  more model-server processes of the same version), each request to the one with the fewest
  requests in flight; a replica taken out receives nothing new and ``GET /admin/status`` shows
  its requests in flight until they are answered, so it can be stopped without dropping one;
* exposes ``PUT /admin/split``, ``PUT /admin/upstreams``, ``PUT /admin/replicas`` (all need the
  bearer token from ``DRIFTLOOP_GATEWAY_TOKEN``), ``GET /admin/status``, ``GET /admin/stats``,
  Prometheus ``/metrics`` and ``GET /openapi.json``.

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
import hashlib
import hmac
import json
import logging
import math
import os
import sqlite3
import time
import uuid
import zlib
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from serving.feedback import FeedbackForwarder, Outbox
from serving.oip import HEADER_LENGTH, json_body, match_route, without_binary_scores
from serving.traffic import CANARY, PRIMARY, Splitter, TrafficStats

__all__ = ["Upstream", "GatewayConfig", "EventLogger", "create_gateway_app", "main", "check_upstream",
           "REQUEST_TYPE", "RESPONSE_TYPE", "ADMIN_TOKEN_ENV", "INGEST_TOKEN_ENV"]

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
SCORES_OUTPUT = "scores"
# The bearer token that PUT /admin/* needs; read from the environment only.
ADMIN_TOKEN_ENV = "DRIFTLOOP_GATEWAY_TOKEN"
# The bearer token the gateway sends with every POST to the sink's /events and the monitor's /feedback.
INGEST_TOKEN_ENV = "DRIFTLOOP_INGEST_TOKEN"
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
    ingest_token: str | None = field(default=None, repr=False)  # sent to the sink and /feedback
    event_outbox: str | None = None  # SQLite file keeping events the sink has not taken yet (None: drop them)
    event_outbox_max_rows: int = 200_000
    event_outbox_max_bytes: int = 512 * 1024 * 1024
    event_retry_seconds: float = 1.0
    request_ids: int = 100_000  # client request ids remembered, to refuse one reused for other rows
    serving_state: str | None = None  # serve's state file: its restarts and what is down, exposed in /metrics

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
        self.event_outbox = Gauge("driftloop_gateway_event_outbox", "Inference-log events in the gateway's outbox: "
                                  "waiting for the sink (pending) or refused by it (dead)", ["state"], registry=r)


class _ServeSupervision:
    """``driftloop serve``'s supervision in the gateway's ``/metrics``: restarts per role (a counter that
    survives the gateway's own restarts, since ``serve`` counts them in its state file) and what is down
    now. Read from the state file when scraped; an unreadable file exposes no samples rather than failing
    the scrape."""

    def __init__(self, path: str) -> None:
        self.path = Path(path)

    def collect(self):  # noqa: ANN201 (prometheus_client's collector protocol)
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        restarts = CounterMetricFamily("driftloop_serve_restarts", "Processes driftloop serve restarted after "
                                       "they died or failed readiness, by role", labels=["role"])
        down = GaugeMetricFamily("driftloop_serve_down", "1 while serve's process of this role is down and "
                                 "waiting for its restart", labels=["role"])
        try:
            state = json.loads(self.path.read_text())
        except (OSError, ValueError):
            state = {}
        counts = state.get("restarts") if isinstance(state, dict) else None
        for role, n in sorted((counts or {}).items()):
            if isinstance(n, int):
                restarts.add_metric([str(role)], n)
        out = state.get("down") if isinstance(state, dict) else None
        replicas = state.get("replicas") if isinstance(state, dict) else None
        roles = {"primary", "canary", "gateway", *(out or {}), *(counts or {}),
                 *(r.get("role") for r in (replicas or []) if isinstance(r, dict) and r.get("role"))}
        for role in sorted(roles):
            down.add_metric([str(role)], 1.0 if role in (out or {}) else 0.0)
        yield restarts
        yield down


class _DropLog:
    """Logs what was dropped at most once a minute per reason, with the count since the last line."""

    def __init__(self, every: float = 60.0) -> None:
        self.every = every
        self._pending: dict[str, int] = {}
        self._last: dict[str, float] = {}

    def note(self, reason: str, n: int, detail: str = "") -> None:
        self._pending[reason] = self._pending.get(reason, 0) + n
        now = time.monotonic()
        if now - self._last.get(reason, -self.every) >= self.every:
            count, self._pending[reason] = self._pending[reason], 0
            self._last[reason] = now
            log.warning("inference-log events dropped (%s): %d since the last report%s", reason, count,
                        f"; {detail}" if detail else "")


# one queued request/response pair: id, role, version, path, request, response, time, and the JSON
# header lengths of a binary request/response (None: the body is JSON)
_Item = tuple[str, str, str, str, bytes, bytes, float, "int | None", "int | None"]


class EventLogger:
    """Sends KServe-logger CloudEvents to the sink from a bounded queue, off the request path.

    Events go out in ``application/cloudevents-batch+json`` batches (structured mode: the same
    attributes KServe's logger sends as ``ce-*`` headers, plus ``modelversion``/``servingrole``,
    with the request or response body spliced in as ``data``; a V2 body with binary tensors is
    first turned into the JSON form of the same tensors, see :func:`serving.oip.json_body`):
    whatever is queued when a sender is free goes in one POST, so under load a batch carries many
    requests and the sink stores them in one transaction. A batch the sink refuses with a 4xx (one
    bad event refuses all) is sent again event by event, so only the refused events are dropped.
    Each POST carries ``Authorization: Bearer <ingest token>`` when one is set.

    Without an ``outbox``, a full queue drops the new pair and an unreachable or failing sink drops
    what it was sent; both are counted (``driftloop_gateway_events_dropped_total{reason}``). With an
    ``outbox`` (:class:`serving.feedback.Outbox`, a bounded SQLite file), what the sink did not take
    (unreachable, 5xx, 429, shutdown) waits there and is sent again with back-off (``retry_seconds``
    doubling up to ``max_retry_seconds``), oldest first; while it holds anything, new batches go
    behind it. Only what does not fit in it is dropped (``reason="outbox_full"``). Drops are logged
    at most once a minute per reason. Nothing here ever waits on the request path.
    """

    def __init__(self, sink_url: str, *, name: str, namespace: str, source: str, metrics: _Metrics,
                 queue_size: int = 10_000, senders: int = 2, timeout: float = 2.0, max_batch: int = 256,
                 max_batch_bytes: int = 4 * 1024 * 1024, linger: float = 0.05, token: str | None = None,
                 outbox: Outbox | None = None, retry_seconds: float = 1.0, max_retry_seconds: float = 30.0) -> None:
        self.sink_url = sink_url
        self.name = name
        self.namespace = namespace
        self.source = source
        self.metrics = metrics
        self.queue: asyncio.Queue[_Item] = asyncio.Queue(maxsize=queue_size)
        self.senders = senders
        self.timeout = timeout
        self.max_batch = max_batch  # request/response pairs per POST
        self.max_batch_bytes = max_batch_bytes
        self.linger = linger
        self.token = token
        self.outbox = outbox
        self.retry_seconds = retry_seconds
        self.max_retry_seconds = max_retry_seconds
        self.drops = _DropLog()
        self._backlog = outbox.pending() if outbox is not None else 0  # rows waiting in the outbox
        self._held = 0  # events taken from the queue by a sender and not yet sent or counted
        self._tasks: list[asyncio.Task[None]] = []
        self._session: aiohttp.ClientSession | None = None
        self._wake = asyncio.Event()

    def submit(self, request_id: str, role: str, version: str, path: str, request_body: bytes,
               response_body: bytes, request_header_length: int | None = None,
               response_header_length: int | None = None) -> None:
        """Queue one request/response pair; drops (and counts) when the queue is full."""
        try:
            self.queue.put_nowait((request_id, role, version, path, request_body, response_body, time.time(),
                                   request_header_length, response_header_length))
        except asyncio.QueueFull:
            self._dropped("queue_full", 2, f"the gateway's queue of {self.queue.maxsize} pairs is full")

    def _dropped(self, reason: str, n: int, detail: str = "") -> None:
        self.metrics.events_dropped.labels(reason=reason).inc(n)
        self.drops.note(reason, n, detail)

    def start(self) -> None:
        self._session = _session(self.senders + 1, self.timeout)
        self._wake = asyncio.Event()
        self._tasks = [asyncio.create_task(self._send_loop()) for _ in range(self.senders)]
        if self.outbox is not None:
            self._tasks.append(asyncio.create_task(self._retry_loop(), name="event-outbox"))

    async def close(self, drain_seconds: float = 2.0) -> None:
        """Give queued events a short time to go out, then stop the senders; what is still queued then
        goes to the outbox, or without one is counted as dropped (``reason="shutdown"``)."""
        deadline = time.monotonic() + drain_seconds
        while (not self.queue.empty() or self._held) and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        items = []
        while not self.queue.empty():
            items.append(self.queue.get_nowait())
        left = self._held
        if items and self.outbox is not None:
            events = await asyncio.to_thread(self._events_of, items)
            await self._spill(events, "gateway stopping")
        else:
            left += 2 * len(items)
        if left:
            self.metrics.events_dropped.labels(reason="shutdown").inc(left)
            log.warning("gateway stopping: %d inference-log events not sent", left)
        if self._session is not None:
            await self._session.close()

    def events(self, item: _Item) -> list[bytes]:
        """The pair as two structured-mode CloudEvents (JSON objects, ``data`` = the body as JSON)."""
        request_id, role, version, path, request_body, response_body, at, req_len, resp_len = item
        stamp = datetime.fromtimestamp(at, timezone.utc).isoformat()
        out = []
        for ce_type, body, hlen, kind in ((REQUEST_TYPE, request_body, req_len, "request"),
                                          (RESPONSE_TYPE, response_body, resp_len, "response")):
            if hlen is not None:
                try:
                    body = json_body(body, hlen, kind, self.name)
                except ValueError as exc:
                    log.warning("inference-log %s %s: %s", kind, request_id, exc)
                    body = orjson.dumps({"undecodable": str(exc)[:500]})
            attrs = orjson.dumps({
                "specversion": "1.0", "id": request_id, "type": ce_type, "source": self.source, "time": stamp,
                "datacontenttype": "application/json", "inferenceservicename": self.name,
                "namespace": self.namespace, "component": "predictor", "endpoint": _ENDPOINT[role],
                "modelversion": version, "servingrole": role, "inferencepath": path,
            })
            out.append(attrs[:-1] + b',"data":' + body + b"}")
        return out

    def _events_of(self, items: list[_Item]) -> list[bytes]:
        return [e for item in items for e in self.events(item)]

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
                if any(item[7] is not None or item[8] is not None for item in items):
                    events = await asyncio.to_thread(self._events_of, items)  # kserve decodes binary tensors
                else:
                    events = self._events_of(items)
                if self._backlog:  # behind what waits in the outbox: no POST to a sink that is failing
                    await self._spill(events, "queued behind the outbox")
                else:
                    failed = await self._post(events)
                    if failed:
                        await self._spill(failed, "sink did not take them")
            except Exception:  # never let one batch stop a sender (cancellation goes through: close() counts)
                log.exception("inference-log batch of %d events not sent", 2 * len(items))
                self._dropped("error", 2 * len(items))
            self._held -= 2 * len(items)

    async def _spill(self, events: list[bytes], why: str) -> None:
        """Keep events the sink did not take in the outbox; without one (or what does not fit), drop them."""
        assert self.outbox is not None
        try:
            stored = await asyncio.to_thread(self.outbox.put, events, why)
        except sqlite3.Error as exc:  # disk full, file gone: counted and logged, never raised to a sender
            stored = 0
            self._dropped("outbox_error", len(events), repr(exc))
        else:
            if stored < len(events):
                self._dropped("outbox_full", len(events) - stored,
                              f"the event outbox {self.outbox.path} holds its maximum")
        self._backlog += stored
        self._wake.set()

    async def _post(self, events: list[bytes]) -> list[bytes]:
        """POST the events; returns those the sink did not take for a reason that may pass (unreachable,
        5xx, 429). Refused ones (4xx) are counted as dropped."""
        batch = len(events) > 1
        body = b"[" + b",".join(events) + b"]" if batch else events[0]
        headers = {"content-type": _BATCH_TYPE if batch else _STRUCTURED_TYPE}
        if self.token:
            headers["authorization"] = f"Bearer {self.token}"
        assert self._session is not None
        try:
            async with self._session.post(self.sink_url, data=body, headers=headers) as resp:
                status = resp.status
                # read the answer whole even when it is not used: aiohttp closes a connection whose
                # response body was left unread, and the next batch would pay a new TCP connection
                detail = (await resp.read())[:200]
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            log.debug("inference-log sink %s unreachable: %r", self.sink_url, exc)
            if self.outbox is None:
                self._dropped("sink_unreachable", len(events), f"{self.sink_url}: {exc!r}")
                return []
            return events
        if status < 300:
            self.metrics.events_sent.inc(len(events))
            return []
        if 400 <= status < 500 and status != 429:
            if batch:
                failed: list[bytes] = []
                for event in events:  # one bad event refuses a batch: find it, keep the others
                    failed += await self._post([event])
                return failed
            self._dropped(f"sink_{status}", 1, f"the sink refused an event: {detail.decode(errors='replace')}")
            return []
        if self.outbox is None:
            self._dropped(f"sink_{status}", len(events), detail.decode(errors="replace"))
            return []
        return events

    async def _retry_loop(self) -> None:
        """Send what waits in the outbox, oldest first, with back-off while the sink fails."""
        assert self.outbox is not None
        delay = self.retry_seconds
        while True:
            try:
                await asyncio.wait_for(self._wake.wait(), timeout=delay)
            except asyncio.TimeoutError:
                pass
            self._wake.clear()
            if not self._backlog:
                continue
            await asyncio.sleep(delay if delay > self.retry_seconds else 0)
            try:
                while True:
                    rows = await asyncio.to_thread(self.outbox.oldest, self.max_batch)
                    if not rows:
                        break
                    failed = set(await self._post([body for _, body in rows]))
                    done = [seq for seq, body in rows if body not in failed]
                    await asyncio.to_thread(self.outbox.delete, done)
                    self._backlog = max(0, self._backlog - len(done))
                    if failed:
                        await asyncio.to_thread(self.outbox.failed, [s for s, b in rows if b in failed],
                                                "sink did not take them")
                        delay = min(2 * delay, self.max_retry_seconds)
                        break
                    delay = self.retry_seconds
                self._backlog = await asyncio.to_thread(self.outbox.pending)
            except Exception:  # noqa: BLE001 - the loop keeps retrying; the outbox keeps the events
                log.exception("event outbox retry failed")
                delay = min(2 * delay, self.max_retry_seconds)


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
        if cfg.serving_state:
            self.metrics.registry.register(_ServeSupervision(cfg.serving_state))
        self.splitter = Splitter(cfg.canary_percent, seed=cfg.seed)
        self.metrics.canary_percent.set(cfg.canary_percent)
        self.stats = TrafficStats()
        self.client: aiohttp.ClientSession | None = None
        self.events: EventLogger | None = None
        self.forwarder: FeedbackForwarder | None = None
        self.shadow: Any = None  # serving.shadow.ShadowMirror while a shadow phase runs
        self.inflight: dict[str, int] = {}  # requests in flight per upstream URL
        self.request_ids: OrderedDict[str, bytes] = OrderedDict()  # client request id -> digest of its body
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
        token = self.cfg.ingest_token
        if self.cfg.sink_url:
            outbox = (Outbox(self.cfg.event_outbox, max_rows=self.cfg.event_outbox_max_rows,
                             max_bytes=self.cfg.event_outbox_max_bytes) if self.cfg.event_outbox else None)
            self.events = EventLogger(self.cfg.sink_url, name=self.cfg.name, namespace=self.cfg.namespace,
                                      source=self.cfg.source or f"driftloop-gateway/{self.cfg.name}",
                                      metrics=self.metrics, queue_size=self.cfg.queue_size,
                                      senders=self.cfg.senders, timeout=self.cfg.sink_timeout,
                                      linger=self.cfg.sink_linger, token=token, outbox=outbox,
                                      retry_seconds=self.cfg.event_retry_seconds)
            self.events.start()
            if outbox is not None:
                for state in ("pending", "dead"):
                    self.metrics.event_outbox.labels(state).set_function(lambda s=state: outbox.counts()[s])
        if self.cfg.feedback_url and self.cfg.feedback_outbox:
            self.forwarder = FeedbackForwarder(self.cfg.feedback_url, self.cfg.feedback_outbox,
                                               headers={"authorization": f"Bearer {token}"} if token else None)
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
            if self.events.outbox is not None:
                self.events.outbox.close()
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

    def _refuse(self, status: int, reason: str, message: str) -> Response:
        self.metrics.rejected.labels(reason=reason).inc()
        return _error(status, message)

    async def infer(self, request: Request, path: str) -> Response:
        body = await self._read_body(request)
        if body is None:
            return self._refuse(413, "too_large",
                                f"payload larger than serving.max_payload_bytes ({self.cfg.max_payload_bytes} bytes)")
        headers = request.headers
        encoding = headers.get("content-encoding", "identity").strip().lower()
        if encoding in ("gzip", "deflate"):
            try:
                body = _decompress(body, encoding, self.cfg.max_payload_bytes)
            except ValueError as exc:
                return self._refuse(413 if "larger" in str(exc) else 400, "bad_encoding", str(exc))
        elif encoding != "identity":
            return self._refuse(415, "bad_encoding", f"Content-Encoding {encoding!r} is not supported; send the body "
                                                     "plain or gzip-compressed")
        request_hlen = None
        if HEADER_LENGTH in headers:
            raw = headers[HEADER_LENGTH].strip()
            if not raw.isdigit() or not 0 < int(raw) <= len(body):
                return self._refuse(400, "bad_header_length", f"{HEADER_LENGTH} is {raw[:20]!r}; it must be the byte "
                                                               f"length of the JSON header, 1..{len(body)}")
            request_hlen = int(raw)
        client_id = headers.get("x-request-id") or headers.get("ce-id")
        if client_id is not None and (not client_id or len(client_id) > _MAX_ID_CHARS):
            return self._refuse(400, "bad_request_id", f"x-request-id must be 1..{_MAX_ID_CHARS} characters")
        if client_id is not None and (conflict := self._claim_id(client_id, body)):
            return self._refuse(409, "request_id_reused", conflict)
        request_id = client_id or uuid.uuid4().hex
        key = headers.get(self.cfg.sticky_key) if self.cfg.sticky_key else None
        role = self.splitter.choose(key)
        upstream = self.cfg.canary if role == CANARY and self.cfg.canary is not None else self.cfg.primary
        if upstream is self.cfg.primary:
            role = PRIMARY
            upstream = self._pick_primary()
        fwd = {k: v for k, v in headers.items() if k in _FORWARD_HEADERS}
        if "content-type" not in fwd and request_hlen is None:
            fwd["content-type"] = "application/json"  # else aiohttp says octet-stream, which kserve reads as binary
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
            raw_hlen = resp_headers.get(HEADER_LENGTH, "")
            response_hlen = int(raw_hlen) if raw_hlen.isdigit() else None
        except _UpstreamFailed as exc:
            status, ctype, server_error, response_hlen = 502, "application/json", exc.counts, None
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
            self.events.submit(request_id, role, upstream.version, path, body, content, request_hlen, response_hlen)
            if not client_scores and response_hlen is not None:
                content, response_hlen = without_binary_scores(content, response_hlen, SCORES_OUTPUT)
            elif not client_scores:
                content = _without_scores(content)
        out_headers = {"content-type": ctype, "x-request-id": request_id, "ce-id": request_id,
                       "x-model-version": upstream.version, "x-serving-role": role}
        if response_hlen is not None:
            out_headers[HEADER_LENGTH] = str(response_hlen)
        return Response(content, status_code=status, media_type=None, headers=out_headers)

    def _claim_id(self, request_id: str, body: bytes) -> str | None:
        """Remember a client's request id with its body; a different body under an id already used is a
        conflict (the message), because labels are joined to the prediction by that id. The same body
        again (a client's retry) is fine."""
        digest = hashlib.blake2b(body, digest_size=16).digest()
        known = self.request_ids.get(request_id)
        if known is not None and known != digest:
            return (f"x-request-id {request_id!r:.80} was already used for a different request; labels are joined "
                    "to predictions by this id, so each request needs its own (a retry of the same body may reuse it)")
        self.request_ids[request_id] = digest
        self.request_ids.move_to_end(request_id)
        while len(self.request_ids) > self.cfg.request_ids:
            self.request_ids.popitem(last=False)
        return None

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

    async def passthrough(self, path: str) -> Response:
        """Liveness, health, readiness and metadata: answered by the primary."""
        try:
            status, content, headers = await self._send("GET", self.cfg.primary.url + path)
        except _UpstreamFailed as exc:
            return _error(502, f"primary model server at {self.cfg.primary.url} failed: {exc}")
        return Response(content, status_code=status,
                        headers={"content-type": headers.get("content-type", "application/json")})

    async def oip(self, request: Request) -> Response:
        """The Open Inference Protocol routes of :mod:`serving.oip`, checked on the raw path; nothing
        else is forwarded (404, or 405 with ``Allow`` for a known route and another method)."""
        raw = request.scope.get("raw_path") or request.url.path.encode()
        found = match_route(request.method, raw, self.cfg.name)
        if found.kind is None:
            self.metrics.rejected.labels(reason="no_route" if found.status == 404 else "method").inc()
            return _JSON({"error": found.error}, status_code=found.status,
                         headers={"allow": found.allow} if found.allow else None)
        if found.kind == "infer":
            return await self.infer(request, found.path)
        return await self.passthrough(found.path)

    async def openapi(self, request: Request) -> Response:
        from serving.gateway_openapi import gateway_openapi

        return _JSON(gateway_openapi(self.cfg.name))

    # -- feedback -------------------------------------------------------------------
    async def feedback(self, request: Request) -> Response:
        """``{"id": <x-request-id>, "label": <value or one per row>}`` or a list of them.

        Needs ``Authorization: Bearer <ingest token>`` (401 otherwise). Refused whole (4xx, nothing
        recorded) when the body is not ``application/json`` (a
        cross-site form post cannot send that type), too large, not strict JSON, or an item is
        malformed. Otherwise each item is accepted once per request id; unknown ids and repeats
        are reported, not counted.
        """
        if (denied := self._unauthorized(request, use="feedback")) is not None:
            return denied
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

    def _unauthorized(self, request: Request, *, use: str = "admin") -> Response | None:
        """401 unless the request carries the bearer token for ``use``: ``admin`` (the split and the
        upstreams: the gateway's admin token) or ``feedback`` (labels: the workspace's ingest token, the one
        the monitor's own ``/feedback`` takes — labels decide quality alerts and rollouts)."""
        token, env = (self.cfg.admin_token, ADMIN_TOKEN_ENV) if use == "admin" else (self.cfg.ingest_token,
                                                                                    INGEST_TOKEN_ENV)
        if not token:
            self.metrics.rejected.labels(reason=f"{use}_not_configured").inc()
            return _error(401, f"{use} endpoints are locked: {env} is not set on the gateway")
        given = request.headers.get("authorization", "")
        if not given.lower().startswith("bearer ") or not hmac.compare_digest(given[7:].strip().encode(),
                                                                               token.encode()):
            self.metrics.rejected.labels(reason=f"{use}_unauthorized").inc()
            return _error(401, f"missing or wrong bearer token (the gateway's {env})")
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


def _decompress(body: bytes, encoding: str, limit: int) -> bytes:
    """A gzip/deflate body, inflated to at most ``limit`` bytes; ``ValueError`` naming the problem."""
    inflater = zlib.decompressobj(wbits=31 if encoding == "gzip" else 15)
    try:
        out = inflater.decompress(body, limit + 1)
    except zlib.error as exc:
        raise ValueError(f"the body is not valid {encoding} (Content-Encoding: {encoding}): {exc}") from exc
    if len(out) > limit or inflater.unconsumed_tail:
        raise ValueError(f"the {encoding} body inflates to larger than serving.max_payload_bytes ({limit} bytes)")
    if not inflater.eof:
        raise ValueError(f"the {encoding} body is truncated (Content-Encoding: {encoding})")
    return out


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
    every = ["GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"]  # gw.oip answers 405 itself
    routes = [
        Route("/", gw.oip, methods=every),
        Route("/v1", gw.oip, methods=every),
        Route("/v1/{tail:path}", gw.oip, methods=every),
        Route("/v2", gw.oip, methods=every),
        Route("/v2/{tail:path}", gw.oip, methods=every),
        Route("/openapi.json", gw.openapi, methods=["GET"]),
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
    p.add_argument("--serving-state", help="driftloop serve's state file: its restart counts and what is down "
                   "are exposed in /metrics (driftloop_serve_restarts_total, driftloop_serve_down)")
    p.add_argument("--feedback-url", help="the monitor's POST /feedback (default: the sink URL's /feedback)")
    p.add_argument("--feedback-outbox", help="SQLite file for labels the monitor has not taken yet; "
                                             "unset = labels stay in the gateway only")
    p.add_argument("--event-outbox", help="SQLite file for inference-log events the sink has not taken yet, "
                                          "retried with back-off; unset = kept in memory only, dropped on failure")
    p.add_argument("--event-outbox-max-rows", type=int, default=200_000, help="events the outbox holds at most")
    p.add_argument("--event-outbox-max-bytes", type=int, default=512 * 1024 * 1024,
                   help="bytes of events the outbox holds at most")
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
                        feedback_outbox=args.feedback_outbox, event_outbox=args.event_outbox,
                        event_outbox_max_rows=args.event_outbox_max_rows,
                        event_outbox_max_bytes=args.event_outbox_max_bytes,
                        ingest_token=os.environ.get(INGEST_TOKEN_ENV) or None, serving_state=args.serving_state,
                        replicas=[Upstream(u, args.primary_version) for u in args.replica_url],
                        admin_token=os.environ.get(ADMIN_TOKEN_ENV) or None)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if cfg.admin_token is None:
        log.warning("%s is not set: PUT /admin/split and /admin/upstreams refuse every call", ADMIN_TOKEN_ENV)
    if cfg.ingest_token is None and (cfg.sink_url or cfg.feedback_url):
        log.warning("%s is not set: events and labels are sent without a bearer token, and a monitor that "
                    "requires one refuses them", INGEST_TOKEN_ENV)
    uvicorn.run(create_gateway_app(cfg), host=args.host, port=args.port, log_level="warning", access_log=False,
                proxy_headers=False, server_header=False)


if __name__ == "__main__":
    main()
