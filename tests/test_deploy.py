"""The deploy step and the local serving backend, with real KServe model servers and a real MLflow registry."""

from __future__ import annotations

import threading
from pathlib import Path

import httpx
import pandas as pd
import pytest

from components.deploy import deploy_canary, serving_home
from driftloop.core.errors import RegistryError, ServingError
from driftloop.core.registry import CHAMPION, Registry
from serving.local_backend import LocalBackend, process_alive
from serving.rollout import PROMOTED, GatewayTarget, RolloutController
from tests.conftest import make_settings


def _registry_with_versions(settings, sources: list[tuple[str, str | None]]) -> Registry:
    """Own registry: one version per (source, run_id); v1 = champion, last = challenger."""
    reg = Registry.from_settings(settings)
    name = settings.mlflow.model_name
    reg.client.create_registered_model(name)
    for source, run_id in sources:
        reg.client.create_model_version(name, source=source, run_id=run_id)
    reg.set_alias(name, CHAMPION, "1")
    reg.set_alias(name, "challenger", str(len(sources)))
    return reg


def test_deploy_skips_when_disabled_and_for_the_first_version(tmp_path):
    s = make_settings(tmp_path / "ws", tmp_path / "x.parquet")
    assert serving_home(s) == "local"
    assert serving_home(make_settings(tmp_path / "ws", tmp_path / "x", **{"kfp.host": "http://kfp"})) == "kserve"
    reg = _registry_with_versions(s, [(str(tmp_path / "m1"), None)])
    assert deploy_canary(s, version="1", home="none").action == "skipped"
    first = deploy_canary(s, version="1", registry=reg)
    assert first.action == "none" and "champion" in first.message
    with pytest.raises(RegistryError):
        deploy_canary(s, version="9", registry=reg)
    assert not (s.workspace_dir / "rollout").exists()


def test_deploy_with_nothing_served_records_a_pending_canary(tmp_path):
    s = make_settings(tmp_path / "ws", tmp_path / "x.parquet")
    reg = _registry_with_versions(s, [(str(tmp_path / "m1"), None), (str(tmp_path / "m2"), None)])
    result = deploy_canary(s, version="2", registry=reg)
    assert result.action == "pending" and "driftloop serve" in result.message
    state = LocalBackend(s).status()
    assert state["pending_canary"]["version"] == "2" and state["gateway"] is None
    rollout = RolloutController(s, target=None).state()
    assert rollout.status == "pending" and rollout.canary_version == "2" and rollout.primary_version == "1"


class _RecordingKServe:
    """Records what the deploy step asks of the InferenceService backend."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def set_canary(self, model_uri: str, percent: int) -> None:
        self.calls.append(("set_canary", model_uri, percent))


def test_deploy_on_a_cluster_patches_the_inference_service(tmp_path):
    s = make_settings(tmp_path / "ws", tmp_path / "x.parquet", **{"rollout.step_weights": [10, 50]})
    reg = _registry_with_versions(s, [(str(tmp_path / "m1"), None), (str(tmp_path / "m2"), None)])
    backend = _RecordingKServe()
    result = deploy_canary(s, version="2", home="kserve", registry=reg, backend=backend)
    assert result.action == "canary" and result.percent == 10
    assert backend.calls == [("set_canary", "models:/churn/2", 10)]


@pytest.fixture(scope="module")
def served_pair(trained, tmp_path_factory):
    """Own registry whose v1 and v2 are the session's trained model (real MLflow artifacts)."""
    base, result = trained
    src_reg = Registry.from_settings(base)
    champ = src_reg.resolve("churn@champion")
    import mlflow.artifacts

    # a plain copy of the model's files, so the new registry's versions do not point at the other store
    source = mlflow.artifacts.download_artifacts(artifact_uri="models:/churn@champion", tracking_uri=base.tracking_uri,
                                                 dst_path=str(tmp_path_factory.mktemp("model-copy")))
    mlmodel = Path(source) / "MLmodel"  # the copy is a plain model folder, not a logged model of the other store
    mlmodel.write_text("".join(line for line in mlmodel.read_text().splitlines(keepends=True)
                               if not line.startswith("model_id:")))
    ws = tmp_path_factory.mktemp("deploy-ws")
    s = make_settings(ws, base.data.source, **{
        "serving.gateway_port": 0, "serving.name": "churn", "rollout.step_weights": [50],
        "rollout.interval_seconds": 1.0, "rollout.min_requests": 5, "rollout.threshold": 2,
        "rollout.max_p99_latency_ms": 2000.0})
    reg = _registry_with_versions(s, [(source, None), (source, None)])
    frame = pd.read_parquet(base.data.source).head(20)
    return s, reg, frame


def test_serve_deploy_promote_with_real_model_servers(served_pair):
    s, reg, frame = served_pair
    backend = LocalBackend(s)
    state = backend.serve("1")
    pids = {role: state[role]["pid"] for role in ("primary", "gateway")}
    try:
        url = state["gateway"]["url"]
        assert url.startswith("http://127.0.0.1:")
        rows = frame.drop(columns=["label", "event_time"]).astype(object).where(frame.notna(), None)
        instances = rows.to_dict(orient="records")
        r = httpx.post(f"{url}/v1/models/churn:predict", json={"instances": instances}, timeout=30)
        assert r.status_code == 200, r.text
        model = reg.load_pyfunc("models:/churn/1")
        expected = model.predict(frame.drop(columns=["label", "event_time"]))
        assert r.json()["predictions"] == [int(v) for v in expected]
        bad = httpx.post(f"{url}/v1/models/churn:predict", json={"instances": [{"nope": 1}]}, timeout=30)
        assert bad.status_code == 400 and "nope" in bad.text

        result = deploy_canary(s, version="2", registry=reg)
        assert result.action == "canary" and result.percent == 50
        status = httpx.get(url + "/admin/status").json()
        assert status["canary"]["version"] == "2" and status["canary_percent"] == 50
        canary_pid = backend.status()["canary"]["pid"]

        stop = threading.Event()

        def traffic() -> None:
            with httpx.Client(base_url=url, timeout=30) as c:
                while not stop.is_set():
                    c.post("/v1/models/churn:predict", json={"instances": instances[:2]})

        worker = threading.Thread(target=traffic, daemon=True)
        worker.start()
        try:
            ctl = RolloutController(s, GatewayTarget(url, backend=backend), reg)
            final = ctl.run(until_done=True, max_steps=10)
        finally:
            stop.set()
            worker.join(30)
        assert final.status == PROMOTED, final.history[-1]
        assert reg.version_by_alias("churn", CHAMPION).version == "2"
        after = backend.status()
        assert after["primary"]["pid"] == canary_pid and after["primary"]["version"] == "2" and after["canary"] is None
        assert not process_alive(pids["primary"])
        assert httpx.post(f"{url}/v1/models/churn:predict", json={"instances": instances[:1]}).headers["x-model-version"] == "2"
    finally:
        backend.stop()
    final_state = backend.status()
    assert final_state["gateway"] is None and final_state["primary"] is None
    assert not any(process_alive(p) for p in pids.values())
    with pytest.raises(ServingError, match="nothing to promote"):
        backend.promote()


def test_cli_deploy_renders_and_refuses_bad_input_before_changing_anything(tmp_path):
    from typer.testing import CliRunner

    from driftloop.app.cli import app

    s = make_settings(tmp_path / "ws", tmp_path / "x.parquet")
    _registry_with_versions(s, [(str(tmp_path / "m1"), None), (str(tmp_path / "m2"), None)])
    args = ["-p", f"workspace={s.workspace_dir}", "-p", "mlflow.model_name=churn", "-p", "mlflow.experiment=test"]
    runner = CliRunner()
    out = runner.invoke(app, ["deploy", "--dry-run", "--version", "2", "--canary-percent", "10", *args])
    assert out.exit_code == 0, out.output
    assert "kind: InferenceService" in out.output and "canaryTrafficPercent: 10" in out.output
    assert "models:/churn/2" in out.output
    bad = runner.invoke(app, ["deploy", "--dry-run", "--version", "2", "--canary-percent", "150", *args])
    assert isinstance(bad.exception, ServingError) and "between 0 and 100" in str(bad.exception)
    missing = runner.invoke(app, ["deploy", "--dry-run", "--version", "staging", *args])
    assert isinstance(missing.exception, RegistryError) and "staging" in str(missing.exception)
    nothing = runner.invoke(app, ["rollout", "run", *args])
    assert isinstance(nothing.exception, ServingError) and "driftloop serve" in str(nothing.exception)


def test_stale_state_of_dead_processes_is_dropped(tmp_path):
    import json
    import subprocess

    s = make_settings(tmp_path / "ws", tmp_path / "x.parquet")
    dead = subprocess.Popen(["true"])
    dead.wait()
    path = s.workspace_dir / "serving" / "state.json"
    path.parent.mkdir(parents=True)
    entry = {"role": "gateway", "pid": dead.pid, "port": 1, "url": "http://127.0.0.1:1", "version": "", "model_uri": ""}
    path.write_text(json.dumps({"gateway": entry, "primary": {**entry, "role": "primary"}, "canary": None,
                                "canary_percent": 0, "pending_canary": None}))
    backend = LocalBackend(s)
    assert backend.gateway_url is None
    assert json.loads(path.read_text())["primary"] is None


def test_cli_serve_until_interrupted_leaves_nothing_behind(served_pair):
    import signal
    import subprocess
    import sys
    import time

    s, reg, frame = served_pair
    champion = reg.version_by_alias("churn", CHAMPION).version
    other = "1" if champion == "2" else "2"
    assert deploy_canary(s, version=other, registry=reg).action == "pending"  # nothing served yet
    args = ["-p", f"workspace={s.workspace_dir}", "-p", "mlflow.model_name=churn", "-p", "mlflow.experiment=test",
            "-p", "serving.name=churn"]
    proc = subprocess.Popen([sys.executable, "-m", "driftloop.app.cli", "serve", "--port", "0", "--no-rollout", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    backend = LocalBackend(s)
    try:
        deadline = time.monotonic() + 120
        while backend.gateway_url is None and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.5)
        state = backend.status()
        assert state["gateway"] is not None, proc.stdout.read() if proc.poll() is not None else "not started"
        url = state["gateway"]["url"]
        assert state["canary"]["version"] == other and state["canary_percent"] == 50 and state["pending_canary"] is None
        row = frame.drop(columns=["label", "event_time"]).head(1).astype(object).where(frame.notna(), None)
        r = httpx.post(f"{url}/v1/models/churn:predict", json={"instances": row.to_dict(orient="records")}, timeout=30)
        assert r.status_code == 200 and r.headers["x-model-version"] in (champion, other)
        assert state["primary"]["version"] == champion
        pids = [state[k]["pid"] for k in ("gateway", "primary", "canary")]
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            out, _ = proc.communicate(timeout=90)
        except subprocess.TimeoutExpired:
            proc.kill()  # never left running, whatever the test found (its servers die with it)
            proc.wait(30)
            raise
    assert proc.returncode == 0, out
    assert url in out and "stopped" in out
    assert not any(process_alive(p) for p in pids)
    assert backend.status()["gateway"] is None
