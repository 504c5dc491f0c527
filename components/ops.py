"""The thin KFP wrappers of the steps.

Each wrapper turns KFP artifacts into paths and metadata and calls the step's plain
function (imported inside the body, as KFP lightweight components require). The
step modules themselves never import KFP: inside a running step ``kfp.dsl`` is the
runtime build, which has no decorators.
"""

from typing import NamedTuple

from kfp import dsl
from kfp.dsl import Artifact, ClassificationMetrics, Dataset, Input, Metrics, Model, Output

from driftloop.core.config import DEFAULT_IMAGE

__all__ = ["ingest_op", "validate_op", "train_op", "evaluate_op", "register_op", "reject_op", "deploy_op"]


@dsl.component(base_image=DEFAULT_IMAGE, install_kfp_package=False)
def ingest_op(
    source: str,
    fmt: str,
    target: str,
    time_column: str,
    window_start: str,
    window_end: str,
    test_size: float,
    reference_size: int,
    seed: int,
    train: Output[Dataset],
    test: Output[Dataset],
    reference: Output[Dataset],
) -> NamedTuple("IngestOutputs", [("rows", int), ("window", str)]):
    """Read the source, cut the window, write train/test/reference Dataset artifacts."""
    from collections import namedtuple

    from components._runtime import step
    from components.ingest import ingest, read_table

    with step("ingest"):
        result = ingest(
            read_table(source, fmt),
            target=target,
            time_column=time_column or None,
            window_start=window_start or None,
            window_end=window_end or None,
            test_size=test_size,
            reference_size=reference_size,
            seed=seed,
        )
        for art, frame in ((train, result.train), (test, result.test), (reference, result.reference)):
            frame.to_parquet(art.path, index=False)
            art.metadata.update({"rows": len(frame), "columns": list(map(str, frame.columns)), "window": result.window})
        rows = len(result.train) + len(result.test)
    return namedtuple("IngestOutputs", ["rows", "window"])(rows, result.window)


@dsl.component(base_image=DEFAULT_IMAGE, install_kfp_package=False)
def validate_op(
    train: Input[Dataset],
    test: Input[Dataset],
    target: str,
    task: str,
    time_column: str,
    max_missing: float,
    max_unseen_share: float,
    column_rules: dict,
    schema: Output[Artifact],
):
    """Check schema and quality rules; write the training schema as JSON."""
    import json as _json

    import pandas as _pd

    from components._runtime import step
    from components.validate import validate_frames

    with step("validate"):
        result = validate_frames(
            _pd.read_parquet(train.path),
            _pd.read_parquet(test.path),
            target=target,
            task=task,
            time_column=time_column or None,
            max_missing=max_missing,
            max_unseen_share=max_unseen_share,
            columns=column_rules,
        )
        with open(schema.path, "w") as fh:
            _json.dump(result, fh, indent=2, default=str)
        schema.metadata.update({"numeric": result["numeric"], "categorical": result["categorical"]})


@dsl.component(base_image=DEFAULT_IMAGE, install_kfp_package=False)
def train_op(
    train: Input[Dataset],
    schema: Input[Artifact],
    target: str,
    task: str,
    learner: str,
    params: dict,
    device: str,
    model: Output[Model],
) -> NamedTuple("TrainOutputs", [("device", str), ("seconds", float)]):
    """Fit the model pipeline; write it (joblib) to the Model artifact with the device it used."""
    import json
    from collections import namedtuple

    import joblib
    import pandas as pd

    from components._runtime import step
    from components.train import train_model

    with step("train"):
        with open(schema.path) as fh:
            sch = json.load(fh)
        result = train_model(
            pd.read_parquet(train.path),
            target=target, task=task, numeric=sch["numeric"], categorical=sch["categorical"],
            learner=learner, params=params, device=device,
        )
        joblib.dump(result.model, model.path)
        model.metadata.update({"framework": "sklearn", "learner": learner, "device": result.device, "features": result.features})
    return namedtuple("TrainOutputs", ["device", "seconds"])(result.device, result.seconds)


@dsl.component(base_image=DEFAULT_IMAGE, install_kfp_package=False)
def evaluate_op(
    model: Input[Model],
    test: Input[Dataset],
    schema: Input[Artifact],
    target: str,
    task: str,
    metric: str,
    min_value: str,
    margin: float,
    tracking_uri: str,
    model_name: str,
    metrics: Output[Metrics],
    classification_metrics: Output[ClassificationMetrics],
    decision: Output[Artifact],
) -> NamedTuple("Gate", [("passed", bool), ("reason", str), ("value", float), ("champion_version", str)]):
    """Score new model and champion on the same holdout; emit KFP metrics and the gate decision."""
    import dataclasses
    import json
    from collections import namedtuple

    import joblib
    import pandas as pd

    from components._runtime import step
    from components.evaluate import curves, evaluate_models
    from driftloop.core.registry import CHAMPION, Registry

    with step("evaluate"):
        with open(schema.path) as fh:
            sch = json.load(fh)
        new_model = joblib.load(model.path)
        frame = pd.read_parquet(test.path)
        registry = Registry(tracking_uri)
        champ_info = registry.version_by_alias(model_name, CHAMPION)
        champion = registry.load_sklearn(champ_info.uri) if champ_info else None
        result = evaluate_models(
            new_model, champion, frame, target=target, task=task, numeric=sch["numeric"], categorical=sch["categorical"],
            metric=metric, min_value=float(min_value) if min_value.strip() else None, margin=margin,
            champion_version=champ_info.version if champ_info else None,
        )
        for key, value in result.new_metrics.items():
            metrics.log_metric(key, value)
        for key, value in result.champion_metrics.items():
            metrics.log_metric(f"champion_{key}", value)
        metrics.log_metric("gate_passed", 1.0 if result.passed else 0.0)
        if task == "classification":
            c = curves(new_model, frame, target=target, numeric=sch["numeric"], categorical=sch["categorical"])
            classification_metrics.log_confusion_matrix(c["labels"], c["confusion"])
            if "roc" in c:
                classification_metrics.log_roc_curve(c["roc"]["fpr"], c["roc"]["tpr"], c["roc"]["thresholds"])
        with open(decision.path, "w") as fh:
            json.dump(dataclasses.asdict(result), fh, indent=2)
        decision.metadata.update({"passed": result.passed, "reason": result.reason})
        print(f"gate: {'PASS' if result.passed else 'REJECT'}: {result.reason}", flush=True)
    return namedtuple("Gate", ["passed", "reason", "value", "champion_version"])(
        result.passed, result.reason, float(result.new_value), result.champion_version or ""
    )


@dsl.component(base_image=DEFAULT_IMAGE, install_kfp_package=False)
def register_op(
    model: Input[Model],
    train: Input[Dataset],
    test: Input[Dataset],
    reference: Input[Dataset],
    schema: Input[Artifact],
    decision: Input[Artifact],
    tracking_uri: str,
    experiment: str,
    model_name: str,
    trigger: str,
    request_id: str,
    source: str,
    learner: str,
    task: str,
    params: dict,
    pipeline_run_id: str = dsl.PIPELINE_JOB_ID_PLACEHOLDER,
) -> NamedTuple("Registered", [("version", str), ("aliases", str), ("mlflow_run_id", str)]):
    """Register the gated model in MLflow with alias ``challenger`` (and ``champion`` if first)."""
    import json
    from collections import namedtuple

    import joblib
    import pandas as pd

    from components._runtime import step
    from components.register import _ctx, register_model
    from driftloop.core.registry import Registry

    with step("register"):
        with open(schema.path) as fh:
            sch = json.load(fh)
        with open(decision.path) as fh:
            dec = json.load(fh)
        ctx = _ctx(dict(train.metadata), trigger, pipeline_run_id, request_id, source, learner, task,
                   str(model.metadata.get("device", "cpu")), params)
        version, aliases, run_id = register_model(
            joblib.load(model.path), registry=Registry(tracking_uri, experiment=experiment), model_name=model_name,
            train=pd.read_parquet(train.path), test=pd.read_parquet(test.path), reference=pd.read_parquet(reference.path),
            schema=sch, decision=dec, ctx=ctx,
        )
        print(f"registered {model_name} version {version} aliases {','.join(aliases)}", flush=True)
    return namedtuple("Registered", ["version", "aliases", "mlflow_run_id"])(version, ",".join(aliases), run_id)


@dsl.component(base_image=DEFAULT_IMAGE, install_kfp_package=False)
def reject_op(
    model: Input[Model],
    train: Input[Dataset],
    test: Input[Dataset],
    schema: Input[Artifact],
    decision: Input[Artifact],
    tracking_uri: str,
    experiment: str,
    trigger: str,
    request_id: str,
    source: str,
    learner: str,
    task: str,
    params: dict,
    pipeline_run_id: str = dsl.PIPELINE_JOB_ID_PLACEHOLDER,
) -> str:
    """Track a rejected run in MLflow (metrics + reason); nothing is registered."""
    import json

    import pandas as pd

    from components._runtime import step
    from components.register import _ctx, record_rejection
    from driftloop.core.registry import Registry

    with step("reject"):
        with open(schema.path) as fh:
            sch = json.load(fh)
        with open(decision.path) as fh:
            dec = json.load(fh)
        ctx = _ctx(dict(train.metadata), trigger, pipeline_run_id, request_id, source, learner, task,
                   str(model.metadata.get("device", "cpu")), params)
        run_id = record_rejection(registry=Registry(tracking_uri, experiment=experiment), train=pd.read_parquet(train.path),
                                  test=pd.read_parquet(test.path), schema=sch, decision=dec, ctx=ctx)
        print(f"gate rejected the model; run {run_id} records why", flush=True)
    return run_id


@dsl.component(base_image=DEFAULT_IMAGE, install_kfp_package=False)
def deploy_op(version: str, serving_home: str, settings_json: str) -> NamedTuple(
        "Deployed", [("action", str), ("message", str), ("percent", int)]):
    """Put the registered version out as a canary at the first rollout weight; hand over to the rollout."""
    from collections import namedtuple

    from components._runtime import step
    from components.deploy import deploy_canary
    from driftloop.core.config import Settings

    with step("deploy"):
        settings = Settings.model_validate_json(settings_json)
        result = deploy_canary(settings, version=version, home=serving_home)
        print(f"deploy: {result.action}: {result.message}", flush=True)
    return namedtuple("Deployed", ["action", "message", "percent"])(result.action, result.message, result.percent)
