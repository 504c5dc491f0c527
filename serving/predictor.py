"""The KServe predictor: one MLflow model behind kserve's own ``ModelServer``.

``DriftloopModel`` loads a model version from MLflow (``models:/name@alias``,
``models:/name/3``, ``runs:/…`` or a path), reads the input columns and their
types from the model signature, and answers KServe's V1 and V2 (Open Inference
Protocol) requests. Every request is checked against the signature before the
model sees it; a bad one raises ``kserve.errors.InvalidInput`` (HTTP 400) with a
message that names the problem, and the server keeps serving.

Request formats accepted:

* V1 ``{"instances": [...]}``: each row a mapping ``{column: value}`` (all columns
  of the signature, no others) or a list of values in signature column order.
* V2 ``inputs``: either one tensor per column, named by the column, shape ``[n]``
  or ``[n, 1]`` (numeric columns as FP64/FP32/INT*, categorical as BYTES), or one
  2-D tensor of shape ``[n, columns]`` in signature column order (BYTES for mixed
  rows, a numeric type when every column is numeric).

Numeric values are JSON numbers or ``null`` (a gap); categorical values are
strings or ``null``. Responses carry the registered version that answered:
V1 ``{"predictions": [...], "model_version": "3"}``; V2 an ``InferResponse``
with output ``predictions``, ``model_version`` and ``id`` = the request's id.

``python -m serving.predictor --model-name NAME --model-uri URI`` serves one
model. On the embedded default it listens on 127.0.0.1 only, without gRPC, and
without per-request trace and access log lines (they cost ~12 % throughput).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import os
import re
import sys
import uuid
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

# kserve.model_server parses sys.argv when imported; it must not see our flags as its own.
_argv, sys.argv = sys.argv, sys.argv[:1]
try:
    import kserve
    from kserve.errors import InvalidInput, ModelNotFound
    from kserve.protocol.rest.server import RESTServer
    from kserve.protocol.infer_type import InferInput, InferOutput, InferRequest, InferResponse
    from kserve.utils.utils import from_np_dtype
finally:
    sys.argv = _argv

from driftloop.core.errors import ServingError

__all__ = [
    "DriftloopModel",
    "InputSchema",
    "input_schema",
    "frame_from_instances",
    "frame_from_v2",
    "LocalModelServer",
    "PayloadLimit",
    "SCORES_HEADER",
    "wants_scores",
    "CatchAll",
    "FastInferV2",
    "serve",
    "main",
]

log = logging.getLogger(__name__)

_NUMERIC_TYPES = {"double", "float", "long", "integer"}
_FLOAT_V2 = {"FP64", "FP32", "FP16"}
_INT_V2 = {"INT8", "INT16", "INT32", "INT64", "UINT8", "UINT16", "UINT32", "UINT64"}
_NUMERIC_V2 = _FLOAT_V2 | _INT_V2
_KNOWN_V2 = _NUMERIC_V2 | {"BYTES", "BOOL"}
# Python types accepted as a number in a JSON row; JSON true/false are refused (bool is checked first).
_NUMBER = (int, float)
_MAX_DOUBLE = float(np.finfo(np.float64).max)


@dataclass(frozen=True)
class InputSchema:
    """Input columns of a model in signature order, and which of them are numeric."""

    columns: tuple[str, ...]
    numeric: frozenset[str]

    def __post_init__(self) -> None:
        numeric_columns = tuple(c for c in self.columns if c in self.numeric)
        string_columns = tuple(c for c in self.columns if c not in self.numeric)
        object.__setattr__(self, "column_set", frozenset(self.columns))
        object.__setattr__(self, "numeric_columns", numeric_columns)
        object.__setattr__(self, "string_columns", string_columns)
        object.__setattr__(self, "numeric_index", tuple(self.columns.index(c) for c in numeric_columns))
        object.__setattr__(self, "string_index", tuple(self.columns.index(c) for c in string_columns))
        # True when the signature lists numeric columns first (as the training step does): no reordering.
        object.__setattr__(self, "grouped", self.columns == numeric_columns + string_columns)


def input_schema(signature: Any) -> InputSchema:
    """The input columns of an MLflow ``ModelSignature`` (column-based signatures only)."""
    inputs = getattr(signature, "inputs", None)
    if inputs is None or not inputs.has_input_names():
        raise ServingError("the model's MLflow signature has no named input columns; it cannot be served")
    columns: list[str] = []
    numeric: set[str] = set()
    for spec in inputs.inputs:
        columns.append(spec.name)
        kind = getattr(getattr(spec, "type", None), "name", "")
        if kind in _NUMERIC_TYPES:
            numeric.add(spec.name)
    return InputSchema(tuple(columns), frozenset(numeric))


# -- request → DataFrame ------------------------------------------------------------------------
# Rows are split into a numeric block (n×k float64, NaN gaps) and a string block (n×m object, None
# gaps) and the frame is built from the two blocks: the same dtypes the model was trained on
# (components.train.prepare_features), at a fraction of the cost of building it column by column.
def _numbers(rows: list[list[Any]], names: tuple[str, ...]) -> np.ndarray:
    """n×k float64 from JSON values; anything but a number or null is refused, naming the column."""
    if not names:
        return np.empty((len(rows), 0))
    arr = np.array(rows)
    # all numbers, no gaps, no true/false (numpy would take them as 1/0): the common case
    if arr.dtype.kind in "fiu" and arr.ndim == 2 and not any(v is True or v is False for row in rows for v in row):
        out = arr.astype(np.float64, copy=False)
        if np.isfinite(out).all():
            return out
    for row in rows:
        for name, v in zip(names, row):
            if v is None:
                continue
            if isinstance(v, bool) or not isinstance(v, _NUMBER):
                raise InvalidInput(f"column {name!r} expects a number or null, got {type(v).__name__} {v!r:.40}")
            if isinstance(v, float) and not math.isfinite(v):
                raise InvalidInput(_non_finite(name, v))
            if isinstance(v, int) and abs(v) > _MAX_DOUBLE:
                raise InvalidInput(_non_finite(name, float("inf") if v > 0 else float("-inf")))
    return np.array(rows, dtype=np.float64)


def _non_finite(name: str, value: float) -> str:
    return (f"column {name!r} holds {value!r}, which JSON cannot carry (NaN/Infinity, or a number too large "
            "for a double); send a finite number, or null for a gap")


def _strings(rows: list[list[Any]], names: tuple[str, ...]) -> np.ndarray:
    """n×m object array of strings and None; anything else is refused, naming the column."""
    for row in rows:
        for name, v in zip(names, row):
            if v is not None and type(v) is not str:
                raise InvalidInput(f"column {name!r} expects a string or null, got {type(v).__name__} {v!r:.40}")
    out = np.empty((len(rows), len(names)), dtype=object)
    if names and rows:
        out[:] = rows
    return out


def _frame(numbers: np.ndarray, strings: np.ndarray, schema: InputSchema, as_array: bool = False
           ) -> pd.DataFrame | np.ndarray:
    if as_array and not schema.string_columns:  # the model takes the float64 block itself (_takes_array)
        return numbers
    parts = []
    if schema.numeric_columns:
        parts.append(pd.DataFrame(numbers, columns=list(schema.numeric_columns), copy=False))
    if schema.string_columns:
        parts.append(pd.DataFrame(strings, columns=list(schema.string_columns), copy=False))
    frame = parts[0] if len(parts) == 1 else pd.concat(parts, axis=1)
    return frame if schema.grouped else frame[list(schema.columns)]


def _check_names(given: Any, schema: InputSchema, where: str) -> None:
    given = set(given)
    if given == schema.column_set:
        return
    unknown = sorted(given - schema.column_set)
    missing = [c for c in schema.columns if c not in given]
    parts = []
    if unknown:
        parts.append(f"unknown column(s) {unknown}")
    if missing:
        parts.append(f"missing column(s) {missing}")
    raise InvalidInput(f"{where}: " + "; ".join(parts) + f" (expected {list(schema.columns)})")


def frame_from_instances(instances: Any, schema: InputSchema, *, as_array: bool = False) -> pd.DataFrame | np.ndarray:
    """V1 ``instances`` (rows as mappings or as lists in signature order) → a validated DataFrame
    (``as_array``, all columns numeric: its float64 array, columns in signature order)."""
    if not isinstance(instances, list):
        raise InvalidInput('"instances" must be a list of rows')
    if not instances:
        raise InvalidInput('"instances" is empty: send at least one row')
    ncols = len(schema.columns)
    first = instances[0]
    if isinstance(first, dict):
        for i, row in enumerate(instances):
            if not isinstance(row, dict):
                raise InvalidInput(f"instance {i} is a {type(row).__name__}; all rows must be mappings like row 0")
            if row.keys() != schema.column_set:
                _check_names(row.keys(), schema, f"instance {i}")
        num_rows = [[row[c] for c in schema.numeric_columns] for row in instances]
        str_rows = [[row[c] for c in schema.string_columns] for row in instances]
    elif isinstance(first, list):
        for i, row in enumerate(instances):
            if not isinstance(row, list):
                raise InvalidInput(f"instance {i} is a {type(row).__name__}; all rows must be lists like row 0")
            if len(row) != ncols:
                raise InvalidInput(f"instance {i} has {len(row)} values; expected {ncols} in the order "
                                   f"{list(schema.columns)}")
        num_rows = [[row[j] for j in schema.numeric_index] for row in instances]
        str_rows = [[row[j] for j in schema.string_index] for row in instances]
    else:
        raise InvalidInput(f"instance 0 is a {type(first).__name__}; rows must be mappings {{column: value}} "
                           "or lists of values in signature order")
    return _frame(_numbers(num_rows, schema.numeric_columns), _strings(str_rows, schema.string_columns), schema,
                  as_array)


def _tensor(inp: InferInput) -> np.ndarray:
    """A V2 input tensor as a numpy array, checked beyond what kserve's ``as_numpy`` checks.

    The datatype must be one the protocol names, the shape non-negative integers whose product
    is the number of values; numeric data must be numbers (or null, a gap) that JSON can carry
    (no NaN/Infinity), integers for the INT types and within their range.
    """
    name, datatype, shape = inp.name, inp.datatype, list(inp.shape or [])
    if datatype not in _KNOWN_V2:
        raise InvalidInput(f"input tensor {name!r} has unknown datatype {datatype!r}; use FP64/FP32/INT64 (or another "
                           "numeric type) for numbers and BYTES for strings")
    if not shape or any(isinstance(d, bool) or not isinstance(d, int) or d < 0 for d in shape):
        raise InvalidInput(f"input tensor {name!r} has shape {shape}; dimensions must be non-negative integers")
    if datatype in _NUMERIC_V2 and getattr(inp, "_raw_data", None) is None:
        return _numeric_tensor(inp, shape)
    try:
        arr = inp.as_numpy()
    except InvalidInput:
        raise
    except (ValueError, TypeError, OverflowError) as exc:
        raise InvalidInput(f"input tensor {name!r} (shape {shape}, {datatype}) does not hold its data: {exc}") from exc
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        raise InvalidInput(f"input tensor {name!r} holds NaN or Infinity; send finite numbers")
    return arr


def _flat(data: Any) -> list[Any]:
    if not isinstance(data, list):
        return [data]
    if not any(isinstance(v, list) for v in data):
        return data
    out: list[Any] = []
    for v in data:
        out.extend(_flat(v))
    return out


def _numeric_tensor(inp: InferInput, shape: list[int]) -> np.ndarray:
    """The data of a numeric tensor (JSON, or raw bytes that kserve decoded) → float64 of ``shape``
    (null → NaN, a gap), every value checked."""
    name, datatype = inp.name, inp.datatype
    flat = _flat(inp.data)
    size = math.prod(shape)
    if len(flat) != size:
        raise InvalidInput(f"input tensor {name!r} holds {len(flat)} value(s) but its shape {shape} needs {size}")
    arr = np.asarray(flat) if flat else np.empty(0)
    if arr.dtype.kind in "iu" or (arr.dtype.kind == "f" and np.isfinite(arr).all()):
        values = arr.astype(np.float64, copy=False)
    else:
        for v in flat:
            if v is None:
                continue
            if isinstance(v, bool) or not isinstance(v, _NUMBER):
                raise InvalidInput(f"input tensor {name!r} ({datatype}) holds {type(v).__name__} {v!r:.40}; "
                                   "expected numbers (null for a gap)")
            if (isinstance(v, float) and not math.isfinite(v)) or (isinstance(v, int) and abs(v) > _MAX_DOUBLE):
                shown = v if isinstance(v, float) else float("inf") if v > 0 else float("-inf")
                raise InvalidInput(f"input tensor {name!r} holds {shown!r}: NaN and Infinity are not accepted as "
                                   f"values of feature {name!r} (a number too large for a double is Infinity); send "
                                   "finite numbers, null for a gap")
        values = np.array([np.nan if v is None else v for v in flat], dtype=np.float64)
    if datatype in _INT_V2:
        given = values[~np.isnan(values)]
        fractional = given[given != np.floor(given)]
        if fractional.size:
            raise InvalidInput(f"input tensor {name!r} is {datatype} but holds {fractional[0]:g}; send whole numbers "
                               "or declare FP64")
        info = np.iinfo(datatype.lower())
        outside = given[(given < info.min) | (given > info.max)]
        if outside.size:
            raise InvalidInput(f"input tensor {name!r} is {datatype} but holds {outside[0]:g}, outside its range")
    return values.reshape(shape)


def _from_bytes(values: np.ndarray) -> list[Any]:
    return [v.decode("utf-8") if isinstance(v, bytes) else v for v in values.tolist()]


def _tensor_column(inp: InferInput, name: str, numeric: bool) -> np.ndarray:
    arr = _tensor(inp)
    if arr.ndim == 2 and arr.shape[1] == 1:
        arr = arr[:, 0]
    if arr.ndim != 1:
        raise InvalidInput(f"input tensor {name!r} has shape {list(arr.shape)}; a column tensor must be [n] or [n, 1]")
    if numeric:
        if inp.datatype not in _NUMERIC_V2:
            raise InvalidInput(f"input tensor {name!r} is {inp.datatype}; column {name!r} expects numbers "
                               "(FP64, FP32 or INT*)")
        return arr.astype(np.float64, copy=False)
    if inp.datatype != "BYTES":
        raise InvalidInput(f"input tensor {name!r} is {inp.datatype}; column {name!r} expects strings (BYTES)")
    return _strings([[v] for v in _from_bytes(arr)], (name,))[:, 0]


def frame_from_v2(request: InferRequest, schema: InputSchema, *, as_array: bool = False) -> pd.DataFrame | np.ndarray:
    """V2 inputs (one tensor per column, or one 2-D tensor in signature order) → a validated DataFrame
    (``as_array``: as :func:`frame_from_instances`)."""
    inputs = request.inputs
    if not inputs:
        raise InvalidInput('"inputs" is empty: send one tensor per column or one 2-D tensor')
    if len(inputs) == 1 and inputs[0].name not in schema.column_set:
        inp = inputs[0]
        arr = _tensor(inp)
        if arr.ndim != 2 or arr.shape[1] != len(schema.columns):
            raise InvalidInput(f"input tensor {inp.name!r} has shape {list(arr.shape)}; a single tensor must be "
                               f"[n, {len(schema.columns)}] with columns {list(schema.columns)} (or name one tensor "
                               "per column)")
        if arr.shape[0] == 0:
            raise InvalidInput(f"input tensor {inp.name!r} has no rows")
        if inp.datatype == "BYTES":
            rows = [_from_bytes(r) for r in arr]
            return frame_from_instances(rows, schema, as_array=as_array)
        if inp.datatype not in _NUMERIC_V2 or schema.numeric != schema.column_set:
            strings = sorted(schema.column_set - schema.numeric)
            raise InvalidInput(f"input tensor {inp.name!r} is {inp.datatype}; "
                               + (f"the columns {strings} are strings, send BYTES" if strings else "send numbers"))
        numbers = arr.astype(np.float64)
        return numbers if as_array else pd.DataFrame(numbers, columns=list(schema.columns))
    by_name = {inp.name: inp for inp in inputs}
    if len(by_name) != len(inputs):
        raise InvalidInput("input tensors have duplicate names")
    _check_names(by_name, schema, "input tensors")
    data = {c: _tensor_column(by_name[c], c, c in schema.numeric) for c in schema.columns}
    lengths = {c: len(v) for c, v in data.items()}
    if len(set(lengths.values())) != 1:
        raise InvalidInput(f"input tensors differ in length: {lengths}")
    n = next(iter(lengths.values()))
    if n == 0:
        raise InvalidInput("input tensors have no rows")
    numbers = np.column_stack([data[c] for c in schema.numeric_columns]) if schema.numeric_columns else None
    strings = np.column_stack([data[c] for c in schema.string_columns]) if schema.string_columns else None
    return _frame(numbers, strings, schema, as_array)


def _finite(preds: np.ndarray) -> np.ndarray:
    """Predictions JSON can carry: a model that answers NaN/Infinity gets a 500 naming it, never a body
    the inference log would refuse."""
    if preds.dtype.kind == "f" and not np.isfinite(preds).all():
        from kserve.errors import InferenceError

        raise InferenceError(f"the model produced {int((~np.isfinite(preds)).sum())} NaN/Infinity prediction(s)")
    return preds


# -- the model ----------------------------------------------------------------------------------
def _is_registry_uri(uri: str) -> bool:
    return uri.startswith("models:/") and not uri.startswith("models:/m-")


class DriftloopModel(kserve.Model):
    """One MLflow model version served by KServe, validated against its signature."""

    def __init__(self, name: str, model_uri: str, tracking_uri: str | None = None, *, location: str | None = None,
                 version: str | None = None) -> None:
        """``location`` (with ``version``): where ``model_uri``'s files are, resolved already by whoever started
        this server (:func:`serving.local_backend.files_location`): loaded without the registry."""
        super().__init__(name)
        self.model_uri = model_uri
        self.tracking_uri = tracking_uri
        self.location = location
        self.model_version: str | None = version if location else None
        self.schema: InputSchema | None = None
        self._model: Any = None
        self._as_array = False  # predict on the frame's float64 array (see _takes_array)

    def _resolve(self) -> str:
        """Pin a registry URI to its version now, so an alias moving later cannot change what is served."""
        if self.location:  # a file: URI as the local path it names (MLflow finds MLmodel in a folder path only)
            from mlflow.utils.file_utils import local_file_uri_to_path

            return local_file_uri_to_path(self.location)
        if not _is_registry_uri(self.model_uri):
            return self.model_uri
        from driftloop.core.errors import RegistryError
        from driftloop.core.registry import Registry

        import mlflow

        registry = Registry(self.tracking_uri or mlflow.get_tracking_uri())
        try:
            info = registry.resolve(self.model_uri)
        except RegistryError as exc:
            raise ServingError(f"cannot serve {self.model_uri}: {exc}") from exc
        self.model_version = info.version
        return info.uri

    def load(self) -> bool:
        """Load the model and its signature; raises ServingError naming the URI when it cannot."""
        import mlflow
        from mlflow.exceptions import MlflowException

        if self.tracking_uri:
            mlflow.set_tracking_uri(self.tracking_uri)
        uri = self._resolve()
        try:
            # the MLmodel file alone (get_model_info would also ask the tracking store for the logged model, which a
            # packed server loading another store's model folder does not have)
            info = mlflow.models.Model.load(uri)
            self.schema = input_schema(info.signature)
            if "sklearn" in info.flavors:
                self._model = mlflow.sklearn.load_model(uri)
            else:
                self._model = mlflow.pyfunc.load_model(uri)
        except (MlflowException, OSError) as exc:
            raise ServingError(f"cannot load model {self.model_uri}: {exc}") from exc
        if self.model_version is None:
            self.model_version = str(info.model_uuid or uri)
        self._as_array = _takes_array(self._model, self.schema)
        if self._as_array:  # the names were checked here, once; sklearn would warn on every call
            warnings.filterwarnings("ignore", message="X does not have valid feature names", category=UserWarning)
        self.ready = True
        log.info("loaded %s (version %s) as %r", self.model_uri, self.model_version, self.name)
        return self.ready

    def get_input_types(self) -> list[dict[str, Any]]:
        """V2 model metadata: one tensor per feature column, ``[-1]`` rows (FP64 numbers, BYTES strings)."""
        assert self.schema is not None, "load() first"
        return [{"name": c, "datatype": "FP64" if c in self.schema.numeric else "BYTES", "shape": [-1]}
                for c in self.schema.columns]

    def get_output_types(self) -> list[dict[str, Any]]:
        """V2 model metadata: ``predictions`` (the classes' type), and ``scores`` for a classifier when asked."""
        classes = getattr(self._model, "classes_", None)
        kind = from_np_dtype(np.asarray(classes).dtype) if classes is not None else "FP64"
        out = [{"name": "predictions", "datatype": kind if kind != "OBJECT" else "BYTES", "shape": [-1]}]
        if getattr(self._model, "predict_proba", None) is not None:
            out.append({"name": SCORES_OUTPUT, "datatype": "FP64", "shape": [-1, len(classes) if classes is not None
                                                                             else -1]})
        return out

    def _model_input(self, frame: pd.DataFrame | np.ndarray) -> pd.DataFrame | np.ndarray:
        return frame.to_numpy() if self._as_array and isinstance(frame, pd.DataFrame) else frame

    def _predict_frame(self, frame: pd.DataFrame) -> np.ndarray:
        return np.asarray(self._model.predict(self._model_input(frame)))

    def predict(self, payload: dict | InferRequest, headers: dict[str, str] | None = None) -> dict | InferResponse:
        assert self.schema is not None, "load() first"
        if isinstance(payload, InferRequest):
            frame = frame_from_v2(payload, self.schema, as_array=self._as_array)
            preds, scored = self._predict_and_score(frame, headers)
            if preds.dtype.kind in "OUS":
                preds = preds.astype(object)
            out = InferOutput(name="predictions", shape=list(preds.shape), datatype=from_np_dtype(preds.dtype),
                              data=preds.tolist())
            outputs = [out]
            if scored is not None:
                scores, classes = scored
                outputs.append(InferOutput(name=SCORES_OUTPUT, shape=list(scores.shape), datatype="FP64",
                                           data=scores.tolist(), parameters={"classes": json.dumps(classes)}))
            # "id" is optional in the Open Inference Protocol; KServe answers with a generated one
            return InferResponse(response_id=payload.id or str(uuid.uuid4()), model_name=self.name,
                                 infer_outputs=outputs, model_version=self.model_version,
                                 use_binary_outputs=payload.use_binary_outputs,
                                 requested_outputs=_requested(payload, outputs))
        if not isinstance(payload, dict):
            raise InvalidInput('a V1 request must be a JSON object {"instances": [...]} sent as application/json')
        if "instances" not in payload:
            raise InvalidInput(f'a V1 request needs "instances"; got keys {sorted(payload)[:10]}')
        frame = frame_from_instances(payload["instances"], self.schema, as_array=self._as_array)
        preds, scored = self._predict_and_score(frame, headers)
        body = {"predictions": preds.tolist(), "model_version": self.model_version}
        if scored is not None:
            body[SCORES_OUTPUT], body["classes"] = scored[0].tolist(), scored[1]
        return body

    def _predict_and_score(self, frame: pd.DataFrame, headers: dict[str, str] | None
                           ) -> tuple[np.ndarray, tuple[np.ndarray, list[Any]] | None]:
        """Predictions, and class scores when the request asks for them.

        For learners whose ``predict`` *is* ``classes_[argmax(predict_proba)]`` (scikit-learn's
        HistGradientBoosting, RandomForest and ExtraTrees classifiers compute it exactly so), the
        predictions are taken from the one ``predict_proba`` call instead of running the model twice:
        the gateway asks for scores on every request it logs. Other learners run both.
        """
        scored = self._scores(frame, headers) if wants_scores(headers) else None
        if scored is not None and _predict_is_argmax_of_proba(self._model):
            raw_classes = np.asarray(_final_estimator(self._model).classes_)
            return _finite(raw_classes.take(np.argmax(scored[0], axis=1), axis=0)), scored
        return _finite(self._predict_frame(frame)), scored

    def _scores(self, frame: pd.DataFrame, headers: dict[str, str] | None) -> tuple[np.ndarray, list[Any]] | None:
        """Class scores (``n × k``, columns in ``classes`` order) of a classifier; None for a regressor."""
        proba = getattr(self._model, "predict_proba", None)
        if proba is None:
            return None
        classes = [c.item() if hasattr(c, "item") else c for c in getattr(self._model, "classes_", [])]
        return np.asarray(proba(self._model_input(frame)), dtype=np.float64), classes


def _takes_array(model: Any, schema: InputSchema) -> bool:
    """True when the model may be given the request's float64 array instead of a DataFrame: a plain
    scikit-learn estimator (no Pipeline or ColumnTransformer, which select columns by name) fitted on
    exactly the signature's columns, in its order, all numeric. sklearn turns such a frame into this
    very array before predicting; the frame's checks (feature names, dtypes through pandas and
    narwhals) cost ~30 % of a one-row request (HistGradientBoosting, 20 columns; py-spy). The names
    are compared here, once."""
    from sklearn.base import BaseEstimator
    from sklearn.compose import ColumnTransformer
    from sklearn.pipeline import Pipeline

    names = getattr(model, "feature_names_in_", None)
    return (isinstance(model, BaseEstimator) and not isinstance(model, (Pipeline, ColumnTransformer))
            and names is not None and not schema.string_columns
            and tuple(str(n) for n in names) == schema.columns)


def _requested(request: InferRequest, outputs: list[InferOutput]) -> Any:
    """The outputs a V2 request asked for by name (None: all), refusing a name the model has not."""
    asked = request.request_outputs
    if not asked:
        return None
    names = {o.name for o in outputs}
    unknown = sorted({o.name for o in asked} - names - {SCORES_OUTPUT})
    if unknown:
        raise InvalidInput(f"requested output(s) {unknown} do not exist; the model answers {sorted(names)}")
    return [o for o in asked if o.name in names] or None


def _final_estimator(model: Any) -> Any:
    steps = getattr(model, "steps", None)
    return steps[-1][1] if steps else model


def _predict_is_argmax_of_proba(model: Any) -> bool:
    """True for single-output classifiers whose ``predict`` is exactly the argmax of ``predict_proba``."""
    try:
        from sklearn.ensemble import ExtraTreesClassifier, HistGradientBoostingClassifier, RandomForestClassifier
    except ImportError:  # pragma: no cover - sklearn is a dependency
        return False
    final = _final_estimator(model)
    if not isinstance(final, (HistGradientBoostingClassifier, RandomForestClassifier, ExtraTreesClassifier)):
        return False
    return getattr(final, "n_outputs_", 1) == 1 and np.ndim(getattr(final, "classes_", None)) == 1


#: Request header that asks for class scores in the response (the local gateway sends it when it logs,
#: and strips the scores again unless its client asked too); on a cluster, set it in the client or
#: run the predictor with ``DRIFTLOOP_LOG_SCORES=1`` so KServe's logger sees them.
SCORES_HEADER = "x-driftloop-scores"
SCORES_OUTPUT = "scores"


def wants_scores(headers: dict[str, str] | None) -> bool:
    if os.environ.get("DRIFTLOOP_LOG_SCORES", "").lower() in ("1", "true", "yes"):
        return True
    return bool(headers) and str(headers.get(SCORES_HEADER, "")).lower() in ("1", "true", "yes")


# -- the server ---------------------------------------------------------------------------------
async def _answer_json(send: Any, status: int, doc: dict[str, Any]) -> None:
    """Answer an ASGI request with ``doc`` as JSON."""
    import orjson

    body = orjson.dumps(doc)
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


class PayloadLimit:
    """ASGI middleware: refuse request bodies over ``max_bytes`` with 413 and a message, before parsing."""

    def __init__(self, app: Any, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        for key, value in scope.get("headers", ()):
            if key == b"content-length" and value.isdigit() and int(value) > self.max_bytes:
                return await self._refuse(send, int(value))
        seen = 0
        started = False

        async def limited_receive() -> dict:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise _TooLarge(seen)
            return message

        async def tracking_send(message: dict) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except _TooLarge as exc:
            if not started:
                await self._refuse(send, exc.size)

    async def _refuse(self, send: Any, size: int) -> None:
        await _answer_json(send, 413, {"error": f"payload of {size} bytes exceeds the limit of {self.max_bytes} "
                                                "bytes (serving.max_payload_bytes)"})


REPOSITORY_PREFIX = "/v2/repository"
_VERSIONED = re.compile(r"/v2/models/(?P<name>[^/]+)/versions/(?P<version>[^/]+)(?P<rest>/ready|/infer)?")
_V2_MODEL = re.compile(r"/v2/models/(?P<name>[^/]+)(?:/ready|/infer)?")


class ModelVersions:
    """ASGI middleware for the V2 routes that name a model version (``/v2/models/{name}/versions/{v}``
    with ``/ready`` or ``/infer``, or ``?model_version=v``), which kserve answers with 501 whatever the
    version: the version this server serves is answered as the route without it, another one is a 404
    naming the version served (a model name it does not serve gets kserve's 404)."""

    def __init__(self, app: Any, version_of: Any) -> None:
        self.app = app
        self.version_of = version_of  # model name -> the version served, or None when not served here

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or not scope.get("path", "").startswith("/v2/models/"):
            return await self.app(scope, receive, send)
        from urllib.parse import parse_qsl, quote, urlencode

        path = scope["path"]
        query = parse_qsl(scope.get("query_string", b"").decode("latin-1"), keep_blank_values=True)
        asked = [v for k, v in query if k == "model_version" and v]
        found = _VERSIONED.fullmatch(path)
        if found is not None:
            name, rest = found["name"], found["rest"] or ""
            asked.append(found["version"])
            path = f"/v2/models/{name}{rest}"
        elif asked and (plain := _V2_MODEL.fullmatch(path)) is not None:
            name = plain["name"]
        else:
            return await self.app(scope, receive, send)
        served = self.version_of(name)
        wrong = [v for v in asked if v != served]
        if served is not None and wrong:
            return await _answer_json(send, 404, {"error": f"model {name!r} version {wrong[0][:60]!r} is not "
                                                           f"served here; this server serves version {served!r}"})
        rest_query = urlencode([(k, v) for k, v in query if k != "model_version"]).encode()
        scope = {**scope, "path": path, "raw_path": quote(path).encode(), "query_string": rest_query}
        await self.app(scope, receive, send)


class RequestEncoding:
    """ASGI middleware: a compressed body is refused with 415 naming its Content-Encoding (kserve would
    try it as UTF-8 JSON), and a body without Content-Type nor ``Inference-Header-Content-Length`` is
    read as JSON (kserve would ask for the binary header)."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope.get("method") != "POST":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers", ()))
        encoding = headers.get(b"content-encoding", b"identity").strip().lower()
        if encoding != b"identity":
            return await _answer_json(send, 415, {"error": f"Content-Encoding {encoding.decode('latin-1')!r} is not "
                                                           "supported; send the body uncompressed"})
        if b"content-type" not in headers and b"inference-header-content-length" not in headers:
            scope = {**scope, "headers": [*scope.get("headers", ()), (b"content-type", b"application/json")]}
        await self.app(scope, receive, send)


class CatchAll:
    """ASGI middleware: an unexpected exception becomes a 500 with a one-line JSON error, and stops there.

    Starlette's outermost error middleware re-raises after answering 500, and uvicorn then closes
    the keep-alive connection, so the client's next request on it fails. Caught here, the
    connection stays usable; the traceback is logged.
    """

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def tracking_send(message: dict) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception as exc:  # noqa: BLE001 (the boundary of the server)
            log.error("request %s failed", scope.get("path"), exc_info=exc)
            if started:
                raise
            await _answer_json(send, 500, {"error": f"{type(exc).__name__} : {exc}"[:2000]})


class _TooLarge(Exception):
    def __init__(self, size: int) -> None:
        super().__init__(size)
        self.size = size


_V2_INFER = re.compile(r"/v2/models/(?P<name>[^/]+)/infer")
_V2_REQUEST_KEYS = frozenset({"id", "inputs", "outputs"})
_V2_INPUT_KEYS = frozenset({"name", "shape", "datatype", "data"})


def _plain_v2(doc: Any) -> bool:
    """True for a V2 request body of exactly the documented JSON shape, with no ``parameters``
    anywhere (they switch on binary outputs and typed extensions that kserve's models coerce)."""
    if not isinstance(doc, dict) or not doc.keys() <= _V2_REQUEST_KEYS or not isinstance(doc.get("id", ""), str):
        return False
    inputs = doc.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        return False
    for inp in inputs:
        if (not isinstance(inp, dict) or inp.keys() != _V2_INPUT_KEYS or not isinstance(inp["name"], str)
                or not isinstance(inp["datatype"], str) or inp["datatype"] == "FP16"
                or not isinstance(inp["data"], list) or not isinstance(inp["shape"], list)
                or not all(d.__class__ is int for d in inp["shape"])):
            return False
    outputs = doc.get("outputs")
    return outputs is None or (isinstance(outputs, list)
                               and all(isinstance(o, dict) and o.keys() == {"name"} and isinstance(o["name"], str)
                                       for o in outputs))


class FastInferV2:
    """ASGI middleware: a plain JSON V2 ``POST /v2/models/{name}/infer`` answered without kserve's
    pydantic round trips, with the same bytes.

    kserve's V2 route has FastAPI parse the body (stdlib ``json``) into its ``InferenceRequest``
    pydantic model, copies that into an ``InferRequest``, and sends the answer through its
    ``InferenceResponse`` model and FastAPI's ``jsonable_encoder`` (pure Python over every value):
    that costs more than the model's predict at batch 1. Here the body is parsed with orjson and
    built into the ``InferRequest`` kserve's ``from_inference_request`` would build, kserve's own
    dataplane runs the model (readiness, pre/post-processing, its metrics), and the answer is dumped
    by the same ``InferenceResponse`` model in one call (``model_dump(mode="json")``, what
    ``jsonable_encoder`` yields for it) — byte-identical to kserve's answer (tests/test_predictor_v2.py).

    Everything else goes to kserve's route unchanged, with the body it sent: a body of any other
    shape (``parameters``, binary tensors, a CloudEvent, another content type), a model not served
    or not ready, and any error — so every refusal keeps kserve's status and message.
    """

    def __init__(self, app: Any, dataplane: Any) -> None:
        self.app = app
        self.dataplane = dataplane

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        path = scope.get("path", "")
        found = _V2_INFER.fullmatch(path) if scope["type"] == "http" and scope.get("method") == "POST" else None
        if found is None or any(k[:3] == b"ce-" or k == b"inference-header-content-length"
                                or (k == b"content-type" and v != b"application/json") for k, v in scope["headers"]):
            return await self.app(scope, receive, send)
        body, message = b"", {"more_body": True}
        while message.get("more_body", False):
            message = await receive()
            if message["type"] != "http.request":  # the client left
                return
            body += message.get("body", b"")
        answer = await self._answer(found["name"], body, scope["headers"])
        if answer is not None:
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-length", str(len(answer)).encode()),
                                    (b"content-type", b"application/json")]})
            await send({"type": "http.response.body", "body": answer})
            return
        replayed = False

        async def replay() -> dict:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)

    async def _answer(self, name: str, body: bytes, raw_headers: list) -> bytes | None:
        """The answer's bytes, or None to leave the request to kserve's route."""
        import orjson
        from kserve.protocol.infer_type import RequestedOutput
        from kserve.protocol.rest.v2_datamodels import InferenceResponse

        try:
            doc = orjson.loads(body)
            if not _plain_v2(doc) or not await self.dataplane.model_ready(name, True):
                return None
            outputs = doc.get("outputs")
            request = InferRequest(
                request_id=doc.get("id"), model_name=name, parameters=None,
                infer_inputs=[InferInput(name=i["name"], shape=i["shape"], datatype=i["datatype"], data=i["data"],
                                         parameters={}) for i in doc["inputs"]],
                request_outputs=None if not outputs else [RequestedOutput(name=o["name"], parameters={})
                                                          for o in outputs])
            headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in raw_headers}
            response, response_headers = await self.dataplane.infer(model_name=name, request=request, headers=headers)
            response, encode_headers = self.dataplane.encode(model_name=name, response=response, headers=headers,
                                                             req_attributes={})
            if not isinstance(response, dict) or {**response_headers, **encode_headers}:
                return None  # binary outputs or extra headers: kserve's route says them
            return orjson.dumps(InferenceResponse.model_validate(response).model_dump(mode="json"))
        except Exception:  # noqa: BLE001 - kserve's route answers (and logs) every error its own way
            return None


class _DriftloopRESTServer(RESTServer):
    """kserve's REST server plus the payload limit, a 400 for bodies FastAPI cannot parse, one log
    line (not a traceback) per refused request, and quiet per-request logging.

    Added in ``create_application``, which also runs in every worker process when
    ``workers > 1``: kserve spawns them, so changes made to the app in the parent are not inherited.
    """

    max_payload_bytes: int = 8 * 1024 * 1024
    enable_model_repository: bool = False
    fast_v2: bool = True  # FastInferV2; off only to compare with kserve's own V2 route

    def _register_endpoints(self, app: Any) -> None:
        """kserve's routes; without ``enable_model_repository``, its V2 router loses the repository
        extension (load/unload, without a token) before it is mounted, so it is neither served nor published."""
        if self.enable_model_repository:
            return super()._register_endpoints(app)
        include = app.include_router

        def without_repository(router: Any, *args: Any, **kwargs: Any) -> Any:
            if getattr(router, "prefix", "") == "/v2":
                router.routes[:] = [r for r in router.routes if not getattr(r, "path", "").startswith(REPOSITORY_PREFIX)]
            return include(router, *args, **kwargs)

        app.include_router = without_repository
        try:
            super()._register_endpoints(app)
        finally:
            del app.include_router

    def create_application(self) -> None:
        from fastapi.exceptions import RequestValidationError
        from kserve.model_server import app
        from starlette.exceptions import HTTPException

        super().create_application()
        if self.fast_v2:
            app.add_middleware(FastInferV2, dataplane=self.dataplane)  # innermost: after the checks below
        app.add_middleware(RequestEncoding)
        registry = self.dataplane.model_registry
        app.add_middleware(ModelVersions, version_of=lambda name: getattr(registry.get_model(name), "model_version",
                                                                          None))
        app.add_middleware(PayloadLimit, max_bytes=self.max_payload_bytes)
        app.add_middleware(CatchAll)  # added last: outside the payload limit, inside starlette's error middleware
        app.add_exception_handler(RequestValidationError, _request_error)
        app.add_exception_handler(HTTPException, _http_error)
        # kserve's handlers for the client's errors log a traceback for each; these log one line
        app.add_exception_handler(InvalidInput, _client_error(400))
        app.add_exception_handler(ModelNotFound, _client_error(404))
        _quiet_per_request_logging()


class LocalModelServer(kserve.ModelServer):
    """kserve's ModelServer, listening on a chosen interface instead of all of them.

    kserve builds its uvicorn config with ``host="0.0.0.0"`` inside ``RESTServer``; the
    config is only read when the server coroutine runs, so the host is set just before, and
    the REST server gets the project's additions (:class:`_DriftloopRESTServer`).
    """

    def __init__(self, *, host: str = "127.0.0.1", max_payload_bytes: int = 8 * 1024 * 1024,
                 enable_model_repository: bool = False, fast_v2: bool = True, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.host = host
        self.max_payload_bytes = max_payload_bytes
        self.enable_model_repository = enable_model_repository
        self.fast_v2 = fast_v2

    async def _serve(self) -> None:
        rest = self._rest_server or getattr(self._rest_multiprocess_server, "_rest_server", None)
        if rest is not None:
            rest.config.host = self.host
            rest.__class__ = _DriftloopRESTServer  # kserve constructs it inside start(); same state, one more step
            rest.max_payload_bytes = self.max_payload_bytes
            rest.enable_model_repository = self.enable_model_repository
            rest.fast_v2 = self.fast_v2
        await super()._serve()


def _quiet_per_request_logging() -> None:
    """Per-request trace/access lines and fastapi's per-request deprecation warning cost throughput."""
    from fastapi.exceptions import FastAPIDeprecationWarning

    warnings.filterwarnings("ignore", category=FastAPIDeprecationWarning)
    for name in ("kserve.trace", "uvicorn.access"):
        logging.getLogger(name).setLevel(logging.WARNING)


def _client_error(status: int) -> Any:
    """A handler for a refusal that is the client's error: kserve's answer, one log line, no traceback.

    kserve's own handlers (InvalidInput -> 400, ModelNotFound -> 404) log the whole traceback at
    ERROR for each, so a misbehaving client fills the model server's log (and its logging costs
    more than the refusal).
    """
    from fastapi.responses import JSONResponse

    async def handler(request: Any, exc: Any) -> Any:
        log.warning("refused %s %s (%d): %s", request.method, request.url.path, status, exc)
        return JSONResponse(status_code=status, content={"error": str(exc)})

    return handler


async def _http_error(request: Any, exc: Any) -> Any:
    """FastAPI's own refusals (a body it cannot decode, an unknown route, a method not allowed) as one
    ``{"error": ...}`` like every other refusal here, instead of ``{"detail": ...}``."""
    from fastapi.responses import JSONResponse

    return JSONResponse(status_code=exc.status_code, content={"error": str(exc.detail)}, headers=exc.headers)


async def _request_error(request: Any, exc: Any) -> Any:
    """FastAPI answers a body it cannot parse with 422 and a list; KServe's clients expect 400 and one line."""
    from fastapi.responses import ORJSONResponse

    problems = []
    for err in exc.errors():
        loc = [str(p) for p in err.get("loc", ()) if p not in ("body", "bytes")]
        if err.get("type") == "json_invalid":
            loc = []  # its loc is a character position, already in the message
        if err.get("type") == "bytes_type":
            continue  # the raw-bytes alternative of the V2 body; the JSON error says more
        detail = (err.get("ctx") or {}).get("error")
        problems.append(f"{'.'.join(loc) or 'body'}: {err.get('msg')}" + (f" ({detail})" if detail else ""))
    return ORJSONResponse(status_code=400, content={"error": "malformed request: " + "; ".join(problems[:5])})


def serve(model: DriftloopModel | list[DriftloopModel], *, http_port: int, host: str = "127.0.0.1", workers: int = 1,
          max_payload_bytes: int = 8 * 1024 * 1024, enable_grpc: bool = False, threads: int | None = 1,
          enable_model_repository: bool = False, fast_v2: bool = True) -> None:
    """Serve a loaded model with kserve's ModelServer until stopped (blocks).

    ``fast_v2`` answers plain JSON V2 requests through :class:`FastInferV2` (same bytes, no pydantic
    round trips); off, every V2 request takes kserve's own route.

    ``threads`` caps the OpenMP/BLAS threads of each predict call: requests of a few rows gain
    nothing from a thread team, and on a busy host its spin-waits cost more than the prediction
    (HistGradientBoosting, one row, 2 busy cores: ~18x slower with 2 threads). Scale with
    ``workers`` instead; ``None`` leaves the libraries' defaults.
    """
    from threadpoolctl import threadpool_limits

    if threads is not None:
        for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ[var] = str(threads)  # for worker processes, which load the libraries afresh
        threadpool_limits(limits=threads)  # for the libraries this process has loaded already

    server = LocalModelServer(host=host, max_payload_bytes=max_payload_bytes, http_port=http_port, workers=workers,
                              enable_grpc=enable_grpc, enable_latency_logging=False,
                              enable_model_repository=enable_model_repository, fast_v2=fast_v2)
    _quiet_per_request_logging()
    _use_uvloop()
    models = model if isinstance(model, list) else [model]  # several in one process: serving.model_pack
    log.info("serving %s on http://%s:%d", ", ".join(repr(m.name) for m in models), host, http_port)
    server.start(models)


def _use_uvloop() -> None:
    """Run kserve's server on uvloop. ``ModelServer.start`` calls ``asyncio.run`` with the default
    loop; its ``event_loop`` option only reaches uvicorn when uvicorn makes the loop itself, which
    it does not here. uvloop's transports cost less per request than asyncio's selector loop."""
    try:
        import uvloop
    except ImportError:  # uvicorn[standard] brings it; without it, asyncio's loop serves
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    asyncio.set_event_loop(asyncio.new_event_loop())  # kserve's setup_event_loop() asks for the current one


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m serving.predictor", description="Serve one MLflow model with KServe.")
    p.add_argument("--model-name", required=True, help="name the model answers to (/v1/models/<name>)")
    p.add_argument("--model-uri", required=True, help="models:/name@alias, models:/name/<version>, runs:/… or a path")
    p.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: MLFLOW_TRACKING_URI)")
    p.add_argument("--model-location", default=None,
                   help="where --model-uri's files are, resolved by the caller (then the registry is not asked)")
    p.add_argument("--model-version", default=None, help="the version --model-location holds")
    p.add_argument("--http-port", type=int, default=8080)
    p.add_argument("--host", default="127.0.0.1", help="interface to listen on (0.0.0.0 in a cluster pod)")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--max-payload-bytes", type=int, default=None,
                   help="largest request body (default: serving.max_payload_bytes)")
    p.add_argument("--enable-grpc", action="store_true", help="also start kserve's gRPC server")
    p.add_argument("--enable-model-repository", action="store_true",
                   help="mount kserve's repository extension (POST /v2/repository/models/<name>/load|unload, "
                        "without a token); off by default")
    p.add_argument("--kserve-v2-route", action="store_true",
                   help="answer every V2 request through kserve's own route (pydantic models), not the faster "
                        "path that gives the same bytes; for comparisons")
    p.add_argument("--threads", type=int, default=1,
                   help="OpenMP/BLAS threads per prediction (0 = the libraries' default)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    limit = args.max_payload_bytes
    if limit is None:
        from driftloop.core.config import load_settings
        from driftloop.core.errors import ConfigError

        try:
            limit = load_settings().serving.max_payload_bytes
        except ConfigError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    if bool(args.model_location) != bool(args.model_version):
        print("error: --model-location and --model-version go together", file=sys.stderr)
        return 2
    model = DriftloopModel(args.model_name, args.model_uri, tracking_uri=args.tracking_uri,
                           location=args.model_location, version=args.model_version)
    try:
        model.load()
    except ServingError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    serve(model, http_port=args.http_port, host=args.host, workers=args.workers, max_payload_bytes=limit,
          enable_grpc=args.enable_grpc, threads=args.threads or None,
          enable_model_repository=args.enable_model_repository, fast_v2=not args.kserve_v2_route)
    return 0


if __name__ == "__main__":
    sys.exit(main())
