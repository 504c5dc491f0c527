"""`driftloop demo --fleet`, end to end (smaller data): three models on one gateway and one monitor; drift hits
churn only, only churn retrains and rolls out, the other two keep serving untouched."""

import json
import subprocess
import sys

import pytest

from driftloop.core.processes import process_alive


@pytest.mark.timeout(660)  # the demo's own limit is 600 s; on a shared, loaded machine it takes a few minutes
def test_the_fleet_demo_retrains_and_rolls_out_only_the_drifting_model(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "driftloop.app.cli", "demo", "--fleet", "--workdir", "demo",
                           "--rows", "5000"], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for noise in ("Warning", "WARNING", "Traceback", "KFP Executor", "executor_input", "HTTP Request"):
        assert noise not in proc.stdout + proc.stderr, proc.stdout + proc.stderr
    assert max(len(line) for line in proc.stdout.splitlines()) <= 80  # a pipe: 80 columns
    workdir = tmp_path / "demo"
    facts = json.loads((workdir / "summary.json").read_text())
    assert facts["calm"] == {"churn": "no drift", "upsell": "no drift", "demand": "no drift"}
    alert = facts["alert"]
    assert alert["decision"] == "started" and facts["retrain"]["id"] == alert["id"]
    versions = {name: {v["version"]: v for v in vs} for name, vs in facts["versions"].items()}
    triggers = {name: [(v["version"], v.get("trigger")) for v in vs] for name, vs in facts["versions"].items()}
    assert set(versions["upsell"]) == {"1"} and set(versions["demand"]) == {"1"}, (triggers, facts.get("status"))
    retrained = versions["churn"]["2"]
    assert retrained["trigger"] == f"drift:{alert['id']}" and retrained["rollout"] == "promoted"
    assert "champion" in retrained["aliases"] and facts["rollout"]["status"] == "promoted"
    for name in ("upsell", "demand"):  # kept serving while churn rolled out, none of their requests failed
        served = facts["served_during_rollout"][name]
        assert served["ok"] > 0 and served["error"] == 0, facts["served_during_rollout"]
    assert "driftloop status" in facts["status"]["calm traffic"] and "after churn's rollout" in " ".join(facts["status"])
    pids = []  # every process the fleet's serving state names (gateway, packed servers, canaries) is gone

    def collect(node):  # noqa: ANN001
        if isinstance(node, dict):
            pids.extend(v for k, v in node.items() if k == "pid" and isinstance(v, int))
            for v in node.values():
                collect(v)
        elif isinstance(node, list):
            for v in node:
                collect(v)

    for state in (workdir / "ws").glob("**/serving/state.json"):
        collect(json.loads(state.read_text()))
    assert not [pid for pid in pids if process_alive(pid)], pids
    assert not list(workdir.glob("*.pid"))
