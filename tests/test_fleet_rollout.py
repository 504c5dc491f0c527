"""One rollout controller for a fleet (`driftloop rollout run -c FLEET`): every model's open rollout stepped at
its own interval, several at once, each on its own target; a model that fails never stops another's."""

from __future__ import annotations

import threading
from pathlib import Path

from typer.testing import CliRunner

from driftloop.app.cli import app
from driftloop.app.fleet_rollout import FleetRollouts
from driftloop.core.errors import DriftloopError
from driftloop.core.fleet import load_fleet
from serving.rollout import PROMOTED, ROLLED_BACK, RolloutController
from tests.test_rollout import ScriptedTarget


def _fleet_file(tmp_path: Path) -> Path:
    path = tmp_path / "fleet.yaml"
    path.write_text(f"""\
workspace: {tmp_path / "ws"}
defaults:
  data: {{source: {tmp_path / "none.parquet"}}}
  rollout: {{interval_seconds: 0.05, step_weights: [20, 60], threshold: 2, min_requests: 10, min_labels: 100}}
models:
  alpha: {{team: growth}}
  beta: {{team: growth}}
  gamma: {{team: planning}}
  delta: {{team: planning}}
""")
    return path


def test_each_models_rollout_is_stepped_on_its_own_target_at_once_and_a_failing_model_stops_none(tmp_path):
    """alpha's canary is healthy (promoted), beta's answers errors (rolled back), gamma has no rollout (its target
    is never built), delta's target cannot be built (named at each of its intervals); alpha's and beta's steps
    interleave, and neither target ever sees the other's weights."""
    fleet = load_fleet(_fleet_file(tmp_path), [])
    targets = {name: ScriptedTarget() for name in ("alpha", "beta", "gamma")}
    targets["beta"].canary["error_rate"] = 0.5
    for name in ("alpha", "beta", "delta"):
        RolloutController.begin(fleet.model(name).settings, canary_version="2", primary_version="1")
    built: list[tuple[str, bool]] = []

    def controller(m, need_target: bool) -> RolloutController:
        built.append((m.name, need_target))
        if m.name == "delta" and need_target:
            raise DriftloopError("cluster prod unreachable: https://10.0.0.1:6443: connection refused")
        return RolloutController(m.settings, targets.get(m.name) if need_target else None, None)

    visits = []
    last = FleetRollouts(fleet.models, controller, workers=4, on_visit=visits.append).run(tick=0.01)

    assert last["alpha"].status == PROMOTED and last["beta"].status == ROLLED_BACK
    assert targets["alpha"].calls == [("weight", 20), ("weight", 60), ("promote",)]
    assert ("rollback",) in targets["beta"].calls and ("promote",) not in targets["beta"].calls
    assert all(c[0] != "weight" or c[1] in (20, 60) for c in targets["beta"].calls)
    assert targets["gamma"].calls == [] and ("gamma", True) not in built and not last["gamma"].open
    assert "cluster prod unreachable" in last["delta"].error
    assert sum(v.model == "delta" and v.error is not None for v in visits) >= 2  # visited again at its interval
    stepped = [v.model for v in visits if v.step is not None]
    first_alpha, last_alpha = stepped.index("alpha"), len(stepped) - 1 - stepped[::-1].index("alpha")
    assert "beta" in stepped[first_alpha:last_alpha]  # the two rollouts ran at once, not one after the other


def test_a_stop_lets_the_steps_in_flight_end_and_leaves_the_rollouts_to_resume(tmp_path):
    fleet = load_fleet(_fleet_file(tmp_path), ["rollout.interval_seconds=30"])
    targets = {m.name: ScriptedTarget() for m in fleet.models}
    for m in fleet.models:
        RolloutController.begin(m.settings, canary_version="2", primary_version="1")
    stop, visits = threading.Event(), []

    def on_visit(visit):
        visits.append(visit)
        if len(visits) == len(fleet.models):
            stop.set()

    last = FleetRollouts(fleet.models, lambda m, t: RolloutController(m.settings, targets[m.name] if t else None, None),
                         on_visit=on_visit).run(stop=stop, tick=0.01)
    assert {v.model for v in visits} == set(fleet.names) and all(v.step["decision"] == "start" for v in visits)
    assert all(v.open for v in last.values())
    for m in fleet.models:  # each resumes where it stopped: the next step is its first analysis at 20 %
        again = RolloutController(m.settings, targets[m.name], None)
        assert again.state().weight == 20 and again.step()["decision"] in ("advance", "wait", "hold")


def test_the_command_on_a_fleet_names_the_model_it_cannot_step_and_exits_1(tmp_path):
    """Nothing is served: alpha's open rollout has no gateway to move (one line naming alpha, exit 1); the other
    models have no rollout. Without any open rollout the command says so and exits 0."""
    path = _fleet_file(tmp_path)
    runner = CliRunner()
    result = runner.invoke(app, ["rollout", "run", "-c", str(path)])
    assert result.exit_code == 0 and "no open rollout in the 4 models" in result.output

    fleet = load_fleet(path, [])
    RolloutController.begin(fleet.model("alpha").settings, canary_version="2", primary_version="1")
    result = runner.invoke(app, ["rollout", "run", "-c", str(path), "--max-steps", "1"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    failed = [line for line in result.output.splitlines() if "failed (its next interval tries again)" in line]
    assert failed and all(line.startswith("rollout alpha failed") for line in failed)
