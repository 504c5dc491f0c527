"""The analysis of one interval: the checks a canary step or a shadow phase is judged on, and the weights.

Canary steps (Flagger's analysis): minimum request count, error rate, p99 latency, canary-vs-primary
prediction distribution (PSI) and — when labels arrived — model quality (canary − primary ≥
``min_quality_delta``). The shadow phase (:mod:`serving.shadow`): the same errors, latency, PSI and
quality limits on mirrored requests, plus agreement with the primary's answers to the same requests.
A check with too little data has the verdict ``None``: it counts as neither a pass nor a failure.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from driftloop.core.statistics import psi

__all__ = ["Check", "evaluate_checks", "shadow_checks", "weight_schedule"]

_MIN_DISTRIBUTION_SAMPLES = 50


@dataclass(frozen=True)
class Check:
    """One check of one step: the number, the limit, and the verdict (None = not enough data)."""

    name: str
    value: float | None
    limit: float | None
    passed: bool | None
    detail: str = ""


def _health_checks(stats: dict[str, Any], cfg: Any, *, prefix: str, counted: bool) -> list[Check]:
    """Error rate and p99 latency against their limits; no verdict until enough requests were ``counted``."""
    rate, p99 = stats.get("error_rate"), stats.get("p99_ms")
    return [Check(f"{prefix}error_rate", rate, cfg.max_error_rate,
                  None if rate is None or not counted else rate <= cfg.max_error_rate),
            Check(f"{prefix}p99_ms", p99, cfg.max_p99_latency_ms,
                  None if p99 is None or not counted else p99 <= cfg.max_p99_latency_ms)]


def evaluate_checks(canary: dict[str, Any] | None, primary: dict[str, Any] | None, cfg: Any) -> list[Check]:
    """The analysis of one interval from per-version stats (as ``/admin/stats`` reports them)."""
    canary = canary or {}
    primary = primary or {}
    requests = int(canary.get("requests") or 0)
    enough = requests >= cfg.min_requests
    checks = [Check("requests", requests, cfg.min_requests, enough,
                    "" if enough else f"{requests} < {cfg.min_requests} requests reached the canary")]
    checks += _health_checks(canary, cfg, prefix="", counted=enough)
    c_pred, p_pred = canary.get("predictions") or [], primary.get("predictions") or []
    if len(c_pred) >= _MIN_DISTRIBUTION_SAMPLES and len(p_pred) >= _MIN_DISTRIBUTION_SAMPLES:
        value = psi(p_pred, c_pred)
        checks.append(Check("prediction_psi", value, cfg.max_prediction_psi, value <= cfg.max_prediction_psi))
    else:
        checks.append(Check("prediction_psi", None, cfg.max_prediction_psi, None,
                            f"needs {_MIN_DISTRIBUTION_SAMPLES} predictions on each side"))
    c_q, p_q = canary.get("quality"), primary.get("quality")
    labels = min(int(canary.get("labels") or 0), int(primary.get("labels") or 0))
    if c_q is not None and p_q is not None and labels >= max(cfg.min_labels, 1):
        delta = c_q - p_q
        checks.append(Check("quality_delta", delta, cfg.min_quality_delta, delta >= cfg.min_quality_delta,
                            f"{canary.get('quality_metric')}: canary {c_q:.4f} vs primary {p_q:.4f} on {labels}+ labels"))
    else:
        checks.append(Check("quality_delta", None, cfg.min_quality_delta, None,
                            f"needs {cfg.min_labels} labels on each side"))
    return checks


def weight_schedule(cfg: Any) -> list[int]:
    """The canary weights, in order: ``step_weights`` or multiples of ``step_weight``, capped at ``max_weight``."""
    if cfg.step_weights:
        weights = [w for w in cfg.step_weights if w <= cfg.max_weight]
        return weights or [cfg.max_weight]
    weights = list(range(cfg.step_weight, cfg.max_weight + 1, cfg.step_weight))
    if not weights or weights[-1] != cfg.max_weight:
        weights.append(cfg.max_weight)
    return weights


def shadow_checks(summary: dict[str, Any], cfg: Any) -> list[Check]:
    """The shadow phase's analysis: errors, latency, agreement, output PSI and, with labels, quality."""
    requests = int(summary.get("requests") or 0)
    mirrored = requests >= cfg.shadow_min_requests
    # On a cluster the answers are joined by the monitor, behind the logger: the phase passes only
    # once that many are joined too, never on errors and latency alone.
    joined = summary.get("joined_requests")
    enough = mirrored and (joined is None or joined >= cfg.shadow_min_requests)
    detail = ("" if enough else f"{requests} < {cfg.shadow_min_requests} mirrored requests" if not mirrored else
              f"{joined} of {requests} mirrored requests joined with the primary's answer by request id "
              f"< {cfg.shadow_min_requests}")
    checks = [Check("shadow_requests", requests, cfg.shadow_min_requests, enough, detail)]
    checks += _health_checks(summary, cfg, prefix="shadow_", counted=mirrored)
    if "agreement" in summary:
        a = summary["agreement"]
        checks.append(Check("agreement", a, cfg.shadow_min_agreement, None if not enough else a >= cfg.shadow_min_agreement,
                            f"share of equal labels on {summary['rows']} rows"))
    elif summary.get("relative_diff") is not None:
        r = summary["relative_diff"]
        checks.append(Check("relative_diff", r, cfg.shadow_max_relative_diff,
                            None if not enough else r <= cfg.shadow_max_relative_diff,
                            f"mean |shadow - primary| {summary['mean_abs_diff']:.4g} on {summary['rows']} rows"))
    p, s = summary.get("primary_predictions") or [], summary.get("shadow_predictions") or []
    if len(p) >= _MIN_DISTRIBUTION_SAMPLES and len(s) >= _MIN_DISTRIBUTION_SAMPLES:
        value = psi(p, s)
        checks.append(Check("shadow_prediction_psi", value, cfg.max_prediction_psi, value <= cfg.max_prediction_psi))
    labels = int(summary.get("labels") or 0)
    if "shadow_quality" in summary and labels >= max(cfg.min_labels, 1):
        delta = summary["shadow_quality"] - summary["primary_quality"]
        checks.append(Check("shadow_quality_delta", delta, cfg.min_quality_delta, delta >= cfg.min_quality_delta,
                            f"{summary['quality_metric']}: shadow {summary['shadow_quality']:.4f} vs primary "
                            f"{summary['primary_quality']:.4f} on the same {labels} labelled rows"))
    return checks
