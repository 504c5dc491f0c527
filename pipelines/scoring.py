"""The batch scoring pipeline: plan → score chunks in parallel (``dsl.ParallelFor``) → write → drift.

Compiled like the training pipeline (``driftloop compile`` writes both; upload either in the
Kubeflow UI), run by ``driftloop run score`` through kfp.local on the embedded default or
``kfp.Client`` on a cluster, and scheduled like training (``driftloop schedule create --pipeline
score``). On a cluster every chunk is a pod; kfp.local runs the iterations as subprocesses.
"""


import datetime as dt
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kfp import compiler, dsl

from components.ops import score_chunk_op, score_drift_op, score_plan_op, score_write_op
from driftloop.core.config import Settings
from driftloop.core.errors import PipelineRunError
from driftloop.core.history import step_history_target
from driftloop.core.runs import Pipeline, RunRequest, RunResult
from pipelines.training import ClusterOptions, _use_mlflow_secret

__all__ = ["SCORE_PIPELINE_NAME", "ScoreRequest", "scoring_pipeline", "make_scoring_pipeline", "score_arguments",
           "ALERT_POD_LABELS", "compile_scoring_pipeline", "run_scoring", "alert_url", "scoring_pipeline_for", "upload_scoring"]

SCORE_PIPELINE_NAME = "driftloop-score"
# kfp component function -> the step name a person reads
STEP_NAMES = {"score_plan_op": "plan", "score_chunk_op": "score chunk", "score_write_op": "write",
              "score_drift_op": "batch drift"}
WEBHOOK_SECRET_KEYS = {"token": "DRIFTLOOP_WEBHOOK_TOKEN"}  # Secret driftloop-webhook, key token
HISTORY_SECRET, HISTORY_SECRET_KEYS = "driftloop-evidently", {"secret": "DRIFTLOOP_EVIDENTLY_SECRET"}
ALERT_POD_LABELS = {"app.kubernetes.io/part-of": "driftloop", "app.kubernetes.io/component": "batch-drift"}


@dataclass(frozen=True)
class ScoreRequest:
    """One scoring run; unset fields come from the ``score`` section of the configuration."""

    input: str | None = None
    output: str | None = None
    model: str | None = None
    chunks: int | None = None
    overwrite: bool | None = None
    trigger: str = "manual"
    # input columns copied beside each prediction ("*": all of them)
    keep_columns: tuple[str, ...] = ()
    # the id column, named by the user: then the input must have it (else ``score.id_column`` if the input has
    # it, or row numbers)
    id_column: str | None = None
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    started: str = field(default_factory=lambda: dt.datetime.now(dt.UTC).isoformat())


def make_scoring_pipeline(opts: ClusterOptions = ClusterOptions(), webhook_secret: str | None = None):
    @dsl.pipeline(name=SCORE_PIPELINE_NAME,
                  description="Score stored records in parallel chunks with a registered model; drift of the batch "
                              "against the model's reference (Evidently report in MLflow, alert when it drifts).")
    def scoring_pipeline(
        input_uri: str,
        output_uri: str,
        model_ref: str,
        fmt: str = "auto",
        id_column: str = "id",
        chunks: int = 1,
        overwrite: bool = False,
        batch_rows: int = 50_000,
        sample_rows: int = 50_000,
        drift_share: float = 0.5,
        tracking_uri: str = "",
        experiment: str = "driftloop",
        alert_url: str = "",
        trigger: str = "manual",
        request_id: str = "",
        started: str = "",
        keep_columns: str = "",
        id_required: bool = False,
        history: str = "",
    ):
        plan = score_plan_op(model_ref=model_ref, input_uri=input_uri, output_uri=output_uri, fmt=fmt,
                             id_column=id_column, chunks=chunks, overwrite=overwrite, tracking_uri=tracking_uri,
                             keep_columns=keep_columns, id_required=id_required)
        _use_mlflow_secret(plan.set_display_name("plan: model, input, output, chunks"), opts)
        with dsl.ParallelFor(plan.outputs["Output"], name="chunks") as chunk:
            score = score_chunk_op(chunk=chunk, input_uri=input_uri, id_column=id_column, batch_rows=batch_rows,
                                   sample_rows=sample_rows, tracking_uri=tracking_uri)
            _use_mlflow_secret(score.set_display_name("score chunk"), opts)
            score.set_cpu_limit(opts.cpu_limit).set_memory_limit(opts.memory_limit)
        write = score_write_op(parts=dsl.Collected(score.outputs["part"]), output_uri=output_uri, overwrite=overwrite)
        write.set_display_name("write predictions")
        drift = score_drift_op(
            samples=dsl.Collected(score.outputs["sample"]), plan=plan.outputs["plan"], drift_share=drift_share,
            sample_rows=sample_rows, rows=write.output, input_uri=input_uri, output_uri=output_uri,
            request_id=request_id, started=started, trigger=trigger, tracking_uri=tracking_uri, experiment=experiment,
            alert_url=alert_url, pipeline_run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER, history=history,
        )
        _use_mlflow_secret(drift.set_display_name("batch drift vs reference"), opts)
        if webhook_secret:
            from kfp import kubernetes

            kubernetes.use_secret_as_env(drift, secret_name=webhook_secret, secret_key_to_env=WEBHOOK_SECRET_KEYS,
                                         optional=True)
            # writes the batch's check to the Evidently UI service (infra/base/evidently-ui.yaml)
            kubernetes.use_secret_as_env(drift, secret_name=HISTORY_SECRET, secret_key_to_env=HISTORY_SECRET_KEYS,
                                         optional=True)
            # the monitor's NetworkPolicy admits this step's pod (it posts the batch's drift alert) by these labels
            for key, value in ALERT_POD_LABELS.items():
                kubernetes.add_pod_label(drift, key, value)
        for task in (plan, score, write, drift):
            task.set_caching_options(False)  # the input and the model's alias move between runs

    return scoring_pipeline


scoring_pipeline = make_scoring_pipeline()


def alert_url(settings: Settings) -> str:
    """Where a drifted batch's alert goes: ``score.alert_url``, else the monitor's webhook."""
    if settings.score.alert_url:
        return settings.score.alert_url
    if settings.is_cluster:
        base = settings.serving.logger_url.rsplit("/", 1)[0]  # the monitor's in-cluster Service
        return f"{base}/alerts/alertmanager"
    m = settings.monitor
    return f"http://{m.host}:{m.port}{m.base_path}/alerts/alertmanager"


def score_arguments(settings: Settings, request: ScoreRequest | None = None) -> dict[str, Any]:
    """The scoring pipeline's parameters: the ``score`` section, with this request's values on top."""
    from components.score import default_chunks

    request = request or ScoreRequest()
    s = settings.score
    chunks = request.chunks if request.chunks is not None else s.chunks
    # a column the user named must be there; the default one is used when the input has it (else row numbers)
    id_required = request.id_column is not None or "id_column" in s.model_fields_set
    return {
        "input_uri": request.input if request.input is not None else s.input,
        "output_uri": request.output if request.output is not None else s.output,
        "model_ref": request.model or s.model or f"{settings.mlflow.model_name}@champion",
        "fmt": s.format,
        "id_column": request.id_column or s.id_column,
        "id_required": id_required,
        "keep_columns": ",".join(request.keep_columns),
        "chunks": chunks or default_chunks(),
        "overwrite": request.overwrite if request.overwrite is not None else s.overwrite,
        "batch_rows": s.batch_rows,
        "sample_rows": s.drift_sample_rows,
        "drift_share": s.drift_share,
        "tracking_uri": settings.tracking_uri,
        "experiment": settings.mlflow.experiment,
        "alert_url": alert_url(settings),
        "trigger": request.trigger,
        "request_id": request.request_id,
        "started": request.started,
        "history": step_history_target(settings),  # the batch's check in the model's Evidently project
    }


def build_scoring_pipeline(settings: Settings):
    return make_scoring_pipeline(ClusterOptions.from_settings(settings), webhook_secret="driftloop-webhook")


def compile_scoring_pipeline(settings: Settings, package_path: str | Path) -> Path:
    """Compile the scoring pipeline to KFP YAML with the config's values as parameter defaults."""
    args = score_arguments(settings, ScoreRequest(request_id="", started=""))
    path = Path(package_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    compiler.Compiler().compile(build_scoring_pipeline(settings), str(path), pipeline_parameters=args)
    return path


def _check(args: dict[str, Any]) -> None:
    from pipelines.runner import check_trigger

    check_trigger(args["trigger"])
    if not args["input_uri"]:
        raise PipelineRunError("no input to score: pass --input or set score.input")
    if not args["output_uri"]:
        raise PipelineRunError("no output for the predictions: pass --output or set score.output")


def scoring_pipeline_for(settings: Settings, args: dict[str, Any] | None = None) -> Pipeline:
    """The scoring pipeline as a runner runs it; with ``args``, a local run checks its plan first."""

    def prepare() -> None:
        if args is None:
            return
        from components.score import plan_scoring
        from driftloop.core.registry import Registry

        # The plan's checks, here first: bad input is one line before any task starts.
        plan_scoring(Registry.from_settings(settings), model_ref=args["model_ref"], input_uri=args["input_uri"],
                     output_uri=args["output_uri"], fmt=args["fmt"], id_column=args["id_column"],
                     chunks=args["chunks"], overwrite=args["overwrite"],
                     keep_columns=[c for c in args["keep_columns"].split(",") if c], id_required=args["id_required"])

    return Pipeline(name=SCORE_PIPELINE_NAME, description="driftloop batch scoring pipeline",
                    build=lambda: build_scoring_pipeline(settings),
                    compile=lambda directory: compile_scoring_pipeline(settings, directory / f"{SCORE_PIPELINE_NAME}.yaml"),
                    summarize=lambda request_id: summarize_scoring(settings, request_id), prepare=prepare,
                    log_prefix="score-", step_names=STEP_NAMES)


def run_scoring(settings: Settings, request: ScoreRequest, *, wait: bool = True, client: Any | None = None,
                **options: Any) -> RunResult:
    """Run the scoring pipeline: kfp.local on the embedded default, Kubeflow when ``kfp.host`` is set.

    ``options`` go to the runner's ``run`` (``progress``: each task's start and end; ``echo``, locally: a
    copy of the task output); the result's ``run_id`` names the run everywhere (its log file, its MLflow run).
    """
    from pipelines.runner import LocalRunner, runner_for

    args = score_arguments(settings, request)
    _check(args)
    runner = runner_for(settings, client=client)
    pipeline = scoring_pipeline_for(settings, args)
    run_request = RunRequest(trigger=request.trigger, request_id=request.request_id)
    if not isinstance(runner, LocalRunner):
        options.pop("echo", None)
        return runner.run(pipeline, args, run_request, wait=wait, **(options if wait else {}))
    # one run at a time per workspace; a scheduled scoring run waits its turn (the CLI decides before)
    result = runner.run(pipeline, args, run_request, wait=True, **options)
    if result.state == "SUCCEEDED":
        result.summary = result.summary | {"log": str(runner.log_path(run_request, pipeline))}
    return result


def summarize_scoring(settings: Settings, request_id: str) -> dict[str, Any]:
    """What the run recorded in MLflow: model version, rows, drift verdict and report, how the predictions are
    identified, the columns kept, whether a drift alert went out."""
    from components.score import ALERT_TAG
    from driftloop.core.registry import Registry

    registry = Registry.from_settings(settings)
    runs = registry.find_runs(f"tags.`driftloop.score.request_id` = '{request_id}'", max_results=1)
    if not runs:
        return {}
    run = runs[0]
    tags, metrics = run.data.tags, run.data.metrics
    return {"mlflow_run_id": run.info.run_id, "model": tags.get("driftloop.model", ""),
            "version": tags.get("driftloop.score.version", ""), "input": tags.get("driftloop.score.input", ""),
            "output": tags.get("driftloop.score.output", ""), "rows": int(metrics.get("rows", 0)),
            "drift": tags.get("driftloop.score.drift", ""), "drift_share": metrics.get("drift_share", 0.0),
            "drifted_columns": [c for c in tags.get("driftloop.score.drifted_columns", "").split(",") if c],
            "report": f"runs:/{run.info.run_id}/batch_drift/batch_drift.html",
            "ids": tags.get("driftloop.score.ids", ""),
            "kept": [c for c in tags.get("driftloop.score.kept", "").split(",") if c],
            "alert": tags.get(ALERT_TAG, "")}


def upload_scoring(settings: Settings, client: Any | None = None) -> tuple[Any, str, str]:
    """Compile and upload the scoring pipeline as a version of ``driftloop-score``: (runner, pipeline, version)."""
    from pipelines.runner import KfpRunner

    runner = KfpRunner(settings, client=client)
    return (runner, *runner.upload(scoring_pipeline_for(settings)))
