"""Simulated canaries for the quality verdict of the rollout (``driftloop.core.statistics``).

A scenario is a candidate whose true quality against the champion is known — better, the same, or
worse by the margin — and a kind of noise. Each replicate draws per-row losses of both models on the
same labelled rows; the verdict (pass / fail / hold) is taken from the same ``loss_moments`` →
``paired_bounds`` → ``non_inferiority`` path the controller takes (with ``effective_pairs`` for error metrics) (``paired_comparison`` is that path
for accuracy, RMSE and MAE), at one look of ``n`` pairs and at every look from ``n_min`` to ``n_max``
pairs, one more pair each time: the harshest sequential use the controller can make of a sample.

Classification (accuracy): the noise is how often the two models disagree on a row (the share of
rows where exactly one is right) — the only thing the paired difference sees. Regression (RMSE and
MAE): errors of the two models correlated row by row, under normal noise, Student-t(5) tails, and
heteroscedastic noise (a log-normal scale per row with σ = 0.75, a heavy tail in the squared errors).

``tests/test_canary_decision.py`` asserts the rates; ``benchmarks/bench_canary_decision.py`` prints them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from driftloop.core.statistics import effective_pairs, loss_moments, non_inferiority, paired_bounds

TRUTHS = {"better": 1.0, "same": 0.0, "worse": -1.0}  # the candidate's true change, in margins


@dataclass(frozen=True)
class Noise:
    task: str  # classification | regression
    name: str
    disagreement: float = 0.0  # classification: share of rows where exactly one model is right
    correlation: float = 0.0  # regression: of the two models' errors
    kind: str = "normal"  # regression: normal | t5 | hetero


CLASSIFICATION_NOISE = [Noise("classification", f"disagree {d:.0%}", disagreement=d) for d in (0.1, 0.2, 0.4)]
REGRESSION_NOISE = [Noise("regression", "normal, r=0.9", correlation=0.9),
                    Noise("regression", "t(5) tails, r=0.8", correlation=0.8, kind="t5"),
                    Noise("regression", "heteroscedastic, r=0.8", correlation=0.8, kind="hetero")]


def losses(noise: Noise, metric: str, change: float, n: int, reps: int, rng: np.random.Generator
           ) -> tuple[np.ndarray, np.ndarray]:
    """Per-row losses ``(candidate, champion)``, each ``reps × n``, for a candidate whose true change
    (higher is better: accuracy points, or ``1 - candidate/champion`` for RMSE and MAE) is ``change``."""
    if noise.task == "classification":
        # cells of the paired 2×2 table: only the champion right (p10), only the candidate right (p01)
        p10, p01 = (noise.disagreement - change) / 2, (noise.disagreement + change) / 2
        u = rng.random((reps, n))
        return (u < p10).astype(float), ((u >= p10) & (u < p10 + p01)).astype(float)
    z1, z2 = rng.standard_normal((reps, n)), rng.standard_normal((reps, n))
    if noise.kind == "t5":
        w = np.sqrt(rng.chisquare(5, (reps, n)) / 5)
        z1, z2 = z1 / w, z2 / w
    elif noise.kind == "hetero":
        scale = np.exp(rng.normal(0.0, 0.75, (reps, n)))
        z1, z2 = z1 * scale, z2 * scale
    r = noise.correlation
    champion = z1
    candidate = (1.0 - change) * (r * z1 + math.sqrt(1 - r * r) * z2)  # RMSE and MAE scale with the errors
    if metric == "mae":
        return np.abs(candidate), np.abs(champion)
    return candidate * candidate, champion * champion


def verdicts(noise: Noise, metric: str, truth: str, *, margin: float, n_max: int, reps: int, seed: int,
             confidence: float = 0.95) -> np.ndarray:
    """``reps × n_max`` verdicts (1 pass, -1 fail, 0 hold) after each pair: column ``n-1`` is the
    verdict on the first ``n`` pairs."""
    rng = np.random.default_rng(seed)
    lc, lp = losses(noise, metric, TRUTHS[truth] * margin, n_max, reps, rng)
    moments = loss_moments(lc, lp, cumulative=True)
    relative = noise.task == "regression"
    _, lower, upper = paired_bounds(moments, relative=relative, power=0.5 if metric == "rmse" else 1.0,
                                    bounded=not relative, confidence=confidence)
    return non_inferiority(lower, upper, margin, effective=effective_pairs(moments) if relative else None)


@dataclass(frozen=True)
class Row:
    noise: Noise
    metric: str
    truth: str
    n: int
    passed: float  # share of replicates: at one look of n pairs
    failed: float
    held: float
    ever_passed: float  # at any look from n_min to n_max pairs
    ever_failed: float

    @property
    def false_rollback(self) -> float | None:
        """A candidate at least as good as the champion failed (at one look of n pairs)."""
        return self.failed if self.truth in ("better", "same") else None

    @property
    def false_promote(self) -> float | None:
        """A candidate worse by the margin passed (at one look of n pairs)."""
        return self.passed if self.truth == "worse" else None


def table(*, margin: float, sizes: tuple[int, ...], n_min: int, n_max: int, reps: int, seed: int = 0,
          confidence: float = 0.95) -> list[Row]:
    """Every scenario at every sample size: both tasks (accuracy; RMSE and MAE), three noise levels,
    better / same / worse."""
    rows = []
    cases = [(noise, "accuracy") for noise in CLASSIFICATION_NOISE]
    cases += [(noise, metric) for metric in ("rmse", "mae") for noise in REGRESSION_NOISE]
    for i, (noise, metric) in enumerate(cases):
        for j, truth in enumerate(TRUTHS):
            v = verdicts(noise, metric, truth, margin=margin, n_max=n_max, reps=reps, seed=seed + 31 * i + j,
                         confidence=confidence)
            later = v[:, n_min - 1:]
            ever_passed, ever_failed = float((later == 1).any(axis=1).mean()), float((later == -1).any(axis=1).mean())
            for n in sizes:
                at = v[:, n - 1]
                rows.append(Row(noise, metric, truth, n, float((at == 1).mean()), float((at == -1).mean()),
                                float((at == 0).mean()), ever_passed, ever_failed))
    return rows


def render(rows: list[Row], *, n_min: int, n_max: int) -> str:
    """The table as text: one line per scenario and sample size."""
    head = (f"{'task':<15}{'metric':<9}{'noise':<24}{'truth':<7}{'n':>6}{'pass':>7}{'fail':>7}{'hold':>7}"
            f"{'false rb':>10}{'false pr':>10}   anytime {n_min}..{n_max}: pass / fail")
    lines = [head, "-" * len(head)]
    for r in rows:
        fr = f"{r.false_rollback:.3f}" if r.false_rollback is not None else "-"
        fp = f"{r.false_promote:.3f}" if r.false_promote is not None else "-"
        lines.append(f"{r.noise.task:<15}{r.metric:<9}{r.noise.name:<24}{r.truth:<7}{r.n:>6}{r.passed:>7.3f}"
                     f"{r.failed:>7.3f}{r.held:>7.3f}{fr:>10}{fp:>10}   {r.ever_passed:.3f} / {r.ever_failed:.3f}")
    return "\n".join(lines)
