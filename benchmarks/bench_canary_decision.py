"""The canary's quality verdict, simulated: the table of docs/rollouts.md ("What the rule gets wrong").

Better / same / worse candidates (by ``rollout.quality_margin``) for classification (accuracy, three
disagreement rates) and regression (RMSE and MAE; normal, Student-t(5) and heteroscedastic noise), at
several numbers of labelled pairs: the share of replicates that pass, fail and hold at one look of ``n``
pairs, the false-rollback rate (a candidate at least as good failing) and the false-promote rate (one
worse by the margin passing), and — last column — the same over every look from ``--n-min`` to
``--n-max`` pairs, one more pair at a time. See tests/canary_simulation.py for the scenarios.

    python benchmarks/bench_canary_decision.py                    # the defaults: 4,000 replicates, 5,000 pairs
    python benchmarks/bench_canary_decision.py --reps 1000 --margin 0.02
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from driftloop.core.config import RolloutConfig  # noqa: E402
from tests.canary_simulation import render, table  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    defaults = RolloutConfig()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=4000)
    parser.add_argument("--margin", type=float, default=defaults.quality_margin)
    parser.add_argument("--confidence", type=float, default=defaults.confidence)
    parser.add_argument("--n-min", type=int, default=defaults.min_labels)
    parser.add_argument("--n-max", type=int, default=5000)
    parser.add_argument("--sizes", default="100,200,500,1000,2000,5000")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    sizes = tuple(n for n in (int(x) for x in args.sizes.split(",")) if args.n_min <= n <= args.n_max)
    t0 = time.perf_counter()
    rows = table(margin=args.margin, sizes=sizes, n_min=args.n_min, n_max=args.n_max, reps=args.reps, seed=args.seed,
                 confidence=args.confidence)
    print(f"margin {args.margin:g}, confidence {args.confidence:g} each side, {args.reps} replicates")
    print(render(rows, n_min=args.n_min, n_max=args.n_max))
    rollback = max(r.ever_failed for r in rows if r.truth != "worse")
    promote = max(r.ever_passed for r in rows if r.truth == "worse")
    print(f"\nworst false-rollback rate over every look from {args.n_min} pairs: {rollback:.3f}; "
          f"worst false-promote rate: {promote:.3f} ({time.perf_counter() - t0:.0f}s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
