"""A fork-server for kfp.local's tasks: import the step libraries once, fork each task.

kfp.local (SubprocessRunner) starts every task as ``sh -ec '<script>' <component source> <args>``
where the script writes the component's source to ``$(mktemp -d)/ephemeral_component.py`` and runs
``_KFP_RUNTIME=true python -m kfp.dsl.executor_main --component_module_path <that file> <args>``.
A fresh interpreter then imports kfp, pandas, scikit-learn and MLflow again — seconds per task.

This server is started at a process's first local run of a workspace and kept warm for its later
runs (:mod:`pipelines.runner`; this file run as ``__main__`` with ``--socket PATH`` and
``_KFP_RUNTIME=true`` — not through the ``pipelines`` package, whose ``__init__`` imports kfp's
compiler — through :func:`driftloop.core.processes.spawn` with ``kill_group``, so it and every task it
forks die with the process running the pipelines). It answers as soon as kfp's executor is
imported, and a loader it forks imports the rest on another core and then takes over (:func:`serve`):
a cold start costs the first tasks no wait. Those imports happen with ``_KFP_RUNTIME=true``, as a
task sees kfp, and open nothing: no MLflow store, SQLite connection, file or Python thread, so a
fork shares none (the only other threads are idle native pools of OpenBLAS and jemalloc, which
handle fork themselves; OpenMP starts its pool at the first parallel region, in the task).
For each task the runner connects, sends the command, environment and working
directory with the write end of the task's output pipe (``SCM_RIGHTS``); the server forks a child
that does exactly what the script does — writes the source to a fresh temporary directory, sets
argv, environment and cwd, points fds 1 and 2 at the pipe — and runs ``kfp.dsl.executor_main``
as ``__main__`` (KFP's own executor, the code a pod runs). The server answers with the child's
exit status as a shell reports it; tasks may run side by side (a ``ParallelFor``).

Only the exact shape kfp.local's lightweight components produce is accepted
(:func:`parse_task_command`); the runner starts anything else as a process of its own.
"""

from __future__ import annotations

import array
import atexit
import contextlib
import importlib
import json
import os
import select
import signal
import socket
import struct
import sys
import traceback
from typing import Any

__all__ = ["PRELOAD", "parse_task_command", "send_task", "read_status", "serve"]

# What the steps import (kfp's executor first, as a task sees it: the server answers once it is imported; the
# loader imports the rest before it takes over).
PRELOAD = (
    "kfp.dsl.executor_main",
    "pandas", "pyarrow.parquet", "numpy", "joblib",
    "sklearn.pipeline", "sklearn.compose", "sklearn.preprocessing", "sklearn.impute", "sklearn.ensemble",
    "sklearn.linear_model", "sklearn.metrics", "sklearn.model_selection",
    "mlflow", "mlflow.sklearn", "mlflow.models", "mlflow.tracking",
    "components._runtime", "components.ingest", "components.validate", "components.train", "components.evaluate",
    "components.register", "components.deploy", "serving.rollout", "httpx",
    "driftloop.core.registry", "driftloop.core.config",
    # what MLflow imports on a task's first store access and model logging (about 1 s a task otherwise):
    # the SQLAlchemy stores (alembic, sqlalchemy's sqlite dialect, cryptography), pyfunc, tracing's
    # exporters, GitPython (run source tags) and skops (its import pulls in pytest through sklearn)
    "mlflow.store.tracking.sqlalchemy_store", "mlflow.store.model_registry.sqlalchemy_store", "alembic.command",
    "sqlalchemy.dialects.sqlite", "mlflow.pyfunc", "mlflow.tracing.export", "mlflow.tracing.processor", "git",
    "skops.io", "pyarrow.dataset", "multiprocessing.dummy", "narwhals._pandas_like.dataframe", "netrc",
)

_SCRIPT_HEAD = 'program_path=$(mktemp -d)\n\nprintf "%s" "$0" > "$program_path/ephemeral_component.py"\n_KFP_RUNTIME=true '
_SCRIPT_TAIL = ' -m kfp.dsl.executor_main'
_MODULE_ARG = '--component_module_path'
_HEADER = struct.Struct("!I")


def parse_task_command(cmd: list[str]) -> tuple[str, list[str]] | None:
    """``(component source, executor args)`` of a kfp.local lightweight task, or None for any other command.

    The script must be kfp's own (only the Python executable differs, and it must be this one).
    """
    if len(cmd) < 4 or cmd[0] != "sh" or cmd[1] != "-ec":
        return None
    script = cmd[2]
    if not script.startswith(_SCRIPT_HEAD):
        return None
    rest = script[len(_SCRIPT_HEAD):]
    python, sep, tail = rest.partition(_SCRIPT_TAIL)
    if not sep or python not in (sys.executable, "python3"):
        return None
    if tail.split() != [_MODULE_ARG, '"$program_path/ephemeral_component.py"', '"$@"']:
        return None
    return cmd[3], list(cmd[4:])


# -- the runner's side ----------------------------------------------------------------------------
def send_task(sock_path: str, cmd: list[str], env: dict[str, str], cwd: str, out_fd: int) -> socket.socket:
    """Ask the server at ``sock_path`` to run ``cmd``; returns the connection that will carry its exit status."""
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    conn.connect(sock_path)
    body = json.dumps({"cmd": cmd, "env": env, "cwd": cwd}).encode()
    fds = array.array("i", [out_fd])
    conn.sendmsg([_HEADER.pack(len(body))], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)])
    conn.sendall(body)
    return conn


def read_status(conn: socket.socket) -> int:
    """The task's exit status (blocks until it ends); 1 with a broken connection (the server died)."""
    data = b""
    with contextlib.suppress(OSError):
        while len(data) < 4:
            chunk = conn.recv(4 - len(data))
            if not chunk:
                break
            data += chunk
    conn.close()
    return struct.unpack("!i", data)[0] if len(data) == 4 else 1


# -- the server's side ----------------------------------------------------------------------------
def _receive(conn: socket.socket) -> tuple[dict[str, Any], int]:
    fds = array.array("i")
    msg, ancdata, _flags, _addr = conn.recvmsg(_HEADER.size, socket.CMSG_LEN(fds.itemsize))
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(data[: len(data) - (len(data) % fds.itemsize)])
    if len(msg) != _HEADER.size or len(fds) != 1:
        for fd in fds:
            os.close(fd)
        raise ValueError("a task request carries a length and one file descriptor")
    (size,) = _HEADER.unpack(msg)
    body = b""
    while len(body) < size:
        chunk = conn.recv(size - len(body))
        if not chunk:
            raise ValueError("the task request ended early")
        body += chunk
    return json.loads(body), fds[0]


def _run_task(request: dict[str, Any], out_fd: int, die_with_server: Any) -> int:
    """In the forked child: what kfp's ``sh -ec`` script and ``python -m kfp.dsl.executor_main`` do."""
    import runpy
    import tempfile

    die_with_server()  # the server's end is the task's end
    for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGCHLD, signal.SIGPIPE):
        signal.signal(sig, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    os.dup2(out_fd, 1)
    os.dup2(out_fd, 2)
    os.close(out_fd)
    sys.stdout = sys.__stdout__ = open(1, "w", buffering=1, closefd=False)  # noqa: SIM115
    sys.stderr = sys.__stderr__ = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115
    parsed = parse_task_command(request["cmd"])
    assert parsed is not None  # checked before the fork
    source, args = parsed
    os.environ.clear()
    os.environ.update(request["env"])
    os.environ["_KFP_RUNTIME"] = "true"
    os.chdir(request["cwd"])
    program_path = tempfile.mkdtemp()
    module_path = os.path.join(program_path, "ephemeral_component.py")
    with open(module_path, "w") as fh:
        fh.write(source)
    sys.argv = [sys.executable, _MODULE_ARG, module_path, *args]
    sys.path[0] = request["cwd"]  # ``python -m`` puts the working directory first
    code = 0
    try:
        runpy.run_module("kfp.dsl.executor_main", run_name="__main__", alter_sys=True)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        if exc.code is not None and not isinstance(exc.code, int):
            print(exc.code, file=sys.stderr)
    except KeyboardInterrupt:
        traceback.print_exc()
        code = 130
    except BaseException:  # noqa: BLE001 (an interpreter prints the traceback and exits 1)
        traceback.print_exc()
        code = 1
    with contextlib.suppress(BaseException):
        atexit._run_exitfuncs()  # what a fresh interpreter would run on exit
    with contextlib.suppress(BaseException):
        sys.stdout.flush()
        sys.stderr.flush()
    return code


def _status(wait_status: int) -> int:
    if os.WIFSIGNALED(wait_status):
        return 128 + os.WTERMSIG(wait_status)
    return os.WEXITSTATUS(wait_status)


def _preload() -> None:
    for name in PRELOAD:
        try:
            importlib.import_module(name)
        except ImportError as exc:  # an optional library; the task imports it itself if it needs it
            print(f"task server: not preloaded: {name}: {exc}", file=sys.stderr, flush=True)


class _Server:
    """One serving process's accept loop: a forked child per request, several at a time (kfp.local runs a
    ``ParallelFor``'s tasks in threads), each child's end seen through its pidfd.

    ``handover``: a pipe the loader writes one byte to once it has preloaded everything; this process then
    accepts no more requests and returns once its own tasks have ended (the loader serves from then on).
    """

    def __init__(self, listener: socket.socket, handover: int | None = None) -> None:
        self.listener, self.handover = listener, handover
        self.running: dict[int, tuple[int, socket.socket]] = {}  # pidfd -> (pid, connection)

    def loop(self) -> None:
        accepting = True
        while accepting or self.running:
            watch: list[Any] = list(self.running)
            if accepting:
                watch.append(self.listener)
                if self.handover is not None:
                    watch.append(self.handover)
            try:
                readable, _, _ = select.select(watch, [], [])
            except InterruptedError:
                continue
            for item in readable:
                if item is self.listener:
                    self._accept()
                elif item == self.handover:
                    if os.read(self.handover, 1):  # the loader is ready: it takes the requests from here on
                        accepting = False
                    os.close(self.handover)  # (nothing read: the loader died; this process goes on serving)
                    self.handover = None
                else:
                    self._finish(item)

    def _accept(self) -> None:
        try:
            conn, _ = self.listener.accept()
        except (BlockingIOError, InterruptedError):  # the other serving process took it
            return
        conn.setblocking(True)
        try:
            request, out_fd = _receive(conn)
            if parse_task_command(request["cmd"]) is None:
                os.close(out_fd)
                raise ValueError("not a kfp.local lightweight task")
        except (ValueError, KeyError, OSError) as exc:
            print(f"task server: refused a request: {exc}", file=sys.stderr, flush=True)
            with contextlib.suppress(OSError):
                conn.sendall(struct.pack("!i", 127))
            conn.close()
            return
        from driftloop.core.processes import die_with_parent

        die_with_server = die_with_parent(signal.SIGKILL)  # made here: it checks for this pid
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                self._close_inherited(conn)
                code = _run_task(request, out_fd, die_with_server)
            finally:
                os._exit(code)
        os.close(out_fd)
        try:
            pidfd = os.pidfd_open(pid)
        except (AttributeError, OSError):  # no pidfd (kernel < 5.3): this task alone, as before
            _, wait_status = os.waitpid(pid, 0)
            _answer(conn, wait_status)
            return
        self.running[pidfd] = (pid, conn)

    def _close_inherited(self, conn: socket.socket) -> None:
        """In a forked task: what belongs to the server (listener, other tasks' connections and pidfds)."""
        self.listener.close()
        conn.close()
        for pidfd, (_pid, other) in self.running.items():
            os.close(pidfd)
            other.close()
        if self.handover is not None:
            os.close(self.handover)

    def _finish(self, pidfd: int) -> None:
        pid, conn = self.running.pop(pidfd)
        os.close(pidfd)
        _, wait_status = os.waitpid(pid, 0)
        _answer(conn, wait_status)


def _answer(conn: socket.socket, wait_status: int) -> None:
    with contextlib.suppress(OSError):
        conn.sendall(struct.pack("!i", _status(wait_status)))
    conn.close()


def serve(sock_path: str) -> None:
    """Listen on ``sock_path`` as soon as kfp's executor is imported, and preload the rest in a loader.

    The first tasks of a cold start do not wait for the step libraries: this process forks them with
    kfp's executor alone (a task imports what else it needs, as a fresh interpreter would, and much
    cheaper), while a forked loader imports :data:`PRELOAD` on another core. Once loaded, the loader
    takes over the same listening socket and forks every later task with everything imported; this
    process lets its own tasks end and then waits on the loader (and ends with it). The loader and
    every task die with the process they were forked from (``PR_SET_PDEATHSIG``).
    """
    from driftloop.core.processes import die_with_parent

    os.environ["_KFP_RUNTIME"] = "true"
    importlib.import_module(PRELOAD[0])  # kfp's executor: what every task runs
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(sock_path + ".tmp")
    listener.listen(64)
    listener.setblocking(False)  # two processes may wait on it during the handover: a lost race is no hang
    os.rename(sock_path + ".tmp", sock_path)  # the path appears when the server answers
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    ready_r, ready_w = os.pipe()
    die_with_server = die_with_parent(signal.SIGKILL)
    loader = os.fork()
    if loader == 0:
        code = 1
        try:
            die_with_server()
            os.close(ready_r)
            _preload()
            open(sock_path + ".loaded", "w").close()  # noqa: SIM115 (a marker, closed at once)
            print(f"task server {os.getpid()}: ready, {len(PRELOAD)} modules preloaded, {_threads()} native threads",
                  file=sys.stderr, flush=True)
            os.write(ready_w, b"1")
            os.close(ready_w)
            _Server(listener).loop()
            code = 0
        finally:
            os._exit(code)
    os.close(ready_w)
    _Server(listener, ready_r).loop()
    _, wait_status = os.waitpid(loader, 0)
    sys.exit(_status(wait_status))


def _threads() -> str:
    return str(len(os.listdir("/proc/self/task"))) if os.path.isdir("/proc/self/task") else "?"


def main(argv: list[str] | None = None) -> None:
    import argparse

    p = argparse.ArgumentParser(prog="task_server.py")
    p.add_argument("--socket", required=True)
    serve(p.parse_args(argv).socket)


if __name__ == "__main__":
    main()
