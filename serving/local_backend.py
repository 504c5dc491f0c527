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

import contextlib
import fcntl
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from driftloop.core.errors import ServingError
from driftloop.core.files import atomic_write, private_dir, workspace_token
from driftloop.core.processes import free_port, process_alive, spawn, stop_process, stop_processes

__all__ = ["LocalBackend", "ProcessInfo", "Supervisor", "stop_process", "process_alive", "free_port"]

#: the environment variable and workspace file of the monitor's ingest token (the gateway sends it)
INGEST_TOKEN_ENV = "DRIFTLOOP_INGEST_TOKEN"
MODEL_ROLES = ("primary", "canary")

log = logging.getLogger(__name__)


@dataclass
class ProcessInfo:
    role: str  # primary | canary | gateway | replica-<n>
    pid: int
    port: int
    url: str
    version: str = ""
    model_uri: str = ""


class LocalBackend:
    """Start, change and stop the local serving processes; the state file is the truth."""

    def __init__(self, settings: Any, *, ready_timeout: float = 180.0, stop_timeout: float = 10.0) -> None:
        self.settings = settings
        self.dir = settings.workspace_dir / "serving"
        self.state_path = self.dir / "state.json"
        self.ready_timeout = ready_timeout
        self.stop_timeout = stop_timeout
        self._children: dict[int, subprocess.Popen] = {}  # processes this object started, by pid

    # -- state ----------------------------------------------------------------------
    @contextlib.contextmanager
    def _locked(self) -> Iterator[dict[str, Any]]:
        """Read-modify-write the state under an exclusive file lock."""
        private_dir(self.dir)
        fd = os.open(self.dir / "state.lock", os.O_WRONLY | os.O_CREAT, 0o600)
        with os.fdopen(fd, "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            state = self._read()
            yield state
            atomic_write(self.state_path, json.dumps(state, indent=1))

    def _read(self) -> dict[str, Any]:
        """The state as it stands. While the owning ``serve`` lives, entries of dead processes are kept
        (its supervisor restarts them); without one they are dropped — a canary that was out becomes
        pending at the weight it ran at, so the next ``serve`` resumes its rollout."""
        state: dict[str, Any] = {"primary": None, "canary": None, "gateway": None, "canary_percent": 0,
                                 "pending_canary": None, "owner": None, "replicas": [], "down": {},
                                 "restarts": {}}
        if self.state_path.is_file():
            try:
                state.update(json.loads(self.state_path.read_text()))
            except ValueError:
                log.warning("serving state %s is unreadable; starting from empty", self.state_path)
        if state.get("owner") and not process_alive(int(state["owner"])):
            state["owner"] = None
        if state["owner"]:
            return state  # supervised: the owner's supervisor restarts what died
        for role in ("primary", "canary", "gateway"):
            entry = state.get(role)
            if entry and not process_alive(int(entry["pid"])):
                log.info("dropping stale %s entry (pid %s is gone)", role, entry["pid"])
                if role == "canary":
                    self._keep_canary_pending(state)
                state[role] = None
        live = [r for r in state.get("replicas") or [] if process_alive(int(r["pid"]))]
        if len(live) != len(state.get("replicas") or []):
            log.info("dropping %d stale replica entries", len(state["replicas"]) - len(live))
        state["replicas"] = live
        state["down"] = {}
        return state

    @staticmethod
    def _keep_canary_pending(state: dict[str, Any]) -> None:
        """A canary that is out but whose processes go becomes pending at its weight (unless one already is)."""
        canary = state.get("canary")
        if canary and not state.get("pending_canary"):
            state["pending_canary"] = {"version": canary["version"], "model_uri": canary["model_uri"],
                                       "percent": state.get("canary_percent", 0)}

    @property
    def token_path(self) -> Path:
        return self.dir / "gateway.token"

    def admin_token(self) -> str | None:
        """The gateway's admin bearer token: ``DRIFTLOOP_GATEWAY_TOKEN``, else the workspace's token file."""
        from serving.gateway import ADMIN_TOKEN_ENV

        token = os.environ.get(ADMIN_TOKEN_ENV)
        if token:
            return token
        try:
            return self.token_path.read_text().strip() or None
        except OSError:
            return None

    def _ensure_admin_token(self) -> None:
        """A serve without ``DRIFTLOOP_GATEWAY_TOKEN`` makes one for itself, its children and the workspace."""
        from serving.gateway import ADMIN_TOKEN_ENV

        if os.environ.get(ADMIN_TOKEN_ENV):
            return
        existed = self.token_path.is_file()
        os.environ[ADMIN_TOKEN_ENV] = workspace_token(self.token_path, ADMIN_TOKEN_ENV)
        log.info("%s is not set: %s the workspace's (%s, mode 0600)", ADMIN_TOKEN_ENV,
                 "using" if existed else "made", self.token_path)

    def ingest_token(self) -> str:
        """The monitor's ingest token, which the gateway sends on its POSTs to /events and /feedback."""
        return workspace_token(self.settings.workspace_dir / "monitor" / "ingest.token", INGEST_TOKEN_ENV)

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
        self._keep_canary_pending(state)
        self._stop_all(state)

    def status(self) -> dict[str, Any]:
        with self._locked() as state:
            return dict(state)

    @property
    def gateway_url(self) -> str | None:
        gw = self.status().get("gateway")
        return gw["url"] if gw else None

    # -- processes --------------------------------------------------------------------
    def _spawn(self, role: str, argv: list[str], port: int, ready_path: str, **info: str) -> ProcessInfo:
        host = self.settings.serving.host
        logs = private_dir(self.dir / "logs")
        fd = os.open(logs / f"{role}.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        log_file = os.fdopen(fd, "ab")  # handed to the child
        env = dict(os.environ, PYTHONUNBUFFERED="1", MLFLOW_TRACKING_URI=self.settings.tracking_uri)
        if role == "gateway":
            env[INGEST_TOKEN_ENV] = self.ingest_token()
        # A canary started beside a running gateway by another process (e.g. a pipeline step that then
        # exits) lives as long as that gateway; everything else dies with the process that starts it.
        current = self._read()
        owner = ((current.get("gateway") or {}).get("pid")
                 if (role == "canary" or role.startswith("replica")) and current.get("owner") != os.getpid()
                 else None)
        proc = spawn([sys.executable, "-m", *argv], owner_pid=owner, stop_timeout=self.stop_timeout,
                     stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                     cwd=str(Path(__file__).resolve().parent.parent))
        log_file.close()
        self._children[proc.pid] = proc
        url = f"http://{host}:{port}"
        try:
            self._wait_ready(proc, url + ready_path, logs / f"{role}.log")
        except BaseException:
            stop_process(proc.pid, self.stop_timeout)
            raise
        return ProcessInfo(role=role, pid=proc.pid, port=port, url=url, **info)

    def _wait_ready(self, proc: subprocess.Popen, url: str, log_path: Path) -> None:
        import httpx

        deadline = time.monotonic() + self.ready_timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                tail = log_path.read_text(errors="replace")[-1500:] if log_path.is_file() else ""
                raise ServingError(f"process exited with status {proc.returncode} before it was ready "
                                   f"({log_path}):\n{tail}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(url, timeout=2.0).status_code == 200:
                    return
            time.sleep(0.2)
        raise ServingError(f"{url} was not ready within {self.ready_timeout:.0f} s (log: {log_path})")

    def exit_status(self, pid: int) -> str:
        """How a process this object started ended ("exit code 1", "signal SIGKILL"), as far as is known."""
        proc = self._children.get(pid)
        code = proc.poll() if proc is not None else None
        if code is None:
            return "exit status unknown"
        if code < 0 or code > 128:  # killed by a signal (a watcher reports its command's as 128 + N)
            num = -code if code < 0 else code - 128
            with contextlib.suppress(ValueError):
                return f"signal {signal.Signals(num).name}"
        return f"exit code {code}"

    def forget(self, pid: int) -> None:
        self._children.pop(pid, None)

    #: readiness route of a model server (KServe V2; the predictor always serves it)
    READY_PATH = "/v2/health/ready"

    def model_server_argv(self, version: str, model_uri: str, port: int) -> list[str]:
        """``python -m`` arguments of one model server (``serving.predictor``)."""
        s = self.settings
        return ["serving.predictor", "--model-name", s.serving.name, "--model-uri", model_uri,
                "--tracking-uri", s.tracking_uri, "--http-port", str(port), "--host", s.serving.host,
                "--max-payload-bytes", str(s.serving.max_payload_bytes)]

    def start_model_server(self, role: str, version: str, model_uri: str, port: int = 0) -> ProcessInfo:
        s = self.settings
        port = port or free_port(s.serving.host)
        log.info("starting %s model server v%s on port %d", role, version, port)
        return self._spawn(role, self.model_server_argv(version, model_uri, port), port, self.READY_PATH,
                           version=version, model_uri=model_uri)

    def sink_url(self) -> str:
        m = self.settings.monitor
        return f"http://{m.host}:{m.port}/events"

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
        with self._locked() as state:
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
                    self._admin(gateway, "PUT", "/admin/replicas",
                                {"replicas": [{"url": r["url"], "version": r["version"]} for r in keep]})
                except BaseException:
                    for proc in started:
                        stop_process(proc.pid, self.stop_timeout)
                    raise
                state["replicas"] = keep
                log.info("primary v%s now on %d replicas", primary["version"], n)
                return n
            keep, drop = extras[: n - 1], extras[n - 1:]
            self._admin(gateway, "PUT", "/admin/replicas",
                        {"replicas": [{"url": r["url"], "version": r["version"]} for r in keep]})
            state["replicas"] = keep
            urls = {r["url"] for r in drop}
            deadline = time.monotonic() + drain_timeout
            while time.monotonic() < deadline:  # requests already sent to a dropped replica finish first
                try:
                    inflight = httpx.get(gateway["url"] + "/admin/status", timeout=5.0).json().get("inflight", {})
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
        with self._locked() as state:
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

    def _admin(self, gateway: dict[str, Any], method: str, path: str, body: dict[str, Any]) -> dict[str, Any]:
        import httpx

        token = self.admin_token()
        headers = {"authorization": f"Bearer {token}"} if token else {}
        try:
            resp = httpx.request(method, gateway["url"] + path, json=body, headers=headers, timeout=10.0)
        except httpx.HTTPError as exc:
            raise ServingError(f"gateway at {gateway['url']} is unreachable: {exc}") from exc
        if resp.status_code >= 400:
            raise ServingError(f"gateway refused {path}: {resp.text[:300]}")
        return resp.json()

    def deploy_canary(self, version: str, model_uri: str, percent: float) -> str:
        """Start the canary behind the running gateway at ``percent``, or record it as pending."""
        with self._locked() as state:
            if not state["gateway"] or not state["primary"]:
                state["pending_canary"] = {"version": str(version), "model_uri": model_uri, "percent": percent}
                return (f"nothing is being served here; canary v{version} is pending and starts with "
                        f"`driftloop serve`")
            if state["canary"]:
                stop_process(int(state["canary"]["pid"]), self.stop_timeout)
                state["canary"] = None
            canary = self.start_model_server("canary", str(version), model_uri, self.settings.serving.canary_port)
            try:
                self._admin(state["gateway"], "PUT", "/admin/upstreams",
                            {"canary": {"url": canary.url, "version": canary.version}, "canary_percent": percent})
            except ServingError:
                stop_process(canary.pid, self.stop_timeout)
                raise
            state.update(canary=asdict(canary), canary_percent=percent, pending_canary=None)
            return f"canary v{version} serves {percent:g}% of traffic at {state['gateway']['url']}"

    def set_split(self, percent: float) -> None:
        with self._locked() as state:
            if state["gateway"]:
                self._admin(state["gateway"], "PUT", "/admin/split", {"canary_percent": percent})
            state["canary_percent"] = percent

    def promote(self) -> None:
        """The canary becomes the primary (100 %); the old primary is stopped."""
        with self._locked() as state:
            canary, old = state["canary"], state["primary"]
            if not canary or not state["gateway"]:
                raise ServingError("no canary is being served here; nothing to promote")
            self._admin(state["gateway"], "PUT", "/admin/upstreams",
                        {"primary": {"url": canary["url"], "version": canary["version"]}, "canary": None})
            canary["role"] = "primary"
            state.update(primary=canary, canary=None, canary_percent=0)
            # the replicas served the old version
            stop_processes([int(e["pid"]) for e in [old, *(state.get("replicas") or [])] if e], self.stop_timeout)
            state["replicas"] = []

    def rollback(self) -> None:
        """0 % to the canary; its server is stopped; the primary keeps serving."""
        with self._locked() as state:
            if state["gateway"]:
                self._admin(state["gateway"], "PUT", "/admin/upstreams", {"canary": None})
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
        with self._locked() as state:
            if owner is not None and state.get("owner") not in (owner, None):
                return False
            if owner is not None and state.get("owner") is None and state.get("gateway"):
                return False
            self._keep_canary_pending(state)
            self._stop_all(state)
            state["canary_percent"] = 0
            state["owner"] = None
            return True

    def _stop_all(self, state: dict[str, Any]) -> None:
        """Stop every process of ``state`` at once (one shared grace period, then SIGKILL) and clear them."""
        entries = [state[role] for role in ("gateway", "canary", "primary") if state.get(role)]
        stop_processes([int(e["pid"]) for e in [*entries, *(state.get("replicas") or [])]], self.stop_timeout)
        for role in ("gateway", "canary", "primary"):
            state[role] = None
        state["replicas"] = []
        state["down"] = {}
        for proc in self._children.values():
            with contextlib.suppress(OSError):
                proc.poll()  # reap
        self._children.clear()


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

    @property
    def degraded(self) -> bool:
        """Something is down: the gateway does not run the state's split (rollout steps wait)."""
        return any(w.down for w in self._watch.values())

    def tick(self) -> None:
        """One round: notice what died or stopped answering, reroute, restart what is due."""
        now = time.monotonic()
        entries = _entries(self.backend.status())
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
            return self.backend.exit_status(w.pid)
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

        try:
            return httpx.get(url, timeout=self.probe_timeout).status_code == 200
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
            self.backend.forget(w.pid)
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
        self.backend.forget(w.pid)
        log.warning("%s v%s (pid %s) is down: %s; restart in %g s", role, entry.get("version") or "-", w.pid, why,
                    w.backoff)
        return True

    # -- acting ---------------------------------------------------------------------------
    def _publish(self, restarted: str | None = None) -> None:
        """Write what is down (and a restart's count) into the state file."""
        with self.backend._locked() as state:
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
            self.backend._admin(gateway, "PUT", "/admin/upstreams", {
                "primary": _upstream(head), "canary": _upstream(canary) if canary else None, "canary_percent": percent})
            self.backend._admin(gateway, "PUT", "/admin/replicas", {"replicas": [_upstream(r) for r in extra]})
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
        with backend._locked() as state:
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
