"""One definition of each statistic shared by the evaluate step, the monitor, the rollout and the agent."""

from __future__ import annotations

import datetime as dt
import math
import re
from dataclasses import dataclass
from typing import Any

__all__ = ["psi", "accuracy", "f1", "roc_auc", "classification_metrics", "regression_metrics",
           "expected_calibration_error", "in_blackout",
           "BLACKOUT_WINDOW", "check_blackout_windows",
           "PairedComparison", "paired_comparison", "paired_bounds", "sequence_radius", "loss_moments",
           "non_inferiority", "effective_pairs",
           "RELATIVE_METRICS", "PLANNED_PAIRS", "MIN_EFFECTIVE_PAIRS"]


def _numeric(values: list[Any]) -> list[float] | None:
    out = []
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            return None
        out.append(float(v))
    return out


def psi(expected: list[Any], actual: list[Any], *, bins: int = 10, eps: float = 1e-4) -> float:
    """Population stability index of ``actual`` against ``expected``.

    Numeric outputs with many distinct values are binned by the expected sample's deciles;
    class labels (or few distinct values) are compared level by level.
    """
    import numpy as np

    exp_num, act_num = _numeric(expected), _numeric(actual)
    if exp_num is not None and act_num is not None and len(set(exp_num)) > bins:
        edges = np.unique(np.quantile(np.asarray(exp_num), np.linspace(0, 1, bins + 1)[1:-1]))
        e = np.bincount(np.searchsorted(edges, exp_num, side="right"), minlength=len(edges) + 1)
        a = np.bincount(np.searchsorted(edges, act_num, side="right"), minlength=len(edges) + 1)
    else:
        levels = sorted({str(v) for v in expected} | {str(v) for v in actual})
        e = np.array([sum(1 for v in expected if str(v) == lv) for lv in levels])
        a = np.array([sum(1 for v in actual if str(v) == lv) for lv in levels])
    pe = np.maximum(e / max(e.sum(), 1), eps)
    pa = np.maximum(a / max(a.sum(), 1), eps)
    return float(np.sum((pa - pe) * np.log(pa / pe)))


# -- model quality: one definition for the evaluate step (holdout) and the monitor (live windows) --
def accuracy(y_true: Any, y_pred: Any) -> float:
    """Share of predictions equal to the truth (scikit-learn's ``accuracy_score``)."""
    import numpy as np

    return float(np.mean(np.asarray(y_true) == np.asarray(y_pred)))


def f1(y_true: Any, y_pred: Any, classes: list[Any], *, macro_over_classes: bool = True) -> float:
    """F1 of the positive class ``classes[1]`` for two classes, else the macro average.

    ``macro_over_classes``: average over every class in ``classes``, a class absent from both truth
    and predictions counting 0 (the monitor's reading); False averages over the classes present in
    either (the evaluate step's).
    """
    from sklearn import metrics as skm

    if len(classes) == 2:
        return float(skm.f1_score(y_true, y_pred, pos_label=classes[1], zero_division=0))
    labels = list(classes) if macro_over_classes else None
    return float(skm.f1_score(y_true, y_pred, average="macro", labels=labels, zero_division=0))


def roc_auc(y_true: Any, scores: Any, classes: list[Any]) -> float | None:
    """ROC AUC of the scores (``n × k``, columns in ``classes`` order; one-vs-rest beyond two
    classes), or None where undefined (a class missing from the truth)."""
    from sklearn import metrics as skm

    try:
        if len(classes) == 2:
            return float(skm.roc_auc_score(y_true == classes[1], scores[:, 1]))
        return float(skm.roc_auc_score(y_true, scores, multi_class="ovr", labels=classes))
    except ValueError:
        return None


def expected_calibration_error(correct: Any, confidence: Any, bins: int = 10) -> float:
    """ECE: mean |accuracy - confidence| over equal-width confidence bins, weighted by their rows.

    The value recorded at registration (the evaluate step's holdout) and the one the monitor
    computes on labelled windows, so the two compare."""
    import numpy as np

    correct = np.asarray(correct, dtype=float)
    confidence = np.asarray(confidence, dtype=float)
    if confidence.size == 0:
        return float("nan")
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, bins - 1)
    total = 0.0
    for b in range(bins):
        mask = which == b
        if mask.any():
            total += mask.sum() * abs(correct[mask].mean() - confidence[mask].mean())
    return float(total / confidence.size)


def classification_metrics(y_true: Any, y_pred: Any, classes: list[Any], scores: Any = None, *,
                           macro_over_classes: bool = True, ece: bool = True) -> dict[str, float]:
    """Accuracy, F1 and — with scores — ROC AUC (when the truth has two classes or more) and the
    expected calibration error of the top score (``ece``). Truth and predictions must already be
    comparable values; see :func:`f1` for ``macro_over_classes``."""
    import numpy as np
    import pandas as pd

    out = {"accuracy": accuracy(y_true, y_pred), "f1": f1(y_true, y_pred, classes, macro_over_classes=macro_over_classes)}
    if scores is not None and pd.Series(np.asarray(y_true)).nunique() > 1:
        auc = roc_auc(y_true, scores, classes)
        if auc is not None:
            out["roc_auc"] = auc
    if scores is not None and ece:
        correct = (np.asarray(y_true) == np.asarray(y_pred)).astype(float)
        out["ece"] = expected_calibration_error(correct, np.asarray(scores).max(axis=1))
    return out


def regression_metrics(y_true: Any, y_pred: Any, *, strict: bool = False) -> dict[str, float]:
    """RMSE, MAE, R² and the mean error (prediction − truth).

    ``strict`` is the evaluate step's reading, scikit-learn's: empty or non-finite input raises
    ``ValueError`` and R² of a constant truth is 1.0 when every prediction is exact, else 0.0.
    Not strict (the monitor's): empty input gives ``{}``, values that overflow give inf, and R² of a
    constant truth is NaN. R² of a single row is NaN either way.
    """
    import numpy as np

    y = np.asarray(y_true, dtype=float).ravel()
    p = np.asarray(y_pred, dtype=float).ravel()
    if strict:
        if y.size == 0:
            raise ValueError(f"Found array with 0 sample(s) (shape={y.shape}) while a minimum of 1 is required.")
        for values in (y, p):
            if np.isnan(values).any():
                raise ValueError("Input contains NaN.")
            if not np.isfinite(values).all():
                raise ValueError("Input contains infinity or a value too large for dtype('float64').")
    if y.size == 0:
        return {}
    with np.errstate(over="ignore", invalid="ignore"):  # values not cleaned may overflow: inf, judged by nobody
        err = p - y
        ss_res = float(np.sum(err ** 2))
        ss_tot = float(np.sum((y - y.mean()) ** 2))
    if ss_tot > 0:
        r2 = 1.0 - ss_res / ss_tot
    elif strict and y.size > 1:
        r2 = 1.0 if ss_res == 0 else 0.0
    else:
        r2 = float("nan")
    return {"rmse": math.sqrt(ss_res / y.size), "mae": float(np.mean(np.abs(err))), "r2": r2,
            "mean_error": float(err.mean())}


# -- two models on the same labelled rows: the canary's quality verdict -----------------------------
#: Gate metrics compared as a relative change (regression, scale-free); ``r2`` is compared as RMSE:
#: on the same rows R² moves exactly as the mean squared error does.
RELATIVE_METRICS = ("rmse", "mae", "r2")
#: The number of pairs at which :func:`sequence_radius` is tightest (within 10 % of that from 150 to 2,000).
PLANNED_PAIRS = 500
#: A mean of heavy-tailed losses (squared errors of a price) is carried by a few rows: no verdict on an
#: error metric until each model's loss is spread over this many effective rows (:func:`effective_pairs`).
MIN_EFFECTIVE_PAIRS = 30


def sequence_radius(n: Any, confidence: float = 0.95, *, planned: int = PLANNED_PAIRS) -> Any:
    """How many standard errors around an estimate from ``n`` pairs each one-sided bound lies.

    The bounds form a time-uniform confidence sequence (the normal-mixture boundary of Waudby-Smith,
    Arbour, Sinha, Kennedy and Ramdas, *Time-uniform central limit theory and asymptotic confidence
    sequences*, 2024; its two-sided form at level ``2 (1 - confidence)`` read one side at a time):
    with probability ``confidence`` each bound holds at every ``n`` at once, so the controller may
    look at a growing sample every interval, as often as it likes, without its error rates growing.
    Vectorised over ``n``.
    """
    import numpy as np

    a = 2.0 * (1.0 - confidence)
    if not 0.0 < a < 1.0:
        raise ValueError(f"confidence must be between 0.5 and 1, got {confidence}")
    rho2 = (-2.0 * math.log(a) + math.log(-2.0 * math.log(a) + 1.0)) / planned
    t = np.asarray(n, dtype=float) * rho2
    return np.sqrt((t + 1.0) / t * 2.0 * np.log(np.sqrt(t + 1.0) / a))


def loss_moments(candidate_loss: Any, champion_loss: Any, *, axis: int = -1, cumulative: bool = False) -> tuple:
    """``(n, Σc, Σp, Σc², Σp², Σcp)`` of per-row losses along ``axis`` (running sums with ``cumulative``):
    all :func:`paired_bounds` needs, so a simulation can judge every prefix of a sample at once."""
    import numpy as np

    c = np.asarray(candidate_loss, dtype=float)
    p = np.asarray(champion_loss, dtype=float)
    total = (lambda x: np.cumsum(x, axis=axis)) if cumulative else (lambda x: np.sum(x, axis=axis))
    n = np.cumsum(np.ones_like(c), axis=axis) if cumulative else np.full(np.sum(c, axis=axis).shape, c.shape[axis])
    return n, total(c), total(p), total(c * c), total(p * p), total(c * p)


def effective_pairs(moments: tuple) -> Any:
    """Kish's effective sample size of each model's per-row losses, ``(Σℓ)² / Σℓ²``, the smaller of the
    two (vectorised): ``n`` when every row weighs the same, ``n/3`` for normal squared errors, ``n/28``
    for squared errors whose scale varies log-normally (σ 0.75) from row to row."""
    import numpy as np

    _, sc, sp, scc, spp, _ = (np.asarray(m, dtype=float) for m in moments)
    with np.errstate(divide="ignore", invalid="ignore"):
        ess = np.minimum(np.where(scc > 0, sc * sc / scc, np.inf), np.where(spp > 0, sp * sp / spp, np.inf))
    return float(ess) if np.ndim(ess) == 0 else ess


def paired_bounds(moments: tuple, *, relative: bool, power: float = 1.0, bounded: bool = False,
                  confidence: float = 0.95, planned: int = PLANNED_PAIRS) -> tuple[Any, Any, Any]:
    """The candidate's change against the champion, higher is better, and its two bounds, from
    :func:`loss_moments` of per-row losses (vectorised).

    ``relative``: ``1 - (mean candidate loss / mean champion loss) ** power`` (``power`` 0.5 turns
    squared errors into RMSE), bounded through the log of the ratio by the delta method (the variance
    of ``c/μc - p/μp``); otherwise the difference of mean losses, bounded on the per-row differences.
    ``bounded`` (0/1 losses): the variance counts one extra discordant pair each way, so a sample whose
    few disagreements all went one way cannot claim a near-zero variance.
    """
    import numpy as np

    n, sc, sp, scc, spp, scp = (np.asarray(m, dtype=float) for m in moments)
    k = sequence_radius(n, confidence, planned=planned)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        if relative:
            mc, mp = sc / n, sp / n
            log_ratio = power * (np.log(mc) - np.log(mp))
            z2 = scc / (n * mc * mc) + spp / (n * mp * mp) - 2.0 * scp / (n * mc * mp)  # mean of (c/μc - p/μp)², mean 0
            se = power * np.sqrt(np.maximum(z2, 0.0) / np.maximum(n - 1.0, 1.0))
            both_zero = (mc == 0) & (mp == 0)  # both perfect on every row: the same
            log_ratio = np.where(both_zero, 0.0, log_ratio)
            se = np.where(both_zero | ~np.isfinite(log_ratio), 0.0, se)
            change = 1.0 - np.exp(log_ratio)
            lower, upper = 1.0 - np.exp(log_ratio + k * se), 1.0 - np.exp(log_ratio - k * se)
        else:
            change = (sp - sc) / n
            extra = 2.0 if bounded else 0.0
            mean_d = (sc - sp) / (n + extra)
            var_d = (scc + spp - 2.0 * scp + extra) / (n + extra) - mean_d * mean_d
            se = np.sqrt(np.maximum(var_d, 0.0) / np.maximum(n + extra - 1.0, 1.0))
            lower, upper = change - k * se, change + k * se
    scalar = np.ndim(change) == 0
    return tuple(float(x) if scalar else x for x in (change, lower, upper))


@dataclass(frozen=True)
class PairedComparison:
    """The candidate against the champion on the same ``n`` labelled rows.

    ``change`` is higher-is-better: metric points (accuracy, F1, ROC AUC) or, for error metrics, the
    relative reduction ``1 - candidate/champion`` (+0.47 when RMSE falls from 133 to 70.9);
    ``lower``/``upper`` bound it, each with probability ``confidence``, at every look at once.
    """

    metric: str
    relative: bool
    n: int
    candidate: float
    champion: float
    change: float
    lower: float
    upper: float
    confidence: float
    effective: float  # error metrics: :func:`effective_pairs`; otherwise n

    def verdict(self, margin: float) -> bool | None:
        """:func:`non_inferiority` of these bounds: True, False, or None (more pairs are needed)."""
        code = non_inferiority(self.lower, self.upper, margin, effective=self.effective)
        return {1: True, -1: False, 0: None}[int(code)]


def non_inferiority(lower: Any, upper: Any, margin: float, *, effective: Any = None) -> Any:
    """The verdict on the candidate's change from its bounds (vectorised): 1 when it is not worse than
    the champion by more than ``margin`` (``lower > -margin``), -1 when it is worse (``upper < 0``),
    0 when the bounds allow both — or when ``effective`` (:func:`effective_pairs`) is under
    :data:`MIN_EFFECTIVE_PAIRS`.

    A candidate known to be worse by less than the margin passes: the margin is the worsening the
    configuration accepts. So a candidate at least as good as the champion fails only when its upper
    bound is wrong, and one worse by the margin or more passes only when its lower bound is wrong:
    each at most ``1 - confidence`` of the time, however often the growing sample is judged."""
    import numpy as np

    out = np.where(np.asarray(lower) > -margin, 1, np.where(np.asarray(upper) < 0.0, -1, 0))
    if effective is not None:
        out = np.where(np.asarray(effective) >= MIN_EFFECTIVE_PAIRS, out, 0)
    return int(out) if np.ndim(out) == 0 else out


def _correct(y_true: Any, y_pred: Any) -> Any:
    """Row by row: is the prediction the label? Numbers compare as numbers, anything else as text."""
    import numpy as np

    def number(v: Any) -> float | None:
        if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, float, np.integer, np.floating)):
            return None
        return float(v)

    out = []
    for y, p in zip(np.asarray(y_true, dtype=object).ravel(), np.asarray(y_pred, dtype=object).ravel()):
        ny, np_ = number(y), number(p)
        out.append(ny == np_ if ny is not None and np_ is not None else str(y) == str(p))
    return np.asarray(out, dtype=bool)


def _f1_influence(y: Any, pred: Any, classes: list[Any]) -> tuple[float, Any]:
    """F1 as :func:`f1` reads it, and each row's influence on it (F1 = Σa / Σb is a ratio of means)."""
    import numpy as np

    positives = [classes[1]] if len(classes) == 2 else list(classes)
    values, influence = [], np.zeros(len(y))
    for k in positives:
        is_y, is_p = _correct(y, [k] * len(y)), _correct(pred, [k] * len(y))
        a = 2.0 * (is_y & is_p)
        b = is_y.astype(float) + is_p.astype(float)
        mb = b.mean()
        value = a.sum() / b.sum() if b.sum() > 0 else 0.0
        values.append(value)
        if mb > 0:
            influence += (a - value * b) / mb
    return float(np.mean(values)), influence / len(positives)


def _auc_influence(y: Any, scores: Any, classes: list[Any]) -> tuple[float, Any] | None:
    """ROC AUC as :func:`roc_auc` reads it (one-vs-rest macro beyond two classes) and each row's
    influence (DeLong's placement values); None where a class is missing from the truth."""
    import numpy as np
    from scipy.stats import rankdata

    scores = np.asarray(scores, dtype=float)
    positives = [1] if len(classes) == 2 else list(range(len(classes)))
    values, influence = [], np.zeros(len(y))
    for j in positives:
        pos = _correct(y, [classes[j]] * len(y))
        n1, n0 = int(pos.sum()), int((~pos).sum())
        if n1 == 0 or n0 == 0:
            return None
        s = scores[:, j]
        r_all = rankdata(s)
        place = np.empty(len(y))
        place[pos] = (r_all[pos] - rankdata(s[pos])) / n0  # share of negatives below each positive
        place[~pos] = 1.0 - (r_all[~pos] - rankdata(s[~pos])) / n1  # share of positives above each negative
        value = float(place[pos].mean())
        values.append(value)
        share = np.where(pos, n1 / len(y), n0 / len(y))
        influence += (place - value) / share
    return float(np.mean(values)), influence / len(positives)


def paired_comparison(metric: str, y_true: Any, candidate: Any, champion: Any, *, classes: list[Any] | None = None,
                      candidate_scores: Any = None, champion_scores: Any = None, confidence: float = 0.95,
                      planned: int = PLANNED_PAIRS) -> PairedComparison:
    """The candidate against the champion on the gate's ``metric``, both scored on the same labelled rows.

    accuracy, rmse, mae (and r2, read as rmse) are mean losses and go through :func:`paired_bounds`;
    F1 and ROC AUC (which needs both models' class scores, columns in ``classes`` order) are bounded
    by the variance of the per-row difference of their influence functions. ``classes``: the model's
    classes (F1 and ROC AUC need them). Raises ``ValueError`` for an unknown metric, no rows, or
    ROC AUC without scores.
    """
    import numpy as np

    y = np.asarray(y_true, dtype=object).ravel()
    n = len(y)
    if n == 0:
        raise ValueError("no labelled rows to compare the two models on")
    kw = {"confidence": confidence, "planned": planned}
    if metric in RELATIVE_METRICS:
        yv = np.asarray(y, dtype=float)
        ec = np.asarray(candidate, dtype=float).ravel() - yv
        ep = np.asarray(champion, dtype=float).ravel() - yv
        squared = metric != "mae"
        lc, lp = (ec * ec, ep * ep) if squared else (np.abs(ec), np.abs(ep))
        moments = loss_moments(lc, lp)
        change, lower, upper = paired_bounds(moments, relative=True, power=0.5 if squared else 1.0, **kw)
        name = "rmse" if squared else "mae"
        value = (lambda loss: math.sqrt(loss.mean())) if squared else (lambda loss: float(loss.mean()))
        return PairedComparison(name, True, n, value(lc), value(lp), change, lower, upper, confidence,
                                effective_pairs(moments))
    if metric == "accuracy":
        lc, lp = (~_correct(y, candidate)).astype(float), (~_correct(y, champion)).astype(float)
        change, lower, upper = paired_bounds(loss_moments(lc, lp), relative=False, bounded=True, **kw)
        return PairedComparison(metric, False, n, float(1.0 - lc.mean()), float(1.0 - lp.mean()), change, lower, upper,
                                confidence, float(n))
    if metric not in ("f1", "roc_auc"):
        raise ValueError(f"no paired comparison for metric {metric!r}")
    if not classes:
        raise ValueError(f"{metric} needs the model's classes")
    if metric == "f1":
        (vc, ic), (vp, ip) = _f1_influence(y, candidate, classes), _f1_influence(y, champion, classes)
    else:
        if candidate_scores is None or champion_scores is None:
            raise ValueError("roc_auc needs both models' class scores")
        fc, fp = _auc_influence(y, candidate_scores, classes), _auc_influence(y, champion_scores, classes)
        if fc is None or fp is None:
            raise ValueError("roc_auc is undefined: a class is missing from the labels")
        (vc, ic), (vp, ip) = fc, fp
    se = float(np.std(ic - ip, ddof=1) / math.sqrt(n)) if n > 1 else 0.0
    k = float(sequence_radius(n, confidence, planned=planned))
    change = vc - vp
    return PairedComparison(metric, False, n, vc, vp, change, change - k * se, change + k * se, confidence, float(n))


# -- blackout windows: one reading for the retraining trigger and the agent ----------------------
BLACKOUT_WINDOW = re.compile(r"([01]\d|2[0-3]):[0-5]\d-([01]\d|2[0-3]):[0-5]\d")


def check_blackout_windows(windows: list[str]) -> list[str]:
    """``windows`` unchanged when each is ``HH:MM-HH:MM``; else ``ValueError`` naming the first wrong one."""
    for item in windows:
        if not BLACKOUT_WINDOW.fullmatch(item):
            raise ValueError(f"blackout window {item!r} is not HH:MM-HH:MM")
    return windows


def _minutes(hhmm: str) -> int:
    h, m = hhmm.split(":")
    return int(h) * 60 + int(m)


def in_blackout(windows: tuple[str, ...] | list[str], now: float) -> str | None:
    """The blackout window (``HH:MM-HH:MM`` UTC; ``22:00-06:00`` wraps midnight) that ``now``
    (epoch seconds) falls in, or None."""
    t = dt.datetime.fromtimestamp(now, dt.UTC)
    minute = t.hour * 60 + t.minute
    for window in windows:
        start, end = (_minutes(x) for x in window.split("-"))
        inside = start <= minute < end if start <= end else (minute >= start or minute < end)
        if inside:
            return window
    return None
