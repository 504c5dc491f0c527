"""The driftloop command line: the user's front door, one verb per step of the loop.

User errors (``DriftloopError``) print one clear line and exit with status 2; only
bugs show a traceback.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape
from rich.table import Table

from driftloop.core.config import Settings
from driftloop.core.console import ConfigOpt, ModelOpt, ParamOpt, console, err_console, settings_from
from driftloop.core.errors import DriftloopError
from driftloop.core.files import private_umask

__all__ = ["app", "main", "console", "settings_from", "ConfigOpt", "ParamOpt"]


app = typer.Typer(
    name="driftloop",
    help="Train, serve, monitor and retrain a production model on Kubeflow, KServe, MLflow and Evidently.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
run_app = typer.Typer(help="Run a pipeline (kfp.local by default, Kubeflow when kfp.host is set).", no_args_is_help=True)
data_app = typer.Typer(help="Built-in scenario data.", no_args_is_help=True)
config_app = typer.Typer(help="Inspect the configuration.", no_args_is_help=True)
app.add_typer(run_app, name="run")
app.add_typer(data_app, name="data")
app.add_typer(config_app, name="config")

def _quiet_libraries() -> None:
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    # (matplotlib: "generated new fontManager" the first time a machine plots)
    for name in ("mlflow", "alembic", "urllib3", "kserve", "httpx", "httpcore", "matplotlib"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # urllib3 warns on every retry of an unreachable host; the one error line that follows names the cause
    logging.getLogger("urllib3.connectionpool").setLevel(logging.ERROR)
    os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")  # its INFO lines (e.g. creating tables) are noise here


@app.callback()
def _root(verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")] = False) -> None:
    # before anything creates a file: the workspace (MLflow store, logs, state) is its owner's only
    private_umask()
    root = logging.getLogger()
    if not any(isinstance(h, _StderrHandler) for h in root.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        root.addHandler(handler)
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    _quiet_libraries()


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is when a line is logged, not to the stream that was current when
    the CLI first ran (``basicConfig`` binds that one: a later command in the same process, or one whose
    stderr was redirected, would write to a closed stream and print a logging traceback)."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass


# --- compile -------------------------------------------------------------------------
@app.command("compile")
def compile_cmd(
    config: ConfigOpt = None,
    params: ParamOpt = None,
    output_dir: Annotated[Path, typer.Option("--output-dir", "-o", help="Where the YAML goes.")] = Path("compiled"),
    model: ModelOpt = None,
) -> None:
    """Compile the pipelines to Kubeflow Pipelines YAML, ready to upload in the Kubeflow UI.

    A fleet file compiles every model's pipelines into ``<output-dir>/<model>/`` (``--model``: that one only)."""
    from pipelines.training import compile_pipeline

    from driftloop.app.fleet_cli import fleet_from
    from pipelines.scoring import SCORE_PIPELINE_NAME, compile_scoring_pipeline

    fleet = fleet_from(config, params)
    for m in fleet.select(model):
        settings, out = m.settings, output_dir if fleet.single else output_dir / m.name
        path = compile_pipeline(settings, out / f"{settings.kfp.pipeline_name}.yaml")
        console.print(f"[green]compiled[/] training pipeline -> {path}")
        path = compile_scoring_pipeline(settings, out / f"{SCORE_PIPELINE_NAME}.yaml")
        console.print(f"[green]compiled[/] batch scoring pipeline -> {path}")
    console.print("Upload it in the Kubeflow UI (Pipelines > Upload pipeline) or submit it with `driftloop run train --kfp-host …`.")


# --- run train -------------------------------------------------------------------------
@run_app.command("train")
def run_train(
    config: ConfigOpt = None,
    params: ParamOpt = None,
    kfp_host: Annotated[Optional[str], typer.Option("--kfp-host", help="Kubeflow Pipelines endpoint (cluster run).")] = None,
    trigger: Annotated[str, typer.Option(help="What started this run: manual, schedule:<name>, drift:<alert-id>.")] = "manual",
    window_start: Annotated[Optional[str], typer.Option(help="Inclusive start of the data window (ISO time).")] = None,
    window_end: Annotated[Optional[str], typer.Option(help="Exclusive end of the data window (ISO time).")] = None,
    wait: Annotated[bool, typer.Option(help=WAIT_HELP)] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Stream the tasks' full output too.")] = False,
    model: Annotated[Optional[str], typer.Option("--model", help="Of a fleet (docs/fleet.md): train this model "
                                                 "only (default: every model, fleet.max_concurrent_runs at once).")] = None,
    result_file: Annotated[Optional[Path], typer.Option("--result-file", hidden=True)] = None,
) -> None:
    """Run the training pipeline and print a summary: rows, metrics, gate decision, model version.

    One line per task as it ends (step, state, seconds, its key output), a spinner while it runs;
    the full task output goes to a log file whose path is printed (``-v`` streams it as well).
    One run at a time per workspace: while another runs there, this one is refused (exit 2)
    unless ``--wait``, which queues it behind the other.
    """
    from pipelines.runner import RunRequest, check_window, runner_for
    from pipelines.training import run_training

    validate_trigger(trigger)
    check_window(window_start, window_end, names=("--window-start", "--window-end"))  # before anything starts
    from driftloop.app.fleet_cli import fleet_from, pick, train_fleet, write_result

    params = [*(params or []), *([f"kfp.host={kfp_host}"] if kfp_host else [])]
    fleet = fleet_from(config, params)
    chosen = pick(fleet, model)
    if chosen is None:  # a fleet: one child process per model
        train_fleet(fleet, params, {"--trigger": trigger, "--window-start": window_start,
                                    "--window-end": window_end, "--wait": wait})
        return
    settings = chosen.settings
    runner = runner_for(settings)
    where = f"Kubeflow at {settings.kfp.host}" if settings.is_cluster else "kfp.local (embedded default)"
    console.print(f"[bold]driftloop[/] training pipeline on {where}; data {settings.data.source}")
    request = RunRequest(trigger=trigger, window_start=window_start, window_end=window_end)
    if hasattr(runner, "log_path"):
        console.print(f"task output: {runner.log_path(request)}", soft_wrap=True)  # one line: a path to copy
    # the terminal, before kfp.local's output is redirected
    lines = TaskLines(sys.stdout, spinner=not verbose, tasks=TRAINING_TASKS, label="training run")
    try:
        if settings.is_cluster:
            result = run_training(runner, request, wait=wait, progress=lines if wait else None)
        else:
            result = run_training(runner, request, progress=lines, echo=sys.stdout if verbose else None, wait=wait,
                                  on_wait=_say_waiting)
    finally:
        lines.close()
    if result_file is not None:
        write_result(result_file, result)
    print_run_result(settings, result)
    if result.state == "FAILED":
        raise typer.Exit(1)


@run_app.command("score")
def run_score(
    input_uri: Annotated[Optional[str], typer.Option("--input", help="Records to score: parquet or csv URI "
                                                     "(default score.input).")] = None,
    output_uri: Annotated[Optional[str], typer.Option("--output", help="Where the predictions go (parquet, or csv "
                                                      "by suffix; default score.output).")] = None,
    model: Annotated[Optional[str], typer.Option("--model", help="name@alias or name/version "
                                                 "(default <mlflow.model_name>@champion; of a fleet, the name "
                                                 "picks the fleet's model).")] = None,
    keep_columns: Annotated[Optional[list[str]], typer.Option(
        "--keep-columns", help="Input columns copied beside each prediction: names, comma-separated or repeated; "
                               "'*' for all.")] = None,
    id_column: Annotated[Optional[str], typer.Option(
        "--id-column", help="The input's id column, copied to each prediction (then required). Default "
                            "score.id_column when the input has it, else each prediction carries its row number.")] = None,
    chunks: Annotated[Optional[int], typer.Option("--chunks", min=1, max=1000, help="Chunks scored in parallel "
                                                  "(default: one per CPU core).")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing output.")] = False,
    config: ConfigOpt = None,
    params: ParamOpt = None,
    kfp_host: Annotated[Optional[str], typer.Option("--kfp-host", help="Kubeflow Pipelines endpoint (cluster run).")] = None,
    trigger: Annotated[str, typer.Option(help="What started this run: manual or schedule:<name>.")] = "manual",
    wait: Annotated[bool, typer.Option(help=WAIT_HELP)] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Stream the tasks' full output too.")] = False,
) -> None:
    """Run the batch scoring pipeline: chunks in parallel, predictions with id (or row number) and model version,
    drift of the batch, and whether its alert reached the monitor.

    One line per task as it ends; the full task output goes to the run's log file (``-v`` streams it as well).
    One run at a time per workspace: refused while another runs there, unless ``--wait``.
    """
    from driftloop.app.fleet_cli import model_name
    from driftloop.core.workspace import workspace_lock
    from pipelines.scoring import ScoreRequest, run_scoring, score_arguments

    validate_trigger(trigger)
    settings = settings_from(config, params, model=model_name(model, config, params), **{"kfp.host": kfp_host})
    kept = tuple(c.strip() for value in keep_columns or [] for c in value.split(",") if c.strip())
    request = ScoreRequest(input=input_uri, output=output_uri, model=model, chunks=chunks, keep_columns=kept,
                           id_column=id_column or None, overwrite=True if overwrite else None, trigger=trigger)
    where = f"Kubeflow at {settings.kfp.host}" if settings.is_cluster else "kfp.local (embedded default)"
    console.print(f"[bold]driftloop[/] batch scoring on {where}")
    lines = TaskLines(sys.stdout, spinner=not verbose, tasks=score_arguments(settings, request)["chunks"] + 3,
                      label="scoring run")
    try:
        if settings.is_cluster:
            result = run_scoring(settings, request, wait=wait, progress=lines)
        else:
            with workspace_lock(settings.workspace_dir, request.request_id, wait=wait, on_wait=_say_waiting):
                result = run_scoring(settings, request, progress=lines, echo=sys.stdout if verbose else None)
    finally:
        lines.close()
    if result.state == "FAILED":
        err_console.print(f"[red]scoring failed[/]: {escape(result.error or '')}")
        err_console.print("No complete output was written.")
        raise typer.Exit(1)
    if not result.summary:
        console.print(f"run [bold]{result.run_id}[/] {result.state.lower()}" + (f": {result.url}" if result.url else ""))
        return
    console.print(score_table(result.run_id, result.summary))


def score_table(run_id: str, s: dict) -> Table:
    """A scoring run's summary in 80 columns (values fold, never cut)."""
    table = Table(title="batch scoring run", show_header=False)
    table.add_column(no_wrap=True)
    table.add_column(overflow="fold")  # paths and URIs fold in 80 columns, never cut
    table.add_row("pipeline run", run_id)
    table.add_row("model", f"{s['model']} v{s['version']}")
    table.add_row("input", s["input"])
    table.add_row("predictions", f"{s['rows']} rows -> {s['output']}")
    if s.get("ids"):
        table.add_row("identified by", s["ids"])
    if s.get("kept"):
        table.add_row("columns kept", ", ".join(s["kept"]))
    drifted = s["drift"] == "drifted"
    table.add_row("batch drift", f"[{'yellow' if drifted else 'green'}]{s['drift']}[/] ({s['drift_share']:.2f} of "
                  "columns" + (f": {', '.join(s['drifted_columns'])}" if s["drifted_columns"] else "") + ")")
    if drifted:
        alert = s.get("alert") or "not recorded"
        colour = "green" if alert.startswith("sent") else "red"
        table.add_row("drift alert", f"[{colour}]{escape(alert)}[/]")
    table.add_row("report (MLflow)", s["report"])
    table.add_row("task output", s.get("log", ""))
    return table


WAIT_HELP = ("On Kubeflow: wait for the run to finish. On the embedded default: if another run holds the "
             "workspace, wait for it instead of refusing.")


def _say_waiting(message: str) -> None:
    err_console.print(escape(message))


# tasks of a training run: ingest, validate, train, evaluate, register (or record rejection), deploy
TRAINING_TASKS = 6


class TaskLines:
    """The progress view of a run: one line per task as it ends; on a terminal, a spinner while one runs,
    with the run's share done and the time left (:class:`~driftloop.core.progress.Progress`, once the run
    has taken a few seconds; ``tasks``: how many the run has)."""

    MARKS = {"succeeded": "[green]✓[/]", "failed": "[red]✗[/]", "skipped": "[dim]-[/]"}

    def __init__(self, out, *, spinner: bool = True, tasks: int = 0, label: str = "run") -> None:  # noqa: ANN001
        from rich.console import Console

        from driftloop.core.progress import Progress

        self.console = Console(file=out, highlight=False)
        self._spinner = spinner and self.console.is_terminal
        self._live = None
        self.progress = Progress(label, stream=out)
        self.tasks, self.done = tasks, 0

    def share(self) -> float:
        """The share of the run's tasks that have ended (below 1 until the run itself has)."""
        return min(self.done / self.tasks, 0.99) if self.tasks else 0.0

    def __call__(self, event) -> None:  # noqa: ANN001 (pipelines.runner.TaskEvent)
        self._stop()
        if event.state == "running":
            if self._spinner:
                from rich.live import Live

                # no stdout redirection: kfp.local's own output goes to the run's log file meanwhile
                self._live = Live(_Running(event.task, self), console=self.console, transient=True,
                                  redirect_stdout=False, redirect_stderr=False, refresh_per_second=8)
                self._live.start()
            return
        self.done += 1
        mark = self.MARKS.get(event.state, "·")
        self.console.print(f"{mark} {event.task:<16} {event.state:<9} {event.seconds:6.1f}s  {escape(event.detail)}".rstrip(),
                           no_wrap=True, overflow="ellipsis")

    def _stop(self) -> None:
        if self._live is not None:
            self._live.stop()
            self._live = None

    def close(self) -> None:
        self._stop()


class _Running:
    """The spinner of a running task; its text is read at every refresh, so the time left moves."""

    def __init__(self, task: str, lines: TaskLines) -> None:
        from rich.spinner import Spinner

        self.task, self.lines = task, lines
        self.spinner = Spinner("dots", text=f"{task} running")

    def __rich_console__(self, console, options):  # noqa: ANN001, ANN204 (rich's protocol)
        done = self.lines.progress.text(self.lines.share())
        self.spinner.update(text=f"{self.task} running" + (f" · {done}" if done else ""))
        yield self.spinner


def validate_trigger(trigger: str) -> None:
    from pipelines.runner import check_trigger

    check_trigger(trigger)


def print_run_result(settings: Settings, result) -> None:  # noqa: ANN001 (RunResult)
    if result.state == "FAILED":
        from pipelines.runner import registry_outcome

        err_console.print(f"[red]run failed[/]: {escape(result.error or '')}")
        err_console.print(escape(registry_outcome(settings, result.request_id)))
        return
    if not result.summary:
        console.print(f"run [bold]{result.run_id}[/] {result.state.lower()}" + (f": {result.url}" if result.url else ""))
        return
    s = result.summary
    table = Table(title="training run", show_header=False)
    table.add_column(no_wrap=True)
    table.add_column(overflow="fold")  # paths and URIs fold in 80 columns, never cut
    table.add_row("pipeline run", result.run_id)
    table.add_row("trigger", s.get("trigger", ""))
    table.add_row("data window", s.get("window", ""))
    table.add_row("rows (train/test)", f"{s['train_rows']} / {s['test_rows']}")
    table.add_row("device", s.get("device", ""))
    table.add_row("metrics", ", ".join(f"{k}={v:.4f}" for k, v in sorted(s["metrics"].items())))
    if s.get("champion_metrics"):
        table.add_row("champion", ", ".join(f"{k}={v:.4f}" for k, v in sorted(s["champion_metrics"].items())))
    colour = "green" if s["gate"] == "passed" else "yellow"
    table.add_row("gate", f"[{colour}]{s['gate']}[/]: {s['reason']}")
    if s.get("model_version"):
        table.add_row("model", f"{settings.mlflow.model_name} v{s['model_version']} aliases {', '.join(s.get('aliases', []))}")
    table.add_row("MLflow run", s["mlflow_run_id"])
    table.add_row("tracking", settings.tracking_uri)
    console.print(table)


# --- data ---------------------------------------------------------------------------------
@data_app.command("generate")
def data_generate(
    output: Annotated[Path, typer.Argument(help="Parquet file to write.")],
    kind: Annotated[str, typer.Option(help="classification or regression")] = "classification",
    rows: Annotated[int, typer.Option(min=100)] = 20_000,
    days: Annotated[float, typer.Option(min=1)] = 60.0,
    drift_at: Annotated[Optional[float], typer.Option(min=0.0, max=1.0, help="Fraction of the span where drift starts.")] = 0.5,
    seed: int = 7,
    scenario: Annotated[str, typer.Option(help="mixed (inputs and relation move), concept (only the relation "
                                                "between features and label), covariate (only the inputs)")] = "mixed",
) -> None:
    """Write a timestamped scenario (with drift) as parquet."""
    from driftloop.app.scenario import SCENARIOS, write_scenario

    if kind not in ("classification", "regression"):
        raise DriftloopError(f"unknown scenario kind {kind!r} (classification or regression)")
    if scenario not in SCENARIOS:
        raise DriftloopError(f"unknown scenario {scenario!r} (one of {', '.join(SCENARIOS)})")
    path = write_scenario(output, kind, rows, days=days, drift_at=drift_at, seed=seed, drift=SCENARIOS[scenario])
    console.print(f"wrote {rows} rows ({kind}) -> {path}")


# --- config -------------------------------------------------------------------------------
@config_app.command("show")
def config_show(config: ConfigOpt = None, params: ParamOpt = None, model: ModelOpt = None) -> None:
    """Print the validated configuration as YAML (secrets are never part of it); of a fleet file, every
    model's merged configuration under its name (``--model``: that one's alone)."""
    import yaml

    from driftloop.app.fleet_cli import fleet_from

    fleet = fleet_from(config, params)
    if fleet.single or model is not None:
        doc = fleet.model(model).settings if model is not None else fleet.models[0].settings
        doc = doc.model_dump(mode="json")
    else:
        doc = {m.name: m.settings.model_dump(mode="json") for m in fleet.models}
    # plain text: rich would fold a long path or URI, and the YAML would no longer parse
    typer.echo(yaml.safe_dump(doc, sort_keys=False), nl=False)



def _register_plugins() -> None:
    """Attach the command groups of the serving and monitoring packages."""
    import importlib

    for module in ("driftloop.app.serving_cli", "driftloop.app.monitor_cli", "driftloop.app.schedule_cli", "driftloop.app.loop_cli", "driftloop.app.infra_cli", "driftloop.app.tenant_cli", "driftloop.app.agent_cli", "driftloop.app.history_cli", "driftloop.app.status_cli"):
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name == module:
                continue
            raise
        mod.register(app)


_register_plugins()


def main() -> None:
    try:
        app()
    except DriftloopError as exc:
        err_console.print(f"[red]error:[/] {escape(str(exc))}")
        sys.exit(2)


if __name__ == "__main__":
    main()
