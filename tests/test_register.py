"""Registration: a retrain on the champion's own data and parameters registers nothing and says so; the run
summary prints the data window half-open. Real pipeline runs under kfp.local, real local MLflow."""

from __future__ import annotations

import pandas as pd

from components.register import RunContext, describe_window, fingerprint, half_open
from driftloop.core.registry import CHAMPION, TAG, Registry
from pipelines.runner import LocalRunner, RunRequest
from pipelines.training import run_training, step_detail
from tests.conftest import make_settings


def test_a_retrain_on_the_champions_data_and_parameters_registers_nothing(tmp_path, scenario_path):
    settings = make_settings(tmp_path / "ws", scenario_path, **{"gate.margin": -1.0})  # the gate lets it through
    first = run_training(LocalRunner(settings), RunRequest(window_end="2026-01-31"))
    assert first.state == "SUCCEEDED" and first.summary["model_version"] == "1", first.error
    registry = Registry.from_settings(settings)
    champion = registry.resolve(f"churn@{CHAMPION}")
    assert len(champion.tags["driftloop.data_fingerprint"]) == 64

    again = run_training(LocalRunner(settings), RunRequest(trigger="drift:alert-7", window_end="2026-01-31"))
    assert again.state == "SUCCEEDED", again.error
    s = again.summary
    assert s["gate"] == "passed" and "model_version" not in s
    assert s["registered"].startswith("nothing registered: the same data fingerprint and parameters as champion v1")
    assert s["reason"].endswith(s["registered"])  # the run summary's gate line says it
    assert [v.version for v in registry.list_versions("churn")] == ["1"]  # no identical v2, no canary
    run = registry.run(s["mlflow_run_id"])
    assert run.data.tags[TAG.TRIGGER] == "drift:alert-7" and run.data.tags["driftloop.registered"] == s["registered"]
    assert registry.resolve(f"churn@{CHAMPION}").version == "1"
    # the window is the run's, half-open as asked, with the rows it read (its last before the exclusive end)
    assert s["window"].startswith("[-inf, 2026-01-31): rows 2026-01-01")
    assert s["window"].split(" .. ")[1] < "2026-01-31"

    other = run_training(LocalRunner(settings), RunRequest(window_end="2026-02-10"))  # other data: a new version
    assert other.state == "SUCCEEDED" and other.summary["model_version"] == "2", other.error


def test_the_fingerprint_follows_the_rows_and_the_parameters():
    rows = pd.DataFrame({"x": [1.0, 2.0, 3.0], "c": ["a", "b", "a"], "label": [0, 1, 0]})
    schema = {"target": "label", "numeric": ["x"], "categorical": ["c"]}
    ctx = RunContext("manual", "p", "r", "", "s", "hist_gradient_boosting", "classification", "cpu", {"max_iter": 50})
    base = fingerprint(rows, rows.tail(1), schema, ctx)
    assert base == fingerprint(rows.copy(), rows.tail(1).copy(), schema, ctx)  # same rows, same parameters
    changed = rows.assign(x=[1.0, 2.0, 3.5])
    assert fingerprint(changed, rows.tail(1), schema, ctx) != base
    other = RunContext("manual", "p", "r", "", "s", "hist_gradient_boosting", "classification", "cpu", {"max_iter": 60})
    assert fingerprint(rows, rows.tail(1), schema, other) != base
    assert fingerprint(rows, rows.tail(1), schema, RunContext(**{**ctx.__dict__, "device": "cuda"})) == base


def test_windows_print_half_open():
    assert half_open("2014-12-01", "2015-01-01") == "[2014-12-01, 2015-01-01)"  # 31 December is in, 1 January not
    assert half_open(None, None) == "[-inf, +inf)"
    assert describe_window("[-inf, 2015-01-01)", "2014-01-01T00:00:00+00:00 .. 2014-12-31T18:00:00+00:00") == \
        "[-inf, 2015-01-01): rows 2014-01-01T00:00:00+00:00 .. 2014-12-31T18:00:00+00:00"
    assert describe_window(None, "2014-01-01 .. 2014-12-31") == "2014-01-01 .. 2014-12-31"  # a run logged before
    assert describe_window("[-inf, +inf)", "all rows") == "all rows"  # no time column: no window
    assert step_detail("register_op", {"parameterValues": {"version": "1", "aliases": ""}}) == \
        "nothing registered: same data and parameters as champion v1"
