"""``driftloop history``: the model's timeline in the terminal — windows, verdicts, alerts, runs, rollouts.

It reads the records the monitor (and each batch drift check) stored in the Evidently workspace
(:mod:`driftloop.core.history`): the same snapshots ``evidently ui`` plots. Consecutive checks
that found the same (no alert, no event) are one row with their count, unless ``--every``.
"""

from __future__ import annotations

import datetime as dt
import json
import re
from typing import Annotated, Any

import typer

from driftloop.core.console import ConfigOpt, ParamOpt
from driftloop.core.errors import ConfigError

__all__ = ["history_cmd", "parse_since", "register", "timeline_rows"]

_DURATION = re.compile(r"^(\d+(?:\.\d+)?)([smhd])$")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_since(text: str | None, *, now: dt.datetime | None = None) -> dt.datetime | None:
    """``--since``: an ISO time (UTC unless it says otherwise) or a span back from now (``90m``, ``6h``, ``7d``)."""
    if not text:
        return None
    now = now or dt.datetime.now(dt.UTC)
    match = _DURATION.match(text.strip())
    if match:
        return now - dt.timedelta(seconds=float(match.group(1)) * _UNIT_SECONDS[match.group(2)])
    try:
        when = dt.datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError as exc:
        raise ConfigError(f"--since {text!r} is neither an ISO time (2026-12-01T10:00) nor a span (90m, 6h, 7d)") \
            from exc
    return when if when.tzinfo else when.replace(tzinfo=dt.UTC)


def _what(r: dict[str, Any]) -> str:
    """What a record found and what the loop did about it, in one line."""
    parts = []
    if r["kind"] in ("drift", "batch") and r.get("share") is not None:
        drifted = r.get("values") or ", ".join(r.get("drifted_columns") or [])
        parts.append(f"share {float(r['share']):.2f}" + (f": {drifted}" if drifted else ""))
    elif r["kind"] == "quality" and r.get("values"):
        parts.append(str(r["values"]))
    if r.get("input"):
        parts.append(f"batch {r['input']}")
    if r.get("window"):
        parts.append(f"window {r['window']}" + (f" ({r['rows']} rows)" if r.get("rows") is not None else ""))
    if r.get("alert"):
        parts.append(f"alert {r['alert']}" + (f": {r['decision']}" if r.get("decision") else "") +
                     (f", run {r['run']}" if r.get("run") else ""))
    if r["kind"] == "rollout" and r.get("reason"):
        parts.append(str(r["reason"]))
    return "; ".join(parts)


def timeline_rows(records: list[dict[str, Any]], *, every: bool = False) -> list[dict[str, Any]]:
    """The rows to print: a record each, or the quiet records (no alert, no event) of one kind and version in a
    row with one verdict as one row with ``count`` and ``until`` (the last one's time); the other kinds' records
    in between do not break the run."""
    rows: list[dict[str, Any]] = []
    runs: dict[tuple[str, Any], dict[str, Any]] = {}  # (kind, version) -> its open run of quiet records
    for r in records:
        key = (r["kind"], r.get("version"))
        quiet = not r.get("events") and not r.get("alert")
        run = runs.get(key)
        if not every and quiet and run is not None and run["verdict"] == r.get("verdict", ""):
            run.update(count=run["count"] + 1, until=r["time"], what=_what(r))  # the run's latest numbers
            continue
        row = {"time": r["time"], "until": None, "count": 1, "kind": r["kind"], "version": r.get("version"),
               "verdict": r.get("verdict", ""), "what": _what(r)}
        rows.append(row)
        if quiet:
            runs[key] = row
        else:
            runs.pop(key, None)
    return rows


def _clock(iso: str) -> str:
    return dt.datetime.fromisoformat(iso).astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M:%S")


def _print(model: str, target: str, rows: list[dict[str, Any]], n: int) -> None:
    from rich import box
    from rich.markup import escape
    from rich.table import Table

    from driftloop.core.console import console

    colours = {"drift": "red", "degraded": "red", "rolled_back": "red", "failed": "red", "promoted": "green",
               "no drift": "green", "ok": "green"}
    table = Table(title=f"history of {model}: {n} records ({target})", box=box.SIMPLE_HEAD)
    table.add_column("time (UTC)", no_wrap=True)
    table.add_column("check", no_wrap=True)
    table.add_column("version", no_wrap=True)
    table.add_column("verdict", no_wrap=True)
    table.add_column("what was found, what the loop did", overflow="fold", ratio=1, min_width=16)
    for row in rows:
        when = _clock(row["time"]) + (f"\n… {_clock(row['until'])} ×{row['count']}" if row["count"] > 1 else "")
        colour = colours.get(row["verdict"], "")
        verdict = f"[{colour}]{escape(row['verdict'])}[/]" if colour else escape(row["verdict"])
        table.add_row(when, row["kind"], f"v{row['version']}" if row["version"] else "", verdict, escape(row["what"]))
    console.print(table)


def history_cmd(
    config: ConfigOpt = None,
    params: ParamOpt = None,
    model: Annotated[str | None, typer.Option("--model", "-m", help="Model (default mlflow.model_name; of a fleet "
                                                                    "file, the fleet's model).")] = None,
    since: Annotated[str | None, typer.Option(help="From this time on: ISO (UTC) or a span back (90m, 6h, 7d).")] = None,
    every: Annotated[bool, typer.Option("--every", help="One row per check (quiet runs are not folded).")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Every record as one JSON document, for scripts.")] = False,
) -> None:
    """The model's history: every drift and quality check, batch drift, alerts, runs, versions and rollouts.

    Read from the Evidently workspace the monitor writes (``<workspace>/evidently``, or the Evidently
    UI service at ``monitor.history_url``) — ``evidently ui --workspace <workspace>/evidently`` plots it."""
    import os

    from driftloop.app.fleet_cli import model_name
    from driftloop.core.console import console, settings_from
    from driftloop.core.history import SECRET_ENV, HistoryWorkspace, history_target

    settings = settings_from(config, params, model=model_name(model, config, params))
    model = model or settings.mlflow.model_name
    start = parse_since(since)
    target = history_target(settings)
    workspace = HistoryWorkspace(target, secret=os.environ.get(SECRET_ENV))
    records = workspace.records(model, since=start) if workspace.remote or os.path.isdir(target) else []
    if as_json:
        typer.echo(json.dumps({"model": model, "workspace": target, "since": start.isoformat() if start else None,
                               "records": records}, default=str))
        return
    if not records:
        known = workspace.models() if workspace.remote or os.path.isdir(target) else []
        others = f"; models there: {', '.join(known)}" if known else ""
        console.print(f"no history of {model}" + (f" since {start.isoformat()}" if start else "") +
                      f" in {target} (the monitor records every check as it runs{others})")
        return
    _print(model, target, timeline_rows(records, every=every), len(records))


def register(app: typer.Typer) -> None:
    app.command("history")(history_cmd)
