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

Where each part lives (one job per module; :class:`InferenceStore` composes them as mixins):

* :mod:`monitoring.store_durable` — the connection, the lock, the file checks, the write transaction, the
  checkpoints and ``health`` (shared with a fleet's intake journal, :mod:`monitoring.intake`);
* :mod:`monitoring.store_schema` — the tables and the migrations of stores made by older versions;
* :mod:`monitoring.store_write` — storing request/response events and pairing them into rows;
* :mod:`monitoring.store_labels` — storing ground-truth labels (feedback);
* :mod:`monitoring.store_query` — reading rows, counts, labelled rows, shadow pairs, predictions;
* :mod:`monitoring.store_window` — the monitoring windows the drift check judges.
"""

from __future__ import annotations

import logging
import sqlite3
from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from monitoring.store_durable import DurableSQLite, StoreUnavailable, Synchronous
from monitoring.store_labels import LabelResult, LabelWriter
from monitoring.store_query import ROW_COLUMNS, StoreQueries
from monitoring.store_schema import create_schema
from monitoring.store_window import Window, WindowQueries
from monitoring.store_write import EventWriter, GroupResult, Pending

if TYPE_CHECKING:
    from driftloop.core.config import Settings

__all__ = ["InferenceStore", "StoreUnavailable", "Window", "GroupResult", "LabelResult", "ROW_COLUMNS", "store_path"]

log = logging.getLogger(__name__)


class InferenceStore(DurableSQLite, EventWriter, LabelWriter, WindowQueries, StoreQueries):
    """Durable store of inference events, paired rows and labels (one SQLite file).

    One process writes (the sink); the writer methods are serialised by a lock, so the store may
    be shared by threads. Readers open their own connection per call and never block the writer.

    The durability (the writer connection, ``_write``, the file checks, the checkpoints, ``health``) and the
    lifecycle come from :class:`~monitoring.store_durable.DurableSQLite`; the writes and reads from its mixins:
    :class:`~monitoring.store_write.EventWriter` (``append_events``, ``append_groups``),
    :class:`~monitoring.store_labels.LabelWriter` (``add_labels``),
    :class:`~monitoring.store_window.WindowQueries` (``window``) and
    :class:`~monitoring.store_query.StoreQueries` (``rows``, ``count``, ``labelled``, ...).
    """

    what = "inference store"

    def __init__(self, path: str | Path, *, synchronous: Synchronous = "NORMAL", max_pending: int = 200_000,
                 pair_lookback: int = 1_000_000, checkpoint_seconds: float = 1.0):
        self._open(path, synchronous)
        create_schema(self._db)
        self._max_pending = max_pending
        self._pending: OrderedDict[str, Pending] = OrderedDict()
        self._pending_complete = True  # False: some unpaired events live only in the database
        self._load_pending(pair_lookback)
        self._opened(checkpoint_seconds)

    #: Called before every read and label write (a fleet's :class:`monitoring.intake.IntakeJournal` moves the
    #: events it acknowledged for this store in first, so a read sees every acknowledged event).
    _before_read: Callable[[], None] | None = None

    def _reader(self) -> sqlite3.Connection:
        if self._before_read is not None:
            self._before_read()
        return super()._reader()

    def add_labels(self, labels: Sequence[dict[str, Any]]) -> LabelResult:
        if self._before_read is not None:  # the labels' requests may still be in the journal
            self._before_read()
        return super().add_labels(labels)

    def refusal(self) -> StoreUnavailable | None:
        """Why this store refuses events now, from what it knows without touching its files: it is closed, or
        its last commit failed (until one succeeds again); None otherwise."""
        if self._closed:
            return StoreUnavailable(f"the {self.what} is closed")
        if self._failure is not None:
            return StoreUnavailable(f"the {self.what} cannot commit ({self.path}): {self._failure}")
        return None

    @classmethod
    def from_settings(cls, settings: Settings) -> "InferenceStore":
        """The store named by ``settings.monitor`` (default ``<workspace>/monitor/inference.db``)."""
        return cls(store_path(settings), synchronous=settings.monitor.store_synchronous)


def store_path(settings: Settings) -> Path:
    """Where the inference log lives: ``monitor.store``, relative paths inside the workspace."""
    configured = settings.monitor.store
    if configured is None:
        return settings.workspace_dir / "monitor" / "inference.db"
    path = Path(configured).expanduser()
    return path if path.is_absolute() else settings.workspace_dir / path
