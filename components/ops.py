"""The thin KFP wrappers of the steps.

Each wrapper turns KFP artifacts into paths and metadata and calls the step's plain
function (imported inside the body, as KFP lightweight components require). The
step modules themselves never import KFP: inside a running step ``kfp.dsl`` is the
runtime build, which has no decorators.
"""

from typing import List, NamedTuple

from kfp import dsl
from kfp.dsl import HTML, Artifact, ClassificationMetrics, Dataset, Input, Markdown, Metrics, Model, Output

from driftloop.core.config import DEFAULT_IMAGE

__all__ = ["ingest_op", "validate_op", "train_op", "train_distributed_op", "evaluate_op", "register_op", "reject_op", "deploy_op",
           "score_plan_op", "score_chunk_op", "score_write_op", "score_drift_op"]


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
            # row groups of 64k rows: a distributed train step's workers each read only their shard's groups
            frame.to_parquet(art.path, index=False, row_group_size=65_536)
            art.metadata.update({"rows": len(frame), "columns": list(map(str, frame.columns)), "window": result.window,
                                 "window_start": window_start, "window_end": window_end})  # as asked (half-open)
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
    max_missing_increase: float,
    max_unseen_share: float,
    column_rules: dict,
    schema: Output[Artifact],
    data_summary: Output[Markdown],
):
    """Check schema and quality rules; write the training schema as JSON and a data summary for the UI."""
    import json as _json

    import pandas as _pd

    from components._runtime import step
    from components.validate import data_summary_markdown, validate_frames

    with step("validate"):
        train_frame, test_frame = _pd.read_parquet(train.path), _pd.read_parquet(test.path)
        result = validate_frames(
            train_frame,
            test_frame,
            target=target,
            task=task,
            time_column=time_column or None,
            max_missing=max_missing,
            max_missing_increase=max_missing_increase,
            max_unseen_share=max_unseen_share,
            columns=column_rules,
        )
        with open(schema.path, "w") as fh:
            _json.dump(result, fh, indent=2, default=str)
        schema.metadata.update({"numeric": result["numeric"], "categorical": result["categorical"]})
        with open(data_summary.path, "w") as fh:
            fh.write(data_summary_markdown(train_frame, test_frame, result))


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
def train_distributed_op(
    train: Input[Dataset],
    schema: Input[Artifact],
    target: str,
    task: str,
    learner: str,
    params: dict,
    device: str,
    distributed: dict,
    model: Output[Model],
) -> NamedTuple("TrainOutputs", [("device", str), ("seconds", float)]):
    """Launch distributed training (a Kubeflow Trainer TrainJob on a cluster, local worker processes
    otherwise) and write rank 0's model to the Model artifact with the training record."""
    from collections import namedtuple

    import joblib

    from components._runtime import step
    from components.distributed import train_distributed

    with step("train"):
        result = train_distributed(
            train_uri=train.uri, train_path=train.path, schema_uri=schema.uri, schema_path=schema.path,
            model_path=model.path, model_uri=model.uri, target=target, task=task, learner=learner, params=params,
            device=device, distributed=distributed,
        )
        joblib.dump(result.model, model.path)
        model.metadata.update({"framework": "sklearn", "learner": learner, "device": result.device,
                               "features": list(result.model.feature_names_in_), "distributed": result.record})
    return namedtuple("TrainOutputs", ["device", "seconds"])(result.device, float(result.record["seconds"]))


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
    gate_report: Output[Markdown],
) -> NamedTuple("Gate", [("passed", bool), ("reason", str), ("value", float), ("champion_version", str)]):
    """Score new model and champion on the same holdout; emit KFP metrics and the gate decision."""
    import dataclasses
    import json
    from collections import namedtuple

    import joblib
    import pandas as pd

    from components._runtime import step
    from components.evaluate import curves, decision_markdown, evaluate_models, predict
    from driftloop.core.registry import CHAMPION, Registry

    with step("evaluate"):
        with open(schema.path) as fh:
            sch = json.load(fh)
        new_model = joblib.load(model.path)
        frame = pd.read_parquet(test.path)
        registry = Registry(tracking_uri)
        champ_info = registry.version_by_alias(model_name, CHAMPION)
        champion = registry.load_sklearn(champ_info.uri) if champ_info else None
        answers = predict(new_model, frame, target=target, task=task, numeric=sch["numeric"],
                          categorical=sch["categorical"])  # once, for the gate's metrics and the curves
        result = evaluate_models(
            new_model, champion, frame, target=target, task=task, numeric=sch["numeric"], categorical=sch["categorical"],
            metric=metric, min_value=float(min_value) if min_value.strip() else None, margin=margin,
            champion_version=champ_info.version if champ_info else None, new_predictions=answers,
        )
        for key, value in result.new_metrics.items():
            metrics.log_metric(key, value)
        for key, value in result.champion_metrics.items():
            metrics.log_metric(f"champion_{key}", value)
        metrics.log_metric("gate_passed", 1.0 if result.passed else 0.0)
        if task == "classification":
            c = curves(new_model, frame, target=target, numeric=sch["numeric"], categorical=sch["categorical"],
                       predictions=answers)
            classification_metrics.log_confusion_matrix(c["labels"], c["confusion"])
            if "roc" in c:
                classification_metrics.log_roc_curve(c["roc"]["fpr"], c["roc"]["tpr"], c["roc"]["thresholds"])
        with open(decision.path, "w") as fh:
            json.dump(dataclasses.asdict(result), fh, indent=2)
        decision.metadata.update({"passed": result.passed, "reason": result.reason})
        with open(gate_report.path, "w") as fh:
            fh.write(decision_markdown(result, margin=margin, min_value=float(min_value) if min_value.strip() else None))
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
        if model.metadata.get("distributed"):
            from components.distributed import record_on_run

            record_on_run(tracking_uri, run_id, dict(model.metadata["distributed"]))
        print(f"registered {model_name} version {version} aliases {','.join(aliases)}" if aliases else
              f"nothing registered: {model_name} v{version} (the champion) was trained on the same data and "
              "parameters", flush=True)
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
        if model.metadata.get("distributed"):
            from components.distributed import record_on_run

            record_on_run(tracking_uri, run_id, dict(model.metadata["distributed"]))
        print(f"gate rejected the model; run {run_id} records why", flush=True)
    return run_id


@dsl.component(base_image=DEFAULT_IMAGE, install_kfp_package=False)
def deploy_op(version: str, serving_home: str, deploy_config: str) -> NamedTuple(
        "Deployed", [("action", str), ("message", str), ("percent", int)]):
    """Put the registered version out as a canary at the first rollout weight; hand over to the rollout.

    ``deploy_config`` is a :class:`components.deploy.DeployConfig` document: the part of the
    configuration the step reads (workspace, MLflow, serving, rollout), not the whole of it.
    """
    from collections import namedtuple

    from components._runtime import step
    from components.deploy import DeployConfig, deploy_canary

    with step("deploy"):
        settings = DeployConfig.model_validate_json(deploy_config).settings()
        result = deploy_canary(settings, version=version, home=serving_home)
        print(f"deploy: {result.action}: {result.message}", flush=True)
    return namedtuple("Deployed", ["action", "message", "percent"])(result.action, result.message, result.percent)


# -- batch scoring (pipelines/scoring.py) ----------------------------------------------------------
@dsl.component(base_image=DEFAULT_IMAGE, install_kfp_package=False)
def score_plan_op(model_ref: str, input_uri: str, output_uri: str, fmt: str, id_column: str, chunks: int,
                  overwrite: bool, tracking_uri: str, plan: Output[Artifact], keep_columns: str = "",
                  id_required: bool = False) -> list:
    """Check the model, the input's columns and the output; return the chunks (each says what to score with:
    the model, the features, the id column or row numbers, the input columns kept).

    The chunk list is the component's only parameter output: kfp.local (2.17) fans a ParallelFor out
    over a task's ``Output`` only, not over a named output of a NamedTuple.
    """
    import dataclasses
    import json

    from components._runtime import step
    from components.score import plan_scoring
    from driftloop.core.registry import Registry

    with step("plan"):
        result = plan_scoring(Registry(tracking_uri), model_ref=model_ref, input_uri=input_uri, output_uri=output_uri,
                              fmt=fmt, id_column=id_column, chunks=chunks, overwrite=overwrite,
                              keep_columns=[c.strip() for c in keep_columns.split(",") if c.strip()],
                              id_required=id_required)
        info = {k: v for k, v in dataclasses.asdict(result).items() if k != "chunks"}
        with open(plan.path, "w") as fh:
            json.dump(info, fh)
        plan.metadata.update({"model": result.model_name, "version": result.version, "chunks": len(result.chunks),
                              "rows": result.rows or -1})
        print(f"scoring {input_uri} with {result.model_name} v{result.version} in {len(result.chunks)} chunk(s)",
              flush=True)
    return [dict(c, **{k: info[k] for k in ("model_uri", "version", "fmt", "numeric", "categorical", "id_column",
                                            "keep")})
            for c in result.chunks]


@dsl.component(base_image=DEFAULT_IMAGE, install_kfp_package=False)
def score_chunk_op(chunk: dict, input_uri: str, id_column: str, batch_rows: int, sample_rows: int, tracking_uri: str,
                   part: Output[Dataset], sample: Output[Dataset]) -> int:
    """Score one chunk of the input into a parquet part; keep a sample of its features for the drift check."""
    from components._runtime import step
    from components.score import score_chunk
    from driftloop.core.registry import Registry

    with step("score"):
        model = Registry(tracking_uri).load_sklearn(chunk["model_uri"])
        rows = score_chunk(model, uri=input_uri, fmt=chunk["fmt"], chunk=chunk, numeric=list(chunk["numeric"]),
                           categorical=list(chunk["categorical"]), id_column=chunk.get("id_column", id_column),
                           version=chunk["version"], part_path=part.path, sample_path=sample.path,
                           sample_rows=sample_rows, batch_rows=batch_rows, keep=list(chunk.get("keep", [])))
        part.metadata.update({"rows": rows, "chunk": int(chunk["index"]), "model_version": chunk["version"]})
        print(f"chunk {int(chunk['index'])}: {rows} rows scored", flush=True)
    return rows


@dsl.component(base_image=DEFAULT_IMAGE, install_kfp_package=False)
def score_write_op(parts: Input[List[Dataset]], output_uri: str, overwrite: bool) -> int:
    """Write the parts, in chunk order, to the output (a temporary name, renamed when complete)."""
    from components._runtime import step
    from components.score import write_predictions

    with step("write"):
        rows = write_predictions([p.path for p in parts], output_uri, overwrite=overwrite)
        print(f"wrote {rows} predictions -> {output_uri}", flush=True)
    return rows


@dsl.component(base_image=DEFAULT_IMAGE, install_kfp_package=False)
def score_drift_op(samples: Input[List[Dataset]], plan: Input[Artifact], drift_share: float, sample_rows: int, rows: int, input_uri: str, output_uri: str, request_id: str,
                   started: str, trigger: str, tracking_uri: str, experiment: str, alert_url: str,
                   report: Output[HTML], metrics: Output[Metrics],
                   pipeline_run_id: str = dsl.PIPELINE_JOB_ID_PLACEHOLDER, history: str = "") -> NamedTuple(
        "BatchDrift", [("drifted", bool), ("share", float), ("alert", str)]):
    """Evidently's drift report of the batch against the model's reference, in MLflow; a drifted batch alerts."""
    import json
    import os
    import shutil
    import tempfile
    from collections import namedtuple
    from pathlib import Path

    import pandas as pd

    from components._runtime import step
    from components.score import alert_payload, batch_drift, deliver_alert, log_batch_run
    from driftloop.core.registry import Registry

    with step("drift"):
        # A scheduled run on Kubeflow passes no request id or start time: its KFP run id and clock name it.
        request_id = request_id or pipeline_run_id
        if not started:
            import datetime as _dt

            started = _dt.datetime.now(_dt.UTC).isoformat()
        with open(plan.path) as fh:
            info = json.load(fh)
        model_name, version = info["model_name"], info["version"]
        numeric, categorical = info["numeric"], info["categorical"]
        frames = [pd.read_parquet(s.path) for s in samples]
        batch = pd.concat([f for f in frames if len(f)], ignore_index=True)
        if len(batch) > sample_rows:
            batch = batch.sample(n=sample_rows, random_state=0)
        registry = Registry(tracking_uri, experiment=experiment)
        reference = registry.reference_sample(f"{model_name}/{version}")
        snapshot, verdict = batch_drift(reference, batch, list(numeric), list(categorical), drift_share=drift_share)
        with tempfile.TemporaryDirectory() as tmp:
            html, js = Path(tmp) / "batch_drift.html", Path(tmp) / "batch_drift.json"
            snapshot.save_html(str(html))
            snapshot.save_json(str(js))
            shutil.copyfile(html, report.path)
            run_id, uri = log_batch_run(registry, [html, js], verdict=verdict, model=model_name, version=version,
                                        input_uri=input_uri, output_uri=output_uri, rows=rows, request_id=request_id,
                                        trigger=trigger, id_column=info.get("id_column", ""), keep=info.get("keep"))
        metrics.log_metric("drift_share", verdict["share"])
        metrics.log_metric("dataset_drift", 1.0 if verdict["dataset_drift"] else 0.0)
        metrics.log_metric("rows", float(rows))
        outcome = "none"
        if verdict["dataset_drift"]:
            payload = alert_payload(model=model_name, version=version, input_uri=input_uri, request_id=request_id,
                                    started=started, verdict=verdict, rows=rows, report_uri=uri)
            # the predictions stand and the report is in MLflow either way; the run records why no alert went out
            outcome = deliver_alert(registry, run_id, alert_url, payload,
                                    token=os.environ.get("DRIFTLOOP_WEBHOOK_TOKEN"))
            print(f"batch drift ({verdict['share']:.2f} of columns: {', '.join(verdict['drifted_columns'])}); "
                  f"alert {outcome}", flush=True)
        else:
            print(f"no batch drift ({verdict['share']:.2f} of columns)", flush=True)
        if history:  # the batch's check in the model's Evidently project (driftloop history, evidently ui)
            from components.score import batch_record
            from driftloop.core.history import SECRET_ENV, write_record

            record = batch_record(verdict, model=model_name, version=version, input_uri=input_uri,
                                  request_id=request_id, rows=rows, drift_share=drift_share, report_uri=uri,
                                  alert=outcome)
            print(f"history: {write_record(history, record, secret=os.environ.get(SECRET_ENV))}", flush=True)
    return namedtuple("BatchDrift", ["drifted", "share", "alert"])(verdict["dataset_drift"], verdict["share"], outcome)
