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
owner that died without stopping (SIGKILL), a new ``serve`` stops what it left and takes over.
The gateway's admin calls carry the bearer token from ``DRIFTLOOP_GATEWAY_TOKEN``; a ``serve``
started without one makes one for itself and its children and writes it, readable by this user
only (0600), to ``<workspace>/serving/gateway.token``, where the other processes of the same
workspace that change traffic (``driftloop rollout run``, the deploy step of a retraining run the
monitor started) find it when the variable is not set — as a kubeconfig or a Jupyter token file.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from driftloop.core.errors import ServingError
from driftloop.core.processes import free_port, process_alive, spawn, stop_process

__all__ = ["LocalBackend", "ProcessInfo", "stop_process", "process_alive", "free_port"]

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

    # -- state ----------------------------------------------------------------------
    @contextlib.contextmanager
    def _locked(self) -> Iterator[dict[str, Any]]:
        """Read-modify-write the state under an exclusive file lock."""
        self.dir.mkdir(parents=True, exist_ok=True)
        with open(self.dir / "state.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            state = self._read()
            yield state
            tmp = self.state_path.with_suffix(".tmp")
            tmp.write_text(json.dumps(state, indent=1))
            os.replace(tmp, self.state_path)

    def _read(self) -> dict[str, Any]:
        state: dict[str, Any] = {"primary": None, "canary": None, "gateway": None, "canary_percent": 0,
                                 "pending_canary": None, "owner": None, "replicas": []}
        if self.state_path.is_file():
            try:
                state.update(json.loads(self.state_path.read_text()))
            except ValueError:
                log.warning("serving state %s is unreadable; starting from empty", self.state_path)
        for role in ("primary", "canary", "gateway"):
            entry = state.get(role)
            if entry and not process_alive(int(entry["pid"])):
                log.info("dropping stale %s entry (pid %s is gone)", role, entry["pid"])
                state[role] = None
        live = [r for r in state.get("replicas") or [] if process_alive(int(r["pid"]))]
        if len(live) != len(state.get("replicas") or []):
            log.info("dropping %d stale replica entries", len(state["replicas"]) - len(live))
        state["replicas"] = live
        if state.get("owner") and not process_alive(int(state["owner"])):
            state["owner"] = None
        return state

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
        token = secrets.token_urlsafe(32)
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = self.token_path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(token)
        os.replace(tmp, self.token_path)
        os.environ[ADMIN_TOKEN_ENV] = token
        log.info("%s is not set: made one for this serve (in %s, mode 0600)", ADMIN_TOKEN_ENV, self.token_path)

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
        for role in running:
            if role == "canary" and not state.get("pending_canary"):
                c = state["canary"]
                state["pending_canary"] = {"version": c["version"], "model_uri": c["model_uri"],
                                           "percent": state.get("canary_percent", 0)}
            stop_process(int(state[role]["pid"]), self.stop_timeout)
            state[role] = None
        for r in state.get("replicas") or []:
            stop_process(int(r["pid"]), self.stop_timeout)
        state["replicas"] = []

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
        logs = self.dir / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        log_file = open(logs / f"{role}.log", "ab")  # noqa: SIM115 (handed to the child)
        env = dict(os.environ, PYTHONUNBUFFERED="1", MLFLOW_TRACKING_URI=self.settings.tracking_uri)
        # A canary started beside a running gateway (e.g. by a pipeline step that then exits) lives as long
        # as that gateway; everything else dies with the process that starts it.
        owner = ((self._read().get("gateway") or {}).get("pid")
                 if role == "canary" or role.startswith("replica") else None)
        proc = spawn([sys.executable, "-m", *argv], owner_pid=owner, stop_timeout=self.stop_timeout,
                     stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                     cwd=str(Path(__file__).resolve().parent.parent))
        log_file.close()
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

    def start_model_server(self, role: str, version: str, model_uri: str, port: int = 0) -> ProcessInfo:
        s = self.settings
        port = port or free_port(s.serving.host)
        argv = ["serving.predictor", "--model-name", s.serving.name, "--model-uri", model_uri,
                "--tracking-uri", s.tracking_uri, "--http-port", str(port), "--host", s.serving.host,
                "--max-payload-bytes", str(s.serving.max_payload_bytes)]
        log.info("starting %s model server v%s on port %d", role, version, port)
        return self._spawn(role, argv, port, "/v2/health/ready", version=version, model_uri=model_uri)

    def sink_url(self) -> str:
        m = self.settings.monitor
        return f"http://{m.host}:{m.port}/events"

    def start_gateway(self, primary: ProcessInfo, canary: ProcessInfo | None, percent: float) -> ProcessInfo:
        s = self.settings
        port = s.serving.gateway_port or free_port(s.serving.host)
        argv = ["serving.gateway", "--name", s.serving.name, "--namespace", s.serving.namespace,
                "--host", s.serving.host, "--port", str(port), "--primary-url", primary.url,
                "--primary-version", primary.version, "--sink-url", self.sink_url(),
                "--feedback-outbox", str(s.workspace_dir / "serving" / "feedback-outbox.db"),
                "--max-payload-bytes", str(s.serving.max_payload_bytes)]
        if canary is not None:
            argv += ["--canary-url", canary.url, "--canary-version", canary.version, "--canary-percent", str(percent)]
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
                         canary_percent=percent if can else 0, pending_canary=None, owner=os.getpid())
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
            if old:
                stop_process(int(old["pid"]), self.stop_timeout)
            for r in state.get("replicas") or []:  # they served the old version
                stop_process(int(r["pid"]), self.stop_timeout)
            state["replicas"] = []

    def rollback(self) -> None:
        """0 % to the canary; its server is stopped; the primary keeps serving."""
        with self._locked() as state:
            if state["gateway"]:
                self._admin(state["gateway"], "PUT", "/admin/upstreams", {"canary": None})
            if state["canary"]:
                stop_process(int(state["canary"]["pid"]), self.stop_timeout)
            state.update(canary=None, canary_percent=0, pending_canary=None)

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
            canary = state.get("canary")
            if canary and not state.get("pending_canary"):
                state["pending_canary"] = {"version": canary["version"], "model_uri": canary["model_uri"],
                                           "percent": state.get("canary_percent", 0)}
            for role in ("gateway", "canary", "primary"):
                if state.get(role):
                    stop_process(int(state[role]["pid"]), self.stop_timeout)
                    state[role] = None
            for r in state.get("replicas") or []:
                stop_process(int(r["pid"]), self.stop_timeout)
            state["replicas"] = []
            state["canary_percent"] = 0
            state["owner"] = None
            return True
