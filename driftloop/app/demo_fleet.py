"""``driftloop demo --fleet``: three models served at once; drift hits one, and only that one retrains and rolls out.

The fleet's own verbs, as a platform team would run them: ``driftloop run train -c FLEET`` (every model, in
parallel up to ``fleet.max_concurrent_runs``), ``driftloop serve -c FLEET`` (one gateway, the champions
packed into model servers) and ``driftloop monitor -c FLEET`` (one monitor: each model's windows, checks,
alerts and trigger) as processes, ``driftloop rollout run -c FLEET --model churn`` for the canary, and
``driftloop status -c FLEET`` for the view. The demo adds only data and production traffic:

1. three scenarios: ``churn`` and ``upsell`` (classification) and ``demand`` (regression);
2. every model is trained on the first half of its data, each its own run;
3. one gateway and one monitor serve and watch the three;
4. traffic like the training data flows to all three: no drift anywhere;
5. drifted traffic reaches churn only (the others' stays calm): the monitor flags churn's drift, the trigger
   starts churn's retraining run, which deploys the new version as churn's canary;
6. churn's canary rolls out on labelled traffic while upsell and demand keep serving; their split, version
   and answers are checked to be untouched;
7. the status view after each step, and a summary of every model's versions.

Every process it starts is stopped on the way out, Ctrl-C included.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import httpx
import pandas as pd
import yaml

from driftloop.app.demo import Demo
from driftloop.app.demo_report import Narrator, console, drift_summary, version_rows, versions_table
from driftloop.app.demo_traffic import Traffic
from driftloop.core.errors import DriftloopError
from driftloop.core.processes import free_port

__all__ = ["FleetDemo", "FLEET_PHASES", "MODELS"]

# name -> (task, scenario seed)
MODELS = {"churn": ("classification", 11), "upsell": ("classification", 23), "demand": ("regression", 37)}
DRIFTING = "churn"
# seconds each phase took in a measured run (2 shared cores): the progress line's scale
FLEET_PHASES = {"data": 2.0, "train": 40.0, "serve": 20.0, "calm": 8.0, "drift": 6.0, "retrain": 30.0,
                "rollout": 25.0, "summary": 10.0}


@dataclass
class FleetDemo(Demo):
    """The fleet demo's phases, in the order :meth:`run` takes them; what each found goes into ``facts``
    (the folder, the processes and the narration are the one-model demo's)."""

    rows: int = 8_000
    narrator: Narrator = field(default_factory=lambda: Narrator(phases=FLEET_PHASES))

    def __post_init__(self) -> None:
        super().__post_init__()
        self.traffic: dict[str, Traffic] = {}  # type: ignore[assignment] # one client per model

    def fleet(self) -> Any:
        from driftloop.core.fleet import load_fleet

        return load_fleet(self.config_path)

    def write_config(self) -> None:
        """The fleet file: three models on one gateway and one monitor (free ports); data ends now."""
        self.gateway_port, self.monitor_port = free_port(), free_port()
        end = pd.Timestamp.now(tz="UTC").floor("min")
        self.start_time = end - pd.Timedelta(days=self.days)
        self.drift_time = self.start_time + pd.Timedelta(days=self.days / 2)
        models: dict[str, Any] = {}
        for name, (task, _) in MODELS.items():
            own: dict[str, Any] = {"team": "growth" if task == "classification" else "planning",
                                   "data": {"source": str(self.workdir / "data" / f"{name}.parquet")},
                                   "model": {"task": task}}
            if task == "classification":
                own["gate"] = {"metric": "accuracy", "min_value": 0.55, "margin": 0.0}
            models[name] = own
        cfg = {
            "workspace": str(self.workdir / "ws"),
            "fleet": {"max_concurrent_runs": 3, "daily_runs": 30},
            "defaults": {
                "project": "driftloop-fleet-demo",
                "data": {"target": "label", "time_column": "event_time", "reference_size": 2000},
                "model": {"learner": "hist_gradient_boosting", "params": {"max_iter": 60}},
                "gate": {"margin": 0.0},
                "serving": {"gateway_port": self.gateway_port},
                "rollout": {"step_weights": [20, 50], "max_weight": 50, "interval_seconds": self.interval,
                            "threshold": 2, "min_requests": 10, "min_labels": 40, "max_p99_latency_ms": 1000,
                            "max_prediction_psi": 5.0, "min_quality_delta": -0.04},
                "monitor": {"port": self.monitor_port, "window_rows": 600, "min_samples": 300,
                            "check_interval_seconds": 2.0, "drift_share": 0.3,
                            "quality": {"window_rows": 100, "min_labels": 100}},
                "trigger": {"min_samples": 300, "cooldown_seconds": 900, "daily_budget": 10,
                            "recent_days": self.days / 3},
            },
            "models": models,
        }
        self.config_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        for m in self.fleet().models:
            ws = m.settings.workspace_dir
            self.traffic[m.name] = Traffic(self.gateway_port, self.monitor_port,
                                           lambda ws=ws: ws / "monitor" / "ingest.token", model=m.name,
                                           monitor_path=m.settings.monitor.base_path)

    # -- the loop ----------------------------------------------------------------------------------
    def tables(self) -> dict[str, pd.DataFrame]:
        from driftloop.app.scenario import generate

        frames = {}
        for name, (task, seed) in MODELS.items():
            df = generate(task, self.rows, start=str(self.start_time), days=self.days, drift_at=0.5, seed=seed)
            path = self.workdir / "data" / f"{name}.parquet"
            path.parent.mkdir(parents=True, exist_ok=True)
            df.to_parquet(path, index=False)
            frames[name] = df
        self.say("data", f"3 models' tables ({self.rows} rows each, {self.start_time:%Y-%m-%d} .. now): "
                         + ", ".join(f"{n} ({t})" for n, (t, _) in MODELS.items()))
        return frames

    def train(self) -> None:
        self.say("train", "driftloop run train -c fleet.yaml: one run per model, 3 at a time (kfp.local) ...")
        out = self.processes.run_cli("run", "train", "--window-end", self.drift_time.isoformat(), timeout=900)
        (self.workdir / "logs").mkdir(parents=True, exist_ok=True)
        (self.workdir / "logs" / "train.log").write_text(out)
        for line in out.splitlines():
            if line.startswith(("✓", "✗")):
                self.say("train", line.strip())
        from driftloop.core.registry import Registry

        for m in self.fleet().models:
            rows = version_rows(Registry.from_settings(m.settings), m.name)
            if not any("champion" in r.get("aliases", "") for r in rows):
                raise DriftloopError(f"{m.name} has no champion after training:\n{out[-3000:]}")
            self.facts.setdefault("champions", {})[m.name] = rows[-1]["version"] if rows else None

    def serve_and_monitor(self) -> None:
        monitor = self.processes.service("monitor", "monitor")
        serve = self.processes.service("serve", "serve", "--no-rollout")
        self.processes.wait_http(f"http://127.0.0.1:{self.monitor_port}/healthz", monitor, timeout=120)
        self.say("monitor", f"one monitor for the 3 models on http://127.0.0.1:{self.monitor_port}/models/<name>")
        self.processes.wait_http(f"http://127.0.0.1:{self.gateway_port}/admin/models", serve, timeout=180)
        with httpx.Client(timeout=10.0) as client:
            for name in MODELS:  # every model answers before traffic starts
                deadline = time.monotonic() + 120
                while client.get(f"http://127.0.0.1:{self.gateway_port}/v2/models/{name}/ready").status_code != 200:
                    if time.monotonic() > deadline:
                        raise DriftloopError(f"{name} is not ready behind the gateway:\n{serve.tail()}")
                    time.sleep(0.2)
        self.say("serve", f"one gateway for the 3 models at http://127.0.0.1:{self.gateway_port}/v1/models/<name>")

    def _calm_rows(self, name: str, frames: dict[str, pd.DataFrame], n: int = 700) -> pd.DataFrame:
        df = frames[name]
        return df[df["event_time"] < self.drift_time].tail(n)

    def calm(self, frames: dict[str, pd.DataFrame]) -> None:
        for name in MODELS:
            counts = self.traffic[name].send(self._calm_rows(name, frames), labels=False)
            outcome = self.traffic[name].check()
            self.facts.setdefault("calm", {})[name] = outcome["verdict"]
            self.say("traffic", f"{name}: {counts['ok']} rows like its training data -> [green]{outcome['verdict']}[/]"
                                f" ({drift_summary(outcome)})")
            if outcome["verdict"] == "drift":
                raise DriftloopError(f"{name}'s calm traffic was flagged as drift: {outcome}")

    def drift(self, frames: dict[str, pd.DataFrame]) -> dict[str, Any]:
        df = frames[DRIFTING]
        drifted = df[df["event_time"] >= self.drift_time + pd.Timedelta(days=self.days / 4)].tail(700)
        counts = self.traffic[DRIFTING].send(drifted, labels=False)
        outcome = self.traffic[DRIFTING].check()
        alert = outcome.get("alert") or {}
        self.say("drift", f"{DRIFTING}: {counts['ok']} drifted rows -> [red]{outcome['verdict']}[/] "
                          f"({drift_summary(outcome)})")
        if outcome["verdict"] != "drift" or not alert:
            raise DriftloopError(f"the monitor did not flag {DRIFTING}'s drifted traffic: {outcome}")
        for name in MODELS:
            if name != DRIFTING:
                self.traffic[name].send(self._calm_rows(name, frames, 300), labels=False)
                other = self.traffic[name].check()
                self.say("drift", f"{name}: still calm traffic -> [green]{other['verdict']}[/]; "
                                  f"{len(self._alerts(name))} alert(s)")
                if other["verdict"] == "drift" or self._alerts(name):
                    raise DriftloopError(f"{name} drifted or raised an alert although its traffic stayed calm")
        # The monitor's own check loop may have judged the window a moment earlier (a busy machine): the demo's
        # check then answers "duplicate" for the same alert; what the trigger decided is the stored record's.
        listed = self._alerts(DRIFTING)
        first = next((a for a in listed if a.get("id") == alert["id"]), alert)
        self.say("alert", f"{DRIFTING} alert {alert['id']}: trigger [bold]{first.get('decision')}[/] — "
                          f"{first.get('reason', '')}")
        self.facts["alert"] = first
        return first

    def _alerts(self, name: str) -> list[dict[str, Any]]:
        listed = self.traffic[name].alerts()
        return listed.get("alerts", []) if isinstance(listed, dict) else list(listed)

    def wait_retrain(self, alert_id: str, timeout: float = 300.0) -> dict[str, Any]:
        self.say("retrain", f"{DRIFTING}'s retraining run for drift:{alert_id} (kfp.local) ...")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            rec = next((a for a in self._alerts(DRIFTING) if a.get("id") == alert_id and a.get("finished")), None)
            if rec is not None:
                if rec.get("run_state") != "SUCCEEDED" or not rec.get("model_version"):
                    raise DriftloopError(f"{DRIFTING}'s retraining run did not deliver a canary: "
                                         f"{rec.get('reason') or rec.get('run_state')}")
                self.facts["retrain"] = rec
                self.say("retrain", f"run finished: {DRIFTING} v{rec['model_version']} registered and deployed as "
                                    f"{DRIFTING}'s canary; no other model retrained")
                return rec
            time.sleep(0.3)
        raise DriftloopError(f"{DRIFTING}'s retraining run did not finish in {timeout:.0f}s")

    def others_state(self) -> dict[str, Any]:
        """The split of every model but the drifting one, as the gateway has it."""
        with httpx.Client(timeout=10.0) as client:
            doc = client.get(f"http://127.0.0.1:{self.gateway_port}/admin/models").json()
        models = doc.get("models", doc)
        return {n: models.get(n) if isinstance(models, dict) else next(
            (m for m in models if m.get("name") == n), None) for n in MODELS if n != DRIFTING}

    def roll_out_drifting(self, frames: dict[str, pd.DataFrame]) -> dict[str, Any]:
        """churn's canary rolls out on labelled churn traffic while the other two keep taking calm traffic."""
        from dataclasses import asdict

        from serving.rollout import RolloutStore

        settings = self.fleet().model(DRIFTING).settings
        store = RolloutStore(settings.workspace_dir / "rollout", settings.mlflow.model_name)
        before = self.others_state()
        recent = frames[DRIFTING][frames[DRIFTING]["event_time"] >= self.drift_time]
        stop = threading.Event()
        served = {n: {"ok": 0, "error": 0} for n in MODELS}

        def flow(name: str, rows: pd.DataFrame, labels: bool) -> None:
            i = 0
            while not stop.is_set():
                counts = self.traffic[name].send(rows.iloc[i:i + 80], labels=labels, workers=2)
                for k in counts:
                    served[name][k] += counts[k]
                i = (i + 80) % max(1, len(rows) - 80)
                stop.wait(0.2)

        feeders = [threading.Thread(target=flow, args=(DRIFTING, recent, True), daemon=True)]
        feeders += [threading.Thread(target=flow, args=(n, self._calm_rows(n, frames), False), daemon=True)
                    for n in MODELS if n != DRIFTING]
        for t in feeders:
            t.start()
        try:
            output = self.processes.run_cli("rollout", "run", "--model", DRIFTING, timeout=240)
        finally:
            stop.set()
            for t in feeders:
                t.join(30)
        state = store.load()
        if state is None or not state.done:
            raise DriftloopError(f"{DRIFTING}'s rollout did not finish: {(output or '')[-2000:]}")
        colour = "green" if state.status == "promoted" else "red"
        self.say("rollout", f"{DRIFTING}: v{state.canary_version} [{colour}]{state.status}[/] — {state.reason}")
        after = self.others_state()
        for name in before:
            untouched = _split(before[name]) == _split(after[name])
            self.say("rollout", f"{name}: {served[name]['ok']} rows served meanwhile, {served[name]['error']} errors; "
                                f"split {'untouched' if untouched else 'CHANGED'} ({_split(after[name])})")
            if not untouched or served[name]["error"]:
                raise DriftloopError(f"{DRIFTING}'s rollout touched {name}: {before[name]} -> {after[name]}")
        self.facts["served_during_rollout"] = served
        return asdict(state)

    def status(self, when: str) -> None:
        """``driftloop status -c FLEET``, as a user would run it."""
        out = self.processes.run_cli("status", timeout=120)
        self.say("status", f"driftloop status ({when}):")
        console.print(out.rstrip(), markup=False, highlight=False)
        self.facts.setdefault("status", {})[when] = out

    def summary(self) -> None:
        from driftloop.core.registry import Registry

        for m in self.fleet().models:
            rows = version_rows(Registry.from_settings(m.settings), m.name)
            table = versions_table(rows)
            table.title = f"{m.name} ({m.team})"
            console.print(table)
            self.facts.setdefault("versions", {})[m.name] = rows
        console.print(f"fleet file: {self.config_path}")
        console.print(f"logs:       {self.workdir / 'logs'}")
        self.facts["seconds"] = round(self.narrator.elapsed, 1)
        (self.workdir / "summary.json").write_text(json.dumps(self.facts, indent=2, default=str))

    def close_traffic(self) -> None:
        for t in self.traffic.values():
            t.close()

    def phases(self) -> None:
        """The fleet demo's phases, in order."""
        phase = self.narrator.phase
        phase("data")
        frames = self.tables()
        phase("train")
        self.train()
        phase("serve")
        self.serve_and_monitor()
        phase("calm")
        self.calm(frames)
        self.status("calm traffic")
        phase("drift")
        alert = self.drift(frames)
        phase("retrain")
        self.wait_retrain(alert["id"])
        phase("rollout")
        self.facts["rollout"] = self.roll_out_drifting(frames)
        phase("summary")
        self.status("after churn's rollout")
        self.summary()


def _split(state: Any) -> Any:
    """The part of a model's gateway state a rollout of another model must not change."""
    if not isinstance(state, dict):
        return state
    return {k: state.get(k) for k in ("percent", "canary", "primary", "canary_percent", "split") if k in state}

