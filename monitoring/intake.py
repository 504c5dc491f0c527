"""A fleet monitor's intake journal: every model's acknowledged events in one SQLite file, moved into each
model's own store in batches.

Why: each model keeps its own inference store (:class:`monitoring.store.InferenceStore`: its windows, pairs,
labels, and a corrupt or full store stops that model alone). KServe's logger posts one event per request
and InferenceService, so a fleet monitor's round of concurrent requests is spread over many models: with
the events committed straight into the stores, each store commits about one pair a round, and a commit
costs its WAL frames however few events it holds -- single-event ingest over 50 models ran at 0.5x one
model's (docs/fleet.md). Here the events of a round, whatever their model, are committed in ONE
transaction of the journal (``intake`` rows: no index but the rowid, so a commit appends), and the request
is acknowledged once that commit is durable. The journal keeps the parsed events of every model in memory
and a drain thread moves them into the models' stores every ``drain_seconds`` (and whenever one of them is
read: :attr:`InferenceStore._before_read`), one ``append_groups`` a model -- the batched path, where one
commit holds hundreds of events -- then deletes the journal rows it moved.

Durability is the journal's: :class:`monitoring.store_durable.DurableSQLite`, the file checks and the
refusals of the stores. A process killed after an acknowledgement leaves the events in the journal; the next
monitor of the fleet moves them into the stores before it serves (:meth:`IntakeJournal.recover`), and a
one-model monitor of the fleet file moves its model's. Moving is idempotent: the store keeps ``(ce_id, kind)``
unique, so rows moved but not yet deleted from the journal are duplicates there, not new rows.

What changes for a sender: the answer says ``stored`` (in the journal) and ``duplicates: 0`` -- a re-sent
event is found when it reaches the store and counted in the model's
``driftloop_monitor_events_duplicate_total``; a response whose request disagrees on the number of instances
(the one refusal the store makes on pairing) is refused there: logged with the model's name and counted in its
``driftloop_monitor_events_rejected_total{reason}``. A model whose store refuses (closed, or its last commit
failed) gets 503 at once, as without the journal; its events already acknowledged stay in the journal and
in memory until its store takes them again. The other models never wait for it.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson

from monitoring.events import EventError, ParsedEvent
from monitoring.group_commit import GroupLoop
from monitoring.store_durable import DurableSQLite, StoreUnavailable, Synchronous
from monitoring.store_write import GroupResult

if TYPE_CHECKING:
    from monitoring.sink import GroupCommitter
    from monitoring.store import InferenceStore

__all__ = ["IntakeJournal", "journal_path"]

log = logging.getLogger(__name__)

SCHEMA = """
CREATE TABLE IF NOT EXISTS intake (
    seq INTEGER PRIMARY KEY,
    model TEXT NOT NULL,
    first INTEGER NOT NULL,
    event BLOB NOT NULL,
    body BLOB NOT NULL,
    received_at REAL NOT NULL
);
"""
_INSERT = "INSERT INTO intake (model, first, event, body, received_at) VALUES (?,?,?,?,?)"
_dumps = orjson.dumps


def journal_path(fleet_workspace: Path) -> Path:
    """Where a fleet's journal lives: ``<fleet workspace>/monitor/intake.db``."""
    return fleet_workspace / "monitor" / "intake.db"


def _encode(ev: ParsedEvent) -> bytes:
    return _dumps([ev.id, ev.kind, ev.source, ev.model_name, ev.model_version, ev.role, ev.request_key,
                   ev.attributes, ev.rows if ev.kind == "request" else ev.predictions])


def _decode(event: bytes, body: bytes, received_at: float) -> ParsedEvent:
    ce_id, kind, source, model, version, role, key, attrs, flat = orjson.loads(event)
    return ParsedEvent(id=ce_id, kind=kind, source=source, model_name=model, model_version=version, role=role,
                       attributes=attrs, body=bytes(body), rows=flat if kind == "request" else None,
                       predictions=None if kind == "request" else flat, received_at=received_at, request_key=key)


class IntakeJournal(DurableSQLite, GroupLoop[tuple["GroupCommitter", Sequence[ParsedEvent]]]):
    """The journal of one fleet monitor's models (``committers``: each model's sink committer, by model name).

    ``submit`` (on the event loop) acknowledges once the events are in the journal; :meth:`drain` (the drain
    thread, any reader of a model's store, :meth:`close`) moves them into the stores.
    """

    what = "intake journal"
    name = "intake-group-commit"

    def __init__(self, path: str | Path, committers: Mapping[str, GroupCommitter], *,
                 synchronous: Synchronous = "NORMAL", drain_seconds: float = 0.5,
                 max_waiting_events: int = 200_000, checkpoint_seconds: float = 1.0) -> None:
        GroupLoop.__init__(self)
        self._open(path, synchronous)
        self._db.executescript(SCHEMA)
        self.committers = dict(committers)
        self._names = {committer: name for name, committer in self.committers.items()}
        self.drain_seconds = drain_seconds
        self.max_waiting_events = max_waiting_events
        self._waiting: dict[str, list[Sequence[ParsedEvent]]] = {}  # model -> groups journaled, not in its store
        self._counts: dict[str, int] = {}  # model -> events waiting
        self._upto = 0  # the newest journal row whose group waits in _waiting (or was moved)
        self._mutex = threading.Lock()  # _waiting, _counts, _upto
        self._draining = threading.RLock()
        self._failing: dict[str, str] = {}  # model -> why its store did not take its events at the last drain
        self._opened(checkpoint_seconds)
        self.recovered = self.recover()
        for committer in self.committers.values():
            committer.store._before_read = self.drain
            committer.journal = self
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread = threading.Thread(target=self._drain_loop, name="intake-drain", daemon=True)
        self._thread.start()

    # -- the event loop: acknowledge once journaled ------------------------------------------------------
    @property
    def waiting(self) -> int:
        """Events acknowledged and not yet in their model's store."""
        return sum(self._counts.values())

    async def submit(self, committer: GroupCommitter, events: Sequence[ParsedEvent]) -> GroupResult:
        refusal = committer.store.refusal()
        if refusal is not None:
            raise refusal
        if self._counts.get(self._names[committer], 0) >= self.max_waiting_events:
            raise StoreUnavailable(f"{self.max_waiting_events} acknowledged events wait to be moved into "
                                   f"{committer.store.path}; retry later")
        return await self._submit((committer, events), len(events))

    def _commit(self, batch: list[tuple[tuple[GroupCommitter, Sequence[ParsedEvent]], asyncio.Future]],
                size: int) -> None:
        params = []
        for (committer, events), _ in batch:
            model = self._names[committer]
            params += [(model, int(i == 0), _encode(ev), ev.body, ev.received_at) for i, ev in enumerate(events)]

        def work(db: Any) -> int:
            db.executemany(_INSERT, params)
            return db.execute("SELECT last_insert_rowid()").fetchone()[0]

        try:
            with self._lock:
                last = self._write(work)
        except Exception as exc:  # noqa: BLE001 - the journal failed: nothing of this batch is acknowledged
            from monitoring.sink import GroupCommitter

            error = GroupCommitter.store_error(exc, size)
            for _, future in batch:
                if not future.done():
                    future.set_exception(error)
            return
        with self._mutex:
            for (committer, events), _ in batch:
                model = self._names[committer]
                self._waiting.setdefault(model, []).append(events)
                self._counts[model] = self._counts.get(model, 0) + len(events)
            self._upto = last
        if self.waiting >= self.max_group_events:
            self._wake.set()
        for (_, events), future in batch:
            if not future.done():  # the waiting request may have been cancelled (client gone)
                requests = sum(1 for ev in events if ev.kind == "request")
                future.set_result(GroupResult(requests=requests, responses=len(events) - requests))

    # -- the drain: into each model's store ---------------------------------------------------------------
    def _drain_loop(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.drain_seconds)
            self._wake.clear()
            try:
                self.drain()
            except Exception:  # noqa: BLE001 - the next round tries again; each model's failure is logged in drain
                log.exception("intake journal: drain failed")

    def drain(self) -> None:
        """Move every acknowledged event into its model's store, then delete the journal rows moved. A model
        whose store refuses keeps its events (here and in the journal) for the next drain."""
        if not self._counts or self._closed:
            return
        with self._draining:
            with self._mutex:
                waiting, self._waiting, self._counts = self._waiting, {}, {}
                upto = self._upto
            moved, kept = [], {}
            for model, groups in waiting.items():
                committer = self.committers[model]
                try:
                    results = committer.store.append_groups(groups)
                except Exception as exc:  # noqa: BLE001 - one model's store never stops the others' events
                    kept[model] = groups
                    if self._failing.get(model) != str(exc):
                        log.error("model %s: %d events wait in the intake journal: its store refuses them: %s",
                                  model, sum(len(g) for g in groups), exc)
                    self._failing[model] = str(exc)
                    continue
                if self._failing.pop(model, None) is not None:
                    log.info("model %s: its store takes events again", model)
                committer.account(results)
                for events, result in zip(groups, results):
                    if isinstance(result, EventError):
                        committer.metrics.events_rejected.labels(reason=result.reason).inc()
                        log.error("model %s: %d acknowledged events refused by its store: %s", model, len(events),
                                  result.message)
                moved.append(model)
            if kept:
                with self._mutex:
                    for model, groups in kept.items():
                        self._waiting[model] = groups + self._waiting.get(model, [])
                        self._counts[model] = self._counts.get(model, 0) + sum(len(g) for g in groups)
            if moved:
                self._forget(upto, moved)

    def _forget(self, upto: int, models: Sequence[str]) -> None:
        marks = ",".join("?" * len(models))
        try:
            with self._lock:
                self._write(lambda db: db.execute(f"DELETE FROM intake WHERE seq <= ? AND model IN ({marks})",
                                                  (upto, *models)))
        except StoreUnavailable as exc:  # moved but kept: the next start moves them again (duplicates there)
            log.warning("intake journal: moved events not deleted: %s", exc.message)

    def recover(self) -> int:
        """Move the events a previous process acknowledged and did not move (of this journal's models) into
        their stores; returns how many. Events of models this monitor does not host stay for theirs."""
        with self._lock:
            rows = self._db.execute("SELECT seq, model, first, event, body, received_at FROM intake ORDER BY seq"
                                    ).fetchall()
        if not rows:
            return 0
        groups: dict[str, list[list[ParsedEvent]]] = {}
        others: set[str] = set()
        upto = rows[-1][0]
        for _, model, first, event, body, received_at in rows:
            if model not in self.committers:
                others.add(model)
                continue
            model_groups = groups.setdefault(model, [])
            if first or not model_groups:
                model_groups.append([])
            model_groups[-1].append(_decode(event, body, received_at))
        moved = []
        total = 0
        for model, model_groups in groups.items():
            store = self.committers[model].store
            try:
                results = store.append_groups(model_groups)
            except Exception as exc:  # noqa: BLE001 - left in the journal for the next start
                log.error("model %s: %d events of the intake journal not recovered: %s", model,
                          sum(len(g) for g in model_groups), exc)
                continue
            self.committers[model].account(results)
            total += sum(r.stored for r in results if isinstance(r, GroupResult))
            moved.append(model)
        if moved:
            self._forget(upto, moved)
        log.info("intake journal %s: %d events recovered into %d models' stores%s", self.path, total, len(moved),
                 f"; the events of {sorted(others)} stay for their monitor" if others else "")
        return total

    def close(self) -> None:
        """Move what waits into the stores, stop the drain thread, close the journal (the stores stay open)."""
        if self._closed:
            return
        self._stop.set()
        self._wake.set()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=30)
        self.drain()
        for committer in self.committers.values():
            if committer.journal is self:
                committer.journal = None
                committer.store._before_read = None
        super().close()

    async def aclose(self) -> None:
        await GroupLoop.aclose(self)

