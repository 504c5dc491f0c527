"""A rollout's persisted state: where it stands and every step it took, so the controller resumes after a restart.

``<workspace>/rollout/<model>/state.json`` holds the state (replaced atomically) and
``history.jsonl`` one line per recorded step.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from driftloop.core.errors import ServingError
from driftloop.core.files import atomic_write, private_dir

__all__ = [
    "RolloutState", "RolloutStore", "PENDING", "SHADOW", "PROGRESSING", "AWAITING_APPROVAL", "PROMOTED", "ROLLED_BACK",
    "TERMINAL",
]

PENDING = "pending"
PROGRESSING = "progressing"
SHADOW = "shadow"  # mirrored traffic only: no user request is answered by the candidate
AWAITING_APPROVAL = "awaiting_approval"
PROMOTED = "promoted"
ROLLED_BACK = "rolled_back"
TERMINAL = (PROMOTED, ROLLED_BACK)


@dataclass
class RolloutState:
    model_name: str
    canary_version: str
    primary_version: str | None
    canary_uri: str = ""
    status: str = PENDING
    weight: int = 0
    step_index: int = -1
    failed_checks: int = 0  # failed analyses in a row (rollout.threshold of them roll back)
    holds: int = 0  # inconclusive analyses at the current weight (rollout.max_holds of them roll back)
    approved: bool = False
    window_start: float = 0.0
    quality_since: float = 0.0  # when the canary steps began: the labelled requests judged are those since
    started_at: float = field(default_factory=time.time)
    updated_at: float = field(default_factory=time.time)
    reason: str = ""
    history: list[dict[str, Any]] = field(default_factory=list)

    @property
    def done(self) -> bool:
        return self.status in TERMINAL


class RolloutStore:
    """The controller's persisted state: ``state.json`` (atomic replace) + ``history.jsonl``."""

    def __init__(self, root: Path, model_name: str) -> None:
        self.dir = Path(root) / model_name
        self.state_path = self.dir / "state.json"
        self.history_path = self.dir / "history.jsonl"

    def load(self) -> RolloutState | None:
        if not self.state_path.is_file():
            return None
        try:
            return RolloutState(**json.loads(self.state_path.read_text()))
        except (ValueError, TypeError) as exc:
            raise ServingError(f"rollout state {self.state_path} is unreadable: {exc}") from exc

    def save(self, state: RolloutState, record: dict[str, Any] | None = None) -> None:
        """Replace ``state.json`` in one step (a temporary file of this process's own, then a rename), 0600."""
        private_dir(self.dir)
        state.updated_at = time.time()
        atomic_write(self.state_path, json.dumps(asdict(state), indent=1, default=str))
        if record is not None:
            with self.history_path.open("a") as fh:
                fh.write(json.dumps(record, default=str) + "\n")

