"""The rollout controller: Flagger-style canary analysis aimed at the local gateway or an InferenceService.

Each interval the controller reads the canary's and the primary's numbers over the window
since the last weight change and runs the checks: error rate, p99 latency, minimum request
count, canary-vs-primary prediction distribution (PSI) and — when labels arrived — model
quality (canary − primary ≥ ``min_quality_delta``). All checks passing moves the weight one
step up (``step_weights`` or multiples of ``step_weight`` up to ``max_weight``); after the last
step the canary is promoted (MLflow alias ``champion`` moves, 100 % traffic), or waits for
a manual approval. A failed check counts; at ``threshold`` failed checks the canary is
rolled back (0 %, ``champion`` unchanged, the version tagged with the reason). An interval
whose numbers cannot be read (the target refuses or is unreachable) is recorded as
``unavailable`` and counts as neither a pass nor a failure.

Every step (time, weight, each check's number and verdict, decision, reason) is appended to
the state in ``<workspace>/rollout/<model>/state.json`` (written atomically, so the
controller resumes after a restart) and ``history.jsonl``; the outcome goes to MLflow tags
on the canary version and the history to an artifact on its run.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Protocol

from driftloop.core.errors import RolloutAborted, ServingError
from driftloop.core.files import atomic_write, private_dir

__all__ = [
    "Check", "RolloutState", "RolloutStore", "RolloutTarget", "GatewayTarget", "KServeTarget", "PrometheusMetrics",
    "MonitorClient", "MonitorQuality", "MonitorShadow", "MonitorPredictions", "HISTORY_ARTIFACT", "WEIGHT_TAG",
    "RolloutController", "evaluate_checks", "psi", "weight_schedule",
    "PENDING", "SHADOW", "PROGRESSING", "AWAITING_APPROVAL", "PROMOTED", "ROLLED_BACK",
]

log = logging.getLogger(__name__)

PENDING = "pending"
PROGRESSING = "progressing"
SHADOW = "shadow"  # mirrored traffic only: no user request is answered by the candidate
AWAITING_APPROVAL = "awaiting_approval"
PROMOTED = "promoted"
ROLLED_BACK = "rolled_back"
TERMINAL = (PROMOTED, ROLLED_BACK)
WEIGHT_TAG = "driftloop.rollout.weight"
HISTORY_ARTIFACT = "rollout/history.json"
_MIN_DISTRIBUTION_SAMPLES = 50
_MAX_DISTRIBUTION_SAMPLES = 2_000  # per version, as the local gateway's /admin/stats keeps them


# --- checks ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Check:
    """One check of one step: the number, the limit, and the verdict (None = not enough data)."""

    name: str
    value: float | None
    limit: float | None
    passed: bool | None
    detail: str = ""


def _numeric(values: list[Any]) -> list[float] | None:
    out = []
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            return None
        out.append(float(v))
    return out


def psi(expected: list[Any], actual: list[Any], *, bins: int = 10, eps: float = 1e-4) -> float:
    """Population stability index of ``actual`` against ``expected``.

    Numeric outputs with many distinct values are binned by the expected sample's deciles;
    class labels (or few distinct values) are compared level by level.
    """
    import numpy as np

    exp_num, act_num = _numeric(expected), _numeric(actual)
    if exp_num is not None and act_num is not None and len(set(exp_num)) > bins:
        edges = np.unique(np.quantile(np.asarray(exp_num), np.linspace(0, 1, bins + 1)[1:-1]))
        e = np.bincount(np.searchsorted(edges, exp_num, side="right"), minlength=len(edges) + 1)
        a = np.bincount(np.searchsorted(edges, act_num, side="right"), minlength=len(edges) + 1)
    else:
        levels = sorted({str(v) for v in expected} | {str(v) for v in actual})
        e = np.array([sum(1 for v in expected if str(v) == lv) for lv in levels])
        a = np.array([sum(1 for v in actual if str(v) == lv) for lv in levels])
    pe = np.maximum(e / max(e.sum(), 1), eps)
    pa = np.maximum(a / max(a.sum(), 1), eps)
    return float(np.sum((pa - pe) * np.log(pa / pe)))


def evaluate_checks(canary: dict[str, Any] | None, primary: dict[str, Any] | None, cfg: Any) -> list[Check]:
    """The analysis of one interval from per-version stats (as ``/admin/stats`` reports them)."""
    canary = canary or {}
    primary = primary or {}
    requests = int(canary.get("requests") or 0)
    enough = requests >= cfg.min_requests
    checks = [Check("requests", requests, cfg.min_requests, enough,
                    "" if enough else f"{requests} < {cfg.min_requests} requests reached the canary")]
    rate = canary.get("error_rate")
    checks.append(Check("error_rate", rate, cfg.max_error_rate,
                        None if rate is None or not enough else rate <= cfg.max_error_rate))
    p99 = canary.get("p99_ms")
    checks.append(Check("p99_ms", p99, cfg.max_p99_latency_ms,
                        None if p99 is None or not enough else p99 <= cfg.max_p99_latency_ms))
    c_pred, p_pred = canary.get("predictions") or [], primary.get("predictions") or []
    if len(c_pred) >= _MIN_DISTRIBUTION_SAMPLES and len(p_pred) >= _MIN_DISTRIBUTION_SAMPLES:
        value = psi(p_pred, c_pred)
        checks.append(Check("prediction_psi", value, cfg.max_prediction_psi, value <= cfg.max_prediction_psi))
    else:
        checks.append(Check("prediction_psi", None, cfg.max_prediction_psi, None,
                            f"needs {_MIN_DISTRIBUTION_SAMPLES} predictions on each side"))
    c_q, p_q = canary.get("quality"), primary.get("quality")
    labels = min(int(canary.get("labels") or 0), int(primary.get("labels") or 0))
    if c_q is not None and p_q is not None and labels >= max(cfg.min_labels, 1):
        delta = c_q - p_q
        checks.append(Check("quality_delta", delta, cfg.min_quality_delta, delta >= cfg.min_quality_delta,
                            f"{canary.get('quality_metric')}: canary {c_q:.4f} vs primary {p_q:.4f} on {labels}+ labels"))
    else:
        checks.append(Check("quality_delta", None, cfg.min_quality_delta, None,
                            f"needs {cfg.min_labels} labels on each side"))
    return checks


def weight_schedule(cfg: Any) -> list[int]:
    """The canary weights, in order: ``step_weights`` or multiples of ``step_weight``, capped at ``max_weight``."""
    if cfg.step_weights:
        weights = [w for w in cfg.step_weights if w <= cfg.max_weight]
        return weights or [cfg.max_weight]
    weights = list(range(cfg.step_weight, cfg.max_weight + 1, cfg.step_weight))
    if not weights or weights[-1] != cfg.max_weight:
        weights.append(cfg.max_weight)
    return weights


# --- state ----------------------------------------------------------------------------------
@dataclass
class RolloutState:
    model_name: str
    canary_version: str
    primary_version: str | None
    canary_uri: str = ""
    status: str = PENDING
    weight: int = 0
    step_index: int = -1
    failed_checks: int = 0
    approved: bool = False
    window_start: float = 0.0
    started_at: float = field(default_factory=time.time)
    updated_at: float = field(default_factory=time.time)
    reason: str = ""
    history: list[dict[str, Any]] = field(default_factory=list)

    @property
    def done(self) -> bool:
        return self.status in TERMINAL


class RolloutStore:
    """The controller's persisted state: ``state.json`` (atomic replace) + ``history.jsonl``."""

    def __init__(self, root: Path, model_name: str) -> None:
        self.dir = Path(root) / model_name
        self.state_path = self.dir / "state.json"
        self.history_path = self.dir / "history.jsonl"

    def load(self) -> RolloutState | None:
        if not self.state_path.is_file():
            return None
        try:
            return RolloutState(**json.loads(self.state_path.read_text()))
        except (ValueError, TypeError) as exc:
            raise ServingError(f"rollout state {self.state_path} is unreadable: {exc}") from exc

    def save(self, state: RolloutState, record: dict[str, Any] | None = None) -> None:
        """Replace ``state.json`` in one step (a temporary file of this process's own, then a rename), 0600."""
        private_dir(self.dir)
        state.updated_at = time.time()
        atomic_write(self.state_path, json.dumps(asdict(state), indent=1, default=str))
        if record is not None:
            with self.history_path.open("a") as fh:
                fh.write(json.dumps(record, default=str) + "\n")


# --- targets --------------------------------------------------------------------------------
class RolloutTarget(Protocol):
    """Where the canary runs: the local gateway or an InferenceService."""

    def set_weight(self, percent: int) -> None: ...

    def stats(self, since: float, canary_version: str, primary_version: str | None
              ) -> tuple[dict[str, Any] | None, dict[str, Any] | None]: ...

    def promote(self, state: RolloutState) -> None: ...

    def rollback(self, state: RolloutState) -> None: ...


class GatewayTarget:
    """The local gateway, through its admin API; promotion/rollback optionally through a backend
    that also manages the model-server processes (``LocalBackend``)."""

    def __init__(self, admin_url: str, backend: Any | None = None, timeout: float = 10.0, *,
                 token: str | None = None) -> None:
        """``token``: the gateway's admin bearer token (default: ``DRIFTLOOP_GATEWAY_TOKEN``)."""
        import httpx

        if token is None:
            token = os.environ.get("DRIFTLOOP_GATEWAY_TOKEN") or None
        self.admin_url = admin_url.rstrip("/")
        self.backend = backend
        headers = {"authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.Client(base_url=self.admin_url, timeout=timeout, headers=headers)

    def _call(self, method: str, path: str, **kw: Any) -> Any:
        import httpx

        try:
            resp = self._http.request(method, path, **kw)
        except httpx.HTTPError as exc:
            raise ServingError(f"gateway at {self.admin_url} is unreachable: {exc}") from exc
        if resp.status_code >= 400:
            raise ServingError(f"gateway refused {method} {path}: {resp.status_code} {resp.text[:300]}")
        try:
            return resp.json()
        except ValueError as exc:
            raise ServingError(f"gateway answered {method} {path} with a body that is not JSON: {exc}") from exc

    def set_weight(self, percent: int) -> None:
        if self.backend is not None:  # the serving state records the weight the gateway accepted
            self.backend.set_split(percent)
            return
        self._call("PUT", "/admin/split", json={"canary_percent": percent})

    def set_shadow(self, percent: float, state: RolloutState | None = None) -> None:
        """Mirror ``percent`` % to the gateway's canary upstream (the candidate); ``state`` is not needed here."""
        self._call("PUT", "/admin/shadow", json={"percent": percent})

    def shadow_stats(self, since: float, version: str | None = None) -> dict[str, Any]:
        """The gateway's own join (it mirrors to its one canary upstream, so ``version`` is not needed)."""
        return self._call("GET", "/admin/shadow", params={"since": since}).get("stats") or {}

    def stats(self, since: float, canary_version: str, primary_version: str | None):  # noqa: ANN201
        versions = self._call("GET", "/admin/stats", params={"since": since})["versions"]
        return versions.get(str(canary_version)), versions.get(str(primary_version)) if primary_version else None

    def promote(self, state: RolloutState) -> None:
        if self.backend is not None:
            self.backend.promote()
            return
        status = self._call("GET", "/admin/status")
        self._call("PUT", "/admin/upstreams", json={"primary": status["canary"], "canary": None})

    def rollback(self, state: RolloutState) -> None:
        if self.backend is not None:
            self.backend.rollback()
            return
        self._call("PUT", "/admin/upstreams", json={"canary": None})


class PrometheusMetrics:
    """Canary/primary numbers for an InferenceService from Prometheus (Knative revision metrics).

    In Serverless mode each InferenceService revision is a Knative revision; the queue-proxy
    exports ``revision_app_request_count`` and ``revision_app_request_latencies_bucket``
    labelled by ``namespace_name``, ``revision_name`` and ``response_code_class``.
    """

    def __init__(self, url: str, namespace: str, *, timeout: float = 10.0, client: Any | None = None) -> None:
        self.url = url.rstrip("/")
        self.namespace = namespace
        self.timeout = timeout
        self._client = client

    def queries(self, revision: str, window_seconds: float) -> dict[str, str]:
        sel = f'namespace_name="{self.namespace}",revision_name="{revision}"'
        w = f"{max(int(math.ceil(window_seconds)), 1)}s"
        return {
            "requests": f"sum(increase(revision_app_request_count{{{sel}}}[{w}]))",
            "error_rate": (f'sum(rate(revision_app_request_count{{{sel},response_code_class="5xx"}}[{w}]))'
                           f" / sum(rate(revision_app_request_count{{{sel}}}[{w}]))"),
            "p99_ms": f"histogram_quantile(0.99, sum by (le) (rate(revision_app_request_latencies_bucket{{{sel}}}[{w}])))",
        }

    def query(self, promql: str) -> float | None:
        import httpx

        client = self._client or httpx.Client(timeout=self.timeout)
        try:
            resp = client.get(f"{self.url}/api/v1/query", params={"query": promql})
            resp.raise_for_status()
            result = resp.json()["data"]["result"]
        except (httpx.HTTPError, KeyError, ValueError) as exc:
            raise ServingError(f"Prometheus query failed at {self.url}: {exc}") from exc
        if not result:
            return None
        value = float(result[0]["value"][1])
        return None if math.isnan(value) else value

    def revision_stats(self, revision: str, window_seconds: float) -> dict[str, Any]:
        out: dict[str, Any] = {k: self.query(q) for k, q in self.queries(revision, window_seconds).items()}
        out["requests"] = int(out["requests"] or 0)
        return out


class MonitorClient:
    """What the rollout controller reads from the monitor (``GET`` only), with the monitor's bearer
    token where it asks for one (``DRIFTLOOP_WEBHOOK_TOKEN``, the token the monitor checks)."""

    def __init__(self, url: str, *, timeout: float = 10.0, client: Any | None = None,
                 token: str | None = None) -> None:
        self.url = url.rstrip("/")
        self.timeout = timeout
        self._client = client
        self._token = token

    def _get(self, path: str, params: dict[str, Any], what: str) -> dict[str, Any]:
        import httpx

        client = self._client or httpx.Client(timeout=self.timeout)
        headers = {"authorization": f"Bearer {self._token}"} if self._token else {}
        try:
            resp = client.get(f"{self.url}{path}", params=params, headers=headers)
            resp.raise_for_status()
            return resp.json()
        except (httpx.HTTPError, ValueError) as exc:
            raise ServingError(f"monitor {what} query failed at {self.url}: {exc}") from exc


class MonitorQuality(MonitorClient):
    """Labelled quality per model version from the monitor's ``GET /quality`` (its inference log)."""

    def __init__(self, url: str, task: str = "classification", *, timeout: float = 10.0,
                 client: Any | None = None) -> None:
        super().__init__(url, timeout=timeout, client=client)
        self.task = task

    def versions(self, since: float) -> dict[str, dict[str, Any]]:
        """``{version: {"labels", "quality", "quality_metric"}}``; quality is higher-is-better."""
        try:
            found = self._get("/quality", {"since": since, "task": self.task}, "quality")["versions"]
        except (KeyError, TypeError) as exc:
            raise ServingError(f"monitor quality query at {self.url} answered without versions: {exc}") from exc
        out = {}
        for version, q in found.items():
            if self.task == "classification":
                value, metric = q.get("accuracy"), "accuracy"
            else:
                value, metric = (-q["mae"] if q.get("mae") is not None else None), "neg_mae"
            out[str(version)] = {"labels": int(q.get("n") or 0), "quality": value, "quality_metric": metric}
        return out


class MonitorShadow(MonitorClient):
    """A shadow phase on a cluster: the shadow's and the primary's logged answers joined by request id
    in the monitor (``GET /shadow``) — agreement or difference, both prediction samples, quality on the
    same labelled rows — the numbers the local gateway reports for its own join."""

    def summary(self, since: float, version: str | None = None) -> dict[str, Any]:
        params: dict[str, Any] = {"since": since}
        if version is not None:
            params["version"] = version
        stats = self._get("/shadow", params, "shadow").get("stats")
        if not isinstance(stats, dict):
            raise ServingError(f"monitor shadow query at {self.url} answered without stats")
        return stats


class MonitorPredictions(MonitorClient):
    """What the canary and the primary answered users, per model version, from the monitor's
    ``GET /predictions`` (its inference log; KServe's logger logs both revisions and the model
    server names its version in every response) — the samples of the ``prediction_psi`` check."""

    def samples(self, since: float, versions: list[str], limit: int = _MAX_DISTRIBUTION_SAMPLES
                ) -> dict[str, list[Any]]:
        """``{version: [prediction, ...]}``: the latest ``limit`` of each version since ``since``."""
        found = self._get("/predictions", {"since": since, "versions": ",".join(versions), "limit": limit},
                          "predictions")
        by_version = found.get("versions") if isinstance(found, dict) else None
        if not isinstance(by_version, dict):
            raise ServingError(f"monitor predictions query at {self.url} answered without versions")
        return {str(v): list((d or {}).get("predictions") or []) for v, d in by_version.items()}


class KServeTarget:
    """An InferenceService through ``KServeBackend``; error rate and latency from Prometheus by
    revision; from the monitor, when one is given: labelled quality and both prediction samples per
    version, and the shadow phase's join."""

    def __init__(self, backend: Any, metrics: PrometheusMetrics, quality: MonitorQuality | None = None,
                 shadow: MonitorShadow | None = None, predictions: MonitorPredictions | None = None) -> None:
        """``predictions`` defaults to the monitor ``shadow`` reads (same URL and bearer token)."""
        self.backend = backend
        self.metrics = metrics
        self.quality = quality
        self.shadow = shadow
        if predictions is None and shadow is not None:
            predictions = MonitorPredictions(shadow.url, timeout=shadow.timeout, client=shadow._client,
                                             token=shadow._token)
        self.predictions = predictions

    def set_weight(self, percent: int) -> None:
        self.backend.set_traffic(percent)

    def _revisions(self) -> tuple[str | None, str | None]:
        """(canary, primary) revisions: the latest ready one and the last rolled-out one."""
        status = self.backend.status()
        canary = status.latest_ready_revision
        primary = status.latest_rolledout_revision
        return (canary if canary != primary else None), primary

    def stats(self, since: float, canary_version: str, primary_version: str | None):  # noqa: ANN201
        """Per revision from Prometheus; quality and the prediction samples by version from the
        monitor. A monitor that cannot be read raises ``ServingError``: the interval is unavailable."""
        canary_rev, primary_rev = self._revisions()
        window = max(time.time() - since, 1.0)
        canary = self.metrics.revision_stats(canary_rev, window) if canary_rev else None
        primary = self.metrics.revision_stats(primary_rev, window) if primary_rev else None
        sides = [(stats, str(version)) for stats, version in ((canary, canary_version), (primary, primary_version))
                 if stats is not None and version is not None]
        if self.quality is not None:
            by_version = self.quality.versions(since)
            for stats, version in sides:
                stats.update(by_version.get(version, {}))
        if self.predictions is not None and sides:
            samples = self.predictions.samples(since, [version for _, version in sides])
            for stats, version in sides:
                stats["predictions"] = samples.get(version, [])
        return canary, primary

    def promote(self, state: RolloutState) -> None:
        self.backend.promote(state.canary_uri or f"models:/{state.model_name}/{state.canary_version}")

    def set_shadow(self, percent: float, state: RolloutState | None = None) -> None:
        """The shadow InferenceService + Istio mirror for the candidate (``KServeBackend.set_shadow``); 0 removes them."""
        if percent == 0 or state is None:
            self.backend.remove_shadow()
            return
        self.backend.set_shadow(state.canary_uri or f"models:/{state.model_name}/{state.canary_version}",
                                state.canary_version, percent)

    def shadow_stats(self, since: float, version: str | None = None) -> dict[str, Any]:
        """Mirrored requests, errors and p99 of the shadow's revision from Prometheus (its queue-proxy
        counts every copy it answered), and — with a monitor — the shadow's and the primary's answers
        joined by request id in the inference log: agreement or difference, both prediction samples
        (output PSI) and quality on the same labelled rows, so the shadow phase is judged on the same
        checks and limits as on the embedded default (see docs/rollouts.md)."""
        status = self.backend.shadow_status()
        revision = status.latest_ready_revision if status is not None else None
        if not revision:
            raise ServingError("the shadow InferenceService is not there or has no ready revision yet")
        stats = self.metrics.revision_stats(revision, max(time.time() - since, 1.0))
        rate = stats.get("error_rate")
        requests = int(stats.get("requests") or 0)
        out = {"requests": requests, "error_rate": rate, "p99_ms": stats.get("p99_ms"),
               "errors": round(rate * requests) if rate is not None else None, "revision": revision,
               "source": "prometheus"}
        if self.shadow is not None:
            joined = self.shadow.summary(since, version)
            out.update({k: v for k, v in joined.items() if k not in out})
            out["source"] = "prometheus+monitor"
        return out

    def rollback(self, state: RolloutState) -> None:
        self.backend.rollback()


# --- controller -----------------------------------------------------------------------------
def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, tz=timezone.utc).isoformat(timespec="seconds")


class RolloutController:
    """Drives one canary rollout step by step; state survives restarts."""

    def __init__(self, settings: Any, target: RolloutTarget, registry: Any | None = None, *,
                 model_name: str | None = None) -> None:
        self.settings = settings
        self.cfg = settings.rollout
        self.target = target
        self.registry = registry
        self.model_name = model_name or settings.mlflow.model_name
        self.store = RolloutStore(settings.workspace_dir / "rollout", self.model_name)
        self.schedule = weight_schedule(self.cfg)

    # -- lifecycle ------------------------------------------------------------------
    @classmethod
    def begin(cls, settings: Any, *, canary_version: str, primary_version: str | None, canary_uri: str = "",
              model_name: str | None = None) -> RolloutState:
        """Record a new pending rollout (the deploy step calls this); a finished one is replaced."""
        name = model_name or settings.mlflow.model_name
        store = RolloutStore(settings.workspace_dir / "rollout", name)
        current = store.load()
        if current is not None and not current.done and current.canary_version != str(canary_version):
            log.warning("replacing unfinished rollout of %s v%s with v%s", name, current.canary_version, canary_version)
        state = RolloutState(model_name=name, canary_version=str(canary_version),
                             primary_version=str(primary_version) if primary_version else None, canary_uri=canary_uri)
        store.save(state, {"time": _iso(time.time()), "decision": "pending", "canary": state.canary_version,
                           "primary": state.primary_version})
        return state

    def state(self) -> RolloutState:
        state = self.store.load()
        if state is None or state.done:
            adopted = self.adopt_pending(state)
            state = adopted or state
        if state is None:
            raise RolloutAborted(f"no rollout recorded for model {self.model_name!r} in {self.store.dir}")
        return state

    def adopt_pending(self, current: RolloutState | None = None) -> RolloutState | None:
        """Take over a canary that the deploy step marked pending in MLflow.

        On a cluster the deploy step runs in a pipeline pod and the controller in its own
        Deployment: they share MLflow, not a disk. The deploy step tags the canary version
        ``driftloop.rollout.outcome=pending``; a controller without an open rollout for it
        begins one (primary = the current champion).
        """
        from driftloop.core.registry import CHALLENGER, CHAMPION, TAG

        if self.registry is None:
            return None
        challenger = self.registry.version_by_alias(self.model_name, CHALLENGER)
        if challenger is None or challenger.tags.get(TAG.ROLLOUT) != PENDING:
            return None
        if current is not None and current.canary_version == challenger.version:
            return None  # this version's rollout already ran here
        champion = self.registry.version_by_alias(self.model_name, CHAMPION)
        if champion is not None and champion.version == challenger.version:
            return None
        log.info("adopting the pending canary %s v%s from MLflow", self.model_name, challenger.version)
        return type(self).begin(self.settings, canary_version=challenger.version,
                                primary_version=champion.version if champion else None,
                                canary_uri=f"models:/{self.model_name}/{challenger.version}", model_name=self.model_name)

    def _record(self, state: RolloutState, decision: str, reason: str, checks: list[Check] = (),
                **extra: Any) -> dict[str, Any]:
        now = time.time()
        rec = {"time": _iso(now), "ts": now, "weight": state.weight, "decision": decision, "reason": reason,
               "failed_checks": state.failed_checks, "checks": [asdict(c) for c in checks], **extra}
        state.history.append(rec)
        state.reason = reason
        self.store.save(state, rec)
        log.info("rollout %s v%s: %s at %s%% — %s", state.model_name, state.canary_version, decision, state.weight, reason)
        return rec

    # -- one interval -----------------------------------------------------------------
    def step(self) -> dict[str, Any]:
        """Run one analysis interval and act on it; returns the recorded step."""
        state = self.state()
        if state.done:
            return state.history[-1] if state.history else {"decision": state.status}
        if state.status == PENDING and self.cfg.shadow_percent > 0 and not any(
                h.get("decision") == "shadow_pass" for h in state.history):
            if hasattr(self.target, "set_shadow"):
                return self._start_shadow(state)
            log.warning("rollout.shadow_percent is set but this serving target has no shadow; canary steps only")
        if state.status == SHADOW:
            rec = self._judge_shadow(state)
            if rec is not None:
                return rec
        if state.status == PENDING:
            state.step_index = 0
            state.weight = self.schedule[0]
            self.target.set_weight(state.weight)
            state.status = PROGRESSING
            state.window_start = time.time()
            self._tag(state, {WEIGHT_TAG: str(state.weight)})
            return self._record(state, "start", f"canary v{state.canary_version} at {state.weight}%")
        if state.status == AWAITING_APPROVAL:
            if state.approved:
                return self._promote(state, "approved")
            return self._record(state, "await_approval", "analysis passed; waiting for manual approval")
        try:
            canary, primary = self.target.stats(state.window_start, state.canary_version, state.primary_version)
        except ServingError as exc:
            # no numbers is not a failed check: the canary keeps its weight and is judged next interval
            return self._record(state, "unavailable", f"statistics unavailable, judged next interval: {exc}")
        checks = evaluate_checks(canary, primary, self.cfg)
        failed = [c for c in checks if c.passed is False and c.name != "requests"]
        if failed:
            state.failed_checks += 1
            reason = "; ".join(f"{c.name}={_fmt(c.value)} breaks limit {_fmt(c.limit)}" for c in failed)
            if state.failed_checks >= self.cfg.threshold:
                return self._rollback(state, f"{state.failed_checks} failed checks: {reason}", checks)
            return self._record(state, "hold", f"failed check {state.failed_checks}/{self.cfg.threshold}: {reason}", checks)
        if not checks[0].passed:
            return self._record(state, "wait", checks[0].detail, checks)
        if state.step_index + 1 < len(self.schedule):
            state.step_index += 1
            state.weight = self.schedule[state.step_index]
            self.target.set_weight(state.weight)
            state.window_start = time.time()
            self._tag(state, {WEIGHT_TAG: str(state.weight)})
            return self._record(state, "advance", f"checks passed; canary weight -> {state.weight}%", checks)
        if self.cfg.manual_approval and not state.approved:
            state.status = AWAITING_APPROVAL
            return self._record(state, "await_approval", "analysis passed at max weight; waiting for manual approval",
                                checks)
        return self._promote(state, f"checks passed at {state.weight}%", checks)

    # -- shadow phase (serving.shadow) ---------------------------------------------------
    def _start_shadow(self, state: RolloutState) -> dict[str, Any]:
        self.target.set_weight(0)
        self.target.set_shadow(self.cfg.shadow_percent, state)
        state.status, state.weight, state.window_start = SHADOW, 0, time.time()
        self._tag(state, {WEIGHT_TAG: "0", "driftloop.rollout.phase": SHADOW})
        return self._record(state, "shadow_start", f"candidate v{state.canary_version} gets a copy of "
                            f"{self.cfg.shadow_percent:g}% of requests; no user sees its answers",
                            shadow_percent=self.cfg.shadow_percent)

    def _judge_shadow(self, state: RolloutState) -> dict[str, Any] | None:
        """One interval of the shadow phase: a record to return, or None when it passed (canary starts)."""
        from serving.shadow import shadow_checks

        try:
            summary = self.target.shadow_stats(state.window_start, state.canary_version)
        except ServingError as exc:
            return self._record(state, "unavailable", f"shadow statistics unavailable, judged next interval: {exc}")
        checks = shadow_checks(summary, self.cfg)
        failed = [c for c in checks if c.passed is False and c.name != "shadow_requests"]
        if failed:
            reason = "; ".join(f"{c.name}={_fmt(c.value)} breaks limit {_fmt(c.limit)}" for c in failed)
            self.target.set_shadow(0)
            return self._rollback(state, f"shadow phase failed, no user request was served by it: {reason}", checks)
        elapsed = time.time() - state.window_start
        if not checks[0].passed or elapsed < self.cfg.shadow_seconds:
            why = checks[0].detail or f"{elapsed:.0f}s < rollout.shadow_seconds={self.cfg.shadow_seconds:g}"
            return self._record(state, "shadow_wait", why, checks)
        self.target.set_shadow(0)
        state.status = PENDING
        self._record(state, "shadow_pass", f"shadow phase passed on {summary.get('requests')} mirrored requests",
                     checks)
        return None

    def run(self, until_done: bool = True, max_steps: int | None = None) -> RolloutState:
        """Step every ``interval_seconds`` until promoted/rolled back (or ``max_steps``)."""
        steps = 0
        while True:
            started = time.monotonic()
            self.step()
            steps += 1
            state = self.state()
            if state.done or (max_steps is not None and steps >= max_steps) or not until_done:
                return state
            if state.status == AWAITING_APPROVAL and not self.cfg.manual_approval:
                return state
            time.sleep(max(0.0, self.cfg.interval_seconds - (time.monotonic() - started)))

    # -- outcomes ---------------------------------------------------------------------
    def approve(self) -> RolloutState:
        state = self._open_state()
        state.approved = True
        self._record(state, "approved", "manual approval given")
        return state

    def _open_state(self) -> RolloutState:
        state = self.state()
        if state.done:
            raise RolloutAborted(f"rollout of v{state.canary_version} is already {state.status}")
        return state

    def promote(self, reason: str = "promoted by hand") -> dict[str, Any]:
        return self._promote(self._open_state(), reason)

    def rollback(self, reason: str = "rolled back by hand") -> dict[str, Any]:
        return self._rollback(self._open_state(), reason)

    def _promote(self, state: RolloutState, reason: str, checks: list[Check] = ()) -> dict[str, Any]:
        from driftloop.core.registry import CHAMPION

        if self.registry is not None:
            self.registry.set_alias(state.model_name, CHAMPION, state.canary_version)
        self.target.promote(state)
        return self._finish(state, PROMOTED, 100, "promote", reason, checks)

    def _rollback(self, state: RolloutState, reason: str, checks: list[Check] = ()) -> dict[str, Any]:
        self.target.rollback(state)
        return self._finish(state, ROLLED_BACK, 0, "rollback", reason, checks)

    def _finish(self, state: RolloutState, status: str, weight: int, decision: str, reason: str,
                checks: list[Check]) -> dict[str, Any]:
        from driftloop.core.registry import TAG

        state.status, state.weight = status, weight
        rec = self._record(state, decision, reason, checks)
        self._tag(state, {TAG.ROLLOUT: status, TAG.ROLLOUT_REASON: reason[:500], WEIGHT_TAG: str(weight)})
        self._log_history(state)
        return rec

    def _tag(self, state: RolloutState, tags: dict[str, str]) -> None:
        if self.registry is not None:
            self.registry.tag_version(state.model_name, state.canary_version, tags)

    def _log_history(self, state: RolloutState) -> None:
        """The step history as an artifact on the canary version's MLflow run."""
        if self.registry is None:
            return
        info = self.registry.get_version(state.model_name, state.canary_version)
        if not info.run_id:
            return
        with self.registry.translate_errors(f"cannot log the rollout history on run {info.run_id}"):
            self.registry.client.log_text(info.run_id, json.dumps(asdict(state), indent=1, default=str),
                                          HISTORY_ARTIFACT)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)
