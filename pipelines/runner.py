"""The pipeline-runner adapter: one interface, two homes.

Both run any pipeline — ``run(pipeline, arguments, request)``, the pipeline described by a
:class:`~driftloop.core.runs.Pipeline` — and know none in particular. ``LocalRunner`` runs it
with ``kfp.local`` (SubprocessRunner in this environment, no cluster). ``KfpRunner`` compiles
it, uploads it as a version of a stably named pipeline and starts a run in a named experiment
through ``kfp.Client``. ``runner_for(settings)`` picks one from the configuration; the CLI, the
drift trigger and the scheduler all go through it. A pipeline module describes its pipeline, its
arguments and its steps' names (:func:`pipelines.training.run_training`,
:func:`pipelines.scoring.run_scoring`); the runners take them as given.

A request is checked before anything starts (:func:`check_request`: the trigger and the data
window). On the embedded default every task process starts through
:func:`driftloop.core.processes.spawn`, so no task outlives the process running the pipeline
however that one ends, and kfp.local's output (each task's executor input and logs) goes to
``<workspace>/pipeline-root/logs/<prefix><request-id>.log``, not to the terminal: a failed run reports
one line naming the step and the error, and where the full log is.

kfp.local's lightweight tasks are forked by a task server (:mod:`pipelines.task_server`) that the
process starts at its first local run and keeps warm for its later runs of the same workspace
(:class:`_WarmServer`: the scheduler, the retraining worker and the demo run many): the step
libraries are imported once per process, not once per task or per run. ``DRIFTLOOP_TASK_SERVER=0``
starts every task as a fresh interpreter instead, kfp.local's own way.

One run at a time per workspace: :meth:`LocalRunner.run` holds the workspace lock
(:func:`driftloop.core.workspace.workspace_lock`) for the whole run, deploy step included. The
trigger's worker and the scheduler wait their turn (the default); the CLI refuses a second run
unless ``--wait``. After a failed run, :func:`registry_outcome` reads back what the run left in
the registry, so the message says what is really there.
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from components._runtime import ERROR_FILE_ENV
from driftloop.core.config import Settings
from driftloop.core.errors import DriftloopError, PipelineRunError, RegistryError
from driftloop.core.files import private_dir
from driftloop.core.processes import spawn, stop_process
from driftloop.core.runs import Pipeline, PipelineRunner, RunRequest, RunResult
from driftloop.core.workspace import workspace_lock
from pipelines import task_server
from pipelines.task_server import parse_task_command, read_status, send_task

TASK_SERVER_ENV = "DRIFTLOOP_TASK_SERVER"

__all__ = ["Pipeline", "RunRequest", "RunResult", "PipelineRunner", "LocalRunner", "KfpRunner", "runner_for",
           "check_request", "check_trigger", "check_window", "TaskEvent", "task_server_enabled", "ensure_experiment",
           "registry_outcome", "plain_text"]


def check_trigger(trigger: str) -> None:
    """``manual``, ``schedule:<name>``, ``drift:<alert-id>`` or ``quality:<alert-id>``; anything else is refused."""
    if trigger != "manual" and not trigger.startswith(("schedule:", "drift:", "quality:")):
        raise PipelineRunError(f"trigger {trigger!r} must be manual, schedule:<name>, drift:<alert-id> or "
                               "quality:<alert-id>")
    if trigger.endswith(":"):
        raise PipelineRunError(f"trigger {trigger!r} names no schedule or alert")


def check_window(window_start: str | None, window_end: str | None, *, names: tuple[str, str] = (
        "window_start", "window_end")) -> None:
    """Both bounds, when given, are ISO times and the start comes before the end."""
    import pandas as pd

    bounds = []
    for name, value in zip(names, (window_start, window_end)):
        if value is None:
            bounds.append(None)
            continue
        try:
            ts = pd.Timestamp(value)
            if pd.isna(ts):
                raise ValueError("not a time")
        except (ValueError, TypeError) as exc:
            raise PipelineRunError(f"{name} {value!r} is not an ISO time (e.g. 2026-01-31 or "
                                   "2026-01-31T12:00:00Z)") from exc
        bounds.append(ts.tz_localize("UTC") if ts.tzinfo is None else ts.tz_convert("UTC"))
    if bounds[0] is not None and bounds[1] is not None and bounds[0] >= bounds[1]:
        raise PipelineRunError(f"{names[0]} {window_start} is not before {names[1]} {window_end}")


def check_request(request: RunRequest) -> None:
    """Refuse a request before anything starts: a bad trigger or data window."""
    check_trigger(request.trigger)
    check_window(request.window_start, request.window_end)


@dataclass
class TaskEvent:
    """One task of a run changing state: what the progress view shows as one line."""

    task: str
    state: str  # running | succeeded | failed | skipped
    seconds: float = 0.0
    detail: str = ""


ProgressFn = Callable[[TaskEvent], None]


def _task_of(cmd: list[str]) -> tuple[str, str] | None:
    """(function name, executor output file) of a kfp.local task command, from its executor arguments."""
    try:
        func = cmd[cmd.index("--function_to_execute") + 1]
        executor_input = json.loads(cmd[cmd.index("--executor_input") + 1])
        return func, executor_input.get("outputs", {}).get("outputFile", "")
    except (ValueError, IndexError, TypeError, AttributeError):
        return None


class _Watched:
    """A task process as kfp.local uses it (``with``, ``stdout``, ``wait``), reporting start and end under the
    names and with the details its pipeline gives (:attr:`Pipeline.step_names`, :attr:`Pipeline.step_detail`)."""

    def __init__(self, proc: Any, func: str, output_file: str, progress: ProgressFn, pipeline: Pipeline) -> None:
        self._proc, self._func, self._output_file, self._progress = proc, func, output_file, progress
        self._pipeline = pipeline
        self._start = time.monotonic()
        self._reported = False
        progress(TaskEvent(pipeline.step_names.get(func, func), "running"))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._proc, name)

    def __enter__(self) -> "_Watched":
        self._proc.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._proc.__exit__(*exc)
        self._report(self._proc.returncode if self._proc.returncode is not None else 1)

    def wait(self, timeout: float | None = None) -> int:
        code = self._proc.wait(timeout) if timeout is not None else self._proc.wait()
        self._report(code)
        return code

    def _report(self, code: int) -> None:
        if self._reported:
            return
        self._reported = True
        seconds = time.monotonic() - self._start
        name = self._pipeline.step_names.get(self._func, self._func)
        if code != 0:
            detail = _read_error(os.environ.get(ERROR_FILE_ENV, "")) or {}
            self._progress(TaskEvent(name, "failed", seconds, detail.get("message", f"exit status {code}")))
            return
        try:
            detail = self._pipeline.step_detail(self._func, json.loads(Path(self._output_file).read_text()))
        except (OSError, ValueError, TypeError, AttributeError):
            detail = ""
        self._progress(TaskEvent(name, "succeeded", seconds, detail))


class _ForkedTask:
    """A task forked by the task server, with the part of ``subprocess.Popen`` that kfp.local uses."""

    def __init__(self, conn: Any, stdout: Any) -> None:
        self._conn, self.stdout, self.returncode, self.pid = conn, stdout, None, None
        self.args: list[str] = []

    def wait(self, timeout: float | None = None) -> int:
        if self.returncode is None:
            self.returncode = read_status(self._conn)
        return self.returncode

    def poll(self) -> int | None:
        return self.returncode

    def __enter__(self) -> "_ForkedTask":
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.stdout is not None:
            self.stdout.close()
        self.wait()


_RUN_FILE = "import runpy, sys; sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')"


class _TaskServer:
    """The fork-server (:mod:`pipelines.task_server`): started once, forks every task."""

    def __init__(self, log_file: Any) -> None:
        self._dir = tempfile.mkdtemp(prefix="driftloop-tasks-")  # 0700: only this user can connect
        self.socket_path = os.path.join(self._dir, "tasks.sock")
        # Run as a file, not ``-m pipelines.task_server``: the package's __init__ would import kfp's compiler,
        # while a task sees kfp as the runtime build (``_KFP_RUNTIME=true``), and so must the server.
        self.proc = spawn([sys.executable, "-c", _RUN_FILE, str(Path(task_server.__file__).resolve()),
                           "--socket", self.socket_path], kill_group=True, stdout=log_file, stderr=log_file,
                          env={**os.environ, "_KFP_RUNTIME": "true"})
        self.usable = True

    def ready(self, timeout: float = 300.0) -> bool:
        """True once the server answers (its socket appears); False if it died (tasks then start on their own)."""
        return self._wait_for(self.socket_path, timeout)

    def loaded(self, timeout: float = 300.0) -> bool:
        """True once the server's loader has imported every step library and serves (or False, as :meth:`ready`)."""
        return self._wait_for(self.socket_path + ".loaded", timeout)

    def _wait_for(self, path: str, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while self.usable and not os.path.exists(path):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                log.warning("the task server did not start; each task starts a process of its own")
                self.usable = False
            else:
                time.sleep(0.01)
        return self.usable

    def alive(self) -> bool:
        return self.usable and self.proc.poll() is None

    def start(self, cmd: list[str], env: dict[str, str] | None, cwd: str | None) -> _ForkedTask:
        read_fd, write_fd = os.pipe()
        try:
            conn = send_task(self.socket_path, cmd, dict(os.environ) if env is None else dict(env), cwd or os.getcwd(),
                             write_fd)
        except OSError:
            os.close(read_fd)
            raise
        finally:
            os.close(write_fd)
        return _ForkedTask(conn, open(read_fd, "r", buffering=1))  # noqa: SIM115 (closed by __exit__)

    def close(self) -> None:
        stop_process(self.proc.pid, timeout=5.0)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(5.0)
        shutil.rmtree(self._dir, ignore_errors=True)


class _WarmServer:
    """The process's task server, kept warm between local runs: the scheduler, the retraining worker and the
    demo start many runs in one process, and only the first pays the server's start.

    One at a time, for one workspace (its log is ``<pipeline-root>/logs/task-server.log``) and the
    ``PYTHONPATH`` it was started with (a task's ``sys.path`` comes from the server); a run of another
    workspace replaces it. Only called under ``_KFP_LOCAL`` (one local run at a time per process), so a
    server is never replaced while a run uses it. It stops with the process (``atexit``), and dies with
    it however the process ends (``spawn`` with ``kill_group``).
    """

    def __init__(self) -> None:
        self.server: _TaskServer | None = None
        self.key: tuple[str, str] | None = None

    def get(self, pipeline_root: Path) -> _TaskServer:
        key = (str(pipeline_root.resolve()), os.environ.get("PYTHONPATH", ""))
        if self.server is not None and (self.key != key or not self.server.alive()):
            self.close()
        if self.server is None:
            log_path = pipeline_root / "logs" / "task-server.log"
            private_dir(log_path.parent)
            with open(log_path, "a") as log_file:  # the server holds its own copy
                self.server, self.key = _TaskServer(log_file), key
        return self.server

    def close(self) -> None:
        if self.server is not None:
            self.server.close()
        self.server, self.key = None, None


_warm = _WarmServer()
atexit.register(_warm.close)


@dataclass
class _Active:
    server: _TaskServer | None = None
    progress: ProgressFn | None = None
    pipeline: Pipeline | None = None


_active = _Active()


class _TaskSubprocess:
    """What kfp.local's task handler sees as ``subprocess``: its ``Popen`` goes through ``spawn``.

    A task is ``sh -c '... python -m kfp.dsl.executor_main ...'``; with ``kill_group`` the shell
    and the Python under it end together with the process running the pipeline. While a run has
    a task server, a lightweight task is forked by it instead (same executor, same outputs).
    """

    def __getattr__(self, name: str) -> Any:
        return getattr(subprocess, name)

    @staticmethod
    def Popen(cmd: Any, **kwargs: Any) -> Any:  # noqa: N802 (subprocess's name)
        server, progress, pipeline = _active.server, _active.progress, _active.pipeline
        proc: Any = None
        if (server is not None and parse_task_command(list(cmd)) is not None
                and kwargs.get("stdout") == subprocess.PIPE and kwargs.get("stderr") == subprocess.STDOUT
                and kwargs.get("text") and set(kwargs) <= {"stdout", "stderr", "text", "bufsize", "env", "cwd"}
                and server.ready()):
            try:
                proc = server.start(list(cmd), kwargs.get("env"), kwargs.get("cwd"))
            except OSError as exc:
                log.warning("task server unreachable (%s); the task starts a process of its own", exc)
                server.usable = False
        if proc is None:
            proc = spawn(cmd, kill_group=True, **kwargs)
        task = _task_of(list(cmd)) if progress is not None and pipeline is not None else None
        return _Watched(proc, task[0], task[1], progress, pipeline) if task and progress and pipeline else proc


def _tasks_through_spawn() -> None:
    from kfp.local import subprocess_task_handler

    if not isinstance(subprocess_task_handler.subprocess, _TaskSubprocess):
        subprocess_task_handler.subprocess = _TaskSubprocess()


@contextlib.contextmanager
def _tasks_for_run(server: _TaskServer | None, progress: ProgressFn | None, pipeline: Pipeline):
    """While ``pipeline`` runs: the task server its tasks are forked by (if any) and where task start/end events go."""
    previous = (_active.server, _active.progress, _active.pipeline)
    _active.server, _active.progress, _active.pipeline = server, progress, pipeline
    try:
        yield
    finally:
        _active.server, _active.progress, _active.pipeline = previous


def ensure_experiment(settings: Settings) -> None:
    """The MLflow experiment with the workspace's artifact folder, made before a run's first task (a pipeline's
    ``prepare``, for the pipelines whose steps track to MLflow): a store that cannot be opened stops the run
    before anything starts. The runner itself does not call it — a pipeline that tracks nothing does not pay
    for importing MLflow."""
    from driftloop.core.registry import Registry

    try:
        Registry.from_settings(settings).experiment_id()
    except RegistryError as exc:
        raise PipelineRunError(f"cannot start the run: {exc}") from exc


def task_server_enabled() -> bool:
    """``DRIFTLOOP_TASK_SERVER=0`` starts every task as a fresh interpreter (kfp.local's own way)."""
    return os.environ.get(TASK_SERVER_ENV, "1").strip().lower() not in ("0", "false", "no", "off")


log = logging.getLogger(__name__)


class LocalRunner:
    """Runs any pipeline on this machine with ``kfp.local`` (the embedded default)."""

    home = "local"

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    @property
    def pipeline_root(self) -> Path:
        return self.settings.workspace_dir / "pipeline-root"

    def log_path(self, request: RunRequest, pipeline: Pipeline | None = None) -> Path:
        """Where kfp.local's output of this run goes."""
        prefix = pipeline.log_prefix if pipeline is not None else ""
        return self.pipeline_root / "logs" / f"{prefix}{request.request_id}.log"

    def run(self, pipeline: Pipeline, arguments: dict[str, Any], request: RunRequest, *, wait: bool = True,
            progress: ProgressFn | None = None, echo: Any = None,
            on_wait: Callable[[str], None] | None = None) -> RunResult:
        """Run ``pipeline`` with ``arguments``; ``progress`` gets each task's start and end, ``echo`` a copy of the task output.

        The run holds the workspace lock throughout: with ``wait`` a run already in progress in the
        workspace is waited for (``on_wait`` gets the message saying whom for), else
        :class:`~driftloop.core.errors.WorkspaceBusy` is raised before anything starts.
        """
        with workspace_lock(self.settings.workspace_dir, request.request_id, wait=wait, on_wait=on_wait), _KFP_LOCAL:
            # a cold task server imports the step libraries while this process prepares the run
            server = _warm.get(self.pipeline_root) if task_server_enabled() else None
            pipeline.prepare()
            log_path = self.log_path(request, pipeline)
            private_dir(log_path.parent)
            with _tasks_for_run(server, progress, pipeline):
                return self._run(pipeline, arguments, request, log_path, echo)

    def _run(self, pipeline: Pipeline, arguments: dict[str, Any], request: RunRequest, log_path: Path,
             echo: Any) -> RunResult:
        import kfp.local

        private_dir(self.pipeline_root)
        kfp.local.init(runner=kfp.local.SubprocessRunner(use_venv=False), pipeline_root=str(self.pipeline_root),
                       raise_on_error=True)
        _tasks_through_spawn()
        pipeline_func = pipeline.build()
        # Display names, resources and accelerators matter on Kubeflow; kfp.local says so once per task.
        warnings.filterwarnings("ignore", message=".*have no effect in the current local runner")
        # The step image is this environment's own package set on the embedded default.
        warnings.filterwarnings("ignore", message=".*custom or non-Python base image", category=RuntimeWarning)
        with _error_file() as err_path:
            try:
                with _output_to(log_path, echo), _job_id_is(request.request_id):
                    pipeline_func(**arguments)
            except RuntimeError as exc:
                detail = _read_error(err_path)
                message = f"step {detail['step']!r} failed: {detail['message']}" if detail else _first_line(exc)
                return RunResult(request.request_id, request.request_id, "FAILED", self.home,
                                 error=plain_text(f"{message} (full log: {log_path})"))
        return RunResult(request.request_id, request.request_id, "SUCCEEDED", self.home,
                         summary=pipeline.summarize(request.request_id))


# kfp.local keeps its configuration (kfp.local.init) in module globals, and a local run also swaps
# print, the root log handlers and the orchestrator's id maker (below) for its duration: one local run
# at a time per process (runs of other workspaces in other threads wait here; other processes are free).
_KFP_LOCAL = threading.RLock()


class _PlaceholderIds:
    """What kfp.local's pipeline orchestrator sees as ``placeholder_utils``: the run's pipeline job id
    (``dsl.PIPELINE_JOB_ID_PLACEHOLDER``, recorded by the steps as the pipeline run id) is the request
    id -- the id that names the run's log file and that ``driftloop alerts`` and ``driftloop lineage``
    show -- instead of the random 8-digit number kfp.local makes up per run."""

    def __init__(self, module: Any, job_id: str) -> None:
        self._module, self._job_id = module, job_id

    def __getattr__(self, name: str) -> Any:
        return getattr(self._module, name)

    def make_random_id(self) -> str:
        return self._job_id


@contextlib.contextmanager
def _job_id_is(job_id: str):
    from kfp.local import pipeline_orchestrator

    previous = pipeline_orchestrator.placeholder_utils
    pipeline_orchestrator.placeholder_utils = _PlaceholderIds(previous, job_id)
    try:
        yield
    finally:
        pipeline_orchestrator.placeholder_utils = previous


@contextlib.contextmanager
def _error_file():
    fd, path = tempfile.mkstemp(prefix="driftloop-error-", suffix=".json")
    os.close(fd)
    old = os.environ.get(ERROR_FILE_ENV)
    os.environ[ERROR_FILE_ENV] = path
    try:
        yield path
    finally:
        if old is None:
            os.environ.pop(ERROR_FILE_ENV, None)
        else:
            os.environ[ERROR_FILE_ENV] = old
        with contextlib.suppress(OSError):
            os.unlink(path)


class _Tee:
    """A text stream writing to a file and echoing to another stream (``-v``: the log and the terminal)."""

    def __init__(self, *streams: Any) -> None:
        self._streams = streams

    def write(self, text: str) -> int:
        for stream in self._streams:
            stream.write(text)
        return len(text)

    def flush(self) -> None:
        for stream in self._streams:
            stream.flush()


@contextlib.contextmanager
def _output_to(path: Path, echo: Any = None):
    """Everything kfp.local prints or logs (root logger) while the pipeline runs goes to ``path`` (and ``echo``).

    kfp.local runs a ``ParallelFor``'s tasks in threads, and each swaps the root logger's handlers and
    ``builtins.print`` (an indenting one) for its time and puts back what it found: threads that overlap
    can leave another task's handler or print in place. Both are put back here when the run ends, so no
    task output reaches the terminal afterwards."""
    import builtins

    root = logging.getLogger()
    printer = builtins.print
    with open(path, "a", buffering=1) as fh:
        out: Any = _Tee(fh, echo) if echo is not None else fh
        try:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
                yield from _root_logging_to(root, out)
        finally:
            builtins.print = printer


def _root_logging_to(root: logging.Logger, out: Any):
    handlers, level = root.handlers[:], root.level
    handler = logging.StreamHandler(out)
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)
    try:
        yield
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)


def _connection_reason(exc: BaseException) -> str:
    """The cause of a failed connection in a few words (urllib3's retry error wraps it in the URL and pool)."""
    reason = getattr(exc, "reason", None)  # urllib3's MaxRetryError: the last attempt's error
    text = str(reason if isinstance(reason, BaseException) else exc)
    if "[Errno" in text:  # "HTTPConnection(host=..., port=...): Failed to establish ...: [Errno 111] Connection refused"
        return text.rsplit("]", 1)[-1].strip().lower()
    return _first_line(reason if isinstance(reason, BaseException) else exc)


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in plain_text(str(exc)).splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


def plain_text(text: str) -> str:
    """``text`` without terminal escape codes (kfp.local colours its task and status names in its errors)."""
    from rich.text import Text

    return Text.from_ansi(text).plain if "\x1b" in text else text


def registry_outcome(settings: Settings, request_id: str) -> str:
    """What a run left in the registry, read back from it: the true last line after a failed run.

    A step can fail after the register step (deploy, say): then a version exists and may hold an
    alias and a canary, and the message must say so rather than claim nothing changed.
    """
    from driftloop.core.registry import TAG, Registry

    name = settings.mlflow.model_name
    try:
        registry = Registry.from_settings(settings)
        runs = registry.find_runs(f"tags.`{TAG.REQUEST}` = '{request_id}'", max_results=1)
        info = registry.version_of_run(name, runs[0].info.run_id) if runs else None
    except DriftloopError as exc:
        return f"What this run registered is unknown: the registry cannot be read ({exc})."
    if info is None:
        return "Nothing was registered; the registry's aliases are unchanged."
    aliases = f"holds alias {', '.join(info.aliases)}" if info.aliases else "holds no alias"
    text = f"{name} version {info.version} was registered and {aliases}."
    canary = _canary_of(settings, name, info.version)
    return f"{text} {canary}" if canary else text


def _canary_of(settings: Settings, name: str, version: str) -> str:
    """A note when ``version`` is the canary of a rollout in progress in the workspace."""
    from serving.rollout import RolloutStore

    try:
        state = RolloutStore(settings.workspace_dir / "rollout", name).load()
    except DriftloopError:
        return ""
    if state is None or state.done or str(state.canary_version) != str(version):
        return ""
    return (f"It is the canary of a rollout ({state.status}, {state.weight} % of traffic): "
            "see `driftloop rollout status`.")


def _read_error(path: str) -> dict[str, str] | None:
    try:
        text = Path(path).read_text()
        return json.loads(text) if text.strip() else None
    except (OSError, ValueError):
        return None


class KfpRunner:
    """Submits the pipeline to Kubeflow Pipelines through ``kfp.Client``.

    The compiled pipeline is uploaded as a version of a stably named pipeline
    (version name = content hash, so re-submitting the same pipeline reuses it) and
    runs in a named experiment. The MLflow run records the KFP run id (the register
    step's ``PIPELINE_JOB_ID`` placeholder resolves to it on the cluster).
    """

    home = "kubeflow"

    def __init__(self, settings: Settings, client: Any | None = None) -> None:
        self.settings = settings
        self._client = client

    @property
    def client(self) -> Any:
        if self._client is None:
            import kfp

            try:
                self._client = kfp.Client(host=self.settings.kfp.host, namespace=self.settings.kfp.namespace,
                                          existing_token=os.environ.get("KFP_TOKEN") or None)
            except Exception as exc:  # kfp raises bare exceptions for unreachable hosts and auth failures
                raise PipelineRunError(f"cannot reach Kubeflow Pipelines at {self.settings.kfp.host}: "
                                       f"{_connection_reason(exc)}") from exc
        return self._client

    def _call(self, what: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except PipelineRunError:
            raise
        except Exception as exc:
            raise PipelineRunError(f"{what} failed on {self.settings.kfp.host}: {type(exc).__name__}: {exc}") from exc

    def ensure_pipeline_version(self, package: Path, *, name: str, description: str) -> tuple[str, str]:
        """Upload ``package`` as a version of the pipeline named ``name``; return (pipeline_id, version_id)."""
        digest = hashlib.sha256(package.read_bytes()).hexdigest()[:12]
        version_name = f"{name}-{digest}"
        pipeline_id = self._call("looking up the pipeline", self.client.get_pipeline_id, name)
        if pipeline_id is None:
            created = self._call("uploading the pipeline", self.client.upload_pipeline, str(package), pipeline_name=name,
                                 description=description)
            pipeline_id = created.pipeline_id
        versions = self._call("listing pipeline versions", self.client.list_pipeline_versions, pipeline_id, page_size=100,
                              filter=_name_filter(version_name))
        for v in getattr(versions, "pipeline_versions", None) or []:
            if v.display_name == version_name:
                return pipeline_id, v.pipeline_version_id
        created = self._call("uploading the pipeline version", self.client.upload_pipeline_version, str(package),
                             pipeline_version_name=version_name, pipeline_id=pipeline_id)
        return pipeline_id, created.pipeline_version_id

    def upload(self, pipeline: Pipeline) -> tuple[str, str]:
        """Compile ``pipeline`` and make sure it is uploaded; return (pipeline_id, version_id)."""
        if not self.settings.mlflow.tracking_uri:
            # The embedded default is a SQLite file on this machine; pipeline pods cannot reach it.
            raise PipelineRunError(
                f"mlflow.tracking_uri is not set: runs on Kubeflow ({self.settings.kfp.host}) need an MLflow "
                "tracking server the cluster can reach (e.g. -p mlflow.tracking_uri=http://mlflow.mlflow:5000)"
            )
        with tempfile.TemporaryDirectory() as tmp:
            return self.ensure_pipeline_version(pipeline.compile(Path(tmp)), name=pipeline.name,
                                                description=pipeline.description)

    def experiment_id(self, create: bool = True) -> str | None:
        """The id of the named experiment, created when missing (or None when ``create`` is False)."""
        name = self.settings.kfp.experiment
        try:
            exp = self.client.get_experiment(experiment_name=name, namespace=self.settings.kfp.namespace)
        except ValueError as exc:
            # kfp raises ValueError("No experiment is found with name ...") when it is missing
            if not str(exc).startswith("No experiment is found"):
                raise PipelineRunError(f"experiment {name!r} on {self.settings.kfp.host}: {exc}") from exc
            if not create:
                return None
            exp = self._call("creating the experiment", self.client.create_experiment, name, namespace=self.settings.kfp.namespace)
        except PipelineRunError:
            raise
        except Exception as exc:
            raise PipelineRunError(f"looking up experiment {name!r} failed on {self.settings.kfp.host}: {exc}") from exc
        return exp.experiment_id

    def run(self, pipeline: Pipeline, arguments: dict[str, Any], request: RunRequest, *, wait: bool = False,
            timeout: int = 3600, progress: ProgressFn | None = None, poll_seconds: float | None = None) -> RunResult:
        """Start ``pipeline`` with ``arguments``; with ``wait`` follow it to the end (``progress`` gets each task's state changes)."""
        pipeline_id, version_id = self.upload(pipeline)
        experiment_id = self.experiment_id()
        job_name = f"{pipeline.name}-{request.trigger.replace(':', '-')}-{request.request_id[:8]}"
        run = self._call("starting the run", self.client.run_pipeline, experiment_id=experiment_id, job_name=job_name,
                         params=arguments, pipeline_id=pipeline_id, version_id=version_id, enable_caching=False,
                         service_account=self.settings.kfp.service_account or None)
        result = RunResult(request.request_id, run.run_id, "SUBMITTED", self.home,
                           url=f"{self.settings.kfp.host.rstrip('/')}/#/runs/details/{run.run_id}")
        if wait:
            if progress is None:
                done = self._call("waiting for the run", self.client.wait_for_run_completion, run.run_id, timeout)
            else:
                done = self._follow(run.run_id, timeout, progress, KFP_POLL_SECONDS if poll_seconds is None else poll_seconds)
            result.state = str(getattr(done, "state", "UNKNOWN"))
            if result.state == "SUCCEEDED":
                result.summary = pipeline.summarize(request.request_id)
            elif result.state in _FINAL_STATES:
                result.error = f"run {run.run_id} ended {result.state} on Kubeflow (its tasks and logs: {result.url})"
        return result

    def _follow(self, run_id: str, timeout: float, progress: ProgressFn, poll_seconds: float) -> Any:
        """Poll the run (``kfp.Client.get_run``) until it ends, reporting each task's state as it changes."""
        deadline = time.monotonic() + timeout
        seen: dict[str, str] = {}
        while True:
            run = self._call("reading the run", self.client.get_run, run_id)
            for event in _task_events(run, seen):
                progress(event)
            if str(getattr(run, "state", "")) in _FINAL_STATES:
                return run
            if time.monotonic() > deadline:
                raise PipelineRunError(f"run {run_id} did not finish within {timeout:g} s (state {run.state})")
            time.sleep(poll_seconds)


KFP_POLL_SECONDS = 5.0  # how often a followed Kubeflow run is read (kfp.Client's own wait polls as often)
# KFP v2 runtime states (V2beta1RuntimeState) -> the progress view's words
_FINAL_STATES = {"SUCCEEDED", "FAILED", "SKIPPED", "CANCELED"}
_TASK_STATES = {"RUNNING": "running", "SUCCEEDED": "succeeded", "FAILED": "failed", "SKIPPED": "skipped",
                "CANCELED": "failed", "CACHED": "succeeded"}


def _task_events(run: Any, seen: dict[str, str]) -> list[TaskEvent]:
    """New task states of a KFP run (its ``run_details.task_details``), drivers and the root left out."""
    details = getattr(getattr(run, "run_details", None), "task_details", None) or []
    events = []
    for task in sorted(details, key=lambda t: str(t.start_time or t.create_time or "")):
        name = task.display_name or ""
        if not name or name == "root" or name.endswith("-driver") or name.startswith(("condition-", "exit-handler")):
            continue
        state = _TASK_STATES.get(str(task.state or ""))
        if state is None or seen.get(task.task_id or name) == state:
            continue
        seen[task.task_id or name] = state
        seconds = 0.0
        if task.start_time and task.end_time and state != "running":
            seconds = max(0.0, (task.end_time - task.start_time).total_seconds())
        detail = str(getattr(task.error, "message", "") or "") if state == "failed" and task.error else ""
        events.append(TaskEvent(name, state, seconds, detail))
    return events


def _name_filter(display_name: str) -> str:
    """A KFP API filter on ``display_name`` (same shape as ``kfp.Client.get_pipeline_id`` sends)."""
    return json.dumps({"predicates": [{"operation": 1, "key": "display_name", "stringValue": display_name}]})


def runner_for(settings: Settings, *, client: Any | None = None) -> LocalRunner | KfpRunner:
    """The runner for this configuration: Kubeflow when ``kfp.host`` is set (through ``client`` if given), else kfp.local."""
    return KfpRunner(settings, client=client) if settings.is_cluster else LocalRunner(settings)
