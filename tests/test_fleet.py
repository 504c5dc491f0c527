"""A fleet in one validated file (driftloop/core/fleet.py) and its training (driftloop/app/fleet_cli.py):
the example loads, a one-model file is a fleet of one, every bad input is one line naming the key path,
and the fleet's runs go at most ``fleet.max_concurrent_runs`` at once, one failure stopping no other."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest

from driftloop.core.config import load_settings
from driftloop.core.errors import ConfigError
from driftloop.core.fleet import load_fleet, model_gpus
from tests.test_trust_workspace import run_cli

ROOT = Path(__file__).resolve().parent.parent


def write(tmp_path: Path, text: str, name: str = "fleet.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


TWO = """\
workspace: ws
defaults:
  data: {source: data.parquet, time_column: event_time}
models:
  churn:
    team: growth
  demand:
    model: {task: regression}
"""


def error(tmp_path: Path, text: str, overrides: list[str] | None = None) -> str:
    with pytest.raises(ConfigError) as exc:
        load_fleet(write(tmp_path, text), overrides, environ={})
    message = str(exc.value)
    assert "\n" not in message
    return message.replace(str(tmp_path), "TMP")


def test_the_example_fleet_loads_with_a_workspace_names_and_ports_per_model():
    fleet = load_fleet(ROOT / "examples" / "fleet.yaml", environ={})
    assert not fleet.single and fleet.names == ["churn", "upsell", "demand", "spend"]
    assert {m.settings.model.task for m in fleet.models} == {"classification", "regression"}
    assert [m.team for m in fleet.models] == ["growth", "growth", "planning", "planning"]
    root = (ROOT / ".driftloop" / "fleet").resolve()
    for m in fleet.models:
        s = m.settings
        assert s.workspace_dir == root / "models" / m.name
        assert s.mlflow.model_name == s.serving.name == m.name
        assert s.data.source == str(root / "data" / f"{m.name}.parquet")  # relative to the file's folder
        assert s.data.time_column == "event_time" and s.trigger.daily_budget == 3  # from defaults
    # one gateway and one monitor for the fleet: the same ports, a path of its own on the monitor
    assert {m.settings.serving.gateway_port for m in fleet.models} == {8080}
    assert {m.settings.monitor.port for m in fleet.models} == {8090}
    assert [m.settings.monitor.base_path for m in fleet.models] == [f"/models/{n}" for n in fleet.names]
    for m in fleet.models:
        member = m.settings.fleet
        assert member.name == m.name and member.team == m.team and member.root == root
        assert member.models == tuple(fleet.names) and member.limits == fleet.limits
    assert fleet.models[1].settings.rollout.step_weight == 25 and fleet.models[0].settings.rollout.step_weight == 20
    assert fleet.limits.max_concurrent_runs == 2 and fleet.limits.daily_runs == 12 and fleet.limits.gpus == 0


def test_a_one_model_configuration_is_a_fleet_of_one_with_its_own_settings():
    demo = ROOT / "examples" / "demo.yaml"
    fleet = load_fleet(demo, ["gate.margin=0.1"], environ={})
    assert fleet.single and fleet.names == ["churn"] and fleet.models[0].team is None
    assert fleet.models[0].settings == load_settings(demo, ["gate.margin=0.1"], environ={})
    assert fleet.limits.max_concurrent_runs == 2
    assert fleet.select(None) == list(fleet.models) and fleet.select("churn") == list(fleet.models)
    with pytest.raises(ConfigError, match=r"^--model 'other': no such model in .*demo.yaml \(models: churn\)$"):
        fleet.model("other")


def test_params_address_the_file_or_every_model_and_the_environment_every_model(tmp_path):
    path = write(tmp_path, TWO)
    fleet = load_fleet(path, ["models.demand.gate.margin=0.5", "model.params.max_iter=7", f"workspace={tmp_path}/w2"],
                       environ={"DRIFTLOOP_TRIGGER__COOLDOWN_SECONDS": "5"})
    churn, demand = (m.settings for m in fleet.models)
    assert demand.gate.margin == 0.5 and churn.gate.margin == 0.0
    assert churn.model.params == demand.model.params == {"max_iter": 7}
    assert churn.trigger.cooldown_seconds == demand.trigger.cooldown_seconds == 5
    assert churn.workspace_dir == tmp_path / "w2" / "models" / "churn"


def test_the_shared_ports_are_set_under_defaults(tmp_path):
    fleet = load_fleet(write(tmp_path, TWO.replace("defaults:\n", "defaults:\n  serving: {gateway_port: 9100}\n"
                                                                 "  monitor: {port: 9200}\n")), environ={})
    assert {(m.settings.serving.gateway_port, m.settings.monitor.port) for m in fleet.models} == {(9100, 9200)}
    assert load_fleet(ROOT / "examples" / "demo.yaml", environ={}).models[0].settings.fleet is None


CLUSTER = """\
workspace: ws
defaults:
  data: {source: data.parquet}
models:
  churn: {team: growth}
  upsell: {team: growth, serving: {namespace: shared, logger_url: "http://mon.example:9000/own/events"}}
  demand: {team: planning}
  spend: {}
"""


def test_on_a_cluster_a_teams_models_live_in_its_namespace_and_log_to_their_path_on_the_one_monitor(tmp_path):
    s = {m.name: m.settings.serving for m in load_fleet(write(tmp_path, CLUSTER), environ={}).models}
    monitor = "http://driftloop-monitor.driftloop.svc.cluster.local"  # the one-model default's origin
    assert {n: v.namespace for n, v in s.items()} == {"churn": "growth", "upsell": "shared", "demand": "planning",
                                                      "spend": "driftloop"}  # no team: the one-model default
    assert s["churn"].logger_url == f"{monitor}/models/churn/events"
    assert s["demand"].logger_url == f"{monitor}/models/demand/events"
    assert s["spend"].logger_url == f"{monitor}/models/spend/events"
    assert s["upsell"].logger_url == "http://mon.example:9000/own/events"  # the model's own wins


def test_the_defaults_namespace_wins_over_the_team_and_their_monitor_gives_the_origin(tmp_path):
    text = CLUSTER.replace("  data: {source: data.parquet}\n", "  data: {source: data.parquet}\n  serving: "
                           "{namespace: ml, logger_url: 'https://monitor.ml.svc:8443/base/events'}\n")
    s = {m.name: m.settings.serving for m in load_fleet(write(tmp_path, text), environ={}).models}
    assert {n: v.namespace for n, v in s.items()} == {"churn": "ml", "upsell": "shared", "demand": "ml", "spend": "ml"}
    assert s["churn"].logger_url == "https://monitor.ml.svc:8443/models/churn/events"
    assert s["upsell"].logger_url == "http://mon.example:9000/own/events"
    # --param over every model still applies over the model's own sections, as the environment does
    fleet = load_fleet(write(tmp_path, text), ["models.demand.serving.namespace=demand-ns"], environ={})
    assert fleet.model("demand").settings.serving.namespace == "demand-ns"
    # a one-model file keeps its one logger URL and namespace
    one = load_fleet(ROOT / "examples" / "demo.yaml", environ={}).models[0].settings.serving
    assert (one.namespace, one.logger_url) == ("driftloop", "http://driftloop-monitor.driftloop.svc.cluster.local/events")


def test_gpus_a_model_may_hold():
    s = load_settings(overrides={"model.gpu": True, "model.accelerator_limit": 2, "serving.gpu": 1,
                                 "serving.max_replicas": 3}, environ={})
    assert model_gpus(s) == 5
    s = load_settings(overrides={"model.learner": "xgboost", "model.distributed.workers": 4,
                                 "model.distributed.gpus_per_worker": 1}, environ={})
    assert model_gpus(s) == 4


BAD = [
    ("a model named twice",
     TWO + "  churn:\n    team: other\n",
     "models.churn: model 'churn' is declared twice (lines 5 and 9 of TMP/fleet.yaml); model names must be unique"),
    ("an unknown key of a model's section",
     TWO + "  bad:\n    gate: {marginn: 0.1}\n",
     "models.bad.gate.marginn: unknown key (TMP/fleet.yaml)"),
    ("a wrong value of a model's section",
     TWO + "  bad:\n    data: {test_size: 2}\n",
     "models.bad.data.test_size: Input should be less than 1 (TMP/fleet.yaml)"),
    ("a model whose sections disagree",
     TWO + "  bad:\n    model: {task: regression}\n    gate: {metric: accuracy}\n",
     "models.bad: gate.metric 'accuracy' does not fit task 'regression' (use one of: mae, r2, rmse) (TMP/fleet.yaml)"),
    ("two models on one serving name",
     TWO + "  other:\n    serving: {name: churn}\n",
     "models.other.serving.name: churn is also models.churn.serving.name; each model needs its own"),
    ("two models on one MLflow model name",
     TWO + "  other:\n    mlflow: {model_name: demand}\n",
     "models.other.mlflow.model_name: demand is also models.demand.mlflow.model_name; each model needs its own"),
    ("two models on one model-server port",
     TWO + "  other:\n    serving: {primary_port: 9000}\n  more:\n    serving: {canary_port: 9000}\n",
     "models.more.serving.canary_port: 9000 is also models.other.serving.primary_port; each model needs its own"),
    ("a model with a gateway of its own",
     TWO + "  other:\n    serving: {gateway_port: 9000}\n",
     "models.other.serving.gateway_port: the fleet's models share one gateway; set serving.gateway_port under "
     "defaults"),
    ("two models on one monitor path",
     TWO + "  other:\n    monitor: {base_path: /models/churn}\n",
     "models.other.monitor.base_path: /models/churn is also models.churn.monitor.base_path; each model needs its own"),
    ("a fleet over its GPU budget",
     TWO.replace("models:", "fleet: {gpus: 2}\nmodels:") + "  big:\n    model: {gpu: true}\n"
     "    serving: {gpu: 1, max_replicas: 2}\n",
     "fleet.gpus: the fleet is over its budget of 2: 3 GPUs the models request (big 3)"),
    ("an unknown top-level key",
     TWO + "servng: {}\n",
     "servng: unknown top-level key in fleet file TMP/fleet.yaml; a fleet file takes defaults, fleet, models, "
     "workspace"),
    ("a section beside models instead of under defaults",
     TWO + "gate: {margin: 0.1}\n",
     "gate: unknown top-level key in fleet file TMP/fleet.yaml (shared sections go under defaults:); a fleet file "
     "takes defaults, fleet, models, workspace"),
    ("a shared workspace",
     TWO.replace("defaults:", "defaults:\n  workspace: shared"),
     "defaults.workspace: set workspace at the top level; model NAME's workspace is <workspace>/models/NAME"),
    ("a model name that cannot be a route",
     TWO + "  Bad_Name: {}\n",
     "models.Bad_Name: 'Bad_Name' is not a valid model name: use 1-63 lower-case letters, digits and '-', starting "
     "and ending with a letter or digit (a DNS-1123 label, e.g. churn-model)"),
    ("a team that is no team name",
     TWO + "  other:\n    team: [a]\n",
     "models.other.team: ['a'] is not a team name (a DNS-1123 label: lower-case letters, digits and '-', e.g. growth)"),
    ("a fleet limit out of range",
     TWO.replace("models:", "fleet: {max_concurrent_runs: 0}\nmodels:"),
     "fleet.max_concurrent_runs: Input should be greater than or equal to 1"),
    ("no model", "workspace: ws\nmodels: {}\n", "models: the fleet in TMP/fleet.yaml declares no model"),
    ("defaults without models", "defaults: {}\n", "defaults: a fleet file needs a models: section (TMP/fleet.yaml)"),
]


@pytest.mark.parametrize(("text", "message"), [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_input_is_one_line_naming_the_key_path(tmp_path, text, message):
    assert error(tmp_path, text) == message


def test_a_param_that_puts_two_models_on_one_route_is_refused(tmp_path):
    assert error(tmp_path, TWO, ["mlflow.model_name=same"]) == (
        "models.demand.mlflow.model_name: same is also models.churn.mlflow.model_name; each model needs its own")


# --- training: the queue of child processes ------------------------------------------------------------
CHILD = """\
import os, sys, time
folder, name, fail = sys.argv[1], sys.argv[2], sys.argv[3] == "fail"
marks = lambda kind: [f for f in os.listdir(folder) if f.startswith(kind)]
open(os.path.join(folder, "start-" + name), "w").close()
running = len(marks("start-")) - len(marks("end-"))
open(os.path.join(folder, "seen-" + name), "w").write(str(running))
if name in ("a", "b"):  # the first two wait for each other: they ran at once
    deadline = time.monotonic() + 60
    while len(marks("start-")) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
open(os.path.join(folder, "end-" + name), "w").close()
sys.exit(1 if fail else 0)
"""


def test_two_runs_at_once_and_the_third_queued_one_failure_stopping_no_other(tmp_path):
    from driftloop.app.fleet_cli import ChildRun, run_children

    script = write(tmp_path, CHILD, "child.py")
    marks = tmp_path / "marks"
    marks.mkdir()
    runs = [ChildRun(name, [sys.executable, str(script), str(marks), name, "fail" if name == "a" else "ok"],
                     tmp_path / name / "out.log", tmp_path / name / "result.json") for name in ("a", "b", "c")]
    order: list[str] = []
    done = run_children(runs, 2, on_start=lambda r: order.append(f"start {r.name}"),
                        on_end=lambda r: order.append(f"end {r.name}"), poll_seconds=0.05)
    assert [r.code for r in done] == [1, 0, 0]  # a failed; b and c ran to their end all the same
    assert order[:2] == ["start a", "start b"] and order[-1] == "end c"
    assert order.index("start c") > min(order.index("end a"), order.index("end b"))  # queued behind them
    seen = {name: int((marks / f"seen-{name}").read_text()) for name in ("a", "b", "c")}
    assert max(seen.values()) <= 2  # never three at once, as each child saw it
    assert {f"end-{n}" for n in "ab"} <= {p.name for p in marks.iterdir()}  # a and b each saw the other start
    assert all(r.started <= r.ended for r in done)


def test_the_child_command_of_a_model_carries_the_options(tmp_path):
    from driftloop.app.fleet_cli import train_command

    fleet = load_fleet(write(tmp_path, TWO), environ={})
    cmd = train_command(fleet, "demand", ["gate.margin=0.1"], {"--trigger": "manual", "--window-start": None,
                                                                "--wait": True, "--window-end": "2026-01-02"},
                        tmp_path / "r.json")
    assert cmd[1:] == ["-m", "driftloop.app.cli", "run", "train", "-c", str(tmp_path / "fleet.yaml"), "--model",
                       "demand", "--param", "gate.margin=0.1", "--trigger", "manual", "--wait", "--window-end",
                       "2026-01-02", "--result-file", str(tmp_path / "r.json")]


def test_a_finished_childs_line_says_its_gate_or_its_error(tmp_path):
    from driftloop.app.fleet_cli import ChildRun, outcome

    run = ChildRun("churn", [], tmp_path / "out.log", tmp_path / "result.json", code=0)
    run.result.write_text('{"state": "SUCCEEDED", "run_id": "r1", "summary": {"model_version": "3", "gate": '
                          '"passed", "reason": "beats the champion"}}')
    assert outcome(run) == (True, "v3 gate passed: beats the champion")
    run.result.write_text('{"state": "FAILED", "run_id": "r1", "error": "step \'ingest\' failed: empty window"}')
    assert outcome(run) == (False, "step 'ingest' failed: empty window")
    run.result.unlink()
    run.code = 2
    run.log.write_text("driftloop training pipeline\nerror: data source not found: x.parquet\n")
    assert outcome(run) == (False, f"error: data source not found: x.parquet (exit 2; output: {run.log})")


# --- the CLI ------------------------------------------------------------------------------------------
def test_run_train_on_a_bad_fleet_file_is_one_line_and_starts_nothing(tmp_path, monkeypatch, capsys):
    path = write(tmp_path, TWO + "  other:\n    serving: {name: churn}\n")
    code, out, err = run_cli(["run", "train", "-c", str(path)], monkeypatch, capsys)
    assert code == 2 and out == ""
    assert err == ("error: models.other.serving.name: churn is also models.churn.serving.name; each model needs "
                   "its own\n")
    assert not (tmp_path / "ws").exists()  # no workspace made, no run started


def test_run_train_model_names_an_unknown_model_in_one_line(tmp_path, monkeypatch, capsys):
    code, out, err = run_cli(["run", "train", "-c", str(write(tmp_path, TWO)), "--model", "nope"], monkeypatch, capsys)
    assert code == 2
    assert err == f"error: --model 'nope': no such model in {tmp_path / 'fleet.yaml'} (models: churn, demand)\n"


def test_run_train_model_trains_that_model_with_its_own_settings(tmp_path, monkeypatch, capsys):
    """``--model NAME`` runs the one pipeline in this process with that model's settings (runner injected)."""
    import pipelines.runner
    import pipelines.training
    from driftloop.core.runs import RunResult

    used = []
    monkeypatch.setattr(pipelines.runner, "runner_for", lambda settings: used.append(settings) or object())
    monkeypatch.setattr(pipelines.training, "run_training", lambda runner, request, **kw: RunResult(
        request.request_id, "run-1", "FAILED", "local", error="step 'ingest' failed: no rows"))
    result = tmp_path / "result.json"
    code, out, err = run_cli(["run", "train", "-c", str(write(tmp_path, TWO)), "--model", "demand",
                              "--result-file", str(result)], monkeypatch, capsys)
    assert code == 1 and "run failed" in err
    assert [s.mlflow.model_name for s in used] == ["demand"] and used[0].model.task == "regression"
    assert used[0].workspace_dir == tmp_path / "ws" / "models" / "demand"
    assert '"state": "FAILED"' in result.read_text()


def test_run_train_on_a_fleet_runs_a_real_child_per_model_and_reports_each(tmp_path, monkeypatch, capsys):
    """The whole path: the parent starts ``driftloop run train -c FLEET --model NAME`` per model, each child
    loads its own model's settings and ends (here refused at once: this test holds every model's workspace
    lock), and the parent prints one line per model with the child's own error and exits 1."""
    import contextlib

    from driftloop.core.workspace import workspace_lock

    path = write(tmp_path, TWO.replace("models:", "fleet: {max_concurrent_runs: 2}\nmodels:") + "  third: {}\n")
    fleet = load_fleet(path, environ={})
    with contextlib.ExitStack() as stack:
        for m in fleet.models:
            stack.enter_context(workspace_lock(m.settings.workspace_dir, f"held-{m.name}", wait=False))
        code, out, err = run_cli(["run", "train", "-c", str(path)], monkeypatch, capsys)
    assert code == 1 and err.strip().splitlines()[-1] == "3 of 3 models failed: churn, demand, third"
    text = " ".join(out.split())
    assert text.count("started (output:") == 3 and "2 at a time" in text
    for m in fleet.models:
        assert f"✗ {m.name}" in text
        assert f"error: run held-{m.name} (pid " in text  # each child's own one-line error, its workspace's holder
        assert (m.settings.workspace_dir / "fleet" / "train.log").is_file()
