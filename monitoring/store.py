"""The durable inference-log store: SQLite in WAL mode.

Why SQLite/WAL and not parquet segments: every accepted event must survive a SIGKILL of the
monitor the moment it is acknowledged, and earlier data must never be corrupted. SQLite gives
atomic multi-row transactions, and in WAL mode a commit is an append to the ``-wal`` file: with
``synchronous=NORMAL`` the WAL frames are written (not fsync'd) before ``commit()`` returns, so
they sit in the OS page cache and survive the death of the process (only a power loss or kernel
crash can drop the last transactions — ``synchronous=FULL`` fsyncs every commit and closes that
gap at a throughput cost; both are configurable). Readers (the drift check, ``/quality``) read a
consistent snapshot without blocking the single writer. A crash mid-transaction leaves the
transaction out entirely; ``PRAGMA integrity_check`` stays ``ok``.

Tables:

* ``events`` — every accepted event as received (ce-id, kind, its CloudEvent attributes — the
  ``ce-*`` headers — as JSON, raw body, received_at), its flattened payload if it has to wait for
  its counterpart (empty when both arrive together), so nothing accepted is lost even before it
  is paired, and its request key (the ``X-Request-Id`` KServe's
  logger copies into the ``metadata`` extension; always set for a shadow's events), which joins a
  shadow's answer with the primary's (:meth:`InferenceStore.shadow_pairs`).
  ``(ce_id, kind)`` is unique: a logger retrying an event after a lost ack is stored once.
* ``rows`` — one row per instance once request and response are paired by ce-id: features (JSON),
  prediction (JSON), model name/version, serving role, ts (when the request was received).
* ``labels`` — ground truth sent later as feedback, keyed by (request_id, row_index).

Throughput comes from group commit: callers hand over many events at once
(:meth:`InferenceStore.append_groups`), one transaction per group of concurrent HTTP requests.

Nothing is acknowledged that was not durably stored. SQLite keeps writing into a database,
``-wal`` or ``-shm`` file that was deleted or replaced under it (into an inode no one will read
again), and a truncated ``-shm`` kills the process with SIGBUS at the next access. So every
commit checks, before and after, that the three files are the ones it opened, still writable
and the ``-shm`` not shrunk; a store whose files changed, or whose last commit failed (e.g.
"disk I/O error"), refuses with :class:`StoreUnavailable` (HTTP 503, saying why) and
:meth:`InferenceStore.health` says the same to ``/readyz``. Readers never create a missing file.
A commit that failed is retried by the client: ``(ce_id, kind)`` makes a retry harmless.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
import sqlite3
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import orjson
import pandas as pd

from driftloop.core.files import PRIVATE_FILE_MODE, private_dir
from monitoring.events import EventError, ParsedEvent

__all__ = ["InferenceStore", "StoreUnavailable", "Window", "GroupResult", "LabelResult", "ROW_COLUMNS", "store_path"]

log = logging.getLogger(__name__)

ROW_COLUMNS = ["request_id", "row_index", "ts", "model_name", "model_version", "role", "prediction"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY,
    ce_id TEXT NOT NULL,
    kind TEXT NOT NULL,
    model_name TEXT NOT NULL,
    model_version TEXT,
    role TEXT,
    attributes TEXT NOT NULL,
    body BLOB NOT NULL,
    flat TEXT NOT NULL,
    received_at REAL NOT NULL,
    request_key TEXT,
    UNIQUE (ce_id, kind)
);
CREATE TABLE IF NOT EXISTS rows (
    seq INTEGER PRIMARY KEY,
    request_id TEXT NOT NULL,
    row_index INTEGER NOT NULL,
    ts REAL NOT NULL,
    model_name TEXT NOT NULL,
    model_version TEXT,
    role TEXT,
    features TEXT NOT NULL,
    prediction TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS rows_ts ON rows (ts);
CREATE INDEX IF NOT EXISTS rows_request ON rows (request_id, row_index);
CREATE TABLE IF NOT EXISTS labels (
    request_id TEXT NOT NULL,
    row_index INTEGER NOT NULL,
    label TEXT NOT NULL,
    ts REAL NOT NULL,
    PRIMARY KEY (request_id, row_index)
);
CREATE TABLE IF NOT EXISTS probe (
    id INTEGER PRIMARY KEY,
    ts REAL NOT NULL
);
"""

_SUFFIXES = ("", "-wal", "-shm")
_RETRY_SECONDS = 1.0  # a store whose disk is full tries the database again at most this often
_DISK_ERRORS = {sqlite3.SQLITE_FULL, sqlite3.SQLITE_IOERR}  # primary result codes of a full or failing disk


def _private_files(path: Path) -> None:
    """Create the database file owner-only (SQLite gives its -wal and -shm the database's mode) and
    tighten the files of a store made before."""
    with contextlib.suppress(FileExistsError):
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, PRIVATE_FILE_MODE))
    for suffix in _SUFFIXES:
        with contextlib.suppress(FileNotFoundError):
            if os.stat(f"{path}{suffix}").st_mode & 0o077:
                os.chmod(f"{path}{suffix}", PRIVATE_FILE_MODE)


def _probe(db: sqlite3.Connection) -> None:
    """A write that needs new pages (some 40 kB, deleted again in the same transaction): a full disk
    or database fails it, where rewriting one row would fit in a page it already has."""
    db.execute("WITH RECURSIVE n(x) AS (SELECT 2 UNION ALL SELECT x + 1 FROM n WHERE x < 3000) "
               "INSERT OR REPLACE INTO probe (id, ts) SELECT x, x * 1.5 FROM n")
    db.execute("DELETE FROM probe WHERE id > 1")
    db.execute("INSERT OR REPLACE INTO probe (id, ts) VALUES (1, ?)", (time.time(),))


class StoreUnavailable(EventError):
    """The store cannot durably commit now (its files changed under it, or the disk failed): 503."""

    def __init__(self, message: str):
        super().__init__(503, message, reason="store_unavailable")

Synchronous = Literal["OFF", "NORMAL", "FULL", "EXTRA"]


@dataclass(frozen=True)
class _Pending:
    """An accepted event still waiting for its counterpart."""

    kind: str
    model_name: str
    model_version: str | None
    role: str | None
    items: list[bytes]  # JSON of each instance: feature row (request) or prediction (response)
    received_at: float


@dataclass(frozen=True)
class Window:
    """The rows of one monitoring window and where it sits in the log."""

    rows: pd.DataFrame
    kind: str
    start_seq: int
    end_seq: int
    start_ts: float | None
    end_ts: float | None
    complete: bool

    @property
    def n(self) -> int:
        return len(self.rows)

    @property
    def id(self) -> str:
        """Stable id of the window (the same tumbling window always gets the same id)."""
        return f"{self.kind}:{self.start_seq}-{self.end_seq}"

    @property
    def requests(self) -> int:
        """Distinct inference requests the window's rows came from."""
        return int(self.rows["request_id"].nunique()) if len(self.rows) else 0

    def capped(self, max_rows_per_request: int) -> "Window":
        """The window with at most ``max_rows_per_request`` rows of each request (its first ones):
        one large request cannot fill a window on its own. Same id and bounds."""
        if not len(self.rows) or self.rows["request_id"].value_counts().iloc[0] <= max_rows_per_request:
            return self
        return self._with(self.rows[self.rows["row_index"] < max_rows_per_request].reset_index(drop=True))

    def without_role(self, role: str) -> "Window":
        """The window without the rows of ``role`` (a shadow's answers to mirrored copies). Same id and bounds."""
        if not len(self.rows) or not (self.rows["role"] == role).any():
            return self
        return self._with(self.rows[self.rows["role"] != role].reset_index(drop=True))

    def _with(self, rows: pd.DataFrame) -> "Window":
        return Window(rows, self.kind, self.start_seq, self.end_seq, self.start_ts, self.end_ts, self.complete)


@dataclass
class GroupResult:
    """What one caller's events did: newly stored per kind, duplicates ignored, rows paired."""

    requests: int = 0
    responses: int = 0
    duplicates: int = 0
    rows: int = 0

    @property
    def stored(self) -> int:
        return self.requests + self.responses


@dataclass(frozen=True)
class LabelResult:
    stored: int
    unknown_ids: list[str]
    duplicates: int = 0  # the same label again for a (request id, row) that has it: nothing changed


# An event is unpaired while its counterpart is not stored: pairing is 1:1 on the unique
# (ce_id, kind), so this needs no flag to update when a pair completes.
_UNPAIRED = "NOT EXISTS (SELECT 1 FROM events o WHERE o.ce_id = e.ce_id AND o.kind != e.kind)"

_INSERT_CHUNK = 3000  # rows per multi-row INSERT: 10 parameters each, under SQLite's 32766


@functools.lru_cache(maxsize=64)
def _insert_sql(n: int) -> str:
    return ("INSERT INTO events (ce_id, kind, model_name, model_version, role, attributes, body, flat, received_at, "
            "request_key) VALUES " + ",".join(["(?,?,?,?,?,?,?,?,?,?)"] * n)
            + " ON CONFLICT (ce_id, kind) DO NOTHING RETURNING ce_id, kind")


def _migrate(db: sqlite3.Connection) -> None:
    """Bring a store made by an earlier version up to this schema (a column added, never removed)."""
    columns = {row[1] for row in db.execute("PRAGMA table_info(events)")}
    if "request_key" not in columns:
        db.execute("ALTER TABLE events ADD COLUMN request_key TEXT")
    # only events that carry a key are indexed: the local gateway's primary events carry none
    db.execute("CREATE INDEX IF NOT EXISTS events_request_key ON events (request_key) WHERE request_key IS NOT NULL")


# The shadow's rows since a time, each with the primary's row of the same request (by request key:
# the primary event carrying the same key, else the event whose ce-id is the key) and its label.
_SHADOW_PAIRS = """
WITH s AS (
    SELECT r.seq, r.row_index, r.ts, r.model_version, r.prediction, e.request_key AS k
    FROM rows r JOIN events e ON e.ce_id = r.request_id AND e.kind = 'request'
    WHERE r.role = 'shadow' AND r.ts >= ? {version}
    ORDER BY r.seq DESC LIMIT ?
), m AS (
    SELECT DISTINCT s.k, COALESCE((
        SELECT p.ce_id FROM events p WHERE p.request_key = s.k AND p.kind = 'request'
        AND (p.role IS NULL OR p.role != 'shadow') ORDER BY p.seq LIMIT 1), s.k) AS pid
    FROM s
)
SELECT s.k, s.row_index, s.ts, s.model_version, s.prediction, p.request_id, p.model_version, p.prediction, l.label
FROM s JOIN m ON m.k = s.k
LEFT JOIN rows p ON p.request_id = m.pid AND p.row_index = s.row_index AND (p.role IS NULL OR p.role != 'shadow')
LEFT JOIN labels l ON l.request_id = p.request_id AND l.row_index = p.row_index
ORDER BY s.seq
"""


_dumps = orjson.dumps


class InferenceStore:
    """Durable store of inference events, paired rows and labels (one SQLite file).

    One process writes (the sink); the writer methods are serialised by a lock, so the store may
    be shared by threads. Readers open their own connection per call and never block the writer.
    """

    def __init__(self, path: str | Path, *, synchronous: Synchronous = "NORMAL", max_pending: int = 200_000,
                 pair_lookback: int = 1_000_000, checkpoint_seconds: float = 1.0):
        self.path = Path(path)
        private_dir(self.path.parent)
        _private_files(self.path)
        self.synchronous = synchronous
        self._lock = threading.Lock()
        self._db = self._connect()
        self._db.executescript(_SCHEMA)
        _migrate(self._db)
        # checkpoints (which fsync) run in a background thread, not inside the commits of the sink
        self._db.execute("PRAGMA wal_autocheckpoint=0")
        self._failure: str | None = None  # why the last commit failed; None after a good one
        self._retry_at = 0.0  # while failing, the next time a write may touch the database again
        self._max_pending = max_pending
        self._pending: OrderedDict[str, _Pending] = OrderedDict()
        self._pending_complete = True  # False: some unpaired events live only in the database
        self._load_pending(pair_lookback)
        self._closed = False
        self._stop = threading.Event()
        self._files = self._file_state()  # the files this connection writes (see the module doc)
        self._checkpointer = threading.Thread(target=self._checkpoint_loop, args=(checkpoint_seconds,),
                                              name="store-checkpoint", daemon=True)
        self._checkpointer.start()

    def _checkpoint_loop(self, interval: float) -> None:
        """Copy committed WAL frames into the database file every ``interval`` seconds.

        PASSIVE never blocks the writer; once a checkpoint has caught up, the writer's next
        transaction starts the WAL from its beginning again, so the ``-wal`` file stays small.
        """
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=30.0)
        try:
            while not self._stop.wait(interval):
                if self._files_problem() is not None:  # never touch files that changed under the store
                    continue
                try:
                    db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
                except sqlite3.Error as exc:  # a busy database is retried at the next tick
                    log.debug("checkpoint skipped: %s", exc)
        finally:
            db.close()

    @classmethod
    def from_settings(cls, settings: Any) -> "InferenceStore":
        """The store named by ``settings.monitor`` (default ``<workspace>/monitor/inference.db``)."""
        return cls(store_path(settings), synchronous=settings.monitor.store_synchronous)

    # ------------------------------------------------------------------ durability

    def _file_state(self) -> dict[str, tuple[int, int, int]]:
        out = {}
        for suffix in _SUFFIXES:
            with contextlib.suppress(FileNotFoundError):
                st = os.stat(f"{self.path}{suffix}")
                out[suffix] = (st.st_dev, st.st_ino, st.st_size)
        return out

    def _files_problem(self) -> str | None:
        """Why the files on disk are not (any more) the ones this store writes, or None."""
        for suffix, (dev, ino, size) in self._files.items():
            name = f"{self.path}{suffix}"
            try:
                st = os.stat(name)
            except FileNotFoundError:
                return f"{name} was deleted while the monitor wrote to it"
            except OSError as exc:
                return f"{name} cannot be checked: {exc}"
            if (st.st_dev, st.st_ino) != (dev, ino):
                return f"{name} was replaced while the monitor wrote to it"
            if suffix == "-shm" and st.st_size < size:
                return f"{name} was truncated while the monitor wrote to it"
            if not os.access(name, os.W_OK):
                return f"{name} is not writable"
        return None

    def _unavailable(self) -> StoreUnavailable | None:
        problem = self._files_problem()
        if problem is not None:
            return StoreUnavailable(f"the inference store cannot commit: {problem}; nothing more is accepted "
                                    "until the monitor is restarted")
        return None

    def _write(self, work: Any) -> Any:
        """Run ``work(db)`` in one write transaction; refuse (503) unless it is durable when this returns."""
        if self._closed:
            raise StoreUnavailable("the store is closed")
        refusal = self._unavailable()
        if refusal is not None:
            self._failure = refusal.message
            raise refusal
        if self._failure is not None and time.monotonic() < self._retry_at:
            # a full disk: senders retry in a loop; each try would grow the WAL a little more
            raise StoreUnavailable(f"the inference store cannot commit ({self.path}): {self._failure}")
        db = self._db
        try:
            db.execute("BEGIN IMMEDIATE")
            result = work(db)
            db.execute("COMMIT")
        except sqlite3.Error as exc:
            if db.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    db.execute("ROLLBACK")
            self._failure = f"store not writable: {exc}"
            if (getattr(exc, "sqlite_errorcode", 0) or 0) & 0xFF in _DISK_ERRORS:
                self._retry_at = time.monotonic() + _RETRY_SECONDS
            raise StoreUnavailable(f"the inference store cannot commit ({self.path}): {exc}") from exc
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
        refusal = self._unavailable()  # the files changed while this committed: it may not be durable
        if refusal is not None:
            self._failure = refusal.message
            raise refusal
        self._failure = None
        return result

    def health(self) -> str | None:
        """None when a commit now would be durable; else why not (``/readyz`` answers 503 with it)."""
        if self._closed:
            return "the store is closed"
        problem = self._files_problem()
        if problem is not None:
            return f"the inference store cannot commit: {problem}"
        if self._failure is not None:
            with self._lock:  # the last commit failed: try one that needs new pages before saying it works again
                self._retry_at = 0.0
                try:
                    self._write(_probe)
                except StoreUnavailable:
                    pass
        return self._failure

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=30.0)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute(f"PRAGMA synchronous={self.synchronous}")
        db.execute("PRAGMA busy_timeout=30000")
        return db

    def _load_pending(self, lookback: int) -> None:
        """Reload the events still waiting for their counterpart, among the last ``lookback`` events.

        Older unpaired events (e.g. a logger in ``mode: request``) stay stored but are not paired.
        """
        last = self._db.execute("SELECT COALESCE(MAX(seq), 0) FROM events").fetchone()[0]
        cur = self._db.execute(
            "SELECT e.ce_id, e.kind, e.model_name, e.model_version, e.role, e.flat, e.received_at FROM events e "
            f"WHERE e.seq > ? AND {_UNPAIRED} ORDER BY e.seq DESC LIMIT ?", (last - lookback, self._max_pending + 1))
        found = cur.fetchall()
        self._pending_complete = len(found) <= self._max_pending
        for ce_id, *fields in reversed(found[: self._max_pending]):
            self._pending[ce_id] = self._pending_from_db(*fields)
        if found:
            log.info("store %s: %d unpaired events waiting for their counterpart", self.path, len(self._pending))

    @staticmethod
    def _pending_from_db(kind: str, model: str, version: str | None, role: str | None, flat: bytes,
                         received_at: float) -> _Pending:
        return _Pending(kind, model, version, role, [_dumps(x) for x in orjson.loads(flat)], received_at)

    # ------------------------------------------------------------------ writing

    def append_events(self, events: Sequence[ParsedEvent]) -> int:
        """Store ``events`` in one transaction (all or nothing); pair requests with responses.

        Returns the number of events newly stored (re-sent duplicates are not counted). Raises
        :class:`EventError` (422) — storing nothing — if a request and its response disagree on
        the number of instances or the model.
        """
        result = self.append_groups([events])[0]
        if isinstance(result, EventError):
            raise result
        return result.stored

    def append_groups(self, groups: Sequence[Sequence[ParsedEvent]]) -> list[GroupResult | EventError]:
        """Group commit: store several callers' event lists in ONE transaction.

        Each group is all-or-nothing on its own (a bad group gets an ``EventError`` in its slot and
        leaves the others untouched); the transaction commits once for all. When this returns,
        every group reported as a :class:`GroupResult` is durable. Database errors propagate and
        nothing of the call is stored.

        The SQL is set-based — one multi-row ``INSERT ... RETURNING`` tells which events are new
        (not re-sent duplicates), pairing runs in memory, then one ``executemany`` each writes the
        rows and marks the pairs — because per-event statements cost more than parsing the events.
        """
        with self._lock:
            undo_all: list[tuple[str, _Pending | None]] = []

            def work(db: sqlite3.Connection) -> list:
                events = [ev for group in groups for ev in group]
                fresh, items = self._insert_events(db, events)
                results, rows, released = self._pair_groups(db, groups, fresh, items, undo_all)
                if released:  # new events of refused groups
                    db.executemany("DELETE FROM events WHERE ce_id = ? AND kind = ?", released)
                self._keep_unpaired_flat(db, events, items, fresh)
                if rows:
                    db.executemany(
                        "INSERT INTO rows (request_id, row_index, ts, model_name, model_version, role, features, "
                        "prediction) VALUES (?,?,?,?,?,?,?,?)", rows)
                return results

            try:
                results = self._write(work)
            except BaseException:
                self._undo(undo_all)
                raise
            while len(self._pending) > self._max_pending:
                self._pending.popitem(last=False)
                self._pending_complete = False
        return results

    def _keep_unpaired_flat(self, db: sqlite3.Connection, events: list[ParsedEvent], items: list[list[bytes]],
                            fresh: set[tuple[str, str]]) -> None:
        """Store the flattened instances of the new events still waiting for their counterpart.

        Only an unpaired event's ``flat`` is ever read (to pair it after a restart or once it left
        the in-memory pending map); a paired event's rows are in ``rows`` already. Events arrive
        in pairs from the local gateway, so most are paired in the transaction that stores them,
        and writing ``flat`` for them would add a third copy of every row to each commit (~16 KB of
        ~50 KB for a 32-row request). KServe's logger sends the two halves apart: the first half
        gets its ``flat`` here, in the same transaction.
        """
        waiting, seen = [], set()
        for ev, parts in zip(events, items):
            key = (ev.id, ev.kind)
            if key in seen or key not in fresh:  # a repeat within this call is a duplicate: the first was stored
                continue
            seen.add(key)
            pending = self._pending.get(ev.id)
            if pending is not None and pending.kind == ev.kind:
                waiting.append((b"[" + b",".join(parts) + b"]", ev.id, ev.kind))
        if waiting:
            db.executemany("UPDATE events SET flat = ? WHERE ce_id = ? AND kind = ?", waiting)

    @staticmethod
    def _insert_events(db: sqlite3.Connection, events: list[ParsedEvent]
                       ) -> tuple[set[tuple[str, str]], list[list[bytes]]]:
        """Insert ``events`` (duplicates of stored ones are skipped), ``flat`` left empty for now.

        Returns the (ce_id, kind) keys that are new, and per event the JSON of each instance (its
        feature row or prediction), serialised once and reused for the paired rows.
        """
        fresh: set[tuple[str, str]] = set()
        items: list[list[bytes]] = []
        for start in range(0, len(events), _INSERT_CHUNK):
            chunk = events[start:start + _INSERT_CHUNK]
            params: list[Any] = []
            for ev in chunk:
                parts = [_dumps(x) for x in (ev.rows if ev.kind == "request" else ev.predictions)]
                items.append(parts)
                params += (ev.id, ev.kind, ev.model_name, ev.model_version, ev.role, _dumps(ev.attributes), ev.body,
                           b"", ev.received_at, ev.request_key)
            fresh.update(db.execute(_insert_sql(len(chunk)), params).fetchall())
        return fresh, items

    def _pair_groups(self, db: sqlite3.Connection, groups: Sequence[Sequence[ParsedEvent]],
                     fresh: set[tuple[str, str]], items: list[list[bytes]], undo_all: list
                     ) -> tuple[list, list, list]:
        """Pair the new events of each group with their counterparts (in memory, else in the database)."""
        inserted = frozenset(fresh)
        unclaimed = set(fresh)  # new keys not yet owned by an accepted group
        bodies: dict[tuple[str, str], bytes] = {}  # body of each key claimed in this call
        results: list[GroupResult | EventError] = []
        rows: list[tuple] = []
        offset = 0
        for group in groups:
            group_items = items[offset:offset + len(group)]
            offset += len(group)
            stats, undo, claims, g_rows = GroupResult(), [], [], []
            try:
                for ev, parts in zip(group, group_items):
                    key = (ev.id, ev.kind)
                    if key not in unclaimed:
                        self._check_same(db, ev, bodies.get(key) if key in inserted else None)
                        stats.duplicates += 1
                        continue
                    unclaimed.discard(key)
                    claims.append(key)
                    bodies[key] = ev.body
                    if ev.kind == "request":
                        stats.requests += 1
                    else:
                        stats.responses += 1
                    self._pair_one(db, ev, parts, inserted, undo, g_rows)
            except EventError as exc:
                self._undo(undo)
                unclaimed.update(claims)
                for key in claims:
                    bodies.pop(key, None)
                results.append(exc)
                continue
            stats.rows = len(g_rows)
            rows += g_rows
            undo_all += undo
            results.append(stats)
        return results, rows, sorted(unclaimed)

    @staticmethod
    def _check_same(db: sqlite3.Connection, ev: ParsedEvent, claimed: bytes | None) -> None:
        """A repeat of a stored (or just claimed) ``(ce_id, kind)`` is a duplicate only with the same
        body (a logger's retry); a different event that reuses the id is refused (409), never dropped."""
        if claimed is None:
            row = db.execute("SELECT body FROM events WHERE ce_id = ? AND kind = ?", (ev.id, ev.kind)).fetchone()
            claimed = None if row is None else bytes(row[0])
        if claimed is not None and claimed != ev.body:
            raise EventError(409, f"ce-id {ev.id!r} was already used for a different {ev.kind} (another body); "
                                  "each inference needs its own ce-id", reason="reused_id")

    def _undo(self, undo: list[tuple[str, _Pending | None]]) -> None:
        for ce_id, previous in reversed(undo):
            if previous is None:
                self._pending.pop(ce_id, None)
            else:
                self._pending[ce_id] = previous

    def _counterpart(self, db: sqlite3.Connection, ev: ParsedEvent, inserted: frozenset) -> _Pending | None:
        other = self._pending.get(ev.id)
        if other is not None:
            return other if other.kind != ev.kind else None
        if self._pending_complete:
            return None
        row = db.execute("SELECT kind, model_name, model_version, role, flat, received_at FROM events "
                         "WHERE ce_id = ? AND kind != ?", (ev.id, ev.kind)).fetchone()
        if row is None or (ev.id, row[0]) in inserted:  # events of this call are tracked in memory only
            return None
        return self._pending_from_db(*row)

    def _pair_one(self, db: sqlite3.Connection, ev: ParsedEvent, parts: list[bytes], inserted: frozenset,
                  undo: list, rows_out: list) -> None:
        other = self._counterpart(db, ev, inserted)
        if other is None:
            undo.append((ev.id, self._pending.get(ev.id)))
            self._pending[ev.id] = _Pending(ev.kind, ev.model_name, ev.model_version, ev.role, parts, ev.received_at)
            return
        if other.model_name != ev.model_name:
            raise EventError(422, f"event {ev.id!r}: request and response name different models "
                                  f"({other.model_name!r} vs {ev.model_name!r})", reason="mismatch")
        request, response = (ev, other) if ev.kind == "request" else (other, ev)
        rows, preds = (parts, other.items) if ev.kind == "request" else (other.items, parts)
        if len(rows) != len(preds):
            raise EventError(422, f"event {ev.id!r}: request has {len(rows)} rows but response has {len(preds)} "
                                  "predictions", reason="row_count")
        ts = request.received_at
        version = response.model_version or request.model_version
        role = response.role or request.role
        rows_out += [(ev.id, i, ts, ev.model_name, version, role, r, p) for i, (r, p) in enumerate(zip(rows, preds))]
        undo.append((ev.id, self._pending.pop(ev.id, None)))

    def add_labels(self, labels: Sequence[dict[str, Any]]) -> LabelResult:
        """Store ground-truth labels ``[{"id", "label", "row_index"=0, "ts"=now}]`` in one transaction.

        Labels for ids the store has never seen are stored too (the events may still be in flight)
        and reported in ``unknown_ids``. One label per (request id, row): the same label again is a
        duplicate (counted, nothing changes), a different one is refused (409) and the first stays;
        a row beyond a stored request's rows is refused (422). All or nothing.
        """
        now = time.time()
        params: dict[tuple[str, int], tuple] = {}
        for item in labels:
            if not isinstance(item, dict) or "id" not in item or "label" not in item:
                raise EventError(422, "each feedback item needs 'id' and 'label'", reason="bad_feedback")
            row_index = item.get("row_index", 0)
            if row_index.__class__ is bool or not isinstance(row_index, int) or row_index < 0:
                raise EventError(422, f"feedback for {item['id']!r}: row_index must be a non-negative integer",
                                 reason="bad_feedback")
            ts = item.get("ts", now)
            if isinstance(ts, bool) or not isinstance(ts, (int, float)):
                raise EventError(422, f"feedback for {item['id']!r}: ts must be epoch seconds", reason="bad_feedback")
            key = (str(item["id"]), row_index)
            label = _dumps(item["label"])
            if key in params and params[key][2] != label:
                raise EventError(409, f"feedback for {key[0]!r} row {row_index} gives two different labels",
                                 reason="label_conflict")
            params[key] = (*key, label, float(ts))
        ids = sorted({k[0] for k in params})
        known: set[str] = set()
        fresh: list[tuple] = []

        def work(db: sqlite3.Connection) -> None:
            conflicts = []
            for key, param in params.items():
                row = db.execute("SELECT label FROM labels WHERE request_id = ? AND row_index = ?", key).fetchone()
                if row is None:
                    self._check_row_index(db, *key)
                    fresh.append(param)
                elif bytes(row[0] if isinstance(row[0], bytes) else row[0].encode()) != param[2]:
                    conflicts.append(f"{key[0]!r} row {key[1]}")
            if conflicts:  # one label per prediction: the first one stays
                raise EventError(409, f"already labelled with a different label: {', '.join(conflicts[:5])}"
                                      + (f" and {len(conflicts) - 5} more" if len(conflicts) > 5 else "")
                                      + "; nothing of this feedback was stored", reason="label_conflict")
            db.executemany("INSERT INTO labels (request_id, row_index, label, ts) VALUES (?,?,?,?)", fresh)
            for chunk in range(0, len(ids), 500):
                part = ids[chunk:chunk + 500]
                marks = ",".join("?" * len(part))
                known.update(r[0] for r in db.execute(
                    f"SELECT DISTINCT ce_id FROM events WHERE ce_id IN ({marks})", part))

        with self._lock:
            self._write(work)
        return LabelResult(stored=len(fresh), unknown_ids=[i for i in ids if i not in known],
                           duplicates=len(params) - len(fresh))

    def _check_row_index(self, db: sqlite3.Connection, request_id: str, row_index: int) -> None:
        """Refuse (422) a label for a row the stored request does not have; a request not stored yet
        keeps its labels waiting (they join by (request id, row) once it is)."""
        n = db.execute("SELECT COUNT(*) FROM rows WHERE request_id = ?", (request_id,)).fetchone()[0]
        if not n:
            pending = self._pending.get(request_id)
            if pending is not None and pending.kind == "request":
                n = len(pending.items)
            else:
                row = db.execute("SELECT flat FROM events WHERE ce_id = ? AND kind = 'request'",
                                 (request_id,)).fetchone()
                n = len(orjson.loads(row[0])) if row is not None and row[0] else 0
        if n and row_index >= n:
            raise EventError(422, f"feedback for {request_id!r}: row_index {row_index} is beyond the request's "
                                  f"{n} rows (0..{n - 1})", reason="bad_feedback")

    # ------------------------------------------------------------------ reading

    def _reader(self) -> sqlite3.Connection:
        problem = self._files_problem()
        if problem is not None:  # never create a deleted file again, never map a truncated -shm
            raise StoreUnavailable(f"the inference store cannot be read: {problem}")
        db = sqlite3.connect(self.path.resolve().as_uri() + "?mode=rw", uri=True, timeout=30.0)
        db.execute("PRAGMA busy_timeout=30000")
        return db

    def _frame(self, where: str, params: Sequence[Any], order: str = "seq", limit: int | None = None,
               desc: bool = False) -> pd.DataFrame:
        sql = ("SELECT seq, request_id, row_index, ts, model_name, model_version, role, features, prediction "
               f"FROM rows {where} ORDER BY {order} {'DESC' if desc else 'ASC'}")
        if limit is not None:
            sql += f" LIMIT {int(limit)}"
        db = self._reader()
        try:
            data = db.execute(sql, params).fetchall()
        finally:
            db.close()
        if desc:
            data.reverse()
        return _to_frame(data)

    def rows(self, since: float | str | pd.Timestamp | None = None, until: float | str | pd.Timestamp | None = None,
             limit: int | None = None, model_name: str | None = None) -> pd.DataFrame:
        """Paired rows as a DataFrame: ``seq, request_id, row_index, ts`` (UTC), ``model_name,
        model_version, role``, one column per feature, ``prediction``. ``since`` inclusive,
        ``until`` exclusive; with ``limit`` the LATEST ``limit`` rows of the range."""
        where, params = _range(since, until, model_name)
        return self._frame(where, params, limit=limit, desc=limit is not None)

    def count(self, since: float | str | pd.Timestamp | None = None, model_name: str | None = None) -> int:
        """Number of paired rows (received at or after ``since``)."""
        where, params = _range(since, None, model_name)
        db = self._reader()
        try:
            return int(db.execute(f"SELECT COUNT(*) FROM rows {where}", params).fetchone()[0])
        finally:
            db.close()

    def counts(self) -> dict[str, int]:
        """Totals: events, unpaired events, paired rows, labels."""
        db = self._reader()
        try:
            return {
                "events": db.execute("SELECT COUNT(*) FROM events").fetchone()[0],
                "unpaired": db.execute(f"SELECT COUNT(*) FROM events e WHERE {_UNPAIRED}").fetchone()[0],
                "rows": db.execute("SELECT COUNT(*) FROM rows").fetchone()[0],
                "labels": db.execute("SELECT COUNT(*) FROM labels").fetchone()[0],
            }
        finally:
            db.close()

    def event_ids(self, kind: str | None = None) -> set[str]:
        """ce-ids of all stored events (of one ``kind``)."""
        db = self._reader()
        try:
            if kind is None:
                return {r[0] for r in db.execute("SELECT ce_id FROM events")}
            return {r[0] for r in db.execute("SELECT ce_id FROM events WHERE kind = ?", (kind,))}
        finally:
            db.close()

    def window(self, kind: Literal["tumbling", "sliding"] = "tumbling", rows: int | None = None,
               seconds: float | None = None, *, now: float | None = None, model_name: str | None = None) -> Window:
        """The current monitoring window.

        * sliding: the last ``rows`` rows, restricted to the last ``seconds`` when given.
        * tumbling by count (no ``seconds``): the latest COMPLETE block of ``rows`` rows in arrival
          order (blocks ``[k*rows, (k+1)*rows)``), or the partial first block while none is complete.
        * tumbling by time: the latest complete interval ``[k*seconds, (k+1)*seconds)`` (epoch
          aligned) — or the running one while none is complete — capped to its last ``rows`` rows.

        ``Window.id`` is stable for a tumbling window, so a check can skip windows it has seen.
        The minimum sample size before a verdict is the caller's decision (``Window.n``).
        """
        if rows is None and seconds is None:
            raise ValueError("a window needs rows and/or seconds")
        now = time.time() if now is None else now
        mfilter, mparams = ("AND model_name = ?", [model_name]) if model_name else ("", [])
        if kind == "sliding":
            since = now - seconds if seconds is not None else None
            df = self.rows(since=since, limit=rows, model_name=model_name)
            return self._window(df, kind, complete=True)
        if kind != "tumbling":
            raise ValueError(f"unknown window kind {kind!r} (tumbling or sliding)")
        if seconds is None:
            total = self.count(model_name=model_name)
            k = total // rows
            start = (k - 1) * rows if k else 0
            df = self._frame(f"WHERE 1 = 1 {mfilter}", mparams, limit=rows) if k == 0 else \
                self._nth_block(start, rows, mfilter, mparams)
            return self._window(df, kind, complete=k > 0)
        current = math.floor(now / seconds) * seconds
        earliest = self._first_ts(model_name)
        complete = earliest is not None and earliest < current
        start = current - seconds if complete else current
        df = self.rows(since=start, until=start + seconds, limit=rows, model_name=model_name)
        win = self._window(df, kind, complete=complete)
        return Window(win.rows, kind, win.start_seq, win.end_seq, start, start + seconds, complete)

    def _nth_block(self, offset: int, n: int, mfilter: str, mparams: list) -> pd.DataFrame:
        sql = ("SELECT seq, request_id, row_index, ts, model_name, model_version, role, features, prediction "
               f"FROM rows WHERE 1 = 1 {mfilter} ORDER BY seq LIMIT ? OFFSET ?")
        db = self._reader()
        try:
            data = db.execute(sql, [*mparams, n, offset]).fetchall()
        finally:
            db.close()
        return _to_frame(data)

    def _first_ts(self, model_name: str | None) -> float | None:
        db = self._reader()
        try:
            if model_name:
                r = db.execute("SELECT MIN(ts) FROM rows WHERE model_name = ?", (model_name,)).fetchone()
            else:
                r = db.execute("SELECT MIN(ts) FROM rows").fetchone()
            return r[0]
        finally:
            db.close()

    @staticmethod
    def _window(df: pd.DataFrame, kind: str, *, complete: bool) -> Window:
        if df.empty:
            return Window(df, kind, 0, 0, None, None, complete)
        ts = df["ts"]
        return Window(df, kind, int(df["seq"].iloc[0]), int(df["seq"].iloc[-1]) + 1,
                      ts.iloc[0].timestamp(), ts.iloc[-1].timestamp(), complete)

    def labelled(self, since: float | str | pd.Timestamp | None = None) -> pd.DataFrame:
        """Paired rows that have a label: ``request_id, row_index, ts, model_version, role,
        prediction, label``."""
        where, params = _range(since, None, None, prefix="r.")
        db = self._reader()
        try:
            data = db.execute(
                "SELECT r.request_id, r.row_index, r.ts, r.model_version, r.role, r.prediction, l.label "
                f"FROM rows r JOIN labels l ON l.request_id = r.request_id AND l.row_index = r.row_index {where} "
                "ORDER BY r.seq", params).fetchall()
        finally:
            db.close()
        df = pd.DataFrame(data, columns=["request_id", "row_index", "ts", "model_version", "role", "prediction",
                                         "label"])
        df["prediction"] = _json_list(list(df["prediction"]))
        df["label"] = _json_list(list(df["label"]))
        df["ts"] = pd.to_datetime(df["ts"], unit="s", utc=True)
        return df

    def quality_by_version(self, since: float | str | pd.Timestamp | None = None,
                           task: Literal["classification", "regression"] = "classification",
                           ) -> dict[str, dict[str, float]]:
        """Quality of labelled predictions per model version: ``{version: {"n", "accuracy"}}`` for
        classification, ``{version: {"n", "rmse", "mae"}}`` for regression."""
        df = self.labelled(since)
        out: dict[str, dict[str, float]] = {}
        for version, part in df.groupby(df["model_version"].fillna("unknown"), sort=True):
            if task == "classification":
                hits = [_same_class(p, y) for p, y in zip(part["prediction"], part["label"])]
                out[str(version)] = {"n": len(part), "accuracy": sum(hits) / len(hits)}
            else:
                err = pd.to_numeric(part["prediction"], errors="coerce") - pd.to_numeric(part["label"], errors="coerce")
                err = err.dropna()
                out[str(version)] = {"n": len(part), "rmse": float((err ** 2).mean() ** 0.5) if len(err) else math.nan,
                                     "mae": float(err.abs().mean()) if len(err) else math.nan}
        return out

    def shadow_pairs(self, since: float | str | pd.Timestamp | None = None, *, version: str | None = None,
                     limit: int = 20_000) -> pd.DataFrame:
        """The shadow's rows received since ``since`` (the latest ``limit``), each joined with the
        primary's row of the same request and row index: ``request_key, row_index, ts,
        shadow_version, shadow_prediction, primary_id, primary_version, primary_prediction, label``.
        A shadow row whose primary answer is not (yet) in the log has ``primary_id`` None; ``label``
        is the ground truth posted for the primary's ``ce-id``, or None."""
        params: list[Any] = [_epoch(since) if since is not None else 0.0]
        if version is not None:
            params.append(str(version))
        params.append(int(limit))
        db = self._reader()
        try:
            data = db.execute(_SHADOW_PAIRS.format(version="AND r.model_version = ?" if version is not None else ""),
                              params).fetchall()
        finally:
            db.close()
        df = pd.DataFrame(data, columns=["request_key", "row_index", "ts", "shadow_version", "shadow_prediction",
                                         "primary_id", "primary_version", "primary_prediction", "label"])
        for column in ("shadow_prediction", "primary_prediction", "label"):
            df[column] = [None if v is None else orjson.loads(v) for v in df[column]]
        df["ts"] = pd.to_datetime(df["ts"], unit="s", utc=True)
        return df

    def predictions_by_version(self, since: float | str | pd.Timestamp | None, versions: Sequence[str], *,
                               limit: int = 5_000) -> dict[str, list[Any]]:
        """The predictions each of ``versions`` answered since ``since`` (the latest ``limit`` of each,
        oldest first), shadow rows left out: what the canary and the primary served to users, for
        comparing their distributions. A version without rows maps to ``[]``."""
        floor = _epoch(since) if since is not None else 0.0
        db = self._reader()
        try:
            found = {str(v): [r[0] for r in db.execute(
                "SELECT prediction FROM rows WHERE ts >= ? AND model_version = ? AND (role IS NULL OR role != ?) "
                "ORDER BY seq DESC LIMIT ?", (floor, str(v), "shadow", int(limit)))] for v in versions}
        finally:
            db.close()
        return {v: _json_list(preds[::-1]) for v, preds in found.items()}

    def integrity_check(self) -> str:
        """``PRAGMA integrity_check`` ("ok" when the file is sound)."""
        db = self._reader()
        try:
            return db.execute("PRAGMA integrity_check").fetchone()[0]
        finally:
            db.close()

    def _unshrink_shm(self) -> None:
        """Give a truncated ``-shm`` back its size (zeros), so closing the connections cannot SIGBUS.

        SQLite treats a zeroed wal-index as one to rebuild from the ``-wal`` file, as after a crash.
        """
        shm = self._files.get("-shm")
        name = f"{self.path}-shm"
        with contextlib.suppress(OSError):
            st = os.stat(name)
            if shm is not None and (st.st_dev, st.st_ino) == shm[:2] and st.st_size < shm[2]:
                os.truncate(name, shm[2])

    def close(self) -> None:
        """Checkpoint the WAL and close the writer connection (idempotent)."""
        self._unshrink_shm()
        self._stop.set()
        self._checkpointer.join()
        with self._lock:
            if self._closed:
                return
            self._closed = True
            try:
                if self._files_problem() is None:
                    self._db.execute("PRAGMA wal_checkpoint(PASSIVE)")
            except sqlite3.Error as exc:  # a full disk: the WAL keeps what was committed; the next start copies it
                log.warning("closing the inference store without a checkpoint: %s", exc)
            finally:
                self._db.close()

    def __enter__(self) -> "InferenceStore":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def store_path(settings: Any) -> Path:
    """Where the inference log lives: ``monitor.store``, relative paths inside the workspace."""
    configured = settings.monitor.store
    if configured is None:
        return settings.workspace_dir / "monitor" / "inference.db"
    path = Path(configured).expanduser()
    return path if path.is_absolute() else settings.workspace_dir / path


def _same_class(pred: Any, label: Any) -> bool:
    if isinstance(pred, list) and len(pred) == 1:
        pred = pred[0]
    if isinstance(pred, (int, float)) and isinstance(label, (int, float)) and not isinstance(pred, bool):
        return float(pred) == float(label)
    return str(pred) == str(label)


def _epoch(value: float | str | pd.Timestamp) -> float:
    if isinstance(value, (int, float)):
        return float(value)
    ts = pd.Timestamp(value)
    if ts.tzinfo is None:
        ts = ts.tz_localize("UTC")
    return ts.timestamp()


def _range(since: Any, until: Any, model_name: str | None, prefix: str = "") -> tuple[str, list[Any]]:
    clauses, params = [], []
    if since is not None:
        clauses.append(f"{prefix}ts >= ?")
        params.append(_epoch(since))
    if until is not None:
        clauses.append(f"{prefix}ts < ?")
        params.append(_epoch(until))
    if model_name:
        clauses.append(f"{prefix}model_name = ?")
        params.append(model_name)
    return ("WHERE " + " AND ".join(clauses) if clauses else ""), params


def _json_list(values: list[bytes | str]) -> list[Any]:
    """Decode many JSON documents with ONE parser call (1.6x faster than one call each)."""
    if not values:
        return []
    try:
        return orjson.loads(b"[" + b",".join(values) + b"]")
    except TypeError:  # some stored as text
        return orjson.loads(b"[" + b",".join(v if isinstance(v, bytes) else v.encode() for v in values) + b"]")


def _to_frame(data: list[tuple]) -> pd.DataFrame:
    meta = pd.DataFrame([d[:7] for d in data], columns=["seq", *ROW_COLUMNS[:6]])
    features = pd.DataFrame(_json_list([d[7] for d in data]))
    features = features.drop(columns=[c for c in features.columns if c in meta.columns or c == "prediction"])
    meta["ts"] = pd.to_datetime(meta["ts"], unit="s", utc=True)
    out = pd.concat([meta, features], axis=1)
    out["prediction"] = _json_list([d[8] for d in data])
    return out
