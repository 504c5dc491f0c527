"""``driftloop demo``: the whole loop on the embedded default, in one command.

It drives the same CLI verbs and adapters a user would run one by one — ``run train``
through the runner adapter, ``driftloop serve`` and ``driftloop monitor`` as processes,
``driftloop rollout run`` as a process — and only adds what a user brings: data and
production traffic (with ground-truth labels arriving later as feedback).

1. a scenario (timestamped rows ending now; drift in the second half) is written as parquet;
2. a champion is trained on the first half and registered;
3. it is served (model server + gateway) and watched by the monitor;
4. traffic like the training data flows: no drift;
5. drifted traffic flows: the monitor flags drift, raises an alert, and the trigger starts
   a retraining run on recent data; the gate passes and the deploy step puts the new
   version out as a canary;
6. the rollout controller moves traffic step by step and promotes it on live numbers;
7. a second scenario: a weak model slips through a lenient gate, goes out as a canary and
   is rolled back on labelled feedback;
8. a summary table, the MLflow store and the Evidently reports.

Every process it starts is stopped on the way out, Ctrl-C included. A rerun starts clean.
This module holds the phases; :mod:`driftloop.app.demo_processes` the processes and folder,
:mod:`driftloop.app.demo_traffic` the HTTP traffic, :mod:`driftloop.app.demo_report` what is printed.
"""

from __future__ import annotations

import json
import os
import secrets
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import pandas as pd
import yaml

from driftloop.app.demo_processes import DemoProcesses
from driftloop.app.demo_report import (Narrator, console, drift_summary, quality_text, version_rows,
                                       versions_table)
from driftloop.app.demo_traffic import Traffic
from driftloop.core.errors import DriftloopError
from driftloop.core.processes import free_port

if TYPE_CHECKING:
    from driftloop.core.config import Settings

__all__ = ["Demo", "PHASES", "shown"]

# The demo's phases and the seconds each took in a measured run (2 shared cores): the progress line's scale.
PHASES = {"data": 3.0, "train": 16.0, "serve": 24.0, "calm": 7.0, "drift": 4.0, "retrain": 55.0, "rollout": 32.0,
          "weak": 34.0, "rollback": 21.0, "summary": 8.0}


# The rollout's labelled traffic: 80 rows (16 requests of 5 rows, with their labels) at most every FEED_SECONDS,
# about 80 requests/s: at a 20 % canary weight ~16 a second reach the canary (rollout.min_requests: 10 an interval).
FEED_SECONDS = 0.2


@dataclass
class Demo:
    """The demo's phases, in the order :meth:`run` takes them; what each found goes into ``facts``."""

    workdir: Path
    rows: int = 12_000
    days: float = 60.0
    interval: float = 1.0
    narrator: Narrator = field(default_factory=lambda: Narrator(phases=PHASES))
    facts: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.processes = DemoProcesses(self.workdir)

    def say(self, phase: str, text: str) -> None:
        self.narrator.say(phase, text)

    @property
    def config_path(self) -> Path:
        return self.processes.config_path

    def settings(self) -> Settings:
        return self.processes.settings()

    def write_config(self) -> None:
        """The demo's configuration, on free ports; the scenario's window ends now, drift starts half way."""
        self.gateway_port = free_port()
        self.monitor_port = free_port()
        self.traffic = Traffic(self.gateway_port, self.monitor_port,
                               lambda: self.settings().workspace_dir / "monitor" / "ingest.token")
        end = pd.Timestamp.now(tz="UTC").floor("min")
        self.start_time = end - pd.Timedelta(days=self.days)
        self.drift_time = self.start_time + pd.Timedelta(days=self.days / 2)
        cfg = {
            "project": "driftloop-demo",
            "workspace": str(self.workdir / "ws"),
            "data": {"source": str(self.workdir / "data" / "scenario.parquet"), "target": "label",
                     "time_column": "event_time", "reference_size": 2000},
            "model": {"task": "classification", "learner": "hist_gradient_boosting", "params": {"max_iter": 60}},
            "gate": {"metric": "accuracy", "min_value": 0.55, "margin": 0.0},
            "mlflow": {"experiment": "driftloop-demo", "model_name": "churn"},
            "serving": {"name": "churn", "gateway_port": self.gateway_port,
                        "logger_url": f"http://127.0.0.1:{self.monitor_port}/events"},
            "rollout": {"step_weights": [20, 50], "max_weight": 50, "interval_seconds": self.interval, "threshold": 2,
                        "min_requests": 10, "min_labels": 40, "max_p99_latency_ms": 1000,
                        "max_prediction_psi": 5.0, "min_quality_delta": -0.04},
            "monitor": {"port": self.monitor_port, "window_rows": 600, "min_samples": 300,
                        "check_interval_seconds": 2.0, "drift_share": 0.3,
                        "quality": {"window_rows": 100, "min_labels": 100}},
            "trigger": {"min_samples": 300, "cooldown_seconds": 900, "daily_budget": 10, "recent_days": self.days / 3},
        }
        self.config_path.write_text(yaml.safe_dump(cfg, sort_keys=False))

    # -- the loop ----------------------------------------------------------------------------------
    def data(self) -> pd.DataFrame:
        from driftloop.app.scenario import generate

        df = generate("classification", self.rows, start=str(self.start_time), days=self.days, drift_at=0.5, seed=11)
        path = Path(self.settings().data.source)
        path.parent.mkdir(parents=True, exist_ok=True)
        df.to_parquet(path, index=False)
        self.say("data", f"{len(df)} rows {self.start_time:%Y-%m-%d} .. now, drift from {self.drift_time:%Y-%m-%d} -> "
                         f"{shown(path)}")
        return df

    def train_champion(self) -> None:
        from pipelines.runner import RunRequest, runner_for
        from pipelines.training import run_training

        self.say("train", "training pipeline on kfp.local (first half of the data) ...")
        with self.processes.pipeline_log("champion"):
            result = run_training(runner_for(self.settings()), RunRequest(window_end=self.drift_time.isoformat()))
        if result.state != "SUCCEEDED":
            raise DriftloopError(f"champion training failed: {result.error}")
        s = result.summary
        self.facts["champion"] = s
        self.say("train", f"churn v{s['model_version']} {', '.join(s['aliases'])}: accuracy {s['metrics']['accuracy']:.3f}"
                          f" — {s['reason']}")

    def serve_and_monitor(self) -> None:
        # Both start at once (their imports and model loading share the two cores instead of following each
        # other): the gateway's inference log waits in its outbox until the monitor answers, and the two agree
        # on the workspace's ingest token whichever makes it first (driftloop.core.files.workspace_token).
        monitor = self.processes.service("monitor", "monitor")
        serve = self.processes.service("serve", "serve", "--no-rollout")
        self.processes.wait_http(f"{self.traffic.monitor}/healthz", monitor)
        self.say("monitor", f"sink + drift checks + trigger on {self.traffic.monitor}")
        self.processes.wait_http(f"{self.traffic.gateway}/admin/status", serve, timeout=90)
        self.say("serve", f"champion behind the gateway at {self.traffic.gateway}")

    def no_drift_phase(self, df: pd.DataFrame) -> None:
        calm = df[(df["event_time"] < self.drift_time)].tail(700)
        counts = self.traffic.send(calm, labels=False)
        outcome = self.traffic.check()
        self.facts["calm_check"] = outcome
        self.say("traffic", f"{counts['ok']} rows like the training data -> monitor: [green]{outcome['verdict']}[/]"
                            f" ({drift_summary(outcome)})")

    def drift_phase(self, df: pd.DataFrame) -> dict[str, Any]:
        drifted = df[df["event_time"] >= self.drift_time + pd.Timedelta(days=self.days / 4)].tail(700)
        counts = self.traffic.send(drifted, labels=False)
        outcome = self.traffic.check()
        self.facts["drift_check"] = outcome
        alert = outcome.get("alert") or {}
        self.say("drift", f"{counts['ok']} drifted rows -> monitor: [red]{outcome['verdict']}[/] ({drift_summary(outcome)})")
        if outcome["verdict"] != "drift" or not alert:
            raise DriftloopError(f"the monitor did not flag the drifted traffic: {outcome}")
        # The monitor's own check loop may have raised it a moment earlier: show the first decision.
        listed = self.traffic.alerts().get("alerts", [])
        first = next((a for a in listed if a.get("id") == alert["id"]), alert)
        self.say("alert", f"alert {alert['id']} ({len(first.get('details', {}).get('drifted_columns', []) or [])} "
                          f"columns, report {shown(first.get('report_path', alert.get('report', '')))}): trigger "
                          f"[bold]{first.get('decision')}[/] — {first.get('reason', '')}")
        self.facts["alert"] = first
        return first

    def wait_retrain(self, alert_id: str, timeout: float = 150.0) -> dict[str, Any]:
        self.say("retrain", f"retraining run for drift:{alert_id} on recent data (kfp.local) ...")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            listed = self.traffic.alerts()
            for rec in listed.get("alerts", listed if isinstance(listed, list) else []):
                if rec.get("id") == alert_id and rec.get("finished"):
                    self.facts["retrain"] = rec
                    if rec.get("run_state") != "SUCCEEDED":
                        raise DriftloopError(f"the retraining run failed: {rec.get('reason') or rec.get('run_state')}")
                    if not rec.get("model_version"):
                        raise DriftloopError("the retrained model did not pass the gate; nothing to roll out")
                    self.say("retrain", f"run finished: gate passed, churn v{rec['model_version']} registered as "
                                        "challenger and deployed as a canary")
                    return rec
            time.sleep(0.2)  # a GET /alerts costs the monitor little; the run's end is seen within 0.2 s
        raise DriftloopError(f"the retraining run for alert {alert_id} did not finish in {timeout:.0f}s")

    def rollout(self, traffic: pd.DataFrame, label: str) -> dict[str, Any]:
        """Run the controller (``driftloop rollout run``) while labelled traffic flows."""
        from dataclasses import asdict

        from serving.rollout import PENDING, RolloutStore

        settings = self.settings()
        store = RolloutStore(settings.workspace_dir / "rollout", settings.mlflow.model_name)
        stop = threading.Event()

        def flow() -> None:
            # Traffic only once the controller has started the canary steps (before, it would only compete for the
            # two cores with the controller's start), and at a bounded pace: enough labelled requests for every
            # analysis interval (rollout.min_requests at the canary's weight, min_labels), not as many as fit.
            while not stop.wait(0.05) and _status(store) == PENDING:
                pass
            i = 0
            while not stop.is_set():
                started = time.monotonic()
                self.traffic.send(traffic.iloc[i:i + 80], labels=True, workers=2)
                i = (i + 80) % max(1, len(traffic) - 80)
                stop.wait(max(0.0, FEED_SECONDS - (time.monotonic() - started)))

        feeder = threading.Thread(target=flow, daemon=True)
        feeder.start()
        try:
            output = self.processes.run_cli("rollout", "run", timeout=180)
        finally:
            stop.set()
            feeder.join(30)
        state = store.load()
        if state is None or not state.done:
            raise DriftloopError(f"the rollout did not finish: {(output or '')[-2000:]}")
        colour = "green" if state.status == "promoted" else "red"
        self.say("rollout", f"{label}: v{state.canary_version} [{colour}]{state.status}[/] — {state.reason}")
        from driftloop.app.serving_cli import StepLines

        last = None
        for step in state.history:
            key = (step.get("decision"), step.get("weight"))
            if key != last or key[0] not in StepLines.QUIET_REPEATS:  # a repeated wait changes nothing
                self.say("", f"  {step.get('weight'):>3}%  {step.get('decision'):<8} {step.get('reason', '')}")
            last = key
        return asdict(state)

    def bad_candidate(self) -> None:
        from driftloop.core.config import load_settings
        from pipelines.runner import RunRequest, runner_for
        from pipelines.training import run_training

        lenient = load_settings(self.config_path, overrides={"gate.margin": -1.0, "gate.min_value": 0.0,
                                                             "model.learner": "linear",
                                                             "model.params": {"C": 0.0001}})
        self.say("train", "a weak candidate (tiny linear model, lenient gate) — it should not survive the rollout ...")
        with self.processes.pipeline_log("weak-candidate"):
            result = run_training(runner_for(lenient), RunRequest(
                window_start=(pd.Timestamp.now(tz="UTC") - pd.Timedelta(days=self.days / 3)).isoformat()))
        if result.state != "SUCCEEDED" or "model_version" not in result.summary:
            raise DriftloopError(f"the weak candidate was not registered: {result.error or result.summary}")
        self.facts["weak"] = result.summary
        self.say("train", f"churn v{result.summary['model_version']}: accuracy {result.summary['metrics']['accuracy']:.3f}"
                          " — deployed as a canary by the pipeline's deploy step")

    def summary(self) -> None:
        from driftloop.core.registry import Registry

        s = self.settings()
        rows = version_rows(Registry.from_settings(s), "churn")
        console.print(versions_table(rows))
        reports = sorted((s.workspace_dir / "monitor" / "reports").glob("*/*.html"))
        drift = [shown(r) for r in reports if r.name == "drift.html"]
        others = len(reports) - len(drift)
        console.print(f"MLflow:            mlflow ui --backend-store-uri {s.tracking_uri}")
        console.print(f"Evidently reports: {', '.join(drift) or '-'}"
                      + (f" and {others} quality report{'s' if others != 1 else ''} beside it" if others else ""))
        console.print(f"quality:           {self.quality_line()}")
        console.print(f"logs:              {shown(self.workdir / 'logs')}")
        console.print(f"lineage:           driftloop lineage churn@champion -c {shown(self.config_path)}")
        self.facts["versions"] = rows
        self.facts["reports"] = [str(r) for r in reports]
        self.facts["tracking_uri"] = s.tracking_uri
        self.facts["seconds"] = round(self.narrator.elapsed, 1)
        (self.workdir / "summary.json").write_text(json.dumps(self.facts, indent=2, default=str))

    def quality_line(self) -> str:
        """The monitor's quality check on the labels that flowed through the gateway (:func:`quality_text`)."""
        try:
            outcome = self.traffic.quality_check()
        except httpx.HTTPError as exc:
            return f"not available ({exc})"
        self.facts["quality"] = outcome
        return quality_text(outcome)

    def run(self) -> None:
        # One admin token for the demo's gateway and everything that changes its traffic (the deploy step in
        # the monitor's retraining worker, the rollout controller): made here, handed down in the environment.
        os.environ.setdefault("DRIFTLOOP_GATEWAY_TOKEN", secrets.token_urlsafe(24))
        self.processes.prepare()
        self.write_config()
        try:
            self.phases()
        finally:
            self.processes.stop()
            self.close_traffic()
            self.narrator.close()
            self.say("done", f"all processes stopped; {self.narrator.elapsed:.0f}s in all (seconds a phase: "
                             f"{self.narrator.timings()}; load average {_load_average()})")

    def close_traffic(self) -> None:
        if hasattr(self, "traffic"):
            self.traffic.close()

    def phases(self) -> None:
        """The demo's phases, in order."""
        phase = self.narrator.phase
        phase("data")
        df = self.data()
        phase("train")
        self.train_champion()
        phase("serve")
        self.serve_and_monitor()
        phase("calm")
        self.no_drift_phase(df)
        phase("drift")
        alert = self.drift_phase(df)
        phase("retrain")
        self.wait_retrain(alert["id"])
        recent = df[df["event_time"] >= self.drift_time]
        phase("rollout")
        self.facts["rollout_good"] = self.rollout(recent, "retrained model")
        phase("weak")
        self.bad_candidate()
        phase("rollback")
        self.facts["rollout_bad"] = self.rollout(recent, "weak model")
        phase("summary")
        self.summary()


def _status(store: Any) -> str:
    """A rollout's status as its store has it now (pending while there is none or it cannot be read yet)."""
    from serving.rollout import PENDING

    try:
        state = store.load()
    except DriftloopError:
        return PENDING
    return state.status if state is not None else PENDING


def _load_average() -> str:
    try:
        return " ".join(f"{v:.2f}" for v in os.getloadavg()) + f", {os.cpu_count()} cores"
    except OSError:
        return "unknown"


def shown(path: str | Path) -> str:
    """A path as printed: relative to the current folder when it lies under it (``make demo``'s
    ``.driftloop/demo/…``), else as it is."""
    text = str(path)
    try:
        return str(Path(text).resolve().relative_to(Path.cwd())) if text else text
    except ValueError:
        return text
