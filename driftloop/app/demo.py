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
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import httpx
import pandas as pd
import typer
import yaml
from rich.console import Console
from rich.table import Table

from driftloop.core.errors import DriftloopError
from driftloop.core.processes import free_port, spawn, stop_process

__all__ = ["demo_cmd", "Demo"]

console = Console(highlight=False)


@dataclass
class Service:
    """A driftloop CLI verb running as a process of its own (own session, so it can be stopped whole)."""

    name: str
    args: list[str]
    log_path: Path
    proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        out = open(self.log_path, "ab")
        self.proc = spawn([sys.executable, "-m", "driftloop.app.cli", *self.args], stdout=out,
                          stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        out.close()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 15.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        stop_process(self.proc.pid, timeout)
        self.proc.wait(5)

    def tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


@dataclass
class Demo:
    workdir: Path
    rows: int = 12_000
    days: float = 60.0
    interval: float = 1.0
    started: float = field(default_factory=time.monotonic)
    services: list[Service] = field(default_factory=list)
    facts: dict[str, Any] = field(default_factory=dict)

    # -- plumbing ------------------------------------------------------------------------------
    def say(self, phase: str, text: str) -> None:
        console.print(f"[dim]{time.monotonic() - self.started:6.1f}s[/] [bold cyan]{phase:<9}[/] {text}")

    @property
    def config_path(self) -> Path:
        return self.workdir / "driftloop.yaml"

    def cli(self, *args: str) -> list[str]:
        return [*args, "-c", str(self.config_path)]

    def prepare(self) -> None:
        """Clean start: stop what an interrupted earlier demo left running, wipe its workspace."""
        from serving.local_backend import LocalBackend

        if self.config_path.exists():
            with contextlib.suppress(Exception):
                LocalBackend(self.settings()).stop()
        for pid_file in self.workdir.glob("*.pid"):
            with contextlib.suppress(Exception):
                os.killpg(int(pid_file.read_text()), signal.SIGTERM)
        if self.workdir.exists():
            shutil.rmtree(self.workdir)
        self.workdir.mkdir(parents=True)

    def write_config(self) -> None:
        self.gateway_port = free_port()
        self.monitor_port = free_port()
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

    def settings(self):
        from driftloop.core.config import load_settings

        return load_settings(self.config_path)

    def service(self, name: str, *args: str) -> Service:
        svc = Service(name, self.cli(*args), self.workdir / "logs" / f"{name}.log")
        svc.start()
        self.services.append(svc)
        (self.workdir / f"{name}.pid").write_text(str(svc.proc.pid))
        return svc

    def wait_http(self, url: str, svc: Service, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not svc.alive():
                raise DriftloopError(f"{svc.name} exited early:\n{svc.tail()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(url, timeout=2.0).status_code < 500:
                    return
            time.sleep(0.3)
        raise DriftloopError(f"{svc.name} did not become ready at {url} within {timeout:.0f}s:\n{svc.tail()}")

    def stop(self) -> None:
        from serving.local_backend import LocalBackend

        for svc in reversed(self.services):
            svc.stop()
        with contextlib.suppress(Exception):
            LocalBackend(self.settings()).stop()
        for pid_file in self.workdir.glob("*.pid"):
            pid_file.unlink(missing_ok=True)

    # -- the loop ----------------------------------------------------------------------------------
    def data(self) -> pd.DataFrame:
        from driftloop.app.scenario import generate

        df = generate("classification", self.rows, start=str(self.start_time), days=self.days, drift_at=0.5, seed=11)
        path = Path(self.settings().data.source)
        path.parent.mkdir(parents=True, exist_ok=True)
        df.to_parquet(path, index=False)
        self.say("data", f"{len(df)} rows {self.start_time:%Y-%m-%d} .. now, drift from {self.drift_time:%Y-%m-%d} -> {path}")
        return df

    def train_champion(self) -> None:
        from pipelines.runner import RunRequest, runner_for

        self.say("train", "training pipeline on kfp.local (first half of the data) ...")
        with self.pipeline_log("champion"):
            result = runner_for(self.settings()).run_training(RunRequest(window_end=self.drift_time.isoformat()))
        if result.state != "SUCCEEDED":
            raise DriftloopError(f"champion training failed: {result.error}")
        s = result.summary
        self.facts["champion"] = s
        self.say("train", f"churn v{s['model_version']} {', '.join(s['aliases'])}: accuracy {s['metrics']['accuracy']:.3f}"
                          f" — {s['reason']}")

    @contextlib.contextmanager
    def pipeline_log(self, name: str) -> Iterator[None]:
        """kfp.local prints every task's executor input and logs; keep them in a file, show progress only."""
        path = self.workdir / "logs" / f"pipeline-{name}.log"
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as fh, contextlib.redirect_stdout(fh), contextlib.redirect_stderr(fh):
            yield

    def serve_and_monitor(self) -> None:
        monitor = self.service("monitor", "monitor")
        self.wait_http(f"http://127.0.0.1:{self.monitor_port}/healthz", monitor)
        self.say("monitor", f"sink + drift checks + trigger on http://127.0.0.1:{self.monitor_port}")
        serve = self.service("serve", "serve", "--no-rollout")
        self.wait_http(f"{self.gateway}/admin/status", serve, timeout=90)
        self.say("serve", f"champion behind the gateway at {self.gateway}")

    @property
    def gateway(self) -> str:
        return f"http://127.0.0.1:{self.gateway_port}"

    def send(self, frame: pd.DataFrame, *, labels: bool = True, workers: int = 4, batch: int = 5) -> dict[str, int]:
        """Production traffic through the gateway: V1 requests of ``batch`` rows; labels arrive as feedback."""
        from driftloop.app.scenario import FEATURES_CATEGORICAL, FEATURES_NUMERIC

        features = frame[FEATURES_NUMERIC + FEATURES_CATEGORICAL].astype(object).where(frame.notna(), None)
        rows = features.to_dict(orient="records")
        truth = frame["label"].tolist()
        url = f"{self.gateway}/v1/models/churn:predict"
        counts = {"ok": 0, "error": 0}
        lock = threading.Lock()
        batches = [(i, min(i + batch, len(rows))) for i in range(0, len(rows), batch)]

        auth = self.monitor_auth()  # the gateway's /feedback takes the same ingest token

        def worker(mine: list[tuple[int, int]]) -> None:
            with httpx.Client(timeout=10.0) as client:
                for lo, hi in mine:
                    try:
                        r = client.post(url, json={"instances": rows[lo:hi]})
                        ok = r.status_code == 200
                        if ok and labels:
                            client.post(f"{self.gateway}/feedback",
                                        json={"id": r.headers.get("x-request-id"), "label": truth[lo:hi]},
                                        headers=auth)
                    except httpx.HTTPError:
                        ok = False
                    with lock:
                        counts["ok" if ok else "error"] += hi - lo

        threads = [threading.Thread(target=worker, args=(batches[i::workers],), daemon=True) for i in range(workers)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return counts

    def monitor_auth(self) -> dict[str, str]:
        """The ingest token the monitor's POST /check and /quality/check and the gateway's /feedback need (env,
        else the workspace's file)."""
        from driftloop.core.files import workspace_token

        token = workspace_token(self.settings().workspace_dir / "monitor" / "ingest.token", "DRIFTLOOP_INGEST_TOKEN")
        return {"authorization": f"Bearer {token}"}

    def check(self) -> dict[str, Any]:
        r = httpx.post(f"http://127.0.0.1:{self.monitor_port}/check", timeout=120.0, headers=self.monitor_auth())
        r.raise_for_status()
        return r.json()

    def no_drift_phase(self, df: pd.DataFrame) -> None:
        calm = df[(df["event_time"] < self.drift_time)].tail(700)
        counts = self.send(calm, labels=False)
        outcome = self.check()
        self.facts["calm_check"] = outcome
        self.say("traffic", f"{counts['ok']} rows like the training data -> monitor: [green]{outcome['verdict']}[/]"
                            f" ({_drift_summary(outcome)})")

    def drift_phase(self, df: pd.DataFrame) -> dict[str, Any]:
        drifted = df[df["event_time"] >= self.drift_time + pd.Timedelta(days=self.days / 4)].tail(700)
        counts = self.send(drifted, labels=False)
        outcome = self.check()
        self.facts["drift_check"] = outcome
        alert = outcome.get("alert") or {}
        self.say("drift", f"{counts['ok']} drifted rows -> monitor: [red]{outcome['verdict']}[/] ({_drift_summary(outcome)})")
        if outcome["verdict"] != "drift" or not alert:
            raise DriftloopError(f"the monitor did not flag the drifted traffic: {outcome}")
        # The monitor's own check loop may have raised it a moment earlier: show the first decision.
        listed = httpx.get(f"http://127.0.0.1:{self.monitor_port}/alerts", timeout=10.0).json().get("alerts", [])
        first = next((a for a in listed if a.get("id") == alert["id"]), alert)
        self.say("alert", f"alert {alert['id']} ({len(first.get('details', {}).get('drifted_columns', []) or [])} "
                          f"columns, report {first.get('report_path', alert.get('report', ''))}): trigger "
                          f"[bold]{first.get('decision')}[/] — {first.get('reason', '')}")
        self.facts["alert"] = alert
        return alert

    def wait_retrain(self, alert_id: str, timeout: float = 150.0) -> dict[str, Any]:
        self.say("retrain", f"retraining run for drift:{alert_id} on recent data (kfp.local) ...")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            r = httpx.get(f"http://127.0.0.1:{self.monitor_port}/alerts", timeout=10.0)
            for rec in r.json().get("alerts", r.json() if isinstance(r.json(), list) else []):
                if rec.get("id") == alert_id and rec.get("finished"):
                    self.facts["retrain"] = rec
                    if rec.get("run_state") != "SUCCEEDED":
                        raise DriftloopError(f"the retraining run failed: {rec.get('reason') or rec.get('run_state')}")
                    if not rec.get("model_version"):
                        raise DriftloopError("the retrained model did not pass the gate; nothing to roll out")
                    self.say("retrain", f"run finished: gate passed, churn v{rec['model_version']} registered as "
                                        "challenger and deployed as a canary")
                    return rec
            time.sleep(1.0)
        raise DriftloopError(f"the retraining run for alert {alert_id} did not finish in {timeout:.0f}s")

    def rollout(self, traffic: pd.DataFrame, label: str) -> dict[str, Any]:
        """Run the controller (``driftloop rollout run``) while labelled traffic flows."""
        stop = threading.Event()

        def flow() -> None:
            i = 0
            while not stop.is_set():
                self.send(traffic.iloc[i:i + 80], labels=True, workers=2)
                i = (i + 80) % max(1, len(traffic) - 80)

        feeder = threading.Thread(target=flow, daemon=True)
        feeder.start()
        try:
            proc = spawn([sys.executable, "-m", "driftloop.app.cli", *self.cli("rollout", "run")],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True)
            try:
                output = proc.communicate(timeout=180)[0]
            except subprocess.TimeoutExpired:
                stop_process(proc.pid)
                output = proc.communicate()[0]
        finally:
            stop.set()
            feeder.join(30)
        from dataclasses import asdict

        from serving.rollout import RolloutStore

        settings = self.settings()
        state = RolloutStore(settings.workspace_dir / "rollout", settings.mlflow.model_name).load()
        if state is None or not state.done:
            raise DriftloopError(f"the rollout did not finish: {(output or '')[-2000:]}")
        colour = "green" if state.status == "promoted" else "red"
        self.say("rollout", f"{label}: v{state.canary_version} [{colour}]{state.status}[/] — {state.reason}")
        for step in state.history:
            self.say("", f"  {step.get('weight'):>3}%  {step.get('decision'):<8} {step.get('reason', '')}")
        return asdict(state)

    def bad_candidate(self) -> None:
        from driftloop.core.config import load_settings
        from pipelines.runner import RunRequest, runner_for

        lenient = load_settings(self.config_path, overrides={"gate.margin": -1.0, "gate.min_value": 0.0,
                                                             "model.learner": "linear",
                                                             "model.params": {"C": 0.0001}})
        self.say("train", "a weak candidate (tiny linear model, lenient gate) — it should not survive the rollout ...")
        with self.pipeline_log("weak-candidate"):
            result = runner_for(lenient).run_training(RunRequest(
                window_start=(pd.Timestamp.now(tz="UTC") - pd.Timedelta(days=self.days / 3)).isoformat()))
        if result.state != "SUCCEEDED" or "model_version" not in result.summary:
            raise DriftloopError(f"the weak candidate was not registered: {result.error or result.summary}")
        self.facts["weak"] = result.summary
        self.say("train", f"churn v{result.summary['model_version']}: accuracy {result.summary['metrics']['accuracy']:.3f}"
                          " — deployed as a canary by the pipeline's deploy step")

    def summary(self) -> None:
        from driftloop.core.registry import Registry

        s = self.settings()
        registry = Registry.from_settings(s)
        table = Table(title="driftloop demo — the loop closed")
        for col in ("version", "trigger", "gate", "accuracy", "rollout", "aliases"):
            table.add_column(col, overflow="fold")  # a long trigger folds in 80 columns; summary.json has all
        rows = []
        for v in registry.list_versions("churn"):
            v = registry.get_version("churn", v.version)
            acc = registry.run(v.run_id).data.metrics.get("accuracy") if v.run_id else None
            rows.append({"version": v.version, "trigger": v.tags.get("driftloop.trigger", ""),
                         "gate": v.tags.get("driftloop.gate.decision", ""), "accuracy": acc,
                         "rollout": v.tags.get("driftloop.rollout.outcome", ""), "aliases": list(v.aliases)})
            table.add_row(v.version, rows[-1]["trigger"], rows[-1]["gate"], f"{acc:.3f}" if acc else "-",
                          rows[-1]["rollout"], ", ".join(v.aliases))
        console.print(table)
        reports = sorted((s.workspace_dir / "monitor" / "reports").glob("*/*.html"))
        console.print(f"MLflow store:      {s.tracking_uri}   (mlflow ui --backend-store-uri {s.tracking_uri})")
        console.print(f"Evidently reports: {', '.join(map(str, reports)) or '-'}")
        console.print(f"quality:           {self.quality_line()}")
        console.print(f"logs:              {self.workdir / 'logs'}")
        console.print(f"lineage:           driftloop lineage churn@champion -c {self.config_path}")
        self.facts["versions"] = rows
        self.facts["reports"] = [str(r) for r in reports]
        self.facts["tracking_uri"] = s.tracking_uri
        self.facts["seconds"] = round(time.monotonic() - self.started, 1)
        (self.workdir / "summary.json").write_text(json.dumps(self.facts, indent=2, default=str))

    def quality_line(self) -> str:
        """The monitor's quality check on the labels that flowed through the gateway: per version, the
        realised accuracy on its labelled window, the estimate from calibrated scores, the holdout."""
        try:
            r = httpx.post(f"http://127.0.0.1:{self.monitor_port}/quality/check", timeout=120.0,
                           headers=self.monitor_auth())
            r.raise_for_status()
        except httpx.HTTPError as exc:
            return f"not available ({exc})"
        outcome = r.json()
        self.facts["quality"] = outcome
        parts = []
        for version, q in sorted(outcome.get("versions", {}).items()):
            if "holdout" not in q:
                parts.append(f"v{version}: {q.get('reason', q.get('verdict'))}")
                continue
            live = (q.get("live") or {}).get("accuracy")
            est = (q.get("estimated") or q.get("estimated_latest") or {}).get("accuracy")
            parts.append(f"v{version} {q['verdict']}: accuracy realised "
                         f"{f'{live:.3f}' if live is not None else '-'} ({q['labelled_rows']} labels), estimated "
                         f"{f'{est:.3f}' if est is not None else '-'}, holdout {q['holdout'].get('accuracy', 0):.3f}")
        return "; ".join(parts) or "no labelled predictions"

    def run(self) -> None:
        # One admin token for the demo's gateway and everything that changes its traffic (the deploy step in
        # the monitor's retraining worker, the rollout controller): made here, handed down in the environment.
        os.environ.setdefault("DRIFTLOOP_GATEWAY_TOKEN", secrets.token_urlsafe(24))
        self.prepare()
        self.write_config()
        try:
            df = self.data()
            self.train_champion()
            self.serve_and_monitor()
            self.no_drift_phase(df)
            alert = self.drift_phase(df)
            self.wait_retrain(alert["id"])
            recent = df[df["event_time"] >= self.drift_time]
            self.facts["rollout_good"] = self.rollout(recent, "retrained model")
            self.bad_candidate()
            self.facts["rollout_bad"] = self.rollout(recent, "weak model")
            self.summary()
        finally:
            self.stop()
            self.say("done", f"all processes stopped; {time.monotonic() - self.started:.0f}s in all")


def _drift_summary(outcome: dict[str, Any]) -> str:
    result = outcome.get("result") or {}
    cols = result.get("columns") or []
    drifted = [c["column"] for c in cols if c.get("drifted")]
    share = result.get("share")
    text = f"{len(drifted)}/{len(cols)} columns drifted" if cols else outcome.get("reason", "")
    if drifted:
        text += ": " + ", ".join(drifted)
    if share is not None:
        text += f"; share {share:.2f}"
    return text


def demo_cmd(
    workdir: Annotated[Path, typer.Option(help="Where the demo keeps its workspace (wiped at start).")] = Path(".driftloop/demo"),
    rows: Annotated[int, typer.Option(min=2000, help="Rows in the scenario.")] = 12_000,
    interval: Annotated[float, typer.Option(min=0.2, help="Rollout check interval (seconds).")] = 1.0,
) -> None:
    """Run the whole loop on the embedded default: train, serve, drift, retrain, canary, promote / roll back."""
    demo = Demo(workdir.resolve(), rows=rows, interval=interval)
    # SIGTERM (e.g. from `timeout`) stops the demo like Ctrl-C: its services are stopped on the way out;
    # SIGKILL cannot be caught, and then every process the demo started dies with it (processes.spawn).
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    try:
        demo.run()
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/]: everything the demo started has been stopped; rerun to start clean")
        raise typer.Exit(130)
