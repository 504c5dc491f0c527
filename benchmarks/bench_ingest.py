"""Sustained ingest rate of the inference-log sink (events/s acknowledged = committed to SQLite).

The sink runs as its own process (``python -m monitoring.sink``: uvicorn + httptools + uvloop,
SQLite WAL, synchronous=NORMAL, the ingest token required) pinned to one core; the load generator
runs pinned to another core: raw HTTP/1.1 keep-alive connections on uvloop, each waiting for its
200 before it sends the next request. Two modes:

* single — one binary-mode CloudEvent per HTTP request, as KServe's logger sends them
  (request and response events of the same inference, both with a 7-feature row);
* batch  — structured-mode ``application/cloudevents-batch+json`` lists of ``--batch`` events.

Requests are made from templates built once with the ``cloudevents`` package (a pool of
different feature rows); each request gets fresh, fixed-width ce-ids spliced in as it is sent,
so every event is new (nothing is a cheap duplicate) and the generator never runs out before its
time is up. The first ``--warmup`` seconds of load are not counted. The generator's own CPU
share is printed: near 100 % it, not the sink, would be the limit.

The sink's CPU time is read from /proc too: on a machine shared with other work the wall rate
drops when the sink's core is taken away, while events per sink CPU-second is its capacity on
one dedicated core. After each run the store is opened and its event count must equal the number
of acknowledged events (every connection waits for its last answer before it closes). Prints one
line per mode and the load average.

    python benchmarks/bench_ingest.py [--seconds 10] [--warmup 2] [--connections 64] [--batch 200]
                                      [--sink-core 0 --load-core 1] [--mode single|batch|both]
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
from collections.abc import Callable
from pathlib import Path

import orjson

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from driftloop.core.processes import die_with_parent  # noqa: E402
from tests.ce_events import COLUMNS, binary, instance, structured  # noqa: E402

TOKEN = "bench-ingest-token"
_SINGLE_ID, _BATCH_ID = b"s%011d", b"b%09d-%05d"  # fixed-width ce-ids: the content-length holds
_SINGLE_MARK, _BATCH_MARK = b"@" * 12, b"@" * 16  # where each template's ce-id goes, as wide as the ids
_POOL = 256  # different feature rows the requests cycle through


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_request(port: int, headers: dict[str, str], body: bytes) -> bytes:
    lines = ["POST /events HTTP/1.1", f"host: 127.0.0.1:{port}", f"content-length: {len(body)}",
             f"authorization: Bearer {TOKEN}"]
    lines += [f"{k}: {v}" for k, v in headers.items() if k != "content-length"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def _split(template: bytes, mark: bytes, marks: int) -> list[bytes]:
    parts = template.split(mark)
    assert len(parts) == marks + 1, "the id mark must appear exactly where the ce-ids go"
    return parts


def single_requests(port: int) -> Callable[[], bytes]:
    """A maker of one-event requests: the request and the response event of each inference in turn."""
    templates, mark = [], _SINGLE_MARK.decode()
    for i in range(_POOL):
        templates.append(_split(http_request(port, *binary(mark, "request", {"instances": [instance(i)]})),
                                _SINGLE_MARK, 1))
        templates.append(_split(http_request(port, *binary(mark, "response", {"predictions": [i % 2]},
                                                           version="1", role="champion")), _SINGLE_MARK, 1))
    counter = 0

    def make() -> bytes:
        nonlocal counter
        n, counter = counter, counter + 1
        head, tail = templates[n % (2 * _POOL)]
        return head + _SINGLE_ID % (n >> 1) + tail
    return make


def batch_requests(port: int, size: int) -> Callable[[], bytes]:
    """A maker of batch requests of ``size`` events (``size // 2`` inferences, request and response)."""
    templates, mark = [], _BATCH_MARK.decode()
    for t in range(8):
        items = []
        for j in range(size // 2):
            items.append(structured(mark, "request", {"instances": [instance(t * size + j)]}))
            items.append(structured(mark, "response", {"predictions": [j % 2]}, version="1"))
        body = orjson.dumps(items)
        templates.append(_split(http_request(port, {"content-type": "application/cloudevents-batch+json"}, body),
                                _BATCH_MARK, 2 * (size // 2)))
    counter = 0

    def make() -> bytes:
        nonlocal counter
        b, counter = counter, counter + 1
        parts = templates[b % len(templates)]
        ids = [_BATCH_ID % (b, j >> 1) for j in range(len(parts) - 1)]
        out = [parts[0]]
        for ident, part in zip(ids, parts[1:]):
            out += (ident, part)
        return b"".join(out)
    return make


def take_answer(buf: bytes) -> tuple[bool, bytes] | None:
    """The first complete HTTP answer in ``buf``: (its status is 200, what follows it), or None while incomplete."""
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        return None
    head = buf[:end]
    at = head.lower().find(b"content-length:")
    stop = head.find(b"\r\n", at)
    length = int(head[at + 15:stop if stop > 0 else None])
    if len(buf) < end + 4 + length:
        return None
    return head[9:12] == b"200", buf[end + 4 + length:]


class _Connection(asyncio.Protocol):
    """One keep-alive connection: send a request, read its answer, send the next, until the deadline."""

    def __init__(self, load: "_Load"):
        self.load = load
        self.buf = b""
        self.transport: asyncio.Transport | None = None
        self.closed = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self._next()

    def _next(self) -> None:
        if time.perf_counter() >= self.load.deadline:
            self.transport.close()
            return
        self.transport.write(self.load.make())

    def data_received(self, data: bytes) -> None:
        self.buf += data
        answer = take_answer(self.buf)
        if answer is None:
            return
        ok, self.buf = answer
        self.load.answered(ok)
        self._next()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed.done():
            self.closed.set_result(exc)


class _Load:
    """Counters of one run: all acknowledgements (for the store check) and those in the measured window."""

    def __init__(self, make: Callable[[], bytes], warmup: float, seconds: float, sink_pid: int):
        self.make = make
        self.sink_pid = sink_pid
        self.start = time.perf_counter()
        self.measure_from = self.start + warmup
        self.deadline = self.measure_from + seconds
        self.ok = self.refused = self.measured = 0
        self.marks: dict[str, tuple[float, tuple[float, float], float]] = {}
        self.profile: tuple[str, Path] | None = None  # (py-spy, output file) to sample the sink with
        self.profiler: subprocess.Popen | None = None

    def answered(self, ok: bool) -> None:
        if ok:
            self.ok += 1
            now = time.perf_counter()
            if self.measure_from <= now < self.deadline:
                self.measured += 1
        else:
            self.refused += 1

    def mark(self, name: str) -> None:
        self.marks[name] = (time.perf_counter(), cpu_seconds(self.sink_pid), time.process_time())
        if name == "from" and self.profile is not None:  # sample the sink over the measured window only
            self.profiler = subprocess.Popen(
                [self.profile[0], "record", "--pid", str(self.sink_pid), "--format", "raw", "--rate", "250",
                 "--nonblocking", "--duration", str(max(1, int(self.deadline - time.perf_counter()))),
                 "-o", str(self.profile[1])], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


async def _drive(port: int, load: _Load, connections: int) -> None:
    loop = asyncio.get_running_loop()
    loop.call_at(loop.time() + (load.measure_from - time.perf_counter()), load.mark, "from")
    loop.call_at(loop.time() + (load.deadline - time.perf_counter()), load.mark, "to")
    conns = [(await loop.create_connection(lambda: _Connection(load), "127.0.0.1", port))[1]
             for _ in range(connections)]
    for conn in conns:
        if (exc := await conn.closed) is not None:
            raise RuntimeError(f"connection lost: {exc}")


def cpu_seconds(pid: int) -> tuple[float, float]:
    """(user, system) CPU time of a process so far (from /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def _start_sink(store: Path, port: int, core: int, root: Path = ROOT) -> subprocess.Popen:
    env = {**os.environ, "DRIFTLOOP_INGEST_TOKEN": TOKEN}
    sink = subprocess.Popen(
        ["taskset", "-c", str(core), sys.executable, "-m", "monitoring.sink", "--store", str(store),
         "--port", str(port), "--model", "churn", "--columns", ",".join(COLUMNS)], cwd=root, env=env,
        preexec_fn=die_with_parent())
    deadline = time.time() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return sink
        except OSError:
            if time.time() > deadline or sink.poll() is not None:
                sink.kill()
                raise RuntimeError("sink did not start")
            time.sleep(0.1)


def run_mode(name: str, maker: Callable[[int], Callable[[], bytes]], per_request: int,
             args: argparse.Namespace) -> dict:
    import uvloop

    tmp = Path(tempfile.mkdtemp(prefix="bench-ingest-"))
    store = tmp / "log.db"
    port = free_port()
    make = maker(port)
    sink = _start_sink(store, port, args.sink_core, args.sink_root)
    try:
        load = _Load(make, args.warmup, args.seconds, sink.pid)
        if args.py_spy:
            load.profile = (args.py_spy, Path(args.profile_dir) / f"ingest-{name}.txt")
        uvloop.run(_drive(port, load, args.connections))
        if load.profiler is not None:
            load.profiler.wait(60)
    finally:
        sink.terminate()
        sink.wait(30)
    db = sqlite3.connect(store)
    events = db.execute("SELECT COUNT(*) FROM events").fetchone()[0]
    rows = db.execute("SELECT COUNT(*) FROM rows").fetchone()[0]
    db.close()
    if events != load.ok * per_request:
        raise SystemExit(f"{name}: {load.ok * per_request} events acknowledged but {events} stored")
    (t0, cpu0, gen0), (t1, cpu1, gen1) = load.marks["from"], load.marks["to"]
    elapsed = t1 - t0
    user, system = cpu1[0] - cpu0[0], cpu1[1] - cpu0[1]
    cpu = user + system
    measured = load.measured * per_request
    return {"mode": name, "requests": load.measured, "failed": load.refused, "events": measured, "stored": events,
            "rows": rows, "seconds": elapsed, "events_per_s": measured / elapsed,
            "requests_per_s": load.measured / elapsed, "sink_cpu": cpu / elapsed,
            "sink_system_share": system / cpu if cpu else float("nan"),
            "events_per_cpu_s": measured / cpu if cpu else float("nan"), "load_cpu": (gen1 - gen0) / elapsed,
            "loadavg": os.getloadavg()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=10.0, help="measured seconds per mode")
    p.add_argument("--warmup", type=float, default=2.0, help="seconds of load before the measured window")
    p.add_argument("--connections", type=int, default=64)
    p.add_argument("--batch", type=int, default=200, help="events per batch request")
    p.add_argument("--sink-core", type=int, default=0)
    p.add_argument("--load-core", type=int, default=1)
    p.add_argument("--mode", choices=["single", "batch", "both"], default="both")
    p.add_argument("--sink-root", type=Path, default=ROOT,
                   help="run the sink of another checkout (e.g. `git archive REV monitoring driftloop`), to compare "
                        "versions under the same load")
    p.add_argument("--py-spy", help="path of py-spy: sample the sink during the measured window (slows it a little)")
    p.add_argument("--profile-dir", default=".", help="where the py-spy stacks go (ingest-<mode>.txt, collapsed)")
    args = p.parse_args()
    os.sched_setaffinity(0, {args.load_core})
    print(f"sink on core {args.sink_core}, load generator on core {args.load_core}, {args.connections} connections, "
          f"{args.warmup:.0f} s warm-up + {args.seconds:.0f} s measured per mode; "
          f"load average before {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    results = []
    if args.mode in ("single", "both"):
        results.append(run_mode("single", single_requests, 1, args))
    if args.mode in ("batch", "both"):
        results.append(run_mode(f"batch{args.batch}", lambda port: batch_requests(port, args.batch), args.batch, args))
    for r in results:
        print(f"{r['mode']:>9}: {r['events_per_s']:>9,.0f} events/s acknowledged ({r['requests_per_s']:,.0f} req/s, "
              f"{r['events']:,} events in {r['seconds']:.1f} s, {r['failed']} refused; store holds {r['stored']:,} "
              f"events = every one acknowledged, {r['rows']:,} paired rows)")
        print(f"{'':>11}sink process busy {r['sink_cpu']:.0%} of its core ({r['sink_system_share']:.0%} of that in the "
              f"kernel): {r['events_per_cpu_s']:,.0f} events per sink CPU-second; load generator busy "
              f"{r['load_cpu']:.0%}; load average {' '.join(f'{x:.2f}' for x in r['loadavg'])}")


if __name__ == "__main__":
    main()
