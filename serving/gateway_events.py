"""The gateway's inference log: every served request and its response as the CloudEvents KServe's
inference logger sends (``ce-id`` shared by request and response, plus ``modelversion`` and
``servingrole``), posted in batches to the monitor's ``/events`` sink off the request path.

A slow or dead sink never delays a prediction: events wait in a bounded queue and, with an outbox,
in a SQLite file until the sink takes them; what cannot be kept is dropped and counted.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from datetime import datetime, timezone

import aiohttp
import orjson

from serving.feedback import Outbox
from serving.gateway_base import GatewayConfig, GatewayMetrics, http_session
from serving.oip import json_body
from serving.traffic import CANARY, PRIMARY

__all__ = ["EventLogger", "REQUEST_TYPE", "RESPONSE_TYPE", "start_event_logger"]

log = logging.getLogger(__name__)

REQUEST_TYPE = "org.kubeflow.serving.inference.request"
RESPONSE_TYPE = "org.kubeflow.serving.inference.response"
# KServe's logger names the endpoint of the InferenceService that answered.
_ENDPOINT = {PRIMARY: "default", CANARY: "canary", "shadow": "canary"}
_BATCH_TYPE = "application/cloudevents-batch+json"
_STRUCTURED_TYPE = "application/cloudevents+json"


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

    def __init__(self, sink_url: str, *, name: str, namespace: str, source: str, metrics: GatewayMetrics,
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

    def start(self, session: aiohttp.ClientSession | None = None) -> None:
        """Start the senders; ``session``: a connection pool shared with other gateways' loggers (kept open)."""
        self._own_session = session is None
        self._session = session or http_session(self.senders + 1, self.timeout)
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
        if self._session is not None and self._own_session:
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


def start_event_logger(cfg: GatewayConfig, metrics: GatewayMetrics,
                       session: aiohttp.ClientSession | None = None) -> EventLogger | None:
    """The gateway's running event logger (None without a sink URL), with its outbox, when one is
    configured, counted in ``driftloop_gateway_event_outbox{state}`` when scraped; ``session``: a shared
    connection pool to the sink (see :meth:`EventLogger.start`)."""
    if not cfg.sink_url:
        return None
    outbox = (Outbox(cfg.event_outbox, max_rows=cfg.event_outbox_max_rows, max_bytes=cfg.event_outbox_max_bytes)
              if cfg.event_outbox else None)
    events = EventLogger(cfg.sink_url, name=cfg.name, namespace=cfg.namespace,
                         source=cfg.source or f"driftloop-gateway/{cfg.name}", metrics=metrics,
                         queue_size=cfg.queue_size, senders=cfg.senders, timeout=cfg.sink_timeout,
                         linger=cfg.sink_linger, token=cfg.ingest_token, outbox=outbox,
                         retry_seconds=cfg.event_retry_seconds)
    events.start(session)
    if outbox is not None:
        for state in ("pending", "dead"):
            metrics.event_outbox.labels(state).set_function(lambda s=state: outbox.counts()[s])
    return events
