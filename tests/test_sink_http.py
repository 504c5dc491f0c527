"""The standalone sink's HTTP layer: each answer leaves in one write, and nothing is held back."""

import asyncio
import os
import socket
import sqlite3
import subprocess
import sys
import time

from monitoring.sink import _OneWriteTransport
from tests.ce_events import COLUMNS, pair
from tests.conftest import free_port


class _Recorder:
    def __init__(self):
        self.writes: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        self.writes.append(data)

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed


def test_header_block_and_body_go_out_in_one_write_and_nothing_waits_past_a_loop_turn():
    async def scenario():
        raw = _Recorder()
        t = _OneWriteTransport(raw)
        t.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n")
        assert raw.writes == []
        t.write(b"{}")
        assert raw.writes == [b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}"]
        t.write(b"HTTP/1.1 100 Continue\r\n\r\n")  # the client waits for it: never held
        assert raw.writes[-1] == b"HTTP/1.1 100 Continue\r\n\r\n"
        t.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")  # a body that is late
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        assert raw.writes[-1] == b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"
        t.write(b"HTTP/1.1 204 No Content\r\n\r\n")
        t.close()  # closing sends what is held first
        assert raw.writes[-1] == b"HTTP/1.1 204 No Content\r\n\r\n" and raw.closed
        assert t.is_closing()  # everything else is the transport's

    asyncio.run(scenario())


def _read_response(sock: socket.socket) -> tuple[bytes, bytes]:
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536)
    head, _, rest = data.partition(b"\r\n\r\n")
    length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length"))
    while len(rest) < length:
        rest += sock.recv(65536)
    return head, rest


def test_standalone_sink_answers_keep_alive_and_100_continue_and_stores_what_it_acknowledged(tmp_path):
    port, store = free_port(), tmp_path / "log.db"
    env = {**os.environ, "DRIFTLOOP_INGEST_TOKEN": "t0ken"}
    proc = subprocess.Popen([sys.executable, "-m", "monitoring.sink", "--store", str(store), "--port", str(port),
                             "--model", "churn", "--columns", ",".join(COLUMNS)], env=env)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                sock = socket.create_connection(("127.0.0.1", port), timeout=10)
                break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, "sink did not start"
                time.sleep(0.1)
        with sock:
            (req_h, req_b), (resp_h, resp_b) = pair("keep-1")
            for headers, body in ((req_h, req_b), (resp_h, resp_b)):  # one connection, one after the other
                lines = [f"{k}: {v}" for k, v in headers.items()]
                sock.sendall(("POST /events HTTP/1.1\r\nhost: x\r\nauthorization: Bearer t0ken\r\n"
                              f"content-length: {len(body)}\r\n" + "\r\n".join(lines) + "\r\n\r\n").encode() + body)
                head, answer = _read_response(sock)
                assert head.startswith(b"HTTP/1.1 200") and answer == b'{"stored":1,"duplicates":0}'
            (req_h, req_b), _ = pair("continue-1")
            lines = [f"{k}: {v}" for k, v in req_h.items()]
            sock.sendall(("POST /events HTTP/1.1\r\nhost: x\r\nauthorization: Bearer t0ken\r\nexpect: 100-continue\r\n"
                          f"content-length: {len(req_b)}\r\n" + "\r\n".join(lines) + "\r\n\r\n").encode())
            assert sock.recv(65536).startswith(b"HTTP/1.1 100 Continue\r\n\r\n")
            sock.sendall(req_b)
            head, answer = _read_response(sock)
            assert head.startswith(b"HTTP/1.1 200") and answer == b'{"stored":1,"duplicates":0}'
            sock.sendall(b"POST /events HTTP/1.1\r\nhost: x\r\ncontent-length: 2\r\n\r\n{}")
            head, answer = _read_response(sock)
            assert head.startswith(b"HTTP/1.1 401") and b"Authorization: Bearer" in answer
    finally:
        proc.terminate()
        proc.wait(30)
    with sqlite3.connect(store) as db:
        assert db.execute("SELECT COUNT(*) FROM events").fetchone()[0] == 3
        assert db.execute("SELECT request_id FROM rows").fetchall() == [("keep-1",)]
