"""The one configuration object.

Loaded once from a YAML file plus ``DRIFTLOOP_*`` environment variables
(nested keys joined by ``__``, e.g. ``DRIFTLOOP_MLFLOW__TRACKING_URI``),
validated by pydantic, frozen and passed down. Unknown keys fail at load time
with the dotted name of the key. Secrets (MLflow credentials, KFP tokens,
webhook tokens) are never read from the file: they come from the environment
(locally) or from Kubernetes Secrets (mounted as environment variables).
"""

from __future__ import annotations

import os
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from driftloop.core.errors import ConfigError
from driftloop.core.statistics import check_blackout_windows
from driftloop.core.user_cache import cache_file, read_json, write_json
from driftloop.core.workspace import check_workspace_path

__all__ = [
    "Settings",
    "DataConfig",
    "ColumnRule",
    "ValidationConfig",
    "ModelConfig",
    "GateConfig",
    "MlflowConfig",
    "KfpConfig",
    "ServingConfig",
    "RolloutConfig",
    "MonitorConfig",
    "QualityConfig",
    "TriggerConfig",
    "ScheduleConfig",
    "ScoreConfig",
    "DistributedConfig",
    "AgentConfig",
    "AgentModelPolicy",
    "FleetLimits",
    "FleetMembership",
    "load_settings",
    "merge_trees",
    "read_yaml",
    "env_overrides",
    "split_override",
    "dns_label",
    "apply_overrides",
    "ENV_PREFIX",
    "DEFAULT_IMAGE",
]

ENV_PREFIX = "DRIFTLOOP_"
# The one image constant shared by pipelines (component base image) and infra manifests.
DEFAULT_IMAGE = "ghcr.io/driftloop/driftloop:0.1.0"

# Environment variables that carry secrets; never accepted from a config file.
SECRET_ENV = ("MLFLOW_TRACKING_TOKEN", "MLFLOW_TRACKING_PASSWORD", "KFP_TOKEN", "DRIFTLOOP_WEBHOOK_TOKEN",
              "DRIFTLOOP_GATEWAY_TOKEN", "DRIFTLOOP_INGEST_TOKEN", "DRIFTLOOP_EVIDENTLY_SECRET")
# DRIFTLOOP_* variables the processes read for themselves (set by the CLI for its children, or by infra/):
# they are not configuration keys, so a user or a Deployment that sets them must not make every load fail.
PROCESS_ENV = ("DRIFTLOOP_CONFIG", "DRIFTLOOP_ERROR_FILE", "DRIFTLOOP_LOG_SCORES", "DRIFTLOOP_TASK_SERVER",
               "DRIFTLOOP_TRACKER", "DRIFTLOOP_TRACKER_BIND", "DRIFTLOOP_SKOPS_NAMES")


def _is_number(annotation: Any) -> bool:
    """``int``, ``float`` or an optional one: the fields where YAML's ``true`` must not pass for 1."""
    if annotation in (int, float):
        return True
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return bool(args) and all(a in (int, float) for a in args)
    return False


class _Section(BaseModel):
    # NaN and infinities are no setting's value: ``gate.margin: .nan`` would make every comparison false
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_number(cls, v: Any, info: Any) -> Any:
        """``min_samples: true`` is a mistake, not 1 (pydantic's lax mode would read it as 1)."""
        if isinstance(v, bool) and _is_number(cls.model_fields[info.field_name].annotation):
            raise ValueError(f"expected a number, not the boolean {str(v).lower()}")
        return v


# A model or InferenceService name: a Kubernetes DNS-1123 label (it names the served model, its
# URL path and, on a cluster, the InferenceService; a path such as ../../etc is none of those)
_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")


def dns_label(value: str) -> str:
    if len(value) > 63 or not _DNS_LABEL.fullmatch(value):
        raise ValueError(f"{value!r} is not a valid model name: use 1-63 lower-case letters, digits and '-', "
                         "starting and ending with a letter or digit (a DNS-1123 label, e.g. churn-model)")
    return value


class DataConfig(_Section):
    """Where the training data comes from and how it is split."""

    source: str = Field("", description="URI of a parquet or csv table (path, file://, s3://, gs://, http(s)://)")
    format: Literal["auto", "parquet", "csv"] = "auto"
    target: str = "label"
    time_column: str | None = None
    window_start: str | None = Field(None, description="inclusive ISO timestamp on time_column")
    window_end: str | None = Field(None, description="exclusive ISO timestamp on time_column")
    test_size: float = Field(0.2, gt=0.0, lt=1.0)
    reference_size: int = Field(5000, ge=100, description="rows kept as the monitoring reference sample")
    seed: int = 42


class ColumnRule(_Section):
    """Quality rules for one column; unset fields fall back to the defaults."""

    max_missing: float | None = Field(None, ge=0.0, le=1.0, description="1.0 also accepts a column with no values")
    max_missing_increase: float | None = Field(None, ge=0.0, le=1.0)
    min: float | None = None
    max: float | None = None
    allowed: list[str] | None = Field(None, description="allowed categorical levels")


class ValidationConfig(_Section):
    """Data checks before training. Gaps in a feature are not an error by themselves (the learners impute them, and
    sparse columns are common in real tables: pool quality in house sales, a low wind reading some stations never
    send); what stops a run is a column with no values to learn from, or one whose gaps jump in the later rows (a
    feed that broke), checked on the test split, which is the newest rows when data.time_column is set."""

    max_missing: float = Field(1.0, ge=0.0, le=1.0, description="share of missing values above which a column stops "
                               "the run (default: no limit; a column with no values at all always stops it)")
    max_missing_increase: float = Field(0.3, ge=0.0, le=1.0, description="how much larger the test split's missing "
                                        "share may be than the training split's")
    max_unseen_share: float = Field(0.05, ge=0.0, le=1.0, description="share of test rows with levels unseen in training")
    columns: dict[str, ColumnRule] = Field(default_factory=dict)


class DistributedConfig(_Section):
    """Training spread over workers joined by XGBoost's collective (``model.learner: xgboost``)."""

    workers: int = Field(1, ge=1, le=256, description="1 = one process (today's train step); N > 1: N workers, "
                         "a Kubeflow Trainer TrainJob on a cluster, N local processes on the embedded default")
    gpus_per_worker: int = Field(0, ge=0, le=1, description="GPUs requested per node (the runtime starts one worker "
                                 "per node, and two ranks cannot share one GPU)")
    checkpoint_rounds: int = Field(10, ge=1, description="rank 0 checkpoints the booster every this many rounds")
    timeout_seconds: int = Field(3600, ge=1, description="the TrainJob's activeDeadlineSeconds; the local run's limit")
    runtime: str = Field("xgboost-distributed", description="Kubeflow Trainer ClusterTrainingRuntime")
    image: str | None = Field(None, description="worker image on a cluster; default the driftloop image")
    tracker_port: int = Field(0, ge=0, le=65535, description="local tracker port on 127.0.0.1; 0 = a free one")
    checkpoint_uri: str | None = Field(None, description="where checkpoints go (path, s3://, gs://); default beside "
                                       "the pipeline's artifacts")
    namespace: str | None = Field(None, description="namespace of the TrainJob; default the pipeline pod's own")


class ModelConfig(_Section):
    task: Literal["classification", "regression"] = "classification"
    learner: Literal["hist_gradient_boosting", "random_forest", "linear", "xgboost"] = "hist_gradient_boosting"
    params: dict[str, Any] = Field(default_factory=dict, description="learner hyper-parameters")
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="auto: CUDA when a GPU is visible (GPU learners only); cuda: fail without one"
    )
    gpu: bool = Field(False, description="request an accelerator for the train step on Kubernetes")
    accelerator_type: str = "nvidia.com/gpu"
    accelerator_limit: int = Field(1, ge=1)
    gpu_toleration_key: str = "nvidia.com/gpu"
    gpu_node_selector: dict[str, str] = Field(default_factory=dict)
    distributed: DistributedConfig = DistributedConfig()

    @model_validator(mode="after")
    def _distributed_learner(self) -> "ModelConfig":
        if self.distributed.workers > 1 and self.learner != "xgboost":
            raise ValueError(f"model.distributed.workers={self.distributed.workers} needs model.learner 'xgboost' "
                             f"(the learner with a distributed runtime), not {self.learner!r}")
        return self

    @field_validator("params")
    @classmethod
    def _known_params(cls, v: dict[str, Any], info: Any) -> dict[str, Any]:
        """An unknown hyper-parameter fails here, not after the data was read and the model trained."""
        task, learner = info.data.get("task"), info.data.get("learner")
        if v and task and learner:
            known = learner_params(task, learner)
            unknown = sorted(set(v) - known)
            if unknown:
                raise ValueError(f"unknown hyper-parameter {', '.join(map(repr, unknown))} for learner {learner!r} "
                                 f"({task}); it takes: {', '.join(sorted(known))}")
        return v


# learner -> the estimator class that ``model.params`` go to, per task (components/train.py builds them)
_LEARNER_CLASSES = {
    "hist_gradient_boosting": ("sklearn.ensemble", "HistGradientBoostingClassifier", "HistGradientBoostingRegressor"),
    "random_forest": ("sklearn.ensemble", "RandomForestClassifier", "RandomForestRegressor"),
    "linear": ("sklearn.linear_model", "LogisticRegression", "Ridge"),
    "xgboost": ("xgboost", "XGBClassifier", "XGBRegressor"),
}


_LEARNER_PACKAGES = {"sklearn.ensemble": "scikit-learn", "sklearn.linear_model": "scikit-learn", "xgboost": "xgboost"}


def learner_params(task: str, learner: str) -> set[str]:
    """The hyper-parameter names the learner's estimator accepts (its ``get_params()``).

    Importing the estimator's library costs every process that reads a configuration with ``model.params``
    ~0.7 s (sklearn.ensemble; more for xgboost) -- the monitor, ``driftloop serve``, ``driftloop rollout run``,
    each retraining worker -- though most never train. So the names are kept in the user's cache
    (``$XDG_CACHE_HOME/driftloop``, else ``~/.cache/driftloop``), one file per library version: read there,
    asked of the library once per installed version. A cache that cannot be read or written is passed by."""
    import importlib

    module, classifier, regressor = _LEARNER_CLASSES[learner]
    name = classifier if task == "classification" else regressor
    cached = _params_cache(module)
    if cached is not None:
        known = _read_params(cached, name)
        if known is not None:
            return known
    try:
        cls = getattr(importlib.import_module(module), name)
    except ImportError as exc:
        raise ValueError(f"learner {learner!r} needs the {module} package, which is not installed") from exc
    known = set(cls().get_params())
    if cached is not None:
        _write_params(cached, name, known)
    return known


def _params_cache(module: str) -> Path | None:
    """The cache file of the hyper-parameter names of ``module``'s installed version (None: not installed)."""
    from importlib import metadata

    package = _LEARNER_PACKAGES[module]
    try:
        version = metadata.version(package)
    except metadata.PackageNotFoundError:
        return None
    return cache_file("learner-params", **{package: version})


def _read_params(path: Path, name: str) -> set[str] | None:
    data = read_json(path)
    names = data.get(name) if isinstance(data, dict) else None
    return set(names) if isinstance(names, list) and all(isinstance(n, str) for n in names) else None


def _write_params(path: Path, name: str, known: set[str]) -> None:
    """Add ``name``'s parameters to the cache file."""
    data = read_json(path)
    data = data if isinstance(data, dict) else {}
    data[name] = sorted(known)
    write_json(path, data)


_HIGHER_IS_BETTER = {"accuracy": True, "f1": True, "roc_auc": True, "r2": True, "rmse": False, "mae": False}
_TASK_METRICS = {"classification": {"accuracy", "f1", "roc_auc"}, "regression": {"r2", "rmse", "mae"}}


class GateConfig(_Section):
    """The evaluation gate: the new model must reach ``min_value`` and beat the champion by ``margin``."""

    metric: str | None = Field(None, description="default: accuracy (classification) or rmse (regression)")
    min_value: float | None = Field(None, description="absolute floor (ceiling for error metrics)")
    margin: float = Field(0.0, description="required improvement over the champion; negative = tolerance")


class MlflowConfig(_Section):
    tracking_uri: str | None = Field(None, description="default: SQLite store in the workspace")
    registry_uri: str | None = None
    experiment: str = "driftloop"
    model_name: str = Field("driftloop-model", description="registered model name; also the served model's name "
                            "(a DNS-1123 label: lower-case letters, digits, '-')")
    workspace: str | None = Field(None, description="MLflow workspace on a server started with --enable-workspaces; "
                                                    "the pipeline's steps get it as MLFLOW_WORKSPACE (a tenant's space)")

    @field_validator("model_name")
    @classmethod
    def _model_name(cls, v: str) -> str:
        return dns_label(v)


class KfpConfig(_Section):
    host: str | None = Field(None, description="Kubeflow Pipelines endpoint; unset = kfp.local")
    namespace: str = "kubeflow"
    experiment: str = "driftloop"
    pipeline_name: str = "driftloop-train"
    mlflow_secret: str | None = Field("driftloop-mlflow", description="Secret mounted as MLflow env vars")
    service_account: str | None = "driftloop-pipeline"
    queue_name: str | None = Field(None, description="Kueue LocalQueue of the tenant: the train step's pods carry "
                                                     "the label kueue.x-k8s.io/queue-name")


class ServingConfig(_Section):
    name: str = Field("driftloop-model", description="InferenceService name (a DNS-1123 label)")
    namespace: str = "driftloop"
    host: str = "127.0.0.1"
    gateway_port: int = Field(8080, ge=0, le=65535)
    primary_port: int = Field(0, ge=0, le=65535, description="0 = pick a free port")
    canary_port: int = Field(0, ge=0, le=65535)
    sticky_key: str | None = Field(None, description="request header used for sticky canary assignment")
    max_payload_bytes: int = Field(8 * 1024 * 1024, ge=1024)
    image: str = DEFAULT_IMAGE
    use_mlflow_runtime: bool = Field(False, description="use KServe's mlflow model format instead of the predictor image")
    storage_uri: str | None = None
    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(3, ge=1)
    scale_metric: Literal["concurrency", "rps", "cpu", "memory"] = "concurrency"
    scale_target: int = Field(10, ge=1)
    cpu_request: str = "500m"
    memory_request: str = "1Gi"
    cpu_limit: str = "2"
    memory_limit: str = "2Gi"
    gpu: int = Field(0, ge=0)
    logger_url: str = "http://driftloop-monitor.driftloop.svc.cluster.local/events"
    logger_mode: Literal["all", "request", "response"] = "all"
    kube_context: str | None = Field(None, description="kubeconfig context of the cluster this model is served on "
                                                       "(default: the current context; a fleet's models may name "
                                                       "different clusters)")

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return dns_label(v)

    @field_validator("cpu_request", "memory_request", "cpu_limit", "memory_limit", mode="before")
    @classmethod
    def _quantity(cls, v: Any) -> Any:
        """Kubernetes quantities ("500m", "2", "1Gi"); a bare YAML number is taken as written."""
        import re

        if isinstance(v, (int, float)) and not isinstance(v, bool):
            v = str(v)
        if isinstance(v, str) and not re.fullmatch(r"[0-9]+(\.[0-9]+)?(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)?", v):
            raise ValueError(f"{v!r} is not a Kubernetes quantity like 500m, 2 or 1Gi")
        return v

    @model_validator(mode="after")
    def _replicas(self) -> "ServingConfig":
        if self.max_replicas < self.min_replicas:
            raise ValueError("max_replicas must be >= min_replicas")
        return self


class RolloutConfig(_Section):
    """The canary's steps and how each step is judged (docs/rollouts.md, "How a step is judged")."""

    step_weight: int = Field(20, ge=1, le=100)
    step_weights: list[int] | None = None
    max_weight: int = Field(100, ge=1, le=100)
    interval_seconds: float = Field(30.0, gt=0)
    threshold: int = Field(2, ge=1, description="failed analyses in a row that roll the canary back")
    manual_approval: bool = False
    max_error_rate: float = Field(0.05, ge=0.0, le=1.0)
    max_p99_latency_ms: float = Field(500.0, gt=0)
    min_requests: int = Field(20, ge=0)
    quality_margin: float = Field(0.05, ge=0.0, lt=1.0, description=(
        "how much worse than the champion the canary may be on the gate's metric, on the same labelled "
        "requests: points of accuracy, F1 or ROC AUC; a relative change of RMSE or MAE (0.05 = 5 % higher)"))
    confidence: float = Field(0.95, gt=0.5, lt=1.0, description=(
        "confidence of each bound of the canary-vs-champion comparison, over the whole rollout: a canary at "
        "least as good is rolled back on quality, and one worse by the margin promoted, at most 1 - this often"))
    min_labels: int = Field(100, ge=0, description=(
        "labelled requests, scored by both versions, before quality is judged; below it the output-PSI guard "
        "judges instead"))
    max_holds: int = Field(40, ge=1, description=(
        "analyses in a row at one weight whose quality comparison is inconclusive before the canary is "
        "rolled back as not shown to be within quality_margin"))
    max_prediction_psi: float = Field(0.25, gt=0, description=(
        "shadow phase: the shadow's output PSI against the primary (canary steps judge PSI against the "
        "champion's own spread)"))
    min_quality_delta: float = Field(-0.05, description=(
        "shadow phase: shadow quality minus the primary's on the same labelled rows (canary steps: "
        "quality_margin)"))
    deploy: Literal["auto", "local", "kserve", "none"] = Field(
        "auto", description="where the pipeline's deploy step puts a canary; auto: kserve on a cluster, else local")
    prometheus_url: str | None = Field(None, description="Prometheus for InferenceService canary metrics")
    shadow_percent: float = Field(0.0, ge=0.0, le=100.0, description="share of requests mirrored to a new challenger "
                                  "before its canary steps; 0 = no shadow phase")
    shadow_seconds: float = Field(60.0, gt=0, description="how long the shadow phase lasts at least")
    shadow_min_requests: int = Field(50, ge=1, description="mirrored requests the shadow phase needs before a verdict")
    shadow_timeout_seconds: float = Field(2.0, gt=0, description="a mirrored request slower than this counts as an error")
    shadow_min_agreement: float = Field(0.9, ge=0.0, le=1.0, description="classification: share of equal labels")
    shadow_max_relative_diff: float = Field(0.1, ge=0.0, description="regression: mean |shadow - primary| / mean |primary|")

    @field_validator("step_weights")
    @classmethod
    def _weights(cls, v: list[int] | None) -> list[int] | None:
        if v is not None:
            if not v or any(w < 1 or w > 100 for w in v) or v != sorted(v):
                raise ValueError("step_weights must be increasing percentages between 1 and 100")
        return v


class QualityConfig(_Section):
    """Performance checks on labelled windows, against the version's own holdout metrics."""

    enabled: bool = True
    window_seconds: float | None = Field(None, gt=0, description="labelled window by prediction time; None = count "
                                                                 "windows of window_rows labelled rows")
    window_rows: int = Field(500, ge=1, description="labelled rows per window (the latest ones)")
    min_labels: int = Field(200, ge=1, description="labelled rows a window needs before a verdict")
    max_relative: dict[str, float] = Field(
        default_factory=lambda: {"rmse": 0.25, "mae": 0.25},
        description="allowed relative worsening per metric (0.25 = 25 % worse than holdout)")
    max_absolute: dict[str, float] = Field(
        default_factory=lambda: {"accuracy": 0.05, "f1": 0.05, "roc_auc": 0.05, "r2": 0.1, "ece": 0.1},
        description="allowed absolute worsening per metric (accuracy -0.05)")
    estimate: bool = Field(True, description="estimate classifiers' accuracy from calibrated scores (CBPE)")
    estimate_alerts: bool = Field(False, description="a drop of the ESTIMATED accuracy raises an alert too")
    report_sample_rows: int = Field(50_000, ge=100, description="rows of a window in the Evidently quality report")
    resolve_windows: int = Field(3, ge=1, description=(
        "complete labelled windows in a row that pass before a quality episode ends; until then the champion's "
        "failing windows are counted on the episode's one alert (docs/monitoring.md, \"One alert per episode\")"))

    @field_validator("max_relative", "max_absolute")
    @classmethod
    def _metrics(cls, v: dict[str, float]) -> dict[str, float]:
        known = {"rmse", "mae", "r2", "mean_error", "accuracy", "f1", "roc_auc", "ece"}
        for key, value in v.items():
            if key not in known:
                raise ValueError(f"unknown quality metric {key!r} (one of {sorted(known)})")
            if value < 0:
                raise ValueError(f"the allowed worsening of {key} must be >= 0, got {value}")
        return v


class MonitorConfig(_Section):
    host: str = "127.0.0.1"
    port: int = Field(8090, ge=0, le=65535)
    base_path: str = Field("", pattern=r"^(/[a-z0-9][a-z0-9-]*)*$", description=(
        "path of this model's API on the monitor: '' for a one-model monitor; a fleet's one monitor serves model "
        "NAME under /models/NAME (set by the fleet file)"))
    window_rows: int = Field(1000, ge=1, description="rows per window (count windows)")
    window_seconds: float | None = Field(None, gt=0, description="time window; None = count windows only")
    window_kind: Literal["tumbling", "sliding"] = "tumbling"
    min_samples: int = Field(200, ge=1)
    min_requests: int = Field(10, ge=1, description="distinct requests a window needs before a verdict, besides "
                                                    "min_samples rows: one request or client cannot fill it")
    max_rows_per_request: int = Field(100, ge=1, description="rows one request contributes to a window at most")
    check_interval_seconds: float = Field(10.0, gt=0)
    drift_share: float = Field(0.5, gt=0.0, le=1.0, description="share of drifted columns that makes dataset drift")
    num_method: str | None = None
    cat_method: str | None = None
    num_threshold: float | None = None
    cat_threshold: float | None = None
    per_column_method: dict[str, str] = Field(default_factory=dict)
    per_column_threshold: dict[str, float] = Field(default_factory=dict)
    report_sample_rows: int = Field(50_000, ge=100)
    resolve_windows: int = Field(3, ge=1, description=(
        "complete windows in a row without drift before a drift episode ends; until then each drifted window is "
        "counted on the episode's one alert (docs/monitoring.md, \"One alert per episode\")"))
    store: Path | None = Field(None, description="inference-log SQLite file; default <workspace>/monitor/inference.db, "
                                                 "relative paths are inside the workspace")
    store_synchronous: Literal["NORMAL", "FULL"] = Field(
        "NORMAL", description="NORMAL: acked events survive a crash of the process; FULL: also a power loss (slower)")
    max_body_bytes: int = Field(16 * 1024 * 1024, ge=1024, description="largest event or batch the sink accepts")
    events_auth: Literal["token", "network"] = Field(
        "token", description="POST /events: token = the ingest bearer token is required; network = a request "
                             "without one is accepted (KServe's logger sends no header; the NetworkPolicy is the "
                             "boundary), a wrong one is still refused. Env DRIFTLOOP_EVENTS_AUTH")
    history_url: str | None = Field(None, pattern=r"^https?://", description=(
        "Evidently UI service that stores every check as a snapshot (writes carry DRIFTLOOP_EVIDENTLY_SECRET); "
        "unset: the Evidently workspace <workspace>/evidently (docs/monitoring.md, \"History\")"))
    url: str | None = Field(None, pattern=r"^https?://[^\s/]+", description=(
        "where clients reach the monitor (a fleet's one monitor: its GET /models), e.g. http://127.0.0.1:8090 "
        "through kubectl port-forward or the monitor Service's URL in a pod; driftloop status reads each model's "
        "alerts, last retrain, drift and quality from it instead of the local workspace. Unset: the local "
        "workspaces (docs/fleet.md, \"The view\"). Env DRIFTLOOP_MONITOR__URL"))
    quality: QualityConfig = QualityConfig()


class TriggerConfig(_Section):
    enabled: bool = True
    min_samples: int = Field(200, ge=0)
    cooldown_seconds: float = Field(3600.0, ge=0)
    daily_budget: int = Field(4, ge=0)
    blackout: list[str] = Field(default_factory=list, description='windows like "22:00-06:00" (UTC)')
    recent_rows: int | None = Field(None, ge=1, description="retrain on the last N rows of the source")
    recent_days: float | None = Field(None, gt=0, description=(
        "retrain on the last N days of the source, counted back from its newest event time (data.time_column), "
        "not from today"))
    rollout_wait_seconds: float = Field(21600.0, gt=0, description=(
        "how long a retrain's canary may go without a rollout outcome in MLflow (promoted / rolled back) before "
        "the trigger stops counting its run as in flight and re-checks the alerts attached to it"))

    @field_validator("blackout")
    @classmethod
    def _blackout(cls, v: list[str]) -> list[str]:
        return check_blackout_windows(v)


class ScheduleConfig(_Section):
    """Recurring runs on the embedded default (on a cluster, KFP recurring runs keep time)."""

    store: Path | None = Field(None, description="SQLite file of the local scheduler; default <workspace>/schedules.db")
    tick_seconds: float = Field(30.0, gt=0, description="how often the local scheduler looks for due slots")
    grace_seconds: float = Field(300.0, ge=0, description="a slot this late still runs on a no-catchup schedule")


class ScoreConfig(_Section):
    """Batch scoring (``driftloop run score``): stored records in, predictions out."""

    input: str = Field("", description="URI of the records to score (parquet or csv; path, file://, s3://, gs://)")
    output: str = Field("", description="URI of the predictions (parquet, or csv by its suffix)")
    format: Literal["auto", "parquet", "csv"] = "auto"
    model: str | None = Field(None, description="name@alias or name/version; default <mlflow.model_name>@champion")
    id_column: str = Field("id", description="column copied from the input to every prediction")
    chunks: int = Field(0, ge=0, le=1000, description="chunks scored in parallel; 0 = one per CPU core")
    batch_rows: int = Field(50_000, ge=1, description="rows read, scored and written at a time (bounds memory)")
    overwrite: bool = False
    drift_sample_rows: int = Field(50_000, ge=100, description="rows of the batch compared with the reference")
    drift_share: float = Field(0.5, gt=0.0, le=1.0, description="share of drifted columns that makes dataset drift")
    alert_url: str | None = Field(None, description="monitor's Alertmanager webhook for a drifted batch; default "
                                                    "http://<monitor.host>:<monitor.port>/alerts/alertmanager")


class AgentModelPolicy(_Section):
    """Guardrails of one served model (``agent.models.<name>``); unset fields take the agent's defaults."""

    floor: int | None = Field(None, ge=0, description="the agent never sets fewer replicas than this")
    ceiling: int | None = Field(None, ge=1, description="the agent never sets more replicas than this")
    capacity_rps: float | None = Field(None, gt=0, description="requests per second one replica serves within the SLO")


class AgentConfig(_Section):
    """The serving agent (``driftloop agent``): predictive replica floors, anomaly actions, right-sizing.

    Every action is checked against this policy before it runs and recorded with its reason.
    """

    mode: Literal["observe", "scale-up", "full"] = Field(
        "observe", description="observe: record only; scale-up: may only raise floors and alert; full: also lower "
                               "floors and roll back a canary")
    interval_seconds: float = Field(60.0, gt=0, description="how often the agent samples and decides (the step "
                                                             "of the request-rate history it forecasts)")
    lead_seconds: float = Field(90.0, ge=0, description="how far ahead a floor must hold: cold start + model load")
    forecast_engine: Literal["auto", "numpy", "statsmodels"] = Field(
        "auto", description="who fits Holt-Winters: statsmodels (the agent extra), numpy's grid, or auto")
    interval_level: float = Field(0.9, gt=0.5, lt=1.0, description="prediction interval; the floor covers its upper bound")
    capacity_rps: float = Field(20.0, gt=0, description="requests/s one replica serves within the SLO (measured)")
    target_utilisation: float = Field(0.75, gt=0.0, le=1.0, description="share of capacity the floor plans to use")
    slo_p99_ms: float = Field(1000.0, gt=0)
    slo_error_rate: float = Field(0.01, gt=0.0, lt=1.0, description="error budget of the SLO (burn rate = rate / this)")
    floor: int = Field(1, ge=0)
    ceiling: int = Field(10, ge=1)
    max_step: int = Field(4, ge=1, description="largest change of replicas in one planned action (an urgent raise "
                                                "for load already observed may also double the count or add 4)")
    cooldown_seconds: float = Field(600.0, ge=0, description="after a change, no lowering of that model's floor "
                                                             "for this long (raising is never delayed)")
    down_hysteresis: float = Field(0.1, ge=0.0, lt=1.0, description="replicas are lowered only when the need is "
                                                                    "this share (and at least one replica) below them")
    reactive: Literal["own", "hpa"] = Field(
        "own", description="own: the agent owns the replica count (minReplicas = maxReplicas on a cluster, the "
                           "replica count locally) with its own reactive guard; hpa: it sets only minReplicas and "
                           "KServe's HPA (Standard mode) or KPA (Serverless) scales above it")
    guard_seconds: float = Field(15.0, gt=0, description="reactive: own -- how often the guard compares the load with "
                                                         "what the replicas serve (the HPA's period)")
    plan_seconds: float = Field(600.0, gt=0, description="a raise goes as far as the forecast needs over this long; "
                                                         "a floor is lowered only as far as it allows")
    max_actions_per_hour: int = Field(30, ge=0, description="automatic actions allowed in any hour; owning the "
                                      "count, leave room for the guard's raises (12 refuses some on bursts)")
    blackout: list[str] = Field(default_factory=list, description='windows like "22:00-06:00" (UTC) with no automatic action')
    kill_switch_file: Path | None = Field(None, description="while this file exists no action runs; default "
                                                            "<workspace>/agent/STOP")
    kill_switch_annotation: str = Field("driftloop.io/agent-paused", description='"true" on the InferenceService pauses the agent')
    decision_log: Path | None = Field(None, description="JSONL of every decision; default <workspace>/agent/decisions.jsonl")
    gateway_url: str | None = Field(None, description="gateway to read traffic from; default the local serving state's")
    alert_url: str | None = Field(None, description="Alertmanager-style webhook for anomaly alerts (the monitor's); "
                                                    "unset = alerts are recorded only")
    models: dict[str, AgentModelPolicy] = Field(default_factory=dict)

    @field_validator("blackout")
    @classmethod
    def _blackout(cls, v: list[str]) -> list[str]:
        return check_blackout_windows(v)

    @model_validator(mode="after")
    def _bounds(self) -> "AgentConfig":
        for name, pol in [("agent", self), *((f"agent.models.{k}", v) for k, v in self.models.items())]:
            floor = pol.floor if pol.floor is not None else self.floor
            ceiling = pol.ceiling if pol.ceiling is not None else self.ceiling
            if ceiling < floor:
                raise ValueError(f"{name}: ceiling {ceiling} is below floor {floor}")
        return self


class FleetLimits(_Section):
    """Limits across a fleet's models (the fleet file's ``fleet:``, docs/fleet.md)."""

    max_concurrent_runs: int = Field(2, ge=1, description="training runs of different models at once "
                                                          "(`driftloop run train` on the whole fleet, retraining runs)")
    daily_runs: int | None = Field(None, ge=0, description="retraining runs a day across the models: one pool "
                                                           "their triggers share (besides each trigger.daily_budget)")
    gpus: int | None = Field(None, ge=0, description="GPUs the models may hold at once: their serving replicas at "
                                                     "serving.max_replicas plus the train steps running")
    replicas: int | None = Field(None, ge=1, description="model-server replicas the agent may give all models "
                                                         "together (each model stays inside its own policy)")


class FleetMembership(_Section):
    """Which fleet a model's settings belong to: set by the fleet file for each of its models, never written
    in a one-model file (docs/fleet.md)."""

    root: Path = Field(description="the fleet's workspace (model NAME's is <root>/models/NAME)")
    name: str = Field(description="the model's name in the fleet file")
    team: str | None = None
    models: tuple[str, ...] = Field(description="every model of the fleet, in file order")
    limits: FleetLimits = FleetLimits()
    serving_gpus: int = Field(0, ge=0, description="GPUs all the fleet's models' serving may hold (at "
                                                   "serving.max_replicas): kept out of fleet.gpus for train steps")


class Settings(_Section):
    """Everything driftloop needs, validated once and frozen."""

    project: str = "driftloop"
    workspace: Path = Field(Path(".driftloop"), description="local state: MLflow store, pipeline root, logs")
    data: DataConfig = DataConfig()
    validation: ValidationConfig = ValidationConfig()
    model: ModelConfig = ModelConfig()
    gate: GateConfig = GateConfig()
    mlflow: MlflowConfig = MlflowConfig()
    kfp: KfpConfig = KfpConfig()
    serving: ServingConfig = ServingConfig()
    rollout: RolloutConfig = RolloutConfig()
    monitor: MonitorConfig = MonitorConfig()
    trigger: TriggerConfig = TriggerConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    score: ScoreConfig = ScoreConfig()
    agent: AgentConfig = AgentConfig()
    fleet: FleetMembership | None = Field(None, description="set by a fleet file for each of its models")

    @model_validator(mode="after")
    def _gate_metric(self) -> "Settings":
        metric = self.gate.metric
        if metric is not None and metric not in _TASK_METRICS[self.model.task]:
            allowed = ", ".join(sorted(_TASK_METRICS[self.model.task]))
            raise ValueError(f"gate.metric {metric!r} does not fit task {self.model.task!r} (use one of: {allowed})")
        return self

    # Derived values -----------------------------------------------------------------
    @property
    def workspace_dir(self) -> Path:
        return self.workspace.expanduser().resolve()

    @property
    def tracking_uri(self) -> str:
        """The MLflow tracking URI: from config unchanged, else the embedded SQLite store."""
        if self.mlflow.tracking_uri:
            return self.mlflow.tracking_uri
        return f"sqlite:///{self.workspace_dir / 'mlflow.db'}"

    @property
    def artifact_location(self) -> str | None:
        """Artifact folder of the embedded store (None when a remote server decides)."""
        if self.mlflow.tracking_uri:
            return None
        return (self.workspace_dir / "mlartifacts").as_uri()

    @property
    def gate_metric(self) -> str:
        return self.gate.metric or ("accuracy" if self.model.task == "classification" else "rmse")

    @property
    def is_cluster(self) -> bool:
        return bool(self.kfp.host)


def higher_is_better(metric: str) -> bool:
    return _HIGHER_IS_BETTER[metric]


def _format_validation_error(exc: ValidationError, source: str) -> str:
    lines = []
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"]) or "(root)"
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        lines.append(f"{key}: {msg}")
    return f"invalid configuration ({source}): " + "; ".join(lines)


def env_overrides(environ: dict[str, str]) -> dict[str, Any]:
    """``DRIFTLOOP_SECTION__KEY=value`` → ``{"section": {"key": value}}`` (values parsed as YAML scalars)."""
    out: dict[str, Any] = {}
    for name, raw in environ.items():
        if not name.startswith(ENV_PREFIX) or name in SECRET_ENV:
            continue
        if name in PROCESS_ENV:
            continue
        if name == "DRIFTLOOP_EVENTS_AUTH":  # the monitor's /events auth mode, short as infra/ sets it
            _set_path(out, ["monitor", "events_auth"], raw.strip())
            continue
        path = name[len(ENV_PREFIX):].lower().split("__")
        _set_path(out, path, _parse_scalar(raw))
    return out


def _parse_scalar(raw: str) -> Any:
    try:
        return yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        return raw


def _set_path(tree: dict[str, Any], path: list[str], value: Any) -> None:
    node = tree
    for part in path[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{'.'.join(path)}: cannot set a key below a non-section value")
        node = child
    node[path[-1]] = value


def merge_trees(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge_trees(merged[key], value)
        else:
            merged[key] = value
    return merged


def apply_overrides(raw: dict[str, Any], overrides: list[str] | dict[str, Any]) -> dict[str, Any]:
    """Apply ``key.sub=value`` overrides (CLI ``--param``) to a raw config tree."""
    extra: dict[str, Any] = {}
    items = overrides.items() if isinstance(overrides, dict) else [split_override(o) for o in overrides]
    for key, value in items:
        _set_path(extra, key.split("."), _parse_scalar(value) if isinstance(value, str) else value)
    return merge_trees(raw, extra)


def split_override(item: str) -> tuple[str, str]:
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not key=value")
    key, value = item.split("=", 1)
    if not key.strip():
        raise ConfigError(f"override {item!r} has an empty key")
    return key.strip(), value


def load_settings(
    path: str | Path | None = None,
    overrides: list[str] | dict[str, Any] | None = None,
    environ: dict[str, str] | None = None,
) -> Settings:
    """Load YAML (``path`` or ``$DRIFTLOOP_CONFIG``), then environment, then overrides; validate once."""
    environ = dict(os.environ if environ is None else environ)
    path = path or environ.get("DRIFTLOOP_CONFIG")
    raw: dict[str, Any] = {}
    source = "defaults"
    if path:
        p = Path(path)
        source = str(p)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        loaded = read_yaml(p) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {p} must hold a mapping at the top level")
        raw = loaded
        # Relative paths in the file are relative to the file's folder.
        base = p.resolve().parent
        if "workspace" in raw and not Path(str(raw["workspace"])).is_absolute():
            raw["workspace"] = str((base / str(raw["workspace"])).resolve())
        src = (raw.get("data") or {}).get("source") if isinstance(raw.get("data"), dict) else None
        if src and "://" not in src and not Path(src).is_absolute():
            raw["data"]["source"] = str((base / src).resolve())
    raw = merge_trees(raw, env_overrides(environ))
    if overrides:
        raw = apply_overrides(raw, overrides)
    try:
        settings = Settings.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(exc, source)) from exc
    check_workspace_path(settings.workspace_dir)
    return settings


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping (PyYAML lets the last one win)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} appears twice (lines {seen[key]} and {line}); keep one",
                    key_node.start_mark)
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: Path) -> Any:
    """The YAML document of a config file; unreadable text, bad YAML or a repeated key is a ConfigError."""
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b"\n") + 1
        raise ConfigError(f"config file {path} is not UTF-8 text: byte 0x{data[exc.start]:02x} at line {line}; "
                          "save it as UTF-8") from exc
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 (a SafeLoader subclass)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        raise ConfigError(f"config file {path} is not valid YAML: {exc.problem}{where}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {' '.join(str(exc).split())}") from exc
