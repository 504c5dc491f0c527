"""Ground truth posted to the gateway, forwarded to the monitor's label store — durably.

The gateway joins labels with the predictions it served for the canary analysis, but that join
lives in its memory. The monitor's store is where labels count (quality checks, ``/quality``),
so every label the gateway accepts is also sent to the monitor's ``POST /feedback`` — one item
per row, ``{"id": <request id>, "row_index": i, "label": y, "model_version": v}`` — and the
client is answered only once the labels are stored somewhere that survives a restart:

* the monitor stored them (its answer came back 2xx): ``stored``;
* the monitor is down or failing (no answer, 5xx): they go into the gateway's outbox, a SQLite
  file committed with ``synchronous=FULL`` before the answer, and a background task retries
  them in order until the monitor takes them: ``queued``. A restarted gateway finds its outbox
  and carries on.

While the outbox holds anything, new labels queue behind it, so a later correction of a label is
never overtaken by the older value. A label the monitor refuses (4xx) is refused to the client
when sent directly; from the outbox it is moved to a ``dead`` table with the monitor's reason
(never silently dropped). Predictions are never blocked: this runs only on ``/feedback``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import orjson

from driftloop.core.files import PRIVATE_FILE_MODE, private_dir

__all__ = ["FeedbackForwarder", "ForwardResult", "Outbox"]

log = logging.getLogger(__name__)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (seq INTEGER PRIMARY KEY, body BLOB NOT NULL, created REAL NOT NULL,
                                   attempts INTEGER NOT NULL DEFAULT 0, last_error TEXT);
CREATE TABLE IF NOT EXISTS dead (seq INTEGER PRIMARY KEY, body BLOB NOT NULL, created REAL NOT NULL,
                                 reason TEXT NOT NULL);
"""


class Outbox:
    """A durable FIFO of opaque bodies in one SQLite file (``synchronous=FULL``: a body is on disk
    once :meth:`put` returns), plus a ``dead`` table for what the receiver refused.

    ``max_rows``/``max_bytes`` bound what waits (``None``: unbounded); :meth:`put` stores the bodies
    that fit and returns how many, so the caller counts the rest as dropped. The file is the
    owner's only (0600, in a 0700 folder). Thread-safe; call it off the event loop.
    """

    def __init__(self, path: str | Path, *, max_rows: int | None = None, max_bytes: int | None = None) -> None:
        self.path = Path(path)
        private_dir(self.path.parent)
        os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT, PRIVATE_FILE_MODE))  # SQLite's WAL copies the mode
        self.max_rows = max_rows
        self.max_bytes = max_bytes
        self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=30.0)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)
        self._lock = threading.Lock()

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def put(self, bodies: list[bytes], error: str) -> int:
        """Append the bodies that fit under the bounds, in one transaction; returns how many."""
        with self._lock:
            room = len(bodies)
            if self.max_rows is not None or self.max_bytes is not None:
                rows, size = self._db.execute("SELECT COUNT(*), COALESCE(SUM(LENGTH(body)), 0) FROM outbox").fetchone()
                if self.max_rows is not None:
                    room = min(room, max(0, self.max_rows - rows))
                if self.max_bytes is not None:
                    fit, free = 0, self.max_bytes - size
                    for body in bodies[:room]:
                        free -= len(body)
                        if free < 0:
                            break
                        fit += 1
                    room = fit
            if room:
                now, note = time.time(), error[:500]
                self._db.execute("BEGIN IMMEDIATE")
                self._db.executemany("INSERT INTO outbox (body, created, attempts, last_error) VALUES (?, ?, 1, ?)",
                                     [(body, now, note) for body in bodies[:room]])
                self._db.execute("COMMIT")
            return room

    def oldest(self, limit: int = 1) -> list[tuple[int, bytes]]:
        with self._lock:
            return self._db.execute("SELECT seq, body FROM outbox ORDER BY seq LIMIT ?", (limit,)).fetchall()

    def delete(self, seqs: list[int]) -> None:
        with self._lock:
            self._db.executemany("DELETE FROM outbox WHERE seq = ?", [(s,) for s in seqs])

    def failed(self, seqs: list[int], error: str) -> None:
        """Note one more failed attempt at sending these rows; they stay first in line."""
        with self._lock:
            self._db.executemany("UPDATE outbox SET attempts = attempts + 1, last_error = ? WHERE seq = ?",
                                 [(error[:500], s) for s in seqs])

    def bury(self, rows: list[tuple[int, bytes]], reason: str) -> None:
        """Move rows the receiver refused to the ``dead`` table, with its reason (never silently dropped)."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            self._db.executemany("INSERT INTO dead (seq, body, created, reason) VALUES (?, ?, ?, ?)",
                                 [(seq, body, time.time(), reason[:500]) for seq, body in rows])
            self._db.executemany("DELETE FROM outbox WHERE seq = ?", [(seq,) for seq, _ in rows])
            self._db.execute("COMMIT")

    def pending(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0])

    def counts(self) -> dict[str, int]:
        """Rows waiting (``pending``) and set aside as refused (``dead``); zeros once closed."""
        try:
            with self._lock:
                pending = self._db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0]
                dead = self._db.execute("SELECT COUNT(*) FROM dead").fetchone()[0]
        except sqlite3.ProgrammingError:  # closed: the gateway is stopping
            return {"pending": 0, "dead": 0}
        return {"pending": int(pending), "dead": int(dead)}

    def dead(self) -> list[tuple[int, bytes, str]]:
        with self._lock:
            return self._db.execute("SELECT seq, body, reason FROM dead ORDER BY seq").fetchall()


class ForwardResult:
    """What happened to one feedback call: ``stored`` (in the monitor), ``queued`` (in the outbox) or
    ``refused`` (the monitor said 4xx; ``detail`` says why)."""

    def __init__(self, outcome: str, status: int, detail: Any = None) -> None:
        self.outcome = outcome
        self.status = status
        self.detail = detail


class FeedbackForwarder:
    """Sends label items to the monitor; keeps what it cannot send in a durable outbox and retries."""

    def __init__(self, url: str, outbox: str | Path, *, timeout: float = 2.0, retry_seconds: float = 1.0,
                 batch: int = 500, headers: dict[str, str] | None = None) -> None:
        self.url = url
        self.outbox = Outbox(outbox)
        self.path = self.outbox.path
        self.timeout = timeout
        self.retry_seconds = retry_seconds
        self.batch = batch
        self.headers = {"content-type": "application/json", **(headers or {})}
        self._client: httpx.AsyncClient | None = None
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._send_lock = asyncio.Lock()

    # -- lifecycle ------------------------------------------------------------------------------
    def start(self) -> None:
        self._client = httpx.AsyncClient(timeout=self.timeout)
        self._wake = asyncio.Event()
        self._send_lock = asyncio.Lock()
        self._task = asyncio.create_task(self._retry_loop(), name="feedback-outbox")
        if self.pending():
            self._wake.set()

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._client is not None:
            await self._client.aclose()
        self.outbox.close()

    # -- outbox ---------------------------------------------------------------------------------
    def pending(self) -> int:
        return self.outbox.pending()

    def counts(self) -> dict[str, int]:
        """Label batches waiting in the outbox and set aside as refused (``dead``); zeros once closed."""
        return self.outbox.counts()

    def dead(self) -> list[dict[str, Any]]:
        return [{"seq": s, "items": orjson.loads(b), "reason": r} for s, b, r in self.outbox.dead()]

    def _enqueue(self, body: bytes, error: str) -> None:
        self.outbox.put([body], error)

    # -- sending --------------------------------------------------------------------------------
    async def _post(self, body: bytes) -> tuple[int | None, Any]:
        assert self._client is not None, "start() first"
        try:
            resp = await self._client.post(self.url, content=body, headers=self.headers)
        except httpx.HTTPError as exc:
            return None, f"monitor unreachable: {exc!r}"
        try:
            detail = resp.json()
        except ValueError:
            detail = resp.text[:300]
        return resp.status_code, detail

    async def forward(self, items: list[dict[str, Any]]) -> ForwardResult:
        """Store ``items`` in the monitor, else in the outbox; returns once one of them holds them."""
        body = orjson.dumps(items)
        async with self._send_lock:
            if await asyncio.to_thread(self.pending):  # keep order behind what is waiting
                await asyncio.to_thread(self._enqueue, body, "queued behind the outbox")
                self._wake.set()
                return ForwardResult("queued", 202, {"pending": await asyncio.to_thread(self.pending)})
            status, detail = await self._post(body)
            if status is not None and status < 300:
                return ForwardResult("stored", 200, detail)
            if status is not None and 400 <= status < 500 and status not in (408, 429):
                return ForwardResult("refused", status, detail)
            await asyncio.to_thread(self._enqueue, body, f"{status}: {detail}")
            self._wake.set()
            return ForwardResult("queued", 202, {"pending": await asyncio.to_thread(self.pending)})

    async def flush(self) -> int:
        """Send what the outbox holds, oldest first, until it is empty or the monitor fails; returns sent."""
        sent = 0
        async with self._send_lock:
            while True:
                rows = self.outbox.oldest(1)
                if not rows:
                    return sent
                seq, body = rows[0]
                status, detail = await self._post(body)
                if status is not None and status < 300:
                    self.outbox.delete([seq])
                    sent += 1
                    continue
                if status is not None and 400 <= status < 500 and status not in (408, 429):
                    log.error("monitor refused queued feedback #%d: %s %s", seq, status, detail)
                    self.outbox.bury([(seq, body)], f"{status}: {detail}")
                    continue
                self.outbox.failed([seq], f"{status}: {detail}")
                return sent

    async def _retry_loop(self) -> None:
        while True:
            try:
                await asyncio.wait_for(self._wake.wait(), timeout=self.retry_seconds)
            except asyncio.TimeoutError:
                pass
            self._wake.clear()
            try:
                if await asyncio.to_thread(self.pending):
                    sent = await self.flush()
                    if sent:
                        log.info("sent %d queued feedback batches to the monitor", sent)
            except Exception:  # noqa: BLE001 - the loop keeps retrying; the outbox keeps the labels
                log.exception("feedback outbox retry failed")
