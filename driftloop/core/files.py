"""Workspace files readable by their owner only, written atomically, and the workspace's tokens.

Every file driftloop keeps in a workspace (inference log, alert store, label outbox, MLflow
store, serving and rollout state, tokens) is mode 0600 and every folder 0700: a workspace holds
requests, labels and bearer tokens. A state file is replaced in one ``os.replace`` so a reader (or
a process killed mid-write) sees the old file or the new one, never half of one.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

__all__ = ["PRIVATE_DIR_MODE", "PRIVATE_FILE_MODE", "atomic_write", "private_dir", "private_umask",
           "workspace_token"]

PRIVATE_FILE_MODE = 0o600
PRIVATE_DIR_MODE = 0o700


def private_dir(path: Path) -> Path:
    """Make ``path`` (and missing parents) as folders only the owner can enter; tighten an existing one."""
    path.mkdir(parents=True, exist_ok=True, mode=PRIVATE_DIR_MODE)
    if path.stat().st_mode & 0o077:
        os.chmod(path, PRIVATE_DIR_MODE)
    return path


def private_umask() -> int:
    """Set the process umask so files and folders it creates from now on are owner-only; returns the old one.

    SQLite, MLflow and kfp.local create their own files (journals, WAL, artifacts): the umask is
    the one setting that reaches all of them.
    """
    return os.umask(0o077)


def atomic_write(path: Path, data: str | bytes, mode: int = PRIVATE_FILE_MODE) -> None:
    """Replace ``path`` with ``data`` in one step (temporary file in the same folder, fsync, rename)."""
    raw = data.encode() if isinstance(data, str) else data
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(raw)
            out.flush()
            os.fsync(out.fileno())
        os.chmod(tmp, mode)  # O_CREAT's mode is filtered by the umask; an existing tmp kept its own
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def workspace_token(path: Path, env: str) -> str:
    """The bearer token named by environment variable ``env``, else the one in ``path``, else a new one.

    A new token is written to ``path`` (0600) so the workspace's other processes find it, as a
    kubeconfig or a Jupyter token file is found; creating it is race-free (``O_EXCL``): two
    processes starting at once agree on one token.
    """
    token = os.environ.get(env)
    if token:
        return token
    private_dir(path.parent)
    try:
        existing = path.read_text().strip()
        if existing:
            return existing
    except FileNotFoundError:
        pass
    token = secrets.token_urlsafe(32)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    atomic_write(tmp, token)
    try:
        os.link(tmp, path)  # appears whole or not at all; fails if another process got there first
    except FileExistsError:
        return path.read_text().strip() or token
    finally:
        tmp.unlink(missing_ok=True)
    return token
