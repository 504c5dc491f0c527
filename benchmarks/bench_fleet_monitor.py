"""A fleet's one monitor with 50 models: ingest spread over them, one round of their checks, drift to retrain.

Setup: one churn model is trained once (kfp.local) and its version copied to 50 model names
(``ch000`` … ``ch049``) in one MLflow store; the fleet file gives every model its workspace under
one root, its champion, a window of 300 rows. Each model's reference is computed once and copied to
the others' caches (what a restarted monitor reads).

(a) **ingest**: ``driftloop monitor -c FLEET`` (all 50 models) and ``driftloop monitor -c FLEET --model
ch000`` (one) as processes pinned to one core, loaded by ``benchmarks/bench_ingest.py``'s generator (its
templates, connections and counters) from another core. The same total load: spread round-robin over
the 50 models' paths (``/models/<name>/events``, each inference's request and response to one model),
or all to the one. Every acknowledged event must be in some model's store. Target: 50 models ≥ 0.9×
one model's events/s. The fleet's monitor takes every model's events through its intake journal
(``monitoring/intake.py``: one commit a round, moved into each model's store in batches); one model's
commits straight into its store. ``--repeat N`` runs N pairs a mode and prints their median ratio;
``--py-spy PATH`` samples the monitor over each measured window (``--profile-dir``). ``--interleave S``
starts both monitors at once (the one-model monitor on a fleet file of its own, ``fleet-one.yaml``, with
its own workspace) and alternates the load between them in slices of S seconds: each rate counts its own
slices only, so a machine that slows down or speeds up during the run moves both alike; the CPU ratio is
each monitor's events over all the CPU it used in the run (the fleet's drains and checkpoints after its
slices included).

(b) **checks**: every model's window filled (calm traffic), then one round of all 50 models' checks in
the fleet's pool (2 workers): wall time vs ``monitor.check_interval_seconds`` (10 s by default).

(c) **drift to retrain**: the fleet monitor served in this process with its check loop running
(interval ``--interval``), a thread sending calm traffic to 49 models, then a drifted window to one:
the time from that window's acknowledgement until its retraining run starts (a recording runner).

    python benchmarks/bench_fleet_monitor.py [--models 50] [--seconds 8] [--interval 5] [--part a,b,c] [--repeat 3]
                                             [--interleave 1]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import bench_ingest as ingest  # noqa: E402  (benchmarks/ is on sys.path when run as a script)

from driftloop.core.processes import die_with_parent  # noqa: E402

NAME = b"churn"  # the model name in bench_ingest's templates; the fleet's names are as long: ch000 …


def _names(n: int) -> list[str]:
    return [f"ch{i:03d}" for i in range(n)]


def setup(root: Path, models: int) -> Path:
    """Train one model, copy it to ``models`` names, write the fleet file and the models' reference caches."""
    from mlflow.tracking import MlflowClient

    from driftloop.app.scenario import write_scenario
    from driftloop.core.config import load_settings
    from driftloop.core.fleet import load_fleet
    from monitoring.reference import load_champion_reference
    from pipelines.runner import LocalRunner, RunRequest
    from pipelines.training import run_training

    data = write_scenario(root / "scenario.parquet", rows=4000)
    base = load_settings(overrides={"workspace": str(root / "train"), "data.source": str(data),
                                    "data.time_column": "event_time", "data.reference_size": 1000,
                                    "mlflow.model_name": "churn", "mlflow.experiment": "bench",
                                    "model.params": {"max_iter": 50}}, environ={})
    started = time.perf_counter()
    result = run_training(LocalRunner(base), RunRequest(window_end="2026-01-31"))
    if result.state != "SUCCEEDED":
        raise SystemExit(f"training failed: {result.error}")
    client = MlflowClient(tracking_uri=base.tracking_uri)
    for name in _names(models):
        version = client.copy_model_version("models:/churn/1", name)
        client.set_registered_model_alias(name, "champion", version.version)
    path = root / "fleet.yaml"
    lines = [f"workspace: {root / 'fleet'}", "defaults:",
             f"  data: {{source: {data}, time_column: event_time, reference_size: 1000}}",
             f"  mlflow: {{tracking_uri: \"{base.tracking_uri}\", experiment: bench}}",
             "  monitor: {window_rows: 300, min_samples: 200, min_requests: 2}",
             "  trigger: {cooldown_seconds: 0, min_samples: 100}", "models:"]
    lines += [f"  {name}: {{team: t{i % 5}}}" for i, name in enumerate(_names(models))]
    path.write_text("\n".join(lines) + "\n")
    fleet = load_fleet(path, environ={})
    first = fleet.models[0].settings
    load_champion_reference(first)  # computes the champion's predictions on its reference once
    cache = first.workspace_dir / "monitor" / "reference" / f"{fleet.models[0].name}-v1.parquet"
    for m in fleet.models[1:]:
        dst = m.settings.workspace_dir / "monitor" / "reference" / f"{m.name}-v1.parquet"
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(cache, dst)
    print(f"setup: 1 model trained and copied to {models} names in {time.perf_counter() - started:.0f} s")
    return path


# -- (a) ingest ---------------------------------------------------------------------------------------------
def _spread(maker, port: int, names: list[str], per: int):
    """A maker cycling over the models' paths: ``per`` consecutive requests (an inference's request and
    response) to one model, each model's requests made by its own bench_ingest maker (its own ce-ids)."""
    makers = []
    for name in names:
        make, old, new = maker(port), b"POST /events ", f"POST /models/{name}/events ".encode()
        makers.append(lambda make=make, new=new, name=name.encode(): make().replace(old, new, 1).replace(NAME, name))
    count = 0

    def make() -> bytes:
        nonlocal count
        m, count = makers[(count // per) % len(makers)], count + 1
        return m()
    return make


def _one_model_fleet(fleet_file: Path, name: str) -> Path:
    """A fleet file of model ``name`` alone, with a workspace of its own (its store, its reference cache): the
    one-model monitor beside the fleet's in ``--interleave``."""
    one = fleet_file.with_name("fleet-one.yaml")
    if not one.exists():
        text = fleet_file.read_text()
        head, models = text.split("models:\n", 1)
        own = [line for line in models.splitlines() if line.strip().startswith(f"{name}:")]
        one.write_text(head.replace(f"workspace: {fleet_file.parent / 'fleet'}",
                                    f"workspace: {one.parent / 'fleet-one'}") + "models:\n" + "\n".join(own) + "\n")
        cache = Path("monitor") / "reference" / f"{name}-v1.parquet"
        dst = one.parent / "fleet-one" / "models" / name / cache
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(fleet_file.parent / "fleet" / "models" / name / cache, dst)
    return one


def _store(fleet_file: Path, name: str) -> Path:
    root = "fleet-one" if fleet_file.name == "fleet-one.yaml" else "fleet"
    return fleet_file.parent / root / "models" / name / "monitor" / "inference.db"


def _stored(fleet_file: Path, names: list[str]) -> int:
    total = 0
    for name in names:
        if _store(fleet_file, name).exists():
            con = sqlite3.connect(_store(fleet_file, name))
            total += con.execute("SELECT COUNT(*) FROM events").fetchone()[0]
            con.close()
    return total


def _empty_stores(fleet_file: Path, names: list[str]) -> None:
    """Every run starts on empty stores and an empty intake journal (bench_ingest's ce-ids start again at 0: no
    duplicates of a last run)."""
    from monitoring.intake import journal_path

    for path in [*(_store(fleet_file, name) for name in names), journal_path(_store(fleet_file, names[0]).parents[3])]:
        for suffix in ("", "-wal", "-shm"):
            Path(f"{path}{suffix}").unlink(missing_ok=True)


def _start_monitor(fleet_file: Path, port: int, core: int, model: str | None) -> subprocess.Popen:
    import httpx

    cmd = ["taskset", "-c", str(core), sys.executable, "-c", "from driftloop.app.cli import main; main()",
           "monitor", "-c", str(fleet_file), "--port", str(port), "-p", "monitor.check_interval_seconds=3600"]
    cmd += ["--model", model] if model else []
    env = {**os.environ, "DRIFTLOOP_INGEST_TOKEN": ingest.TOKEN}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, preexec_fn=die_with_parent())
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    proc.kill()
    raise SystemExit("the monitor did not start")


def ingest_run(fleet_file: Path, names: list[str], mode: str, args: argparse.Namespace) -> dict:
    import uvloop

    port = ingest.free_port()
    single = mode == "single"
    maker = ingest.single_requests if single else (lambda p: ingest.batch_requests(p, args.batch))
    per_request = 1 if single else args.batch
    _empty_stores(fleet_file, names)
    proc = _start_monitor(fleet_file, port, args.sink_core, names[0] if len(names) == 1 else None)
    try:
        load = ingest._Load(_spread(maker, port, names, 2 if single else 1), args.warmup, args.seconds, proc.pid)
        if args.py_spy:
            load.profile = (args.py_spy, Path(args.profile_dir) / f"fleet-ingest-{mode}-{len(names)}.txt")
        uvloop.run(ingest._drive(port, load, args.connections))
        if load.profiler is not None:
            load.profiler.wait(60)
    finally:
        proc.terminate()
        proc.wait(60)
    stored = _stored(fleet_file, names)
    if stored != load.ok * per_request:
        raise SystemExit(f"{mode}: {load.ok * per_request} events acknowledged but {stored} stored")
    (t0, cpu0, _), (t1, cpu1, _) = load.marks["from"], load.marks["to"]
    cpu = sum(cpu1) - sum(cpu0)
    measured = load.measured * per_request
    return {"events_per_s": measured / (t1 - t0), "events_per_cpu_s": measured / cpu if cpu else float("nan"),
            "refused": load.refused, "stored": stored}


class _Target:
    """One monitor under interleaved load: its connections, and what it answered in its own slices."""

    def __init__(self, label: str, make, pid: int):
        self.label, self.make, self.pid = label, make, pid
        self.active = self.measuring = False
        self.ok = self.refused = self.measured = 0
        self.slice_seconds = 0.0
        self.parked: list[_Slice] = []


class _Slice(asyncio.Protocol):
    """A keep-alive connection to one target: sends while its target has the load, parks otherwise."""

    def __init__(self, target: _Target):
        self.target, self.buf, self.transport = target, b"", None

    def connection_made(self, transport) -> None:
        self.transport = transport
        self.target.parked.append(self)

    def send(self) -> None:
        self.transport.write(self.target.make())

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while (answer := ingest.take_answer(self.buf)) is not None:
            ok, self.buf = answer
            target = self.target
            if ok:
                target.ok += 1
                target.measured += target.measuring
            else:
                target.refused += 1
            if target.active:
                self.send()
            else:
                target.parked.append(self)


async def _interleave(ports: list[int], targets: list[_Target], args: argparse.Namespace) -> None:
    """The load goes to one target at a time, ``--interleave`` seconds each, alternating: warm-up slices, then
    measured ones, ``--seconds`` of them a target. Each target's rate is counted in its own slices only, so a
    machine that gets slower or faster during the run moves both alike."""
    loop = asyncio.get_running_loop()
    for port, target in zip(ports, targets):
        for _ in range(args.connections):
            await loop.create_connection(lambda t=target: _Slice(t), "127.0.0.1", port)
    rounds_warm = max(1, round(args.warmup / args.interleave))
    rounds = max(1, round(args.seconds / args.interleave))
    for n in range(rounds_warm + rounds):
        for target in targets if n % 2 == 0 else targets[::-1]:
            target.active, target.measuring = True, n >= rounds_warm
            parked, target.parked = target.parked, []
            for conn in parked:
                conn.send()
            started = time.perf_counter()
            await asyncio.sleep(args.interleave)
            target.active = target.measuring = False
            if n >= rounds_warm:
                target.slice_seconds += time.perf_counter() - started
    for _ in range(200):  # every answer in (the last slice's requests in flight)
        if all(len(t.parked) == args.connections for t in targets):
            break
        await asyncio.sleep(0.05)


def ingest_interleaved(fleet_file: Path, one_file: Path, names: list[str], mode: str,
                       args: argparse.Namespace) -> tuple[dict, dict]:
    """Both monitors at once on the same core, the load alternating between them (``--interleave``)."""
    import uvloop

    single = mode == "single"
    maker = ingest.single_requests if single else (lambda p: ingest.batch_requests(p, args.batch))
    per_request = 1 if single else args.batch
    _empty_stores(one_file, names[:1])
    _empty_stores(fleet_file, names)
    ports = [ingest.free_port(), ingest.free_port()]
    procs = [_start_monitor(one_file, ports[0], args.sink_core, None),
             _start_monitor(fleet_file, ports[1], args.sink_core, None)]
    try:
        targets = [_Target("1 model", _spread(maker, ports[0], names[:1], 2 if single else 1), procs[0].pid),
                   _Target(f"{len(names)} models", _spread(maker, ports[1], names, 2 if single else 1), procs[1].pid)]
        cpu0 = [ingest.cpu_seconds(p.pid) for p in procs]
        uvloop.run(_interleave(ports, targets, args))
        time.sleep(2 * args.interleave + 1)  # what the monitors do after their slices (drains, checkpoints) counts
        cpu = [[b - a for a, b in zip(c, ingest.cpu_seconds(p.pid))] for p, c in zip(procs, cpu0)]
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(60)
    out = []
    for target, stored, used in zip(targets, (_stored(one_file, names[:1]), _stored(fleet_file, names)), cpu):
        if stored != target.ok * per_request:
            raise SystemExit(f"{mode}, {target.label}: {target.ok * per_request} events acknowledged but "
                             f"{stored} stored")
        out.append({"events_per_s": target.measured * per_request / target.slice_seconds,
                    "events_per_cpu_s": target.ok * per_request / sum(used), "refused": target.refused,
                    "stored": stored, "system_share": used[1] / sum(used)})
    return out[0], out[1]


def part_ingest(fleet_file: Path, names: list[str], args: argparse.Namespace) -> None:
    """One model and all of them in turn, ``--repeat`` times a mode: on a shared machine one model's rate moves
    by a fifth between runs, so each pair's ratio is printed and the median of the pairs is the figure."""
    os.sched_setaffinity(0, {args.load_core})
    for mode in ("single", "batch"):
        label = "1 event/request" if mode == "single" else f"batches of {args.batch}"
        ratios = []
        for attempt in range(args.repeat):
            if args.interleave:
                one, many = ingest_interleaved(fleet_file, _one_model_fleet(fleet_file, names[0]), names, mode, args)
            else:
                one = ingest_run(fleet_file, names[:1], mode, args)
                many = ingest_run(fleet_file, names, mode, args)
            ratios.append(many["events_per_s"] / one["events_per_s"])
            print(f"(a) ingest, {label}{f' (pair {attempt + 1}/{args.repeat})' if args.repeat > 1 else ''}: "
                  f"1 model {one['events_per_s']:,.0f} events/s, {len(names)} models "
                  f"{many['events_per_s']:,.0f} events/s: ratio {ratios[-1]:.2f} (target >= 0.90); per monitor "
                  f"CPU-second {one['events_per_cpu_s']:,.0f} vs {many['events_per_cpu_s']:,.0f} (ratio "
                  f"{many['events_per_cpu_s'] / one['events_per_cpu_s']:.2f}); refused "
                  f"{one['refused']} / {many['refused']}; every acknowledged event stored ({one['stored']:,} / "
                  f"{many['stored']:,});{_system(one, many)} load average {_load()}", flush=True)
        if args.repeat > 1:
            print(f"(a) ingest, {label}: median ratio of {args.repeat} pairs {statistics.median(ratios):.2f} "
                  f"(each: {', '.join(f'{r:.2f}' for r in ratios)})", flush=True)
    os.sched_setaffinity(0, set(range(os.cpu_count() or 1)))


# -- (b) and (c): the fleet monitor in this process -----------------------------------------------------------
class TimingRunner:
    """Records when a retraining run would start (what the real runner would be asked to run)."""

    def __init__(self) -> None:
        self.started: list[float] = []
        self.event = threading.Event()

    def run_training(self, request, *, wait: bool = True):
        from driftloop.core.runs import RunResult

        self.started.append(time.perf_counter())
        self.event.set()
        return RunResult(request.request_id, "run-1", "SUCCEEDED", "local", summary={})


def _fleet(fleet_file: Path, params: list[str]):
    """The fleet monitor of every model, on empty stores and alert stores, each with a timing runner."""
    from driftloop.core.fleet import load_fleet
    from monitoring.alerts import alerts_path
    from monitoring.fleet_service import FleetMonitor
    from monitoring.service import MonitorService

    fleet = load_fleet(fleet_file, params)
    _empty_stores(fleet_file, fleet.names)  # not part (a)'s synthetic rows: they drift from the reference
    for m in fleet.models:
        shutil.rmtree(m.settings.workspace_dir / "monitor" / "reports", ignore_errors=True)
        for suffix in ("", "-wal", "-shm"):
            Path(f"{alerts_path(m.settings)}{suffix}").unlink(missing_ok=True)
    runners: dict[str, TimingRunner] = {}

    def service(m):
        runners[m.name] = TimingRunner()
        return MonitorService(m.settings, runner=runners[m.name])

    started = time.perf_counter()
    fleet = FleetMonitor(fleet.models, service=service)
    return fleet, runners, time.perf_counter() - started


def _events(rows, model, name: str) -> tuple[bytes, list[str]]:
    from tests.ce_events import structured
    from tests.test_monitor_service import FEATURES

    features = rows[FEATURES]
    preds = [int(p) for p in model.predict(features)]
    instances = json.loads(features.to_json(orient="records"))
    events, ids = [], []
    for i in range(0, len(rows), 50):
        ids.append(uuid.uuid4().hex)
        events.append(structured(ids[-1], "request", {"instances": instances[i:i + 50]}, model=name))
        events.append(structured(ids[-1], "response", {"predictions": preds[i:i + 50]}, model=name, version="1"))
    return json.dumps(events).encode(), ids


def _fresh(body: bytes, ids: list[str], name: str) -> bytes:
    """``body`` for model ``name`` (its name in place of "churn"), every ce-id new: no event is a duplicate."""
    body = body.replace(NAME, name.encode())
    for ident in ids:
        body = body.replace(ident.encode(), uuid.uuid4().hex.encode())
    return body


def _post(client, name: str, body: bytes) -> None:
    r = client.post(f"/models/{name}/events", content=body,
                    headers={"content-type": "application/cloudevents-batch+json"})
    if r.status_code != 200:
        raise SystemExit(f"events for {name} refused: {r.status_code} {r.text}")


def part_checks(fleet_file: Path, names: list[str], model) -> None:
    from starlette.testclient import TestClient

    from driftloop.app.scenario import generate

    fleet, _, built = _fleet(fleet_file, [])
    interval = fleet.services[names[0]].settings.monitor.check_interval_seconds
    calm, ids = _events(generate(rows=300, drift_at=None, seed=11), model, "churn")
    with TestClient(fleet, headers={"authorization": f"Bearer {ingest.TOKEN}"}) as client:
        for name in names:
            _post(client, name, _fresh(calm, ids, name))
        rounds = [fleet.checks.round_all() for _ in range(2)]
        verdicts = sorted({str((s.last_outcome or {}).get("verdict")) for s in fleet.services.values()})
        drifted, ids = _events(generate(rows=300, drift_at=0.0, seed=12), model, "churn")
        for name in names:  # every model drifts at once: each confirms with Evidently, reports, alerts
            _post(client, name, _fresh(drifted, ids, name))
        storm = fleet.checks.round_all()
        storm_verdicts = sorted({str((s.last_outcome or {}).get("verdict")) for s in fleet.services.values()})
    fleet.close()
    print(f"(b) checks: {len(names)} models built in {built:.1f} s; one round of every model's checks "
          f"(2 workers, calm windows): {rounds[0]:.2f} s, again {rounds[1]:.2f} s = {rounds[1] / interval:.0%} of "
          f"the {interval:g} s interval (verdicts: {', '.join(verdicts)}); a round in which all {len(names)} drift "
          f"at once (Evidently report + MLflow + alert each): {storm:.1f} s = {storm / interval:.1f} intervals "
          f"(verdicts: {', '.join(storm_verdicts)}); load average {_load()}")


def part_retrain(fleet_file: Path, names: list[str], model, interval: float) -> None:
    import httpx
    import uvicorn

    from driftloop.app.scenario import generate

    fleet, runners, _ = _fleet(fleet_file, [f"monitor.check_interval_seconds={interval}"])
    port = ingest.free_port()
    server = uvicorn.Server(uvicorn.Config(fleet, host="127.0.0.1", port=port, log_level="warning", lifespan="on"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    fleet.checks.start()
    calm = [_events(generate(rows=100, drift_at=None, seed=i), model, "churn") for i in range(8)]
    target = names[min(7, len(names) - 1)]
    others, stop, sent = [n for n in names if n != target], threading.Event(), [0]

    def traffic() -> None:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", headers={"authorization": f"Bearer {ingest.TOKEN}"}) as c:
            i = 0
            while not stop.is_set():
                name = others[i % len(others)]
                _post(c, name, _fresh(*calm[i % len(calm)], name))
                sent[0] += 100
                i += 1
    thread = threading.Thread(target=traffic, daemon=True)
    thread.start()
    time.sleep(2 * interval)  # the loop runs over the others' traffic for two intervals first
    drifted, _ = _events(generate(rows=300, drift_at=0.0, seed=99), model, target)
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", headers={"authorization": f"Bearer {ingest.TOKEN}"}) as c:
        _post(c, target, drifted)
    acked = time.perf_counter()
    started = runners[target].event.wait(max(120.0, 10 * interval))
    elapsed = runners[target].started[0] - acked if started else float("nan")
    stop.set()
    thread.join(30)
    others_started = sum(bool(runners[n].started) for n in others)
    overrun = sum(fleet.checks.overrun.values())
    server.should_exit = True
    time.sleep(1)
    fleet.close()
    print(f"(c) drift to retrain: {elapsed:.2f} s from the drifted window's acknowledgement to its run's start "
          f"(check interval {interval:g} s: a round picks the window up within one interval, then Evidently confirms "
          f"and the report goes to MLflow); meanwhile {sent[0]:,} calm rows to the other {len(others)} models, "
          f"{others_started} of them started a run, {overrun} rounds skipped as still running; load average {_load()}")


def _system(one: dict, many: dict) -> str:
    if "system_share" not in one:
        return ""
    return f" kernel share of the monitors' CPU {one['system_share']:.0%} / {many['system_share']:.0%};"


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", type=int, default=50)
    p.add_argument("--seconds", type=float, default=8.0, help="measured seconds per ingest run")
    p.add_argument("--warmup", type=float, default=2.0)
    p.add_argument("--connections", type=int, default=64)
    p.add_argument("--batch", type=int, default=200)
    p.add_argument("--sink-core", type=int, default=0)
    p.add_argument("--load-core", type=int, default=1)
    p.add_argument("--interval", type=float, default=5.0, help="check interval of part (c)")
    p.add_argument("--repeat", type=int, default=1, help="pairs of part (a) runs a mode (one model, then all)")
    p.add_argument("--interleave", type=float, default=0.0,
                   help="part (a): both monitors up at once, the load alternating between them in slices of this "
                        "many seconds (a machine's drift moves both alike); 0: one run after the other")
    p.add_argument("--py-spy", help="path of py-spy: sample the monitor during part (a)'s measured window")
    p.add_argument("--profile-dir", default=".", help="where the py-spy stacks go (fleet-ingest-<mode>-<models>.txt)")
    p.add_argument("--part", default="a,b,c", help="which parts: a (ingest), b (checks), c (drift to retrain)")
    args = p.parse_args()
    os.environ["DRIFTLOOP_INGEST_TOKEN"] = ingest.TOKEN
    os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")
    names = _names(args.models)
    print(f"{args.models} models; load average before {_load()}")
    root = Path(tempfile.mkdtemp(prefix="bench-fleet-monitor-"))
    try:
        fleet_file = setup(root, args.models)
        parts = set(args.part.split(","))
        if "a" in parts:
            part_ingest(fleet_file, names, args)
        if parts & {"b", "c"}:
            from driftloop.core.config import load_settings
            from driftloop.core.registry import Registry

            settings = load_settings(overrides={"workspace": str(root / "train"), "mlflow.model_name": "churn",
                                                "mlflow.experiment": "bench"}, environ={})
            model = Registry.from_settings(settings).load_pyfunc("models:/churn@champion")
            if "b" in parts:
                part_checks(fleet_file, names, model)
            if "c" in parts:
                part_retrain(fleet_file, names, model, args.interval)
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
