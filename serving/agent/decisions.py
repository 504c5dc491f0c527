"""The decision log: every decision of the agent, taken or refused, with its reason.

One JSON document per line, appended and flushed to disk (fsync) as each decision is made; an
allowed action's record carries what came of it (its result, or the error). Readers skip a torn
last line.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Any, Iterator

from serving.agent.policy import Decision

__all__ = ["DecisionLog"]


class DecisionLog:
    """Append-only JSONL of :class:`Decision` records (``path`` None: kept in memory only)."""

    def __init__(self, path: str | Path | None = None) -> None:
        self.path = Path(path) if path else None
        self.memory: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def record(self, decision: Decision, **extra: Any) -> dict[str, Any]:
        doc = {**decision.to_dict(), **extra}
        with self._lock:
            if self.path is None:
                self.memory.append(doc)
            else:
                line = json.dumps(doc, separators=(",", ":"), default=str) + "\n"
                with open(self.path, "a", encoding="utf-8") as fh:
                    fh.write(line)
                    fh.flush()
                    os.fsync(fh.fileno())
        return doc

    def __iter__(self) -> Iterator[dict[str, Any]]:
        if self.path is None:
            yield from list(self.memory)
            return
        if not self.path.is_file():
            return
        with open(self.path, encoding="utf-8") as fh:
            for line in fh:
                try:
                    yield json.loads(line)
                except ValueError:
                    continue  # a torn line from a crash mid-write

    def tail(self, n: int = 20) -> list[dict[str, Any]]:
        return list(self)[-n:]
