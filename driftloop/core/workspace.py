"""One writer per workspace: the lock a process holds while it runs a pipeline, and owner-only modes.

A workspace (MLflow store, pipeline root, serving and rollout state) has one writer at a time:
the process that runs a pipeline on the embedded default — ``driftloop run train`` / ``run score``,
the trigger's retraining worker, the local scheduler — holds ``fcntl.flock`` on
``<workspace>/.lock`` for the whole run (its deploy step included). The lock file names the
holder (pid, run id) so that whoever finds it taken can say whom it waits for. The kernel lets go
of the lock when the holder ends, however it ends: a killed run never leaves the workspace locked.

Entry points choose what a second run does: the CLI refuses (:class:`WorkspaceBusy`, exit 2)
unless ``--wait``; the trigger and the scheduler wait their turn.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import stat
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from driftloop.core.errors import ConfigError, WorkspaceBusy
from driftloop.core.files import PRIVATE_DIR_MODE, PRIVATE_FILE_MODE, private_dir

__all__ = ["LOCK_NAME", "workspace_lock", "lock_holder", "check_workspace_path", "tighten_workspace"]

LOCK_NAME = ".lock"

log = logging.getLogger(__name__)

# Locks this process holds, by lock path: a nested ``workspace_lock`` on the same workspace (the CLI
# takes it, then the runner) re-enters instead of blocking on its own flock.
_held: dict[str, int] = {}
_held_guard = threading.Lock()


def check_workspace_path(path: Path) -> None:
    """Refuse a workspace that is, or lies under, something other than a folder (named in the message)."""
    for candidate in (path, *path.parents):
        if candidate.exists():
            if not candidate.is_dir():
                what = "the workspace" if candidate == path else f"a parent of workspace {path}"
                raise ConfigError(f"workspace: {candidate} is a file, not a folder ({what}); "
                                  "set workspace to a folder path")
            return


def tighten_workspace(root: Path) -> None:
    """Make ``root`` 0700 and everything under it owner-only (files 0600 or stricter, folders 0700).

    Workspaces made before files were kept private are tightened on the next start; links are left
    alone (their targets are not the workspace's).
    """
    if not root.is_dir():
        return
    private_dir(root)
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = os.path.join(folder, name)
            with contextlib.suppress(FileNotFoundError):
                st = os.lstat(path)
                if stat.S_ISLNK(st.st_mode):
                    continue
                if stat.S_ISDIR(st.st_mode):
                    if st.st_mode & 0o077:
                        os.chmod(path, PRIVATE_DIR_MODE)
                elif st.st_mode & 0o077:
                    os.chmod(path, stat.S_IMODE(st.st_mode) & PRIVATE_FILE_MODE)


def lock_holder(workspace: Path) -> dict[str, object]:
    """Who holds (or last held) the workspace lock: ``{"pid", "run", "since"}``, empty when unknown."""
    try:
        return json.loads((workspace / LOCK_NAME).read_text() or "{}")
    except (OSError, ValueError):
        return {}


def _describe(workspace: Path) -> str:
    holder = lock_holder(workspace)
    return f"run {holder.get('run', '?')} (pid {holder.get('pid', '?')})"


@contextlib.contextmanager
def workspace_lock(workspace: Path, run_id: str, *, wait: bool,
                   on_wait: Callable[[str], None] | None = None, poll_seconds: float = 0.5) -> Iterator[None]:
    """Hold the workspace's lock for the block: ``wait`` for the holder, or refuse with :class:`WorkspaceBusy`.

    ``on_wait`` gets one message ("waiting for run <id> (pid N) to finish in <workspace>") when the
    lock is taken and ``wait`` is true.
    """
    workspace = Path(workspace)
    check_workspace_path(workspace)
    private_dir(workspace)
    path = workspace / LOCK_NAME
    key = str(path.resolve())
    with _held_guard:
        if key in _held:
            _held[key] += 1
            reentered = True
        else:
            reentered = False
    if reentered:
        try:
            yield
        finally:
            with _held_guard:
                _held[key] -= 1
        return
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, PRIVATE_FILE_MODE)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            message = f"{_describe(workspace)} is running in {workspace}"
            if not wait:
                raise WorkspaceBusy(f"{message}; one run at a time per workspace: wait for it to finish, or "
                                   "pass --wait to queue behind it") from None
            note = f"waiting for {_describe(workspace)} to finish in {workspace}"
            log.info("%s", note)
            if on_wait is not None:
                on_wait(note)
            while True:  # polled, not a blocking flock: a signal (Ctrl-C, SIGTERM) ends the wait at once
                time.sleep(poll_seconds)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    continue
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"pid": os.getpid(), "run": run_id, "since": time.time()}).encode(), 0)
        with _held_guard:
            _held[key] = 1
        try:
            yield
        finally:
            with _held_guard:
                _held.pop(key, None)
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)
    finally:
        os.close(fd)  # closing the descriptor lets go of the flock
