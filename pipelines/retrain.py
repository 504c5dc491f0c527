"""The retraining worker of the embedded default: ``python -m pipelines.retrain``.

The monitor's trigger (``monitoring/trigger.py``) starts it as a process of its own for one
alert that passed the guardrails. It runs the training pipeline through the runner adapter and
writes the outcome (pipeline run, state, model version) onto the alert, so the monitor keeps
ingesting while it runs. It dies with the monitor (``processes.spawn``; its pipeline's task
processes with it): stopped, it records the run as LOST on the alert; killed outright, the
monitor's in-flight guard marks it LOST at the next start. Either way it is never forgotten, and
the next alert may start a fresh run.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import time
from pathlib import Path

from driftloop.core.config import Settings
from driftloop.core.runs import RunRequest
from monitoring.alerts import AlertStore
from monitoring.trigger import WORKER_MODULE, record_result, trigger_of
from pipelines.runner import runner_for
from pipelines.training import run_training

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
    source = (alerts.get(args.alert_id) or {}).get("source")
    request = RunRequest(trigger=trigger_of(source, args.alert_id), window_start=args.window_start,
                         window_end=args.window_end, request_id=args.request_id)
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        result = run_training(runner_for(settings), request)
        record_result(alerts, args.alert_id, result, time.time())
        log.info("alert %s: run %s %s", args.alert_id, result.run_id, result.state)
    except KeyboardInterrupt:
        alerts.update(args.alert_id, run_state="LOST", finished=time.time(),
                      reason="run interrupted: the monitor that started it stopped")
        raise SystemExit(143) from None
    except Exception as exc:
        alerts.update(args.alert_id, run_state="FAILED", finished=time.time(), reason=f"run failed: {exc}")
        raise
    finally:
        alerts.close()


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


if __name__ == "__main__":
    main()
