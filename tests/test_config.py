"""Configuration: one object, validated once; wrong keys and values fail naming the key."""

from pathlib import Path

import pytest

from driftloop.core.config import load_settings
from driftloop.core.errors import ConfigError


def test_defaults_give_embedded_sqlite_store(tmp_path):
    s = load_settings(overrides={"workspace": str(tmp_path)}, environ={})
    assert s.tracking_uri == f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"
    assert not s.is_cluster
    assert s.gate_metric == "accuracy"


def test_remote_tracking_uri_used_unchanged(tmp_path):
    s = load_settings(overrides={"mlflow.tracking_uri": "https://mlflow.example.com"}, environ={})
    assert s.tracking_uri == "https://mlflow.example.com"
    assert s.artifact_location is None


def test_unknown_key_names_the_key(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model:\n  learnr: xgboost\n")
    with pytest.raises(ConfigError, match=r"model\.learnr: unknown key"):
        load_settings(cfg, environ={})


def test_unknown_learner_fails_at_load():
    with pytest.raises(ConfigError, match=r"model\.learner"):
        load_settings(overrides=["model.learner=deep_forest"], environ={})


def test_bad_value_names_the_key():
    with pytest.raises(ConfigError, match=r"data\.test_size"):
        load_settings(overrides=["data.test_size=1.5"], environ={})


def test_gate_metric_must_fit_task():
    with pytest.raises(ConfigError, match="rmse"):
        load_settings(overrides=["gate.metric=rmse"], environ={})
    s = load_settings(overrides=["model.task=regression", "gate.metric=rmse"], environ={})
    assert s.gate_metric == "rmse"


def test_environment_overrides_file_and_params_override_environment(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("data:\n  target: y\n  test_size: 0.3\n")
    env = {"DRIFTLOOP_DATA__TEST_SIZE": "0.25", "DRIFTLOOP_MLFLOW__MODEL_NAME": "m1"}
    s = load_settings(cfg, environ=env)
    assert (s.data.target, s.data.test_size, s.mlflow.model_name) == ("y", 0.25, "m1")
    s = load_settings(cfg, overrides=["data.test_size=0.1"], environ=env)
    assert s.data.test_size == 0.1


def test_relative_source_resolved_against_config_file(tmp_path):
    cfg = tmp_path / "sub" / "c.yaml"
    cfg.parent.mkdir()
    cfg.write_text("data:\n  source: data/x.parquet\n")
    s = load_settings(cfg, environ={})
    assert s.data.source == str(tmp_path / "sub" / "data" / "x.parquet")


def test_secrets_are_not_config_keys():
    env = {"DRIFTLOOP_WEBHOOK_TOKEN": "s3cret"}
    s = load_settings(environ=env)
    assert "s3cret" not in s.model_dump_json()


def test_settings_are_frozen():
    s = load_settings(environ={})
    with pytest.raises(Exception):
        s.data.target = "other"  # type: ignore[misc]


def test_missing_or_broken_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_settings(tmp_path / "nope.yaml", environ={})
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_settings(bad, environ={})


def test_malformed_override():
    with pytest.raises(ConfigError, match="key=value"):
        load_settings(overrides=["data.target"], environ={})


def test_every_driftloop_variable_the_processes_read_leaves_loading_alone():
    """A token or process variable (DRIFTLOOP_INGEST_TOKEN from a Secret, DRIFTLOOP_TASK_SERVER the CLI sets
    for its children) is not a configuration key: with each one set, settings still load."""
    import re

    from driftloop.core.config import load_settings

    root = Path(__file__).resolve().parent.parent
    names = set()
    for package in ("driftloop", "serving", "monitoring", "pipelines", "components"):
        for path in (root / package).rglob("*.py"):
            names |= set(re.findall(r'"(DRIFTLOOP_[A-Z_]+)"', path.read_text()))
    names = {n for n in names if "__" not in n and n not in ("DRIFTLOOP_CONFIG", "DRIFTLOOP_EVENTS_AUTH")}
    assert "DRIFTLOOP_INGEST_TOKEN" in names and len(names) >= 6, names
    for name in sorted(names):
        settings = load_settings(environ={name: "x-value"})
        assert settings.monitor is not None, name


# --- hyper-parameter names: from the library once per installed version, then from the user's cache ---------
_PROBE = """
import json, sys
from driftloop.core.config import load_settings
from driftloop.core.errors import ConfigError
s = load_settings(overrides={"model.params": {"max_iter": 7}}, environ={})
try:
    load_settings(overrides={"model.params": {"max_iterations": 7}}, environ={})
    refused = None
except ConfigError as exc:
    refused = str(exc)
print(json.dumps({"sklearn": "sklearn.ensemble" in sys.modules, "params": s.model.params, "refused": refused}))
"""


def _probe(cache: Path) -> dict:
    import json
    import os
    import subprocess
    import sys

    env = {**os.environ, "XDG_CACHE_HOME": str(cache)}
    out = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True, timeout=120,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_hyper_parameter_names_come_from_the_library_once_then_from_the_cache(tmp_path):
    first = _probe(tmp_path)  # nothing cached: the library is asked (and imported)
    assert first["sklearn"] and first["params"] == {"max_iter": 7}
    assert "unknown hyper-parameter 'max_iterations'" in first["refused"] and "max_iter" in first["refused"]
    files = list((tmp_path / "driftloop").glob("learner-params-scikit-learn-*.json"))
    assert len(files) == 1
    second = _probe(tmp_path)  # the same answers, without importing scikit-learn's estimators
    assert not second["sklearn"]
    assert second["params"] == first["params"] and second["refused"] == first["refused"]
    files[0].write_text("{not json")  # a damaged cache: asked of the library again, and written again
    third = _probe(tmp_path)
    assert third["sklearn"] and third["refused"] == first["refused"]
    assert _probe(tmp_path)["sklearn"] is False


@pytest.mark.parametrize("task,learner", [("classification", "hist_gradient_boosting"), ("regression", "linear"),
                                          ("regression", "random_forest")])
def test_cached_hyper_parameter_names_are_the_estimators_own(tmp_path, monkeypatch, task, learner):
    import importlib

    from driftloop.core import config

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    module, classifier, regressor = config._LEARNER_CLASSES[learner]
    expected = set(getattr(importlib.import_module(module), classifier if task == "classification"
                           else regressor)().get_params())
    assert config.learner_params(task, learner) == expected  # asked, and written
    assert config.learner_params(task, learner) == expected  # read back


def test_an_unwritable_cache_is_passed_by(tmp_path, monkeypatch):
    from driftloop.core import config

    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocker))  # a file where the cache folder would be
    assert "max_iter" in config.learner_params("classification", "hist_gradient_boosting")


def test_without_a_home_directory_the_names_are_asked_of_the_library(monkeypatch):
    from driftloop.core import config

    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)

    def no_home():
        raise RuntimeError("Could not determine home directory.")

    monkeypatch.setattr(Path, "home", staticmethod(no_home))
    assert "C" in config.learner_params("classification", "linear")
