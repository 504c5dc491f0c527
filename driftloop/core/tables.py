"""Reading a table from a URI: a local path or any fsspec URI (s3://, gs://, http(s)://), parquet or csv.

Shared by the ingest step, the retraining trigger and the scheduler (the data window of a run, in the
data's own time: :func:`event_times`) and the ``monitor report`` command.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from driftloop.core.errors import DataSourceError, DataValidationError

__all__ = ["read_table", "event_times"]


def _normalise_uri(uri: str) -> str:
    if uri.startswith("file://"):
        return uri[len("file://"):]
    return uri


_OBJECT_STORES = ("s3", "s3a", "gs", "gcs", "az", "abfs", "abfss")


def _what_is_missing(path: str) -> str:
    """For an object store: whether the bucket or the object is missing (empty when unknown)."""
    protocol = path.split("://", 1)[0].lower() if "://" in path else ""
    if protocol not in _OBJECT_STORES:
        return ""
    bucket, _, key = path.split("://", 1)[1].partition("/")
    try:
        import fsspec

        fs = fsspec.filesystem(protocol)
        fs.invalidate_cache()
        exists = fs.exists(bucket)
    except Exception:  # noqa: BLE001 - the detail is a courtesy; the error itself stands
        return ""
    if not exists:
        return f" (bucket {bucket!r} does not exist)"
    return f" (no object {key!r} in bucket {bucket!r})"


def _check_csv_header(path: str, uri: str) -> None:
    """Refuse a CSV whose header names a column twice (pandas would rename the second ``name.1``)."""
    try:
        header = pd.read_csv(path, header=None, nrows=1, dtype=str).iloc[0].tolist()
    except (pd.errors.EmptyDataError, IndexError):
        return  # no header at all: read_csv itself says so below
    seen: set[str] = set()
    for name in header:
        if name in seen:
            raise DataValidationError(f"the header of {uri} names column {name!r} twice; rename or drop one",
                                      column=str(name), rule="unique_columns")
        seen.add(name)


def read_table(uri: str, fmt: str = "auto") -> pd.DataFrame:
    """Read parquet or csv from a local path or any fsspec URI (s3://, gs://, http(s)://)."""
    if not uri:
        raise DataSourceError("no data source given (set data.source)")
    path = _normalise_uri(uri)
    if fmt == "auto":
        lowered = path.lower().split("?")[0]
        fmt = "csv" if lowered.endswith((".csv", ".csv.gz")) else "parquet"
    is_remote = "://" in path
    if not is_remote and not Path(path).exists():
        raise DataSourceError(f"data source not found: {uri}")
    try:
        if fmt == "csv":
            _check_csv_header(path, uri)
            df = pd.read_csv(path)
        else:
            df = pd.read_parquet(path)
    except DataValidationError:
        raise
    except FileNotFoundError as exc:
        raise DataSourceError(f"data source not found: {uri}{_what_is_missing(path)}") from exc
    except ImportError as exc:
        raise DataSourceError(f"cannot read {uri}: a filesystem driver is missing ({exc})") from exc
    except Exception as exc:  # pyarrow/pandas raise many types for corrupt files
        raise DataSourceError(f"cannot read {uri} as {fmt}: {type(exc).__name__}: {exc}") from exc
    if df.empty:
        raise DataSourceError(f"data source {uri} has no rows")
    return df


def event_times(uri: str, time_column: str, fmt: str = "auto") -> pd.Series:
    """The event times of a table (UTC, sorted; rows without a readable time left out)."""
    frame = read_table(uri, fmt)
    if time_column not in frame.columns:
        raise DataValidationError(f"data.time_column {time_column!r} is not a column of {uri}",
                                  column=time_column, rule="column_present")
    values = frame[time_column]
    if pd.api.types.is_datetime64_any_dtype(values) or pd.api.types.is_numeric_dtype(values):
        times = pd.to_datetime(values, utc=True, errors="coerce")
    else:
        times = pd.to_datetime(values.astype("string").str.strip(), utc=True, errors="coerce", format="mixed")
    return times.dropna().sort_values().reset_index(drop=True)
