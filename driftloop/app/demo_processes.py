"""The processes ``driftloop demo`` starts, and its folder: a clean start, every process stopped on the way out.

The monitor and the serving stack are the CLI's own verbs run as processes (:class:`Service`); a
pid file per service lets a later demo stop what an interrupted one left running. kfp.local's
output of a pipeline run goes to a log file of the demo (:meth:`DemoProcesses.pipeline_log`).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import httpx

from driftloop.core.errors import DriftloopError
from driftloop.core.processes import spawn, stop_process, stop_processes

if TYPE_CHECKING:
    from driftloop.core.config import Settings

__all__ = ["Service", "DemoProcesses"]


@dataclass
class Service:
    """A driftloop CLI verb running as a process of its own (own session, so it can be stopped whole)."""

    name: str
    args: list[str]
    log_path: Path
    proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        out = open(self.log_path, "ab")
        self.proc = spawn([sys.executable, "-m", "driftloop.app.cli", *self.args], stdout=out,
                          stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        out.close()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 15.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        stop_process(self.proc.pid, timeout)
        self.proc.wait(5)

    def tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


@dataclass
class DemoProcesses:
    """The demo's folder (configuration, logs, pid files) and the services it runs there."""

    workdir: Path
    services: list[Service] = field(default_factory=list)

    @property
    def config_path(self) -> Path:
        return self.workdir / "driftloop.yaml"

    def cli(self, *args: str) -> list[str]:
        """A CLI verb's arguments with the demo's configuration."""
        return [*args, "-c", str(self.config_path)]

    def settings(self) -> Settings:
        from driftloop.core.config import load_settings

        return load_settings(self.config_path)

    def prepare(self) -> None:
        """Clean start: stop what an interrupted earlier demo left running, wipe its workspace."""
        from serving.local_backend import LocalBackend

        if self.config_path.exists():
            with contextlib.suppress(Exception):
                LocalBackend(self.settings()).stop()
        for pid_file in self.workdir.glob("*.pid"):
            with contextlib.suppress(Exception):
                os.killpg(int(pid_file.read_text()), signal.SIGTERM)
        if self.workdir.exists():
            shutil.rmtree(self.workdir)
        self.workdir.mkdir(parents=True)

    def service(self, name: str, *args: str) -> Service:
        """Start ``driftloop <args>`` with the demo's configuration; its log goes to ``logs/<name>.log``."""
        svc = Service(name, self.cli(*args), self.workdir / "logs" / f"{name}.log")
        svc.start()
        self.services.append(svc)
        (self.workdir / f"{name}.pid").write_text(str(svc.proc.pid))
        return svc

    @staticmethod
    def wait_http(url: str, svc: Service, timeout: float = 60.0) -> None:
        """Until ``url`` answers (below 500); a service that exits first fails with its log's tail."""
        deadline = time.monotonic() + timeout
        with httpx.Client(timeout=2.0) as client:  # one client: making one loads the CA bundle (tens of ms)
            while time.monotonic() < deadline:
                if not svc.alive():
                    raise DriftloopError(f"{svc.name} exited early:\n{svc.tail()}")
                with contextlib.suppress(httpx.HTTPError):
                    if client.get(url).status_code < 500:
                        return
                time.sleep(0.05)  # a refused connection on loopback costs next to nothing: see the service up at once
        raise DriftloopError(f"{svc.name} did not become ready at {url} within {timeout:.0f}s:\n{svc.tail()}")

    def stop(self) -> None:
        """Stop every service (all at once) and whatever the serving state still records."""
        from serving.local_backend import LocalBackend

        running = [svc.proc for svc in self.services if svc.proc is not None and svc.proc.poll() is None]
        stop_processes([proc.pid for proc in running], 15.0)  # together: no service's grace period waits on another's
        for proc in running:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(5)
        with contextlib.suppress(Exception):
            LocalBackend(self.settings()).stop()
        for pid_file in self.workdir.glob("*.pid"):
            pid_file.unlink(missing_ok=True)

    @contextlib.contextmanager
    def pipeline_log(self, name: str) -> Iterator[None]:
        """kfp.local prints every task's executor input and logs; keep them in a file, show progress only."""
        path = self.workdir / "logs" / f"pipeline-{name}.log"
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as fh, contextlib.redirect_stdout(fh), contextlib.redirect_stderr(fh):
            yield

    def run_cli(self, *args: str, timeout: float) -> str:
        """``driftloop <args>`` to its end (stopped after ``timeout``): its output, stdout and stderr together."""
        proc = spawn([sys.executable, "-m", "driftloop.app.cli", *self.cli(*args)],
                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True)
        try:
            return proc.communicate(timeout=timeout)[0]
        except subprocess.TimeoutExpired:
            stop_process(proc.pid)
            return proc.communicate()[0]
