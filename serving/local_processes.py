"""Starting the local serving processes of a workspace and waiting until they are ready.

Each model server and the gateway is a ``python -m`` child in its own session, its output in
``<workspace>/serving/logs/<role>.log`` (readable by its owner only). It dies with the process that
started it — except a canary or replica started beside a running gateway by another process (a
pipeline step that then exits), which lives as long as that gateway. A process that exits before its
readiness route answers 200, or is not ready in time, is stopped and reported with its log's tail.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from driftloop.core.errors import ServingError
from driftloop.core.files import private_dir, workspace_token
from driftloop.core.processes import spawn, stop_process
from serving.local_state import ServingState

if TYPE_CHECKING:
    from driftloop.core.config import Settings

__all__ = ["INGEST_TOKEN_ENV", "ProcessInfo", "ProcessLauncher"]

#: the environment variable and workspace file of the monitor's ingest token (the gateway sends it)
INGEST_TOKEN_ENV = "DRIFTLOOP_INGEST_TOKEN"


@dataclass
class ProcessInfo:
    role: str  # primary | canary | gateway | replica-<n>
    pid: int
    port: int
    url: str
    version: str = ""
    model_uri: str = ""


class ProcessLauncher:
    """Starts the serving processes of one workspace and remembers the ones it started."""

    def __init__(self, settings: Settings, state: ServingState, *, ready_timeout: float = 180.0,
                 stop_timeout: float = 10.0) -> None:
        self.settings = settings
        self.state = state
        self.ready_timeout = ready_timeout
        self.stop_timeout = stop_timeout
        self._children: dict[int, subprocess.Popen] = {}  # processes this object started, by pid

    def ingest_token(self) -> str:
        """The monitor's ingest token, which the gateway sends on its POSTs to /events and /feedback."""
        return workspace_token(self.settings.workspace_dir / "monitor" / "ingest.token", INGEST_TOKEN_ENV)

    def spawn(self, role: str, argv: list[str], port: int, ready_path: str, **info: str) -> ProcessInfo:
        """Start ``python -m <argv>`` as ``role`` on ``port`` and wait until ``ready_path`` answers 200."""
        host = self.settings.serving.host
        logs = private_dir(self.state.dir / "logs")
        fd = os.open(logs / f"{role}.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        log_file = os.fdopen(fd, "ab")  # handed to the child
        env = dict(os.environ, PYTHONUNBUFFERED="1", MLFLOW_TRACKING_URI=self.settings.tracking_uri)
        if role == "gateway":
            env[INGEST_TOKEN_ENV] = self.ingest_token()
        # A canary started beside a running gateway by another process (e.g. a pipeline step that then
        # exits) lives as long as that gateway; everything else dies with the process that starts it.
        current = self.state.read()
        owner = ((current.get("gateway") or {}).get("pid")
                 if (role == "canary" or role.startswith("replica")) and current.get("owner") != os.getpid()
                 else None)
        proc = spawn([sys.executable, "-m", *argv], owner_pid=owner, stop_timeout=self.stop_timeout,
                     stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                     cwd=str(Path(__file__).resolve().parent.parent))
        log_file.close()
        self._children[proc.pid] = proc
        url = f"http://{host}:{port}"
        try:
            self._wait_ready(proc, url + ready_path, logs / f"{role}.log")
        except BaseException:
            stop_process(proc.pid, self.stop_timeout)
            raise
        return ProcessInfo(role=role, pid=proc.pid, port=port, url=url, **info)

    def _wait_ready(self, proc: subprocess.Popen, url: str, log_path: Path) -> None:
        import httpx

        deadline = time.monotonic() + self.ready_timeout
        # One client for every poll: making one loads the CA bundle, and a poll every 0.2 s with a client each
        # kept a core busy (~50 ms a client on a slow machine) while the process it waited for started beside it.
        with httpx.Client(timeout=2.0) as client:
            while time.monotonic() < deadline:
                if proc.poll() is not None:
                    tail = log_path.read_text(errors="replace")[-1500:] if log_path.is_file() else ""
                    raise ServingError(f"process exited with status {proc.returncode} before it was ready "
                                       f"({log_path}):\n{tail}")
                with contextlib.suppress(httpx.HTTPError):
                    if client.get(url).status_code == 200:
                        return
                time.sleep(0.2)
        raise ServingError(f"{url} was not ready within {self.ready_timeout:.0f} s (log: {log_path})")

    def exit_status(self, pid: int) -> str:
        """How a process this object started ended ("exit code 1", "signal SIGKILL"), as far as is known."""
        proc = self._children.get(pid)
        code = proc.poll() if proc is not None else None
        if code is None:
            return "exit status unknown"
        if code < 0 or code > 128:  # killed by a signal (a watcher reports its command's as 128 + N)
            num = -code if code < 0 else code - 128
            with contextlib.suppress(ValueError):
                return f"signal {signal.Signals(num).name}"
        return f"exit code {code}"

    def forget(self, pid: int) -> None:
        self._children.pop(pid, None)

    def reap(self) -> None:
        """Collect the exit status of every process this object started, and forget them all."""
        for proc in self._children.values():
            with contextlib.suppress(OSError):
                proc.poll()  # reap
        self._children.clear()
