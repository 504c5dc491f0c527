"""Quiet by default: one line per state change, everything else at debug level or in a log file.

- the gateway logs the labels it forwards in one line a minute at most, not httpx's line per label;
- a rollout step is one line, printed once (``driftloop serve`` and ``driftloop rollout run``), and a
  step that repeats the one before it (another wait) only with ``-v``;
- the tasks' output of a local run goes to its log file and nowhere else, even when kfp.local's
  threads (``ParallelFor``) leave their print and log handler behind;
- an editable install of the project (``make setup`` / ``make demo`` on a fresh clone) prints no
  setuptools warning caused by the project's own packaging;
- long commands show a progress line (share done, time left) on a terminal.
"""

from __future__ import annotations

import io
import logging
import os
import shutil
import subprocess
import sys
import time
import types
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from tests.conftest import make_settings
from tests.test_score import _Monitor

ROOT = Path(__file__).resolve().parents[1]


# -- the gateway's labels ------------------------------------------------------------------------------
def _fake_monitor() -> tuple[Any, list[int]]:
    """A monitor's ``POST /feedback`` that stores whatever comes: the app, and the rows it stored."""
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    rows = [0]

    async def feedback(request):
        rows[0] += len(await request.json())
        return JSONResponse({"stored": rows[0], "unknown_ids": []})

    return Starlette(routes=[Route("/feedback", feedback, methods=["POST"])]), rows


def test_the_gateway_logs_its_labels_in_one_summary_line_not_one_line_per_label(tmp_path, caplog):
    from starlette.testclient import TestClient

    from serving.gateway import create_gateway_app
    from serving.gateway_base import GatewayConfig, Upstream

    app, stored = _fake_monitor()
    caplog.set_level(logging.INFO)
    with _Monitor(types.SimpleNamespace(app=app)) as monitor:
        cfg = GatewayConfig(name="m", primary=Upstream("http://127.0.0.1:9", "1"),
                            feedback_url=f"http://127.0.0.1:{monitor.port}/feedback",
                            feedback_outbox=str(tmp_path / "feedback-outbox.db"), ingest_token="t")
        with TestClient(create_gateway_app(cfg), headers={"authorization": "Bearer t"}) as gw:
            for i in range(40):  # labels for requests served before a restart: forwarded all the same
                r = gw.post("/feedback", json={"id": f"req-{i}", "label": i % 2})
                assert r.status_code == 200 and r.json()["monitor"] == "stored", r.text
        assert stored == [40]
    lines = [r.getMessage() for r in caplog.records]
    assert not [line for line in lines if cfg.feedback_url in line], lines  # httpx's line per label is held back
    summaries = [line for line in lines if line.startswith("labels:")]
    assert len(summaries) == 1 and summaries[0].startswith("labels: 40 rows forwarded to the monitor in the last ")
    assert summaries[0].endswith("(40 stored)"), summaries


def test_the_label_summary_is_one_line_a_minute_at_most(caplog):
    from serving.gateway_feedback import LabelSummary

    now = [0.0]
    summary = LabelSummary(clock=lambda: now[0])
    caplog.set_level(logging.INFO, logger="serving.gateway_feedback")
    for second in range(0, 150):  # a label a second for two and a half minutes, now and then one queued
        now[0] = float(second)
        summary.add("queued" if second % 50 == 49 else "stored", 1)
    summary.flush()  # the gateway stops
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 3, lines
    assert lines[0] == "labels: 61 rows forwarded to the monitor in the last 60 s (1 queued, 60 stored)"
    assert lines[1] == "labels: 60 rows forwarded to the monitor in the last 60 s (1 queued, 59 stored)"
    assert lines[2] == "labels: 29 rows forwarded to the monitor in the last 29 s (1 queued, 28 stored)"


# -- rollout steps ---------------------------------------------------------------------------------------
def test_each_rollout_step_is_one_line_printed_once_and_repeated_waits_only_with_v(tmp_path, caplog):
    from driftloop.app.serving_cli import StepLines
    from serving.rollout import RolloutController
    from tests.test_rollout import ScriptedTarget

    class Thin(ScriptedTarget):
        """Too few requests reach the canary for three intervals, then enough."""

        def __init__(self) -> None:
            super().__init__(None)
            self.script = [1, 1, 1]

        def stats(self, since, canary_version, primary_version):
            canary, primary = super().stats(since, canary_version, primary_version)
            canary["requests"] = self.script.pop(0) if self.script else 100
            return canary, primary

    settings = make_settings(tmp_path, tmp_path / "unused.parquet", **{
        "rollout.step_weights": [20, 60], "rollout.interval_seconds": 0.01, "rollout.min_requests": 10,
        "rollout.threshold": 2})
    caplog.set_level(logging.INFO)
    outputs = {}
    for verbose in (False, True):
        RolloutController.begin(settings, canary_version="2", primary_version="1")
        logging.getLogger().setLevel(logging.DEBUG if verbose else logging.INFO)
        out = io.StringIO()
        state = RolloutController(settings, Thin(), None).run(on_step=StepLines(Console(file=out, width=200)))
        assert state.status == "promoted"
        outputs[verbose] = out.getvalue().splitlines()
    logging.getLogger().setLevel(logging.INFO)
    quiet = outputs[False]
    assert [line.split(" at ")[0] for line in quiet] == ["rollout: start", "rollout: wait", "rollout: advance",
                                                          "rollout: promote"], quiet
    assert quiet[1] == "rollout: wait at 20% — 1 < 10 requests reached the canary"
    assert sum(line.startswith("rollout: wait") for line in outputs[True]) == 3  # -v: every step
    # and nothing else says it again: the controller's own line is at debug level
    logged = [r.getMessage() for r in caplog.records if r.levelno >= logging.INFO]
    assert not [line for line in logged if line.startswith("rollout ")], logged


# -- the tasks' output of a local run ----------------------------------------------------------------------
def test_what_kfp_local_threads_leave_behind_is_put_back_when_a_run_ends(tmp_path, capsys):
    """kfp.local runs a ParallelFor's tasks in threads; each swaps ``builtins.print`` and the root logger's
    handlers and restores what it found, so overlapping threads can leave a task's own in place."""
    import builtins

    from pipelines.runner import _output_to

    root = logging.getLogger()
    printer, handlers = builtins.print, root.handlers[:]
    log_path = tmp_path / "run.log"
    with _output_to(log_path):
        leftover = logging.StreamHandler(sys.stdout)  # bound to the run's log, as kfp.local's handler is
        root.addHandler(leftover)
        builtins.print = lambda *a, **k: printer("    ", *a, **k)  # kfp.local's indenting print
        print("task output")
    assert builtins.print is printer and root.handlers == handlers
    print("after the run")
    logging.getLogger("after").warning("a line of the command")
    assert capsys.readouterr().out == "after the run\n"
    assert "task output" in log_path.read_text()


# -- packaging -------------------------------------------------------------------------------------------
def test_an_editable_install_of_the_project_prints_no_setuptools_warning(tmp_path):
    """What `make setup` runs on a fresh clone (pip install -e): setuptools' editable build of the project's
    own files, with every warning shown. The project's packaging makes it a plain .pth entry (no import
    finder, whose 'Please be careful with folders ...' warning opened `make demo`)."""
    tracked = subprocess.run(["git", "ls-files", "pyproject.toml", "README.md", "driftloop", "pipelines",
                              "components", "serving", "monitoring"], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout.split()
    project = tmp_path / "clone"
    for name in tracked:
        (project / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, project / name)
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    build = ("import setuptools.build_meta as b, sys; print('built', b.build_editable(sys.argv[1]))")
    proc = subprocess.run([sys.executable, "-W", "always", "-c", build, str(wheels)], cwd=project, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "PYTHONWARNINGS": "always"})
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout + proc.stderr
    for warning in ("Warning", "careful with folders", "!!", "deprecated"):
        assert warning not in text, text
    import zipfile

    (wheel,) = wheels.glob("*.whl")
    pth = [n for n in zipfile.ZipFile(wheel).namelist() if n.endswith(".pth")]
    assert pth == ["__editable__.driftloop-0.1.0.pth"]  # the project folder on sys.path, nothing else


# -- progress lines -------------------------------------------------------------------------------------------
class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_runs_spinner_shows_the_share_of_tasks_done_and_the_time_left():
    from driftloop.app.cli import TaskLines, _Running

    out = _Tty()
    lines = TaskLines(out, tasks=4, label="scoring run")
    now = [0.0]
    lines.progress.clock, lines.progress.started = (lambda: now[0]), 0.0
    rendered = Console(file=io.StringIO(), width=120, force_terminal=False)

    def text() -> str:
        with rendered.capture() as captured:
            rendered.print(_Running("score chunk", lines))
        return captured.get().strip()

    assert text().endswith("score chunk running")  # nothing done yet: no estimate
    lines.done, now[0] = 2, 10.0
    assert text().endswith("score chunk running · scoring run:  50%, 10 s so far, about 10 s left")
    lines.done = 4  # every task ended, the run not yet: never 100 %
    assert "99%" in text()


def test_the_demo_shows_its_share_done_on_a_terminal(monkeypatch):
    from driftloop.app.demo_report import Narrator
    from driftloop.core.progress import Progress

    stream = _Tty()
    now = [100.0]
    monkeypatch.setattr(time, "monotonic", lambda: now[0])
    narrator = Narrator(phases={"train": 10.0, "retrain": 30.0},
                        progress=Progress("demo", stream=stream, clock=lambda: now[0]))
    narrator.phase("train")
    now[0] += 5.0
    assert narrator.share() == pytest.approx(5.0 / 40)
    narrator.phase("retrain")
    now[0] += 100.0  # longer than measured: the share stops short of the next phase
    assert narrator.share() == pytest.approx((10.0 + 28.5) / 40)
    narrator.progress(narrator.share())
    assert "demo:  96%" in stream.getvalue() and "left" in stream.getvalue()
    narrator.close()
