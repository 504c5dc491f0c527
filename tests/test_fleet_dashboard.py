"""The Grafana dashboard (infra/base/monitoring/dashboard.json) of a fleet: a namespace and a model variable,
every panel's query filtered by both and split by model, checked by Prometheus's own promtool — each query
parses, and over series shaped like the fleet monitor's and Knative's, choosing one model shows that model's
series alone."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from tests.servers import promtool

DASHBOARD = Path(__file__).resolve().parents[1] / "infra" / "base" / "monitoring" / "dashboard.json"


def _queries() -> list[str]:
    doc = json.loads(DASHBOARD.read_text())
    return [t["expr"] for p in doc["panels"] for t in p.get("targets", [])]


def _chosen(expr: str, model: str, namespace: str = ".*") -> str:
    """The query as Grafana sends it with one model chosen (a regex variable, as Grafana formats one value)."""
    return expr.replace("$namespace", namespace).replace("$model", model)


def test_the_dashboard_has_namespace_and_model_variables_and_every_query_uses_them():
    doc = json.loads(DASHBOARD.read_text())
    variables = {v["name"]: v for v in doc["templating"]["list"]}
    assert {"datasource", "namespace", "model"} <= set(variables)
    assert variables["model"]["multi"] and variables["model"]["includeAll"]
    assert "model)" in variables["model"]["definition"] and "$namespace" in variables["model"]["definition"]
    for expr in _queries():
        assert "$model" in expr and "$namespace" in expr, expr


def test_every_query_parses_with_promtool(tmp_path):
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:query_{i}", "expr": _chosen(e, "churn|demand")} for i, e in enumerate(_queries())]}]}
    path = tmp_path / "rules.yaml"
    path.write_text(yaml.safe_dump(rules))
    done = promtool("check", "rules", str(path))
    assert done.returncode == 0, done.stdout + done.stderr


def test_choosing_a_model_shows_its_series_alone(tmp_path):
    """The drift-share and the traffic-split panels over two models' series: with churn chosen, churn's only."""
    drift = next(e for e in _queries() if "dataset_drift_share" in e)
    split = next(e for e in _queries() if "revision_app_request_count" in e and "5xx" not in e)
    knative = 'revision_app_request_count{{namespace_name="ml", configuration_name="{m}-predictor", revision_name="{r}"}}'
    test = {"tests": [{
        "interval": "1m",
        "input_series": [
            {"series": 'driftloop_monitor_dataset_drift_share{namespace="ml", model="churn"}', "values": "0.6x10"},
            {"series": 'driftloop_monitor_dataset_drift_share{namespace="ml", model="demand"}', "values": "0.1x10"},
            {"series": knative.format(m="churn", r="churn-predictor-00001"), "values": "0+40x10"},
            {"series": knative.format(m="churn", r="churn-predictor-00002"), "values": "0+40x10"},
            {"series": knative.format(m="demand", r="demand-predictor-00001"), "values": "0+600x10"},
        ],
        "promql_expr_test": [
            {"expr": _chosen(drift, "churn"), "eval_time": "6m",
             "exp_samples": [{"labels": '{model="churn"}', "value": 0.6}]},
            {"expr": _chosen(drift, "churn|demand"), "eval_time": "6m",
             "exp_samples": [{"labels": '{model="churn"}', "value": 0.6}, {"labels": '{model="demand"}', "value": 0.1}]},
            # churn's canary takes 40 of churn's 80 requests a minute (a 50 % step); demand's 600 do not count
            {"expr": _chosen(split, "churn"), "eval_time": "6m",
             "exp_samples": [
                 {"labels": '{configuration_name="churn-predictor", revision_name="churn-predictor-00001"}',
                  "value": 0.5},
                 {"labels": '{configuration_name="churn-predictor", revision_name="churn-predictor-00002"}',
                  "value": 0.5}]},
        ],
    }]}
    path = tmp_path / "test.yaml"
    path.write_text(yaml.safe_dump(test, sort_keys=False))
    done = promtool("test", "rules", str(path))
    assert done.returncode == 0, done.stdout + done.stderr
