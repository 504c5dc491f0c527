"""The contract of a training run, shared by whoever asks for one and whoever runs it.

``pipelines.runner`` implements :class:`PipelineRunner` (kfp.local or ``kfp.Client``); the CLI,
the scheduler and the retraining trigger build :class:`RunRequest` values and read
:class:`RunResult` values without importing the runner itself.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any, Protocol

__all__ = ["RunRequest", "RunResult", "PipelineRunner"]


@dataclass(frozen=True)
class RunRequest:
    """One training run: who asked (trigger) and on which data window."""

    trigger: str = "manual"
    window_start: str | None = None
    window_end: str | None = None
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)


@dataclass
class RunResult:
    request_id: str
    run_id: str
    state: str  # SUCCEEDED | FAILED | SUBMITTED | RUNNING
    home: str  # local | kubeflow
    summary: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    url: str | None = None


class PipelineRunner(Protocol):
    def run_training(self, request: RunRequest, *, wait: bool = True) -> RunResult: ...
