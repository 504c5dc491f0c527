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

Where each part lives (one job per module; :class:`InferenceStore` composes them as mixins and
owns the connection, the lock, the file checks and the write transaction, all here):

* :mod:`monitoring.store_schema` — the tables and the migrations of stores made by older versions;
* :mod:`monitoring.store_write` — storing request/response events and pairing them into rows;
* :mod:`monitoring.store_labels` — storing ground-truth labels (feedback);
* :mod:`monitoring.store_query` — reading rows, counts, labelled rows, shadow pairs, predictions;
* :mod:`monitoring.store_window` — the monitoring windows the drift check judges.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import stat
import threading
import time
from collections import OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from driftloop.core.files import PRIVATE_FILE_MODE, private_dir
from monitoring.events import EventError
from monitoring.store_checkpoint import CHECKPOINTS
from monitoring.store_labels import LabelResult, LabelWriter
from monitoring.store_query import ROW_COLUMNS, StoreQueries
from monitoring.store_schema import create_schema
from monitoring.store_window import Window, WindowQueries
from monitoring.store_write import EventWriter, GroupResult, Pending

if TYPE_CHECKING:
    from driftloop.core.config import Settings

__all__ = ["InferenceStore", "StoreUnavailable", "Window", "GroupResult", "LabelResult", "ROW_COLUMNS", "store_path"]

log = logging.getLogger(__name__)

_SUFFIXES = ("", "-wal", "-shm")


def _writable(st: os.stat_result) -> bool:
    """``os.access(path, W_OK)`` read from a stat result this store already has (a syscall less per file and
    check: a fleet's monitor commits often); a read-only file system still fails the commit itself."""
    uid = os.geteuid()
    if uid == 0:
        return True
    if st.st_uid == uid:
        return bool(st.st_mode & stat.S_IWUSR)
    if st.st_gid in (os.getegid(), *os.getgroups()):
        return bool(st.st_mode & stat.S_IWGRP)
    return bool(st.st_mode & stat.S_IWOTH)
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


class InferenceStore(EventWriter, LabelWriter, WindowQueries, StoreQueries):
    """Durable store of inference events, paired rows and labels (one SQLite file).

    One process writes (the sink); the writer methods are serialised by a lock, so the store may
    be shared by threads. Readers open their own connection per call and never block the writer.

    This class holds the durability (the writer connection, ``_write``, the file checks, the
    checkpoints, ``health``) and the lifecycle; the writes and reads come from its mixins:
    :class:`~monitoring.store_write.EventWriter` (``append_events``, ``append_groups``),
    :class:`~monitoring.store_labels.LabelWriter` (``add_labels``),
    :class:`~monitoring.store_window.WindowQueries` (``window``) and
    :class:`~monitoring.store_query.StoreQueries` (``rows``, ``count``, ``labelled``, ...).
    """

    def __init__(self, path: str | Path, *, synchronous: Synchronous = "NORMAL", max_pending: int = 200_000,
                 pair_lookback: int = 1_000_000, checkpoint_seconds: float = 1.0):
        self.path = Path(path)
        private_dir(self.path.parent)
        _private_files(self.path)
        self.synchronous = synchronous
        self._lock = threading.Lock()
        self._db = self._connect()
        create_schema(self._db)
        # checkpoints (which fsync) run in a background thread, not inside the commits of the sink
        self._db.execute("PRAGMA wal_autocheckpoint=0")
        self._failure: str | None = None  # why the last commit failed; None after a good one
        self._retry_at = 0.0  # while failing, the next time a write may touch the database again
        self._max_pending = max_pending
        self._pending: OrderedDict[str, Pending] = OrderedDict()
        self._pending_complete = True  # False: some unpaired events live only in the database
        self._load_pending(pair_lookback)
        self._closed = False
        self._files = self._file_state()  # the files this connection writes (see the module doc)
        # checkpoints: the process's one checkpoint thread calls checkpoint() every checkpoint_seconds
        self.checkpoint_seconds = checkpoint_seconds
        self._commits = 1  # commits so far (1: whatever the WAL holds from before is copied at the first visit)
        self._checkpointed = 0  # the commit count the last complete checkpoint covered
        self._checkpoint_db: sqlite3.Connection | None = None
        CHECKPOINTS.add(self)

    def checkpoint(self) -> None:
        """Copy the committed WAL frames into the database file, if any were committed since the last
        complete checkpoint (called by :data:`monitoring.store_checkpoint.CHECKPOINTS`).

        PASSIVE never blocks the writer; once a checkpoint has caught up, the writer's next
        transaction starts the WAL from its beginning again, so the ``-wal`` file stays small.
        """
        commits = self._commits
        if self._closed or commits == self._checkpointed:
            return
        if self._files_problem() is not None:  # never touch files that changed under the store
            return
        try:
            if self._checkpoint_db is None:
                self._checkpoint_db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False,
                                                      timeout=30.0)
            busy, frames, copied = self._checkpoint_db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        except sqlite3.Error as exc:  # a busy database is retried at the next visit
            log.debug("checkpoint skipped: %s", exc)
            return
        if not busy and copied >= frames:  # all of it: nothing to do until the next commit
            self._checkpointed = commits

    @classmethod
    def from_settings(cls, settings: Settings) -> "InferenceStore":
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

    def _files_problem(self, suffixes: tuple[str, ...] = _SUFFIXES) -> str | None:
        """Why the files on disk (of ``suffixes``) are not (any more) the ones this store writes, or None."""
        for suffix, (dev, ino, size) in self._files.items():
            if suffix not in suffixes:
                continue
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
            if not _writable(st):
                return f"{name} is not writable"
        return None

    def _unavailable(self, suffixes: tuple[str, ...] = _SUFFIXES) -> StoreUnavailable | None:
        problem = self._files_problem(suffixes)
        if problem is not None:
            return StoreUnavailable(f"the inference store cannot commit: {problem}; nothing more is accepted "
                                    "until the monitor is restarted")
        return None

    def _write(self, work: Any) -> Any:
        """Run ``work(db)`` in one write transaction; refuse (503) unless it is durable when this returns."""
        if self._closed:
            raise StoreUnavailable("the store is closed")
        # Before: the mapped -shm (SQLite touching a truncated one dies of SIGBUS); every file once a commit
        # failed. After the commit, every file (below): one deleted or replaced meanwhile is found there, and
        # nothing of the commit is acknowledged.
        refusal = self._unavailable(_SUFFIXES if self._failure is not None else ("-shm",))
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
        self._commits += 1
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

    def _reader(self) -> sqlite3.Connection:
        """A connection of its own for one read (the queries of the mixins); never creates a file."""
        problem = self._files_problem()
        if problem is not None:  # never create a deleted file again, never map a truncated -shm
            raise StoreUnavailable(f"the inference store cannot be read: {problem}")
        db = sqlite3.connect(self.path.resolve().as_uri() + "?mode=rw", uri=True, timeout=30.0)
        db.execute("PRAGMA busy_timeout=30000")
        return db

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
        CHECKPOINTS.remove(self)  # returns once a checkpoint of this store in progress has ended
        if self._checkpoint_db is not None:
            self._checkpoint_db.close()
            self._checkpoint_db = None
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


def store_path(settings: Settings) -> Path:
    """Where the inference log lives: ``monitor.store``, relative paths inside the workspace."""
    configured = settings.monitor.store
    if configured is None:
        return settings.workspace_dir / "monitor" / "inference.db"
    path = Path(configured).expanduser()
    return path if path.is_absolute() else settings.workspace_dir / path
