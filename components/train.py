"""Train: a scikit-learn pipeline (imputation + encoding inside the model) or a GPU-capable XGBoost learner."""

import logging
import shutil
import subprocess
from typing import Any, NamedTuple

import pandas as pd

from driftloop.core.errors import DeviceUnavailableError, TrainingError

__all__ = ["cuda_visible", "resolve_device", "build_model", "train_model", "TrainResult", "GPU_LEARNERS", "prepare_features"]

log = logging.getLogger(__name__)

GPU_LEARNERS = {"xgboost"}
CPU_LEARNERS = {"hist_gradient_boosting", "random_forest", "linear"}


def cuda_visible() -> bool:
    """True when an NVIDIA GPU is visible to this process."""
    import os

    if os.environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1"):
        return False
    smi = shutil.which("nvidia-smi")
    if not smi:
        return False
    try:
        out = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return False
    return out.returncode == 0 and "GPU" in out.stdout


def resolve_device(learner: str, device: str, *, gpu_visible: bool | None = None) -> str:
    """Pick ``cpu`` or ``cuda`` for a learner; fail clearly when CUDA is demanded but absent."""
    if learner not in GPU_LEARNERS | CPU_LEARNERS:
        raise TrainingError(f"unknown learner {learner!r} (use one of: {', '.join(sorted(GPU_LEARNERS | CPU_LEARNERS))})")
    if device not in ("auto", "cpu", "cuda"):
        raise TrainingError(f"unknown device {device!r} (use auto, cpu or cuda)")
    if device == "cpu":
        return "cpu"
    if learner not in GPU_LEARNERS:
        if device == "cuda":
            raise DeviceUnavailableError(f"learner {learner!r} runs on the CPU only; choose learner 'xgboost' for a GPU")
        return "cpu"
    visible = cuda_visible() if gpu_visible is None else gpu_visible
    if device == "cuda" and not visible:
        raise DeviceUnavailableError(
            "model.device is 'cuda' but no GPU is visible to the train step; use device 'auto' to fall back to the CPU"
        )
    return "cuda" if visible else "cpu"


def _preprocessor(numeric: list[str], categorical: list[str]):
    from sklearn.compose import ColumnTransformer
    from sklearn.impute import SimpleImputer
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import OneHotEncoder

    parts = []
    if numeric:
        parts.append(("num", SimpleImputer(strategy="median", keep_empty_features=True), numeric))
    if categorical:
        parts.append(
            (
                "cat",
                Pipeline(
                    [
                        ("impute", SimpleImputer(strategy="constant", fill_value="__missing__", keep_empty_features=True)),
                        ("onehot", OneHotEncoder(handle_unknown="ignore", max_categories=50, sparse_output=False)),
                    ]
                ),
                categorical,
            )
        )
    return ColumnTransformer(parts, remainder="drop", verbose_feature_names_out=False)


def build_model(task: str, learner: str, params: dict[str, Any], numeric: list[str], categorical: list[str], device: str = "cpu"):
    """The whole model as one sklearn Pipeline: raw rows (gaps included) in, predictions out."""
    from sklearn.pipeline import Pipeline

    # KFP passes dict parameters through protobuf Struct, where every number is a double.
    params = {k: int(v) if isinstance(v, float) and v.is_integer() else v for k, v in (params or {}).items()}
    classification = task == "classification"
    try:
        if learner == "hist_gradient_boosting":
            from sklearn.ensemble import HistGradientBoostingClassifier, HistGradientBoostingRegressor

            est = (HistGradientBoostingClassifier if classification else HistGradientBoostingRegressor)(**{"random_state": 0, **params})
        elif learner == "random_forest":
            from sklearn.ensemble import RandomForestClassifier, RandomForestRegressor

            est = (RandomForestClassifier if classification else RandomForestRegressor)(**{"n_estimators": 100, "n_jobs": -1, "random_state": 0, **params})
        elif learner == "linear":
            from sklearn.linear_model import LogisticRegression, Ridge
            from sklearn.preprocessing import StandardScaler

            est = Pipeline([("scale", StandardScaler()), ("fit", (LogisticRegression(**{"max_iter": 1000, **params}) if classification else Ridge(**params)))])
        elif learner == "xgboost":
            import xgboost as xgb

            base = {"n_estimators": 200, "tree_method": "hist", "device": device, "random_state": 0}
            est = (xgb.XGBClassifier if classification else xgb.XGBRegressor)(**{**base, **params})
        else:
            raise TrainingError(f"unknown learner {learner!r}")
    except TypeError as exc:
        raise TrainingError(f"bad hyper-parameters for learner {learner!r}: {exc}") from exc
    return Pipeline([("prepare", _preprocessor(numeric, categorical)), ("model", est)])


class TrainResult(NamedTuple):
    model: Any
    device: str
    features: list[str]
    seconds: float


def prepare_features(df: pd.DataFrame, numeric: list[str], categorical: list[str]) -> pd.DataFrame:
    """Numeric features as float64, categorical as object strings (None for gaps): what serving sends."""
    out = pd.DataFrame(index=df.index)
    for c in numeric:
        out[c] = pd.to_numeric(df[c], errors="coerce").astype("float64")
    for c in categorical:
        s = df[c]
        out[c] = s.astype(object).where(s.notna(), None).map(lambda v: v if v is None else str(v))
    return out


def train_model(
    train: pd.DataFrame,
    *,
    target: str,
    task: str,
    numeric: list[str],
    categorical: list[str],
    learner: str = "hist_gradient_boosting",
    params: dict[str, Any] | None = None,
    device: str = "auto",
) -> TrainResult:
    """Fit the model pipeline on raw rows. Records the device it ran on."""
    import time

    used = resolve_device(learner, device)
    X = prepare_features(train, numeric, categorical)
    y = train[target]
    if task == "classification":
        if y.nunique() < 2:
            raise TrainingError(f"target {target!r} has a single class; a classifier needs at least two")
        if learner == "xgboost":
            classes = sorted(y.unique().tolist())
            if classes != list(range(len(classes))):
                raise TrainingError(f"learner 'xgboost' needs class labels 0..n-1; target {target!r} has {classes[:10]}")
    model = build_model(task, learner, params or {}, numeric, categorical, used)
    start = time.perf_counter()
    try:
        model.fit(X, y)
    except ValueError as exc:
        raise TrainingError(f"training {learner!r} failed: {exc}") from exc
    seconds = time.perf_counter() - start
    log.info("trained %s on %d rows in %.2fs on %s", learner, len(X), seconds, used)
    return TrainResult(model, used, numeric + categorical, seconds)
