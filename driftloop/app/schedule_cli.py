"""CLI verbs for recurring runs: ``driftloop schedule create|list|delete|update`` and ``driftloop scheduler``."""

from __future__ import annotations

import json
import signal
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Annotated, Any, Optional

import typer

if TYPE_CHECKING:
    from driftloop.core.config import Settings
    from pipelines.schedule import KfpSchedules, LocalSchedules, Schedule

__all__ = ["register", "schedule_app"]

schedule_app = typer.Typer(
    help="Recurring training runs: KFP recurring runs when kfp.host is set, else the local scheduler "
    "(`driftloop scheduler`). Cron is standard 5-field (minute hour day-of-month month day-of-week, UTC); "
    "it is converted to KFP's 6-field form (seconds first) on Kubeflow.",
    no_args_is_help=True,
)

CronOpt = Annotated[str, typer.Option("--cron", help='Standard 5-field cron in UTC, e.g. "0 3 * * *" (or @daily); '
                                       "Kubeflow gets it with a leading seconds field (0 0 3 * * *).")]
NameArg = Annotated[str, typer.Argument(help="Schedule name.")]
KfpHostOpt = Annotated[Optional[str], typer.Option("--kfp-host", help="Kubeflow Pipelines endpoint (cluster schedules).")]
RunParamOpt = Annotated[Optional[list[str]], typer.Option(
    "--param", "-p", help="Config override for every run of the schedule: section.key=value (repeatable).")]
WindowOpt = Annotated[Optional[float], typer.Option(
    "--window-days", min=0.0, help="Train on the last N days before each slot (local scheduler).")]


ModelOpt = Annotated[Optional[str], typer.Option("--model", "-m", help="The model of a fleet file (default: every "
                                                                      "model).")]


def _backends(config: str | None, kfp_host: str | None, model: str | None
              ) -> list[tuple[str | None, Settings, LocalSchedules | KfpSchedules]]:
    """Each model's schedule store: the one of a one-model file (name None), or the fleet's models
    (``--model``: that one)."""
    from driftloop.app.fleet_cli import fleet_from
    from pipelines.schedule import schedule_backend

    fleet = fleet_from(config, [f"kfp.host={kfp_host}"] if kfp_host else None)
    return [(None if fleet.single else m.name, m.settings, schedule_backend(m.settings)) for m in fleet.select(model)]


def _each(name: str | None, text: str) -> str:
    return f"{name}: {text}" if name else text


def _on_every_model(targets: list[tuple[str | None, Settings, Any]], act: Callable[[str | None, Settings, Any], str],
                    what: str) -> None:
    """``act`` on each model's store; of a fleet, a model that lacks the schedule is passed over (one line),
    and only when no model has it is it an error."""
    from driftloop.core.console import console
    from driftloop.core.errors import ScheduleError

    missing = []
    for name, settings, backend in targets:
        try:
            console.print(_each(name, act(name, settings, backend)))
        except ScheduleError as exc:
            if len(targets) == 1:
                raise
            missing.append(f"{name}: {exc}")
    if missing and len(missing) == len(targets):
        raise ScheduleError(f"{what} on no model: " + "; ".join(missing))
    for line in missing:
        console.print(f"[dim]{line}[/]")


def _check(schedule: Schedule, settings: Settings) -> None:
    schedule.settings_for(settings)  # bad overrides fail now, not at the first slot


@schedule_app.command("create")
def create_cmd(
    name: Annotated[str, typer.Option("--name", help="Unique schedule name (lowercase, digits, '-').")],
    cron: CronOpt,
    params: RunParamOpt = None,
    window_days: WindowOpt = None,
    max_concurrency: Annotated[int, typer.Option("--max-concurrency", min=1, help="Runs of it at once.")] = 1,
    no_catchup: Annotated[bool, typer.Option("--no-catchup", help="Skip slots missed while down.")] = False,
    paused: Annotated[bool, typer.Option("--paused", help="Create it paused.")] = False,
    config: Annotated[Optional[str], typer.Option("--config", "-c", help="YAML config file.")] = None,
    kfp_host: KfpHostOpt = None,
    pipeline: Annotated[str, typer.Option("--pipeline", help="train, or score (batch scoring of score.input, "
                                          "set with -p score.input=URI -p score.output=URI)")] = "train",
    model: ModelOpt = None,
) -> None:
    """Create a schedule that runs the training (or scoring) pipeline on cron (trigger schedule:<name>);
    of a fleet file, one for every model (``--model``: that one)."""
    from driftloop.core.console import console
    from pipelines.schedule import Schedule, parse_params

    schedule = Schedule(name, cron, parse_params(params), window_days, max_concurrency, not no_catchup, paused,
                        pipeline)
    targets = _backends(config, kfp_host, model)
    for _, settings, _backend in targets:
        _check(schedule, settings)  # every model's overrides before any store changes
    for model_name, settings, backend in targets:
        backend.create(schedule)
        where = (f"Kubeflow at {settings.kfp.host}" if settings.is_cluster
                 else "the local scheduler (run `driftloop scheduler`)")
        console.print(_each(model_name, f"[green]created[/] schedule {name} ({schedule.cron}) on {where}"))


@schedule_app.command("list")
def list_cmd(
    config: Annotated[Optional[str], typer.Option("--config", "-c", help="YAML config file.")] = None,
    kfp_host: KfpHostOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON document (every field) for scripts.")] = False,
    model: ModelOpt = None,
) -> None:
    """List the schedules (on Kubeflow this also deletes retired generations whose runs have finished);
    of a fleet file, every model's (``--json``: ``{"models": [{"model", "home", "schedules"}]}``)."""
    from driftloop.core.console import console

    docs = []
    for name, _, backend in _backends(config, kfp_host, model):
        statuses = backend.list()
        docs.append({"home": backend.home, "schedules": [_status_doc(st) for st in statuses]})
        if name is not None:
            docs[-1] = {"model": name, **docs[-1]}
        if as_json:
            continue
        if not statuses:
            console.print(_each(name, "no schedules"))
        else:
            console.print(_status_table(_each(name, backend.home), statuses))
    if as_json:
        typer.echo(json.dumps(docs[0] if docs and "model" not in docs[0] else {"models": docs}))


def _status_doc(st: Any) -> dict[str, Any]:
    """Every field of one listed schedule, for ``--json``."""
    return {**st.schedule.to_dict(), "state": st.state, "home": st.home,
            "next_run": st.next_run.isoformat() if st.next_run else None, "ident": st.ident, "note": st.note}


def _status_table(home: str, statuses: list[Any]) -> Any:
    """The schedules in 80 columns: name and cron over each other, the overrides and the note folded
    (never cut); ``--json`` has every field."""
    from rich import box
    from rich.markup import escape
    from rich.table import Table

    table = Table(title=f"schedules ({home})", box=box.ROUNDED)
    table.add_column("schedule / cron (UTC)", overflow="fold", max_width=18)
    table.add_column("state / next run", no_wrap=True)
    table.add_column("runs", no_wrap=True)
    table.add_column("params / detail", overflow="fold")
    for st in statuses:
        s = st.schedule
        name = escape(s.name) + (" [dim](score)[/]" if s.pipeline == "score" else "")
        next_run = st.next_run.strftime("%Y-%m-%d %H:%M") if st.next_run else "-"
        runs = (f"window {s.window_days:g} d" if s.window_days else "all rows") + (
            f"\nmax {s.max_concurrency} at once\n{'catch-up' if s.catchup else 'no catch-up'}")
        params = "\n".join(f"{k}={v}" for k, v in s.params.items()) or "-"
        table.add_row(f"{name}\n{escape(s.cron)}", f"{st.state}\n{next_run}", runs,
                      f"{escape(params)}\n[dim]{escape(st.note)}[/]")
        table.add_section()
    return table


@schedule_app.command("delete")
def delete_cmd(
    name: NameArg,
    config: Annotated[Optional[str], typer.Option("--config", "-c", help="YAML config file.")] = None,
    kfp_host: KfpHostOpt = None,
    model: ModelOpt = None,
) -> None:
    """Delete a schedule; runs already in progress finish. Of a fleet file, from every model that has it."""
    def delete(_model: str | None, _settings: Settings, backend: Any) -> str:
        backend.delete(name)
        return f"deleted schedule {name}"

    _on_every_model(_backends(config, kfp_host, model), delete, f"schedule {name!r} deleted")


@schedule_app.command("update")
def update_cmd(
    name: NameArg,
    cron: Annotated[Optional[str], typer.Option("--cron", help="New 5-field cron (UTC); converted to 6 fields for KFP.")] = None,
    params: RunParamOpt = None,
    window_days: Annotated[Optional[float], typer.Option(
        "--window-days", min=0.0, help="Train on the last N days before each slot; 0 = no window.")] = None,
    max_concurrency: Annotated[Optional[int], typer.Option("--max-concurrency", min=1)] = None,
    catchup: Annotated[Optional[bool], typer.Option("--catchup/--no-catchup", help="Catch-up policy.")] = None,
    paused: Annotated[Optional[bool], typer.Option("--paused/--resume", help="Pause or resume.")] = None,
    config: Annotated[Optional[str], typer.Option("--config", "-c", help="YAML config file.")] = None,
    kfp_host: KfpHostOpt = None,
    model: ModelOpt = None,
) -> None:
    """Change a schedule in place by name; runs in progress are not stopped. --param replaces all overrides.
    Of a fleet file, on every model that has it."""
    from driftloop.core.errors import ScheduleError
    from pipelines.schedule import Schedule, normalize_cron, parse_params

    changes: dict[str, Any] = {}
    if cron is not None:
        changes["cron"] = normalize_cron(cron)
    if params is not None:
        changes["params"] = parse_params(params)
    if window_days is not None:
        changes["window_days"] = window_days or None
    for key, value in (("max_concurrency", max_concurrency), ("catchup", catchup), ("paused", paused)):
        if value is not None:
            changes[key] = value
    if not changes:
        raise ScheduleError("nothing to update: give --cron, --param, --window-days, --max-concurrency, "
                            "--catchup/--no-catchup or --paused/--resume")
    targets = _backends(config, kfp_host, model)
    for _, settings, _backend in targets:
        _check(Schedule(name, changes.get("cron", "* * * * *"), changes.get("params", {})), settings)

    def update(_model: str | None, _settings: Settings, backend: Any) -> str:
        new = backend.update(name, **changes)
        return f"[green]updated[/] schedule {name} ({new.cron}{', paused' if new.paused else ''})"

    _on_every_model(targets, update, f"schedule {name!r} updated")


def scheduler_cmd(
    once: Annotated[bool, typer.Option("--once", help="Run the due slots once and exit.")] = False,
    config: Annotated[Optional[str], typer.Option("--config", "-c", help="YAML config file.")] = None,
    params: Annotated[Optional[list[str]], typer.Option("--param", "-p", help="Override a config key.")] = None,
    model: ModelOpt = None,
) -> None:
    """Run the local scheduler: the stored schedules' slots, through kfp.local, until Ctrl-C. Of a fleet
    file, one scheduler for every model: each due model's tick in a child process, fleet.max_concurrent_runs
    at once (``--model``: that model's schedules in this process)."""
    from driftloop.app.fleet_cli import fleet_from
    from driftloop.core.console import console, settings_from
    from pipelines.scheduler import Scheduler

    fleet = fleet_from(config, params)
    if not fleet.single and model is None:
        _fleet_scheduler(fleet, params, once)
        return
    scheduler = Scheduler(settings_from(config, params, model=model))
    if once:
        for outcome in scheduler.tick():
            console.print(f"{outcome.schedule} {outcome.slot.isoformat()}: {outcome.state}"
                          + (f" ({outcome.error})" if outcome.error else ""))
        return
    stop = threading.Event()
    # SIGTERM stops it like Ctrl-C, also in the middle of a run: the slot is recorded as interrupted and the
    # run's task processes end with the scheduler (processes.spawn)
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    console.print(f"scheduler watching {scheduler.store.path} (Ctrl-C stops it)")
    try:
        scheduler.run_forever(stop)
    except KeyboardInterrupt:
        stop.set()
    console.print("scheduler stopped")


def _fleet_scheduler(fleet: Any, params: list[str] | None, once: bool) -> None:
    from driftloop.app.fleet_scheduler import FleetScheduler
    from driftloop.core.console import console

    scheduler = FleetScheduler(fleet, params, say=lambda line: console.print(line, soft_wrap=True, markup=False))
    if once:
        ticks = scheduler.run_once()
        if any(t.code for t in ticks):
            raise typer.Exit(1)
        return
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    console.print(f"scheduler watching the schedules of {len(fleet.models)} models of {fleet.source}, "
                  f"{scheduler.limit} runs at once (fleet.max_concurrent_runs; Ctrl-C stops it)")
    try:
        scheduler.run_forever(stop)
    except KeyboardInterrupt:
        stop.set()
    console.print("scheduler stopped")


def register(app: typer.Typer) -> None:
    app.add_typer(schedule_app, name="schedule")
    app.command("scheduler")(scheduler_cmd)
