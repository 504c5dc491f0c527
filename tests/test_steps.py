"""Unit tests of the plain step functions, including their failure cases."""

import numpy as np
import pandas as pd
import pytest

from components.evaluate import evaluate_models, gate
from components.ingest import ingest, read_table
from components.train import resolve_device, train_model
from components.validate import data_summary_markdown, validate_frames
from driftloop.core.errors import DataSourceError, DataValidationError, DeviceUnavailableError, TrainingError
from driftloop.app.scenario import generate


@pytest.fixture(scope="module")
def frame():
    return generate("classification", 3000, days=30, drift_at=None, seed=1)


# --- ingest -------------------------------------------------------------------------------
def test_read_parquet_and_csv(tmp_path, frame):
    frame.to_parquet(tmp_path / "d.parquet")
    frame.drop(columns=["event_time"]).to_csv(tmp_path / "d.csv", index=False)
    assert len(read_table(str(tmp_path / "d.parquet"))) == 3000
    assert len(read_table(f"file://{tmp_path / 'd.parquet'}")) == 3000
    assert list(read_table(str(tmp_path / "d.csv")).columns) == [c for c in frame.columns if c != "event_time"]


def test_read_missing_and_corrupt(tmp_path):
    with pytest.raises(DataSourceError, match="not found"):
        read_table(str(tmp_path / "missing.parquet"))
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(DataSourceError, match="cannot read"):
        read_table(str(bad))


def test_time_window_and_time_ordered_split(frame):
    r = ingest(frame, target="label", time_column="event_time", window_start="2026-01-10", window_end="2026-01-20", test_size=0.25)
    times = pd.concat([r.train, r.test])["event_time"]
    assert times.min() >= pd.Timestamp("2026-01-10", tz="UTC") and times.max() < pd.Timestamp("2026-01-20", tz="UTC")
    assert r.train["event_time"].max() <= r.test["event_time"].min()  # time-ordered: test is the latest
    assert abs(len(r.test) / (len(r.train) + len(r.test)) - 0.25) < 0.01
    assert len(r.reference) <= len(r.train)


def test_empty_window_and_missing_target(frame):
    with pytest.raises(DataSourceError, match="holds no rows"):
        ingest(frame, target="label", time_column="event_time", window_start="2030-01-01")
    with pytest.raises(DataSourceError, match="target column 'churned'"):
        ingest(frame, target="churned")
    with pytest.raises(DataSourceError, match="time column 'ts'"):
        ingest(frame, target="label", time_column="ts")


# --- validate -----------------------------------------------------------------------------
def _split(df):
    return df.iloc[:2400].reset_index(drop=True), df.iloc[2400:].reset_index(drop=True)


def test_validate_passes_and_infers_schema(frame):
    train, test = _split(frame)
    schema = validate_frames(train, test, target="label", task="classification", time_column="event_time")
    assert set(schema["numeric"]) == {"tenure", "monthly_spend", "sessions", "support_calls", "latency_ms"}
    assert set(schema["categorical"]) == {"region", "plan"}
    assert schema["classes"] == [0, 1]


def test_validate_missing_share_names_column_and_rule(frame):
    train, test = _split(frame.copy())
    train.loc[: len(train) // 2, "tenure"] = np.nan
    # a sparse column is not an error by default (the learners impute) ...
    validate_frames(train, test, target="label", task="classification", time_column="event_time")
    # ... only past a limit the user sets
    with pytest.raises(DataValidationError, match="'tenure'.*max_missing") as exc:
        validate_frames(train, test, target="label", task="classification", time_column="event_time", max_missing=0.3)
    assert (exc.value.column, exc.value.rule) == ("tenure", "max_missing")


def test_validate_stops_on_an_empty_column_and_on_gaps_jumping_in_the_newest_rows(frame):
    train, test = _split(frame.copy())
    empty = train.assign(tenure=np.nan)
    with pytest.raises(DataValidationError, match="'tenure' has no values in the training split") as exc:
        validate_frames(empty, test, target="label", task="classification", time_column="event_time")
    assert exc.value.rule == "empty"
    # the user who means it says so for that column
    validate_frames(empty, test, target="label", task="classification", time_column="event_time",
                    columns={"tenure": {"max_missing": 1.0}})
    # the feed broke: the newest rows (the test split under a time column) lost most of a column
    broken = test.copy()
    broken.loc[broken.index[: int(len(broken) * 0.6)], "sessions"] = np.nan
    with pytest.raises(DataValidationError, match=r"'sessions': 60\.\d% missing in the test split against 0\.0% in "
                       "training, more than max_missing_increase 30\.0%") as exc:
        validate_frames(train, broken, target="label", task="classification", time_column="event_time")
    assert exc.value.rule == "max_missing_increase"
    validate_frames(train, broken, target="label", task="classification", time_column="event_time",
                    columns={"sessions": {"max_missing_increase": 0.7}})
    validate_frames(train, broken, target="label", task="classification", time_column="event_time",
                    max_missing_increase=0.7)


def test_data_summary_shows_gaps_per_split_and_names_sparse_columns(frame):
    train, test = _split(frame.copy())
    train.loc[train.index[: int(len(train) * 0.5)], "tenure"] = np.nan
    schema = validate_frames(train, test, target="label", task="classification", time_column="event_time")
    text = data_summary_markdown(train, test, schema)
    assert "| `tenure` | numeric | 50.0% / 0.0% |" in text
    assert "Sparse columns (over 30% missing; the model imputes their gaps): `tenure` (40%)." in text
    assert "monthly_spend` (" not in text.split("Sparse columns", 1)[1]


def test_validate_ordinary_gaps_tolerated_and_per_column_rule(frame):
    train, test = _split(frame.copy())
    # the scenario has ~2 % gaps in monthly_spend: fine by default, not under a strict per-column rule
    validate_frames(train, test, target="label", task="classification", time_column="event_time")
    with pytest.raises(DataValidationError, match="monthly_spend"):
        validate_frames(train, test, target="label", task="classification", time_column="event_time",
                        columns={"monthly_spend": {"max_missing": 0.0}})


def test_validate_range_levels_dtype_target(frame):
    train, test = _split(frame.copy())
    with pytest.raises(DataValidationError, match="'sessions'.*below min") as exc:
        validate_frames(train, test, target="label", task="classification", time_column="event_time",
                        columns={"sessions": {"min": 100}})
    assert exc.value.rule == "min"
    with pytest.raises(DataValidationError, match="'region'.*allowed"):
        validate_frames(train, test, target="label", task="classification", time_column="event_time",
                        columns={"region": {"allowed": ["north", "south"]}})
    bad = test.copy()
    bad["region"] = "atlantis"
    with pytest.raises(DataValidationError, match="'region'.*never seen in training"):
        validate_frames(train, bad, target="label", task="classification", time_column="event_time")
    mixed = train.copy()
    mixed["tenure"] = mixed["tenure"].astype(object)
    mixed.loc[0, "tenure"] = "ten"
    with pytest.raises(DataValidationError, match="'tenure'.*mixed value types"):
        validate_frames(mixed, test, target="label", task="classification", time_column="event_time")
    with pytest.raises(DataValidationError, match="target column 'label' is missing"):
        validate_frames(train.drop(columns="label"), test, target="label", task="classification")


def test_validate_single_class(frame):
    train, test = _split(frame.copy())
    train["label"] = 1
    with pytest.raises(DataValidationError, match="single class") as exc:
        validate_frames(train, test, target="label", task="classification", time_column="event_time")
    assert exc.value.rule == "classes"


# --- train ----------------------------------------------------------------------------------
NUM = ["tenure", "monthly_spend", "sessions", "support_calls", "latency_ms"]
CAT = ["region", "plan"]


@pytest.mark.parametrize("learner", ["hist_gradient_boosting", "random_forest", "linear", "xgboost"])
def test_train_classifier_takes_raw_rows_with_gaps(frame, learner):
    train, test = _split(frame)
    result = train_model(train, target="label", task="classification", numeric=NUM, categorical=CAT, learner=learner,
                         params={"n_estimators": 20} if learner in ("random_forest", "xgboost") else {})
    assert result.device == "cpu"
    raw = test[NUM + CAT].head(3).astype(object)
    raw.iloc[0, 0] = None  # a gap in a numeric column
    raw.iloc[1, 5] = None  # a gap in a categorical column
    raw.iloc[2, 6] = "never-seen-plan"
    from components.train import prepare_features

    assert len(result.model.predict(prepare_features(raw, NUM, CAT))) == 3
    acc = (result.model.predict(prepare_features(test, NUM, CAT)) == test["label"]).mean()
    assert acc > 0.65


def test_train_regression():
    df = generate("regression", 2000, drift_at=None, seed=3)
    train, test = df.iloc[:1600], df.iloc[1600:]
    result = train_model(train, target="label", task="regression", numeric=NUM, categorical=CAT)
    from components.evaluate import score

    metrics = score(result.model, test, target="label", task="regression", numeric=NUM, categorical=CAT)
    assert metrics["r2"] > 0.5 and metrics["rmse"] > 0


def test_device_resolution():
    assert resolve_device("xgboost", "auto", gpu_visible=False) == "cpu"
    assert resolve_device("xgboost", "auto", gpu_visible=True) == "cuda"
    assert resolve_device("hist_gradient_boosting", "auto", gpu_visible=True) == "cpu"
    with pytest.raises(DeviceUnavailableError, match="no GPU is visible"):
        resolve_device("xgboost", "cuda", gpu_visible=False)
    with pytest.raises(DeviceUnavailableError, match="CPU only"):
        resolve_device("random_forest", "cuda", gpu_visible=True)
    with pytest.raises(TrainingError, match="unknown learner 'deep_forest'"):
        resolve_device("deep_forest", "auto")


def test_train_bad_hyper_parameter(frame):
    train, _ = _split(frame)
    with pytest.raises(TrainingError, match="hist_gradient_boosting"):
        train_model(train, target="label", task="classification", numeric=NUM, categorical=CAT, params={"max_iter": -3})


# --- evaluate / gate -----------------------------------------------------------------------
def test_gate_bootstrap_and_minimum():
    d = gate({"accuracy": 0.8}, None, metric="accuracy", min_value=0.7)
    assert d.passed and "bootstrap" in d.reason
    d = gate({"accuracy": 0.6}, None, metric="accuracy", min_value=0.7)
    assert not d.passed and "minimum" in d.reason


def test_gate_against_champion_with_margin_and_direction():
    assert gate({"accuracy": 0.81}, {"accuracy": 0.80}, metric="accuracy", margin=0.0, champion_version="3").passed
    d = gate({"accuracy": 0.81}, {"accuracy": 0.80}, metric="accuracy", margin=0.02, champion_version="3")
    assert not d.passed and "v3" in d.reason and "does not beat" in d.reason
    assert gate({"rmse": 4.0}, {"rmse": 5.0}, metric="rmse", champion_version="1").passed  # lower is better
    assert not gate({"rmse": 6.0}, {"rmse": 5.0}, metric="rmse", champion_version="1").passed


def test_evaluate_scores_both_on_same_holdout(frame):
    train, test = _split(frame)
    good = train_model(train, target="label", task="classification", numeric=NUM, categorical=CAT).model
    weak = train_model(train.head(60), target="label", task="classification", numeric=NUM, categorical=CAT,
                       learner="linear", params={"C": 1e-4}).model
    d = evaluate_models(good, weak, test, target="label", task="classification", numeric=NUM, categorical=CAT,
                        metric="accuracy", champion_version="1")
    assert d.passed and d.champion_value is not None and d.new_value > d.champion_value
    d = evaluate_models(weak, good, test, target="label", task="classification", numeric=NUM, categorical=CAT,
                        metric="accuracy", champion_version="1")
    assert not d.passed


def test_the_evaluate_step_predicts_the_holdout_once_for_the_gate_and_the_curves(frame):
    from components.evaluate import curves, predict

    train, test = _split(frame)
    model = train_model(train, target="label", task="classification", numeric=NUM, categorical=CAT).model
    calls = {"predict": 0, "predict_proba": 0}

    class Counted:  # the model, counting what it is asked
        classes_ = model.classes_

        def predict(self, X):
            calls["predict"] += 1
            return model.predict(X)

        def predict_proba(self, X):
            calls["predict_proba"] += 1
            return model.predict_proba(X)

    counted = Counted()
    answers = predict(counted, test, target="label", task="classification", numeric=NUM, categorical=CAT)
    shared = evaluate_models(counted, None, test, target="label", task="classification", numeric=NUM, categorical=CAT,
                             metric="accuracy", new_predictions=answers)
    drawn = curves(counted, test, target="label", numeric=NUM, categorical=CAT, predictions=answers)
    assert calls == {"predict": 1, "predict_proba": 1}
    # the same figures as each computing its own
    alone = evaluate_models(model, None, test, target="label", task="classification", numeric=NUM, categorical=CAT,
                            metric="accuracy")
    assert shared.new_metrics == alone.new_metrics and "roc_auc" in shared.new_metrics
    assert drawn == curves(model, test, target="label", numeric=NUM, categorical=CAT) and "roc" in drawn
