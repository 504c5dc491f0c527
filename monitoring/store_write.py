"""The inference store's write path: storing request/response events and pairing them into rows.

A request and its response share a ce-id; the first of the two to arrive waits (in memory, and
in the ``flat`` column of its event row) until the other is stored, then the pair becomes one
``rows`` row per instance. :class:`EventWriter` does this for many callers' events at once (group
commit, :meth:`EventWriter.append_groups`), each group all-or-nothing, inside the durable write
transaction of :class:`monitoring.store.InferenceStore` (which mixes it in and owns the
connection, the lock and ``_write``).
"""

from __future__ import annotations

import functools
import logging
import sqlite3
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import orjson

from monitoring.events import EventError, ParsedEvent
from monitoring.store_schema import UNPAIRED

__all__ = ["EventWriter", "GroupResult", "Pending", "Prepared", "event_tuple", "prepared"]

log = logging.getLogger("monitoring.store")  # the store's logger, wherever its parts live

_dumps = orjson.dumps


class Pending(NamedTuple):
    """An accepted event still waiting for its counterpart (a tuple: made for every first half of a pair,
    it costs a third of a frozen dataclass)."""

    kind: str
    model_name: str
    model_version: str | None
    role: str | None
    items: list[bytes]  # JSON of each instance: feature row (request) or prediction (response)
    received_at: float


class Prepared(NamedTuple):
    """An event as the store writes it: its attributes and each instance already JSON. A fleet's intake
    journal (:mod:`monitoring.intake`) makes it once, when it journals the event, and hands it to the
    store later; the store takes it where it takes a :class:`~monitoring.events.ParsedEvent`."""

    id: str
    kind: str
    model_name: str
    model_version: str | None
    role: str | None
    request_key: str | None
    attributes: bytes  # JSON
    body: bytes
    items: tuple[bytes, ...]  # JSON of each instance: feature row (request) or prediction (response)
    received_at: float


def event_tuple(ev: ParsedEvent) -> tuple:
    """``ev`` serialised as :meth:`EventWriter._insert_events` would serialise it, the fields of a
    :class:`Prepared` in a plain tuple: of strings, bytes and numbers only, the garbage collector stops
    tracking it (a NamedTuple it tracks for as long as it lives)."""
    return (ev.id, ev.kind, ev.model_name, ev.model_version, ev.role, ev.request_key, _dumps(ev.attributes), ev.body,
            tuple(_dumps(x) for x in (ev.rows if ev.kind == "request" else ev.predictions)), ev.received_at)


def prepared(ev: ParsedEvent) -> Prepared:
    """``ev`` serialised as :meth:`EventWriter._insert_events` would serialise it."""
    return Prepared._make(event_tuple(ev))


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


# The row counts of the multi-row INSERTs (10 parameters a row: the largest stays under SQLite's 32766). SQLite
# compiles a statement of a few hundred rows for about what inserting its rows costs, and the connection keeps
# the compiled statements of the last 128 SQL texts it ran. A fleet's drain hands each model's store whatever
# arrived for it, a different count each time, which compiled a new text nearly every call: 2.4-3.7 us a row
# more than a count seen before (measured alone). A call of more than _EXACT events is split into these
# counts, largest first, and what is left (fewer than the smallest) goes in one statement of its own size:
# at most _EXACT + 3 texts, each compiled once a connection (a one-model monitor's commits hold up to 64).
_CHUNKS = (2048, 256, 32)
_EXACT = 64


def _chunks(total: int) -> list[int]:
    """The statements' row counts for ``total`` events: ``total`` itself up to :data:`_EXACT`, else
    :data:`_CHUNKS` largest first and the rest."""
    if total <= _EXACT:
        return [total] if total else []
    sizes = []
    for size in _CHUNKS:
        count, total = divmod(total, size)
        sizes += [size] * count
    return sizes + [total] if total else sizes


@functools.lru_cache(maxsize=128)
def _insert_sql(n: int) -> str:
    return ("INSERT INTO events (ce_id, kind, model_name, model_version, role, attributes, body, flat, received_at, "
            "request_key) VALUES " + ",".join(["(?,?,?,?,?,?,?,?,?,?)"] * n)
            + " ON CONFLICT (ce_id, kind) DO NOTHING RETURNING ce_id, kind")


class EventWriter:
    """Mixin of :class:`~monitoring.store.InferenceStore`: the events' write and pair path.

    Uses the store's writer connection ``_db``, its ``_lock`` and ``_write`` (one durable
    transaction), and keeps the events waiting for their counterpart in ``_pending``.
    """

    path: Path
    _db: sqlite3.Connection
    _lock: threading.Lock
    _max_pending: int
    _pending: OrderedDict[str, Pending]
    _pending_complete: bool
    _write: Callable[[Callable[[sqlite3.Connection], Any]], Any]

    def _load_pending(self, lookback: int) -> None:
        """Reload the events still waiting for their counterpart, among the last ``lookback`` events.

        Older unpaired events (e.g. a logger in ``mode: request``) stay stored but are not paired.
        """
        last = self._db.execute("SELECT COALESCE(MAX(seq), 0) FROM events").fetchone()[0]
        cur = self._db.execute(
            "SELECT e.ce_id, e.kind, e.model_name, e.model_version, e.role, e.flat, e.received_at FROM events e "
            f"WHERE e.seq > ? AND {UNPAIRED} ORDER BY e.seq DESC LIMIT ?", (last - lookback, self._max_pending + 1))
        found = cur.fetchall()
        self._pending_complete = len(found) <= self._max_pending
        for ce_id, *fields in reversed(found[: self._max_pending]):
            self._pending[ce_id] = self._pending_from_db(*fields)
        if found:
            log.info("store %s: %d unpaired events waiting for their counterpart", self.path, len(self._pending))

    @staticmethod
    def _pending_from_db(kind: str, model: str, version: str | None, role: str | None, flat: bytes,
                         received_at: float) -> Pending:
        return Pending(kind, model, version, role, [_dumps(x) for x in orjson.loads(flat)], received_at)

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

    def append_groups(self, groups: Sequence[Sequence[ParsedEvent | Prepared]]) -> list[GroupResult | EventError]:
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
            undo_all: list[tuple[str, Pending | None]] = []

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

    def _keep_unpaired_flat(self, db: sqlite3.Connection, events: list[ParsedEvent], items: list[Sequence[bytes]],
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
        items: list[Sequence[bytes]] = []
        start = 0
        for size in _chunks(len(events)):
            chunk = events[start:start + size]
            start += size
            params: list[Any] = []
            for ev in chunk:
                if ev.__class__ is Prepared:  # serialised where it was journaled
                    parts, attributes = ev.items, ev.attributes
                else:
                    parts = [_dumps(x) for x in (ev.rows if ev.kind == "request" else ev.predictions)]
                    attributes = _dumps(ev.attributes)
                items.append(parts)
                params += (ev.id, ev.kind, ev.model_name, ev.model_version, ev.role, attributes, ev.body,
                           b"", ev.received_at, ev.request_key)
            fresh.update(db.execute(_insert_sql(size), params).fetchall())
        return fresh, items

    def _pair_groups(self, db: sqlite3.Connection, groups: Sequence[Sequence[ParsedEvent | Prepared]],
                     fresh: set[tuple[str, str]], items: list[Sequence[bytes]], undo_all: list
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

    def _undo(self, undo: list[tuple[str, Pending | None]]) -> None:
        for ce_id, previous in reversed(undo):
            if previous is None:
                self._pending.pop(ce_id, None)
            else:
                self._pending[ce_id] = previous

    def _counterpart(self, db: sqlite3.Connection, ev: ParsedEvent, inserted: frozenset) -> Pending | None:
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
            self._pending[ev.id] = Pending(ev.kind, ev.model_name, ev.model_version, ev.role, parts, ev.received_at)
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
