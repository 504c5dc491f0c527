"""Batch scoring: stored records in, predictions out, in chunks that run in parallel.

Plain functions the scoring pipeline's steps call (``components.ops``):

* :func:`plan_scoring` checks everything a user can get wrong before any work starts — the
  model reference, the input (readable, the model's feature columns present, the id column when
  one is required, the columns to keep), the output (absent, or ``overwrite``) — and cuts the
  input into contiguous row ranges (parquet: by rows over the row groups; csv: by bytes at line
  ends, so no chunk reads the file before its range).
* :func:`score_chunk` streams one chunk (``batch_rows`` at a time: parquet record batches, csv
  reader chunks), predicts, appends ``<id>, prediction, model_version`` (and the columns kept) to
  a parquet part and keeps a bounded random sample of the features for the drift check. An input
  without an id column is scored in order and each prediction carries its row number (``row``,
  from 0: the row's position in the input), as batch transform jobs do. Memory is bounded by the
  batch and the sample, never by the input or its row groups (parquet pages stream through a read
  buffer; nothing is read ahead).
* :func:`write_predictions` streams the parts, in chunk order, to a temporary name beside the
  output and renames it only when every row is written: an interrupted run leaves no
  complete-looking output. A chunk numbers its rows from 0; the writer adds the rows of the
  chunks before it.
* :func:`batch_drift` compares the batch sample with the model's reference sample with Evidently's
  ``DataDriftPreset`` (the judge of record the monitor uses too). It lives here, not in
  ``monitoring/``, because a step may import the core only (tests/test_layers.py); the statistics
  are Evidently's own, so both places judge alike.
* :func:`alert_payload` / :func:`send_alert` turn a drifted batch into one Alertmanager-format
  alert for the monitor's ``POST /alerts/alertmanager`` — the same trigger and guardrails as every
  other alert; the id (fingerprint + startsAt) is fixed per scoring request, so a retried step
  raises it once. :func:`deliver_alert` sends it and records on the batch's MLflow run whether it
  went out, and why not (tag ``driftloop.score.alert``), for the run's summary.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import contextlib
import dataclasses
import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from driftloop.core.errors import DataSourceError, DataValidationError, DriftloopError, RegistryError

__all__ = [
    "PREDICTION",
    "MODEL_VERSION",
    "ROW",
    "ALERT_TAG",
    "ScorePlan",
    "OutputExistsError",
    "resolve_format",
    "plan_scoring",
    "plan_chunks",
    "iter_chunk",
    "score_frame",
    "score_chunk",
    "write_predictions",
    "batch_drift",
    "log_batch_run",
    "alert_payload",
    "batch_record",
    "send_alert",
    "deliver_alert",
    "ids_text",
    "default_chunks",
]

log = logging.getLogger(__name__)

PREDICTION = "prediction"
MODEL_VERSION = "model_version"
ROW = "row"  # the row number of a prediction when the input has no id column
ALERT_TAG = "driftloop.score.alert"  # on the batch's MLflow run: "sent to …", "not sent: <why>"
_ROWS_KEY = b"driftloop.rows"  # a part's schema metadata: its ``row`` numbers count from the chunk's start
_TMP_MARK = ".driftloop-partial-"
_READ_BUFFER = 1 << 20  # parquet pages are read through a buffer this size


class OutputExistsError(DataSourceError):
    """The output already exists and ``overwrite`` was not asked for."""


@dataclass(frozen=True)
class ScorePlan:
    model_uri: str
    model_name: str
    version: str
    fmt: str
    numeric: list[str]
    categorical: list[str]
    task: str
    rows: int | None  # known for parquet; csv is counted while scoring
    chunks: list[dict[str, Any]]
    id_column: str = ""  # the input's id column; "" = the predictions carry row numbers (``row``)
    keep: list[str] = dataclasses.field(default_factory=list)  # input columns copied beside each prediction


# -- files ------------------------------------------------------------------------------------
def _path(uri: str) -> str:
    return uri[len("file://"):] if uri.startswith("file://") else uri


def _fs(uri: str) -> tuple[Any, str]:
    import fsspec

    try:
        fs, path = fsspec.core.url_to_fs(_path(uri))
    except (ImportError, ValueError) as exc:
        raise DataSourceError(f"cannot open {uri}: {exc}") from exc
    return fs, path


def resolve_format(uri: str, fmt: str = "auto") -> str:
    if fmt != "auto":
        return fmt
    lowered = _path(uri).lower().split("?")[0]
    return "csv" if lowered.endswith((".csv", ".csv.gz")) else "parquet"


def default_chunks() -> int:
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1))


def _exists(uri: str) -> bool:
    fs, path = _fs(uri)
    try:
        return bool(fs.exists(path))
    except OSError as exc:
        raise DataSourceError(f"cannot check output {uri}: {exc}") from exc


def _open_parquet(uri: str) -> Any:
    """A parquet reader that streams: pages through a 1 MiB buffer, nothing read ahead.

    pyarrow's default ``pre_buffer=True`` fetches every selected row group's column chunks up front
    and keeps them while the batches are decoded: reading a chunk of the input held its whole
    compressed size (measured: +86 MB RSS for 1.5M rows, growing with the rows read). Without it, and
    with a read buffer, memory is a batch plus a page, whatever the chunk or row-group size.
    """
    import pyarrow.parquet as pq

    fs, path = _fs(uri)
    try:
        return pq.ParquetFile(fs.open(path, "rb"), pre_buffer=False, buffer_size=_READ_BUFFER)
    except FileNotFoundError as exc:
        raise DataSourceError(f"input not found: {uri}") from exc
    except Exception as exc:  # pyarrow raises several types for a corrupt file
        raise DataSourceError(f"cannot read {uri} as parquet: {type(exc).__name__}: {exc}") from exc


def _csv_header(uri: str) -> tuple[bytes, list[str], int]:
    fs, path = _fs(uri)
    try:
        with fs.open(path, "rb") as fh:
            header = fh.readline()
        size = int(fs.size(path))
    except FileNotFoundError as exc:
        raise DataSourceError(f"input not found: {uri}") from exc
    except OSError as exc:
        raise DataSourceError(f"cannot read {uri}: {exc}") from exc
    try:
        names = list(pd.read_csv(io.BytesIO(header), nrows=0).columns)
    except Exception as exc:  # noqa: BLE001 - pandas raises several parser errors
        raise DataSourceError(f"cannot read the header of {uri} as csv: {exc}") from exc
    if not names or size <= len(header):
        raise DataSourceError(f"input {uri} has no rows")
    return header, names, size


# -- planning ---------------------------------------------------------------------------------
def plan_chunks(uri: str, fmt: str, chunks: int) -> tuple[list[dict[str, Any]], list[str], int | None]:
    """Cut the input into at most ``chunks`` contiguous pieces; also return its columns and rows."""
    chunks = max(1, int(chunks))
    if fmt == "parquet":
        pf = _open_parquet(uri)
        rows = pf.metadata.num_rows
        if rows == 0:
            raise DataSourceError(f"input {uri} has no rows")
        bounds = np.linspace(0, rows, min(chunks, rows) + 1).astype(int)
        plan = [{"index": i, "start": int(a), "stop": int(b), "of": len(bounds) - 1}
                for i, (a, b) in enumerate(zip(bounds[:-1], bounds[1:]))]
        return plan, list(pf.schema_arrow.names), rows
    header, names, size = _csv_header(uri)
    fs, path = _fs(uri)
    cuts = [len(header)]
    with fs.open(path, "rb") as fh:
        for i in range(1, chunks):
            target = len(header) + (size - len(header)) * i // chunks
            if target <= cuts[-1]:
                continue
            fh.seek(target - 1)
            fh.readline()  # to the end of the line the cut falls in
            pos = fh.tell()
            if cuts[-1] < pos < size:
                cuts.append(pos)
    cuts.append(size)
    plan = [{"index": i, "start": int(a), "stop": int(b), "of": len(cuts) - 1}
            for i, (a, b) in enumerate(zip(cuts[:-1], cuts[1:]))]
    return plan, names, None


def plan_scoring(registry: Any, *, model_ref: str, input_uri: str, output_uri: str, fmt: str = "auto",
                 id_column: str = "id", chunks: int = 0, overwrite: bool = False, keep_columns: list[str] | None = None,
                 id_required: bool = False) -> ScorePlan:
    """Check model, input and output before anything is scored; cut the input into chunks.

    An input without ``id_column`` is scored with row numbers, unless ``id_required`` (the user named the
    column). ``keep_columns`` (``["*"]``: every column) are copied from the input beside each prediction.
    """
    if not input_uri:
        raise DataSourceError("no input given (--input or score.input)")
    if not output_uri:
        raise DataSourceError("no output given (--output or score.output)")
    if _path(input_uri) == _path(output_uri):
        raise DataSourceError(f"output {output_uri} is the input; write the predictions elsewhere")
    if not overwrite and _exists(output_uri):
        raise OutputExistsError(f"output {output_uri} already exists; pass --overwrite to replace it")
    info = registry.resolve(model_ref)
    try:
        schema = registry.schema(f"{info.name}/{info.version}")
    except RegistryError as exc:
        raise RegistryError(f"model {model_ref} (version {info.version}) has no schema artifact: {exc}") from exc
    fmt = resolve_format(input_uri, fmt)
    plan, columns, rows = plan_chunks(input_uri, fmt, chunks or default_chunks())
    numeric, categorical = list(schema["numeric"]), list(schema["categorical"])
    has = f"it has: {', '.join(columns[:20])}{', …' if len(columns) > 20 else ''}"
    missing = [c for c in [*numeric, *categorical] if c not in columns]
    if missing:
        raise DataValidationError(f"input {input_uri} lacks column(s) {', '.join(map(repr, missing))} that model "
                                  f"{info.name} v{info.version} needs ({has})", column=missing[0], rule="required")
    if id_column not in columns:
        if id_required:
            raise DataValidationError(f"input {input_uri} has no id column {id_column!r} ({has}); name another with "
                                      "--id-column, or leave it out to number the rows", column=id_column,
                                      rule="required")
        id_column = ""
    keep = _kept(keep_columns or [], columns, id_column, input_uri, has)
    return ScorePlan(info.uri, info.name, info.version, fmt, numeric, categorical, schema.get("task", "classification"),
                     rows, plan, id_column, keep)


def _kept(names: list[str], columns: list[str], id_column: str, input_uri: str, has: str) -> list[str]:
    """The input columns to copy beside each prediction: present, and named unlike the output's own."""
    wanted = list(columns) if "*" in names else list(dict.fromkeys(names))
    absent = [c for c in wanted if c not in columns]
    if absent:
        raise DataValidationError(f"--keep-columns names {', '.join(map(repr, absent))}, which input {input_uri} "
                                  f"lacks ({has})", column=absent[0], rule="required")
    wanted = [c for c in wanted if c != id_column]  # the id is in the output anyway
    taken = [c for c in wanted if c in (PREDICTION, MODEL_VERSION) or (c == ROW and not id_column)]
    if taken:
        raise DataValidationError(f"input column(s) {', '.join(map(repr, taken))} cannot be kept: the output has a "
                                  "column of that name; rename the input's column or keep the others only",
                                  column=taken[0], rule="unique_columns")
    return wanted


def ids_text(id_column: str) -> str:
    """How the predictions are identified, in words (the run's summary)."""
    return f"column {id_column!r}" if id_column else f"row number (column {ROW!r}, from 0)"


# -- reading a chunk ---------------------------------------------------------------------------
class _Range(io.RawIOBase):
    """A csv chunk as one stream: the header line, then bytes [start, stop) of the file."""

    def __init__(self, fh: Any, header: bytes, start: int, stop: int) -> None:
        self._fh, self._head, self._left = fh, header, stop - start
        fh.seek(start)

    def readable(self) -> bool:
        return True

    def readinto(self, buf: Any) -> int:
        view = memoryview(buf)
        if self._head:
            n = min(len(view), len(self._head))
            view[:n] = self._head[:n]
            self._head = self._head[n:]
            return n
        if self._left <= 0:
            return 0
        data = self._fh.read(min(len(view), self._left))
        self._left -= len(data)
        view[:len(data)] = data
        return len(data)


def iter_chunk(uri: str, fmt: str, chunk: dict[str, Any], columns: list[str], batch_rows: int) -> Iterator[pd.DataFrame]:
    """The chunk's rows, ``batch_rows`` at a time, only ``columns``."""
    start, stop = int(chunk["start"]), int(chunk["stop"])
    if fmt == "parquet":
        pf = _open_parquet(uri)
        groups, offset = [], 0
        for g in range(pf.metadata.num_row_groups):
            n = pf.metadata.row_group(g).num_rows
            if offset < stop and offset + n > start:
                groups.append((g, offset))
            offset += n
        if not groups:
            return
        pos = groups[0][1]
        try:
            for batch in pf.iter_batches(batch_size=batch_rows, row_groups=[g for g, _ in groups], columns=columns,
                                         use_threads=False):
                lo, hi = max(start - pos, 0), min(stop - pos, batch.num_rows)
                pos += batch.num_rows
                if hi > lo:
                    yield batch.slice(lo, hi - lo).to_pandas()
                if pos >= stop:
                    return
        except OSError as exc:
            raise DataSourceError(f"cannot read rows {start}-{stop} of {uri}: {exc}") from exc
        return
    header, _, _ = _csv_header(uri)
    fs, path = _fs(uri)
    first_line = None
    with fs.open(path, "rb") as fh:
        # Every column is parsed (not only ``columns``): a row with too many fields is an error, not cut short.
        reader = pd.read_csv(io.BufferedReader(_Range(fh, header, start, stop), buffer_size=1 << 20),
                             chunksize=batch_rows, on_bad_lines="error")
        try:
            for frame in reader:
                yield frame[columns]
        except (ValueError, pd.errors.ParserError) as exc:
            first_line = f"cannot read {uri} (bytes {start}-{stop}, chunk {chunk['index']}): {exc}"
        if first_line:
            raise DataSourceError(first_line)


# -- scoring ------------------------------------------------------------------------------------
def score_frame(model: Any, frame: pd.DataFrame, numeric: list[str], categorical: list[str]) -> np.ndarray:
    """What in-process predict gives for these rows (the features prepared as training and serving do)."""
    from components.train import prepare_features

    try:
        return np.asarray(model.predict(prepare_features(frame, numeric, categorical)))
    except (ValueError, TypeError) as exc:
        raise DataValidationError(f"the model cannot score these rows: {exc}") from exc


def score_chunk(model: Any, *, uri: str, fmt: str, chunk: dict[str, Any], numeric: list[str], categorical: list[str],
                id_column: str, version: str, part_path: str | Path, sample_path: str | Path, sample_rows: int,
                batch_rows: int, seed: int = 0, keep: list[str] | None = None) -> int:
    """Score one chunk into a parquet part; keep a uniform sample of its features (≤ ``sample_rows``).

    Each prediction carries the row's ``id_column`` or, when that is empty, its row number within the
    chunk (:func:`write_predictions` makes it the row's position in the input), and the ``keep`` columns.
    The model's native threads (OpenMP in scikit-learn's boosting) are held to this chunk's share of
    the cores: chunks side by side on one machine would otherwise oversubscribe it several times over.
    """
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=max(1, default_chunks() // max(1, int(chunk.get("of", 1))))):
        return _score_chunk(model, uri=uri, fmt=fmt, chunk=chunk, numeric=numeric, categorical=categorical,
                            id_column=id_column, version=version, part_path=part_path, sample_path=sample_path,
                            sample_rows=sample_rows, batch_rows=batch_rows, seed=seed, keep=list(keep or []))


def _prediction_table(frame: pd.DataFrame, preds: np.ndarray, *, id_column: str, first_row: int, version: str,
                      keep: list[str]) -> Any:
    """One batch of the output: the id (or row number), the prediction, the model version, the kept columns."""
    import pyarrow as pa

    ids = (pa.array(frame[id_column].to_numpy()) if id_column
           else pa.array(np.arange(first_row, first_row + len(frame), dtype=np.int64)))
    out = pa.table({id_column or ROW: ids, PREDICTION: pa.array(preds),
                    MODEL_VERSION: pa.array([version] * len(frame), pa.string())})
    if keep:
        kept = pa.Table.from_pandas(frame[keep], preserve_index=False)
        for name in keep:
            out = out.append_column(name, kept.column(name))
    return out.replace_schema_metadata(None if id_column else {_ROWS_KEY: b"chunk"})


def _score_chunk(model: Any, *, uri: str, fmt: str, chunk: dict[str, Any], numeric: list[str], categorical: list[str],
                 id_column: str, version: str, part_path: str | Path, sample_path: str | Path, sample_rows: int,
                 batch_rows: int, seed: int, keep: list[str]) -> int:
    import pyarrow as pa
    import pyarrow.parquet as pq

    columns = list(dict.fromkeys([*([id_column] if id_column else []), *numeric, *categorical, *keep]))
    writer, rows = None, 0
    rng = np.random.default_rng(seed + int(chunk["index"]))
    sample: pd.DataFrame | None = None
    sample_keys: np.ndarray | None = None
    try:
        for frame in iter_chunk(uri, fmt, chunk, columns, batch_rows):
            if id_column and frame[id_column].isna().any():
                at = rows + int(np.flatnonzero(frame[id_column].isna().to_numpy())[0])
                raise DataValidationError(f"id column {id_column!r} is empty in row {at} of chunk {chunk['index']}",
                                          column=id_column, rule="not_null")
            preds = score_frame(model, frame, numeric, categorical)
            out = _prediction_table(frame, preds, id_column=id_column, first_row=rows, version=version, keep=keep)
            if writer is None:
                writer = pq.ParquetWriter(str(part_path), out.schema)
            writer.write_table(out.cast(writer.schema))
            rows += len(frame)
            # Bottom-k by random keys: a uniform sample of the chunk in bounded memory.
            keys = rng.random(len(frame))
            feats = frame[[*numeric, *categorical]].reset_index(drop=True)
            if sample is None:
                sample, sample_keys = feats, keys
            else:
                sample = pd.concat([sample, feats], ignore_index=True)
                sample_keys = np.concatenate([sample_keys, keys])
            if len(sample) > sample_rows:
                keep_rows = np.argpartition(sample_keys, sample_rows)[:sample_rows]
                sample, sample_keys = sample.iloc[keep_rows].reset_index(drop=True), sample_keys[keep_rows]
            # Arrow's allocator (mimalloc) keeps freed batches cached; handing them back each batch
            # (~1 ms) keeps ~8 MB less resident (benchmarks/bench_score.py).
            pa.default_memory_pool().release_unused()
    finally:
        if writer is not None:
            writer.close()
    if writer is None:  # an empty chunk still hands on a (typed-later) empty part
        pq.write_table(pa.table({id_column or ROW: pa.array([], pa.null())}), str(part_path))
    (sample if sample is not None else pd.DataFrame(columns=[*numeric, *categorical])).to_parquet(sample_path, index=False)
    return rows


def write_predictions(parts: list[str | Path], output_uri: str, *, overwrite: bool = False) -> int:
    """Stream the parts, in order, to the output: a temporary name first, renamed when complete."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    if not overwrite and _exists(output_uri):
        raise OutputExistsError(f"output {output_uri} already exists; pass --overwrite to replace it")
    fs, path = _fs(output_uri)
    parent = path.rsplit("/", 1)[0] if "/" in path else "."
    try:
        fs.makedirs(parent, exist_ok=True)
    except OSError as exc:
        raise DataSourceError(f"cannot create the folder of {output_uri}: {exc}") from exc
    tmp = f"{parent}/{_TMP_MARK}{uuid.uuid4().hex[:8]}-{path.rsplit('/', 1)[-1]}"
    as_csv = resolve_format(output_uri) == "csv"
    schema, rows = None, 0
    try:
        with fs.open(tmp, "wb") as sink:
            writer = None
            try:
                for part in parts:
                    pf = _open_parquet(str(part))
                    if pf.metadata.num_rows == 0:
                        continue
                    numbered = (pf.schema_arrow.metadata or {}).get(_ROWS_KEY) == b"chunk"
                    offset = rows  # a chunk's row numbers count from its start: add the rows before it
                    for batch in pf.iter_batches(batch_size=65_536):
                        table = pa.Table.from_batches([batch]).replace_schema_metadata(None)
                        if numbered:
                            at = table.schema.get_field_index(ROW)
                            table = table.set_column(at, ROW, pc.add(table.column(at), offset))
                        if schema is None:
                            schema = table.schema
                            writer = (pacsv.CSVWriter(sink, schema) if as_csv else pq.ParquetWriter(sink, schema))
                        writer.write_table(table.cast(schema))
                        rows += table.num_rows
            except BaseException:
                if writer is not None:  # close it while its file is open (else its __del__ writes to a closed
                    with contextlib.suppress(Exception):  # file); the temporary is removed below
                        writer.close()
                raise
            if writer is not None:
                writer.close()
        if rows == 0:
            raise DataSourceError("no rows were scored; nothing is written")
        if not overwrite and _exists(output_uri):
            raise OutputExistsError(f"output {output_uri} appeared while scoring; pass --overwrite to replace it")
        from fsspec.implementations.local import LocalFileSystem

        if isinstance(fs, LocalFileSystem):
            os.replace(tmp, path)  # atomic on one filesystem
        else:
            fs.mv(tmp, path)
    except BaseException:
        try:
            fs.rm(tmp)
        except (OSError, FileNotFoundError):
            pass
        raise
    return rows


# -- drift and alert ------------------------------------------------------------------------------
def batch_drift(reference: pd.DataFrame, sample: pd.DataFrame, numeric: list[str], categorical: list[str], *,
                drift_share: float = 0.5) -> tuple[Any, dict[str, Any]]:
    """Evidently's ``DataDriftPreset`` on the batch sample against the model's reference: (snapshot, verdict)."""
    from evidently import DataDefinition, Dataset, Report
    from evidently.presets import DataDriftPreset

    from components.train import prepare_features

    ref, cur = prepare_features(reference, numeric, categorical), prepare_features(sample, numeric, categorical)
    empty = [c for c in cur.columns if cur[c].isna().all()]
    if empty:
        raise DataValidationError(f"column(s) {', '.join(map(repr, empty))} have no values in the batch",
                                  column=empty[0], rule="not_empty")
    definition = DataDefinition(numerical_columns=list(numeric), categorical_columns=list(categorical))
    try:
        snapshot = Report([DataDriftPreset(drift_share=drift_share)], include_tests=True).run(
            current_data=Dataset.from_pandas(cur, data_definition=definition),
            reference_data=Dataset.from_pandas(ref, data_definition=definition))
    except ValueError as exc:
        raise DataValidationError(f"Evidently could not compare the batch with the reference: {exc}") from exc
    data = snapshot.dict()
    failed = {t["metric_config"]["metric_id"] for t in data.get("tests", []) if t.get("status") == "FAIL"}
    columns = []
    for metric in data["metrics"]:
        config = metric["config"]
        if config.get("type", "").endswith("ValueDrift"):
            columns.append({"column": config["column"], "method": str(config["method"]), "value": float(metric["value"]),
                            "threshold": float(config["threshold"]), "drifted": metric["id"] in failed})
    drifted = [c["column"] for c in columns if c["drifted"]]
    share = len(drifted) / len(columns) if columns else 0.0
    verdict = {"dataset_drift": bool(columns) and share >= drift_share, "share": share, "drifted_columns": drifted,
               "columns": columns, "reference_rows": len(ref), "current_rows": len(cur)}
    return snapshot, verdict


def log_batch_run(registry: Any, files: list[Path], *, verdict: dict[str, Any], model: str, version: str,
                  input_uri: str, output_uri: str, rows: int, request_id: str, trigger: str, id_column: str = "",
                  keep: list[str] | None = None) -> tuple[str, str]:
    """An MLflow run for the scoring request with the Evidently report; returns (run id, the HTML's URI)."""
    with registry.translate_errors("cannot log the batch drift report to MLflow"):
        client = registry.client
        run = client.create_run(registry.experiment_id(), run_name=f"score-{request_id[:8]}", tags={
            "driftloop.kind": "batch-score", "driftloop.model": model, "driftloop.score.version": str(version),
            "driftloop.score.input": input_uri, "driftloop.score.output": output_uri,
            "driftloop.score.request_id": request_id, "driftloop.trigger": trigger,
            "driftloop.score.drift": "drifted" if verdict["dataset_drift"] else "ok",
            "driftloop.score.drifted_columns": ",".join(verdict["drifted_columns"]),
            "driftloop.score.ids": ids_text(id_column), "driftloop.score.kept": ",".join(keep or []),
            ALERT_TAG: "none: the batch did not drift" if not verdict["dataset_drift"] else "not sent yet"})
        run_id = run.info.run_id
        client.log_metric(run_id, "rows", rows)
        client.log_metric(run_id, "drift_share", verdict["share"])
        client.log_metric(run_id, "dataset_drift", 1.0 if verdict["dataset_drift"] else 0.0)
        for path in files:
            client.log_artifact(run_id, str(path), "batch_drift")
        client.set_terminated(run_id)
    return run_id, f"runs:/{run_id}/batch_drift/{files[0].name}"


def batch_record(verdict: dict[str, Any], *, model: str, version: str, input_uri: str, request_id: str, rows: int,
                 drift_share: float, report_uri: str | None, alert: str) -> dict[str, Any]:
    """The batch's drift check as a record of the model's history (:mod:`driftloop.core.history`)."""
    import datetime as dt

    return {"kind": "batch", "model": model, "version": str(version), "time": dt.datetime.now(dt.UTC).isoformat(),
            "rows": rows, "verdict": "drift" if verdict["dataset_drift"] else "no drift", "share": verdict["share"],
            "drift_share": drift_share, "drifted_columns": list(verdict["drifted_columns"]),
            "columns": [{"column": c["column"], "method": c["method"], "score": c["value"], "threshold": c["threshold"],
                         "drifted": c["drifted"]} for c in verdict["columns"]],
            "input": input_uri, "request": request_id, "report": report_uri,
            "reason": None if alert == "none" else f"alert {alert}"}


def alert_payload(*, model: str, version: str, input_uri: str, request_id: str, started: str,
                  verdict: dict[str, Any], rows: int, report_uri: str | None) -> dict[str, Any]:
    """One firing alert in Alertmanager's webhook format; same request → same fingerprint and startsAt."""
    fingerprint = hashlib.sha256(f"batch:{model}:{version}:{input_uri}:{request_id}".encode()).hexdigest()[:16]
    return {
        "version": "4", "status": "firing", "receiver": "driftloop-batch-score",
        "alerts": [{
            "status": "firing", "fingerprint": fingerprint, "startsAt": started,
            "labels": {"alertname": "DriftloopBatchDrift", "model": model, "version": str(version),
                       "source": "batch-score"},
            "annotations": {"summary": f"batch {input_uri} drifted from {model} v{version}'s reference",
                            "drifted_columns": ",".join(verdict["drifted_columns"]), "share": f"{verdict['share']:.3f}",
                            "rows": str(rows), "report": report_uri or ""},
        }],
    }


def send_alert(url: str, payload: dict[str, Any], *, token: str | None, timeout: float = 10.0,
               client: Any | None = None) -> dict[str, Any]:
    """POST the alert to the monitor's webhook; returns its decisions. Raises ``DriftloopError`` naming why not."""
    import httpx

    if not token:
        raise DriftloopError("DRIFTLOOP_WEBHOOK_TOKEN is not set in the scoring step's environment (the monitor's "
                             "webhook needs it)")
    headers = {"authorization": f"Bearer {token}", "content-type": "application/json"}
    try:
        if client is not None:
            resp = client.post(url, content=json.dumps(payload), headers=headers, timeout=timeout)
        else:
            resp = httpx.post(url, content=json.dumps(payload), headers=headers, timeout=timeout)
    except httpx.HTTPError as exc:
        raise DriftloopError(f"the monitor at {url} did not take the drift alert: {exc}") from exc
    if resp.status_code != 200:
        raise DriftloopError(f"the monitor at {url} refused the drift alert: HTTP {resp.status_code} {resp.text[:200]}")
    return resp.json()


def deliver_alert(registry: Any, run_id: str, url: str, payload: dict[str, Any], *, token: str | None) -> str:
    """Send a drifted batch's alert to the monitor and record on the batch's MLflow run whether it went out
    (tag ``driftloop.score.alert``): ``sent to <url>: <the monitor's decision>`` or ``not sent: <why>``.
    A failure to send stops nothing: the predictions and the report stand."""
    try:
        answer = send_alert(url, payload, token=token)
    except DriftloopError as exc:
        outcome = f"not sent: {exc}"
    else:
        decisions = [f"{d.get('decision')}" + (f" ({d['reason']})" if d.get("reason") else "")
                     for d in answer.get("decisions") or []]
        outcome = f"sent to {url}: " + ("; ".join(decisions) or "the monitor took it")
    with registry.translate_errors("cannot record the drift alert's delivery in MLflow"):
        registry.client.set_tag(run_id, ALERT_TAG, outcome[:4000])
    return outcome
