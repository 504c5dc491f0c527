"""Local processes: is a pid alive, a free loopback port, stop a process group.

Shared by everything on the embedded default that starts or watches processes of its
own (model servers and gateway, the monitor's retraining workers, the local scheduler,
the demo), so liveness means the same everywhere: a zombie counts as gone.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import time

__all__ = ["process_alive", "free_port", "stop_process"]

log = logging.getLogger(__name__)


def process_alive(pid: int | None, *, cmdline_contains: bytes | None = None) -> bool:
    """True while ``pid`` runs and is not a zombie.

    With ``cmdline_contains``, the process must also carry that text in its command line,
    so a pid recycled by an unrelated process does not count. Without /proc (not Linux)
    ``kill(pid, 0)`` decides alone.
    """
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as fh:
            if fh.read().rsplit(")", 1)[1].split()[0] == "Z":
                return False
        if cmdline_contains is not None and pid != os.getpid():
            with open(f"/proc/{pid}/cmdline", "rb") as fh:
                return cmdline_contains in fh.read()
    except (OSError, IndexError):
        return True
    return True


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` right now."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _reap(pid: int) -> None:
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


def stop_process(pid: int, timeout: float = 10.0) -> None:
    """SIGTERM the process group of ``pid`` (its own session), SIGKILL it after ``timeout``."""
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            _reap(pid)
            return
        except PermissionError:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            _reap(pid)
            if not process_alive(pid):
                return
            time.sleep(0.05)
    log.warning("process %d did not stop", pid)
