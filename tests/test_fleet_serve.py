"""Serving a fleet (serving/fleet_backend.py): packed model servers, each model's canary in its own process,
one gateway; each model's state drives that model's rollout only; a packed server that dies comes back with
all its models; a canary that keeps dying is rolled back for its model only. Model servers are the fake
KServe-protocol server (tests/fake_model_server.py) as real processes; no MLflow model is needed."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import httpx
import pytest

from driftloop.core.fleet import load_fleet
from driftloop.core.processes import process_alive
from serving.backend import backend_for
from serving.fleet_backend import Champion, FleetBackend, FleetModelBackend, FleetSupervisor
from serving.local_backend import Supervisor
from tests.serving_helpers import row

FLEET = """\
workspace: ws
defaults:
  data: {source: data.parquet}
  serving: {gateway_port: 0}
models:
  churn: {team: growth}
  demand: {team: planning}
  upsell: {}
"""


def _fake_pack(self, role, members, port=0):  # noqa: ANN001, ANN202 - FleetBackend._start_pack, faked
    from driftloop.core.processes import free_port

    port = port or free_port("127.0.0.1")
    return self.launcher.spawn(role, ["tests.fake_model_server", "--http-port", str(port), "--version",
                                      members[0]["version"]], port, self.READY_PATH)


def _fake_server(self, version, model_uri, port):  # noqa: ANN001, ANN202 - LocalBackend.model_server_argv, faked
    return ["tests.fake_model_server", "--http-port", str(port), "--version", str(version)]


@pytest.fixture
def fleet(tmp_path: Path, monkeypatch):
    monkeypatch.setattr(FleetBackend, "_start_pack", _fake_pack)
    monkeypatch.setattr(FleetModelBackend, "model_server_argv", _fake_server)
    monkeypatch.delenv("DRIFTLOOP_GATEWAY_TOKEN", raising=False)
    path = tmp_path / "fleet.yaml"
    path.write_text(FLEET)
    models = {m.name: m.settings for m in load_fleet(path, environ={}).models}
    backend = FleetBackend(list(models.values()), ready_timeout=60, stop_timeout=5)
    try:
        yield backend, models
    finally:
        backend.stop()


def _champions(*names: str) -> dict[str, Champion]:
    return {n: Champion("1", f"models:/{n}/1", "sqlite:///one.db", 10) for n in names}


def _predict(url: str, name: str) -> httpx.Response:
    return httpx.post(f"{url}/v1/models/{name}:predict", json={"instances": [row(1)]}, timeout=10)


def _until(check, what: str, seconds: float = 60.0) -> None:  # noqa: ANN001
    deadline = time.monotonic() + seconds
    while not check():
        assert time.monotonic() < deadline, f"not within {seconds:g} s: {what}"
        time.sleep(0.05)


def test_one_gateway_one_pack_and_a_rollout_of_one_model_only(fleet):
    backend, models = fleet
    # a canary of churn, pending before serve (as the deploy step leaves it)
    assert "pending" in FleetModelBackend(models["churn"]).deploy_canary("2", "models:/churn/2", 20)
    state = backend.serve(_champions("churn", "demand"))
    url = state["gateway"]["url"]
    assert list(state["packs"]) == ["pack-0"] and len(state["replicas"]) == 1  # two champions, one server
    assert {m["name"] for m in state["packs"]["pack-0"]} == {"churn", "demand"}
    for name in ("churn", "demand"):
        assert _predict(url, name).status_code == 200
    assert _predict(url, "upsell").status_code == 404  # not served: never trained here
    churn_state = FleetModelBackend(models["churn"]).status()
    assert churn_state["gateway"]["url"] == f"{url}/models/churn"
    assert churn_state["primary"]["pid"] == state["replicas"][0]["pid"] and churn_state["canary_percent"] == 20
    assert churn_state["canary"]["pid"] != churn_state["primary"]["pid"]  # a process of its own
    # the rollout target of a fleet model drives that model's split on the fleet gateway
    target = backend_for(models["churn"]).rollout_target()
    assert target.admin_url == f"{url}/models/churn"
    target.set_weight(50)
    status = httpx.get(f"{url}/admin/models").json()["models"]
    assert {m["name"]: m["canary_percent"] for m in status} == {"churn": 50, "demand": 0}
    versions = {_predict(url, "churn").headers["x-model-version"] for _ in range(40)}
    assert versions == {"1", "2"}
    assert {_predict(url, "demand").headers["x-model-version"] for _ in range(10)} == {"1"}
    # promotion stops nothing shared: the pack keeps serving demand
    churn = backend_for(models["churn"]).processes
    churn.promote()
    assert process_alive(state["replicas"][0]["pid"])
    assert {_predict(url, "churn").headers["x-model-version"] for _ in range(10)} == {"2"}
    assert _predict(url, "demand").status_code == 200
    assert FleetModelBackend(models["demand"]).status()["canary_percent"] == 0
    # a rollback of a new canary is churn's alone
    churn.deploy_canary("3", "models:/churn/3", 10)
    canary_pid = churn.status()["canary"]["pid"]
    churn.rollback()
    assert not process_alive(canary_pid) and process_alive(state["replicas"][0]["pid"])
    assert {m["name"]: m["canary"] for m in httpx.get(f"{url}/admin/models").json()["models"]} == \
        {"churn": None, "demand": None}
    # everything stops with the fleet
    pids = [state["gateway"]["pid"], state["replicas"][0]["pid"], churn.status()["primary"]["pid"]]
    assert backend.stop()
    _until(lambda: not any(process_alive(p) for p in pids), "every process stopped")


def test_a_dead_pack_comes_back_with_all_its_models(fleet):
    backend, models = fleet
    state = backend.serve(_champions("churn", "demand", "upsell"))
    url, pack = state["gateway"]["url"], state["replicas"][0]
    supervisor = FleetSupervisor(backend, backoff_initial=0.05, probe_period=0.2)
    os.kill(pack["pid"], signal.SIGKILL)
    _until(lambda: _predict(url, "churn").status_code == 502, "the gateway answers 502 while the pack is down")

    def back() -> bool:
        supervisor.tick()
        now = backend.status()["replicas"][0]
        return now["pid"] != pack["pid"] and all(_predict(url, n).status_code == 200
                                                for n in ("churn", "demand", "upsell"))

    _until(back, "the pack restarted")
    assert backend.status()["restarts"] == {"pack-0": 1}
    new_pid = backend.status()["replicas"][0]["pid"]
    for name in ("churn", "demand", "upsell"):
        assert FleetModelBackend(models[name]).status()["primary"]["pid"] == new_pid
    # the gateway too: restarted on its port with every model
    os.kill(state["gateway"]["pid"], signal.SIGKILL)
    _until(lambda: (supervisor.tick(), backend.status()["restarts"].get("gateway") == 1)[1], "gateway restarted")
    _until(lambda: _predict(url, "demand").status_code == 200, "the new gateway answers")
    assert FleetModelBackend(models["demand"]).status()["gateway"]["pid"] == backend.status()["gateway"]["pid"]


def test_a_crash_looping_canary_is_rolled_back_for_its_model_only(fleet):
    backend, models = fleet
    FleetModelBackend(models["churn"]).deploy_canary("2", "models:/churn/2", 30)
    FleetModelBackend(models["demand"]).deploy_canary("5", "models:/demand/5", 40)
    state = backend.serve(_champions("churn", "demand"))
    url = state["gateway"]["url"]
    churn, demand = backend.models["churn"], backend.models["demand"]
    rolled: list[str] = []
    supervisor = Supervisor(churn, backoff_initial=0.05, probe_period=0.2,
                            on_crashloop=lambda reason: (rolled.append(reason), churn.rollback()))
    for _ in range(3):
        pid = churn.status()["canary"]["pid"]
        os.kill(pid, signal.SIGKILL)
        _until(lambda: (supervisor.tick(), rolled or (churn.status().get("canary") or {}).get("pid") not in
                        (pid, None))[1], "the canary restarted or rolled back")
    assert rolled and "died 3 times" in rolled[0]
    assert churn.status()["canary"] is None and churn.status()["canary_percent"] == 0
    assert process_alive(state["replicas"][0]["pid"])  # the pack serves on
    docs = {m["name"]: m for m in httpx.get(f"{url}/admin/models").json()["models"]}
    assert docs["churn"]["canary"] is None
    assert docs["demand"]["canary_percent"] == 40 and docs["demand"]["canary"]["version"] == "5"
    assert demand.status()["canary"] is not None


def test_a_second_serve_of_the_fleet_is_refused(fleet):
    backend, models = fleet
    state = backend.serve(_champions("churn"))
    other = FleetBackend(list(models.values()))
    from driftloop.core.errors import ServingError

    with pytest.raises(ServingError, match="already serving the fleet"):
        other.serve(_champions("demand"))
    assert _predict(state["gateway"]["url"], "churn").status_code == 200
    with pytest.raises(ServingError, match="belongs to a fleet"):
        FleetModelBackend(models["demand"]).serve("1")


# -- driftloop serve -c FLEET: two tiny registered models, one packed KServe server, one port -----------------
def _register(settings, cols: list[str]) -> None:
    """A tiny scikit-learn model on ``cols``, registered in the model's own store with alias champion."""
    import mlflow
    import pandas as pd
    from mlflow.models import infer_signature
    from sklearn.linear_model import LogisticRegression

    from components.register import trusted_types

    frame = pd.DataFrame({c: [float(i + j) for i in range(8)] for j, c in enumerate(cols)})
    model = LogisticRegression().fit(frame, [i % 2 for i in range(8)])
    settings.workspace_dir.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(settings.tracking_uri)
    name = settings.mlflow.model_name
    artifacts = settings.fleet.root / "artifacts"
    with mlflow.start_run(experiment_id=mlflow.create_experiment(f"e2e-{name}", artifact_location=artifacts.as_uri())):
        for _ in range(2):  # v1 the champion, v2 its challenger
            mlflow.sklearn.log_model(model, name="model", registered_model_name=name, pip_requirements=["scikit-learn"],
                                     signature=infer_signature(frame, model.predict(frame)),
                                     skops_trusted_types=trusted_types(model))
    mlflow.MlflowClient(settings.tracking_uri).set_registered_model_alias(name, "champion", "1")


def test_cli_serves_a_fleet_on_one_port_with_one_packed_server(tmp_path):
    import subprocess
    import sys

    import mlflow

    path = tmp_path / "fleet.yaml"
    # each model its own embedded MLflow store (the default): each champion is loaded from its version's folder,
    # so the two share one packed server all the same
    path.write_text(FLEET)
    models = {m.name: m.settings for m in load_fleet(path, environ={}).models}
    previous = mlflow.get_tracking_uri()
    try:
        _register(models["churn"], ["a", "b"])
        _register(models["demand"], ["x", "y", "z"])  # upsell: not trained
    finally:
        mlflow.set_tracking_uri(previous)
    from components.deploy import deploy_canary
    from serving.rollout import RolloutStore

    for name in ("churn", "demand"):  # each a canary rollout pending, as a retraining run's deploy step leaves it
        assert deploy_canary(models[name], version="2").action == "pending"
    env = {k: v for k, v in os.environ.items() if not k.startswith("DRIFTLOOP_")}
    proc = subprocess.Popen([sys.executable, "-m", "driftloop.app.cli", "serve", "-c", str(path)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    shared = FleetBackend([models["churn"], models["demand"]])
    stores = [RolloutStore(models[n].workspace_dir / "rollout", n) for n in ("churn", "demand")]

    def started() -> bool:  # serving, and both rollouts stepped by the one serve
        return shared.gateway_url is not None and all(s.load().history for s in stores)  # begun by deploy_canary

    try:
        deadline = time.monotonic() + 240
        while not started() and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.5)
        state = shared.status()
        assert state["gateway"] is not None, proc.stdout.read() if proc.poll() is not None else "not started"
        url = state["gateway"]["url"]
        assert list(state["packs"]) == ["pack-0"] and {m["name"] for m in state["packs"]["pack-0"]} == {"churn", "demand"}
        a = httpx.post(f"{url}/v1/models/churn:predict", json={"instances": [{"a": 1.0, "b": 2.0}]}, timeout=30)
        b = httpx.post(f"{url}/v2/models/demand/infer", json={"inputs": [
            {"name": c, "shape": [1], "datatype": "FP64", "data": [1.0]} for c in ("x", "y", "z")]}, timeout=30)
        assert a.status_code == 200 and a.json()["model_version"] in ("1", "2"), a.text
        assert all(s.load().history[0]["decision"] == "start" for s in stores)
        canaries = [FleetModelBackend(models[n]).status()["canary"] for n in ("churn", "demand")]
        assert all(c["version"] == "2" and c["pid"] != state["replicas"][0]["pid"] for c in canaries)
        assert b.status_code == 200 and b.json()["model_name"] == "demand", b.text
        bad = httpx.post(f"{url}/v1/models/churn:predict", json={"instances": [{"x": 1.0}]}, timeout=30)
        assert bad.status_code == 400 and "unknown column" in bad.json()["error"], bad.text  # churn's own signature
        assert httpx.post(f"{url}/v1/models/upsell:predict", json={"instances": [{}]}).status_code == 404
        pids = [state["gateway"]["pid"], state["replicas"][0]["pid"], *(c["pid"] for c in canaries)]
        from typer.testing import CliRunner

        from driftloop.app.cli import app

        shown = CliRunner().invoke(app, ["serve", "status", "-c", str(path), "--json"])
        doc = json.loads(shown.output)
        assert doc["fleet"]["gateway"]["pid"] == pids[0] and doc["models"]["upsell"]["primary"] is None
        assert doc["models"]["churn"]["gateway"]["url"] == f"{url}/models/churn"
        table = CliRunner().invoke(app, ["serve", "status", "-c", str(path)]).output
        assert "churn/primary" in table and "demand/primary" in table and table.count("(pack-0)") == 2
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            out, _ = proc.communicate(timeout=90)
            print(out)  # the serve's own lines, shown when an assertion above fails
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(30)
            raise
    assert proc.returncode == 0, out
    assert "upsell: not trained yet" in out and url in out and "stopped" in out
    assert "rollout churn: start" in out and "rollout demand: start" in out
    assert not any(process_alive(p) for p in pids)
