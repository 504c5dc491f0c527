"""The canary's quality verdict, simulated: better / same / worse candidates at several sample sizes and
noise levels for both tasks, and the false-rollback and false-promote rates the rule gives.

The rule (docs/rollouts.md, "How a step is judged"): the candidate's change against the champion on the
same labelled requests, bounded by a time-uniform confidence sequence at ``rollout.confidence`` each side;
pass when not worse by more than ``rollout.quality_margin``, fail when worse, hold otherwise — judged from
``rollout.min_labels`` labelled pairs on. A failure of a candidate at least as good as the champion is a
false rollback; a pass of one worse by the margin, a false promote. Both must stay at or under 5 % at the
documented minimum of pairs — at that one look, and over every look after it, one more pair at a time.
``python benchmarks/bench_canary_decision.py`` prints the full table (more replicates, up to 5,000 pairs).
"""

from __future__ import annotations

import pytest

from driftloop.core.config import RolloutConfig
from tests.canary_simulation import CLASSIFICATION_NOISE, REGRESSION_NOISE, table, verdicts

DEFAULTS = RolloutConfig()
N_MIN = DEFAULTS.min_labels  # the documented minimum of labelled pairs
N_MAX = 2_000
REPS = 800


@pytest.fixture(scope="module")
def rows():
    return table(margin=DEFAULTS.quality_margin, sizes=(N_MIN, 500, N_MAX), n_min=N_MIN, n_max=N_MAX, reps=REPS,
                 seed=2024, confidence=DEFAULTS.confidence)


def test_the_documented_defaults_are_the_ones_simulated():
    # docs/rollouts.md states the table for these; changing a default means simulating it again
    assert (DEFAULTS.min_labels, DEFAULTS.quality_margin, DEFAULTS.confidence) == (100, 0.05, 0.95)


def test_false_rollbacks_and_false_promotes_stay_under_5_percent_from_the_minimum_of_pairs(rows):
    worst_rollback = max((r for r in rows if r.truth != "worse"), key=lambda r: r.ever_failed)
    worst_promote = max((r for r in rows if r.truth == "worse"), key=lambda r: r.ever_passed)
    assert worst_rollback.ever_failed <= 0.05, worst_rollback
    assert worst_promote.ever_passed <= 0.05, worst_promote
    at_minimum = [r for r in rows if r.n == N_MIN]
    assert len(at_minimum) == 3 * (len(CLASSIFICATION_NOISE) + 2 * len(REGRESSION_NOISE))  # every scenario
    for r in at_minimum:
        assert (r.false_rollback or 0.0) <= 0.05 and (r.false_promote or 0.0) <= 0.05, r


def test_the_rule_decides_with_enough_pairs(rows):
    """Not a rule that never errs because it never decides: with 2,000 pairs under moderate noise a
    better candidate is promoted and one worse by the margin rolled back nearly always."""
    moderate = {"disagree 10%", "disagree 20%", "normal, r=0.9"}
    for r in rows:
        if r.n == N_MAX and r.noise.name in moderate:
            if r.truth == "better":
                assert r.passed >= 0.95, r
            if r.truth == "worse" and (r.metric, r.noise.name) != ("accuracy", "disagree 40%"):
                assert r.failed >= 0.9, r
    # at the minimum most decisions wait for more pairs: holding is what keeps the error rates down
    assert all(r.held >= 0.5 for r in rows if r.n == N_MIN and r.truth == "same")


def test_without_the_effective_sample_floor_heavy_tails_break_the_rmse_rate(monkeypatch):
    """Why the verdict on an error metric waits for 30 effective pairs (``effective_pairs``): squared
    errors whose scale varies from row to row are carried by a few rows, and bounds judged on them from
    the first 100 pairs fail a same-quality candidate too often."""
    from driftloop.core import statistics

    hetero = REGRESSION_NOISE[2]
    with_floor = verdicts(hetero, "rmse", "same", margin=0.05, n_max=3000, reps=600, seed=7)
    monkeypatch.setattr(statistics, "MIN_EFFECTIVE_PAIRS", 0)
    without = verdicts(hetero, "rmse", "same", margin=0.05, n_max=3000, reps=600, seed=7)
    rate = lambda v: float((v[:, N_MIN - 1:] == -1).any(axis=1).mean())  # noqa: E731
    assert rate(with_floor) <= 0.05 < rate(without), (rate(with_floor), rate(without))
