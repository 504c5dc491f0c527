"""Register: log the run to MLflow and register the model version with alias ``challenger``.

The first model of a name (no champion yet) also gets ``champion``. When the gate
rejects the model, :func:`record_rejection` logs the run and the reason without
registering anything, so every retraining run is tracked.

Each version carries the **fingerprint** of what it was trained on (:func:`fingerprint`: the
train and test rows, the learner, its parameters and the columns; tag
``driftloop.data_fingerprint``). A run whose fingerprint equals the champion's registers nothing:
it logs the run (tag ``driftloop.registered`` says why) and hands the champion's version on, which
the deploy step does not roll out again. Retraining on the same data with the same parameters
adds no version and no canary.

The data window a run was asked for is logged as the run parameter ``data_window``, half-open
(``[start, end)``, ``-inf`` / ``+inf`` for an open side: ``data.window_end`` is exclusive), beside
the tag ``driftloop.data_window`` that names the first and last row read; :func:`describe_window`
is how the run summary and lineage print the two.
"""

import functools
import hashlib
import json
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd


__all__ = ["FINGERPRINT_TAG", "HOLDOUT_QUALITY_ARTIFACT", "REGISTERED_TAG", "RunContext", "describe_window",
           "fingerprint", "half_open", "trusted_types", "model_requirements", "register_model", "record_rejection"]

log = logging.getLogger(__name__)

#: Version and run tag: what the model was trained on (:func:`fingerprint`).
FINGERPRINT_TAG = "driftloop.data_fingerprint"
#: Run tag of a run that registered nothing although its gate passed, saying why.
REGISTERED_TAG = "driftloop.registered"


def half_open(start: str | None, end: str | None) -> str:
    """A data window as the half-open interval it is: ``[start, end)``; an open side is ``-inf`` / ``+inf``."""
    return f"[{start or '-inf'}, {end or '+inf'})"


def describe_window(requested: str | None, rows: str | None) -> str:
    """How a run's data window is printed: the window asked for (half-open) and the rows it held
    (``first .. last``, both read). Runs logged before the requested window was recorded: the rows."""
    rows = rows or ""
    if not requested or rows in ("", "all rows"):
        return rows or (requested or "")
    return f"{requested}: rows {rows}"


@dataclass(frozen=True)
class RunContext:
    """What links an MLflow run and model version to its origin."""

    trigger: str
    pipeline_run_id: str
    request_id: str
    data_window: str
    data_source: str
    learner: str
    task: str
    device: str
    params: dict[str, Any]
    requested_window: str = ""  # half-open, as asked of the ingest step ("" when the step did not say)


def _run_tags(ctx: RunContext, decision: dict[str, Any]) -> dict[str, str]:
    from driftloop.core.registry import TAG

    tags = {
        TAG.TRIGGER: ctx.trigger,
        TAG.PIPELINE_RUN: ctx.pipeline_run_id,
        TAG.REQUEST: ctx.request_id,
        TAG.WINDOW: ctx.data_window,
        TAG.SOURCE: ctx.data_source,
        TAG.GATE: "passed" if decision.get("passed") else "rejected",
        TAG.GATE_REASON: decision.get("reason", "")[:5000],
        TAG.DEVICE: ctx.device,
    }
    if ctx.trigger.startswith(("drift:", "quality:")):
        tags[TAG.ALERT] = ctx.trigger.split(":", 1)[1]
    if ctx.trigger.startswith("schedule:"):
        tags[TAG.SCHEDULE] = ctx.trigger.split(":", 1)[1]
    return tags


def _log_run_body(mlflow: Any, ctx: RunContext, decision: dict[str, Any], train: pd.DataFrame, test: pd.DataFrame,
                  schema: dict[str, Any], target: str) -> None:
    mlflow.log_params({
        "learner": ctx.learner, "task": ctx.task, "device": ctx.device, "target": target,
        "train_rows": len(train), "test_rows": len(test), "gate_metric": decision.get("metric"),
        **({"data_window": ctx.requested_window} if ctx.requested_window else {}),
        **{f"learner.{k}": v for k, v in (ctx.params or {}).items()},
    })
    mlflow.log_metrics({k: float(v) for k, v in (decision.get("new_metrics") or {}).items()})
    mlflow.log_metrics({f"champion_{k}": float(v) for k, v in (decision.get("champion_metrics") or {}).items()})
    mlflow.log_metric("gate_passed", 1.0 if decision.get("passed") else 0.0)
    mlflow.set_tags(_run_tags(ctx, decision))
    source = ctx.data_source or "unknown"
    train_ds = _with_schema(mlflow.data.from_pandas(train, source=source, name="train", targets=target,
                                                    digest=dataset_digest(train)), train)
    test_ds = _with_schema(mlflow.data.from_pandas(test, source=source, name="test", targets=target,
                                                   digest=dataset_digest(test)), test)
    mlflow.log_input(train_ds, context="training")
    mlflow.log_input(test_ds, context="evaluation")
    mlflow.log_dict(decision, "gate/decision.json")
    mlflow.log_dict(schema, "schema/schema.json")


def dataset_schema(frame: pd.DataFrame) -> Any:
    """The MLflow schema of ``frame``, equal to what ``mlflow.data.from_pandas(frame).schema`` infers.

    Why not MLflow's own: its ``_infer_schema`` decides each column's ``required`` by calling
    ``_is_none_or_nan`` on every value in Python -- ~1.3 s of a training run at 100k x 20 rows (the register
    step's two datasets, profiled with py-spy), the largest cost of that step. Here each column's type is
    MLflow's own ``_infer_pandas_column`` (it looks at the dtype; an object column's values, as MLflow does),
    and its ``required`` is MLflow's own ``_infer_required`` run over the values pandas finds missing only:
    every value ``_is_none_or_nan`` flags (NaN, None, ``pd.NA``, ``pd.NaT``) is one ``isna`` flags, so the
    answer is the same (``tests/test_register_schema.py`` checks equality on real tables and edge cases)."""
    from mlflow.types import ColSpec, Schema
    from mlflow.types.utils import _infer_pandas_column, _infer_required

    return Schema([ColSpec(type=_infer_pandas_column(frame[name]), name=name,
                           required=_infer_required(frame[name][frame[name].isna()]))
                   for name in frame.columns])


def dataset_digest(frame: pd.DataFrame) -> str:
    """The digest ``mlflow.data.from_pandas(frame)`` computes (``mlflow.data.digest_utils.compute_pandas_digest``),
    the same string.

    Why not MLflow's own: to find the string columns it calls ``type`` on every value of the whole frame
    (``df.map(type)``), not of the 10,000 rows it hashes -- ~0.25 s a dataset at 100k x 20. A column of a
    numpy number, bool, date or duration dtype holds no ``str``, so only the other columns go through that
    same test; the rest is MLflow's function line by line (``tests/test_register_schema.py`` compares the two
    on real tables and edge cases). An empty frame, where every column passes that test, is MLflow's; so is
    every frame when the installed MLflow's function is not the one copied here (its source is compared)."""
    from mlflow.data.digest_utils import MAX_ROWS, compute_pandas_digest, get_normalized_md5_digest

    if frame.empty or not frame.columns.is_unique or not _digest_is_the_copied_one():
        return compute_pandas_digest(frame)
    trimmed = frame.head(MAX_ROWS)
    maybe = [c for c in frame.columns
             if not (isinstance(frame[c].dtype, np.dtype) and frame[c].dtype.kind in "iufcbMm")]
    strings = frame[maybe].columns[(frame[maybe].map(type) == str).all(0)] if maybe else frame.columns[:0]
    numeric = trimmed.select_dtypes(include=[np.number]).columns
    trimmed = trimmed[strings.union(numeric)]
    return get_normalized_md5_digest([pd.util.hash_pandas_object(trimmed).values, np.int64(len(frame))]
                                     + [str(x).encode() for x in frame.columns])


# sha256 of the source of mlflow.data.digest_utils.compute_pandas_digest that dataset_digest follows (MLflow 3.17)
_COPIED_DIGEST_SOURCE = "e9108875fd64abb269fe99042d0ca9fa811860350f9b21670d57cdc3617266f7"


@functools.cache
def _digest_is_the_copied_one() -> bool:
    import inspect

    from mlflow.data.digest_utils import compute_pandas_digest

    try:
        source = inspect.getsource(compute_pandas_digest)
    except (OSError, TypeError):
        return False
    same = hashlib.sha256(source.encode()).hexdigest() == _COPIED_DIGEST_SOURCE
    if not same:
        log.debug("MLflow's compute_pandas_digest changed: datasets get MLflow's own digest")
    return same


def _with_schema(dataset: Any, frame: pd.DataFrame) -> Any:
    """``dataset`` (a ``PandasDataset``) with its schema from :func:`dataset_schema` in place of the one its
    ``schema`` cached property would infer; where that fails, MLflow infers it as it would."""
    if frame.columns.is_unique:  # a frame with repeated names: MLflow's own way (column lookups differ)
        try:
            dataset.__dict__["schema"] = dataset_schema(frame)  # functools.cached_property reads it from here
        except Exception:  # noqa: BLE001 - MLflow's property infers it (and logs no schema if it cannot)
            log.debug("dataset schema left to MLflow", exc_info=True)
    return dataset


HOLDOUT_QUALITY_ARTIFACT = "quality/holdout.json"


def _log_holdout_quality(mlflow: Any, model: Any, test: pd.DataFrame, schema: dict[str, Any]) -> None:
    """The version's own baseline for quality monitoring: holdout metrics (plus bias or calibration
    error) as ``holdout_*`` metrics and, with the calibration map, as ``quality/holdout.json``."""
    from components.evaluate import holdout_quality

    quality = holdout_quality(model, test, target=schema["target"], task=schema.get("task", "classification"),
                              numeric=schema["numeric"], categorical=schema["categorical"])
    mlflow.log_metrics({f"holdout_{k}": float(v) for k, v in quality["metrics"].items()})
    mlflow.log_dict(quality, HOLDOUT_QUALITY_ARTIFACT)


def trusted_types(model: Any) -> list[str]:
    """The types MLflow's skops format must trust to load this model.

    MLflow 3 saves sklearn models with skops, which refuses types it does not know
    (e.g. HistGradientBoosting's tree predictors). We built this model in this run, so
    we list exactly its own types rather than switching to pickle.
    """
    from skops.io import dumps, get_untrusted_types

    return get_untrusted_types(data=dumps(model))


def model_requirements(model: Any) -> list[str]:
    """Pinned runtime requirements of the model.

    MLflow would infer these by re-importing the model in a subprocess (~5 s a run);
    the model is always our sklearn Pipeline, so we state them from what is installed.
    """
    from importlib.metadata import version

    packages = ["mlflow", "scikit-learn", "numpy", "pandas", "scipy", "skops", "cloudpickle"]
    if "xgboost" in type(getattr(model, "steps", [[None, model]])[-1][1]).__module__:
        packages.append("xgboost")
    return [f"{name}=={version(name)}" for name in packages]


def fingerprint(train: pd.DataFrame, test: pd.DataFrame, schema: dict[str, Any], ctx: RunContext) -> str:
    """What a model is trained on, as one hash: the train and test rows (values, columns, dtypes), the
    learner, its parameters, the task and the feature columns. Equal fingerprints, equal training."""
    digest = hashlib.sha256()
    for frame in (train, test):
        digest.update(json.dumps([[str(c), str(t)] for c, t in frame.dtypes.items()]).encode())
        digest.update(pd.util.hash_pandas_object(frame, index=False).to_numpy().tobytes())
    digest.update(json.dumps({"learner": ctx.learner, "task": ctx.task, "params": ctx.params or {},
                              "target": schema.get("target"), "numeric": schema.get("numeric"),
                              "categorical": schema.get("categorical")}, sort_keys=True, default=str).encode())
    return digest.hexdigest()


def _unchanged(registry: Any, model_name: str, *, train: pd.DataFrame, test: pd.DataFrame, schema: dict[str, Any],
               decision: dict[str, Any], ctx: RunContext, fp: str) -> tuple[str, list[str], str] | None:
    """When the champion was trained on the same data with the same parameters: log the run, register
    nothing, and return the champion's version (no aliases); else None."""
    import mlflow

    from driftloop.core.registry import CHAMPION

    champion = registry.version_by_alias(model_name, CHAMPION)
    if champion is None or champion.tags.get(FINGERPRINT_TAG) != fp:
        return None
    why = (f"nothing registered: the same data fingerprint and parameters as champion v{champion.version} "
           f"({fp[:12]}); retraining on them gives that model again")
    with registry.translate_errors("cannot log the unchanged run"):
        with mlflow.start_run(experiment_id=registry.experiment_id(), run_name=f"unchanged-{ctx.request_id[:8]}") as run:
            _log_run_body(mlflow, ctx, decision, train, test, schema, schema["target"])
            mlflow.set_tags({FINGERPRINT_TAG: fp, REGISTERED_TAG: why})
    log.info("%s %s", model_name, why)
    return champion.version, [], run.info.run_id


def register_model(
    model: Any,
    *,
    registry: Any,
    model_name: str,
    train: pd.DataFrame,
    test: pd.DataFrame,
    reference: pd.DataFrame,
    schema: dict[str, Any],
    decision: dict[str, Any],
    ctx: RunContext,
) -> tuple[str, list[str], str]:
    """Log run + model + datasets; register a version; set aliases. Returns (version, aliases, run_id).

    Aliases are moved last, so a failure earlier leaves the registry's aliases untouched. A model
    trained like the champion (same :func:`fingerprint`) registers nothing: the champion's version
    comes back with no aliases.
    """
    import mlflow
    from mlflow.models import infer_signature

    from components.train import prepare_features
    from driftloop.core.registry import CHALLENGER, CHAMPION, REFERENCE_ARTIFACT, TAG

    import warnings

    # MLflow warns about integer outputs and ambiguous local dataset sources; neither applies here.
    warnings.filterwarnings("ignore", category=UserWarning, module=r"mlflow\..*")
    fp = fingerprint(train, test, schema, ctx)
    same = _unchanged(registry, model_name, train=train, test=test, schema=schema, decision=decision, ctx=ctx,
                      fp=fp)
    if same is not None:
        return same
    target = schema["target"]
    numeric, categorical = schema["numeric"], schema["categorical"]
    features = prepare_features(train, numeric, categorical)
    example = features.head(5)
    signature = infer_signature(example, model.predict(example))
    exp_id = registry.experiment_id()
    with registry.translate_errors(f"cannot register model {model_name!r}"):
        with mlflow.start_run(experiment_id=exp_id, run_name=f"train-{ctx.request_id[:8]}") as run:
            _log_run_body(mlflow, ctx, decision, train, test, schema, target)
            mlflow.set_tag(FINGERPRINT_TAG, fp)
            _log_holdout_quality(mlflow, model, test, schema)
            with tempfile.TemporaryDirectory() as tmp:
                ref_path = Path(tmp) / "reference.parquet"
                reference.to_parquet(ref_path, index=False)
                mlflow.log_artifact(str(ref_path), artifact_path=str(Path(REFERENCE_ARTIFACT).parent))
            info = mlflow.sklearn.log_model(
                model, name="model", signature=signature, input_example=example, registered_model_name=model_name,
                await_registration_for=60, skops_trusted_types=trusted_types(model),
                pip_requirements=model_requirements(model),
            )
            version = str(info.registered_model_version)
        first = registry.version_by_alias(model_name, CHAMPION) is None
        registry.tag_version(model_name, version, {**_run_tags(ctx, decision), "driftloop.mlflow_run_id": run.info.run_id,
                                                   FINGERPRINT_TAG: fp})
        aliases = [CHALLENGER]
        registry.set_alias(model_name, CHALLENGER, version)
        if first:
            registry.set_alias(model_name, CHAMPION, version)
            registry.tag_version(model_name, version, {TAG.ROLLOUT: "bootstrap", TAG.ROLLOUT_REASON: "first model of this name"})
            aliases.append(CHAMPION)
    log.info("registered %s version %s with aliases %s", model_name, version, aliases)
    return version, aliases, run.info.run_id


def record_rejection(*, registry: Any, train: pd.DataFrame, test: pd.DataFrame, schema: dict[str, Any],
                     decision: dict[str, Any], ctx: RunContext) -> str:
    """Log a rejected run (params, metrics, reason, datasets); register nothing."""
    import mlflow

    exp_id = registry.experiment_id()
    with registry.translate_errors("cannot log the rejected run"):
        with mlflow.start_run(experiment_id=exp_id, run_name=f"rejected-{ctx.request_id[:8]}") as run:
            _log_run_body(mlflow, ctx, decision, train, test, schema, schema["target"])
    return run.info.run_id


def _ctx(train_meta: dict, trigger: str, pipeline_run_id: str, request_id: str, source: str, learner: str, task: str,
         device: str, params: dict) -> RunContext:
    asked = "window_start" in train_meta or "window_end" in train_meta  # the ingest step says what it was asked
    requested = half_open(train_meta.get("window_start") or None, train_meta.get("window_end") or None) if asked else ""
    return RunContext(trigger=trigger or "manual", pipeline_run_id=pipeline_run_id, request_id=request_id or pipeline_run_id,
                      data_window=str(train_meta.get("window", "")), data_source=source, learner=learner, task=task,
                      device=device, params=params, requested_window=requested)
