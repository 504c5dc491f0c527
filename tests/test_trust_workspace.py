"""One writer per workspace, owner-only workspace files, and bad configuration or data that gets one
clear message (issue 21): each case fails on the code before the fix.

- configuration: the CLI's real entry point (``driftloop.app.cli.main``) on a bad file or value
  exits 2 with one ``error:`` line naming the key (and file), no traceback;
- two runs at once on one workspace: a second run is refused (or waits with ``--wait``), the
  workspace lock is released however its holder ends, rollout state is replaced atomically;
- a failed run's last line says what the registry really holds;
- files 0600 and folders 0700 after a real run; an old workspace is tightened on start;
- ingest: mixed time formats and offsets parsed, missing times counted or refused, a repeated CSV
  header refused.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tests.conftest import make_settings

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _keep_umask():
    """The CLI sets an owner-only umask for its process; give the test process its own back."""
    old = os.umask(0o022)
    os.umask(old)
    yield
    os.umask(old)


def run_cli(args: list[str], monkeypatch, capsys) -> tuple[int, str, str]:
    """``driftloop <args>`` through the installed entry point, in this process: (exit code, stdout, stderr)."""
    from driftloop.app.cli import main

    monkeypatch.setattr(sys, "argv", ["driftloop", *args])
    code = 0
    try:
        main()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    out = capsys.readouterr()
    return code, out.out, out.err


# --- configuration: one line, exit 2, the key named ---------------------------------------------------
CONFIG_CASES = [
    pytest.param(b"project: caf\xe9\n", ["not UTF-8", "line 1"], id="not-utf8"),
    pytest.param(b"gate:\n  margin: .nan\n", ["gate.margin", "finite"], id="nan-margin"),
    pytest.param(b"monitor:\n  min_samples: true\n", ["monitor.min_samples", "boolean"], id="bool-as-int"),
    pytest.param(b"trigger:\n  cooldown_seconds: false\n", ["trigger.cooldown_seconds", "boolean"], id="bool-as-float"),
    pytest.param(b"mlflow:\n  model_name: a\nmlflow:\n  model_name: b\n", ["'mlflow' appears twice", "lines 1 and 3"],
                 id="duplicate-section"),
    pytest.param(b"data:\n  target: y\n  target: z\n", ["'target' appears twice", "lines 2 and 3"], id="duplicate-key"),
    pytest.param(b"mlflow:\n  model_name: ../../etc\n", ["mlflow.model_name", "DNS-1123"], id="model-name-path"),
    pytest.param(b"serving:\n  name: Churn_Model\n", ["serving.name", "lower-case"], id="serving-name-upper"),
    pytest.param(b"model:\n  params:\n    max_iterz: 5\n", ["model.params", "'max_iterz'", "max_iter"],
                 id="unknown-learner-param"),
    pytest.param(b"model:\n  learner: random_forest\n  params:\n    learning_rate: 0.1\n",
                 ["model.params", "'learning_rate'", "random_forest"], id="param-of-another-learner"),
]


@pytest.mark.parametrize("text, expected", CONFIG_CASES)
def test_bad_config_is_one_line_exit_2(tmp_path, monkeypatch, capsys, text, expected):
    cfg = tmp_path / "bad.yaml"
    cfg.write_bytes(text)
    code, out, err = run_cli(["config", "show", "-c", str(cfg)], monkeypatch, capsys)
    assert code == 2, (out, err)
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), err
    for part in expected:
        assert part in lines[0], lines[0]
    assert "Traceback" not in out + err
    # the same file with the mistake removed loads (the CLI keeps working)
    code, out, err = run_cli(["config", "show", "-p", f"workspace={tmp_path / 'ws'}"], monkeypatch, capsys)
    assert code == 0 and "project: driftloop" in out, err


@pytest.mark.parametrize("layout", ["file", "under-a-file"])
def test_workspace_that_is_a_file_is_one_line(tmp_path, monkeypatch, capsys, layout):
    blocker = tmp_path / "occupied"
    blocker.write_text("not a folder")
    workspace = blocker if layout == "file" else blocker / "ws"
    code, out, err = run_cli(["run", "train", "-p", f"workspace={workspace}", "-p", "data.source=x.parquet"],
                             monkeypatch, capsys)
    assert code == 2, (out, err)
    assert f"{blocker} is a file, not a folder" in err and "Traceback" not in out + err
    assert blocker.read_text() == "not a folder"


def test_good_params_still_load(tmp_path):
    settings = make_settings(tmp_path / "ws", tmp_path / "d.parquet",
                             **{"model.learner": "random_forest", "model.params": {"n_estimators": 5, "max_depth": 3},
                                "monitor.min_samples": 5, "gate.margin": -0.01})
    assert settings.model.params == {"n_estimators": 5, "max_depth": 3} and settings.monitor.min_samples == 5


# --- one writer per workspace --------------------------------------------------------------------------
HOLDER = """
import sys, time
from pathlib import Path
from driftloop.core.workspace import workspace_lock
with workspace_lock(Path(sys.argv[1]), "run-held-elsewhere", wait=False):
    print("held", flush=True)
    time.sleep(float(sys.argv[2]))
"""


def hold_lock(workspace: Path, seconds: float) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(workspace), str(seconds)], stdout=subprocess.PIPE,
                            text=True, cwd=ROOT)
    assert proc.stdout.readline().strip() == "held"
    return proc


@pytest.mark.parametrize("end", ["exits", "killed"])
def test_lock_refuses_a_second_writer_and_is_released_however_the_holder_ends(tmp_path, end):
    from driftloop.core.errors import WorkspaceBusy
    from driftloop.core.workspace import workspace_lock

    ws = tmp_path / "ws"
    holder = hold_lock(ws, 1.0 if end == "exits" else 60.0)
    try:
        with pytest.raises(WorkspaceBusy) as busy:
            with workspace_lock(ws, "second", wait=False):
                pass
        assert f"run run-held-elsewhere (pid {holder.pid}) is running in {ws}" in str(busy.value)
        if end == "killed":  # SIGKILL: no cleanup ran, and the kernel let go of the lock
            holder.kill()
            holder.wait()
        waited: list[str] = []
        with workspace_lock(ws, "second", wait=True, on_wait=waited.append, poll_seconds=0.05):
            assert json.loads((ws / ".lock").read_text())["run"] == "second"
        expected = [f"waiting for run run-held-elsewhere (pid {holder.pid}) to finish in {ws}"]
        assert waited == (expected if end == "exits" else [])
    finally:
        holder.kill()
        holder.wait()


def test_lock_is_reentrant_in_one_process_and_exclusive_across_processes(tmp_path):
    """The CLI takes the lock and the runner takes it again: the same process must not block on itself."""
    from driftloop.core.workspace import workspace_lock

    ws = tmp_path / "ws"
    with workspace_lock(ws, "outer", wait=False):
        with workspace_lock(ws, "inner", wait=False):
            pass
        # still held after the inner block: another process is refused
        proc = subprocess.run([sys.executable, "-c", HOLDER, str(ws), "0"], capture_output=True, text=True, cwd=ROOT)
        assert proc.returncode != 0 and "WorkspaceBusy" in proc.stderr
    proc = subprocess.run([sys.executable, "-c", HOLDER, str(ws), "0"], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0 and proc.stdout.strip() == "held"


@pytest.mark.parametrize("wait", [False, True], ids=["refused", "waits-with-flag"])
def test_cli_run_while_another_holds_the_workspace(tmp_path, monkeypatch, capsys, wait):
    ws = tmp_path / "ws"
    holder = hold_lock(ws, 1.5 if wait else 60.0)
    try:
        args = ["run", "train", "-p", f"workspace={ws}", "-p", f"data.source={tmp_path / 'missing.parquet'}"]
        code, out, err = run_cli(args + (["--wait"] if wait else []), monkeypatch, capsys)
        if wait:  # queued behind the holder, then ran (and failed on the missing data, as a run does)
            assert f"waiting for run run-held-elsewhere (pid {holder.pid}) to finish in {ws}" in err
            assert code == 1 and "data source not found" in err and "Nothing was registered" in err
        else:
            assert code == 2, (out, err)
            assert f"run run-held-elsewhere (pid {holder.pid}) is running in {ws}" in err and "--wait" in err
            assert not (ws / "pipeline-root").exists()  # nothing started
        assert "Traceback" not in out + err
    finally:
        holder.kill()
        holder.wait()


def test_rollout_state_writers_never_leave_a_torn_file(tmp_path):
    """Many writers saving at once (two runs' deploy steps did): every read sees one whole state."""
    from serving.rollout import RolloutState, RolloutStore

    store = RolloutStore(tmp_path / "rollout", "churn")
    store.save(RolloutState("churn", canary_version="1", primary_version=None))
    script = ("import sys\nfrom pathlib import Path\nfrom serving.rollout import RolloutStore, RolloutState\n"
              "s = RolloutStore(Path(sys.argv[1]), 'churn')\n"
              "for i in range(300):\n"
              "    s.save(RolloutState('churn', canary_version=sys.argv[2], primary_version='1', "
              "history=[{'i': i, 'pad': 'x' * (5000 if i % 2 else 10)}]))\n")
    writers = [subprocess.Popen([sys.executable, "-c", script, str(tmp_path / "rollout"), str(v)], cwd=ROOT)
               for v in (2, 3)]
    reads = 0
    while any(w.poll() is None for w in writers):
        state = store.load()  # raises "unreadable" on a torn file
        assert state is not None and state.canary_version in ("1", "2", "3")
        reads += 1
    assert all(w.wait() == 0 for w in writers) and reads > 0
    assert store.load().canary_version in ("2", "3")
    assert stat.S_IMODE(store.state_path.stat().st_mode) == 0o600
    assert not list(store.dir.glob("*.tmp"))


def _write_csv(path: Path, rows: int = 400) -> Path:
    rng = np.random.default_rng(0)
    times = pd.date_range("2026-01-01", periods=rows, freq="h", tz="UTC")
    x = rng.normal(size=rows)
    pd.DataFrame({"event_time": times.strftime("%Y-%m-%dT%H:%M:%SZ"), "x": x, "z": rng.normal(size=rows),
                  "label": (x + rng.normal(scale=0.5, size=rows) > 0).astype(int)}).to_csv(path, index=False)
    return path


def test_two_real_runs_at_once_one_is_refused_and_the_workspace_stays_whole_and_private(tmp_path):
    """Two ``driftloop run train`` on one workspace: the second is refused while the first runs;
    the first succeeds and every file it left is 0600, every folder 0700."""
    data = _write_csv(tmp_path / "data.csv")
    ws = tmp_path / "ws"
    args = [sys.executable, "-m", "driftloop.app.cli", "run", "train", "-p", f"workspace={ws}",
            "-p", f"data.source={data}", "-p", "data.time_column=event_time", "-p", "data.reference_size=100",
            "-p", "mlflow.model_name=churn", "-p", "model.params={max_iter: 20}"]
    first = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    deadline = time.monotonic() + 60
    while not (ws / ".lock").is_file() or not (ws / ".lock").read_text():
        assert first.poll() is None and time.monotonic() < deadline, first.communicate()
        time.sleep(0.05)
    second = subprocess.run(args, capture_output=True, text=True, cwd=ROOT, timeout=120)
    out, err = first.communicate(timeout=300)
    assert first.returncode == 0, out + err
    assert second.returncode == 2, second.stdout + second.stderr
    assert f"(pid {first.pid}) is running in {ws}" in second.stderr and "Traceback" not in second.stderr
    assert "gate" in out and "\x1b[" not in out + err  # no terminal codes on a pipe
    loose = [f"{p} {oct(stat.S_IMODE(p.lstat().st_mode))}" for p in [ws, *ws.rglob("*")] if not p.is_symlink()
             and stat.S_IMODE(p.lstat().st_mode) & (0o077 if p.is_dir() else 0o177)]
    assert not loose, loose
    assert (ws / "mlflow.db").is_file() and (ws / "pipeline-root" / "logs").is_dir()


def test_an_old_workspace_is_tightened_on_start(tmp_path, monkeypatch, capsys):
    ws = tmp_path / "ws"
    (ws / "monitor").mkdir(parents=True, mode=0o755)
    os.chmod(ws, 0o755)
    (ws / "monitor" / "inference.db").write_text("x")
    os.chmod(ws / "monitor" / "inference.db", 0o644)
    (ws / "run.log").write_text("x")
    os.chmod(ws / "run.log", 0o664)
    code, out, err = run_cli(["config", "show", "-p", f"workspace={ws}"], monkeypatch, capsys)
    assert code == 0, err
    assert [oct(stat.S_IMODE(p.stat().st_mode)) for p in (ws, ws / "monitor", ws / "monitor" / "inference.db",
                                                           ws / "run.log")] == ["0o700", "0o700", "0o600", "0o600"]


# --- a failed run's message is true; no terminal codes off a terminal --------------------------------
def test_failed_run_message_says_what_the_registry_holds(trained, capsys):
    from driftloop.app.cli import print_run_result
    from driftloop.core.runs import RunResult

    settings, result = trained
    # a run that failed after its register step (its deploy, say): its version is in the registry
    print_run_result(settings, RunResult(result.request_id, result.run_id, "FAILED", "local", error="step 'deploy' failed"))
    err = capsys.readouterr().err
    version = result.summary["model_version"]
    assert f"churn version {version} was registered and holds alias" in err and "Nothing was registered" not in err
    # a run that failed before registering anything
    print_run_result(settings, RunResult("no-such-request", "x", "FAILED", "local", error="step 'ingest' failed"))
    err = capsys.readouterr().err
    assert "Nothing was registered; the registry's aliases are unchanged." in err


def test_kfp_colours_do_not_reach_a_failed_run_line(tmp_path, capsys):
    """kfp.local colours the task names in the error it raises; a pipe must get plain text."""
    from kfp.local import pipeline_orchestrator

    from driftloop.app.cli import print_run_result
    from driftloop.core.runs import RunResult
    from pipelines.runner import _first_line

    with pytest.raises(RuntimeError) as raised:
        pipeline_orchestrator.log_and_maybe_raise_for_failure("driftloop-train", True, ["ingest-op"])
    assert "\x1b[" in str(raised.value)
    line = _first_line(raised.value)
    assert "\x1b[" not in line and "Inner task failed: 'ingest-op'" in line
    settings = make_settings(tmp_path / "ws", tmp_path / "d.parquet")
    print_run_result(settings, RunResult("r", "r", "FAILED", "local", error=line + " [see log]"))
    err = capsys.readouterr().err
    assert "\x1b[" not in err and "[see log]" in err


# --- ingest: nothing dropped without a word ------------------------------------------------------------
def _frame(times: list) -> pd.DataFrame:
    n = len(times)
    return pd.DataFrame({"event_time": times, "x": np.arange(n, dtype=float), "label": np.arange(n) % 2})


_T = pd.date_range("2026-01-01", periods=6000, freq="h", tz="UTC")


def _mixed_offsets() -> list:
    return [t.strftime("%Y-%m-%dT%H:%M:%SZ") if i % 2 else t.tz_convert("Asia/Tokyo").isoformat()
            for i, t in enumerate(_T)]


def _mixed_formats() -> list:
    return [t.strftime("%Y-%m-%d %H:%M:%S") if i % 2 else t.strftime("%d %b %Y %H:%M") for i, t in enumerate(_T)]


INGEST_CASES = [
    pytest.param(_mixed_offsets, 6000, None, id="mixed-offsets-all-kept"),
    pytest.param(_mixed_formats, 6000, None, id="mixed-formats-all-kept"),
    pytest.param(lambda: [None if i % 20 == 0 else v for i, v in enumerate(_mixed_offsets())], 5700, None,
                 id="5pct-null-dropped-with-warning"),
    pytest.param(lambda: [None if i % 3 == 0 else v for i, v in enumerate(_mixed_offsets())], None,
                 "empty in 2000 of 6000 rows", id="33pct-null-refused"),
    pytest.param(lambda: ["soon" if i == 7 else v for i, v in enumerate(_mixed_offsets())], None,
                 "(e.g. 'soon' in row 7)", id="not-a-time-refused"),
]


@pytest.mark.parametrize("make, rows, refused", INGEST_CASES)
def test_ingest_time_column(make, rows, refused, caplog):
    from components.ingest import ingest
    from driftloop.core.errors import DataValidationError

    frame = _frame(make())
    if refused:
        with pytest.raises(DataValidationError) as exc:
            ingest(frame, target="label", time_column="event_time")
        assert "'event_time'" in str(exc.value) and refused in str(exc.value)
        assert exc.value.column == "event_time"
        return
    with caplog.at_level("WARNING", logger="components.ingest"):
        result = ingest(frame, target="label", time_column="event_time")
    assert len(result.train) + len(result.test) == rows
    assert result.train["event_time"].is_monotonic_increasing
    assert result.test["event_time"].max() == _T[-1]
    dropped = 6000 - rows
    assert (f"dropped {dropped} of 6000 rows with no time in column 'event_time'" in caplog.text) == bool(dropped)


def test_csv_with_a_repeated_header_is_refused(tmp_path):
    from driftloop.core.errors import DataValidationError
    from driftloop.core.tables import read_table

    path = tmp_path / "dup.csv"
    path.write_text("tenure,plan,tenure,label\n1,a,3,0\n4,b,6,1\n")
    with pytest.raises(DataValidationError) as exc:
        read_table(str(path))
    assert "names column 'tenure' twice" in str(exc.value) and exc.value.column == "tenure"
    path.write_text("tenure,plan,tenure_2,label\n1,a,3,0\n4,b,6,1\n")
    assert list(read_table(str(path)).columns) == ["tenure", "plan", "tenure_2", "label"]
