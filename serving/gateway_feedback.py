"""The gateway's ``POST /feedback``: ground truth for the requests it served.

Labels are joined, by ``x-request-id``, with the prediction the gateway served, so that it keeps
per-version quality for the rollout controller (and the shadow mirror's comparison), and are
forwarded, one row per item with the version that answered, to the monitor's ``/feedback``
through a durable outbox (:class:`serving.feedback.FeedbackForwarder`). The route needs the
workspace's ingest token; a malformed body is refused whole and records nothing.

The gateway's log gets one line a minute at most about the labels it forwarded (how many, how
many the monitor stored, queued, refused), not httpx's line per request to the monitor -- that
one only at debug level.
"""

from __future__ import annotations

import logging
import math
import time
from collections import Counter
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from starlette.requests import Request
from starlette.responses import Response

from serving.feedback import FeedbackForwarder
from serving.gateway_base import (MAX_ID_CHARS, GatewayConfig, GatewayMetrics, StrictJSON, check_bearer,
                                  error_response, read_body, strict_loads)
from serving.traffic import TrafficStats

if TYPE_CHECKING:
    from serving.shadow import ShadowMirror

__all__ = ["GatewayFeedback", "LabelSummary"]

log = logging.getLogger(__name__)

_MAX_LABEL_CHARS = 256
SUMMARY_SECONDS = 60.0  # at most one line a minute about the labels forwarded


class LabelSummary:
    """Counts the label rows forwarded to the monitor by outcome; logs them in one line at most every
    ``every`` seconds (when the next labels come, and when the gateway stops)."""

    def __init__(self, every: float = SUMMARY_SECONDS, clock: Callable[[], float] = time.monotonic) -> None:
        self.every, self.clock = every, clock
        self.since = clock()
        self.rows: Counter[str] = Counter()

    def add(self, outcome: str, rows: int) -> None:
        self.rows[outcome] += rows
        if self.clock() - self.since >= self.every:
            self.flush()

    def flush(self) -> None:
        if self.rows:
            counts = ", ".join(f"{n} {outcome}" for outcome, n in sorted(self.rows.items()))
            log.info("labels: %d rows forwarded to the monitor in the last %.0f s (%s)", sum(self.rows.values()),
                     self.clock() - self.since, counts)
        self.rows.clear()
        self.since = self.clock()


class _PerRequestLines(logging.Filter):
    """Holds back httpx's INFO line for each request to ``url`` (one a labelled request: thousands in a
    rollout) unless the root logger is at debug level; :class:`LabelSummary` stands for them."""

    def __init__(self, url: str) -> None:
        super().__init__()
        self.url = url

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno > logging.INFO or logging.getLogger().isEnabledFor(logging.DEBUG):
            return True
        return self.url not in record.getMessage()


class _Served(Protocol):
    """What the feedback route reads of the gateway: its configuration, metrics, the statistics of what
    it served, and the shadow mirror while one runs."""

    cfg: GatewayConfig
    metrics: GatewayMetrics
    stats: TrafficStats
    shadow: ShadowMirror | None


def _is_json(request: Request) -> bool:
    ctype = request.headers.get("content-type", "")
    return ctype.split(";")[0].strip().lower() == "application/json"


def _label_problem(label: Any) -> str | None:
    """Why a label value is not acceptable, or None: a string, a bool or a finite number, or a
    non-empty list of them (one per row of the request)."""
    values = label if isinstance(label, list) else [label]
    if not values:
        return "label is an empty list"
    for v in values:
        if isinstance(v, str):
            if len(v) > _MAX_LABEL_CHARS:
                return f"label {v[:20]!r}… is longer than {_MAX_LABEL_CHARS} characters"
        elif isinstance(v, float):
            if not math.isfinite(v):
                return f"label {v!r} is not a finite number"
        elif not isinstance(v, (bool, int)):
            return f"label must be a string, a boolean or a number (or a list of them, one per row), got {v!r:.60}"
    return None


class GatewayFeedback:
    """``POST /feedback`` of one gateway, and the forwarder that takes its labels to the monitor."""

    def __init__(self, gw: _Served) -> None:
        self.gw = gw
        self.forwarder: FeedbackForwarder | None = None
        self.summary = LabelSummary()
        self._quiet: _PerRequestLines | None = None

    def start(self) -> None:
        """Start forwarding labels when the gateway has the monitor's ``/feedback`` and an outbox for it."""
        cfg, token = self.gw.cfg, self.gw.cfg.ingest_token
        if cfg.feedback_url and cfg.feedback_outbox:
            self.forwarder = FeedbackForwarder(cfg.feedback_url, cfg.feedback_outbox,
                                               headers={"authorization": f"Bearer {token}"} if token else None)
            self.forwarder.start()
            self._quiet = _PerRequestLines(cfg.feedback_url)
            logging.getLogger("httpx").addFilter(self._quiet)
            forwarder = self.forwarder  # read when scraped: a dead letter (> 0) is worth an alert
            for state in ("pending", "dead"):
                self.gw.metrics.feedback_outbox.labels(state).set_function(lambda s=state: forwarder.counts()[s])

    async def close(self) -> None:
        if self.forwarder is not None:
            await self.forwarder.close()
        self.summary.flush()
        if self._quiet is not None:
            logging.getLogger("httpx").removeFilter(self._quiet)

    async def feedback(self, request: Request) -> Response:
        """``{"id": <x-request-id>, "label": <value or one per row>}`` or a list of them.

        Needs ``Authorization: Bearer <ingest token>`` (401 otherwise). Refused whole (4xx, nothing
        recorded) when the body is not ``application/json`` (a
        cross-site form post cannot send that type), too large, not strict JSON, or an item is
        malformed. Otherwise each item is accepted once per request id; unknown ids and repeats
        are reported, not counted.
        """
        cfg, metrics = self.gw.cfg, self.gw.metrics
        if (denied := check_bearer(request, cfg, metrics, use="feedback")) is not None:
            return denied
        if not _is_json(request):
            metrics.rejected.labels(reason="feedback_content_type").inc()
            return error_response(415, "feedback must be sent as application/json, got "
                                       f"{request.headers.get('content-type') or 'no content-type'!r}")
        body = await read_body(request, cfg.max_feedback_bytes)
        if body is None:
            metrics.rejected.labels(reason="feedback_too_large").inc()
            return error_response(413, f"feedback larger than {cfg.max_feedback_bytes} bytes; send it in smaller "
                                       "batches")
        try:
            items = self._feedback_items(strict_loads(body, "feedback"))
        except ValueError as exc:
            metrics.rejected.labels(reason="feedback_malformed").inc()
            return error_response(400, str(exc))
        try:
            outcome = self.gw.stats.feedback_many(items)
        except ValueError as exc:
            metrics.rejected.labels(reason="feedback_rows").inc()
            return error_response(400, f"{exc}; nothing was recorded")
        if self.gw.shadow is not None:
            for (rid, label), (kind, _) in zip(items, outcome):
                if kind == "accepted":
                    self.gw.shadow.stats.label(rid, label)
        accepted = sum(1 for kind, _ in outcome if kind == "accepted")
        unknown = [v for kind, v in outcome if kind == "unknown"]
        duplicate = [v for kind, v in outcome if kind == "duplicate"]
        doc = {"accepted": accepted, "unknown": unknown, "duplicate": duplicate}
        if self.forwarder is not None and (accepted or unknown):
            return await self._forward_labels(items, outcome, doc)
        if not accepted and unknown:
            return error_response(404, f"unknown request id(s) {', '.join(unknown[:5])}: not served here or expired",
                                  **doc)
        if not accepted and duplicate:
            return error_response(409, f"request id(s) {', '.join(duplicate[:5])} already have a label; one label "
                                       "per request", **doc)
        return StrictJSON(doc)

    async def _forward_labels(self, items: list[tuple[str, Any]], outcome: list[tuple[str, str]],
                              doc: dict[str, Any]) -> Response:
        """Send the labels to the monitor (one item per row, with the version that answered); answer
        200 once it stored them, 202 once they are in the durable outbox (see serving.feedback).
        Ids this gateway does not know (served before a restart) go too: the monitor's log knows them."""
        rows = []
        for (rid, label), (kind, value) in zip(items, outcome):
            if kind == "duplicate":
                continue
            version = value if kind == "accepted" else None
            for i, lab in enumerate(label if isinstance(label, list) else [label]):
                rows.append({"id": rid, "row_index": i, "label": lab, **({"model_version": version} if version else {})})
        assert self.forwarder is not None
        result = await self.forwarder.forward(rows)
        self.summary.add(result.outcome, len(rows))
        if result.outcome == "refused":
            self.gw.metrics.rejected.labels(reason="feedback_monitor_refused").inc()
            detail = result.detail.get("error") if isinstance(result.detail, dict) else result.detail
            return error_response(result.status, f"the monitor refused the labels: {detail}", **doc)
        doc = {**doc, "monitor": result.outcome, "rows_forwarded": len(rows)}
        if result.outcome == "stored" and isinstance(result.detail, dict):
            doc["monitor_unknown"] = result.detail.get("unknown_ids", [])  # predictions not logged there yet
        return StrictJSON(doc, status_code=result.status)

    @staticmethod
    def _feedback_items(doc: Any) -> list[tuple[str, Any]]:
        """The (request id, label) pairs of a feedback body, or ``ValueError`` naming the bad item."""
        shape = 'feedback must be {"id": <request id>, "label": <value>} or a list of them'
        items = doc if isinstance(doc, list) else [doc]
        if not items:
            raise ValueError(f"{shape}; the list is empty")
        out = []
        for i, item in enumerate(items):
            where = f"item {i}: " if isinstance(doc, list) else ""
            if not isinstance(item, dict) or "id" not in item or "label" not in item:
                raise ValueError(f"{where}{shape}")
            if set(item) - {"id", "label"}:
                raise ValueError(f"{where}unknown key(s) {sorted(set(item) - {'id', 'label'})}; {shape}")
            rid = item["id"]
            if not isinstance(rid, str) or not rid or len(rid) > MAX_ID_CHARS:
                raise ValueError(f"{where}id must be the request's x-request-id (a non-empty string), got {rid!r:.60}")
            problem = _label_problem(item["label"])
            if problem:
                raise ValueError(f"{where}{problem}")
            out.append((rid, item["label"]))
        return out
