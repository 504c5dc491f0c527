"""What ``driftloop demo`` sends and asks over HTTP: production traffic through the gateway, labels
as feedback, and the monitor's checks and alerts."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pandas as pd

__all__ = ["Traffic"]


@dataclass(frozen=True)
class Traffic:
    """The gateway and the monitor of one demo's model, as a client sees them (of a fleet: ``model`` on the
    fleet's gateway, its feedback under ``/models/<model>`` there and its monitor API under ``monitor_path``)."""

    gateway_port: int
    monitor_port: int
    token_path: Callable[[], Path]  # the monitor's ingest token file (read once it exists: the monitor makes it)
    model: str = "churn"
    monitor_path: str = ""  # the model's path on a fleet's monitor (monitor.base_path)
    # HTTP clients kept between calls: making one loads the CA bundle (tens of ms of CPU), and the demo polls
    # and sends many times a second while the two cores are busy with the loop's processes
    _idle: list[httpx.Client] = field(default_factory=list, compare=False, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, compare=False, repr=False)
    _token: dict[str, str] = field(default_factory=dict, compare=False, repr=False)
    _sent: dict[str, int] = field(default_factory=lambda: {"rows": 0}, compare=False, repr=False)

    @contextlib.contextmanager
    def client(self) -> Iterator[httpx.Client]:
        """A client of the pool (one per thread at a time), returned to it after use."""
        with self._lock:
            client = self._idle.pop() if self._idle else httpx.Client(timeout=120.0)
        try:
            yield client
        finally:
            with self._lock:
                self._idle.append(client)

    def close(self) -> None:
        with self._lock:
            for client in self._idle:
                client.close()
            self._idle.clear()

    @property
    def gateway(self) -> str:
        return f"http://127.0.0.1:{self.gateway_port}"

    @property
    def monitor(self) -> str:
        return f"http://127.0.0.1:{self.monitor_port}{self.monitor_path}"

    @property
    def feedback_url(self) -> str:
        """The gateway's ``/feedback`` (of a fleet's gateway: the model's, ``/models/<model>/feedback``)."""
        return f"{self.gateway}{'/models/' + self.model if self.monitor_path else ''}/feedback"

    def monitor_auth(self) -> dict[str, str]:
        """The ingest token the monitor's POST /check and /quality/check and the gateway's /feedback need (env,
        else the workspace's file)."""
        from driftloop.core.files import workspace_token

        if "token" not in self._token:
            self._token["token"] = workspace_token(self.token_path(), "DRIFTLOOP_INGEST_TOKEN")
        return {"authorization": f"Bearer {self._token['token']}"}

    def send(self, frame: pd.DataFrame, *, labels: bool = True, workers: int = 4, batch: int = 5) -> dict[str, int]:
        """Production traffic through the gateway: V1 requests of ``batch`` rows; labels arrive as feedback."""
        from driftloop.app.scenario import FEATURES_CATEGORICAL, FEATURES_NUMERIC

        features = frame[FEATURES_NUMERIC + FEATURES_CATEGORICAL].astype(object).where(frame.notna(), None)
        rows = features.to_dict(orient="records")
        truth = frame["label"].tolist()
        url = f"{self.gateway}/v1/models/{self.model}:predict"
        counts = {"ok": 0, "error": 0}
        lock = threading.Lock()
        batches = [(i, min(i + batch, len(rows))) for i in range(0, len(rows), batch)]

        auth = self.monitor_auth()  # the gateway's /feedback takes the same ingest token

        def worker(mine: list[tuple[int, int]]) -> None:
            with self.client() as client:
                for lo, hi in mine:
                    try:
                        r = client.post(url, json={"instances": rows[lo:hi]}, timeout=10.0)
                        ok = r.status_code == 200
                        if ok and labels:
                            client.post(self.feedback_url,
                                        json={"id": r.headers.get("x-request-id"), "label": truth[lo:hi]},
                                        headers=auth, timeout=10.0)
                    except httpx.HTTPError:
                        ok = False
                    with lock:
                        counts["ok" if ok else "error"] += hi - lo

        threads = [threading.Thread(target=worker, args=(batches[i::workers],), daemon=True) for i in range(workers)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        with lock:
            self._sent["rows"] += counts["ok"]
        return counts

    def stored_rows(self) -> float:
        """The rows the monitor has stored for this model (its ``driftloop_monitor_rows_stored_total``)."""
        from prometheus_client.parser import text_string_to_metric_families

        with self.client() as client:
            text = client.get(f"{self.monitor}/metrics", timeout=10.0).text
        return sum(sample.value for family in text_string_to_metric_families(text)
                   if family.name == "driftloop_monitor_rows_stored" for sample in family.samples
                   if sample.name.endswith("_total"))

    def wait_stored(self, timeout: float = 30.0) -> None:
        """Until the monitor has stored every row sent through the gateway so far: the gateway logs them off the
        request path, in batches, so a check right after the traffic could judge a window without its last rows
        (and, with tumbling windows, the previous complete one). After ``timeout`` the check goes on with what is
        there."""
        deadline = time.monotonic() + timeout
        while self.stored_rows() < self._sent["rows"] and time.monotonic() < deadline:
            time.sleep(0.1)

    def check(self) -> dict[str, Any]:
        """The monitor's drift check on everything sent so far (once the monitor has stored it)."""
        self.wait_stored()
        with self.client() as client:
            r = client.post(f"{self.monitor}/check", headers=self.monitor_auth())
        r.raise_for_status()
        return r.json()

    def quality_check(self) -> dict[str, Any]:
        """The monitor's quality check on the labels that flowed through the gateway (``httpx.HTTPError`` if refused)."""
        with self.client() as client:
            r = client.post(f"{self.monitor}/quality/check", headers=self.monitor_auth())
        r.raise_for_status()
        return r.json()

    def alerts(self) -> Any:
        """The monitor's GET /alerts, as it answers."""
        with self.client() as client:
            return client.get(f"{self.monitor}/alerts", timeout=10.0).json()
