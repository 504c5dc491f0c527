"""The model's history in Evidently's UI, checked in a real browser.

The monitor runs drift and quality checks on real traffic (a degraded window raises a quality
alert that starts a run, a drifted window a drift alert) and writes them to its Evidently
workspace; ``evidently ui`` serves that workspace on loopback (with a write secret, as on a
cluster); Debian's Chromium, headless and driven by playwright, opens the model's dashboard. The
panels must hold what the monitor recorded, the page must log no console error and ask nothing of
any host but the UI. The same server then takes a record written as the monitor writes to a
cluster's Evidently service (with the secret) and refuses one without it.

Run as a module it makes the README's screenshot from a workspace ``make demo`` left::

    python -m tests.test_evidently_ui_browser .driftloop/evidently docs/history-dashboard.png
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import secrets
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.testclient import TestClient

from driftloop.app.scenario import SCENARIOS, generate
from driftloop.core.history import HistoryError, HistoryWorkspace, history_target
from driftloop.core.processes import free_port, spawn, stop_process
from tests.servers import wait_until
from tests.test_quality import _serve_and_label, _service, champion_sklearn  # noqa: F401 (fixture)

CHROMIUM = "/usr/bin/chromium"  # Debian's chromium package; playwright's own browser download is never used
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
PANELS = ("Share of drifted columns, last window", "Alerts raised", "Share of drifted columns", "Drifted columns",
          "Drift score per column (method's statistic)", "accuracy: live against the holdout limit",
          "Alerts, retraining runs and rollouts")


@contextlib.contextmanager
def evidently_ui(workspace: Path, *, secret: str | None = None) -> Iterator[str]:
    """``evidently ui`` over ``workspace`` on 127.0.0.1 (a free port), stopped with its process group."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "DO_NOT_TRACK": "1"}  # no usage telemetry leaves the machine
    env.pop("EVIDENTLY_SECRET", None)
    if secret:
        env["EVIDENTLY_SECRET"] = secret
    log = workspace.parent / f"evidently-ui-{port}.log"
    with open(log, "wb") as fh:
        proc = spawn([sys.executable, "-m", "evidently.cli", "ui", "--workspace", str(workspace), "--host",
                      "127.0.0.1", "--port", str(port)], stdout=fh, stderr=subprocess.STDOUT, env=env)
    try:
        wait_until(lambda: httpx.get(f"{url}/api/version", timeout=2).status_code == 200, timeout=120,
                   what="evidently ui", proc=proc, log=log)
        yield url
    finally:
        stop_process(proc.pid)


def open_dashboard(url: str, project_id: str, *, screenshot: Path | None = None) -> dict[str, Any]:
    """Load the project's dashboard once in headless Chromium; what the page showed, logged and asked for."""
    from playwright.sync_api import sync_playwright

    if not Path(CHROMIUM).exists():
        raise AssertionError(f"{CHROMIUM} is missing: install Debian's chromium (apt-get install chromium "
                             "chromium-driver; .ci/run does) - nothing is downloaded at run time")
    seen: dict[str, Any] = {"errors": [], "elsewhere": [], "series": []}

    def route(r: Any) -> None:  # nothing but the UI itself is reached (or downloaded)
        if r.request.url.startswith(url) or r.request.url.startswith("data:"):
            r.continue_()
        else:
            seen["elsewhere"].append(r.request.url)
            r.abort()

    def response(r: Any) -> None:
        if "/data_series_batch" in r.url and r.ok:
            seen["series"].append(r.json())

    with sync_playwright() as pw, tempfile.TemporaryDirectory() as profile:
        browser = pw.chromium.launch_persistent_context(profile, executable_path=CHROMIUM, headless=True,
                                                        args=CHROMIUM_ARGS, viewport={"width": 1400, "height": 1000})
        try:
            browser.route("**/*", route)
            page = browser.new_page()
            page.on("console", lambda m: seen["errors"].append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: seen["errors"].append(str(e)))
            page.on("response", response)
            page.goto(f"{url}/projects/{project_id}", wait_until="networkidle", timeout=60_000)
            page.wait_for_selector(".MuiMarkElement-root", timeout=30_000)  # the charts are drawn (MUI X charts)
            page.wait_for_load_state("networkidle")
            seen["text"] = page.inner_text("body")
            seen["points"] = page.locator(".MuiMarkElement-root").count()  # a line's points
            seen["bars"] = page.locator(".MuiBarElement-root").count()
            if screenshot is not None:
                page.screenshot(path=str(screenshot), full_page=True)
        finally:
            browser.close()
    return seen


def _loop_workspace(tmp_path: Path, trained: Any, model: Any, monkeypatch: Any) -> tuple[Path, dict[str, Any]]:
    """What the monitor writes: a calm window whose labels show a degraded champion (quality alert, a run),
    then a window of drifted inputs (drift alert)."""
    # its alerts' report runs in an experiment of its own (tests/test_quality.py counts those of the same ids)
    service, _ = _service(tmp_path, trained, monkeypatch, **{"trigger.cooldown_seconds": 0,
                                                             "mlflow.experiment": "history-browser-test"})
    concept = generate(rows=300, drift_at=0.0, drift=SCENARIOS["concept"], seed=21)
    covariate = generate(rows=300, drift_at=0.0, drift=SCENARIOS["covariate"], seed=22)
    with TestClient(service.app, headers={"authorization": f"Bearer {service.ingest_token}"}) as client:
        _serve_and_label(client, concept, model)
        calm = client.post("/check").json()
        quality = client.post("/quality/check").json()["versions"]["1"]
        service.trigger.wait(quality["alert"]["id"], timeout=30)
        _serve_and_label(client, covariate, model)
        drifted = client.post("/check").json()
        assert service.history.flush(60) and service.history.failed == 0
    assert (calm["verdict"], quality["verdict"], drifted["verdict"]) == ("no drift", "degraded", "drift")
    return Path(history_target(service.settings)), {"calm": calm, "quality": quality, "drifted": drifted}


def test_the_monitors_history_shows_in_evidently_ui_in_a_real_browser(tmp_path, trained, champion_sklearn,
                                                                       monkeypatch):
    workspace, found = _loop_workspace(tmp_path, trained, champion_sklearn, monkeypatch)
    project = str(HistoryWorkspace(str(workspace)).project_id("churn", create=False))
    secret = secrets.token_hex(16)
    with evidently_ui(workspace, secret=secret) as url:
        seen = open_dashboard(url, project, screenshot=tmp_path / "dashboard.png")

        # the cluster path: the monitor writes to the UI service with the secret; without it, refused
        remote = HistoryWorkspace(url, secret=secret)
        now = dt.datetime.now(dt.UTC).isoformat()
        remote.add({"kind": "rollout", "model": "churn", "version": "2", "time": now,
                    "verdict": "promoted", "outcome": "promoted", "reason": "v2 is the champion",
                    "events": ["promoted"]})
        with pytest.raises(HistoryError, match="cannot write to the Evidently workspace"):
            HistoryWorkspace(url, secret="wrong").add({"kind": "rollout", "model": "churn", "verdict": "promoted",
                                                       "time": now, "events": ["x"]})
        kinds = [r["kind"] for r in HistoryWorkspace(url).records("churn")]
        # a model the service has not seen yet: its project and dashboard are made through the service
        remote.add({"kind": "rollout", "model": "churn-eu", "version": "1", "time": now, "verdict": "promoted",
                    "outcome": "promoted", "events": ["promoted"]})
        fresh = HistoryWorkspace(url)
        assert fresh.models() == ["churn", "churn-eu"] and len(fresh.records("churn-eu")) == 1
        panels = httpx.get(f"{url}/api/v2/dashboards/{fresh.project_id('churn-eu', create=False)}").json()["panels"]
        assert {"Share of drifted columns", "Alerts, retraining runs and rollouts"} <= {p["title"] for p in panels}

    assert seen["errors"] == [] and seen["elsewhere"] == []
    text = seen["text"]
    assert all(title in text for title in PANELS), text[:2000]
    drifted = found["drifted"]["result"]
    # points drawn, not a blank page: the share's 2, each column's 2, accuracy's live and limit (more panels have more)
    assert seen["points"] >= 2 + 2 * len(drifted["columns"]) + 2 and seen["bars"] >= 2
    for col in drifted["columns"]:  # each column's legend, named with its method
        assert f"{col['column']} ({col['method']})" in text
    assert "v1 live" in text and "v1 limit" in text and "alert" in text and "run" in text
    # the counters: the last window's share and the alerts raised (a quality alert, then a drift alert)
    assert "\nAlerts raised\n2\n" in text
    # what the page was given to draw is what the monitor computed
    points = {(s["metric_type"].rsplit(":", 1)[-1], tuple(sorted(s["params"].items()))): s["values"]
              for answer in seen["series"] for s in answer["series"]}
    share = points[("DriftedColumnsCount", (("drift_share", "0.5"), ("value_type", "share")))]
    assert share == [pytest.approx(found["calm"]["result"]["share"]), pytest.approx(drifted["share"])]
    verdict = next(v for v in found["quality"]["verdicts"] if v["metric"] == "accuracy")
    assert points[("Accuracy", (("value_type", "live"), ("version", "1")))] == [pytest.approx(verdict["live"])]
    assert (tmp_path / "dashboard.png").stat().st_size > 20_000
    assert kinds == ["drift", "quality", "drift", "rollout"]


def main(argv: list[str]) -> None:
    """``python -m tests.test_evidently_ui_browser WORKSPACE OUT.png [MODEL]``: the dashboard's screenshot."""
    workspace, out = Path(argv[0]).resolve(), Path(argv[1])
    history = HistoryWorkspace(str(workspace))
    model = argv[2] if len(argv) > 2 else history.models()[0]
    project = str(history.project_id(model, create=False))
    with evidently_ui(workspace) as url:
        seen = open_dashboard(url, project, screenshot=out)
    if seen["errors"] or seen["elsewhere"]:
        raise SystemExit(f"the dashboard logged errors {seen['errors']} or asked other hosts {seen['elsewhere']}")
    print(f"{model}: {seen['points']} points, {seen['bars']} bars -> {out}")


if __name__ == "__main__":
    main(sys.argv[1:])
