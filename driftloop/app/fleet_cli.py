"""The fleet's training: ``driftloop run train -c FLEET [--model NAME]`` (docs/fleet.md).

One model (``--model NAME``, or a one-model configuration) trains in this process as it always did.
The whole fleet trains as one child process per model -- ``driftloop run train -c FLEET --model NAME``
-- at most ``fleet.max_concurrent_runs`` at once, the rest queued in file order: kfp.local keeps its
state per process (one local run at a time per process), so parallel local runs are separate
processes. Each child dies with this one; its output goes to ``<model workspace>/fleet/train.log``
and its result to ``train-result.json`` beside it. One line per model as it ends, and a non-zero
exit when any failed; one model's failure never stops another's run.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import typer
from rich.markup import escape

from driftloop.core.console import console, err_console
from driftloop.core.files import private_dir
from driftloop.core.fleet import Fleet, FleetModel, load_fleet
from driftloop.core.processes import spawn, stop_processes
from driftloop.core.workspace import tighten_workspace

__all__ = ["ChildRun", "fleet_from", "model_name", "outcome", "pick", "run_children", "train_command", "train_fleet",
           "write_result"]

FLEET_DIR = "fleet"


def fleet_from(config: Path | str | None, params: list[str] | None = None) -> Fleet:
    """The fleet of a configuration (a one-model file is a fleet of one); existing workspaces are
    tightened to owner-only modes, as :func:`~driftloop.core.console.settings_from` does."""
    fleet = load_fleet(config, list(params or []))
    for m in fleet.models:
        tighten_workspace(m.settings.workspace_dir)
    return fleet


@dataclass
class ChildRun:
    """One model's child process: its command, output file and when it started and ended."""

    name: str
    command: list[str]
    log: Path
    result: Path
    started: float = 0.0
    ended: float = 0.0
    code: int | None = None
    process: subprocess.Popen | None = field(default=None, repr=False)


def run_children(runs: Sequence[ChildRun], limit: int, *, on_start: Callable[[ChildRun], None] | None = None,
                 on_end: Callable[[ChildRun], None] | None = None, poll_seconds: float = 0.2) -> list[ChildRun]:
    """Run each child, at most ``limit`` at once, the rest in order as others end; returns them all.

    Every child is started with :func:`~driftloop.core.processes.spawn` (it dies with this process);
    an interrupt stops those still running before it goes on up."""
    queue, running = list(runs), []
    try:
        while queue or running:
            while queue and len(running) < limit:
                run = queue.pop(0)
                private_dir(run.log.parent)
                run.result.unlink(missing_ok=True)
                with run.log.open("wb") as out:
                    run.process = spawn(run.command, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
                run.started = time.time()
                running.append(run)
                if on_start:
                    on_start(run)
            time.sleep(poll_seconds)
            for run in [r for r in running if r.process.poll() is not None]:
                run.code, run.ended = run.process.returncode, time.time()
                running.remove(run)
                if on_end:
                    on_end(run)
    finally:
        stop_processes([r.process.pid for r in running if r.process is not None])
    return list(runs)


def train_command(fleet: Fleet, name: str, params: list[str] | None, options: dict[str, Any], result: Path) -> list[str]:
    """``driftloop run train`` of one model of the fleet, with this command's options."""
    cmd = [sys.executable, "-m", "driftloop.app.cli", "run", "train", "-c", str(fleet.source), "--model", name]
    for p in params or []:
        cmd += ["--param", p]
    for flag, value in options.items():
        if value is True:
            cmd.append(flag)
        elif value not in (None, False):
            cmd += [flag, str(value)]
    return [*cmd, "--result-file", str(result)]


def write_result(path: Path, result: Any) -> None:  # noqa: ANN401 (RunResult)
    """The run's result as JSON, for the fleet's parent (``--result-file``)."""
    from dataclasses import asdict

    path.write_text(json.dumps(asdict(result), default=str))


def train_fleet(fleet: Fleet, params: list[str] | None, options: dict[str, Any]) -> None:
    """Train every model of the fleet, ``fleet.max_concurrent_runs`` at once; exit 1 when any failed."""
    limit = fleet.limits.max_concurrent_runs
    runs = []
    for m in fleet.models:
        folder = m.settings.workspace_dir / FLEET_DIR
        result = folder / "train-result.json"
        runs.append(ChildRun(m.name, train_command(fleet, m.name, params, options, result), folder / "train.log", result))
    width = max(len(m.name) for m in fleet.models)
    console.print(f"[bold]driftloop[/] training {len(runs)} models of {fleet.source}, {limit} at a time "
                  "(fleet.max_concurrent_runs)", soft_wrap=True)

    def started(run: ChildRun) -> None:
        console.print(f"· {run.name:<{width}} started   (output: {run.log})", soft_wrap=True)

    def ended(run: ChildRun) -> None:
        ok, detail = outcome(run)
        mark = "[green]✓[/]" if ok else "[red]✗[/]"
        state = "succeeded" if ok else "failed"
        console.print(f"{mark} {run.name:<{width}} {state:<9} {run.ended - run.started:6.1f}s  {escape(detail)}",
                      soft_wrap=True)

    done = run_children(runs, limit, on_start=started, on_end=ended)
    failed = [r.name for r in done if not outcome(r)[0]]
    if failed:
        err_console.print(f"[red]{len(failed)} of {len(done)} models failed[/]: {', '.join(failed)}")
        raise typer.Exit(1)
    console.print(f"[green]all {len(done)} models trained[/]")


def outcome(run: ChildRun) -> tuple[bool, str]:
    """(succeeded, one line): the gate and version of a finished run, or why it failed."""
    try:
        result = json.loads(run.result.read_text())
    except (OSError, ValueError):
        result = None
    if result is None:
        return False, f"{_last_error(run.log)} (exit {run.code}; output: {run.log})"
    if result.get("state") == "FAILED":
        return False, f"{result.get('error') or 'run failed'}"
    s = result.get("summary") or {}
    if not s:
        return run.code == 0, f"run {result.get('run_id')} {str(result.get('state')).lower()}"
    version = f"v{s['model_version']} " if s.get("model_version") else ""
    return run.code == 0, f"{version}gate {s.get('gate')}: {s.get('reason', '')}".strip()


def _last_error(log: Path) -> str:
    """The child's one-line error (``error: …``), else its last line of output."""
    try:
        lines = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return "no output"
    errors = [line for line in lines if line.startswith("error:")]
    return (errors or lines or ["no output"])[-1]


def pick(fleet: Fleet, model: str | None) -> FleetModel | None:
    """The one model a command acts on: ``--model NAME``, or the only model of a one-model file;
    None for the whole fleet."""
    if model is not None:
        return fleet.model(model)
    return fleet.models[0] if fleet.single else None


def model_name(ref: str | None, config: Path | str | None, params: list[str] | None) -> str | None:
    """The fleet model a model reference (``name``, ``name@alias``, ``name/version``) points to, when the
    configuration is a fleet file; None for a one-model file (the reference is then a registry name)."""
    if ref is None:
        return None
    if fleet_from(config, params).single:
        return None
    return ref.split("@", 1)[0].split("/", 1)[0]
