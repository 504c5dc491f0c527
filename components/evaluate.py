"""Evaluate: score the new model and the serving champion on the same holdout, then gate."""

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from driftloop.core.config import higher_is_better
from driftloop.core.statistics import classification_metrics, expected_calibration_error, regression_metrics

__all__ = ["score", "gate", "Decision", "Predictions", "predict", "evaluate_models", "decision_markdown"]


@dataclass(frozen=True)
class Predictions:
    """A model's answers on a holdout: its predictions, and its class scores (``predict_proba``) where the
    model has them and the holdout has more than one class. Made once and read by :func:`score` and
    :func:`curves` (the evaluate step predicted the holdout twice, ~0.2 s at 20k rows)."""

    pred: Any
    scores: Any | None = None


def predict(model: Any, test: pd.DataFrame, *, target: str, task: str, numeric: list[str],
            categorical: list[str]) -> Predictions:
    from components.train import prepare_features

    X = prepare_features(test, numeric, categorical)
    pred = model.predict(X)
    if task == "regression":
        return Predictions(pred)
    scores = model.predict_proba(X) if hasattr(model, "predict_proba") and test[target].nunique() > 1 else None
    return Predictions(pred, scores)


def score(model: Any, test: pd.DataFrame, *, target: str, task: str, numeric: list[str], categorical: list[str],
          predictions: Predictions | None = None) -> dict[str, float]:
    """The task's metrics of ``model`` on ``test`` (``driftloop.core.statistics``, as the monitor's), from
    ``predictions`` when the caller made them already.

    Read as scikit-learn does: regression refuses non-finite values (``ValueError``), and the
    macro F1 of several classes averages over the classes present in the holdout or predictions.
    """
    if predictions is None:
        predictions = predict(model, test, target=target, task=task, numeric=numeric, categorical=categorical)
    y = test[target]
    if task == "regression":
        metrics = regression_metrics(y, predictions.pred, strict=True)
        return {key: metrics[key] for key in ("rmse", "mae", "r2")}
    classes = list(getattr(model, "classes_", sorted(pd.unique(y))))
    # AUC is undefined when a class is missing from the holdout; the other metrics stand.
    return classification_metrics(y, predictions.pred, classes, predictions.scores, macro_over_classes=False, ece=False)


@dataclass(frozen=True)
class Decision:
    passed: bool
    reason: str
    metric: str
    new_value: float
    champion_value: float | None = None
    champion_version: str | None = None
    new_metrics: dict[str, float] = field(default_factory=dict)
    champion_metrics: dict[str, float] = field(default_factory=dict)


def gate(
    new_metrics: dict[str, float],
    champion_metrics: dict[str, float] | None,
    *,
    metric: str,
    min_value: float | None = None,
    margin: float = 0.0,
    champion_version: str | None = None,
) -> Decision:
    """Decide whether the new model may go out.

    Bootstrap rule: with no champion the first model passes when it meets ``min_value``
    (or when no minimum is set). Otherwise it must meet the minimum and beat the
    champion by ``margin`` in the metric's direction (lower is better for rmse/mae).
    """
    if metric not in new_metrics:
        return Decision(False, f"metric {metric!r} could not be computed for the new model", metric, float("nan"), new_metrics=new_metrics)
    value = new_metrics[metric]
    up = higher_is_better(metric)
    cmp = ">=" if up else "<="
    if min_value is not None and not (value >= min_value if up else value <= min_value):
        return Decision(False, f"{metric} {value:.4f} misses the minimum ({cmp} {min_value})", metric, value,
                        new_metrics=new_metrics, champion_metrics=champion_metrics or {}, champion_version=champion_version)
    if not champion_metrics:
        floor = f" and meets the minimum ({cmp} {min_value})" if min_value is not None else ""
        return Decision(True, f"no champion yet: first model passes by the bootstrap rule ({metric} {value:.4f}{floor})",
                        metric, value, new_metrics=new_metrics)
    champ = champion_metrics.get(metric)
    if champ is None or (isinstance(champ, float) and math.isnan(champ)):
        return Decision(True, f"champion v{champion_version} has no {metric}; new model passes on the minimum alone",
                        metric, value, None, champion_version, new_metrics, champion_metrics)
    need = champ + margin if up else champ - margin
    ok = value >= need if up else value <= need
    delta = value - champ
    verb = "beats" if ok else "does not beat"
    reason = (f"{metric} {value:.4f} vs champion v{champion_version} {champ:.4f} (delta {delta:+.4f}); "
              f"new model {verb} the champion by the margin {margin:+g}")
    return Decision(ok, reason, metric, value, champ, champion_version, new_metrics, champion_metrics)


def evaluate_models(
    new_model: Any,
    champion: Any | None,
    test: pd.DataFrame,
    *,
    target: str,
    task: str,
    numeric: list[str],
    categorical: list[str],
    metric: str,
    min_value: float | None = None,
    margin: float = 0.0,
    champion_version: str | None = None,
    new_predictions: Predictions | None = None,
) -> Decision:
    """Score both models on the same holdout and apply the gate (``new_predictions``: the new model's, made
    by the caller already)."""
    new_metrics = score(new_model, test, target=target, task=task, numeric=numeric, categorical=categorical,
                        predictions=new_predictions)
    champion_metrics = None
    if champion is not None:
        try:
            champion_metrics = score(champion, test, target=target, task=task, numeric=numeric, categorical=categorical)
        except (ValueError, KeyError) as exc:
            # The champion cannot read this data (its schema changed): say so, judge on the minimum.
            d = gate(new_metrics, None, metric=metric, min_value=min_value, margin=margin)
            return Decision(d.passed, f"champion v{champion_version} cannot score the holdout ({exc}); {d.reason}",
                            metric, d.new_value, None, champion_version, new_metrics, {})
    return gate(new_metrics, champion_metrics, metric=metric, min_value=min_value, margin=margin, champion_version=champion_version)


def curves(model: Any, test: pd.DataFrame, *, target: str, numeric: list[str], categorical: list[str],
           predictions: Predictions | None = None) -> dict[str, Any]:
    """Confusion matrix and (binary) ROC points for the Kubeflow UI (from ``predictions`` when given)."""
    from sklearn import metrics as skm

    if predictions is None:
        predictions = predict(model, test, target=target, task="classification", numeric=numeric,
                              categorical=categorical)
    y = test[target]
    classes = list(getattr(model, "classes_", sorted(pd.unique(y))))
    out: dict[str, Any] = {
        "labels": [str(c) for c in classes],
        "confusion": skm.confusion_matrix(y, predictions.pred, labels=classes).tolist(),
    }
    if len(classes) == 2 and predictions.scores is not None and y.nunique() == 2:
        fpr, tpr, thr = skm.roc_curve(y == classes[1], predictions.scores[:, 1])
        # Keep the UI light: at most ~200 points.
        idx = np.unique(np.linspace(0, len(fpr) - 1, num=min(len(fpr), 200)).astype(int))
        thr = np.where(np.isinf(thr), 1.0, thr)
        out["roc"] = {"fpr": fpr[idx].tolist(), "tpr": tpr[idx].tolist(), "thresholds": thr[idx].tolist()}
    return out


def calibration_map(y_true: Any, scores: np.ndarray, classes: list[Any]) -> dict[str, Any]:
    """Isotonic calibration of each class's score on the holdout (one-vs-rest), as knots.

    Stored as plain lists (``x`` score → ``y`` calibrated probability, applied with ``np.interp``)
    so the monitor can calibrate live scores without scikit-learn or the model. Binary models get
    one map, for the positive class (the other is its complement).
    """
    from sklearn.isotonic import IsotonicRegression

    y = np.asarray(y_true)
    scores = np.asarray(scores, dtype=float)
    maps = []
    for j in ([1] if len(classes) == 2 else range(len(classes))):
        iso = IsotonicRegression(y_min=0.0, y_max=1.0, out_of_bounds="clip")
        iso.fit(scores[:, j], (y == classes[j]).astype(float))
        maps.append({"x": [float(v) for v in iso.X_thresholds_], "y": [float(v) for v in iso.y_thresholds_]})
    return {"method": "isotonic", "binary": len(classes) == 2, "maps": maps}


def holdout_quality(model: Any, test: pd.DataFrame, *, target: str, task: str, numeric: list[str],
                    categorical: list[str]) -> dict[str, Any]:
    """What the monitor compares live quality with: the holdout metrics of this very model.

    Regression adds the mean error (bias, prediction − truth); classification adds the expected
    calibration error of the model's top score and the isotonic calibration map fitted on the
    holdout, which the monitor uses to estimate accuracy before labels arrive (CBPE).
    """
    from components.train import prepare_features

    metrics = score(model, test, target=target, task=task, numeric=numeric, categorical=categorical)
    out: dict[str, Any] = {"task": task, "rows": int(len(test)), "metrics": metrics}
    X = prepare_features(test, numeric, categorical)
    y = test[target].to_numpy()
    pred = np.asarray(model.predict(X))
    if task == "regression":
        metrics["mean_error"] = regression_metrics(y, pred)["mean_error"]
        return out
    if not hasattr(model, "predict_proba"):
        return out
    classes = list(getattr(model, "classes_", sorted(pd.unique(y))))
    proba = np.asarray(model.predict_proba(X), dtype=float)
    top = proba.max(axis=1)
    metrics["ece"] = expected_calibration_error(pred == y, top)
    out["classes"] = [c.item() if hasattr(c, "item") else c for c in classes]
    out["calibration"] = calibration_map(y, proba, classes)
    return out


def decision_markdown(decision: Decision, *, margin: float = 0.0, min_value: float | None = None) -> str:
    """The gate's decision as a person reads it in the Kubeflow UI: verdict, reason, both models' metrics."""
    verdict = "PASSED — the new model may go out" if decision.passed else "REJECTED — nothing is registered"
    champion = f"champion v{decision.champion_version}" if decision.champion_version else "champion (none yet)"
    rule = f"gate metric `{decision.metric}` ({'higher' if higher_is_better(decision.metric) else 'lower'} is better)"
    rule += f", margin {margin:g}" + (f", minimum {min_value:g}" if min_value is not None else "")
    lines = [f"# Gate: {verdict}", "", f"**Why:** {decision.reason}", "", rule + ".", "",
             f"| metric | new model | {champion} | delta |", "| --- | ---: | ---: | ---: |"]
    for key in sorted(set(decision.new_metrics) | set(decision.champion_metrics)):
        new, old = decision.new_metrics.get(key), decision.champion_metrics.get(key)
        delta = f"{new - old:+.4f}" if new is not None and old is not None else ""
        mark = "**" if key == decision.metric else ""
        lines.append(f"| {mark}{key}{mark} | {'' if new is None else f'{new:.4f}'} | "
                     f"{'' if old is None else f'{old:.4f}'} | {delta} |")
    return "\n".join(lines) + "\n"
