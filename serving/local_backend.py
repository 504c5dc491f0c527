"""The embedded-default serving backend: model-server and gateway processes on 127.0.0.1.

The primary (champion) and the canary (challenger) are each a ``python -m serving.predictor``
process (kserve's ``ModelServer``) on a free port; ``python -m serving.gateway`` sits in front
of them. Every process starts in its own session and is stopped with SIGTERM, then SIGKILL
after a timeout. A state file in the workspace (``<workspace>/serving/state.json``: pids,
ports, versions, split, a pending canary) lets ``driftloop serve``, the pipeline's deploy step
(which runs in a kfp.local step subprocess) and the rollout controller agree on what runs;
entries whose process has died are dropped when the file is read.

The primary can run as several replicas (``set_replicas``: more model-server processes of the
champion's version, listed under ``replicas`` in the state); the gateway balances over them. A
replica is started and ready before the gateway sends it anything, and taken out of the gateway
and drained (no request in flight) before it is stopped, so scaling drops no request.

The state also names the process that serves (``owner``: the ``driftloop serve`` that started
it). A second ``serve`` while that owner lives is refused before anything is touched; after an
owner that died without stopping (SIGKILL), a new ``serve`` stops what it left and takes over; a
canary that was out becomes pending at the weight the gateway ran it at, so the new ``serve`` puts
it back there and the rollout resumes where it was.
The gateway's admin calls carry the bearer token from ``DRIFTLOOP_GATEWAY_TOKEN``; a ``serve``
started without one makes one for itself and its children and writes it, readable by this user
only (0600), to ``<workspace>/serving/gateway.token``, where the other processes of the same
workspace that change traffic (``driftloop rollout run``, the deploy step of a retraining run the
monitor started) find it when the variable is not set — as a kubeconfig or a Jupyter token file. A
later ``serve`` reuses that file's token. The gateway also gets the workspace's ingest token
(``DRIFTLOOP_INGEST_TOKEN``, ``<workspace>/monitor/ingest.token``) for its POSTs to the monitor.

While ``serve`` runs, a :class:`Supervisor` watches every process like a kubelet: a process that
exits, or a model server whose readiness probe fails ``failure_threshold`` times in a row, is
taken out of the gateway's routing and restarted with exponential back-off (CrashLoopBackOff); a
canary that keeps dying is rolled back. Entries of dead processes stay in the state while their
supervising ``serve`` lives (it restarts them); ``down`` lists them and ``restarts`` counts restarts.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from driftloop.core.errors import ServingError
from driftloop.core.processes import free_port, process_alive, stop_process, stop_processes
from serving.gateway_client import GatewayAdminClient
from serving.local_processes import ProcessInfo, ProcessLauncher
from serving.local_state import ServingState

if TYPE_CHECKING:
    from driftloop.core.config import Settings

__all__ = ["LocalBackend", "ProcessInfo", "Supervisor", "stop_process", "process_alive", "free_port"]

MODEL_ROLES = ("primary", "canary")

log = logging.getLogger(__name__)


def files_location(settings: Settings, version: str, model_uri: str) -> str | None:
    """Where a pinned version's files are, when this process can say so cheaply: it has MLflow loaded
    already (``driftloop serve``, the deploy step) and ``model_uri`` names that version. The model server
    then loads them without opening the tracking store (SQLAlchemy and the store's start cost it ~2.3 s
    of an ~8 s start on a slow 2-core machine). Otherwise (None) it resolves ``model_uri`` itself."""
    import re
    import sys

    name = settings.mlflow.model_name
    if "mlflow" not in sys.modules or not re.fullmatch(rf"models:/{re.escape(name)}/{re.escape(str(version))}",
                                                        model_uri):
        return None
    from driftloop.core.errors import RegistryError
    from driftloop.core.registry import Registry

    try:
        return Registry.from_settings(settings).files_location(name, str(version))
    except RegistryError as exc:  # the model server resolves it and reports what is wrong
        log.debug("model files of %s: %s", model_uri, exc)
        return None


class LocalBackend:
    """Start, change and stop the local serving processes; the state file is the truth.

    Its parts: the state file (``state``, :class:`serving.local_state.ServingState`), the processes it
    starts (``launcher``, :class:`serving.local_processes.ProcessLauncher`) and the gateway's admin API
    (``gateway_admin``, :class:`serving.gateway_client.GatewayAdminClient`)."""

    #: readiness route of a model server (KServe V2; the predictor always serves it)
    READY_PATH = "/v2/health/ready"

    def __init__(self, settings: Settings, *, ready_timeout: float = 180.0, stop_timeout: float = 10.0) -> None:
        self.settings = settings
        self.dir = settings.workspace_dir / "serving"
        self.state = ServingState(self.dir)
        self.state_path = self.state.path
        self.gateway_admin = GatewayAdminClient(self.dir / "gateway.token")
        self.launcher = ProcessLauncher(settings, self.state, ready_timeout=ready_timeout, stop_timeout=stop_timeout)

    @property
    def ready_timeout(self) -> float:
        return self.launcher.ready_timeout

    @property
    def stop_timeout(self) -> float:
        return self.launcher.stop_timeout

    # -- tokens -----------------------------------------------------------------------
    @property
    def token_path(self) -> Path:
        return self.gateway_admin.token_path

    def admin_token(self) -> str | None:
        """The gateway's admin bearer token: ``DRIFTLOOP_GATEWAY_TOKEN``, else the workspace's token file."""
        return self.gateway_admin.admin_token()

    def _ensure_admin_token(self) -> None:
        self.gateway_admin.ensure_admin_token()

    def ingest_token(self) -> str:
        """The monitor's ingest token, which the gateway sends on its POSTs to /events and /feedback."""
        return self.launcher.ingest_token()

    # -- state ------------------------------------------------------------------------
    def _claim(self, state: dict[str, Any]) -> None:
        """Refuse (touching nothing) while another live serve owns this workspace; stop what a dead one left."""
        running = [role for role in ("gateway", "canary", "primary") if state.get(role)]
        if not running:
            return
        owner = state.get("owner")
        gw = state.get("gateway") or {}
        if owner and owner != os.getpid():
            raise ServingError(f"already serving at {gw.get('url', '?')} (driftloop serve, pid {owner}); "
                               "stop it first")
        if owner == os.getpid():
            raise ServingError(f"already serving at {gw.get('url', '?')} from this process; stop it first")
        log.warning("taking over: the serve that started %s is gone; stopping what it left (pids %s)",
                    ", ".join(running), ", ".join(str(state[r]["pid"]) for r in running))
        self.state.keep_canary_pending(state)
        self._stop_all(state)

    def shared(self, entry: dict[str, Any]) -> bool:
        """Whether a process of the state also serves other models (a fleet's gateway or packed model server,
        :mod:`serving.fleet_backend`): this model never stops or restarts it alone. Here: none is."""
        return False

    def status(self) -> dict[str, Any]:
        with self.state.locked() as state:
            return dict(state)

    @property
    def gateway_url(self) -> str | None:
        gw = self.status().get("gateway")
        return gw["url"] if gw else None

    # -- processes --------------------------------------------------------------------
    def _spawn(self, role: str, argv: list[str], port: int, ready_path: str, **info: str) -> ProcessInfo:
        return self.launcher.spawn(role, argv, port, ready_path, **info)

    def model_server_argv(self, version: str, model_uri: str, port: int) -> list[str]:
        """``python -m`` arguments of one model server (``serving.predictor``)."""
        s = self.settings
        argv = ["serving.predictor", "--model-name", s.serving.name, "--model-uri", model_uri,
                "--tracking-uri", s.tracking_uri, "--http-port", str(port), "--host", s.serving.host,
                "--max-payload-bytes", str(s.serving.max_payload_bytes)]
        location = files_location(s, version, model_uri)
        if location:
            argv += ["--model-location", location, "--model-version", str(version)]
        return argv

    def start_model_server(self, role: str, version: str, model_uri: str, port: int = 0) -> ProcessInfo:
        s = self.settings
        port = port or free_port(s.serving.host)
        log.info("starting %s model server v%s on port %d", role, version, port)
        return self._spawn(role, self.model_server_argv(version, model_uri, port), port, self.READY_PATH,
                           version=version, model_uri=model_uri)

    def sink_url(self) -> str:
        m = self.settings.monitor
        return f"http://{m.host}:{m.port}{m.base_path}/events"

    def start_gateway(self, primary: ProcessInfo, canary: ProcessInfo | None, percent: float, *,
                      replicas: list[dict[str, Any]] = (), port: int = 0) -> ProcessInfo:
        s = self.settings
        port = port or s.serving.gateway_port or free_port(s.serving.host)
        argv = ["serving.gateway", "--name", s.serving.name, "--namespace", s.serving.namespace,
                "--host", s.serving.host, "--port", str(port), "--primary-url", primary.url,
                "--primary-version", primary.version, "--sink-url", self.sink_url(),
                "--feedback-outbox", str(s.workspace_dir / "serving" / "feedback-outbox.db"),
                "--event-outbox", str(s.workspace_dir / "serving" / "events-outbox.db"),
                "--serving-state", str(self.state_path),
                "--max-payload-bytes", str(s.serving.max_payload_bytes)]
        if canary is not None:
            argv += ["--canary-url", canary.url, "--canary-version", canary.version, "--canary-percent", str(percent)]
        for r in replicas:
            argv += ["--replica-url", r["url"]]
        if s.serving.sticky_key:
            argv += ["--sticky-key", s.serving.sticky_key]
        log.info("starting gateway on port %d", port)
        return self._spawn("gateway", argv, port, "/healthz")

    # -- replicas ---------------------------------------------------------------------
    def replica_count(self) -> int:
        """Model-server processes serving the primary (0 when nothing is served)."""
        state = self.status()
        return (1 + len(state.get("replicas") or [])) if state.get("primary") else 0

    def set_replicas(self, n: int, *, drain_timeout: float = 30.0) -> int:
        """Serve the primary with ``n`` processes (at least 1). New ones are ready before the gateway
        sends them anything; removed ones are taken out of the gateway and drained before they stop."""
        import httpx

        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ServingError(f"replicas must be an integer of at least 1, got {n!r}")
        with self.state.locked() as state:
            primary, gateway = state.get("primary"), state.get("gateway")
            if not primary or not gateway:
                raise ServingError("nothing is being served here; start it with `driftloop serve`")
            extras: list[dict[str, Any]] = list(state.get("replicas") or [])
            if n - 1 == len(extras):
                return n
            if n - 1 > len(extras):
                started: list[ProcessInfo] = []
                try:
                    used = {int(r["role"].split("-")[1]) for r in extras}
                    for i in (i for i in range(1, 10_000) if i not in used):
                        if len(extras) + len(started) >= n - 1:
                            break
                        started.append(self.start_model_server(f"replica-{i}", primary["version"],
                                                               primary["model_uri"]))
                    keep = extras + [asdict(p) for p in started]
                    self.gateway_admin.call(gateway, "PUT", "/admin/replicas",
                                {"replicas": [{"url": r["url"], "version": r["version"]} for r in keep]})
                except BaseException:
                    for proc in started:
                        stop_process(proc.pid, self.stop_timeout)
                    raise
                state["replicas"] = keep
                log.info("primary v%s now on %d replicas", primary["version"], n)
                return n
            keep, drop = extras[: n - 1], extras[n - 1:]
            self.gateway_admin.call(gateway, "PUT", "/admin/replicas",
                        {"replicas": [{"url": r["url"], "version": r["version"]} for r in keep]})
            state["replicas"] = keep
            urls = {r["url"] for r in drop}
            deadline = time.monotonic() + drain_timeout
            with httpx.Client(timeout=5.0) as client:  # one for every poll (a client each loads the CA bundle)
                while time.monotonic() < deadline:  # requests already sent to a dropped replica finish first
                    try:
                        inflight = client.get(gateway["url"] + "/admin/status").json().get("inflight", {})
                    except (httpx.HTTPError, ValueError):
                        break
                    if not urls & set(inflight):
                        break
                    time.sleep(0.05)
            for r in drop:
                stop_process(int(r["pid"]), self.stop_timeout)
            log.info("primary v%s now on %d replicas", primary["version"], n)
            return n

    # -- operations -------------------------------------------------------------------
    def serve(self, champion_version: str, *, canary: tuple[str, str] | None = None, percent: float = 0.0
              ) -> dict[str, Any]:
        """Start the champion, an optional canary ``(version, model_uri)`` and the gateway."""
        name = self.settings.mlflow.model_name
        with self.state.locked() as state:
            self._claim(state)
            self._ensure_admin_token()
            started: list[ProcessInfo] = []
            try:
                primary = self.start_model_server("primary", champion_version, f"models:/{name}/{champion_version}",
                                                  self.settings.serving.primary_port)
                started.append(primary)
                can = None
                if canary is not None:
                    can = self.start_model_server("canary", canary[0], canary[1], self.settings.serving.canary_port)
                    started.append(can)
                gateway = self.start_gateway(primary, can, percent if can else 0.0)
                started.append(gateway)
            except BaseException:
                for proc in reversed(started):
                    stop_process(proc.pid, self.stop_timeout)
                raise
            state.update(primary=asdict(primary), canary=asdict(can) if can else None, gateway=asdict(gateway),
                         canary_percent=percent if can else 0, pending_canary=None, owner=os.getpid(), down={})
            return dict(state)

    def deploy_canary(self, version: str, model_uri: str, percent: float) -> str:
        """Start the canary behind the running gateway at ``percent``, or record it as pending."""
        with self.state.locked() as state:
            if not state["gateway"] or not state["primary"]:
                state["pending_canary"] = {"version": str(version), "model_uri": model_uri, "percent": percent}
                return (f"nothing is being served here; canary v{version} is pending and starts with "
                        f"`driftloop serve`")
            if state["canary"]:
                stop_process(int(state["canary"]["pid"]), self.stop_timeout)
                state["canary"] = None
            canary = self.start_model_server("canary", str(version), model_uri, self.settings.serving.canary_port)
            try:
                self.gateway_admin.call(state["gateway"], "PUT", "/admin/upstreams",
                            {"canary": {"url": canary.url, "version": canary.version}, "canary_percent": percent})
            except ServingError:
                stop_process(canary.pid, self.stop_timeout)
                raise
            state.update(canary=asdict(canary), canary_percent=percent, pending_canary=None)
            return f"canary v{version} serves {percent:g}% of traffic at {state['gateway']['url']}"

    def set_split(self, percent: float) -> None:
        with self.state.locked() as state:
            if state["gateway"]:
                self.gateway_admin.call(state["gateway"], "PUT", "/admin/split", {"canary_percent": percent})
            state["canary_percent"] = percent

    def promote(self) -> None:
        """The canary becomes the primary (100 %); the old primary is stopped."""
        with self.state.locked() as state:
            canary, old = state["canary"], state["primary"]
            if not canary or not state["gateway"]:
                raise ServingError("no canary is being served here; nothing to promote")
            self.gateway_admin.call(state["gateway"], "PUT", "/admin/upstreams",
                        {"primary": {"url": canary["url"], "version": canary["version"]}, "canary": None})
            canary["role"] = "primary"
            state.update(primary=canary, canary=None, canary_percent=0)
            # the replicas served the old version
            stop_processes([int(e["pid"]) for e in [old, *(state.get("replicas") or [])] if e and not self.shared(e)],
                           self.stop_timeout)
            state["replicas"] = []

    def rollback(self) -> None:
        """0 % to the canary; its server is stopped; the primary keeps serving."""
        with self.state.locked() as state:
            if state["gateway"]:
                self.gateway_admin.call(state["gateway"], "PUT", "/admin/upstreams", {"canary": None})
            if state["canary"]:
                stop_process(int(state["canary"]["pid"]), self.stop_timeout)
            state.update(canary=None, canary_percent=0, pending_canary=None)
            state.get("down", {}).pop("canary", None)

    def stop(self, *, owner: int | None = None) -> bool:
        """Stop every process this workspace serves with (gateway first).

        With ``owner``, only when that process still owns them (a serve that was refused or
        taken over stops nothing). A canary still out becomes pending again, so the next serve
        puts it back and its rollout resumes; a pending canary is kept. Returns whether it stopped.
        """
        with self.state.locked() as state:
            if owner is not None and state.get("owner") not in (owner, None):
                return False
            if owner is not None and state.get("owner") is None and state.get("gateway"):
                return False
            self.state.keep_canary_pending(state)
            self._stop_all(state)
            state["canary_percent"] = 0
            state["owner"] = None
            return True

    def _stop_all(self, state: dict[str, Any]) -> None:
        """Stop every process of ``state`` at once (one shared grace period, then SIGKILL) and clear them."""
        entries = [state[role] for role in ("gateway", "canary", "primary") if state.get(role)]
        stop_processes([int(e["pid"]) for e in [*entries, *(state.get("replicas") or [])] if not self.shared(e)],
                       self.stop_timeout)
        for role in ("gateway", "canary", "primary"):
            state[role] = None
        state["replicas"] = []
        state["down"] = {}
        self.launcher.reap()


# -- supervision ------------------------------------------------------------------------------
def _upstream(entry: dict[str, Any]) -> dict[str, str]:
    return {"url": entry["url"], "version": entry["version"]}


def _entries(state: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Every process of the state by role (gateway, primary, canary, replica-<n>)."""
    out = {role: state[role] for role in ("gateway", *MODEL_ROLES) if state.get(role)}
    out.update({r["role"]: r for r in state.get("replicas") or []})
    return out


@dataclass
class _Watch:
    """What the supervisor knows of one role's process."""

    pid: int
    started: float
    failures: int = 0  # readiness probes failed in a row
    last_probe: float = 0.0
    down: bool = False
    next_try: float = 0.0
    backoff: float = 0.0
    deaths: list[float] = field(default_factory=list)


class Supervisor:
    """Keeps the processes of a ``serve`` running, as a kubelet keeps a pod's containers.

    Each :meth:`tick` checks every process of the state: one whose pid has exited, or a model
    server (or the gateway) whose readiness probe failed ``failure_threshold`` times in a row
    (every ``probe_period`` s, ``probe_timeout`` s each), is down. Its traffic goes elsewhere at
    once through the gateway's admin API — a canary's share to the primary (split 0), a primary's
    to a live replica or else the canary (100 %), a replica is taken out of the pool — and it is
    restarted after a back-off that starts at ``backoff_initial`` s and doubles up to
    ``backoff_max`` s, back to the start once it has run ``healthy_reset`` s (CrashLoopBackOff).
    When it is ready again the gateway routes to it as before. Every restart is logged and
    counted in the state (``restarts``); what is down is listed under ``down``. A canary that
    dies ``crashloop_restarts`` times within ``crashloop_window`` s is not restarted again:
    ``on_crashloop(reason)`` rolls it back.
    """

    def __init__(self, backend: LocalBackend, *, probe_period: float = 2.0, probe_timeout: float = 2.0,
                 failure_threshold: int = 3, backoff_initial: float = 1.0, backoff_max: float = 60.0,
                 healthy_reset: float = 120.0, crashloop_restarts: int = 3, crashloop_window: float = 600.0,
                 on_crashloop: Callable[[str], Any] | None = None) -> None:
        self.backend = backend
        self.probe_period, self.probe_timeout, self.failure_threshold = probe_period, probe_timeout, failure_threshold
        self.backoff_initial, self.backoff_max, self.healthy_reset = backoff_initial, backoff_max, healthy_reset
        self.crashloop_restarts, self.crashloop_window = crashloop_restarts, crashloop_window
        self.on_crashloop = on_crashloop or (lambda reason: backend.rollback())
        self._watch: dict[str, _Watch] = {}
        self._probe_client: Any = None  # one client for every probe: a new one per probe loads the CA bundle

    @property
    def degraded(self) -> bool:
        """Something is down: the gateway does not run the state's split (rollout steps wait)."""
        return any(w.down for w in self._watch.values())

    def tick(self) -> None:
        """One round: notice what died or stopped answering, reroute, restart what is due."""
        now = time.monotonic()
        entries = {role: e for role, e in _entries(self.backend.status()).items() if not self.backend.shared(e)}
        for role in set(self._watch) - set(entries):
            del self._watch[role]  # removed on purpose (rollback, promotion, scaling down)
        changed = False
        for role, entry in entries.items():
            w = self._watch.get(role)
            if w is None or w.pid != int(entry["pid"]):  # new, or replaced by someone else
                w = self._watch[role] = _Watch(pid=int(entry["pid"]), started=now,
                                               deaths=w.deaths if w is not None else [])
            if w.down:
                continue
            why = self._check(role, entry, w, now)
            if why is not None:
                changed |= self._went_down(role, entry, w, why, now)
        if changed:
            self._publish()
            self._route()
        for role, w in list(self._watch.items()):
            if w.down and now >= w.next_try:
                self._restart(role, w)

    # -- checks -----------------------------------------------------------------------
    def _check(self, role: str, entry: dict[str, Any], w: _Watch, now: float) -> str | None:
        """Why this process is down (None: it is fine)."""
        if not process_alive(w.pid):
            return self.backend.launcher.exit_status(w.pid)
        if now - w.last_probe < self.probe_period:
            return None
        w.last_probe = now
        if self._ready(entry["url"] + ("/healthz" if role == "gateway" else self.backend.READY_PATH)):
            w.failures = 0
            if now - w.started >= self.healthy_reset:
                w.backoff = 0.0  # ran healthy long enough: the next failure restarts quickly again
            return None
        w.failures += 1
        if w.failures < self.failure_threshold:
            return None
        stop_process(w.pid, min(self.backend.stop_timeout, 2.0))  # it stopped answering: no long grace
        return f"readiness probe failed {w.failures} times in a row"

    def _ready(self, url: str) -> bool:
        import httpx

        if self._probe_client is None:
            # plain loopback HTTP: no TLS context (creating one per probe was most of serve's own CPU), no
            # kept connection (a restarted server comes back on a new port; a probe always dials afresh)
            self._probe_client = httpx.Client(timeout=self.probe_timeout, verify=False, trust_env=False,
                                              limits=httpx.Limits(max_keepalive_connections=0))
        try:
            return self._probe_client.get(url).status_code == 200
        except httpx.HTTPError:
            return False

    def _went_down(self, role: str, entry: dict[str, Any], w: _Watch, why: str, now: float) -> bool:
        """Mark ``role`` down and plan its restart (or roll back a canary that keeps dying)."""
        w.down, w.failures = True, 0
        w.deaths = [t for t in w.deaths if now - t < self.crashloop_window] + [now]
        if role == "canary" and len(w.deaths) >= self.crashloop_restarts:
            reason = (f"canary v{entry['version']} died {len(w.deaths)} times within "
                      f"{self.crashloop_window:g} s (last: pid {w.pid}, {why})")
            log.error("%s; rolling it back", reason)
            self.backend.launcher.forget(w.pid)
            try:
                self.on_crashloop(reason)
            except Exception:  # noqa: BLE001 (supervision outlives a failed rollback; it is retried)
                log.exception("rolling back the crash-looping canary failed; retried at the next tick")
                w.down = False
                w.deaths.pop()
                return False
            self._watch.pop(role, None)
            self._publish()
            return False
        w.backoff = self.backoff_initial if not w.backoff else min(w.backoff * 2, self.backoff_max)
        w.next_try = now + w.backoff
        self.backend.launcher.forget(w.pid)
        log.warning("%s v%s (pid %s) is down: %s; restart in %g s", role, entry.get("version") or "-", w.pid, why,
                    w.backoff)
        return True

    # -- acting ---------------------------------------------------------------------------
    def _publish(self, restarted: str | None = None) -> None:
        """Write what is down (and a restart's count) into the state file."""
        with self.backend.state.locked() as state:
            state["down"] = {role: {"pid": w.pid, "restart_in_s": round(max(0.0, w.next_try - time.monotonic()), 1)}
                             for role, w in self._watch.items() if w.down}
            if restarted is not None:
                counts = dict(state.get("restarts") or {})
                counts[restarted] = counts.get(restarted, 0) + 1
                state["restarts"] = counts

    def _route(self) -> None:
        """Point the gateway at what is up: the state's split when everything is, else around what is down."""
        state = self.backend.status()
        gateway = state.get("gateway")
        if not gateway or self._is_down("gateway"):
            return
        primary, canary = state.get("primary"), state.get("canary")
        pool = [e for e in [primary, *(state.get("replicas") or [])] if e and not self._is_down(e["role"])]
        canary_up = canary is not None and not self._is_down("canary")
        percent = float(state.get("canary_percent") or 0) if canary_up else 0.0
        if pool:
            head, extra = pool[0], pool[1:]
        elif canary_up and primary:
            head, extra, percent = primary, [], 100.0  # the canary takes all until the primary is back
        else:
            log.error("no model server is up; the gateway answers 502 until one is back")
            return
        try:
            self.backend.gateway_admin.call(gateway, "PUT", "/admin/upstreams", {
                "primary": _upstream(head), "canary": _upstream(canary) if canary else None, "canary_percent": percent})
            self.backend.gateway_admin.call(gateway, "PUT", "/admin/replicas",
                                            {"replicas": [_upstream(r) for r in extra]})
        except ServingError as exc:
            log.warning("could not reroute the gateway (retried at the next change): %s", exc)

    def _is_down(self, role: str) -> bool:
        w = self._watch.get(role)
        return w is not None and w.down

    def _restart(self, role: str, w: _Watch) -> None:
        """Start ``role`` again where it was (same version and model; the gateway on its port)."""
        backend = self.backend
        entry = _entries(backend.status()).get(role)
        if entry is None or int(entry["pid"]) != w.pid:
            self._watch.pop(role, None)
            return
        fixed = {"primary": backend.settings.serving.primary_port, "canary": backend.settings.serving.canary_port}
        try:
            if role == "gateway":
                info = self._start_gateway(entry)
            else:
                info = backend.start_model_server(role, entry["version"], entry["model_uri"], fixed.get(role, 0))
        except ServingError as exc:
            w.backoff = min(w.backoff * 2, self.backoff_max)
            w.next_try = time.monotonic() + w.backoff
            log.warning("restarting %s failed (next try in %g s): %s", role, w.backoff, exc)
            self._publish()
            return
        with backend.state.locked() as state:
            current = _entries(state).get(role)
            if current is None or int(current["pid"]) != w.pid:  # replaced or removed while it started
                stop_process(info.pid, backend.stop_timeout)
                self._watch.pop(role, None)
                return
            new = asdict(info)
            if role in ("gateway", *MODEL_ROLES):
                state[role] = new
            else:
                state["replicas"] = [new if r["role"] == role else r for r in state["replicas"]]
        self._watch[role] = _Watch(pid=info.pid, started=time.monotonic(), backoff=w.backoff, deaths=w.deaths)
        self._publish(restarted=role)
        count = (backend.status().get("restarts") or {}).get(role, 0)
        log.warning("restarted %s v%s: pid %s (was %s; restart %d; next back-off %g s)", role,
                    entry.get("version") or "-", info.pid, w.pid, count,
                    min((w.backoff or self.backoff_initial) * 2, self.backoff_max))
        self._route()

    def _start_gateway(self, entry: dict[str, Any]) -> ProcessInfo:
        """The gateway again on its port, in front of the model servers that are up."""
        state = self.backend.status()
        primary, canary = state.get("primary"), state.get("canary")
        if not primary:
            raise ServingError("no primary to put behind the gateway")
        info = {k: primary[k] for k in ("role", "pid", "port", "url", "version", "model_uri")}
        can = ProcessInfo(**{k: canary[k] for k in info}) if canary else None
        replicas = [r for r in state.get("replicas") or [] if not self._is_down(r["role"])]
        return self.backend.start_gateway(ProcessInfo(**info), can, float(state.get("canary_percent") or 0) if can
                                          else 0.0, replicas=replicas, port=int(entry["port"]))
