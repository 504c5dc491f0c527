"""The task server: everything it preloads imports, it holds nothing a forked task would share, it answers
before its loader has finished, runs tasks side by side, and stays warm between runs of one workspace."""

import os
import re
import stat
import subprocess
import sys
import threading

from kfp import dsl

from pipelines.runner import _TaskServer, _WarmServer
from pipelines.task_server import PRELOAD


def _group(pid: int) -> list[int]:
    """Live pids of the process group led by ``pid`` (the server's watcher, the server, its loader)."""
    out = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                if os.getpgid(int(name)) == pid:
                    out.append(int(name))
            except ProcessLookupError:
                pass
    return out


def _open_files(pid: int) -> set[str]:
    fd_dir = f"/proc/{pid}/fd"
    targets = {fd: os.readlink(os.path.join(fd_dir, fd)) for fd in os.listdir(fd_dir)}
    return {t for fd, t in targets.items()
            if os.path.exists(t) and stat.S_ISREG(os.stat(t).st_mode) and int(fd) > 2} | {
        t for t in targets.values() if ".db" in t or "sqlite" in t}


def test_the_task_server_preloads_every_module_and_opens_no_store_or_file(tmp_path):
    log_path = tmp_path / "server.log"
    with open(log_path, "a") as log_file:
        server = _TaskServer(log_file)
    try:
        assert server.loaded(timeout=120), log_path.read_text()
        group = _group(server.proc.pid)
        assert len(group) >= 3, group  # the watcher, the server and its loader
        opened = {pid: _open_files(pid) for pid in group}
    finally:
        server.close()
    text = log_path.read_text()
    # a renamed or missing module would silently cost every task its import again
    assert "not preloaded" not in text, text
    assert f"{len(PRELOAD)} modules preloaded" in text
    # no MLflow store, SQLite database or other file is open in any process a task is forked from
    assert all(files <= {str(log_path)} for files in opened.values()), opened
    assert not os.path.exists(server.socket_path)
    assert not any(os.path.exists(f"/proc/{pid}") and _status(pid) != "Z" for pid in group)


def _status(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "gone"


def _task_command(body: str) -> list[str]:
    """kfp.local's own task script around a component whose function runs ``body``."""
    source = f"\nimport kfp\nfrom kfp import dsl\nfrom kfp.dsl import *\nfrom typing import *\n\ndef op():\n    {body}\n"
    script = ('program_path=$(mktemp -d)\n\nprintf "%s" "$0" > "$program_path/ephemeral_component.py"\n'
              f'_KFP_RUNTIME=true {sys.executable} -m kfp.dsl.executor_main '
              '--component_module_path "$program_path/ephemeral_component.py" "$@"\n')
    executor_input = '{"inputs": {}, "outputs": {"outputFile": "/dev/null"}}'
    return ["sh", "-ec", script, source, "--executor_input", executor_input, "--function_to_execute", "op"]


def test_tasks_run_side_by_side_before_and_after_the_loader_takes_over(tmp_path):
    """Two tasks that each wait for the other finish only if the server runs them at the same time."""
    log_path = tmp_path / "server.log"
    barrier = tmp_path / "barrier"
    body = (f"import os, time; p = {str(barrier)!r}; open(p + str(os.getpid()), 'w').close(); "
            "deadline = time.time() + 60\n    while len([f for f in os.listdir(os.path.dirname(p)) "
            "if f.startswith('barrier')]) < 2 and time.time() < deadline: time.sleep(0.01)\n    "
            "assert time.time() < deadline, 'the other task never ran'\n    print('task env', os.environ['MARK'])")
    with open(log_path, "a") as log_file:
        server = _TaskServer(log_file)
    try:
        for stage in (server.ready, server.loaded):
            assert stage(timeout=120), log_path.read_text()
            for f in tmp_path.glob("barrier*"):
                f.unlink()
            results: dict[int, tuple[int, str]] = {}

            def one(i: int) -> None:
                task = server.start(_task_command(body), {**os.environ, "MARK": str(i)}, str(tmp_path))
                out = task.stdout.read()
                task.stdout.close()
                results[i] = (task.wait(), out)

            threads = [threading.Thread(target=one, args=(i,)) for i in range(2)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(120)
            assert [results[i][0] for i in range(2)] == [0, 0], results
            assert all(f"task env {i}" in results[i][1] for i in range(2)), results
        # a failing task's exit status comes back as a shell reports it
        task = server.start(_task_command("raise SystemExit(3)"), dict(os.environ), str(tmp_path))
        task.stdout.read()
        task.stdout.close()
        assert task.wait() == 3
    finally:
        server.close()


def test_the_warm_server_is_kept_for_a_workspace_and_replaced_for_another(tmp_path):
    warm = _WarmServer()
    try:
        first = warm.get(tmp_path / "a" / "pipeline-root")
        assert warm.get(tmp_path / "a" / "pipeline-root") is first
        assert (tmp_path / "a" / "pipeline-root" / "logs" / "task-server.log").exists()
        second = warm.get(tmp_path / "b" / "pipeline-root")
        assert second is not first and first.proc.poll() is not None  # the first one was stopped
        second.proc.kill()
        second.proc.wait()
        third = warm.get(tmp_path / "b" / "pipeline-root")  # a dead server is replaced
        assert third is not second and third.ready(timeout=120)
    finally:
        warm.close()
    assert warm.server is None


def test_the_task_server_dies_with_the_process_that_started_it(tmp_path):
    code = ("import sys; from pipelines.runner import _warm; from pathlib import Path; "
            "s = _warm.get(Path(sys.argv[1])); assert s.loaded(120); print(s.proc.pid, flush=True); "
            "import os; os.kill(os.getpid(), 9)")
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path / "pipeline-root")], capture_output=True,
                          text=True, timeout=180)
    leader = int(proc.stdout.split()[0])
    import time

    deadline = time.monotonic() + 30
    while _group(leader) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _group(leader)


@dsl.component(install_kfp_package=False)
def _parent_of_task() -> str:
    import os

    print(f"task parent {os.getppid()}")
    return str(os.getppid())


@dsl.pipeline(name="parents")
def _parents():
    _parent_of_task()
    _parent_of_task()


def test_a_process_runs_many_pipelines_with_one_warm_server_and_fresh_interpreters_when_turned_off(
        tmp_path, monkeypatch):
    from driftloop.core.config import load_settings
    from driftloop.core.runs import Pipeline
    from pipelines.runner import LocalRunner, RunRequest, _warm

    settings = load_settings(overrides={"workspace": str(tmp_path / "ws"), "data.source": str(tmp_path / "x.parquet")},
                             environ={})
    pipeline = Pipeline(name="parents", description="", build=lambda: _parents, compile=lambda d: d,
                        summarize=lambda request_id: {})

    def parents() -> set[int]:
        request = RunRequest()
        result = LocalRunner(settings).run(pipeline, {}, request)
        assert result.state == "SUCCEEDED", result.error
        log = LocalRunner(settings).log_path(request, pipeline).read_text()
        found = {int(p) for p in re.findall(r"task parent (\d+)", log)}
        assert len(re.findall(r"task parent (\d+)", log)) == 2, log
        return found

    _warm.close()
    try:
        first = parents()
        server = _warm.server
        assert server is not None and server.alive()
        second = parents()
        assert _warm.server is server and server.alive()  # the same server, warm, for the second run
        group = set(_group(server.proc.pid))
        assert first <= group and second <= group, (first, second, group)  # every task forked by it
        monkeypatch.setenv("DRIFTLOOP_TASK_SERVER", "0")
        fresh = parents()
        assert not fresh & group  # each task a process of its own (kfp.local's sh), not a fork of the server
    finally:
        _warm.close()
