"""The MLflow adapter loads from its own registry, whatever another one in the process did since."""

import mlflow
import numpy as np
from sklearn.linear_model import LogisticRegression

from driftloop.core.registry import CHAMPION, Registry
from tests.conftest import make_settings


def _register(registry: Registry, name: str, coef: float) -> None:
    model = LogisticRegression().fit(np.array([[0.0], [1.0], [2.0], [3.0]]) * coef, [0, 0, 1, 1])
    exp = registry.experiment_id()
    with mlflow.start_run(experiment_id=exp):
        info = mlflow.sklearn.log_model(model, name="model", registered_model_name=name)
    registry.set_alias(name, CHAMPION, str(info.registered_model_version))


def test_a_load_uses_this_registry_after_another_moved_mlflows_globals(tmp_path):
    a = Registry.from_settings(make_settings(tmp_path / "a", tmp_path / "none.parquet"))
    b = Registry.from_settings(make_settings(tmp_path / "b", tmp_path / "none.parquet"))
    _register(a, "model-a", 1.0)
    _register(b, "model-b", 1.0)  # b's client was made last: MLflow's process-wide URI is b's now
    assert mlflow.get_tracking_uri() == b.tracking_uri
    assert a.load_sklearn("models:/model-a@champion").predict([[3.0]]).tolist() == [1]
    assert b.load_pyfunc("models:/model-b@champion") is not None
    a.load_pyfunc("models:/model-a@champion")
