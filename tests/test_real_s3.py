"""s3:// data against a real S3 API (moto's server mode), endpoint and keys only from the environment
(``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``), as on a cluster.

MLflow artifacts on s3:// through the tracking server: tests/test_real_mlflow.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from driftloop.core.errors import DataSourceError
from driftloop.core.registry import Registry
from driftloop.core.tables import read_table
from tests.servers import DATA_BUCKET

pytestmark = pytest.mark.slow


@pytest.fixture
def s3_env(tracking, monkeypatch):
    for key, value in tracking.env.items():
        monkeypatch.setenv(key, value)
    return tracking


def test_parquet_and_csv_from_s3(s3_env):
    parquet = read_table(s3_env.source)
    csv = read_table(f"s3://{DATA_BUCKET}/scenario/scenario.csv")
    assert len(parquet) == len(csv) == 4000
    assert list(csv.columns) == list(parquet.columns)
    pd.testing.assert_series_equal(csv["tenure"], parquet["tenure"], check_exact=False)


def test_missing_bucket_or_key_is_named(s3_env):
    with pytest.raises(DataSourceError, match=f"no object 'scenario/nope.parquet' in bucket '{DATA_BUCKET}'"):
        read_table(f"s3://{DATA_BUCKET}/scenario/nope.parquet")
    with pytest.raises(DataSourceError, match="bucket 'no-such-bucket' does not exist"):
        read_table("s3://no-such-bucket/scenario.csv")


def test_a_run_on_a_missing_key_fails_in_one_line_and_registers_nothing(s3_env, tmp_path):
    registry = Registry.from_settings(s3_env.settings(tmp_path / "ws"))
    before = [(v.version, v.aliases) for v in registry.list_versions("churn")]
    missing = f"s3://{DATA_BUCKET}/scenario/2026-12.parquet"
    out = subprocess.run(
        [str(Path(sys.executable).parent / "driftloop"), "run", "train", "-p", f"workspace={tmp_path / 'ws'}",
         "-p", f"data.source={missing}", "-p", f"mlflow.tracking_uri={s3_env.mlflow.url}",
         "-p", "mlflow.model_name=churn", "-p", "mlflow.experiment=test", "-p", "data.time_column=event_time"],
        capture_output=True, text=True, timeout=180, env={**os.environ, **s3_env.env, "COLUMNS": "1000"})
    assert out.returncode != 0 and "Traceback" not in out.stdout + out.stderr
    assert f"data source not found: {missing} (no object 'scenario/2026-12.parquet' in bucket '{DATA_BUCKET}')" \
        in out.stderr, out.stderr
    assert [(v.version, v.aliases) for v in registry.list_versions("churn")] == before
