"""The canary's quality on the same labelled requests: every labelled request of the rollout, scored by
both versions, the candidate against the champion on the gate's metric.

The monitor's inference log holds each request's features and the label posted for it, in both homes
(the local gateway forwards labels to the monitor; on a cluster they are posted there), and returns them
from ``GET /labelled`` (:class:`~serving.rollout.metrics.MonitorLabelled`). Whichever version served a
request, :class:`RegistryScorer` loads both versions from the MLflow registry by version — as their model
servers load them, through :class:`serving.predictor.DriftloopModel`, with its signature check and predict
path — and asks each for its answer. So every labelled request is a pair, the traffic split does not
decide which requests a version is judged on, and no gateway or InferenceService has to mirror anything.

A version's re-scored answer to a request it served must be the answer the log holds; where more than
:data:`MAX_MISMATCH` of them differ, the log is not what the model server saw (or the model is not
deterministic) and the comparison gives no verdict.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

from driftloop.core.statistics import PairedComparison, paired_comparison

__all__ = ["Answers", "Scorer", "RegistryScorer", "Pairing", "compare_versions", "MAX_MISMATCH"]

log = logging.getLogger(__name__)

MAX_MISMATCH = 0.01  # share of re-scored answers that may differ from the logged ones
_BATCH = 5_000


@dataclass(frozen=True)
class Answers:
    """One version's answers to rows: predictions, and for a classifier its class scores and classes."""

    predictions: list[Any]
    scores: Any = None  # n × k, columns in ``classes`` order
    classes: list[Any] | None = None


class Scorer(Protocol):
    """Answers of a model version to rows of features (``{column: value}``): ``ValueError`` when the
    version cannot answer them, ``ServingError`` when it cannot be loaded now."""

    def answers(self, version: str, rows: list[dict[str, Any]]) -> Answers: ...


class RegistryScorer:
    """Model versions loaded from the MLflow registry by version, answering as their model servers do."""

    def __init__(self, model_name: str, tracking_uri: str | None = None) -> None:
        self.model_name = model_name
        self.tracking_uri = tracking_uri
        self._models: dict[str, Any] = {}
        self._lock = threading.Lock()  # one load at a time: a preload and an analysis never load a version twice

    def _model(self, version: str) -> Any:
        with self._lock:
            model = self._models.get(version)
            if model is None:
                from serving.predictor import DriftloopModel

                model = DriftloopModel(self.model_name, f"models:/{self.model_name}/{version}", self.tracking_uri)
                model.load()  # ServingError naming the URI when it cannot be loaded
                self._models[version] = model
                while len(self._models) > 2:  # a rollout compares two versions; older ones go
                    self._models.pop(next(iter(self._models)))
            return model

    def preload(self, versions: Iterable[str]) -> threading.Thread:
        """Load the versions in a background thread, so the first analysis with enough labels does not wait
        for MLflow, scikit-learn and both models (seconds) while the canary takes traffic. A version that
        cannot be loaded is left alone here: the analysis that needs it says why (``ServingError``)."""
        wanted = [str(v) for v in versions]

        def load() -> None:
            for version in wanted:
                try:
                    self._model(version)
                except Exception as exc:  # noqa: BLE001 - reported by the analysis that needs the version
                    log.debug("preloading %s v%s: %s", self.model_name, version, exc)

        thread = threading.Thread(target=load, name=f"preload-{self.model_name}", daemon=True)
        thread.start()
        return thread

    def answers(self, version: str, rows: list[dict[str, Any]]) -> Answers:
        import numpy as np
        from kserve.errors import InvalidInput

        from serving.predictor import SCORES_HEADER, SCORES_OUTPUT

        model = self._model(version)
        predictions: list[Any] = []
        scores: list[Any] = []
        classes = None
        for start in range(0, len(rows), _BATCH):
            try:
                out = model.predict({"instances": rows[start:start + _BATCH]}, headers={SCORES_HEADER: "1"})
            except InvalidInput as exc:  # a lasting state (the versions take different columns), not an outage
                raise ValueError(f"version {version} cannot answer the logged requests: {exc}") from exc
            predictions += out["predictions"]
            if SCORES_OUTPUT in out:
                scores += out[SCORES_OUTPUT]
                classes = out.get("classes")
        return Answers(predictions, np.asarray(scores, dtype=float) if scores else None, classes)


@dataclass
class Pairing:
    """What came of pairing a window's labelled rows: the comparison, and the rows counted by fate."""

    comparison: PairedComparison | None = None
    rows: int = 0  # labelled rows read
    compared: int = 0  # rows both versions answered with a usable label
    mismatched: int = 0  # served rows whose re-scored answer differs from the logged one
    served: int = 0  # rows served by one of the two versions (the mismatch share's base)
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> rows left out
    problem: str | None = None  # why there is no verdict although rows were read

    @property
    def mismatch_share(self) -> float:
        return self.mismatched / self.served if self.served else 0.0

    def skip(self, reason: str) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1


def _unwrap(value: Any) -> Any:
    return value[0] if isinstance(value, list) and len(value) == 1 else value


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    v = float(value)
    return v if math.isfinite(v) else None


def _same_answer(a: Any, b: Any, regression: bool) -> bool:
    a, b = _unwrap(a), _unwrap(b)
    x, y = _number(a), _number(b)
    if regression:
        return x is not None and y is not None and math.isclose(x, y, rel_tol=1e-6, abs_tol=1e-9)
    return x == y if x is not None and y is not None else str(a) == str(b)


def compare_versions(rows: list[dict[str, Any]], scorer: Scorer, *, candidate: str, champion: str, metric: str,
                     task: str, confidence: float = 0.95) -> Pairing:
    """Both versions' answers to the labelled ``rows`` (as :class:`~serving.rollout.metrics.MonitorLabelled`
    returns them), compared on ``metric`` (the gate's). A version that cannot answer the logged requests
    leaves no comparison and says why (``problem``); ``ServingError`` when one cannot be loaded now."""
    import numpy as np

    regression = task == "regression"
    out = Pairing(rows=len(rows))
    usable, labels = [], []
    for row in rows:
        label = _unwrap(row.get("label"))
        if not isinstance(row.get("features"), dict):
            out.skip("no features")
        elif label is None or (regression and _number(label) is None):
            out.skip("label unusable")
        else:
            usable.append(row)
            labels.append(_number(label) if regression else label)
    if not usable:
        return out
    try:
        got = {v: scorer.answers(v, [r["features"] for r in usable]) for v in (candidate, champion)}
    except ValueError as exc:
        out.problem = str(exc)
        return out
    keep = []
    for i, row in enumerate(usable):
        served = str(row.get("version"))
        if served in got:
            out.served += 1
            out.mismatched += not _same_answer(got[served].predictions[i], row.get("prediction"), regression)
        if regression and any(_number(_unwrap(got[v].predictions[i])) is None for v in got):
            out.skip("prediction not finite")
            continue
        keep.append(i)
    out.compared = len(keep)
    if not keep:
        return out
    cand, champ = got[candidate], got[champion]
    if metric == "roc_auc" and cand.classes != champ.classes:
        out.problem = f"the two versions score different classes ({cand.classes} vs {champ.classes})"
        return out
    idx = np.asarray(keep)
    y = [labels[i] for i in keep]
    pred_c, pred_p = [_unwrap(cand.predictions[i]) for i in keep], [_unwrap(champ.predictions[i]) for i in keep]
    # a classifier without class scores: its classes are those seen, sorted as scikit-learn sorts classes_
    classes = cand.classes or champ.classes or (None if regression else sorted({*y, *pred_c, *pred_p}, key=str))
    try:
        out.comparison = paired_comparison(
            metric, y, pred_c, pred_p, classes=classes,
            candidate_scores=cand.scores[idx] if cand.scores is not None else None,
            champion_scores=champ.scores[idx] if champ.scores is not None else None, confidence=confidence)
    except ValueError as exc:
        out.problem = str(exc)
    if out.mismatch_share > MAX_MISMATCH:
        out.problem = (f"{out.mismatched} of {out.served} re-scored answers differ from the logged ones: the log "
                       "is not what the model servers answered")
    return out
