"""Sustained ingest rate of the inference-log sink (events/s acknowledged = committed to SQLite).

The sink runs as its own process (``python -m monitoring.sink``: uvicorn + httptools + uvloop,
SQLite WAL, synchronous=NORMAL) pinned to one core; the load generator runs pinned to another
core: raw HTTP/1.1 keep-alive connections on uvloop sending pre-built requests (every event has
its own ce-id, so nothing is a cheap duplicate), each connection waiting for its 200 before the
next request. Two modes:

* single — one binary-mode CloudEvent per HTTP request, as KServe's logger sends them
  (request and response events of the same inference, both with a 7-feature row);
* batch  — structured-mode ``application/cloudevents-batch+json`` lists of ``--batch`` events.

The sink's own CPU time is read from /proc too: on a machine shared with other work the wall rate
drops when the sink's core is taken away, while events per sink CPU-second is its capacity on
one dedicated core. After each run the store is opened and its event count must equal the number of acknowledged
events. Prints one line per mode.

    python benchmarks/bench_ingest.py [--seconds 10] [--connections 64] [--batch 200] [--sink-core 0 --load-core 1]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import orjson

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.ce_events import COLUMNS, binary, instance, structured  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_request(port: int, headers: dict[str, str], body: bytes) -> bytes:
    lines = ["POST /events HTTP/1.1", f"host: 127.0.0.1:{port}", f"content-length: {len(body)}"]
    lines += [f"{k}: {v}" for k, v in headers.items() if k != "content-length"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def build_single(port: int, n: int) -> list[bytes]:
    """``n`` one-event requests: alternating request/response events of n/2 inferences."""
    out = []
    for i in range(n // 2):
        ce_id = f"s-{i}"
        out.append(http_request(port, *binary(ce_id, "request", {"instances": [instance(i)]})))
        out.append(http_request(port, *binary(ce_id, "response", {"predictions": [i % 2]}, version="1",
                                              role="champion")))
    return out


def build_batches(port: int, n_batches: int, size: int) -> list[bytes]:
    out = []
    for b in range(n_batches):
        items = []
        for j in range(size // 2):
            ce_id = f"b-{b}-{j}"
            items.append(structured(ce_id, "request", {"instances": [instance(j)]}))
            items.append(structured(ce_id, "response", {"predictions": [j % 2]}, version="1"))
        out.append(http_request(port, {"content-type": "application/cloudevents-batch+json"}, orjson.dumps(items)))
    return out


async def _connection(port: int, requests: list[bytes], cursor: list[int], deadline: float,
                      acked: list[int]) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        while time.perf_counter() < deadline:
            i = cursor[0]
            if i >= len(requests):
                return
            cursor[0] = i + 1
            writer.write(requests[i])
            head = await reader.readuntil(b"\r\n\r\n")
            status = int(head[9:12])
            length = 0
            for line in head.split(b"\r\n"):
                if line[:15].lower() == b"content-length:":
                    length = int(line[15:])
            await reader.readexactly(length)
            if status == 200:
                acked[0] += 1
            else:
                acked[1] += 1
    finally:
        writer.close()


async def _load(port: int, requests: list[bytes], connections: int, seconds: float) -> tuple[int, int, float]:
    cursor, acked = [0], [0, 0]
    start = time.perf_counter()
    await asyncio.gather(*(_connection(port, requests, cursor, start + seconds, acked) for _ in range(connections)))
    return acked[0], acked[1], time.perf_counter() - start


def cpu_seconds(pid: int) -> tuple[float, float]:
    """(user, system) CPU time of a process so far (from /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def run_mode(name: str, requests_for, per_request: int, args: argparse.Namespace) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="bench-ingest-"))
    store = tmp / "log.db"
    port = free_port()
    requests = requests_for(port)
    sink = subprocess.Popen(
        ["taskset", "-c", str(args.sink_core), sys.executable, "-m", "monitoring.sink", "--store", str(store),
         "--port", str(port), "--model", "churn", "--columns", ",".join(COLUMNS)], cwd=ROOT)
    try:
        deadline = time.time() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                if time.time() > deadline or sink.poll() is not None:
                    raise RuntimeError("sink did not start")
                time.sleep(0.1)
        import uvloop

        cpu_before = cpu_seconds(sink.pid)
        ok, failed, elapsed = uvloop.run(_load(port, requests, args.connections, args.seconds))
        cpu_after = cpu_seconds(sink.pid)
        user, system = cpu_after[0] - cpu_before[0], cpu_after[1] - cpu_before[1]
        cpu = user + system
    finally:
        sink.terminate()
        sink.wait(30)
    db = sqlite3.connect(store)
    events = db.execute("SELECT COUNT(*) FROM events").fetchone()[0]
    rows = db.execute("SELECT COUNT(*) FROM rows").fetchone()[0]
    db.close()
    acked_events = ok * per_request
    if events < acked_events:
        raise SystemExit(f"{name}: {acked_events} events acknowledged but only {events} stored")
    if ok * per_request >= len(requests) * per_request:
        print(f"  note: {name} ran out of pre-built requests; raise --prebuild", file=sys.stderr)
    return {"mode": name, "requests": ok, "failed": failed, "events": acked_events, "stored": events, "rows": rows,
            "seconds": elapsed, "events_per_s": acked_events / elapsed, "requests_per_s": ok / elapsed,
            "sink_cpu": cpu / elapsed, "sink_system_share": system / cpu if cpu else float("nan"), "events_per_cpu_s": acked_events / cpu if cpu else float("nan")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--connections", type=int, default=64)
    p.add_argument("--batch", type=int, default=200, help="events per batch request")
    p.add_argument("--prebuild", type=int, default=150_000, help="single-event requests built before the run")
    p.add_argument("--sink-core", type=int, default=0)
    p.add_argument("--load-core", type=int, default=1)
    p.add_argument("--mode", choices=["single", "batch", "both"], default="both")
    args = p.parse_args()
    os.sched_setaffinity(0, {args.load_core})
    print(f"sink on core {args.sink_core}, load generator on core {args.load_core}, {args.connections} connections, "
          f"{args.seconds:.0f} s per mode")
    results = []
    if args.mode in ("single", "both"):
        results.append(run_mode("single", lambda port: build_single(port, args.prebuild), 1, args))
    if args.mode in ("batch", "both"):
        n_batches = max(10, int(args.prebuild * 2 / args.batch))
        results.append(run_mode(f"batch{args.batch}", lambda port: build_batches(port, n_batches, args.batch),
                                args.batch, args))
    for r in results:
        print(f"{r['mode']:>9}: {r['events_per_s']:>9,.0f} events/s acknowledged ({r['requests_per_s']:,.0f} req/s, "
              f"{r['events']:,} events in {r['seconds']:.1f} s, {r['failed']} refused; store holds {r['stored']:,} "
              f"events, {r['rows']:,} paired rows)")
        print(f"{'':>11}sink process busy {r['sink_cpu']:.0%} of its core ({r['sink_system_share']:.0%} of that in the "
              f"kernel): {r['events_per_cpu_s']:,.0f} events per sink CPU-second")


if __name__ == "__main__":
    main()
