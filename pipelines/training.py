"""The training pipeline: ingest → validate → train → evaluate vs champion → (gate) register → deploy.

Besides the ``dsl.pipeline`` function, what a runner needs of it: its arguments from the
configuration (:func:`pipeline_arguments`), its description (:func:`training_pipeline_for`: name,
package, summary of a finished run, the steps' names and key outputs for the progress lines) and
:func:`run_training`, which runs it on a runner of either home.
"""


import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kfp import compiler, dsl, kubernetes

from components.deploy import DeployConfig
from components.ops import (deploy_op, evaluate_op, ingest_op, register_op, reject_op, train_distributed_op, train_op,
                            validate_op)
from driftloop.core.runs import Pipeline, RunRequest, RunResult
from pipelines.runner import KfpRunner, LocalRunner, check_request, ensure_experiment, runner_for
from serving.backend import serving_home

if TYPE_CHECKING:
    from driftloop.core.config import Settings

__all__ = ["training_pipeline", "pipeline_arguments", "compile_pipeline", "make_training_pipeline", "build_training_pipeline", "training_pipeline_for", "summarize_run", "ClusterOptions",
           "GPU_TOLERATION_EFFECT", "STEP_NAMES", "step_detail", "run_training", "TrainingRunner", "training_runner_for"]

GPU_TOLERATION_EFFECT = "NoSchedule"
# Kueue admits a pod labelled with its tenant's LocalQueue (Kueue has no KFP integration).
QUEUE_LABEL = "kueue.x-k8s.io/queue-name"


@dataclass(frozen=True)
class ClusterOptions:
    """Per-step Kubernetes settings; kfp.local ignores them, the compiled YAML keeps them."""

    gpu: bool = False
    accelerator_type: str = "nvidia.com/gpu"
    accelerator_limit: int = 1
    toleration_key: str = "nvidia.com/gpu"
    node_selector: tuple[tuple[str, str], ...] = ()
    mlflow_secret: str | None = None
    cpu_limit: str = "2"
    memory_limit: str = "4G"
    queue_name: str | None = None
    mlflow_workspace: str | None = None
    # model.distributed.* as the launcher's parameter; workers > 1 makes the train step a launcher
    distributed: tuple[tuple[str, Any], ...] = ()

    @property
    def workers(self) -> int:
        return int(dict(self.distributed).get("workers", 1))

    @classmethod
    def from_settings(cls, settings: "Settings") -> "ClusterOptions":
        m = settings.model
        return cls(gpu=m.gpu, accelerator_type=m.accelerator_type, accelerator_limit=m.accelerator_limit,
                   toleration_key=m.gpu_toleration_key, node_selector=tuple(sorted(m.gpu_node_selector.items())),
                   mlflow_secret=settings.kfp.mlflow_secret, queue_name=settings.kfp.queue_name,
                   mlflow_workspace=settings.mlflow.workspace, distributed=_distributed(settings))


# Keys of the MLflow Secret mounted into steps that talk to MLflow (optional keys: a
# tracking server without auth needs none of them).
MLFLOW_SECRET_KEYS = {
    "MLFLOW_TRACKING_USERNAME": "MLFLOW_TRACKING_USERNAME",
    "MLFLOW_TRACKING_PASSWORD": "MLFLOW_TRACKING_PASSWORD",
    "MLFLOW_TRACKING_TOKEN": "MLFLOW_TRACKING_TOKEN",
    "AWS_ACCESS_KEY_ID": "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY": "AWS_SECRET_ACCESS_KEY",
}


def _distributed(settings: "Settings") -> tuple[tuple[str, Any], ...]:
    d, m = settings.model.distributed, settings.model
    if d.workers <= 1:
        return ()
    values = {**d.model_dump(exclude_none=True), "queue_name": getattr(settings.kfp, "queue_name", None),
              "secret": settings.kfp.mlflow_secret, "toleration_key": m.gpu_toleration_key,
              "node_selector": dict(m.gpu_node_selector)}
    return tuple(sorted((k, v) for k, v in values.items() if v is not None))


def _use_mlflow_secret(task: dsl.PipelineTask, opts: ClusterOptions) -> dsl.PipelineTask:
    if opts.mlflow_secret:
        kubernetes.use_secret_as_env(task, secret_name=opts.mlflow_secret, secret_key_to_env=MLFLOW_SECRET_KEYS, optional=True)
    if opts.mlflow_workspace:
        task.set_env_variable("MLFLOW_WORKSPACE", opts.mlflow_workspace)
    return task


def _request_gpu(task: dsl.PipelineTask, opts: ClusterOptions) -> dsl.PipelineTask:
    if not opts.gpu:
        return task
    task.set_accelerator_type(opts.accelerator_type).set_accelerator_limit(opts.accelerator_limit)
    kubernetes.add_toleration(task, key=opts.toleration_key, operator="Exists", effect=GPU_TOLERATION_EFFECT)
    for key, value in opts.node_selector:
        kubernetes.add_node_selector(task, label_key=key, label_value=value)
    return task


def make_training_pipeline(opts: ClusterOptions = ClusterOptions()):
    """Build the pipeline with these cluster options applied to its steps."""

    @dsl.pipeline(name="driftloop-train", description="Ingest, validate, train, judge against the champion, register in MLflow.")
    def training_pipeline(
        source: str,
        target: str = "label",
        fmt: str = "auto",
        time_column: str = "",
        window_start: str = "",
        window_end: str = "",
        test_size: float = 0.2,
        reference_size: int = 5000,
        seed: int = 42,
        max_missing: float = 1.0,
        max_missing_increase: float = 0.3,
        max_unseen_share: float = 0.05,
        column_rules: dict = {},
        task: str = "classification",
        learner: str = "hist_gradient_boosting",
        learner_params: dict = {},
        device: str = "auto",
        gate_metric: str = "accuracy",
        gate_min_value: str = "",
        gate_margin: float = 0.0,
        tracking_uri: str = "",
        experiment: str = "driftloop",
        model_name: str = "driftloop-model",
        trigger: str = "manual",
        request_id: str = "",
        serving_home: str = "none",
        deploy_config: str = "",
    ):
        ingest = ingest_op(
            source=source, fmt=fmt, target=target, time_column=time_column, window_start=window_start,
            window_end=window_end, test_size=test_size, reference_size=reference_size, seed=seed,
        ).set_display_name("ingest")
        validate = validate_op(
            train=ingest.outputs["train"], test=ingest.outputs["test"], target=target, task=task, time_column=time_column,
            max_missing=max_missing, max_missing_increase=max_missing_increase, max_unseen_share=max_unseen_share,
            column_rules=column_rules,
        ).set_display_name("validate")
        if opts.workers > 1:  # a launcher: the workers (TrainJob nodes or local processes) get the GPUs
            train = train_distributed_op(
                train=ingest.outputs["train"], schema=validate.outputs["schema"], target=target, task=task,
                learner=learner, params=learner_params, device=device, distributed=dict(opts.distributed),
            ).set_display_name(f"train ({opts.workers} workers)")
            _use_mlflow_secret(train, opts)  # object-store credentials for the TrainJob's artifacts
        else:
            train = train_op(
                train=ingest.outputs["train"], schema=validate.outputs["schema"], target=target, task=task,
                learner=learner, params=learner_params, device=device,
            ).set_display_name("train")
            _request_gpu(train, opts)
        if opts.queue_name:
            kubernetes.add_pod_label(train, QUEUE_LABEL, opts.queue_name)
        evaluate = evaluate_op(
            model=train.outputs["model"], test=ingest.outputs["test"], schema=validate.outputs["schema"], target=target,
            task=task, metric=gate_metric, min_value=gate_min_value, margin=gate_margin, tracking_uri=tracking_uri,
            model_name=model_name,
        ).set_display_name("evaluate vs champion")
        _use_mlflow_secret(evaluate, opts)
        for step in (ingest, validate, train, evaluate):
            step.set_caching_options(False)  # each run reads the source afresh and judges today's champion
        common = dict(
            model=train.outputs["model"], train=ingest.outputs["train"], test=ingest.outputs["test"],
            schema=validate.outputs["schema"], decision=evaluate.outputs["decision"], tracking_uri=tracking_uri,
            experiment=experiment, trigger=trigger, request_id=request_id, source=source, learner=learner, task=task,
            params=learner_params,
            # Passed as a task argument: the KFP backend fills the run id in task arguments, not in component defaults.
            pipeline_run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER,
        )
        with dsl.If(evaluate.outputs["passed"] == True, name="gate-passed"):  # noqa: E712 (KFP condition)
            register = register_op(reference=ingest.outputs["reference"], model_name=model_name, **common)
            _use_mlflow_secret(register.set_display_name("register").set_caching_options(False), opts)
            with dsl.If(serving_home != "none", name="deploy-enabled"):
                deploy = deploy_op(version=register.outputs["version"], serving_home=serving_home,
                                   deploy_config=deploy_config)
                _use_mlflow_secret(deploy.set_display_name("deploy canary").set_caching_options(False), opts)
        with dsl.Else(name="gate-rejected"):
            _use_mlflow_secret(reject_op(**common).set_display_name("record rejection").set_caching_options(False), opts)

    return training_pipeline


training_pipeline = make_training_pipeline()


def pipeline_arguments(settings: "Settings", *, trigger: str = "manual", request_id: str | None = None,
                       window_start: str | None = None, window_end: str | None = None) -> dict[str, Any]:
    """The pipeline's parameters from the configuration (plus per-run trigger and window)."""
    d = settings.data
    rules = {name: rule.model_dump(exclude_none=True) for name, rule in settings.validation.columns.items()}
    return {
        "source": d.source,
        "target": d.target,
        "fmt": d.format,
        "time_column": d.time_column or "",
        "window_start": (window_start if window_start is not None else d.window_start) or "",
        "window_end": (window_end if window_end is not None else d.window_end) or "",
        "test_size": d.test_size,
        "reference_size": d.reference_size,
        "seed": d.seed,
        "max_missing": settings.validation.max_missing,
        "max_missing_increase": settings.validation.max_missing_increase,
        "max_unseen_share": settings.validation.max_unseen_share,
        "column_rules": rules,
        "task": settings.model.task,
        "learner": settings.model.learner,
        "learner_params": dict(settings.model.params),
        "device": settings.model.device,
        "gate_metric": settings.gate_metric,
        "gate_min_value": "" if settings.gate.min_value is None else str(settings.gate.min_value),
        "gate_margin": settings.gate.margin,
        "tracking_uri": settings.tracking_uri,
        "experiment": settings.mlflow.experiment,
        "model_name": settings.mlflow.model_name,
        "trigger": trigger,
        "request_id": request_id or uuid.uuid4().hex,
        "serving_home": serving_home(settings),
        # the deploy step's part of the configuration, with the workspace absolute
        "deploy_config": DeployConfig.from_settings(settings).model_dump_json(),
    }


def compile_pipeline(settings: "Settings", package_path: str | Path) -> Path:
    """Compile the training pipeline to KFP YAML with the config's values as parameter defaults."""
    args = pipeline_arguments(settings, request_id="")
    args.pop("request_id")
    args["serving_home"] = serving_home(settings, cluster=True)  # compiled YAML runs on Kubeflow
    path = Path(package_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    compiler.Compiler().compile(build_training_pipeline(settings), str(path), pipeline_parameters=args)
    return path


def build_training_pipeline(settings: "Settings"):
    """The pipeline with this config's cluster settings (GPU, secrets) applied to its steps."""
    return make_training_pipeline(ClusterOptions.from_settings(settings))


def training_pipeline_for(settings: "Settings") -> Pipeline:
    """The training pipeline as a runner runs it (its arguments: :func:`pipeline_arguments`)."""
    name = settings.kfp.pipeline_name
    return Pipeline(name=name, description="driftloop training pipeline",
                    build=lambda: build_training_pipeline(settings),
                    compile=lambda directory: compile_pipeline(settings, directory / f"{name}.yaml"),
                    summarize=lambda request_id: summarize_run(settings, request_id),
                    prepare=lambda: ensure_experiment(settings), step_names=STEP_NAMES, step_detail=step_detail)


# kfp component function -> the step name a person reads
STEP_NAMES = {"ingest_op": "ingest", "validate_op": "validate", "train_op": "train", "train_distributed_op": "train",
              "evaluate_op": "evaluate", "register_op": "register", "reject_op": "record rejection",
              "deploy_op": "deploy"}


def step_detail(func: str, output: dict[str, Any]) -> str:
    """The key output of a finished step, from its executor output (parameters and artifact metadata)."""
    params = output.get("parameterValues") or {}
    meta: dict[str, Any] = {}
    for art in (output.get("artifacts") or {}).values():
        for a in art.get("artifacts") or []:
            meta.update(a.get("metadata") or {})
    if func == "ingest_op":
        return f"{params.get('rows', '?')} rows" + (f", window {params['window']}" if params.get("window") else "")
    if func == "validate_op":
        return f"{len(meta.get('numeric', []))} numeric, {len(meta.get('categorical', []))} categorical columns"
    if func in ("train_op", "train_distributed_op"):
        return f"on {params.get('device', '?')}"
    if func == "evaluate_op":
        verdict = "PASS" if params.get("passed") else "REJECT"
        return f"gate {verdict}: {params.get('reason', '')}"
    if func == "register_op":  # no aliases: nothing registered, the champion's version handed on
        version = params.get("version", "?")
        return f"version {version} ({params['aliases']})" if params.get("aliases") else \
            f"nothing registered: same data and parameters as champion v{version}"
    if func == "reject_op":
        return f"MLflow run {params.get('Output', '')}"
    if func == "deploy_op":
        return f"{params.get('action', '')}: {params.get('message', '')}".strip(": ")
    return ""


def run_training(runner: LocalRunner | KfpRunner, request: RunRequest, **options: Any) -> RunResult:
    """The training pipeline on ``runner`` with this request's arguments; ``options`` are the runner's
    ``run`` options (``wait``, ``progress``, ...). A bad trigger or data window is refused before anything starts."""
    check_request(request)
    args = pipeline_arguments(runner.settings, trigger=request.trigger, request_id=request.request_id,
                              window_start=request.window_start, window_end=request.window_end)
    return runner.run(training_pipeline_for(runner.settings), args, request, **options)


class TrainingRunner:
    """A runner with the training pipeline to run: what the retraining trigger and the scheduler are given
    (they call ``run_training(request)``); every other attribute is the runner's own (``home``, ``client``, ...)."""

    def __init__(self, runner: LocalRunner | KfpRunner) -> None:
        self.runner = runner

    def __getattr__(self, name: str) -> Any:
        if name == "runner":  # not set yet (a copy being made): no runner to ask
            raise AttributeError(name)
        return getattr(self.runner, name)

    def run_training(self, request: RunRequest, **options: Any) -> RunResult:
        return run_training(self.runner, request, **options)


def training_runner_for(settings: "Settings") -> TrainingRunner:
    """The configuration's runner (:func:`~pipelines.runner.runner_for`) with the training pipeline to run."""
    return TrainingRunner(runner_for(settings))


def summarize_run(settings: "Settings", request_id: str) -> dict[str, Any]:
    """Read what the pipeline recorded in MLflow for this request: rows, metrics, gate, version."""
    from components.register import REGISTERED_TAG, describe_window
    from driftloop.core.registry import TAG, Registry

    registry = Registry.from_settings(settings)
    runs = registry.find_runs(f"tags.`{TAG.REQUEST}` = '{request_id}'", max_results=1)
    if not runs:
        return {}
    run = runs[0]
    params, metrics, tags = run.data.params, run.data.metrics, run.data.tags
    summary: dict[str, Any] = {
        "mlflow_run_id": run.info.run_id,
        "train_rows": int(params.get("train_rows", 0)),
        "test_rows": int(params.get("test_rows", 0)),
        "metrics": {k: v for k, v in metrics.items() if not k.startswith("champion_") and k != "gate_passed"},
        "champion_metrics": {k[len("champion_"):]: v for k, v in metrics.items() if k.startswith("champion_")},
        "gate": tags.get(TAG.GATE, "unknown"),
        "reason": tags.get(TAG.GATE_REASON, ""),
        "window": describe_window(params.get("data_window"), tags.get(TAG.WINDOW, "")),  # [start, end): rows
        "trigger": tags.get(TAG.TRIGGER, ""),
        "device": tags.get(TAG.DEVICE, ""),
    }
    if tags.get(REGISTERED_TAG):  # the gate passed, and the model is the champion's again: said with the reason
        summary["registered"] = tags[REGISTERED_TAG]
        summary["reason"] = f"{summary['reason']}; {tags[REGISTERED_TAG]}"
    info = registry.version_of_run(settings.mlflow.model_name, run.info.run_id) if summary["gate"] == "passed" else None
    if info is not None:
        summary["model_version"] = info.version
        summary["aliases"] = list(info.aliases)
    return summary
