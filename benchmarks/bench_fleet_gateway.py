"""Fleet gateway throughput: one gateway serving 50 models against the same gateway serving 1 (target >= 0.9x).

Starts, as processes that die with this script:

  * an upstream: a fast fake KServe model server answering ``POST /v1/models/<any name>:predict`` with a
    fixed V1 answer (so the gateway's own cost shows, not a model's),
  * a sink answering 200 to ``POST /models/<name>/events`` (every model logs to its own path, as on the
    fleet's monitor),
  * the fleet gateway (``python -m serving.fleet_gateway``) with 1 model, then with ``--models`` (50) models,
    every model's primary being the upstream (a packed server: the path carries the name), each with its
    own inference log,
  * for reference, the one-model gateway (``python -m serving.gateway``) in front of the same upstream,

and drives each with the same load: ``--concurrency`` keep-alive connections (asyncio + aiohttp), one-row
V1 requests spread round-robin over the models, ``--seconds`` per run after a warm-up, each case run
``--rounds`` times alternately (the machine is shared: the best run of each, and the median of each round's
ratio, count). Prints req/s and the gateway process's CPU per request for each run, the ratio 50 : 1 by
each measure against its target, and the load average. ``--no-log``: without the inference log (the
dispatch alone). Every response is checked to be a 200.

    python benchmarks/bench_fleet_gateway.py [--models 50] [--seconds 6] [--concurrency 16] [--rounds 2] [--no-log]

Not a test: numbers depend on the machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

ROW = {"tenure": 3.0, "monthly_spend": 31.0, "sessions": 2.0, "support_calls": 1.0, "latency_ms": 120.0,
       "region": "eu", "plan": "pro"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stub(port: int) -> None:
    """The upstream and the sink in one tiny app: fixed answers, nothing parsed."""
    import uvicorn
    from starlette.applications import Starlette
    from starlette.responses import Response
    from starlette.routing import Route

    answer = json.dumps({"predictions": [1], "model_version": "1"}).encode()

    async def predict(request):  # noqa: ANN001, ANN202
        await request.body()
        return Response(answer, media_type="application/json")

    async def events(request):  # noqa: ANN001, ANN202
        await request.body()
        return Response(status_code=200)

    async def ready(request):  # noqa: ANN001, ANN202
        return Response(b'{"ready":true}', media_type="application/json")

    app = Starlette(routes=[Route("/v1/models/{name}:predict", predict, methods=["POST"]),
                            Route("/models/{name}/events", events, methods=["POST"]),
                            Route("/events", events, methods=["POST"]),
                            Route("/v2/health/ready", ready, methods=["GET"])])
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)


def _spawn(argv: list[str], env: dict[str, str]):  # noqa: ANN202
    import subprocess

    from driftloop.core.processes import spawn

    return spawn([sys.executable, *argv], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                 stdin=subprocess.DEVNULL, env=env, cwd=str(ROOT))


def _wait(url: str, proc) -> None:  # noqa: ANN001
    import httpx

    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{url}: the process exited ({proc.returncode})")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise SystemExit(f"{url} not ready within 60 s")


def _fleet_gateway(n: int, stub: str, home: Path, env: dict[str, str], log: bool = True):  # noqa: ANN202
    names = [f"model-{i:02d}" for i in range(n)]
    doc = {"models": [{"name": name, "primary": {"url": stub, "version": "1"}} for name in names]}
    for m in doc["models"] if log else []:
        m["sink_url"] = f"{stub}/models/{m['name']}/events"
    path = home / f"fleet-{n}.json"
    path.write_text(json.dumps(doc))
    port = _free_port()
    proc = _spawn(["-m", "serving.fleet_gateway", "--config", str(path), "--port", str(port)], env)
    url = f"http://127.0.0.1:{port}"
    _wait(url + "/healthz", proc)
    return proc, url, names


def _one_model_gateway(stub: str, env: dict[str, str], log: bool = True):  # noqa: ANN202
    port = _free_port()
    proc = _spawn(["-m", "serving.gateway", "--name", "model-00", "--port", str(port), "--primary-url", stub,
                   "--primary-version", "1", *(["--sink-url", f"{stub}/events"] if log else [])], env)
    url = f"http://127.0.0.1:{port}"
    _wait(url + "/healthz", proc)
    return proc, url, ["model-00"]


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds a process has used (its threads included)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def _drive(url: str, names: list[str], seconds: float, concurrency: int) -> tuple[float, int]:
    """Requests a second over ``seconds`` (after a 1 s warm-up), and how many were not 200."""
    import aiohttp

    body = json.dumps({"instances": [ROW]}).encode()
    paths = [f"/v1/models/{name}:predict" for name in names]
    headers = {"content-type": "application/json"}
    counter = {"n": 0, "bad": 0, "i": 0}
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(url, connector=connector) as session:
        stop_at = time.monotonic() + 1.0 + seconds
        start_at = time.monotonic() + 1.0

        async def worker() -> None:
            while (now := time.monotonic()) < stop_at:
                counter["i"] += 1
                async with session.post(paths[counter["i"] % len(paths)], data=body, headers=headers) as resp:
                    await resp.read()
                    if now >= start_at:
                        counter["n"] += 1
                        counter["bad"] += resp.status != 200

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return counter["n"] / seconds, counter["bad"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", type=int, default=50)
    p.add_argument("--seconds", type=float, default=6.0)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--no-log", action="store_true", help="no inference log (the dispatch alone)")
    p.add_argument("--stub", type=int, help=argparse.SUPPRESS)  # internal: serve the upstream and sink
    args = p.parse_args()
    if args.stub:
        _stub(args.stub)
        return
    from driftloop.core.processes import stop_processes

    env = dict(os.environ, DRIFTLOOP_GATEWAY_TOKEN="bench", DRIFTLOOP_INGEST_TOKEN="bench", PYTHONUNBUFFERED="1")
    stub_port = _free_port()
    stub = f"http://127.0.0.1:{stub_port}"
    procs = [_spawn([str(Path(__file__).resolve()), "--stub", str(stub_port)], env)]
    try:
        _wait(stub + "/v2/health/ready", procs[0])
        with tempfile.TemporaryDirectory() as tmp:
            cases = {}
            for label, start in (("fleet gateway, 1 model", lambda: _fleet_gateway(1, stub, Path(tmp), env, not args.no_log)),
                                 (f"fleet gateway, {args.models} models",
                                  lambda: _fleet_gateway(args.models, stub, Path(tmp), env, not args.no_log)),
                                 ("one-model gateway (reference)", lambda: _one_model_gateway(stub, env, not args.no_log))):
                proc, url, names = start()
                procs.append(proc)
                cases[label] = (url, names, proc.pid)
            print(f"{len(cases)} gateways in front of one fake model server, inference log "
                  f"{'off' if args.no_log else 'on'}; {args.concurrency} connections, "
                  f"{args.seconds:g} s a run, {args.rounds} rounds; load average {os.getloadavg()[0]:.1f} on "
                  f"{os.cpu_count()} CPUs", flush=True)
            best: dict[str, float] = {}
            rates: dict[str, list[float]] = {}
            cpu: dict[str, list[float]] = {}
            loads: list[float] = []
            for r in range(args.rounds):
                for label, (url, names, pid) in cases.items():
                    before = _cpu_seconds(pid)
                    rate, bad = asyncio.run(_drive(url, names, args.seconds, args.concurrency))
                    # the gateway's CPU per request over the run (warm-up included in both): steadier than req/s
                    per = (_cpu_seconds(pid) - before) * 1000 / max(1.0, rate * (args.seconds + 1.0))
                    cpu.setdefault(label, []).append(per)
                    loads.append(os.getloadavg()[0])
                    print(f"  round {r + 1}  {label:<34} {rate:8.0f} req/s  {per:6.3f} ms CPU/req  "
                          f"(load {loads[-1]:.1f})" + (f"  WARNING: {bad} non-200" if bad else ""), flush=True)
                    best[label] = max(best.get(label, 0.0), rate)
                    rates.setdefault(label, []).append(rate)
    finally:
        stop_processes([p.pid for p in reversed(procs)], 5.0)
    one_label, many_label = "fleet gateway, 1 model", f"fleet gateway, {args.models} models"
    print("\nbest of the rounds (req/s), least gateway CPU per request:")
    for label, rate in best.items():
        print(f"  {label:<34} {rate:8.0f} req/s  {min(cpu[label]):6.3f} ms CPU/req")
    import statistics

    ratio = best[many_label] / best[one_label]
    paired = statistics.median(m / o for m, o in zip(rates[many_label], rates[one_label]))  # runs side by side
    by_cpu = min(cpu[one_label]) / min(cpu[many_label])
    print(f"ratio {args.models} models : 1 model = {ratio:.2f} best req/s, {paired:.2f} median of the rounds' "
          f"req/s, {by_cpu:.2f} by least gateway CPU per request  (target >= 0.90)")
    print(f"load average while it ran: {min(loads):.1f}-{max(loads):.1f}; at the end "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())} on {os.cpu_count()} CPUs")


if __name__ == "__main__":
    main()
