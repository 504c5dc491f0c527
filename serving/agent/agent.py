"""The serving agent's loop (``driftloop agent run``): observe, forecast, detect, propose, check, act, record.

Every ``step`` seconds a sampler reports the served model's request rate, p99 latency, error
rate (and CPU when known); the samples are kept in ``<workspace>/agent/samples.jsonl`` so a
restarted agent keeps its history. Once two days of history exist the forecasters are fitted
(and refitted daily); before that, and whenever no season is found, the agent stays reactive.
Each round, the floor planner and the anomaly detectors propose actions; the :class:`Guard`
judges each against the policy; allowed ones go to the actuator (local replicas or the
InferenceService); every decision, taken or refused, is written to the decision log with its
reason and, when it ran, what came of it.
"""

from __future__ import annotations

import json
import logging
import math
import os
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Protocol

from driftloop.core.errors import DriftloopError
from serving.agent.anomaly import AnomalyEvent, default_detectors
from serving.agent.decisions import DecisionLog
from serving.agent.forecast import ForecastSelector
from serving.agent.policy import ALERT, HAND_BACK, ROLLBACK, SET_FLOOR, Action, Decision, Guard, Policy
from serving.agent.scaling import FloorPlanner, horizons

if TYPE_CHECKING:
    from driftloop.core.config import AgentConfig, Settings

__all__ = ["ServingAgent", "GatewaySampler", "PrometheusSampler", "Sampler", "agent_paths", "merge_samples",
           "owns_count"]

log = logging.getLogger(__name__)
DAY = 86400.0


def agent_paths(settings: Settings) -> dict[str, Path]:
    a = settings.agent
    base = settings.workspace_dir / "agent"
    return {"decisions": Path(a.decision_log) if a.decision_log else base / "decisions.jsonl",
            "kill_switch": Path(a.kill_switch_file) if a.kill_switch_file else base / "STOP",
            "samples": base / "samples.jsonl"}


def owns_count(agent: AgentConfig, mode: str | None = None) -> bool:
    """Whether the agent owns the replica count (``agent.reactive: own``). Owning it needs lowering it,
    so in scale-up mode the agent only raises a floor under the reactive autoscaler, whatever
    ``agent.reactive`` says."""
    return agent.reactive == "own" and (mode or agent.mode) != "scale-up"


class Sampler(Protocol):
    def sample(self, now: float) -> dict[str, float] | None: ...


class GatewaySampler:
    """Request rate, p99 latency and error rate of the local gateway since the last call."""

    def __init__(self, gateway_url: str | Callable[[], str | None]) -> None:
        self._url = gateway_url
        self._since: float | None = None

    def sample(self, now: float) -> dict[str, float] | None:
        import httpx

        url = self._url() if callable(self._url) else self._url
        if not url:
            return None
        since, self._since = self._since, now
        if since is None:
            return None  # the first call only marks the start of the first step
        try:
            doc = httpx.get(f"{url}/admin/stats", params={"since": since}, timeout=5.0).json()
        except (httpx.HTTPError, ValueError) as exc:
            log.warning("gateway %s unreadable: %s", url, exc)
            return None
        versions = doc.get("versions", {}).values()
        requests = sum(v.get("requests", 0) for v in versions)
        errors = sum(v.get("errors", 0) for v in versions)
        p99 = max((v.get("p99_ms") or 0.0 for v in versions), default=0.0)
        span = max(now - since, 1e-3)
        return {"rps": requests / span, "latency_p99_ms": p99, "error_rate": errors / requests if requests else 0.0}


class PrometheusSampler:
    """The InferenceService's request rate, p99 latency and error rate from Knative's queue-proxy
    metrics in Prometheus (``rollout.prometheus_url``), over the last interval."""

    def __init__(self, url: str, name: str, namespace: str, window_seconds: float = 60.0,
                 client: Any | None = None) -> None:
        self.url = url.rstrip("/")
        sel = f'namespace_name="{namespace}",configuration_name=~"{name}-predictor.*"'
        w = f"{max(int(window_seconds), 30)}s"
        self.queries = {
            "rps": f"sum(rate(revision_app_request_count{{{sel}}}[{w}]))",
            "errors": f'sum(rate(revision_app_request_count{{{sel},response_code_class="5xx"}}[{w}]))',
            "latency_p99_ms": f"histogram_quantile(0.99, sum by (le) (rate(revision_app_request_latencies_bucket"
                              f"{{{sel}}}[{w}])))",
        }
        self._client = client

    def _query(self, query: str) -> float:
        import httpx

        client = self._client or httpx
        resp = client.get(f"{self.url}/api/v1/query", params={"query": query}, timeout=10.0)
        resp.raise_for_status()
        result = resp.json()["data"]["result"]
        if not result:
            return 0.0
        value = float(result[0]["value"][1])
        return value if math.isfinite(value) else 0.0

    def sample(self, now: float) -> dict[str, float] | None:
        import httpx

        try:
            got = {k: self._query(q) for k, q in self.queries.items()}
        except (httpx.HTTPError, ValueError, KeyError, IndexError, TypeError) as exc:
            log.warning("Prometheus %s unreadable: %s", self.url, exc)
            return None
        rps = got["rps"]
        return {"rps": rps, "latency_p99_ms": got["latency_p99_ms"],
                "error_rate": got["errors"] / rps if rps > 0 else 0.0}


class ServingAgent:
    """One served model's agent. ``actuator``: serving.agent.actions.LocalActuator / KServeActuator."""

    def __init__(self, settings: Settings, actuator: Any, *, mode: str | None = None, log_: DecisionLog | None = None,
                 alert: Callable[[dict[str, Any]], None] | None = None) -> None:
        a = settings.agent
        self.settings = settings
        self.model = settings.serving.name
        self.actuator = actuator
        self.paths = agent_paths(settings)
        self.policy = Policy.from_config(a, mode)
        self.guard = Guard(self.policy, kill_switch=self._kill_switch)
        self.log = log_ or DecisionLog(self.paths["decisions"])
        self.alert = alert or self._post_alert
        pol = a.models.get(self.model)
        capacity = pol.capacity_rps if pol and pol.capacity_rps else a.capacity_rps
        self.owns = owns_count(a, self.policy.mode)
        self.planner = FloorPlanner(self.model, capacity, a.target_utilisation, a.lead_seconds, a.interval_seconds,
                                    a.interval_seconds, floor=self.policy.bounds(self.model)[0],
                                    down_hysteresis=a.down_hysteresis, plan_seconds=a.plan_seconds, owns=self.owns)
        self._would_be: int | None = None  # observe mode: the count it would have set, proposals build on it
        self.detectors = default_detectors(a.slo_error_rate)
        self.history: list[dict[str, float]] = self._load_samples()
        self.selector: ForecastSelector | None = None
        self._fitted_at = -math.inf

    # -- state ------------------------------------------------------------------------------------
    def _load_samples(self) -> list[dict[str, float]]:
        path = self.paths["samples"]
        out = []
        if path.is_file():
            for line in path.read_text().splitlines():
                try:
                    out.append(json.loads(line))
                except ValueError:
                    continue
        return out

    def _kill_switch(self, model: str) -> str | None:
        if self.paths["kill_switch"].exists():
            return f"kill switch file {self.paths['kill_switch']} exists"
        try:
            return self.actuator.paused(model)
        except DriftloopError as exc:  # cannot tell: act as if it were set
            return f"cannot read the kill switch ({exc})"

    def _min_history(self) -> int:
        return int(2 * DAY / self.settings.agent.interval_seconds)

    def _grid(self) -> list[float]:
        """The history on its step grid; steps the agent missed (it was down) are interpolated."""
        import numpy as np

        step = self.settings.agent.interval_seconds
        if not self.history:
            return []
        t = np.array([s["t"] for s in self.history], float)
        y = np.array([s["rps"] for s in self.history], float)
        grid = np.arange(t[0], t[-1] + step / 2, step)
        return list(np.interp(grid, t, y))

    def _refit(self, now: float) -> None:
        a = self.settings.agent
        rates = self._grid()
        if len(rates) < self._min_history():
            return
        _, last = horizons(a.lead_seconds, a.interval_seconds, a.interval_seconds)
        self.selector = ForecastSelector(rates, season_candidates=[int(DAY / a.interval_seconds),
                                                                   int(7 * DAY / a.interval_seconds)],
                                         horizon=last, level=a.interval_level, engine=a.forecast_engine,
                                         error_window=int(DAY / a.interval_seconds))
        self._fitted_at = now
        log.info("forecasters fitted on %d steps: season %s, engine %s", len(rates), self.selector.season,
                 self.selector.engine)

    # -- one round --------------------------------------------------------------------------------
    def observe(self, now: float, sample: dict[str, float]) -> list[AnomalyEvent]:
        """Add one step of metrics; returns the anomalies it shows."""
        sample = {"t": now, **{k: float(v) for k, v in sample.items()}}
        expected = self.selector.band(1).point if self.selector is not None else None
        events = []
        for name, det in self.detectors.items():
            key = "rps" if name == "traffic_rps" else name
            if key in sample:
                ev = det.update(now, sample[key], expected if name == "traffic_rps" else None)
                if ev is not None:
                    events.append(ev)
        self.history.append(sample)
        path = self.paths["samples"]
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(sample) + "\n")
        if self.selector is not None:
            step = self.settings.agent.interval_seconds
            last = self.history[-2]["t"] if len(self.history) > 1 else now
            for _ in range(min(int(round((now - last) / step)) - 1, int(DAY / step))):
                self.selector.update(self.selector.band(1).point)  # a missed step: its forecast stands in
            self.selector.update(sample["rps"])
        if now - self._fitted_at >= DAY:
            self._refit(now)
        return events

    def proposals(self, events: list[AnomalyEvent], current: int, observed_rps: float | None = None) -> list[Action]:
        out: list[Action] = []
        if self.selector is None and current < self.planner.floor:
            out.append(Action(SET_FLOOR, self.model, self.planner.floor, current, "below the policy's floor"))
        else:
            action = self.planner.propose(self.selector, current, observed_rps if self.owns else None)
            if action is not None:
                out.append(action)
        for ev in events:
            detail = {"metric": ev.metric, "value": ev.value, "expected": ev.expected, "z": round(ev.z, 2)}
            if ev.metric in ("latency_p99_ms", "cpu"):
                raise_to = current + max(1, math.ceil(0.25 * current))
                if not any(a.kind == SET_FLOOR and (a.target or 0) >= raise_to for a in out):
                    out = [a for a in out if a.kind != SET_FLOOR]
                    out.append(Action(SET_FLOOR, self.model, raise_to, current, f"anomaly: {ev.reason}", detail))
            elif ev.metric == "error_rate" and self._canary_in_flight():
                out.append(Action(ROLLBACK, self.model, reason=f"anomaly while a canary is out: {ev.reason}",
                                  detail=detail))
            out.append(Action(ALERT, self.model, reason=f"anomaly: {ev.reason}", detail=detail))
        return out

    def _canary_in_flight(self) -> bool:
        try:
            return self.actuator.canary_in_flight(self.model)
        except DriftloopError:
            return False

    def current(self) -> int | None:
        """The replica count in force (observe mode: the one it would have set); None when unreadable."""
        if self.policy.mode == "observe" and self._would_be is not None:
            return self._would_be
        try:
            return self.actuator.current_floor(self.model)
        except DriftloopError as exc:
            log.warning("%s: cannot read the current replicas: %s", self.model, exc)
            return None

    _current = current

    def decide(self, now: float, events: list[AnomalyEvent], observed_rps: float | None = None) -> list[dict[str, Any]]:
        """Judge and carry out this round's proposals; returns the log records. ``observed_rps``: the
        load now (default: the last sample's)."""
        current = self.current()
        if current is None:
            return []
        records = []
        for action in self.proposals(events, current, self.observed_rps(observed_rps)):
            decision = self.guard.check(action, now)
            records.append(self.carry_out(decision))
        return records

    def observed_rps(self, given: float | None = None) -> float | None:
        """The load now: ``given``, else the last sample's."""
        if given is None and self.history:
            return self.history[-1].get("rps")
        return given

    def guard_proposal(self, now: float, observed_rps: float, current: int) -> Action | None:
        """The reactive guard's raise for the load now (owning the count), not yet judged."""
        return self.planner.react(self.selector, current, observed_rps, now=now) if self.owns else None

    def guard_round(self, now: float, observed_rps: float) -> list[dict[str, Any]]:
        """The reactive guard between rounds (owning the count): one urgent raise when the load now is
        more than the replicas serve, checked by the policy like every action."""
        current = self.current() if self.owns else None
        if current is None:
            return []
        action = self.guard_proposal(now, observed_rps, current)
        return [] if action is None else [self.carry_out(self.guard.check(action, now))]

    def hand_back(self, now: float) -> dict[str, Any] | None:
        """On a graceful stop while owning the count (full mode): KServe's autoscaler gets its range back,
        recorded as a decision. Not while the kill switch is on: then nothing is touched."""
        if not self.owns or self.policy.mode != "full":
            return None
        action = Action(HAND_BACK, self.model, reason="agent stopping: scaling handed back to KServe's autoscaler")
        paused = self._kill_switch(self.model)
        if paused is not None:
            return self.log.record(Decision(now, self.policy.mode, action, False, f"not handed back: {paused}"))
        try:
            result = self.actuator.hand_back(self.model)
        except DriftloopError as exc:
            return self.log.record(Decision(now, self.policy.mode, action, True, action.reason), result="failed",
                                   error=str(exc))
        if result is None:
            return None
        return self.log.record(Decision(now, self.policy.mode, action, True, action.reason), result=result)

    def carry_out(self, d: Decision) -> dict[str, Any]:
        """Run a judged decision (when allowed) and record it with what came of it."""
        if d.action.kind == SET_FLOOR and self.policy.mode == "observe" and d.applied is not None:
            self._would_be = d.applied
        if not d.allowed:
            return self.log.record(d)
        try:
            if d.action.kind == SET_FLOOR:
                result = self.actuator.set_floor(d.action.model, int(d.applied))
            elif d.action.kind == ROLLBACK:
                result = self.actuator.rollback(d.action.model)
            else:
                self.alert({"model": d.action.model, "reason": d.action.reason, **d.action.detail})
                result = "alert raised" if self.settings.agent.alert_url else "alert recorded (no agent.alert_url)"
        except DriftloopError as exc:
            return self.log.record(d, result="failed", error=str(exc))
        return self.log.record(d, result=result)

    def _post_alert(self, doc: dict[str, Any]) -> None:
        """An Alertmanager-style webhook call to ``agent.alert_url`` (the monitor's), token from the env."""
        import httpx

        url = self.settings.agent.alert_url
        if not url:
            return
        token = os.environ.get("DRIFTLOOP_WEBHOOK_TOKEN")
        body = {"version": "4", "status": "firing", "receiver": "driftloop-agent", "alerts": [{
            "status": "firing", "labels": {"alertname": "DriftloopServingAnomaly", "model": doc["model"],
                                           "metric": str(doc.get("metric", ""))},
            "annotations": {"summary": doc["reason"]}}]}
        try:
            httpx.post(url, json=body, timeout=5.0,
                       headers={"authorization": f"Bearer {token}"} if token else {}).raise_for_status()
        except httpx.HTTPError as exc:
            raise DriftloopError(f"alert webhook {url} failed: {exc}") from exc

    def round(self, now: float, sample: dict[str, float] | None, observed_rps: float | None = None
              ) -> list[dict[str, Any]]:
        events = self.observe(now, sample) if sample else []
        return self.decide(now, events, observed_rps)

    def run(self, sampler: Sampler, stop: threading.Event, *, clock: Callable[[], float] = time.time,
            rounds: int | None = None, on_record: Callable[[dict[str, Any]], None] | None = None) -> None:
        """Decide every ``agent.interval_seconds`` until ``stop`` is set (or after ``rounds``); owning the
        count, sample every ``agent.guard_seconds`` and run the reactive guard on each sample."""
        a = self.settings.agent
        tick = min(a.guard_seconds, a.interval_seconds) if self.owns else a.interval_seconds
        per_round = max(1, round(a.interval_seconds / tick))
        sampler.sample(clock())
        window: list[dict[str, float]] = []
        ticks = done = 0
        while not stop.wait(tick):
            now = clock()
            ticks += 1
            try:
                sample = sampler.sample(now)
                if sample:
                    window.append(sample)
                records: list[dict[str, Any]] = []
                if ticks % per_round == 0:  # a decision round on the interval's samples merged
                    records = self.round(now, merge_samples(window), sample["rps"] if sample else None)
                    window = []
                    done += 1
                elif sample:
                    records = self.guard_round(now, sample["rps"])
                for rec in records:
                    if on_record:
                        on_record(rec)
            except DriftloopError as exc:
                log.warning("agent round failed: %s", exc)
            if rounds is not None and done >= rounds:
                break


def merge_samples(samples: list[dict[str, float]]) -> dict[str, float] | None:
    """Equal-length samples as one: mean request rate, worst p99, errors weighted by requests."""
    if not samples:
        return None
    rps = sum(s["rps"] for s in samples) / len(samples)
    out = {"rps": rps}
    if any("latency_p99_ms" in s for s in samples):
        out["latency_p99_ms"] = max(s.get("latency_p99_ms", 0.0) for s in samples)
    if any("error_rate" in s for s in samples):
        weight = sum(s["rps"] for s in samples)
        out["error_rate"] = (sum(s.get("error_rate", 0.0) * s["rps"] for s in samples) / weight if weight
                             else max(s.get("error_rate", 0.0) for s in samples))
    if any("cpu" in s for s in samples):
        out["cpu"] = sum(s.get("cpu", 0.0) for s in samples) / len(samples)
    return out
