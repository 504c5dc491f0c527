"""A fleet monitor's intake journal: every model's acknowledged events in one SQLite file, moved into each
model's own store in batches.

Why: each model keeps its own inference store (:class:`monitoring.store.InferenceStore`: its windows, pairs,
labels, and a corrupt or full store stops that model alone). KServe's logger posts one event per request
and InferenceService, so a fleet monitor's round of concurrent requests is spread over many models: with
the events committed straight into the stores, each store commits about one pair a round, and a commit
costs its WAL frames however few events it holds -- single-event ingest over 50 models ran at 0.5x one
model's (docs/fleet.md). Here the events of a round, whatever their model, are committed in ONE
transaction of the journal (one ``intake`` row a commit: an append), and the request is acknowledged once
that commit is durable. A request of ``direct_events`` events or more (a batch) is a commit worth its own:
it goes straight into its model's store, as without the journal. The journal keeps the parsed events of every model in memory
and moves them into the models' stores every ``drain_seconds`` -- the writer itself, between two commits (a
thread would fight the event loop for the GIL); a thread only when ingest is idle -- and whenever one of the
stores is read (:attr:`InferenceStore._before_read`): one ``append_groups`` a model, the batched path where
one commit holds hundreds of events, then it deletes the journal rows it moved.

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
import base64
import fcntl
import logging
import os
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson

from driftloop.core.files import PRIVATE_FILE_MODE, private_dir
from monitoring.events import EventError, ParsedEvent
from monitoring.group_commit import GroupLoop
from monitoring.store_durable import DurableSQLite, StoreUnavailable, Synchronous
from monitoring.store_write import GroupResult, Prepared, event_tuple

if TYPE_CHECKING:
    from monitoring.sink import GroupCommitter
    from monitoring.store import InferenceStore

__all__ = ["IntakeJournal", "journal_path"]

log = logging.getLogger(__name__)

# intake: a row a commit of the sink (and the groups a drain could not move, written back); intake_kept: the
# events of models the monitor that recovered them does not host, for the monitor that does
SCHEMA = """
CREATE TABLE IF NOT EXISTS intake (seq INTEGER PRIMARY KEY, events BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS intake_kept (seq INTEGER PRIMARY KEY, events BLOB NOT NULL);
"""
_dumps = orjson.dumps
_Fragment = orjson.Fragment


def journal_path(fleet_workspace: Path) -> Path:
    """Where a fleet's journal lives: ``<fleet workspace>/monitor/intake.db``."""
    return fleet_workspace / "monitor" / "intake.db"


def _blob(groups: Iterable[tuple[str, Sequence[tuple]]]) -> bytes:
    """One journal row: every event of ``groups`` (model, its events), a JSON list (the attributes and the
    instances are JSON already: embedded as they are; a body is JSON text, so UTF-8, kept as a string)."""
    return _dumps([(model, i == 0, ce_id, kind, event_model, version, role, key, _Fragment(attributes), _text(body),
                    _Fragment(b"[" + b",".join(items) + b"]"), received_at)
                   for model, group in groups
                   for i, (ce_id, kind, event_model, version, role, key, attributes, body, items, received_at)
                   in enumerate(group)])


def _text(body: bytes) -> str | dict[str, str]:
    try:
        return body.decode()
    except UnicodeDecodeError:  # never a body the sink parsed as JSON; kept exactly all the same
        return {"base64": base64.b64encode(body).decode()}


def _from_entry(entry: Sequence[Any]) -> tuple:
    """The event of one journal entry, as :func:`monitoring.store_write.event_tuple` made it."""
    _, _, ce_id, kind, model, version, role, key, attributes, body, items, received_at = entry
    return (ce_id, kind, model, version, role, key, _dumps(attributes),
            base64.b64decode(body["base64"]) if isinstance(body, dict) else body.encode(),
            tuple(_dumps(x) for x in items), received_at)


def _prepared(groups: Iterable[Sequence[tuple]]) -> list[list[Prepared]]:
    """Groups of event tuples as the store takes them."""
    make = Prepared._make
    return [[make(ev) for ev in group] for group in groups]


def _entries(blobs: Iterable[bytes]) -> tuple[dict[str, list[tuple[tuple, ...]]], list[bytes]]:
    """Each model's groups (one a request, each all or nothing in the store) in journal rows, in order; and
    the rows that cannot be read (a damaged file), which nothing is taken from."""
    groups: dict[str, list[list[tuple]]] = {}
    bad: list[bytes] = []
    for blob in blobs:
        try:
            events = [(entry[0], bool(entry[1]), _from_entry(entry)) for entry in orjson.loads(blob)]
        except (orjson.JSONDecodeError, TypeError, ValueError, KeyError, IndexError, AttributeError) as exc:
            log.error("intake journal: a row of %d bytes cannot be read (%s: %s); it is kept, nothing moved from it",
                      len(blob), type(exc).__name__, exc)
            bad.append(bytes(blob))
            continue
        for model, first, event in events:
            model_groups = groups.setdefault(model, [])
            if first or not model_groups:
                model_groups.append([])
            model_groups[-1].append(event)
    return {model: [tuple(g) for g in model_groups] for model, model_groups in groups.items()}, bad


class IntakeJournal(DurableSQLite, GroupLoop[tuple["GroupCommitter", Sequence[ParsedEvent]]]):
    """The journal of one fleet monitor's models (``committers``: each model's sink committer, by model name).

    ``submit`` (on the event loop) acknowledges once the events are in the journal; :meth:`drain` (the writer
    between two commits, the idle thread, any reader of a model's store, :meth:`close`) moves them into the
    stores.
    """

    what = "intake journal"
    # a row is a commit's events (~35 kB at 64 events): in 16 kB pages it is written, copied at the checkpoint
    # and freed at the drain for ~1.9 µs an event, in SQLite's 4 kB pages for ~2.9 (measured alone)
    page_size = 16384
    name = "intake-group-commit"

    def __init__(self, path: str | Path, committers: Mapping[str, GroupCommitter], *,
                 synchronous: Synchronous = "NORMAL", drain_seconds: float = 0.5,
                 max_waiting_events: int = 200_000, checkpoint_seconds: float = 1.0,
                 direct_events: int = 32, store_checkpoint_seconds: float = 5.0) -> None:
        GroupLoop.__init__(self)
        # one monitor a journal: another one's drain would delete rows this one has not moved yet
        private_dir(Path(path).parent)
        self._lockfile = os.open(f"{path}.lock", os.O_RDWR | os.O_CREAT, PRIVATE_FILE_MODE)
        try:
            fcntl.flock(self._lockfile, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lockfile)
            raise StoreUnavailable(f"the intake journal {path} is in use by another monitor of this fleet") from None
        try:
            self._open(path, synchronous)
            self._db.executescript(SCHEMA)
        except Exception:
            os.close(self._lockfile)
            raise
        self.committers = dict(committers)
        self._names = {committer: name for name, committer in self.committers.items()}
        self.drain_seconds = drain_seconds
        self.max_waiting_events = max_waiting_events
        # a request of this many events or more goes straight into its store: a commit of 32 events costs about
        # what the journal costs them (the journal's row, then the drain's share), and a batch needs no company
        self.direct_events = direct_events
        # model -> its groups journaled, not yet in its store: tuples of str, bytes and floats, which the garbage
        # collector stops tracking (thousands of parsed events alive between two drains, dicts and lists, were
        # walked by each of its collections: with a 2 s drain the benchmark ran at 0.58x one model's ingest)
        self._waiting: dict[str, list[tuple[tuple, ...]]] = {}  # of monitoring.store_write.event_tuple
        self._counts: dict[str, int] = {}  # model -> events waiting
        self._upto = 0  # the newest journal row whose group waits in _waiting (or was moved)
        self._mutex = threading.Lock()  # _waiting, _counts, _upto
        self._draining = threading.RLock()
        self._failing: dict[str, str] = {}  # model -> why its store did not take its events at the last drain
        self._next_drain = time.monotonic() + drain_seconds
        self._opened(checkpoint_seconds)
        self.recovered = self.recover()
        # A store the journal feeds commits only at drains, a few large commits a second. Checkpointed every second
        # as a one-model store is, a fleet's 50 stores took 2 fsyncs each a second (1000 a second at 500 models)
        # and ~3 us of CPU an event; every store_checkpoint_seconds (5 s) 0.5-1.6 us in runs of ~6 s (measured in
        # one process). Each store's WAL then holds up to that long of its model's events before they are copied
        # into its file: against a process kill durability is the same; with synchronous=NORMAL a power loss may
        # drop what the store committed in that time, with FULL nothing. The journal's own checkpoints, every
        # checkpoint_seconds, cost ~0.3 us an event (measured alone): its rows live one drain.
        self._store_checkpoints = {name: c.store.checkpoint_seconds for name, c in self.committers.items()}
        for committer in self.committers.values():
            committer.store._before_read = self.drain
            committer.journal = self
            committer.store.checkpoint_seconds = max(committer.store.checkpoint_seconds, store_checkpoint_seconds)
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
        groups = [(self._names[committer], tuple(map(event_tuple, events))) for (committer, events), _ in batch]
        blob = _blob(groups)  # one row a commit: a row per event cost twice what the store's own commit does

        def work(db: Any) -> int:
            return db.execute("INSERT INTO intake (events) VALUES (?)", (blob,)).lastrowid

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
            for model, group in groups:
                self._waiting.setdefault(model, []).append(group)
                self._counts[model] = self._counts.get(model, 0) + len(group)
            self._upto = last
        for (_, events), future in batch:
            if not future.done():  # the waiting request may have been cancelled (client gone)
                requests = sum(1 for ev in events if ev.kind == "request")
                future.set_result(GroupResult(requests=requests, responses=len(events) - requests))
        if time.monotonic() >= self._next_drain or self.waiting >= self.max_group_events:
            try:
                self.drain()  # here, between two commits: a drain thread would fight the event loop for the GIL
            except Exception:  # noqa: BLE001 - the writer keeps committing; what waits is moved at the next drain
                log.exception("intake journal: drain failed")

    # -- the drain: into each model's store ---------------------------------------------------------------
    def _drain_loop(self) -> None:
        """Drains when no commit did for a while (ingest idle): under load, the writer drains between commits."""
        while not self._stop.is_set():
            self._wake.wait(self.drain_seconds)
            self._wake.clear()
            if time.monotonic() < self._next_drain + self.drain_seconds:
                continue
            try:
                self.drain()
            except Exception:  # noqa: BLE001 - the next round tries again; each model's failure is logged in drain
                log.exception("intake journal: drain failed")

    def drain(self) -> None:
        """Move every acknowledged event into its model's store, then delete the journal rows moved. A model
        whose store refuses keeps its events (here and in the journal) for the next drain."""
        self._next_drain = time.monotonic() + self.drain_seconds
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
                    results = committer.store.append_groups(_prepared(groups))
                except Exception as exc:  # noqa: BLE001 - one model's store never stops the others' events
                    kept[model] = groups
                    if self._failing.get(model) != str(exc):
                        log.error("model %s: %d events wait in the intake journal: its store refuses them: %s",
                                  model, sum(map(len, groups)), exc)
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
                        self._counts[model] = self._counts.get(model, 0) + sum(map(len, groups))
            if moved:
                self._forget(upto, kept)

    def _forget(self, upto: int, keep: Mapping[str, Sequence[Sequence[tuple]]]) -> None:
        """Delete the journal's rows up to ``upto``, writing the groups of ``keep`` (not moved) back in the same
        transaction: they stay durable until their store takes them."""
        blob = _blob((model, group) for model, groups in keep.items() for group in groups) if keep else None

        def work(db: Any) -> int | None:
            db.execute("DELETE FROM intake WHERE seq <= ?", (upto,))
            return db.execute("INSERT INTO intake (events) VALUES (?)", (blob,)).lastrowid if blob else None

        try:
            with self._lock:
                seq = self._write(work)
        except StoreUnavailable as exc:  # moved but kept: the next start moves them again (duplicates there)
            log.warning("intake journal: moved events not deleted: %s", exc.message)
            return
        if seq is not None:
            with self._mutex:
                self._upto = max(self._upto, seq)

    def recover(self) -> int:
        """Move the events a previous process acknowledged and did not move (of this journal's models) into
        their stores; returns how many. A hosted model whose store refuses them keeps them waiting (the drain
        tries again); the events of models this monitor does not host stay in the journal for theirs."""
        with self._lock:
            kept = self._db.execute("SELECT events FROM intake_kept ORDER BY seq").fetchall()
            rows = self._db.execute("SELECT seq, events FROM intake ORDER BY seq").fetchall()
        if not rows and not kept:
            return 0
        groups, bad = _entries([blob for (blob,) in kept] + [blob for _, blob in rows])
        foreign = {model: g for model, g in groups.items() if model not in self.committers}
        total = 0
        for model, model_groups in groups.items():
            if model in foreign:
                continue
            try:
                results = self.committers[model].store.append_groups(_prepared(model_groups))
            except Exception as exc:  # noqa: BLE001 - waits for the drain, as events of a failing store do
                log.error("model %s: %d events of the intake journal wait: its store refuses them: %s", model,
                          sum(map(len, model_groups)), exc)
                self._waiting[model] = list(model_groups)
                self._counts[model] = sum(map(len, model_groups))
                continue
            self.committers[model].account(results)
            total += sum(r.stored for r in results if isinstance(r, GroupResult))
        waiting = _blob((model, g) for model, groups_ in self._waiting.items() for g in groups_) if self._waiting \
            else None
        others = _blob((model, g) for model, groups_ in foreign.items() for g in groups_) if foreign else None
        upto = rows[-1][0] if rows else 0

        def work(db: Any) -> int | None:
            db.execute("DELETE FROM intake WHERE seq <= ?", (upto,))
            db.execute("DELETE FROM intake_kept")
            db.executemany("INSERT INTO intake_kept (events) VALUES (?)", [(blob,) for blob in [*bad, others] if blob])
            return db.execute("INSERT INTO intake (events) VALUES (?)", (waiting,)).lastrowid if waiting else None

        with self._lock:
            self._upto = self._write(work) or 0
        log.info("intake journal %s: %d events recovered into their models' stores%s", self.path, total,
                 f"; the events of {sorted(foreign)} stay in it for their monitor" if foreign else "")
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
        for name, committer in self.committers.items():
            if committer.journal is self:  # straight into its store again: checkpointed as one model's
                committer.journal = None
                committer.store._before_read = None
                committer.store.checkpoint_seconds = self._store_checkpoints[name]
        super().close()
        os.close(self._lockfile)  # the lock goes with it

