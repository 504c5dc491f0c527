"""Traffic split and per-version serving statistics of the local gateway.

Two small pieces the gateway and the rollout controller share:

* :class:`Splitter` decides whether a request goes to the primary or the canary —
  weighted random, or sticky by a request key (the same key always lands on the same
  side for a given percentage, and raising the percentage only moves keys to the canary).
* :class:`TrafficStats` keeps, per model version, a bounded window of recent outcomes
  (status, latency, raw response body) and a bounded LRU of request ids, so ground-truth
  labels sent later to ``/feedback`` can be joined with the prediction that was served.
  Response bodies are parsed only when statistics are read, never on the request path.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import Any

from driftloop.core.errors import ServingError
from driftloop.core.shadow import quality_of

__all__ = ["PRIMARY", "CANARY", "Splitter", "TrafficStats", "DuplicateLabel", "predictions_of", "quality_of",
           "sticky_bucket"]

PRIMARY = "primary"
CANARY = "canary"


def sticky_bucket(key: str) -> float:
    """A stable position of ``key`` in [0, 100): the same key always maps to the same point."""
    digest = hashlib.blake2b(key.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % 10_000 / 100.0


class Splitter:
    """Chooses primary or canary for each request by the canary percentage."""

    def __init__(self, canary_percent: float = 0.0, *, seed: int | None = None) -> None:
        self.canary_percent = float(canary_percent)
        self._rng = random.Random(seed)

    def choose(self, key: str | None = None) -> str:
        pct = self.canary_percent
        if pct <= 0.0:
            return PRIMARY
        if pct >= 100.0:
            return CANARY
        point = sticky_bucket(key) if key else self._rng.random() * 100.0
        return CANARY if point < pct else PRIMARY


def predictions_of(body: bytes | None) -> list[Any]:
    """The per-row predictions of a V1 (``predictions``) or V2 (``outputs[0].data``) response body."""
    if not body:
        return []
    try:
        doc = json.loads(body, parse_constant=lambda _: None)  # NaN/Infinity (not JSON) read as "no value"
    except ValueError:
        return []
    if not isinstance(doc, dict):
        return []
    if isinstance(doc.get("predictions"), list):
        return doc["predictions"]
    outputs = doc.get("outputs")
    if isinstance(outputs, list) and outputs:
        chosen = next((o for o in outputs if isinstance(o, dict) and o.get("name") == "predictions"), outputs[0])
        data = chosen.get("data") if isinstance(chosen, dict) else None
        return list(data) if isinstance(data, list) else []
    return []


def _percentile(sorted_values: list[float], q: float) -> float | None:
    if not sorted_values:
        return None
    rank = max(0, math.ceil(q / 100.0 * len(sorted_values)) - 1)
    return sorted_values[rank]


@dataclass
class _Served:
    version: str
    body: bytes | None
    labelled: bool = False


class DuplicateLabel(ServingError):
    """A label for this request id was accepted before: one label per request id."""


class _VersionWindow:
    def __init__(self, max_obs: int) -> None:
        self.role = PRIMARY
        self.requests_total = 0
        self.errors_total = 0
        self.gateway_errors_total = 0
        self.obs: deque[tuple[float, int, float, bytes | None, bool]] = deque(maxlen=max_obs)
        self.labelled: deque[tuple[float, Any, Any]] = deque(maxlen=max_obs)


class TrafficStats:
    """Bounded per-version outcomes and the request-id → prediction join for label feedback."""

    def __init__(self, *, max_observations: int = 5_000, max_request_ids: int = 50_000) -> None:
        self.max_observations = max_observations
        self.max_request_ids = max_request_ids
        self._versions: dict[str, _VersionWindow] = {}
        self._served: OrderedDict[str, _Served] = OrderedDict()
        self._lock = threading.Lock()

    def _window(self, version: str) -> _VersionWindow:
        win = self._versions.get(version)
        if win is None:
            win = self._versions[version] = _VersionWindow(self.max_observations)
        return win

    def record(self, *, role: str, version: str, request_id: str, status: int, latency_ms: float,
               body: bytes | None, server_error: bool | None = None) -> None:
        """Note one served request (``body`` is the raw response, kept unparsed).

        ``server_error`` says whether a 5xx is the model server's own (its 5xx answer, or it could
        not be reached in time); a 502 the gateway made because a connection dropped is not, and is
        counted apart (``gateway_errors``), so no client can push a version toward rollback.
        Default: any status >= 500.
        """
        now = time.time()
        counted = status >= 500 if server_error is None else server_error
        with self._lock:
            win = self._window(version)
            win.role = role
            win.requests_total += 1
            if counted:
                win.errors_total += 1
            elif status >= 500:
                win.gateway_errors_total += 1
            ok_body = body if 200 <= status < 300 else None
            win.obs.append((now, status, latency_ms, ok_body, counted))
            if ok_body is not None:
                self._served[request_id] = _Served(version, ok_body)
                self._served.move_to_end(request_id)
                while len(self._served) > self.max_request_ids:
                    self._served.popitem(last=False)

    def feedback(self, request_id: str, label: Any) -> str:
        """Join one ground-truth label (one value, or one per row) with the served prediction.

        Returns the version that answered; raises ``KeyError`` for an unknown (or expired)
        request id, :class:`DuplicateLabel` when this id was labelled before, and ``ValueError``
        when a list of labels does not match the rows.
        """
        outcome = self.feedback_many([(request_id, label)])
        kind, value = outcome[0]
        if kind == "unknown":
            raise KeyError(request_id)
        if kind == "duplicate":
            raise DuplicateLabel(request_id)
        return value

    def feedback_many(self, items: list[tuple[str, Any]]) -> list[tuple[str, str]]:
        """Join labels with served predictions, all or nothing for the well-formed ones.

        Per item ``("accepted", version)``, ``("unknown", id)`` or ``("duplicate", id)`` (one
        label per request id, also within one call). A label list that does not match its
        request's rows raises ``ValueError`` before anything is recorded.
        """
        now = time.time()
        with self._lock:
            plan: list[tuple[str, Any]] = []
            seen: set[str] = set()
            for request_id, label in items:
                served = self._served.get(request_id)
                if served is None:
                    plan.append(("unknown", request_id))
                    continue
                if served.labelled or request_id in seen:
                    plan.append(("duplicate", request_id))
                    continue
                preds = predictions_of(served.body)
                labels = label if isinstance(label, list) else [label]
                if len(labels) != len(preds):
                    raise ValueError(f"request {request_id} had {len(preds)} prediction(s) but {len(labels)} "
                                     "label(s) were sent")
                seen.add(request_id)
                plan.append(("accepted", (request_id, served, preds, labels)))
            out: list[tuple[str, str]] = []
            for kind, value in plan:
                if kind != "accepted":
                    out.append((kind, value))
                    continue
                request_id, served, preds, labels = value
                served.labelled = True
                win = self._window(served.version)
                for pred, lab in zip(preds, labels):
                    win.labelled.append((now, pred, lab))
                out.append(("accepted", served.version))
            return out

    def roles(self) -> dict[str, str]:
        with self._lock:
            return {v: w.role for v, w in self._versions.items()}

    def summary(self, since: float | None = None, *, max_predictions: int = 2_000) -> dict[str, dict[str, Any]]:
        """Per version: requests, 5xx errors, error rate, p50/p99 latency (ms), recent predictions, quality.

        ``since`` (epoch seconds) limits the window; totals since start are reported too.
        """
        since = since or 0.0
        with self._lock:
            snapshot = {v: (w.role, w.requests_total, w.errors_total, w.gateway_errors_total,
                            [o for o in w.obs if o[0] >= since], [(p, y) for t, p, y in w.labelled if t >= since])
                        for v, w in self._versions.items()}
        out: dict[str, dict[str, Any]] = {}
        for version, (role, total, errors_total, gateway_errors_total, obs, pairs) in snapshot.items():
            latencies = sorted(o[2] for o in obs)
            errors = sum(1 for o in obs if o[4])
            preds: list[Any] = []
            for o in reversed(obs):
                if o[3] is not None and len(preds) < max_predictions:
                    preds.extend(predictions_of(o[3]))
            q = quality_of(pairs)
            out[version] = {
                "version": version,
                "role": role,
                "requests": len(obs),
                "errors": errors,
                "error_rate": errors / len(obs) if obs else None,
                "p50_ms": _percentile(latencies, 50),
                "p99_ms": _percentile(latencies, 99),
                "predictions": preds[:max_predictions],
                "labels": len(pairs),
                "quality_metric": q[0] if q else None,
                "quality": q[1] if q else None,
                "gateway_errors": sum(1 for o in obs if o[1] >= 500 and not o[4]),
                "requests_total": total,
                "errors_total": errors_total,
                "gateway_errors_total": gateway_errors_total,
            }
        return out
