"""The whole loop, end to end, through `driftloop demo` (smaller data): the README's main command."""

import json
import os
import re
import subprocess
import sys

import httpx
import pytest

from driftloop.core.processes import process_alive


@pytest.mark.timeout(660)  # the demo's own limit is 600 s; on a shared, loaded machine it can take 4 min
def test_demo_closes_the_loop_and_leaves_nothing_running(tmp_path):
    workdir = tmp_path / "demo"
    # run as `make demo` runs it: from the project's folder, the demo's folder under it
    proc = subprocess.run([sys.executable, "-m", "driftloop.app.cli", "demo", "--workdir", "demo", "--rows", "8000"],
                          capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # what the terminal shows (a pipe: 80 columns): one screen per phase of the loop, no warnings, no task logs
    screens = demo_screens(proc.stdout)
    assert [name for name, _ in screens][:3] == ["data", "train", "monitor"] and screens[-1][0] == "summary"
    assert all(len(lines) <= 24 for _, lines in screens), [(name, len(lines)) for name, lines in screens]
    assert len(proc.stdout.splitlines()) <= 90, proc.stdout
    for noise in ("Warning", "WARNING", "Traceback", "KFP Executor", "executor_input", "HTTP Request"):
        assert noise not in proc.stdout + proc.stderr, proc.stdout + proc.stderr
    assert max(len(line) for line in proc.stdout.splitlines()) <= 80
    facts = json.loads((workdir / "summary.json").read_text())
    assert facts["calm_check"]["verdict"] == "no drift"
    assert facts["drift_check"]["verdict"] == "drift"
    alert_id = facts["alert"]["id"]
    versions = {v["version"]: v for v in facts["versions"]}
    retrained = versions[str(facts["retrain"]["model_version"])]
    assert retrained["trigger"] == f"drift:{alert_id}"
    assert facts["rollout_good"]["status"] == "promoted" and "champion" in retrained["aliases"]
    weak = versions[str(facts["weak"]["model_version"])]
    assert facts["rollout_bad"]["status"] == "rolled_back" and weak["rollout"] == "rolled_back"
    assert "champion" not in weak["aliases"]
    assert facts["reports"] and all(os.path.exists(p) for p in facts["reports"])
    # the quality check on the labels that flowed through the gateway: realised and estimated, per version
    # (a version rolled back after fewer labelled requests than one window holds is "insufficient labels")
    versions_q = facts["quality"]["versions"]
    judged = {v: q for v, q in versions_q.items() if "live" in q}
    assert str(facts["retrain"]["model_version"]) in judged, versions_q  # thousands of labelled requests
    assert all("accuracy" in q["live"] and "accuracy" in (q.get("estimated") or q["estimated_latest"])
               for q in judged.values())
    assert all(q["verdict"] == "insufficient labels" for v, q in versions_q.items() if v not in judged and "holdout" in q)
    # lineage of the champion: alert (with its report) → run → data window → gate → rollout steps
    out = subprocess.run([sys.executable, "-m", "driftloop.app.cli", "lineage", "churn@champion", "--json",
                          "-c", str(workdir / "driftloop.yaml")], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    lineage = json.loads(out.stdout)
    assert lineage["trigger"] == f"drift:{alert_id}" and lineage["trigger_detail"]["drift report"]
    assert lineage["gate"] == "passed" and lineage["rollout_outcome"] == "promoted"
    assert [s["decision"] for s in lineage["rollout_steps"]][-1] == "promote"
    # nothing left behind: the state of the local serving backend is empty and its processes are gone
    state = json.loads((workdir / "ws" / "serving" / "state.json").read_text()) if (
        workdir / "ws" / "serving" / "state.json").exists() else {}
    for role in ("primary", "canary", "gateway"):
        info = state.get(role)
        assert not info or not process_alive(info["pid"]), f"{role} still running"
    assert not list(workdir.glob("*.pid"))
    config = (workdir / "driftloop.yaml").read_text()
    port = int(config.split("gateway_port:")[1].split()[0])
    try:
        httpx.get(f"http://127.0.0.1:{port}/admin/status", timeout=1.0)
        raise AssertionError("the gateway still answers after the demo")
    except httpx.HTTPError:
        pass


def demo_screens(out: str) -> list[tuple[str, list[str]]]:
    """The demo's output cut where its narration moves to another phase (``  12.3s drift  …``): the
    lines of each, the narrated line with its wrapped tail and the steps under it; the closing summary
    table on a screen of its own."""
    screens: list[tuple[str, list[str]]] = []
    for line in out.splitlines():
        said = re.match(r"^\s*\d+\.\ds (\S+)", line)
        if said and (not screens or screens[-1][0] != said.group(1)) and said.group(1) != "done":
            screens.append((said.group(1), []))
        elif "driftloop demo — the loop closed" in line:
            screens.append(("summary", []))
        if screens:
            screens[-1][1].append(line)
    return screens

