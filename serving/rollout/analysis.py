"""The analysis of one interval: the checks a canary step or a shadow phase is judged on, and the weights.

Canary steps (Flagger's analysis, judged as docs/rollouts.md "How a step is judged" states):

* minimum request count, error rate and p99 latency — hard limits;
* ``quality_delta`` — where enough labelled requests were scored by both versions
  (:mod:`serving.rollout.paired`), the candidate against the champion on the gate's metric with
  time-uniform bounds (``driftloop.core.statistics.paired_comparison``): passed when it is not worse
  by more than ``quality_margin``, failed when it is worse, no verdict (a hold) when the bounds allow
  both;
* ``prediction_psi`` — only where labels are missing: the canary's answers against the champion's
  latest ones, failing when they differ more than any of 19 earlier blocks of the champion's own
  answers do (:func:`psi_guard`).

The shadow phase (:mod:`serving.shadow`): the same errors and latency limits on mirrored requests,
agreement with the primary's answers to the same requests, output PSI and quality delta against fixed
limits. A check with too little data has the verdict ``None``: it counts as neither a pass nor a failure.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from driftloop.core.statistics import MIN_EFFECTIVE_PAIRS, psi
from serving.rollout.paired import Pairing

if TYPE_CHECKING:
    from driftloop.core.config import RolloutConfig

__all__ = ["Check", "evaluate_checks", "judge", "psi_guard", "quality_check", "shadow_checks", "weight_schedule",
           "PASS", "FAIL", "HOLD", "WAIT", "PSI_BLOCKS"]

_MIN_DISTRIBUTION_SAMPLES = 50
PSI_BLOCKS = 19  # earlier blocks of the champion's own answers: a steady canary exceeds them all 1 time in 20

# what one analysis comes to (:func:`judge`)
PASS, FAIL, HOLD, WAIT = "pass", "fail", "hold", "wait"


@dataclass(frozen=True)
class Check:
    """One check of one step: the number, the limit, and the verdict (None = not enough data)."""

    name: str
    value: float | None
    limit: float | None
    passed: bool | None
    detail: str = ""


def _health_checks(stats: dict[str, Any], cfg: RolloutConfig, *, prefix: str, counted: bool) -> list[Check]:
    """Error rate and p99 latency against their limits; no verdict until enough requests were ``counted``."""
    rate, p99 = stats.get("error_rate"), stats.get("p99_ms")
    return [Check(f"{prefix}error_rate", rate, cfg.max_error_rate,
                  None if rate is None or not counted else rate <= cfg.max_error_rate),
            Check(f"{prefix}p99_ms", p99, cfg.max_p99_latency_ms,
                  None if p99 is None or not counted else p99 <= cfg.max_p99_latency_ms)]


def quality_check(pairing: Pairing | None, cfg: RolloutConfig, note: str = "") -> Check:
    """``quality_delta``: the candidate's change against the champion on the same labelled requests
    (higher is better; limit ``-quality_margin``). Its value is set exactly when the labels decide —
    enough requests scored by both versions — and then its verdict is the comparison's
    (``PairedComparison.verdict``): True, False, or None for a hold. Without a value the labels are
    missing and :func:`psi_guard` judges instead."""
    margin, need = cfg.quality_margin, max(cfg.min_labels, 1)
    if pairing is None:
        return Check("quality_delta", None, -margin, None, note or "no labelled requests")
    skipped = "".join(f"; {n} left out: {why}" for why, n in pairing.skipped.items())
    cmp = pairing.comparison
    if cmp is None or pairing.compared < need:
        why = f"; {pairing.problem}" if pairing.problem else ""
        return Check("quality_delta", None, -margin, None, f"needs {need} labelled requests scored by both versions; "
                                                           f"{pairing.rows} labelled, {pairing.compared} scored{skipped}{why}")
    scale = "relative: 1 - candidate/champion" if cmp.relative else "points"
    numbers = (f"{cmp.metric} on the same {cmp.n} labelled requests: candidate {cmp.candidate:.4g}, champion "
               f"{cmp.champion:.4g}; change {cmp.change:+.4f} ({scale}) within [{cmp.lower:+.4f}, {cmp.upper:+.4f}] "
               f"at {cmp.confidence:.0%} each side, valid at every look{skipped}")
    if pairing.problem:
        return Check("quality_delta", cmp.change, -margin, None, f"{numbers}; no verdict: {pairing.problem}")
    verdict = cmp.verdict(margin)
    if verdict is True:
        said = f"not worse than the champion by more than {margin:g}"
    elif verdict is False:
        said = "worse than the champion"
    elif cmp.effective < MIN_EFFECTIVE_PAIRS:
        said = f"inconclusive: the error is carried by few requests ({cmp.effective:.0f} effective), more needed"
    else:
        said = "inconclusive: more labelled requests needed"
    return Check("quality_delta", cmp.change, -margin, verdict, f"{numbers}; {said}")


def psi_guard(canary: list[Any], champion: list[Any]) -> Check:
    """Where labels are missing: do the canary's answers differ from the champion's more than the
    champion's own answers do from one block of requests to the next?

    ``champion``: its latest answers, oldest first. With ``m`` = the canary's answers, at most 1/40 of
    the champion's: the newest ``len - 19 m`` of the champion's answers are the reference; the value is
    the PSI of ``m`` canary answers against it, the limit the largest PSI of the 19 blocks of ``m``
    before the reference against it. A canary answering like the champion exceeds all 19 one time in
    20 when the champion's outputs are steady, less often when they move (the blocks are older)."""
    m = min(len(canary), len(champion) // (2 * PSI_BLOCKS + 2))
    if m < _MIN_DISTRIBUTION_SAMPLES:
        return Check("prediction_psi", None, None, None,
                     f"needs {_MIN_DISTRIBUTION_SAMPLES} canary answers and {_MIN_DISTRIBUTION_SAMPLES * (2 * PSI_BLOCKS + 2)} "
                     f"of the champion's latest, has {len(canary)} and {len(champion)}")
    reference = champion[PSI_BLOCKS * m:]
    value = psi(reference, canary[:m])
    limit = max(psi(reference, champion[j * m:(j + 1) * m]) for j in range(PSI_BLOCKS))
    return Check("prediction_psi", value, limit, value <= limit,
                 f"{m} canary answers against the champion's latest {len(reference)}; limit: the largest PSI of "
                 f"{PSI_BLOCKS} earlier blocks of {m} of the champion's own answers")


def evaluate_checks(canary: dict[str, Any] | None, primary: dict[str, Any] | None, cfg: RolloutConfig, *,
                    pairing: Pairing | None = None, quality_note: str = "", champion: list[Any] | None = None
                    ) -> list[Check]:
    """The analysis of one interval: per-version stats (as ``/admin/stats`` reports them), the
    rollout's labelled requests scored by both versions (``pairing``) and the champion's latest
    answers (``champion``, oldest first) for the output-PSI guard where labels are missing."""
    canary = canary or {}
    requests = int(canary.get("requests") or 0)
    enough = requests >= cfg.min_requests
    checks = [Check("requests", requests, cfg.min_requests, enough,
                    "" if enough else f"{requests} < {cfg.min_requests} requests reached the canary")]
    checks += _health_checks(canary, cfg, prefix="", counted=enough)
    quality = quality_check(pairing, cfg, quality_note)
    if quality.value is not None:
        checks.append(Check("prediction_psi", None, None, None, "not judged: labelled requests decide"))
    else:
        checks.append(psi_guard(canary.get("predictions") or [], champion or []))
    checks.append(quality)
    return checks


def judge(checks: list[Check]) -> str:
    """What one analysis comes to: FAIL when a check failed (a hard limit broken, quality worse than
    the champion, or — labels missing — answers unlike the champion's); WAIT when too few requests
    reached the canary to judge it; HOLD when the labels decide and are inconclusive; else PASS."""
    by_name = {c.name: c for c in checks}
    if any(c.passed is False for c in checks if c.name != "requests"):
        return FAIL
    if not by_name["requests"].passed:
        return WAIT
    quality = by_name.get("quality_delta")
    if quality is not None and quality.value is not None and quality.passed is None:
        return HOLD
    return PASS


def weight_schedule(cfg: RolloutConfig) -> list[int]:
    """The canary weights, in order: ``step_weights`` or multiples of ``step_weight``, capped at ``max_weight``."""
    if cfg.step_weights:
        weights = [w for w in cfg.step_weights if w <= cfg.max_weight]
        return weights or [cfg.max_weight]
    weights = list(range(cfg.step_weight, cfg.max_weight + 1, cfg.step_weight))
    if not weights or weights[-1] != cfg.max_weight:
        weights.append(cfg.max_weight)
    return weights


def shadow_checks(summary: dict[str, Any], cfg: RolloutConfig) -> list[Check]:
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
