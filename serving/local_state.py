"""The serving state file of a workspace (``<workspace>/serving/state.json``): which processes serve
(pids, ports, versions), the split, a pending canary, the owning ``driftloop serve``, what is down and
how often each role was restarted.

It is what ``driftloop serve``, the pipeline's deploy step and the rollout controller — separate
processes — agree on. Every change is a read-modify-write under an exclusive file lock, written
atomically and readable by its owner only. Reading it drops the entries of processes that died,
unless their owning ``serve`` still lives (its supervisor restarts them).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from driftloop.core.files import atomic_write, private_dir
from driftloop.core.processes import process_alive

__all__ = ["ServingState"]

log = logging.getLogger(__name__)


class ServingState:
    """The state file in ``directory`` (``state.json``, locked through ``state.lock`` beside it)."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.path = directory / "state.json"

    @contextlib.contextmanager
    def locked(self) -> Iterator[dict[str, Any]]:
        """Read-modify-write the state under an exclusive file lock."""
        private_dir(self.dir)
        fd = os.open(self.dir / "state.lock", os.O_WRONLY | os.O_CREAT, 0o600)
        with os.fdopen(fd, "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            state = self.read()
            yield state
            atomic_write(self.path, json.dumps(state, indent=1))

    def read(self) -> dict[str, Any]:
        """The state as it stands. While the owning ``serve`` lives, entries of dead processes are kept
        (its supervisor restarts them); without one they are dropped — a canary that was out becomes
        pending at the weight it ran at, so the next ``serve`` resumes its rollout."""
        state: dict[str, Any] = {"primary": None, "canary": None, "gateway": None, "canary_percent": 0,
                                 "pending_canary": None, "owner": None, "replicas": [], "down": {},
                                 "restarts": {}}
        if self.path.is_file():
            try:
                state.update(json.loads(self.path.read_text()))
            except ValueError:
                log.warning("serving state %s is unreadable; starting from empty", self.path)
        if state.get("owner") and not process_alive(int(state["owner"])):
            state["owner"] = None
        if state["owner"]:
            return state  # supervised: the owner's supervisor restarts what died
        for role in ("primary", "canary", "gateway"):
            entry = state.get(role)
            if entry and not process_alive(int(entry["pid"])):
                log.info("dropping stale %s entry (pid %s is gone)", role, entry["pid"])
                if role == "canary":
                    self.keep_canary_pending(state)
                state[role] = None
        live = [r for r in state.get("replicas") or [] if process_alive(int(r["pid"]))]
        if len(live) != len(state.get("replicas") or []):
            log.info("dropping %d stale replica entries", len(state["replicas"]) - len(live))
        state["replicas"] = live
        state["down"] = {}
        return state

    @staticmethod
    def keep_canary_pending(state: dict[str, Any]) -> None:
        """A canary that is out but whose processes go becomes pending at its weight (unless one already is)."""
        canary = state.get("canary")
        if canary and not state.get("pending_canary"):
            state["pending_canary"] = {"version": canary["version"], "model_uri": canary["model_uri"],
                                       "percent": state.get("canary_percent", 0)}
