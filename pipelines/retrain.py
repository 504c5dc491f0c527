"""The retraining worker of the embedded default: ``python -m pipelines.retrain``.

The monitor's trigger (``monitoring/trigger.py``) starts it as a process of its own for one
alert that passed the guardrails. It runs the training pipeline through the runner adapter and
writes the outcome (pipeline run, state, model version) onto the alert, so the monitor keeps
ingesting while it runs and a restart of the monitor neither kills the run nor forgets it.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

from driftloop.core.config import Settings
from driftloop.core.runs import RunRequest
from monitoring.alerts import AlertStore
from monitoring.trigger import WORKER_MODULE, record_result
from pipelines.runner import runner_for

__all__ = ["main"]

log = logging.getLogger(__name__)


def main(argv: list[str] | None = None) -> None:
    """Run the training pipeline for one alert and record the outcome on it."""
    p = argparse.ArgumentParser(prog=f"python -m {WORKER_MODULE}")
    p.add_argument("--settings", required=True, type=Path)
    p.add_argument("--alert-id", required=True)
    p.add_argument("--request-id", required=True)
    p.add_argument("--store", required=True, type=Path)
    p.add_argument("--window-start")
    p.add_argument("--window-end")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    settings = Settings.model_validate(json.loads(args.settings.read_text()))
    alerts = AlertStore(args.store)
    request = RunRequest(trigger=f"drift:{args.alert_id}", window_start=args.window_start,
                         window_end=args.window_end, request_id=args.request_id)
    try:
        result = runner_for(settings).run_training(request)
        record_result(alerts, args.alert_id, result, time.time())
        log.info("alert %s: run %s %s", args.alert_id, result.run_id, result.state)
    except Exception as exc:
        alerts.update(args.alert_id, run_state="FAILED", finished=time.time(), reason=f"run failed: {exc}")
        raise
    finally:
        alerts.close()


if __name__ == "__main__":
    main()
