"""Serving commands: ``driftloop serve``, ``driftloop deploy`` and ``driftloop rollout …``.

``register(app)`` attaches them to the main CLI. ``serve`` runs the embedded default (champion
[+ pending canary] model servers behind the local gateway) until Ctrl-C and stops everything,
supervising them meanwhile (``serving.local_backend.Supervisor``: a process that dies or stops
answering is restarted with back-off, a canary that keeps dying is rolled back); ``serve status``
shows what runs, what is down and how often each was restarted;
``deploy`` renders or applies the InferenceService on a cluster; ``rollout`` shows and drives
the canary analysis.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Optional

import typer
from rich.table import Table

from driftloop.core.console import ConfigOpt, ModelOpt, ParamOpt
from driftloop.core.errors import ServingError

if TYPE_CHECKING:
    from driftloop.core.config import Settings
    from driftloop.core.registry import Registry
    from serving.rollout import RolloutController, RolloutTarget

__all__ = ["register", "rollout_app", "serve_app", "target_for", "StepLines"]

rollout_app = typer.Typer(help="Canary rollouts: status, run the analysis, promote or roll back by hand.",
                          no_args_is_help=True)


def _registry(settings: Settings) -> Registry:
    from driftloop.core.registry import Registry

    return Registry.from_settings(settings)


def target_for(settings: Settings) -> RolloutTarget:
    """The rollout target of this configuration: the InferenceService or the running local gateway."""
    from serving.backend import backend_for

    return backend_for(settings).rollout_target()


serve_app = typer.Typer(help="Serve the champion (and a pending canary) behind the local gateway until Ctrl-C.")


@serve_app.callback(invoke_without_command=True)
def serve(
    ctx: typer.Context,
    config: ConfigOpt = None,
    params: ParamOpt = None,
    model: ModelOpt = None,
    port: Annotated[Optional[int], typer.Option(help="Gateway port (default serving.gateway_port; 0 = free port).")] = None,
    rollout: Annotated[bool, typer.Option(help="Also drive a pending canary rollout while serving.")] = True,
) -> None:
    """Serve the champion (and a pending canary) behind the local gateway until Ctrl-C.

    Every model server and the gateway are supervised: one that dies or stops answering its
    readiness probe is restarted (back-off 1 s doubling to 60 s) while the gateway routes around
    it; a canary that dies 3 times within 10 minutes is rolled back. A fleet file serves every
    trained model of it (or --model's) behind one gateway (docs/fleet.md)."""
    if ctx.invoked_subcommand is not None:
        return
    from driftloop.core.console import console, settings_from
    from driftloop.core.fleet import load_fleet

    from driftloop.core.registry import CHAMPION
    from serving.local_backend import LocalBackend

    fleet = load_fleet(config, [*(params or []), *([f"serving.gateway_port={port}"] if port is not None else [])])
    if not fleet.single:
        _serve_fleet(fleet, model, port, rollout)
        return
    settings = settings_from(config, params, model=model, **{"serving.gateway_port": port})
    name = settings.mlflow.model_name
    registry = _registry(settings)
    champion = registry.version_by_alias(name, CHAMPION)
    if champion is None:
        raise ServingError(f"model {name!r} has no {CHAMPION!r} alias; train one with `driftloop run train`")
    backend = LocalBackend(settings)
    pending = backend.status().get("pending_canary")
    canary = (pending["version"], pending["model_uri"]) if pending and pending["version"] != champion.version else None
    percent = float(pending.get("percent", 0)) if canary else 0.0
    # backend.serve refuses while another serve owns the workspace, before anything is touched
    _serving(backend, lambda: backend.serve(champion.version, canary=canary, percent=percent),
             lambda state: _serve_until_interrupted(settings, backend, registry, state, name, champion.version,
                                                    canary, percent, rollout))


def _serving(backend: Any, start: Any, run: Any) -> None:
    """``start()`` the processes, then ``run(state)`` until Ctrl-C or SIGTERM; always stop what this serve owns."""
    from driftloop.core.console import console

    previous = signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    try:
        try:
            state = start()
        except KeyboardInterrupt:
            console.print("interrupted before serving; nothing left running")
            return
        try:
            run(state)
        except KeyboardInterrupt:
            console.print("stopping…")
        finally:
            if backend.stop(owner=os.getpid()):
                console.print("stopped: gateway and model servers")
            else:
                console.print("another serve has taken over; left its processes running")
    finally:
        signal.signal(signal.SIGTERM, previous)


def _serve_until_interrupted(settings: Settings, backend: Any, registry: Any, state: dict[str, Any], name: str,
                             version: str, canary: tuple[str, str] | None, percent: float, rollout: bool) -> None:
    from driftloop.core.console import console

    url = state["gateway"]["url"]
    console.print(f"serving [bold]{name}[/] v{version} at [bold]{url}[/]"
                  f"  (V1 {url}/v1/models/{settings.serving.name}:predict, V2 {url}/v2/models/{settings.serving.name}/infer)")
    if canary:
        console.print(f"canary v{canary[0]} takes {percent:g}% of traffic")
    console.print("feedback: POST /feedback {\"id\": <x-request-id>, \"label\": ...} as application/json with "
                  "'Authorization: Bearer <ingest token>' (DRIFTLOOP_INGEST_TOKEN, else the workspace's "
                  "monitor/ingest.token); Ctrl-C stops everything")
    loop = _ModelLoop(settings, backend, registry, rollout, StepLines(console))
    while True:
        loop.tick()
        time.sleep(0.5)


def _serve_fleet(fleet: Any, model: str | None, port: int | None, rollout: bool) -> None:
    """Every trained model of ``fleet`` (or ``model``) behind one gateway, packed model servers, each model's
    canary in its own process; one round drives each model's supervisor and rollout until Ctrl-C."""
    from driftloop.core.console import console
    from driftloop.core.registry import CHAMPION
    from serving.fleet_backend import FleetBackend, FleetSupervisor, champion

    served, champions, registries = [], {}, {}
    for m in fleet.select(model):
        s = m.settings
        registries[s.serving.name] = registry = _registry(s)
        version = registry.version_by_alias(s.mlflow.model_name, CHAMPION)
        if version is None:
            console.print(f"· {m.name}: not trained yet (no {CHAMPION!r} alias); skipped")
            continue
        served.append(s)
        champions[s.serving.name] = champion(s, version.version)
    if not champions:
        raise ServingError(f"no model of {fleet.source} has a {CHAMPION!r} alias yet; train them with "
                           f"`driftloop run train -c {fleet.source}`")
    backend = FleetBackend(served)

    def run(state: dict[str, Any]) -> None:
        url = state["gateway"]["url"]
        console.print(f"serving {len(champions)} models of {fleet.source} at [bold]{url}[/] "
                      f"({len(state['packs'])} model server(s) for the champions)")
        for name, champ in champions.items():
            canary = backend.models[name].status().get("canary")
            console.print(f"· {name} v{champ.version}: {url}/v1/models/{name}:predict, admin {url}/models/{name}/"
                          f"admin/…" + (f", canary v{canary['version']}" if canary else ""))
        console.print("Ctrl-C stops everything")
        shared = FleetSupervisor(backend)
        loops = [_ModelLoop(backend.models[name].settings, backend.models[name], registries[name], rollout,
                            StepLines(console, name)) for name in champions]
        while True:
            shared.tick()
            for loop in loops:
                loop.tick(degraded=shared.degraded)
            time.sleep(0.5)

    _serving(backend, lambda: backend.serve(champions, port=port), run)


class _ModelLoop:
    """One served model's round, every 0.5 s: its supervisor's tick, then its rollout's step when one is due.

    A failing rollout step (gateway busy or refusing, registry down) is reported and retried at the next
    interval; it never stops serving. While a process is down the rollout waits. A canary that keeps dying
    is rolled back through the rollout's own path when one is open for it, else straight at the backend."""

    def __init__(self, settings: Settings, backend: Any, registry: Any, rollout: bool, show_step: StepLines) -> None:
        from serving.backend import backend_for
        from serving.local_backend import Supervisor
        from serving.rollout import RolloutController

        self.settings, self.backend, self.rollout, self.show_step = settings, backend, rollout, show_step
        self.controller = RolloutController(settings, backend_for(settings, using=backend).rollout_target(), registry)
        self.supervisor = Supervisor(backend, on_crashloop=self.roll_back_crash_looping_canary)
        self.next_step = 0.0

    def roll_back_crash_looping_canary(self, reason: str) -> None:
        from driftloop.core.console import err_console

        current = self.controller.store.load()
        canary_now = self.backend.status().get("canary") or {}
        if current is not None and not current.done and current.canary_version == canary_now.get("version"):
            self.controller.rollback(reason)
        else:
            self.backend.rollback()
        err_console.print(f"[red]rolled back{self.show_step.label}:[/] {reason}")

    def tick(self, degraded: bool = False) -> None:
        """``degraded``: a shared process (the fleet's gateway or a packed server) is down; the rollout waits."""
        from driftloop.core.console import err_console
        from driftloop.core.errors import DriftloopError
        from serving.rollout import PENDING, PROGRESSING

        self.supervisor.tick()
        if not self.rollout or degraded or self.supervisor.degraded or time.monotonic() < self.next_step:
            return
        try:
            current = self.controller.store.load()
            if current is not None and current.status in (PENDING, PROGRESSING) and self.backend.status().get("canary"):
                self.next_step = time.monotonic() + self.settings.rollout.interval_seconds
                self.show_step(self.controller.step())
        except Exception as exc:  # noqa: BLE001 (serving outlives any one rollout step)
            detail = str(exc) if isinstance(exc, DriftloopError) else f"{type(exc).__name__}: {exc}"
            err_console.print(f"[yellow]rollout step{self.show_step.label} failed, retried next interval:[/] {detail}")


@serve_app.command("status")
def serve_status(
    config: ConfigOpt = None,
    params: ParamOpt = None,
    model: ModelOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="The serving state as one JSON document.")] = False,
) -> None:
    """What serves in this workspace: each process, the split, what is down and how often each was restarted.
    A fleet file without --model: the fleet's gateway and packed model servers, and each model's processes."""
    import json

    from driftloop.core.console import console, settings_from
    from driftloop.core.fleet import load_fleet
    from serving.local_backend import LocalBackend

    fleet = load_fleet(config, params)
    if not fleet.single and model is None:
        _fleet_status(fleet, as_json)
        return
    state = LocalBackend(settings_from(config, params, model=model)).status()
    if as_json:
        typer.echo(json.dumps(state, default=str))
        return
    table = _process_table("driftloop serve")
    _process_rows(table, state)
    console.print(table)
    if state.get("canary"):
        console.print(f"canary weight: {state.get('canary_percent', 0):g}%")
    if state.get("pending_canary"):
        p = state["pending_canary"]
        console.print(f"pending canary v{p['version']} at {p.get('percent', 0):g}% (starts with `driftloop serve`)")

def _process_table(title: str) -> Table:
    table = Table(title=title)
    for col in ("role", "version", "pid", "url", "state", "restarts"):
        table.add_column(col, overflow="fold")  # a long URL or version folds in 80 columns; --json has all
    return table


def _process_rows(table: Table, state: dict[str, Any], prefix: str = "", *, shared: bool = True) -> None:
    """One row per process of a serving state (``shared``: also the fleet's gateway and packed primary)."""
    down, restarts = state.get("down") or {}, state.get("restarts") or {}
    entries = [state[r] for r in ("gateway", "primary", "canary") if state.get(r)] + list(state.get("replicas") or [])
    for e in entries:
        if not shared and (e["role"] == "gateway" or e.get("pack")):
            continue
        role = prefix + e["role"] + (f" ({e['pack']})" if e.get("pack") else "")
        table.add_row(role, e.get("version") or "–", str(e["pid"]), e["url"],
                      "[red]down[/]" if e["role"] in down else "up", str(restarts.get(e["role"], 0)))


def _fleet_status(fleet: Any, as_json: bool) -> None:
    """The fleet's shared processes, then each model's own (read without creating anything)."""
    import json

    from driftloop.core.console import console
    from serving.local_state import ServingState

    root = fleet.models[0].settings.fleet.root
    shared = ServingState(root / "serving").read()
    models = {m.name: ServingState(m.settings.workspace_dir / "serving").read() for m in fleet.models}
    if as_json:
        typer.echo(json.dumps({"fleet": shared, "models": models}, default=str))
        return
    table = _process_table(f"driftloop serve: {fleet.source}")
    _process_rows(table, shared)
    for name, state in models.items():
        primary = state.get("primary")
        if primary and primary.get("pack"):
            table.add_row(f"{name}/primary ({primary['pack']})", primary.get("version") or "–", str(primary["pid"]),
                          primary["url"], "up", "–")
        _process_rows(table, state, f"{name}/", shared=False)
    console.print(table)
    for name, state in models.items():
        if state.get("canary"):
            console.print(f"{name}: canary weight {state.get('canary_percent', 0):g}%")
        if state.get("pending_canary"):
            p = state["pending_canary"]
            console.print(f"{name}: pending canary v{p['version']} at {p.get('percent', 0):g}%")


def deploy(
    config: ConfigOpt = None,
    params: ParamOpt = None,
    model: ModelOpt = None,
    version: Annotated[Optional[str], typer.Option(help="Model version or alias to serve (default: the champion).")] = None,
    canary_percent: Annotated[Optional[int], typer.Option(help="Put --version out as a canary with this share.")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the InferenceService YAML, change nothing.")] = False,
    apply: Annotated[bool, typer.Option("--apply", help="Apply it to the cluster with KServeClient.")] = False,
) -> None:
    """Render the InferenceService (cluster home); --apply applies it, --dry-run only prints it.

    With rollout.shadow_percent > 0 the printout also holds the shadow phase's objects (shadow
    InferenceService and Istio mirror), which the rollout controller applies and removes. On a fleet file
    without --model: every model's InferenceService (driftloop.app.fleet_deploy)."""
    from driftloop.core.console import console, settings_from

    if model is None:
        from driftloop.app.fleet_deploy import deploy_fleet

        deploy_fleet(config, params, apply=apply and not dry_run, version=version, canary_percent=canary_percent)

    from serving.inference_service import build_inference_service, check_percent, to_yaml

    settings = settings_from(config, params, model=model)
    if canary_percent is not None:
        check_percent(canary_percent)
        if version is None:
            raise ServingError("--canary-percent needs --version (the model version to put out as a canary)")
    model_uri = resolved = None
    if version is not None:
        name = settings.mlflow.model_name
        ref = version if ("@" in version or "/" in version) else (
            f"{name}/{version}" if version.isdigit() else f"{name}@{version}")
        info = _registry(settings).resolve(ref)
        model_uri, resolved = f"models:/{info.name}/{info.version}", info.version
    if canary_percent is not None and apply and not dry_run:
        from serving.kserve_backend import KServeBackend

        KServeBackend(settings).set_canary(model_uri, canary_percent)
        console.print(f"canary {model_uri} at {canary_percent}% on {settings.serving.namespace}/{settings.serving.name}")
        return
    isvc = build_inference_service(settings, model_uri=model_uri, canary_traffic_percent=canary_percent)
    text = to_yaml(isvc)
    if dry_run or not apply:
        if settings.rollout.shadow_percent > 0:
            text += "---\n" + _shadow_yaml(settings, model_uri, resolved)
        console.print(text, markup=False, highlight=False, soft_wrap=True)
        return
    from serving.kserve_backend import KServeBackend

    KServeBackend(settings).apply(isvc)
    console.print(f"applied InferenceService {settings.serving.namespace}/{settings.serving.name}")


def _shadow_yaml(settings: Settings, model_uri: str | None, version: str | None) -> str:
    """The shadow phase's cluster objects for ``rollout.shadow_percent``: the shadow InferenceService and
    the Istio mirror, checked like infra/ (kserve's model classes, the pinned VirtualService schema).

    The candidate is ``model_uri`` (``--version``), else the ``challenger`` alias the deploy step
    puts out; the mirror names the shadow's first revision — the controller writes the one the
    cluster reports ready when it puts the mirror up.
    """
    import yaml

    from driftloop.app.infra_check import check_objects
    from driftloop.core.registry import CHALLENGER
    from serving.inference_service import shadow_objects

    uri = model_uri or f"models:/{settings.mlflow.model_name}@{CHALLENGER}"
    objects = shadow_objects(settings, uri, version, settings.rollout.shadow_percent)
    problems = check_objects(objects, {}, "deploy --dry-run")
    if problems:
        raise ServingError(f"the rendered shadow objects are not valid: {problems[0]}")
    comment = (f"# shadow phase (rollout.shadow_percent={settings.rollout.shadow_percent:g}): put up by the rollout "
               "controller before the canary steps, removed when the phase ends\n")
    return comment + yaml.safe_dump_all(objects, sort_keys=False)


def _fmt(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


def _controller(config: str | None, params: list[str] | None, model: str | None = None, *,
                need_target: bool = True, preload: bool = False) -> RolloutController:
    from driftloop.core.console import settings_from
    from serving.rollout import RolloutController

    settings = settings_from(config, params, model=model)
    target = target_for(settings) if need_target else None
    return RolloutController(settings, target, _registry(settings), preload=preload)


@rollout_app.command("status")
def rollout_status(
    config: ConfigOpt = None,
    params: ParamOpt = None,
    model: ModelOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON document (every field) for scripts.")] = False,
) -> None:
    """The rollout's state and its step history: weight, each check's number and verdict, decision, reason."""
    import json
    from dataclasses import asdict

    from driftloop.app.lineage import shadow_phase
    from driftloop.core.console import console

    ctl = _controller(config, params, model, need_target=False)
    state = ctl.state()
    if as_json:
        typer.echo(json.dumps({**asdict(state), "failed_checks_limit": ctl.cfg.threshold,
                               "shadow": shadow_phase(state.history)}, default=str))
        return
    console.print(f"[bold]{state.model_name}[/] canary v{state.canary_version} vs primary v{state.primary_version}: "
                  f"[bold]{state.status}[/] at {state.weight}% (failed checks {state.failed_checks}/"
                  f"{ctl.cfg.threshold})")
    _print_shadow_phase(console, state.history)
    console.print(_steps_table("rollout steps", state.history, CANARY_CHECKS, weight=True))


class StepLines:
    """Each rollout step as one line, printed once: ``rollout: <decision> at <weight>% — <reason>``.

    A step that changes nothing -- another wait for requests, another unavailable interval, another
    wait for approval -- repeats the one before it and is shown only with ``-v``."""

    QUIET_REPEATS = frozenset({"wait", "unavailable", "shadow_wait", "await_approval"})

    def __init__(self, out: Any, model: str | None = None) -> None:
        """``model``: the fleet model whose rollout it is (named in each line)."""
        self.out = out
        self.label = f" {model}" if model else ""
        self._last: tuple[Any, Any] | None = None

    def __call__(self, rec: dict[str, Any]) -> None:
        import logging

        from rich.markup import escape

        key = (rec.get("decision"), rec.get("weight"))
        repeat = key == self._last and key[0] in self.QUIET_REPEATS
        self._last = key
        if repeat and not logging.getLogger().isEnabledFor(logging.DEBUG):
            return
        colour = {"promote": "green", "rollback": "red"}.get(str(rec.get("decision")), "bold")
        self.out.print(f"rollout{escape(self.label)}: [{colour}]{escape(str(rec.get('decision')))}[/] at {rec.get('weight')}% — "
                       f"{escape(str(rec.get('reason', '')))}")


# the checks serving.rollout records at each canary step, in the order a person reads them
CANARY_CHECKS = ("requests", "error_rate", "p99_ms", "prediction_psi", "quality_delta")
_MARKS = {True: "[green]ok[/]", False: "[red]fail[/]", None: "[dim]n/a[/]"}


def _steps_table(title: str, steps: list[dict[str, Any]], names: tuple[str, ...], *, weight: bool) -> Table:
    """Steps of a rollout in 80 columns: time (and weight), one line per check with its number and
    verdict, then the decision with its reason folded under it (never cut). ``--json`` has every field."""
    from rich import box
    from rich.markup import escape

    labels = {n: n.removeprefix("shadow_") for n in names}
    pad = max(map(len, labels.values()))
    table = Table(title=title, box=box.ROUNDED)
    table.add_column("time /\nweight" if weight else "time", no_wrap=True)
    table.add_column("checks", no_wrap=True)
    table.add_column("decision / reason", overflow="fold")
    for rec in steps:
        checks = {c["name"]: c for c in rec.get("checks", [])}
        lines = [f"{labels[n]:<{pad}} {_fmt(checks[n]['value']):>6} {_MARKS[checks[n]['passed']]}"
                 for n in names if n in checks]
        t = datetime.fromtimestamp(rec["ts"], tz=timezone.utc).strftime("%H:%M:%S") if "ts" in rec else rec.get("time", "")
        table.add_row(t + (f"\n{rec.get('weight', '')}%" if weight else ""), "\n".join(lines),
                      f"{escape(str(rec.get('decision', '')))}\n[dim]{escape(str(rec.get('reason', '')))}[/]")
        table.add_section()
    return table


def _print_shadow_phase(out: Any, history: list[dict[str, Any]]) -> None:
    """The shadow phase before the canary steps: verdict, then each judged interval's numbers."""
    from driftloop.app.lineage import SHADOW_CHECKS, format_shadow_check, shadow_phase, shadow_steps

    shadow = shadow_phase(history)
    if shadow is None:
        return
    colour = {"passed": "green", "failed": "red"}.get(shadow["verdict"], "yellow")
    pct = f" at {shadow['percent']:g}% mirrored" if shadow.get("percent") is not None else ""
    out.print(f"shadow phase: [{colour}]{shadow['verdict']}[/]{pct} since {shadow['started']}, "
              f"{shadow['intervals']} interval(s) — {shadow['reason']}", markup=True)
    for check in shadow["checks"]:
        out.print(f"  {format_shadow_check(check)}", markup=False)
    out.print(_steps_table("shadow phase (mirrored copies; no user saw the candidate's answers)",
                           shadow_steps(history), SHADOW_CHECKS, weight=False))


@rollout_app.command("run")
def rollout_run(
    config: ConfigOpt = None,
    params: ParamOpt = None,
    model: ModelOpt = None,
    max_steps: Annotated[Optional[int], typer.Option(help="Stop after this many intervals.")] = None,
) -> None:
    """Run the analysis every rollout.interval_seconds until the canary is promoted or rolled back.
    A fleet file without --model: every model's open rollout, several at once, until none is open."""
    from driftloop.core.console import console
    from driftloop.core.fleet import load_fleet

    fleet = load_fleet(config, params)
    if not fleet.single and model is None:
        _rollout_fleet(fleet, max_steps)
        return
    ctl = _controller(config, params, model, preload=True)  # a process of its own: both versions load meanwhile
    try:
        state = ctl.run(until_done=True, max_steps=max_steps, on_step=StepLines(console))
    except KeyboardInterrupt:
        state = ctl.state()
        console.print("interrupted; the rollout resumes where it stopped with `driftloop rollout run`")
    if not state.done:  # a finished rollout's last step line said how it ended
        console.print(f"[yellow]{state.status}[/] at {state.weight}%: {state.reason}")


def _rollout_fleet(fleet: Any, max_steps: int | None) -> None:
    """``rollout run`` on a fleet file: :class:`~driftloop.app.fleet_rollout.FleetRollouts` over every model, each
    step a line prefixed with its model; a model that failed on its last visit makes the exit status 1."""
    from driftloop.app.fleet_rollout import FleetRollouts, Visit
    from driftloop.core.console import console, err_console
    from serving.rollout import RolloutController

    lines = {m.name: StepLines(console, m.name) for m in fleet.models}

    def controller(m: Any, need_target: bool) -> RolloutController:
        s = m.settings
        return RolloutController(s, target_for(s) if need_target else None, _registry(s), preload=need_target)

    def show(visit: Visit) -> None:
        if visit.error is not None:
            err_console.print(f"[yellow]rollout {visit.model} failed (its next interval tries again):[/] {visit.error}",
                              markup=True, highlight=False)
        elif visit.step is not None:
            lines[visit.model](visit.step)

    stop = threading.Event()
    previous = signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        last = FleetRollouts(fleet.models, controller, on_visit=show).run(max_steps=max_steps, stop=stop)
    except KeyboardInterrupt:
        stop.set()
        console.print("interrupted; each rollout resumes where it stopped with `driftloop rollout run`")
        return
    finally:
        signal.signal(signal.SIGTERM, previous)
    if stop.is_set() and any(v.open for v in last.values()):
        console.print("stopped; each rollout resumes where it stopped with `driftloop rollout run`")
    for name, visit in last.items():
        if visit.open:
            console.print(f"{name}: [yellow]{visit.status}[/] (open)")
    idle = [name for name, visit in last.items() if not visit.open and visit.error is None and visit.step is None]
    if len(idle) == len(fleet.models):
        console.print(f"no open rollout in the {len(idle)} models of {fleet.source}")
    failed = sorted(name for name, visit in last.items() if visit.error is not None)
    if failed:
        raise typer.Exit(1)


@rollout_app.command("promote")
def rollout_promote(config: ConfigOpt = None, params: ParamOpt = None, model: ModelOpt = None) -> None:
    """Promote the canary now (alias champion moves, 100 % traffic)."""
    from driftloop.core.console import console

    rec = _controller(config, params, model).promote("promoted by hand (driftloop rollout promote)")
    console.print(f"[green]promoted[/]: {rec['reason']}")


@rollout_app.command("rollback")
def rollout_rollback(
    config: ConfigOpt = None,
    params: ParamOpt = None,
    model: ModelOpt = None,
    reason: Annotated[str, typer.Option(help="Why (recorded on the model version).")] = "rolled back by hand",
) -> None:
    """Roll the canary back now (0 %, champion unchanged, version tagged with the reason)."""
    from driftloop.core.console import console

    rec = _controller(config, params, model).rollback(reason)
    console.print(f"[red]rolled back[/]: {rec['reason']}")


@rollout_app.command("approve")
def rollout_approve(config: ConfigOpt = None, params: ParamOpt = None, model: ModelOpt = None) -> None:
    """Give the manual approval a rollout waits for before promotion (rollout.manual_approval)."""
    from driftloop.core.console import console

    state = _controller(config, params, model, need_target=False).approve()
    console.print(f"approved: v{state.canary_version} is promoted at the next interval")


def register(app: typer.Typer) -> None:
    """Attach ``serve``, ``deploy`` and the ``rollout`` group to the driftloop CLI."""
    app.add_typer(serve_app, name="serve")
    app.command("deploy")(deploy)
    app.add_typer(rollout_app, name="rollout")
