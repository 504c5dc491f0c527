"""Local processes: start a child that dies with its owner, is a pid alive, a free loopback
port, stop a process group.

Shared by everything on the embedded default that starts or watches processes of its
own (model servers and gateway, the monitor's retraining workers, the local scheduler,
the demo), so liveness means the same everywhere: a zombie counts as gone.

Every child starts through :func:`spawn`, in a session (process group) of its own, and dies
with the process that owns it however that one ends (Ctrl-C, SIGTERM, SIGKILL):

* started from the main thread with no other owner: the kernel sends it SIGTERM when its
  parent dies (``PR_SET_PDEATHSIG``, set between fork and exec; a parent that is already gone
  is checked for). The signal fires when the forking *thread* ends, hence the main thread only.
* an ``owner_pid`` (another process, e.g. the gateway a canary serves behind), a call from a
  thread that may end before the process, or ``kill_group`` (a child whose own children must go
  too, e.g. a pipeline task run by ``sh``): a small watcher (``python -m driftloop.core.processes``)
  leads the group, runs the command and, when the owner ends (``pidfd``), the command ends or the
  watcher is told to stop, stops the WHOLE group — grandchildren included — SIGTERM, then SIGKILL.
  The watcher itself also gets ``PR_SET_PDEATHSIG`` when its parent is the owner and starts it
  from the main thread (never from another thread: that thread's end would fire it).
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

__all__ = ["spawn", "die_with_parent", "process_alive", "free_port", "stop_process", "stop_processes",
           "WATCHER_MODULE"]

#: ``python -m`` module of the watcher that leads a child's process group (see the module doc).
WATCHER_MODULE = "driftloop.core.processes"

_PR_SET_PDEATHSIG = 1
try:
    _libc: Any = ctypes.CDLL(None, use_errno=True)
    _prctl = _libc.prctl
except (OSError, AttributeError):  # not Linux: the watcher alone keeps children from outliving owners
    _prctl = None

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
    stop_processes([pid], timeout)


def stop_processes(pids: Sequence[int], timeout: float = 10.0) -> None:
    """Stop the process groups of ``pids`` together: SIGTERM to all at once, one shared wait of at
    most ``timeout``, then SIGKILL to what is left (and 5 s more for the kernel to take it).

    Bounded however many there are and however slow each one is to stop: no process's grace
    period waits on another's.
    """
    left = [p for p in dict.fromkeys(pids) if p]
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
        for pid in left:
            try:
                os.killpg(pid, sig)
            except ProcessLookupError:
                _reap(pid)
            except PermissionError:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
        deadline = time.monotonic() + wait
        while left and time.monotonic() < deadline:
            for pid in left:
                _reap(pid)
            left = [p for p in left if process_alive(p)]
            if left:
                time.sleep(0.05)
        if not left:
            return
    log.warning("process(es) %s did not stop", ", ".join(map(str, left)))


def die_with_parent(sig: int = signal.SIGTERM) -> Callable[[], None]:
    """A ``preexec_fn``: the child gets ``sig`` when the thread that forked it ends.

    Runs in the child between fork and exec, so it only calls ``prctl`` and ``getppid``; a parent
    that died before ``prctl`` took effect is caught by comparing the parent's pid.
    """
    parent = os.getpid()

    def preexec() -> None:
        if _prctl is not None:
            _prctl(_PR_SET_PDEATHSIG, sig, 0, 0, 0)
        if os.getppid() != parent:
            os.kill(os.getpid(), sig)

    return preexec


def spawn(cmd: Sequence[str], *, owner_pid: int | None = None, kill_group: bool = False,
          stop_timeout: float = 10.0, **popen: Any) -> subprocess.Popen:
    """Start ``cmd`` in a session of its own so that it cannot outlive its owner (see the module doc).

    ``owner_pid``: the process it must not outlive (default: this one); one that is already gone
    counts as not given. ``kill_group``: its own children must not outlive it either. Other
    keyword arguments go to :class:`subprocess.Popen` (``start_new_session`` and ``preexec_fn``
    are this function's). The returned process's pid leads the group, so :func:`stop_process`
    on it stops everything.
    """
    for key in ("start_new_session", "preexec_fn", "process_group"):
        if key in popen:
            raise TypeError(f"spawn() sets {key} itself")
    on_main = threading.current_thread() is threading.main_thread()
    if owner_pid is not None and (owner_pid == os.getpid() or not process_alive(owner_pid)):
        owner_pid = None
    if owner_pid is None and on_main and not kill_group:
        return subprocess.Popen(list(cmd), start_new_session=True, preexec_fn=die_with_parent(), **popen)
    owner = owner_pid or os.getpid()
    watcher = [sys.executable, "-m", WATCHER_MODULE, "--owner", str(owner), "--stop-timeout", str(stop_timeout),
               "--", *cmd]
    preexec = die_with_parent() if owner == os.getpid() and on_main else None
    return subprocess.Popen(watcher, start_new_session=True, preexec_fn=preexec, **popen)


def _kill_group(timeout: float, child: subprocess.Popen | None) -> None:
    """SIGTERM this process's group (the watcher ignores it), SIGKILL what is left after ``timeout``."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    pgid = os.getpgid(0)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if child is not None and child.poll() is None:
            time.sleep(0.05)
            continue
        if not _group_members(pgid):
            return
        time.sleep(0.05)
    for pid in _group_members(pgid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    if child is not None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            child.wait(5.0)


def _group_members(pgid: int) -> list[int]:
    """Live pids of process group ``pgid`` other than this one (from /proc)."""
    me, out = os.getpid(), []
    try:
        entries = os.listdir("/proc")
    except OSError:
        return out
    for name in entries:
        if not name.isdigit() or int(name) == me:
            continue
        try:
            with open(f"/proc/{name}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if len(fields) > 2 and fields[0] != "Z" and int(fields[2]) == pgid:
            out.append(int(name))
    return out


def _watch(owner: int, cmd: list[str], stop_timeout: float) -> int:
    """The watcher: run ``cmd``; stop the whole group when the owner ends or this is told to stop."""
    stop = threading.Event()

    def on_signal(signum: int, frame: Any) -> None:
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, on_signal)
    # (when its owner started it from the main thread, the watcher already has PR_SET_PDEATHSIG: spawn's preexec_fn)
    if not process_alive(owner):
        return 143
    pidfd = None
    with contextlib.suppress(OSError, AttributeError):
        pidfd = os.pidfd_open(owner)
    try:
        child = subprocess.Popen(cmd, preexec_fn=die_with_parent())
    except OSError as exc:
        print(f"cannot start {cmd[0]}: {exc}", file=sys.stderr)
        return 127
    poller = None
    if pidfd is not None:
        poller = select.poll()
        poller.register(pidfd, select.POLLIN)
    while True:
        code = child.poll()
        if code is not None:
            _kill_group(stop_timeout, None)  # what the command left behind goes too
            return _status(code)
        if stop.is_set():
            break
        if poller is not None:
            if poller.poll(200):
                break
        else:
            time.sleep(0.2)
            if not process_alive(owner):
                break
    _kill_group(stop_timeout, child)
    return _status(child.returncode) if child.returncode is not None else 143


def _status(code: int) -> int:
    """A child's return code as a shell would report it (killed by signal N: 128 + N)."""
    return 128 - code if code < 0 else code


def main(argv: list[str] | None = None) -> None:
    """``python -m driftloop.core.processes --owner PID [--stop-timeout S] -- CMD...`` (the watcher)."""
    import argparse

    p = argparse.ArgumentParser(prog=f"python -m {WATCHER_MODULE}")
    p.add_argument("--owner", type=int, required=True)
    p.add_argument("--stop-timeout", type=float, default=10.0)
    p.add_argument("cmd", nargs=argparse.REMAINDER)
    args = p.parse_args(argv)
    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    if not cmd:
        p.error("no command to run")
    sys.exit(_watch(args.owner, cmd, args.stop_timeout))


if __name__ == "__main__":
    main()
