"""The contract of a pipeline run, shared by whoever asks for one and whoever runs it.

``pipelines.runner`` implements :class:`PipelineRunner` (kfp.local or ``kfp.Client``): its one
verb is :meth:`PipelineRunner.run` — this :class:`Pipeline`, with these arguments, for this
:class:`RunRequest` — and it knows no particular pipeline (as Kedro's ``AbstractRunner.run(pipeline,
catalog)``). A pipeline module (training, scoring) describes itself as a :class:`Pipeline` and
builds its arguments. The CLI, the scheduler and the retraining trigger build :class:`RunRequest`
values and read :class:`RunResult` values without importing the runner itself.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

__all__ = ["RunRequest", "RunResult", "Pipeline", "PipelineRunner", "TrainingRuns"]


@dataclass(frozen=True)
class RunRequest:
    """One run: who asked (trigger) and on which data window."""

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


def _nothing() -> None:
    return None


def _no_detail(func: str, output: dict[str, Any]) -> str:
    return ""


@dataclass(frozen=True)
class Pipeline:
    """What a runner needs of a pipeline, on either home; built for one configuration."""

    name: str  # the stable KFP pipeline name: uploaded versions and job names derive from it
    description: str  # shown with the pipeline in the Kubeflow UI
    build: Callable[[], Any]  # the ``dsl.pipeline`` function kfp.local calls with the arguments
    compile: Callable[[Path], Path]  # the KFP YAML package, written into a folder (what Kubeflow gets)
    summarize: Callable[[str], dict[str, Any]]  # what a finished run recorded, by request id
    prepare: Callable[[], None] = _nothing  # checks made in the workspace lock, before any local task starts
    log_prefix: str = ""  # a local run's task output: ``<pipeline-root>/logs/<prefix><request-id>.log``
    # A local run's progress lines: component function -> the step name a person reads, and a finished
    # step's key output from its executor output (parameters and artifact metadata)
    step_names: Mapping[str, str] = field(default_factory=dict)
    step_detail: Callable[[str, dict[str, Any]], str] = _no_detail


class PipelineRunner(Protocol):
    """Runs any :class:`Pipeline` on one home (``pipelines.runner``: kfp.local or ``kfp.Client``)."""

    home: str

    def run(self, pipeline: Pipeline, arguments: dict[str, Any], request: RunRequest, *,
            wait: bool = True) -> RunResult: ...


class TrainingRuns(Protocol):
    """A runner bound to the training pipeline (``pipelines.training.TrainingRunner``): what the
    retraining trigger and the scheduler are given, since they start only training runs."""

    home: str

    def run_training(self, request: RunRequest, *, wait: bool = True) -> RunResult: ...
