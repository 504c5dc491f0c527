"""The fleet's ledger of retraining runs: the limits every model's trigger shares (docs/fleet.md).

Each model of a fleet has its own trigger and alert store; the fleet's limits (``fleet:`` of the
fleet file) hold across all of them, whether they run in one monitor process or in several. So
their shared state is one SQLite file (WAL) in the fleet's root, ``<root>/fleet/runs.db``, and
every check-and-take is one ``BEGIN IMMEDIATE`` transaction: two triggers racing for the last
slot are served one after the other, and exactly one gets it.

* ``slots``: the retraining runs in flight, one row each (model, alert, the train step's GPUs, the
  pid of the process that holds it: the worker, or the monitor for a run in its thread or on
  Kubeflow). A run's slot is freed when its run ends; a slot whose process is gone (pid dead, or
  reused by another process) is freed by whichever trigger looks next.
* ``starts``: every run started, for the daily pool (runs started in the last 24 hours).
* ``queue``: alerts that passed their model's guardrails while the fleet was full, oldest first
  across the fleet. A free slot goes to the oldest queued alert that fits it (its GPUs), so a
  newer alert of another model waits behind it; an entry whose process is gone holds nobody back.

Limits, in the order they are checked: ``fleet.daily_runs`` (the pool is spent: the alert is held
like by its own ``trigger.daily_budget``), then ``fleet.max_concurrent_runs`` (runs in flight)
and ``fleet.gpus`` (the train steps' GPUs in flight, out of the budget less what the models'
serving may hold at ``serving.max_replicas``): the alert is queued. Liveness is read from
``/proc``, so the triggers sharing a ledger run on one machine (one monitor pod on a cluster).
"""

from __future__ import annotations

import logging
import os
import sqlite3
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

from driftloop.core.errors import MonitorError
from driftloop.core.files import private_dir
from driftloop.core.fleet import train_gpus
from driftloop.core.processes import process_alive

if TYPE_CHECKING:
    from pathlib import Path

    from driftloop.core.config import FleetMembership, Settings

__all__ = ["Admission", "FleetRuns", "fleet_runs_path"]

log = logging.getLogger(__name__)

_DAY = 86400.0

_SCHEMA = """
CREATE TABLE IF NOT EXISTS slots (
    model TEXT NOT NULL,
    alert_id TEXT NOT NULL,
    gpus INTEGER NOT NULL,
    pid INTEGER,
    pid_start INTEGER,
    started REAL NOT NULL,
    PRIMARY KEY (model, alert_id)
);
CREATE TABLE IF NOT EXISTS starts (
    model TEXT NOT NULL,
    alert_id TEXT NOT NULL,
    started REAL NOT NULL,
    PRIMARY KEY (model, alert_id)
);
CREATE INDEX IF NOT EXISTS starts_started ON starts (started);
CREATE TABLE IF NOT EXISTS queue (
    seq INTEGER PRIMARY KEY,
    model TEXT NOT NULL,
    alert_id TEXT NOT NULL,
    gpus INTEGER NOT NULL,
    queued REAL NOT NULL,
    pid INTEGER,
    pid_start INTEGER,
    UNIQUE (model, alert_id)
);
"""


@dataclass(frozen=True)
class Admission:
    """What the fleet says to a run its model's guardrails passed: ``started`` (a slot is held for it),
    else ``spent`` (the daily pool; held) or queued; ``reason`` names the limit."""

    started: bool
    reason: str
    spent: bool = False


def fleet_runs_path(root: Path) -> Path:
    return root / "fleet" / "runs.db"


def _pid_start(pid: int) -> int | None:
    """When ``pid`` started (clock ticks since boot, ``/proc/<pid>/stat``), so a reused pid is told apart."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return int(fh.read().rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def _alive(pid: int | None, started: int | None) -> bool:
    if not process_alive(pid):
        return False
    now = _pid_start(int(pid or 0))
    return started is None or now is None or now == started


def _names(models: list[str]) -> str:
    return ", ".join(m if n == 1 else f"{m} ×{n}" for m, n in Counter(models).items())


class FleetRuns:
    """One model's view of its fleet's ledger (module doc); every method is one short transaction."""

    def __init__(self, membership: FleetMembership, *, gpus: int = 0) -> None:
        """``gpus``: what this model's train step holds while it runs."""
        self.path = fleet_runs_path(membership.root)
        self.model = membership.name
        self.limits = membership.limits
        self.gpus = gpus
        self.serving_gpus = membership.serving_gpus
        private_dir(self.path.parent)
        with self._tx(begin=None) as db:
            db.execute("PRAGMA journal_mode=WAL")
            db.executescript(_SCHEMA)

    @classmethod
    def of(cls, settings: Settings) -> FleetRuns | None:
        """The ledger of the fleet ``settings`` belong to; None for a one-model configuration."""
        return None if settings.fleet is None else cls(settings.fleet, gpus=train_gpus(settings))

    @contextmanager
    def _tx(self, begin: str | None = "BEGIN IMMEDIATE") -> Iterator[sqlite3.Connection]:
        """A connection in one transaction (``begin``: None for none) that other processes wait for."""
        try:
            db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
            try:
                if begin:
                    db.execute(begin)
                yield db
                if db.in_transaction:
                    db.execute("COMMIT")
            finally:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                db.close()
        except sqlite3.Error as exc:
            raise MonitorError(f"the fleet's run ledger {self.path} is not usable: {exc}") from exc

    # -- taking and freeing slots ------------------------------------------------------------
    def admit(self, alert_id: str, now: float, *, pid: int | None = None) -> Admission:
        """Take a slot for ``alert_id``'s run if the fleet's limits allow it now; else queue it (or leave
        it held when the daily pool is spent). ``pid``: the process that holds the slot (default: this one)."""
        pid = pid or os.getpid()
        with self._tx() as db:
            self._free_dead(db)
            spent = self._spent(db, now)
            if spent:
                db.execute("DELETE FROM queue WHERE model = ? AND alert_id = ?", (self.model, alert_id))
                return Admission(False, spent, spent=True)
            slots = db.execute("SELECT model, gpus FROM slots ORDER BY started").fetchall()
            full = self._full(slots, self.gpus) or self._ahead(db, alert_id, slots)
            if full:
                db.execute("INSERT OR IGNORE INTO queue (model, alert_id, gpus, queued) VALUES (?, ?, ?, ?)",
                           (self.model, alert_id, self.gpus, now))
                db.execute("UPDATE queue SET pid = ?, pid_start = ? WHERE model = ? AND alert_id = ?",
                           (pid, _pid_start(pid), self.model, alert_id))
                return Admission(False, full)
            db.execute("DELETE FROM queue WHERE model = ? AND alert_id = ?", (self.model, alert_id))
            db.execute("INSERT OR REPLACE INTO slots (model, alert_id, gpus, pid, pid_start, started) "
                       "VALUES (?, ?, ?, ?, ?, ?)", (self.model, alert_id, self.gpus, pid, _pid_start(pid), now))
            db.execute("INSERT OR REPLACE INTO starts (model, alert_id, started) VALUES (?, ?, ?)",
                       (self.model, alert_id, now))
            db.execute("DELETE FROM starts WHERE started < ?", (now - 2 * _DAY,))
            return Admission(True, f"the fleet's run {len(slots) + 1} of fleet.max_concurrent_runs="
                                   f"{self.limits.max_concurrent_runs}")

    # hold, release and dequeue never raise: one that fails is logged, and the trigger's next follow()
    # (slots of runs that ended) or judgement (the queue) puts it right
    def hold(self, alert_id: str, pid: int) -> None:
        """The process that holds ``alert_id``'s slot from now on (the worker that runs it)."""
        self._quietly("UPDATE slots SET pid = ?, pid_start = ? WHERE model = ? AND alert_id = ?",
                      (pid, _pid_start(pid), self.model, alert_id))

    def release(self, alert_id: str) -> None:
        """``alert_id``'s run ended (or never started): its slot is free."""
        self._quietly("DELETE FROM slots WHERE model = ? AND alert_id = ?", (self.model, alert_id))

    def release_ended(self, running: set[str]) -> None:
        """Free the slots of this model's runs other than ``running`` (alert ids whose runs have not ended)."""
        for alert_id in set(self.held()) - running:
            self.release(alert_id)

    def dequeue(self, alert_id: str) -> None:
        """``alert_id`` leaves the queue (judged otherwise, resolved, superseded)."""
        self._quietly("DELETE FROM queue WHERE model = ? AND alert_id = ?", (self.model, alert_id))

    def _quietly(self, sql: str, params: tuple) -> None:
        try:
            with self._tx() as db:
                db.execute(sql, params)
        except MonitorError as exc:
            log.warning("%s (%s)", exc, sql.split(" WHERE")[0])

    # -- reading -----------------------------------------------------------------------------
    def held(self) -> list[str]:
        """This model's alerts whose runs hold a slot."""
        with self._tx() as db:
            return [r[0] for r in db.execute("SELECT alert_id FROM slots WHERE model = ? ORDER BY started",
                                             (self.model,))]

    def queued(self) -> list[str]:
        """This model's queued alerts, oldest first."""
        with self._tx() as db:
            return [r[0] for r in db.execute("SELECT alert_id FROM queue WHERE model = ? ORDER BY seq",
                                             (self.model,))]

    def in_flight(self) -> list[tuple[str, str]]:
        """(model, alert) of every run holding a slot across the fleet, oldest first (dead holders freed)."""
        with self._tx() as db:
            self._free_dead(db)
            return [(r[0], r[1]) for r in db.execute("SELECT model, alert_id FROM slots ORDER BY started")]

    def ready(self, alert_id: str) -> bool:
        """Whether a slot is free for ``alert_id`` now (a queued alert is judged again only then; a spent
        daily pool then holds it, as :meth:`admit` says)."""
        with self._tx() as db:
            self._free_dead(db)
            slots = db.execute("SELECT model, gpus FROM slots").fetchall()
            return not (self._full(slots, self.gpus) or self._ahead(db, alert_id, slots))

    # -- the limits --------------------------------------------------------------------------
    def _free_dead(self, db: sqlite3.Connection) -> None:
        for model, alert_id, pid, started in db.execute("SELECT model, alert_id, pid, pid_start FROM slots").fetchall():
            if not _alive(pid, started):
                db.execute("DELETE FROM slots WHERE model = ? AND alert_id = ?", (model, alert_id))
                log.warning("fleet slot of %s's run for alert %s freed: its process %s is gone", model, alert_id, pid)

    def _spent(self, db: sqlite3.Connection, now: float) -> str | None:
        pool = self.limits.daily_runs
        if pool is None:
            return None
        models = [r[0] for r in db.execute("SELECT model FROM starts WHERE started > ? ORDER BY started",
                                           (now - _DAY,))]
        if len(models) < pool:
            return None
        return (f"fleet.daily_runs: {len(models)} runs started across the fleet in the last 24h "
                f"({_names(models) or 'none'}); the fleet's pool is {pool}")

    def _full(self, slots: list[tuple[str, int]], gpus: int) -> str | None:
        cap = self.limits.max_concurrent_runs
        if len(slots) >= cap:
            return f"fleet.max_concurrent_runs: {len(slots)} runs in flight ({_names([m for m, _ in slots])})"
        if self.limits.gpus is None or not gpus:
            return None
        budget = max(0, self.limits.gpus - self.serving_gpus)
        held = sum(g for _, g in slots)
        if held + gpus <= budget:
            return None
        serving = f" (fleet.gpus={self.limits.gpus} less {self.serving_gpus} for serving)" if self.serving_gpus else ""
        users = ", ".join(f"{m} {g}" for m, g in slots if g) or "none"
        return (f"fleet.gpus: {held} of {budget} GPUs{serving} held by runs in flight ({users}); this run's "
                f"train step needs {gpus}")

    def _ahead(self, db: sqlite3.Connection, alert_id: str, slots: list[tuple[str, int]]) -> str | None:
        """An alert queued before ``alert_id`` (any model) whose process is alive and that the free slot fits."""
        mine = db.execute("SELECT seq FROM queue WHERE model = ? AND alert_id = ?", (self.model, alert_id)).fetchone()
        rows = db.execute("SELECT model, alert_id, gpus, pid, pid_start FROM queue WHERE seq < ? ORDER BY seq",
                          (mine[0] if mine else 2**62,)).fetchall()
        for model, other, gpus, pid, started in rows:
            if _alive(pid, started) and self._full(slots, gpus) is None:
                return (f"fleet.max_concurrent_runs: the free slot goes first to alert {other} of {model}, queued "
                        "earlier")
        return None
