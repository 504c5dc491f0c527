"""The champion's reference for drift checks, from MLflow, summarised once per champion version.

The reference is the sample the training run logged (``reference/reference.parquet``) and the
columns come from its ``schema/schema.json``. Prediction drift compares the served ``prediction``
with the champion's own predictions on that reference sample (not the target: the two
distributions differ even without drift). Those predictions are computed once per champion
version with the model and cached as parquet in the workspace, so restarts of the monitor do
not reload the model. A champion without a reference raises :class:`MonitorError`: the monitor
never passes a check it could not make.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from driftloop.core.errors import MonitorError, RegistryError
from driftloop.core.registry import CHAMPION, Registry
from monitoring.drift import CATEGORICAL, NUMERICAL, ReferenceProfile

if TYPE_CHECKING:
    from driftloop.core.config import Settings

__all__ = ["PREDICTION", "ChampionReference", "NoChampionError", "ReferenceCache", "load_champion_reference"]

log = logging.getLogger(__name__)

PREDICTION = "prediction"


class NoChampionError(MonitorError):
    """The model has no champion yet (nothing trained and promoted): its monitor waits for one."""


@dataclass
class ChampionReference:
    """Reference rows (features + the champion's predictions) and their precomputed profile."""

    model: str
    version: str
    run_id: str
    features_numeric: list[str]
    features_categorical: list[str]
    prediction_kind: str
    frame: pd.DataFrame
    profile: ReferenceProfile
    classes: list[Any] | None = None  # a classifier's classes (the training data's, from schema.json)

    @property
    def features(self) -> list[str]:
        return [*self.features_numeric, *self.features_categorical]

    @property
    def numeric(self) -> list[str]:
        """Numeric columns checked (features, plus the prediction for regression)."""
        return self.features_numeric + ([PREDICTION] if self.prediction_kind == NUMERICAL else [])

    @property
    def categorical(self) -> list[str]:
        return self.features_categorical + ([PREDICTION] if self.prediction_kind == CATEGORICAL else [])


def _cache_file(workspace: Path, model: str, version: str) -> Path:
    return workspace / "monitor" / "reference" / f"{model}-v{version}.parquet"


def _predictions(registry: Registry, uri: str, features: pd.DataFrame) -> list[Any]:
    try:
        model = registry.load_pyfunc(uri)
        return list(pd.Series(model.predict(features)).tolist())
    except RegistryError as exc:
        raise MonitorError(f"cannot compute the champion's predictions on its reference: {exc}") from exc


def load_champion_reference(settings: Settings, registry: Registry | None = None) -> ChampionReference:
    """The current champion's reference (with its predictions), from MLflow and the local cache."""
    registry = registry or Registry.from_settings(settings)
    name = settings.mlflow.model_name
    ref = f"{name}@{CHAMPION}"
    try:
        info = registry.resolve(ref)
        schema = registry.schema(ref)
    except RegistryError as exc:
        raise MonitorError(f"no drift reference: model {ref} cannot be resolved in MLflow ({exc})") from exc
    cache = _cache_file(settings.workspace_dir, name, info.version)
    if cache.exists():
        frame = pd.read_parquet(cache)
    else:
        try:
            frame = registry.reference_sample(f"{name}/{info.version}")
        except RegistryError as exc:
            raise MonitorError(f"no drift reference for {name} v{info.version}: {exc}") from exc
        numeric, categorical = list(schema.get("numeric", [])), list(schema.get("categorical", []))
        # numeric columns as the model servers send them (float64): an MLflow signature of doubles refuses
        # int64 columns ("Can not safely convert int64 to float64"), which real tables have
        features = frame[[*numeric, *categorical]].astype({c: "float64" for c in numeric})
        frame = features.copy()
        frame[PREDICTION] = _predictions(registry, info.uri, features)
        cache.parent.mkdir(parents=True, exist_ok=True)
        frame.to_parquet(cache, index=False)
    numeric, categorical = list(schema.get("numeric", [])), list(schema.get("categorical", []))
    if not numeric and not categorical:
        raise MonitorError(f"the schema of {name} v{info.version} names no feature columns")
    kind = NUMERICAL if schema.get("task") == "regression" else CATEGORICAL
    checked_num = numeric + ([PREDICTION] if kind == NUMERICAL else [])
    checked_cat = categorical + ([PREDICTION] if kind == CATEGORICAL else [])
    profile = ReferenceProfile.build(frame, checked_num, checked_cat)
    log.info("drift reference: %s v%s, %d rows, %d columns", name, info.version, len(frame), len(checked_num + checked_cat))
    return ChampionReference(name, info.version, info.run_id or "", numeric, categorical, kind, frame, profile,
                             schema.get("classes"))


class ReferenceCache:
    """Keeps the champion's reference in memory; rebuilds it when the champion alias moves."""

    def __init__(self, settings: Settings, registry: Registry | None = None) -> None:
        self.settings = settings
        self.registry = registry or Registry.from_settings(settings)
        self._current: ChampionReference | None = None
        self._lock = threading.Lock()

    def get(self) -> ChampionReference:
        name = self.settings.mlflow.model_name
        try:
            info = self.registry.version_by_alias(name, CHAMPION)
        except RegistryError as exc:
            raise MonitorError(f"no drift reference: {exc}") from exc
        if info is None:
            raise NoChampionError(f"no drift reference: model {name!r} has no {CHAMPION!r} version in MLflow")
        with self._lock:
            if self._current is None or self._current.version != info.version:
                self._current = load_champion_reference(self.settings, self.registry)
            return self._current
