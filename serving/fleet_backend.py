"""Serving a fleet on the embedded default: packed model servers, each model's canary, one gateway.

``driftloop serve -c FLEET`` starts, for the models it serves:

* the champions in **packed model servers** (``python -m serving.model_pack``: several models in one
  KServe ``ModelServer`` process, each under its own name), grouped by :func:`serving.model_pack.pack`
  per MLflow store (at most ``max_models`` models and ``max_bytes`` bytes of model files a process);
* each pending **canary** in a process of its own (``serving.predictor``), so a canary that crashes
  touches no other model;
* **one fleet gateway** (:mod:`serving.fleet_gateway`) on the fleet's ``serving.gateway_port``.

Each model's serving state (``<model workspace>/serving/state.json``) is written as a one-model
``serve`` writes it, with the gateway's URL for that model being ``http://host:port/models/<name>``:
so ``backend_for(settings)`` of a fleet model (:class:`FleetModelBackend`) and everything built on it
— the rollout controller (``PUT …/models/<name>/admin/split``), ``deploy_canary``, ``promote``,
``rollback``, ``set_replicas``, ``driftloop rollout run --model NAME`` — act on that model only. A
packed server or the gateway is *shared*: a model never stops or restarts it alone (a promoted model's
old version stays loaded in its pack, unused, until the fleet is served again).

The fleet's own state (``<fleet workspace>/serving/state.json``) lists the gateway and the packs (as
``replicas`` ``pack-<n>``, with their members under ``packs``). Supervision: :class:`FleetSupervisor`
restarts a packed server that dies or stops answering on its port (all its models come back) and the
gateway (its models as their states stand); each model's own :class:`~serving.local_backend.Supervisor`
watches its canary and replicas and rolls back a canary that keeps dying, for that model only.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit

from driftloop.core.errors import ServingError
from driftloop.core.files import atomic_write
from driftloop.core.processes import free_port, process_alive, stop_process, stop_processes
from serving.gateway_client import GatewayAdminClient
from serving.local_backend import LocalBackend, Supervisor
from serving.local_processes import INGEST_TOKEN_ENV, ProcessInfo, ProcessLauncher
from serving.local_state import ServingState

if TYPE_CHECKING:
    from driftloop.core.config import Settings

__all__ = ["FleetBackend", "FleetModelBackend", "FleetSupervisor", "Champion", "DEFAULT_PACK_MODELS",
           "DEFAULT_PACK_BYTES"]

log = logging.getLogger(__name__)

#: models one packed model server holds at most
DEFAULT_PACK_MODELS = 8
#: bytes of model files one packed model server holds at most
DEFAULT_PACK_BYTES = 1 << 30


class FleetModelBackend(LocalBackend):
    """One model of a served fleet: its part of the fleet gateway (``/models/<name>``), its canary and
    replicas. The gateway and a packed primary are shared with other models: never stopped here."""

    def shared(self, entry: dict[str, Any]) -> bool:
        return entry.get("role") == "gateway" or bool(entry.get("pack"))

    def serve(self, champion_version: str, *, canary: tuple[str, str] | None = None, percent: float = 0.0
              ) -> dict[str, Any]:
        raise ServingError(f"model {self.settings.serving.name!r} belongs to a fleet; serve it with the fleet: "
                           "`driftloop serve -c FLEET [--model NAME]`")


@dataclass(frozen=True)
class Champion:
    """A model's champion as a packed server loads it: its version, what to load (its artifact folder when
    the files are local: then any models pack together, whatever their MLflow stores; else its registry URI),
    the MLflow store that resolves a registry URI ("" for a folder; one process has one tracking URI, so
    registry URIs pack only with their store's) and the size of its files (0 where they are not local)."""

    version: str
    uri: str
    tracking_uri: str = ""
    size: int = 0


def champion(settings: Settings, version: str) -> Champion:
    """``version`` of the model, with the size of its files where they are local."""
    name = settings.mlflow.model_name
    found = Champion(version, f"models:/{name}/{version}", settings.tracking_uri)
    try:
        from mlflow import MlflowClient

        client = MlflowClient(settings.tracking_uri)
        uri = client.get_model_version_download_uri(name, version)
        if uri.startswith("models:/m-"):  # an MLflow 3 logged model: its own artifact location
            uri = client.get_logged_model(uri.removeprefix("models:/")).artifact_location
    except Exception as exc:  # noqa: BLE001 (the size only weighs the packing)
        log.info("model %s v%s: its files were not found (%s); packed as if empty", name, version, exc)
        return found
    parts = urlsplit(uri)
    path = Path(unquote(parts.path)) if parts.scheme in ("", "file") else None
    if path is None or not path.is_dir():
        return found
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    if settings.mlflow.tracking_uri:  # a tracking server: its registry resolves the version in the pack
        return Champion(version, found.uri, found.tracking_uri, size)
    # the embedded store (a SQLite file per model): the version's own folder, pinned now, so the champions of
    # every model share packed servers instead of one process per store
    return Champion(version, str(path), "", size)


class _FleetLauncher(ProcessLauncher):
    """Starts the fleet's shared processes; the gateway reads each model's own ingest token file (or
    ``DRIFTLOOP_INGEST_TOKEN`` when it is set: every model's, as for a one-model gateway)."""

    def ingest_token(self) -> str:
        return os.environ.get(INGEST_TOKEN_ENV, "")


class FleetBackend:
    """Start, supervise and stop the serving processes of a fleet's models; the state files are the truth."""

    READY_PATH = LocalBackend.READY_PATH

    def __init__(self, models: list[Settings], *, max_models: int = DEFAULT_PACK_MODELS,
                 max_bytes: int = DEFAULT_PACK_BYTES, ready_timeout: float = 180.0, stop_timeout: float = 10.0) -> None:
        if not models or any(s.fleet is None for s in models):
            raise ServingError("a fleet backend needs the settings of a fleet's models")
        self.settings = models[0]
        self.dir = models[0].fleet.root / "serving"
        self.state = ServingState(self.dir)
        self.launcher = _FleetLauncher(self.settings, self.state, ready_timeout=ready_timeout,
                                       stop_timeout=stop_timeout)
        self.models = {s.serving.name: FleetModelBackend(s, ready_timeout=ready_timeout, stop_timeout=stop_timeout)
                       for s in models}
        self.gateway_admin = GatewayAdminClient(self.dir / "gateway.token")
        self.max_models, self.max_bytes = max_models, max_bytes

    @property
    def stop_timeout(self) -> float:
        return self.launcher.stop_timeout

    def shared(self, entry: dict[str, Any]) -> bool:
        return False

    status = LocalBackend.status  # the fleet's state file, read as one model's is
    gateway_url = LocalBackend.gateway_url

    # -- serving ------------------------------------------------------------------------
    def serve(self, champions: dict[str, Champion], *, port: int | None = None) -> dict[str, Any]:
        """Serve ``champions`` (serving name -> its champion) with each model's pending canary, behind one
        gateway on ``port`` (default: the fleet's ``serving.gateway_port``; 0: a free port)."""
        unknown = set(champions) - set(self.models)
        if unknown or not champions:
            raise ServingError(f"nothing to serve, or models not of this fleet: {sorted(unknown)}")
        with self.state.locked() as state:
            self._claim(state)
            self._ensure_tokens()
            started: list[ProcessInfo] = []
            try:
                packs = {f"pack-{i}": [{"name": n, "version": champions[n].version, "uri": champions[n].uri,
                                        "tracking_uri": champions[n].tracking_uri}
                                       for n in group] for i, group in enumerate(self._plan(champions))}
                for role, members in packs.items():
                    started.append(self._start_pack(role, members))
                for info, (role, members) in zip(list(started), packs.items()):
                    for m in members:
                        self._start_model(m, info, role, started)
                gateway = self._start_gateway(port if port is not None else self.settings.serving.gateway_port)
                started.append(gateway)
            except BaseException:
                stop_processes([p.pid for p in reversed(started)], self.stop_timeout)
                for name in champions:
                    with self.models[name].state.locked() as mstate:
                        self.models[name].state.keep_canary_pending(mstate)  # its rollout resumes next time
                        mstate.update(primary=None, canary=None, gateway=None, owner=None, canary_percent=0)
                raise
            self._point_models_at(gateway)
            state.update(gateway=asdict(gateway), replicas=[asdict(p) for p in started if p.role.startswith("pack-")],
                         packs=packs, primary=None, canary=None, owner=os.getpid(), down={},
                         models=sorted(champions))
            return dict(state)

    def _plan(self, champions: dict[str, Champion]) -> list[list[str]]:
        """The champions' groups, one packed server each: per MLflow store, by :func:`serving.model_pack.pack`."""
        from serving.model_pack import pack

        stores: dict[str, list[tuple[str, int]]] = {}
        for name, c in champions.items():
            stores.setdefault(c.tracking_uri, []).append((name, c.size))

        return [group for members in stores.values()
                for group in pack(members, max_models=self.max_models, max_bytes=self.max_bytes)]

    def _start_pack(self, role: str, members: list[dict[str, str]], port: int = 0) -> ProcessInfo:
        first = self.models[members[0]["name"]].settings
        host = first.serving.host
        port = port or free_port(host)
        limit = max(self.models[m["name"]].settings.serving.max_payload_bytes for m in members)
        argv = ["serving.model_pack", "--http-port", str(port), "--host", host, "--tracking-uri",
                members[0].get("tracking_uri") or first.tracking_uri, "--max-payload-bytes", str(limit)]
        for m in members:
            argv += ["--model", f"{m['name']}={m['version']}={m['uri']}"]
        log.info("starting %s (%s) on port %d", role, ", ".join(f"{m['name']} v{m['version']}" for m in members),
                 port)
        return self.launcher.spawn(role, argv, port, self.READY_PATH)

    def _start_model(self, member: dict[str, str], pack: ProcessInfo, role: str, started: list[ProcessInfo]) -> None:
        """The model's state: its packed primary, and its pending canary started in a process of its own."""
        model = self.models[member["name"]]
        with model.state.locked() as mstate:
            pending = mstate.get("pending_canary")
            primary = {**asdict(pack), "role": "primary", "version": member["version"], "model_uri": member["uri"],
                       "pack": role}
            mstate.update(primary=primary, canary=None, gateway=None, replicas=[], canary_percent=0, down={},
                          owner=os.getpid())
            if pending and pending["version"] == member["version"]:
                mstate["pending_canary"] = pending = None  # it is the champion already
        if not pending:
            return
        canary = model.start_model_server("canary", pending["version"], pending["model_uri"],
                                          model.settings.serving.canary_port)
        started.append(canary)
        with model.state.locked() as mstate:
            mstate.update(canary=asdict(canary), canary_percent=float(pending.get("percent", 0)), pending_canary=None)

    def _gateway_doc(self) -> dict[str, Any]:
        """The fleet gateway's models as their states stand (a model down is routed around as its supervisor left it)."""
        models = []
        for name, model in self.models.items():
            st = model.status()
            if not st.get("primary"):
                continue
            s = model.settings
            ws = s.workspace_dir
            down = st.get("down") or {}
            canary = st.get("canary") if st.get("canary") and "canary" not in down else None
            models.append({
                "name": name, "namespace": s.serving.namespace,
                "primary": {"url": st["primary"]["url"], "version": st["primary"]["version"]},
                "canary": {"url": canary["url"], "version": canary["version"]} if canary else None,
                "canary_percent": float(st.get("canary_percent") or 0) if canary else 0.0,
                "replicas": [{"url": r["url"], "version": r["version"]} for r in st.get("replicas") or []
                             if r["role"] not in down],
                "sticky_key": s.serving.sticky_key, "sink_url": model.sink_url(),
                "feedback_outbox": str(ws / "serving" / "feedback-outbox.db"),
                "event_outbox": str(ws / "serving" / "events-outbox.db"),
                "serving_state": str(model.state_path), "max_payload_bytes": s.serving.max_payload_bytes,
                "ingest_token_file": str(ws / "monitor" / "ingest.token")})
        return {"models": models}

    def _start_gateway(self, port: int) -> ProcessInfo:
        host = self.settings.serving.host
        port = port or free_port(host)
        path = self.dir / "fleet-gateway.json"
        atomic_write(path, json.dumps(self._gateway_doc(), indent=1))
        log.info("starting the fleet gateway on port %d", port)
        return self.launcher.spawn("gateway", ["serving.fleet_gateway", "--config", str(path), "--host", host,
                                               "--port", str(port)], port, "/healthz")

    def _point_models_at(self, gateway: ProcessInfo) -> None:
        """Each model's gateway entry: the fleet gateway, at the model's prefix."""
        for name, model in self.models.items():
            with model.state.locked() as mstate:
                if mstate.get("primary"):
                    mstate["gateway"] = {**asdict(gateway), "url": f"{gateway.url}/models/{name}"}

    def _ensure_tokens(self) -> None:
        """One admin token for the fleet gateway, also in each model's token file (where ``driftloop rollout
        --model NAME`` and a retraining run's deploy step read it); each model's ingest token file exists."""
        from serving.gateway_base import ADMIN_TOKEN_ENV

        from_env = bool(os.environ.get(ADMIN_TOKEN_ENV))
        self.gateway_admin.ensure_admin_token()
        token = os.environ[ADMIN_TOKEN_ENV]
        for model in self.models.values():
            if not from_env and model.admin_token() != token:
                model.token_path.parent.mkdir(parents=True, exist_ok=True)
                atomic_write(model.token_path, token)
            model.ingest_token()

    # -- restarts (FleetSupervisor) ----------------------------------------------------------
    def start_model_server(self, role: str, version: str, model_uri: str, port: int = 0) -> ProcessInfo:
        """Restart the packed server ``role`` on its port with the models it held; their states follow."""
        state = self.status()
        members = (state.get("packs") or {}).get(role)
        entry = next((r for r in state.get("replicas") or [] if r["role"] == role), None)
        if not members or entry is None:
            raise ServingError(f"no packed model server {role} in the fleet's state")
        info = self._start_pack(role, members, int(entry["port"]))
        for m in members:
            with self.models[m["name"]].state.locked() as mstate:
                if (mstate.get("primary") or {}).get("pack") == role:
                    mstate["primary"].update(pid=info.pid, port=info.port, url=info.url)
        return info

    def restart_gateway(self, port: int) -> ProcessInfo:
        info = self._start_gateway(port)
        self._point_models_at(info)
        return info

    # -- stopping -----------------------------------------------------------------------
    def _claim(self, state: dict[str, Any]) -> None:
        """Refuse while another live serve owns the fleet; stop what a dead one left (each model's canary
        becomes pending at its weight, as for one model)."""
        owner = state.get("owner")
        if owner and owner != os.getpid() and process_alive(int(owner)):
            raise ServingError(f"already serving the fleet at {(state.get('gateway') or {}).get('url', '?')} "
                               f"(driftloop serve, pid {owner}); stop it first")
        if owner == os.getpid() and state.get("gateway"):
            raise ServingError("already serving the fleet from this process; stop it first")
        for name, model in self.models.items():
            with model.state.locked() as mstate:
                mowner = mstate.get("owner")
                if mowner and mowner != os.getpid() and mowner != owner and process_alive(int(mowner)):
                    raise ServingError(f"model {name!r} is already served (driftloop serve, pid {mowner}); "
                                       "stop it first")
                model.state.keep_canary_pending(mstate)
                model._stop_all(mstate)
        self._stop_shared(state)

    def _stop_shared(self, state: dict[str, Any]) -> None:
        pids = [int(e["pid"]) for e in [state.get("gateway"), *(state.get("replicas") or [])] if e]
        stop_processes(pids, self.stop_timeout)
        state.update(gateway=None, replicas=[], packs={}, down={})
        self.launcher.reap()

    def stop(self, *, owner: int | None = None) -> bool:
        """Stop every process of the fleet's serving (gateway first); each model's canary still out
        becomes pending. With ``owner``, only while that process owns them."""
        with self.state.locked() as state:
            if owner is not None and state.get("owner") not in (owner, None):
                return False
            gateway = state.get("gateway")
            if gateway:
                stop_process(int(gateway["pid"]), self.stop_timeout)
            for model in self.models.values():
                with model.state.locked() as mstate:
                    if mstate.get("owner") not in (owner, None) and owner is not None:
                        continue
                    model.state.keep_canary_pending(mstate)
                    model._stop_all(mstate)
                    mstate.update(canary_percent=0, owner=None)
            self._stop_shared(state)
            state["owner"] = None
            return True


class FleetSupervisor(Supervisor):
    """The fleet's shared processes kept running: a packed model server restarts on its port with its
    models, the gateway on its port with the models as their states stand. Routing around a model
    server that is down is each model's own :class:`~serving.local_backend.Supervisor`'s (its canary and
    replicas); while a pack restarts, its models answer 502."""

    def __init__(self, backend: FleetBackend, **kw: Any) -> None:
        super().__init__(backend, **kw)  # type: ignore[arg-type]

    def _route(self) -> None:
        """Nothing to reroute: a pack comes back on its own port, where the gateway already sends its models."""

    def _start_gateway(self, entry: dict[str, Any]) -> ProcessInfo:
        return self.backend.restart_gateway(int(entry["port"]))  # type: ignore[attr-defined]
