"""Against a real MLflow tracking server: ``mlflow server --app-name basic-auth`` with artifacts
proxied to S3 (moto), credentials only from ``MLFLOW_TRACKING_USERNAME`` / ``_PASSWORD``.

The session's ``tracking`` fixture (tests/servers.py) trained the champion through kfp.local
against it, reading its data from ``s3://``; tests/test_real_alerting.py starts a retraining
run through the trigger against the same server.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from driftloop.core.errors import RegistryError
from driftloop.core.registry import CHAMPION, REFERENCE_ARTIFACT, TAG, Registry
from serving.rollout import PROMOTED, ROLLED_BACK, RolloutController
from tests.conftest import free_port
from tests.servers import ARTIFACT_BUCKET

pytestmark = pytest.mark.slow

MODEL = "churn"
DRIFTLOOP = str(Path(sys.executable).parent / "driftloop")


@pytest.fixture
def registry(tracking, monkeypatch, tmp_path):
    for key, value in tracking.env.items():
        monkeypatch.setenv(key, value)
    return Registry.from_settings(tracking.settings(tmp_path / "ws"))


def test_the_pipeline_registered_the_champion_on_the_server_with_artifacts_in_s3(tracking, registry):
    champion = registry.resolve(f"{MODEL}@{CHAMPION}")
    assert champion.tags[TAG.TRIGGER] == "manual" and champion.tags[TAG.SOURCE] == tracking.source
    assert champion.tags[TAG.REQUEST] == tracking.champion.request_id
    assert champion.version == tracking.champion.summary["model_version"]
    run = registry.run(champion.run_id)
    assert run.data.metrics["accuracy"] > 0.6
    # proxied artifacts: the client talks to the server only; the objects sit in the S3 bucket
    assert run.info.artifact_uri.startswith("mlflow-artifacts:/")
    keys = {o["Key"] for o in tracking.s3.client().list_objects_v2(Bucket=ARTIFACT_BUCKET)["Contents"]}
    assert any(k.endswith(f"{champion.run_id}/artifacts/{REFERENCE_ARTIFACT}") for k in keys), sorted(keys)[:20]
    assert len(registry.reference_sample(f"{MODEL}@{CHAMPION}")) == 1000
    model = registry.load_pyfunc(f"models:/{MODEL}@{CHAMPION}")
    sample = registry.reference_sample(f"{MODEL}@{CHAMPION}")
    assert len(model.predict(sample.drop(columns=["label", "event_time"], errors="ignore").head(5))) == 5


def test_an_alias_of_a_model_that_does_not_exist_yet_is_none_not_permission_denied(registry):
    # The auth server answers this lookup with 403 for a non-admin user (found against the real server;
    # the first pipeline run of a new model failed in its evaluate step on it).
    assert registry.version_by_alias("no-such-model", CHAMPION) is None
    with pytest.raises(RegistryError, match="no alias 'blue'"):
        registry.resolve(f"{MODEL}@blue")


class _Target:
    """The serving side is not under test here: records what the controller asks of it."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def set_weight(self, percent: int) -> None:
        self.calls.append(f"weight {percent}")

    def stats(self, since, canary_version, primary_version):  # noqa: ANN001, ANN201
        return None, None

    def promote(self, state) -> None:  # noqa: ANN001
        self.calls.append("promote")

    def rollback(self, state) -> None:  # noqa: ANN001
        self.calls.append("rollback")


def test_rollout_promote_and_rollback_move_the_aliases_on_the_server(tracking, registry, tmp_path):
    settings = tracking.settings(tmp_path / "ws")
    first = registry.resolve(f"{MODEL}@{CHAMPION}")
    # two more versions of the same model (what a retraining run registers), made over HTTP
    import mlflow

    made = [mlflow.register_model(first.source, MODEL).version for _ in range(2)]
    good, bad = (str(v) for v in made)
    try:
        RolloutController.begin(settings, canary_version=good, primary_version=first.version)
        target = _Target()
        promoted = RolloutController(settings, target, registry).promote("checks passed (test)")
        assert promoted["decision"] == "promote" and target.calls == ["promote"]
        assert registry.resolve(f"{MODEL}@{CHAMPION}").version == good
        assert registry.get_version(MODEL, good).tags[TAG.ROLLOUT] == PROMOTED

        RolloutController.begin(settings, canary_version=bad, primary_version=good)
        rolled = RolloutController(settings, target, registry).rollback("quality_delta below the limit (test)")
        assert rolled["decision"] == "rollback" and target.calls == ["promote", "rollback"]
        assert registry.resolve(f"{MODEL}@{CHAMPION}").version == good  # the champion stays
        assert registry.get_version(MODEL, bad).tags[TAG.ROLLOUT] == ROLLED_BACK
        history = {a.path for a in registry.client.list_artifacts(first.run_id, "rollout")}
        assert history == {"rollout/history.json"}
    finally:
        registry.set_alias(MODEL, CHAMPION, first.version)  # later tests see the trained champion again


def _cli(*args: str, env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess:
    # a wide console: the error is one line, and rich would wrap it at 80 columns in a pipe
    return subprocess.run([DRIFTLOOP, *args], capture_output=True, text=True, timeout=timeout,
                          env={**env, "COLUMNS": "1000"})


def _params(workspace: Path, uri: str) -> list[str]:
    return ["-p", f"workspace={workspace}", "-p", f"mlflow.tracking_uri={uri}", "-p", f"mlflow.model_name={MODEL}",
            "-p", "mlflow.experiment=test"]


def test_lineage_over_http_and_one_clear_line_for_bad_credentials_or_a_server_down(tracking, tmp_path):
    env = {**os.environ, **tracking.env}
    ok = _cli("lineage", f"{MODEL}@{CHAMPION}", *_params(tmp_path / "ws", tracking.mlflow.url), env=env)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "trigger: manual" in ok.stdout and "gate: passed" in ok.stdout

    wrong = _cli("lineage", f"{MODEL}@{CHAMPION}", *_params(tmp_path / "ws", tracking.mlflow.url),
                 env={**env, "MLFLOW_TRACKING_PASSWORD": "not-the-password"})
    assert wrong.returncode != 0 and "Traceback" not in wrong.stderr + wrong.stdout
    lines = [line for line in wrong.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and tracking.mlflow.url in lines[0] and "refused the credentials" in lines[0], wrong.stderr

    down = f"http://127.0.0.1:{free_port()}"
    gone = _cli("lineage", f"{MODEL}@{CHAMPION}", *_params(tmp_path / "ws", down), env=env, timeout=60)
    assert gone.returncode != 0 and "Traceback" not in gone.stderr + gone.stdout
    lines = [line for line in gone.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and f"cannot reach the MLflow tracking server at {down}" in lines[0], gone.stderr
