"""The fleet's one scheduler: ``driftloop scheduler -c FLEET`` (docs/fleet.md, "Schedules").

One process watches every model's schedules (each model's store in its own workspace). A model with a
due slot gets one tick -- ``driftloop scheduler --once -c FLEET --model NAME``, the one-model scheduler
unchanged -- in a child process of its own: kfp.local keeps its state per process, so runs of different
models at once are separate processes. At most ``fleet.max_concurrent_runs`` ticks run at once; the
others wait, the model that became due first going first. A model's tick never starts twice at once,
and one model's failing run never stops another's schedule. Each child dies with this process; its
output is appended to ``<model workspace>/fleet/scheduler.log``, and the slot lines it prints are
repeated here, prefixed with the model's name.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from driftloop.core.files import private_dir
from driftloop.core.fleet import Fleet
from driftloop.core.processes import spawn, stop_processes
from pipelines.scheduler import Scheduler

__all__ = ["FleetScheduler", "Tick"]

FLEET_DIR = "fleet"


@dataclass
class Tick:
    """One model's tick in a child process."""

    model: str
    log: Path
    offset: int = 0
    started: float = 0.0
    code: int | None = None
    process: subprocess.Popen | None = field(default=None, repr=False)


class FleetScheduler:
    """Every model's schedules in one loop; each due model's tick in a child, ``max_concurrent_runs`` at once."""

    def __init__(self, fleet: Fleet, params: list[str] | None = None, *,
                 command: Callable[[str], list[str]] | None = None,
                 say: Callable[[str], None] = print) -> None:
        self.fleet = fleet
        self.params = list(params or [])
        self.schedulers = {m.name: Scheduler(m.settings) for m in fleet.models}
        self.limit = fleet.limits.max_concurrent_runs
        self.command = command or self._tick_command
        self.say = say
        self.waiting: list[str] = []
        self.running: dict[str, Tick] = {}
        self.ended: list[Tick] = []
        self._checked: dict[str, float] = {}

    def _tick_command(self, name: str) -> list[str]:
        cmd = [sys.executable, "-m", "driftloop.app.cli", "scheduler", "--once", "-c", str(self.fleet.source),
               "--model", name]
        for p in self.params:
            cmd += ["--param", p]
        return cmd

    def _due(self, name: str, now: float, force: bool) -> bool:
        """Whether model ``name`` has a due slot; each model's store is read at most every its
        ``schedule.tick_seconds`` (``force``: now)."""
        scheduler = self.schedulers[name]
        if not force and now - self._checked.get(name, -1e18) < scheduler.settings.schedule.tick_seconds:
            return False
        self._checked[name] = now
        try:
            return scheduler.has_due()
        except Exception as exc:  # noqa: BLE001 - one model's unreadable store never stops the others
            self.say(f"{name}: cannot read its schedules: {exc}")
            return False

    def step(self, *, force: bool = False, enqueue: bool = True) -> None:
        """Reap ended ticks, queue the models that are due (unless not ``enqueue``), start ticks up to the limit."""
        for name, tick in list(self.running.items()):
            if tick.process is not None and tick.process.poll() is not None:
                tick.code = tick.process.returncode
                del self.running[name]
                self.ended.append(tick)
                self._report(tick)
        now = time.monotonic()
        for name in self.schedulers if enqueue else ():
            if name not in self.running and name not in self.waiting and self._due(name, now, force):
                self.waiting.append(name)
        while self.waiting and len(self.running) < self.limit:
            self._start(self.waiting.pop(0))

    def _start(self, name: str) -> None:
        ws = self.schedulers[name].settings.workspace_dir
        log = private_dir(ws / FLEET_DIR) / "scheduler.log"
        offset = log.stat().st_size if log.exists() else 0
        with log.open("ab") as out:
            process = spawn(self.command(name), stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        self.running[name] = Tick(name, log, offset, time.time(), process=process)
        self.say(f"{name}: slot due, tick started (output: {log})")

    def _report(self, tick: Tick) -> None:
        with tick.log.open("rb") as f:
            f.seek(tick.offset)
            lines = [ln.strip() for ln in f.read().decode(errors="replace").splitlines() if ln.strip()]
        # the one-model scheduler's --once prints one line per slot: "<schedule> <slot>: <state> (error)"
        slots = [ln for ln in lines if ": " in ln and not ln.startswith(("Traceback", "Error"))][-5:]
        for line in slots:
            self.say(f"{tick.model}: {line}")
        if tick.code:
            self.say(f"{tick.model}: tick failed (exit {tick.code}; output: {tick.log})")

    def run_once(self, poll_seconds: float = 0.2) -> list[Tick]:
        """Every model that is due now, ticked once (the limit holds); returns the ticks."""
        self.step(force=True)
        try:
            while self.running or self.waiting:
                time.sleep(poll_seconds)
                self.step(enqueue=False)
        finally:
            self.stop()
        return self.ended

    def run_forever(self, stop: threading.Event, poll_seconds: float = 1.0) -> None:
        """Until ``stop`` is set: each model's schedules every its ``schedule.tick_seconds``."""
        try:
            while not stop.is_set():
                self.step()
                stop.wait(poll_seconds)
        finally:
            self.stop()

    def stop(self) -> None:
        """Stop the ticks still running (their slots are recorded as interrupted by the next tick)."""
        stop_processes([t.process.pid for t in self.running.values() if t.process is not None])
