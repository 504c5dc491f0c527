"""What makes a SQLite file of the monitor durable: the writer connection, the write transaction, the
file checks, the checkpoints and the lifecycle (:class:`DurableSQLite`).

:class:`monitoring.store.InferenceStore` (a model's inference log) and :class:`monitoring.intake.IntakeJournal`
(a fleet monitor's journal of acknowledged events) are both one: nothing is acknowledged that was not durably
stored, and a file deleted, replaced or truncated under the process, or a full or failing disk, refuses
with :class:`StoreUnavailable` (HTTP 503, saying why) instead of writing into a file no one will read
(:mod:`monitoring.store` explains the failure modes).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import stat
import threading
import time
from pathlib import Path
from typing import Any, Literal

from driftloop.core.files import PRIVATE_FILE_MODE, private_dir
from monitoring.events import EventError
from monitoring.store_checkpoint import CHECKPOINTS

__all__ = ["DurableSQLite", "StoreUnavailable", "Synchronous"]

log = logging.getLogger("monitoring.store")

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


class DurableSQLite:
    """One SQLite file in WAL mode written by one connection of this process (subclasses add the tables).

    ``_open`` connects (owner-only files, ``journal_mode=WAL``, the configured ``synchronous``, no
    automatic checkpoint inside a commit); the subclass makes its schema, then ``_opened`` records the
    files this connection writes and hands the store to the process's checkpoint thread. ``_write(work)``
    runs ``work(db)`` in one durable transaction; ``_reader()`` opens a read connection that never
    creates a file.
    """

    what = "store"  # how messages name it: "the <what> cannot commit: ..."
    page_size: int | None = None  # SQLite's page size for a new file (None: SQLite's default, 4096)
    path: Path
    synchronous: Synchronous

    def _open(self, path: str | Path, synchronous: Synchronous) -> None:
        self.path = Path(path)
        private_dir(self.path.parent)
        _private_files(self.path)
        self.synchronous = synchronous
        self._lock = threading.Lock()
        self._db = self._connect()
        # checkpoints (which fsync) run in a background thread, not inside the commits of the sink
        self._db.execute("PRAGMA wal_autocheckpoint=0")
        self._db.execute("CREATE TABLE IF NOT EXISTS probe (id INTEGER PRIMARY KEY, ts REAL NOT NULL)")
        self._failure: str | None = None  # why the last commit failed; None after a good one
        self._retry_at = 0.0  # while failing, the next time a write may touch the database again
        self._closed = False

    def _opened(self, checkpoint_seconds: float) -> None:
        self._files = self._file_state()  # the files this connection writes (see monitoring.store)
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
            return StoreUnavailable(f"the {self.what} cannot commit: {problem}; nothing more is accepted "
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
            raise StoreUnavailable(f"the {self.what} cannot commit ({self.path}): {self._failure}")
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
            raise StoreUnavailable(f"the {self.what} cannot commit ({self.path}): {exc}") from exc
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
            return f"the {self.what} cannot commit: {problem}"
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
        if self.page_size is not None:  # a new file only: the page size of one made before stays
            db.execute(f"PRAGMA page_size={int(self.page_size)}")
        db.execute("PRAGMA journal_mode=WAL")
        db.execute(f"PRAGMA synchronous={self.synchronous}")
        db.execute("PRAGMA busy_timeout=30000")
        return db

    def _reader(self) -> sqlite3.Connection:
        """A connection of its own for one read (the queries of the mixins); never creates a file."""
        problem = self._files_problem()
        if problem is not None:  # never create a deleted file again, never map a truncated -shm
            raise StoreUnavailable(f"the {self.what} cannot be read: {problem}")
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
                log.warning("closing the %s without a checkpoint: %s", self.what, exc)
            finally:
                self._db.close()

    def __enter__(self):  # noqa: ANN204 - the subclass itself
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
