"""One checkpoint thread for every inference store of the process.

A store's commits append to its ``-wal`` file (``PRAGMA wal_autocheckpoint=0``: never inside a commit
of the sink); a checkpoint copies the committed frames into the database file, so the WAL starts
from its beginning again and stays small. A one-model monitor has one store; a fleet monitor has
one a model (:mod:`monitoring.fleet_service`): 50 threads each waking every second (together 15 % of its
CPU at 50 models under load, most of it the checkpoints themselves, which every busy store still needs;
docs/fleet.md). So one thread (:data:`CHECKPOINTS`) visits every
open store at its own interval and checkpoints only a store that committed since its last complete
checkpoint; the checkpoint itself (``PRAGMA wal_checkpoint(PASSIVE)``: never blocks the writer,
on a connection of the store's own) and the check of its files before it are the store's
(:meth:`monitoring.store.InferenceStore.checkpoint`).
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from typing import Protocol

__all__ = ["Checkpointed", "Checkpoints", "CHECKPOINTS"]

log = logging.getLogger(__name__)


class Checkpointed(Protocol):
    checkpoint_seconds: float

    def checkpoint(self) -> None: ...


class Checkpoints:
    """The stores to checkpoint, each at its own interval, by one daemon thread (started with the first
    store, ended with the last)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._due: list[tuple[float, int, Checkpointed]] = []  # (next time, tie-break, store)
        self._members: set[int] = set()
        self._order = itertools.count()
        self._thread: threading.Thread | None = None
        self._busy: Checkpointed | None = None  # the store being checkpointed now

    def add(self, store: Checkpointed) -> None:
        with self._lock:
            self._members.add(id(store))
            heapq.heappush(self._due, (time.monotonic() + store.checkpoint_seconds, next(self._order), store))
            if self._thread is None or not self._thread.is_alive():  # first store (or after a fork)
                self._thread = threading.Thread(target=self._run, name="store-checkpoints", daemon=True)
                self._thread.start()
            self._wake.notify()

    def remove(self, store: Checkpointed) -> None:
        """No more checkpoints of ``store``; returns once one in progress has ended."""
        with self._lock:
            self._members.discard(id(store))
            self._due = [entry for entry in self._due if entry[2] is not store]
            heapq.heapify(self._due)
            while self._busy is store:
                self._wake.wait()
            self._wake.notify_all()

    def _run(self) -> None:
        with self._lock:
            while self._due:
                when, _, store = self._due[0]
                wait = when - time.monotonic()
                if wait > 0:
                    self._wake.wait(wait)
                    continue
                heapq.heappop(self._due)
                self._busy = store
                self._lock.release()
                try:
                    store.checkpoint()
                except Exception:  # noqa: BLE001 - one store's failure never stops the others' checkpoints
                    log.exception("checkpoint of %s failed", store)
                finally:
                    self._lock.acquire()
                    self._busy = None
                    self._wake.notify_all()
                if id(store) in self._members:
                    heapq.heappush(self._due, (time.monotonic() + store.checkpoint_seconds, next(self._order), store))
            self._thread = None


#: The process's checkpointer.
CHECKPOINTS = Checkpoints()
