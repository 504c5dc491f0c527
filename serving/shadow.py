"""Shadow traffic: a candidate sees a mirrored share of real requests before any user sees its answers.

The gateway answers every request from the primary (or the canary) as before; only afterwards, and
only for ``percent`` of requests, it hands a copy to :class:`ShadowMirror`: a bounded queue served
by background workers with their own connection pool and a short timeout. A slow, failing or dead
shadow can therefore never delay, change or fail a user's response — its requests are dropped
(counted) when the queue is full and its failures are only numbers in :class:`ShadowStats`.

Each shadow answer is joined with the primary's answer to the same request id: the stats keep
errors and latency of the shadow, agreement with the primary (classification: share of equal
labels; regression: mean absolute and relative difference), both prediction samples for an output
PSI, and — when labels for those requests arrive at ``POST /feedback`` — the quality of both on the
same rows. Both answers are logged to the monitor, the shadow's with ``ce-servingrole: shadow``.
:func:`serving.rollout.analysis.shadow_checks` turns a summary into the checks the rollout controller judges.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import Any, Callable

import httpx

from driftloop.core.shadow import SHADOW_ROLE, compare_rows
from serving.traffic import predictions_of

__all__ = ["SHADOW", "ShadowMirror", "ShadowStats"]

log = logging.getLogger(__name__)

SHADOW = SHADOW_ROLE


@dataclass
class _Pair:
    ts: float
    primary: list[Any]
    shadow: list[Any] | None  # None: the shadow failed (error or timeout)
    latency_ms: float
    label: Any = None


class ShadowStats:
    """Joined primary/shadow answers by request id (bounded, newest kept)."""

    def __init__(self, max_pairs: int = 20_000) -> None:
        self._pairs: OrderedDict[str, _Pair] = OrderedDict()
        self._max = max_pairs
        self.dropped = 0

    def record(self, request_id: str, primary: list[Any], shadow: list[Any] | None, latency_ms: float,
               ts: float | None = None) -> None:
        self._pairs[request_id] = _Pair(time.time() if ts is None else ts, primary, shadow, latency_ms)
        while len(self._pairs) > self._max:
            self._pairs.popitem(last=False)

    def label(self, request_id: str, label: Any) -> bool:
        pair = self._pairs.get(request_id)
        if pair is None or pair.label is not None:
            return False
        pair.label = label
        return True

    def summary(self, since: float | None = None, *, max_predictions: int = 2_000) -> dict[str, Any]:
        pairs = [p for p in self._pairs.values() if since is None or p.ts >= since]
        ok = [p for p in pairs if p.shadow is not None and len(p.shadow) == len(p.primary)]
        latencies = sorted(p.latency_ms for p in pairs)
        out: dict[str, Any] = {
            "requests": len(pairs), "errors": len(pairs) - len(ok), "dropped": self.dropped,
            "error_rate": (len(pairs) - len(ok)) / len(pairs) if pairs else None,
            "p99_ms": latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))] if latencies else None,
        }
        rows: list[tuple[Any, Any, Any]] = []
        for p in ok:
            labels = p.label if isinstance(p.label, list) else [p.label] * len(p.primary)
            if len(labels) != len(p.primary):
                labels = [None] * len(p.primary)
            rows += zip(p.primary, p.shadow, labels)
        out.update(compare_rows(rows, max_predictions=max_predictions))
        return out


class ShadowMirror:
    """Copies of served requests to the shadow, off the request path, on their own connections."""

    def __init__(self, url: str, version: str, percent: float, *, timeout: float = 2.0, queue_size: int = 1_000,
                 workers: int = 4, seed: int | None = None,
                 log_event: Callable[[str, str, str, bytes, bytes], None] | None = None) -> None:
        self.url, self.version, self.percent, self.timeout = url.rstrip("/"), version, float(percent), timeout
        self.stats = ShadowStats()
        self.queue: asyncio.Queue[tuple[str, str, bytes, dict[str, str], list[Any]]] = asyncio.Queue(queue_size)
        self._workers = workers
        self._random = random.Random(seed)
        self._tasks: list[asyncio.Task[None]] = []
        self._client: httpx.AsyncClient | None = None
        self._log_event = log_event

    def start(self) -> None:
        limits = httpx.Limits(max_connections=self._workers, max_keepalive_connections=self._workers)
        self._client = httpx.AsyncClient(timeout=self.timeout, limits=limits)
        self._tasks = [asyncio.create_task(self._loop()) for _ in range(self._workers)]

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._client is not None:
            await self._client.aclose()

    def offer(self, request_id: str, path: str, body: bytes, headers: dict[str, str], primary_body: bytes) -> bool:
        """After the primary answered: queue a copy for ``percent`` of requests. Never blocks, never raises."""
        if self.percent <= 0 or self._random.random() * 100 >= self.percent:
            return False
        try:
            self.queue.put_nowait((request_id, path, body, dict(headers), predictions_of(primary_body)))
        except asyncio.QueueFull:
            self.stats.dropped += 1
            return False
        return True

    async def _loop(self) -> None:
        assert self._client is not None
        while True:
            request_id, path, body, headers, primary = await self.queue.get()
            start = time.perf_counter()
            shadow: list[Any] | None = None
            content = b""
            try:
                resp = await self._client.post(self.url + path, content=body, headers=headers)
                if 200 <= resp.status_code < 300:
                    content = resp.content
                    shadow = predictions_of(content)
                else:
                    log.debug("shadow %s answered %s for %s", self.url, resp.status_code, request_id)
            except httpx.HTTPError as exc:
                log.debug("shadow %s failed for %s: %r", self.url, request_id, exc)
            except Exception:  # noqa: BLE001 - a shadow never takes the gateway down
                log.exception("shadow request %s failed", request_id)
            self.stats.record(request_id, primary, shadow, (time.perf_counter() - start) * 1000.0)
            if shadow is not None and self._log_event is not None:
                self._log_event(request_id, self.version, path, body, content)
