"""The monitor's columns of ``driftloop status`` read from a running monitor's API (docs/fleet.md, "The view").

Where ``monitor.url`` is set (or ``status --monitor-url``), each model's open alerts, last retrain, drift and
quality come from the fleet monitor's ``GET /models`` (:mod:`monitoring.fleet_service`), which answers them in
the shape the local read builds (:mod:`monitoring.model_summary`): on a cluster the monitor's pod holds the
alert stores and the history, a laptop does not. One call per monitor URL, bounded by the caller's timeout.
``GET /models`` is a read, open like the monitor's other reads (``GET /alerts``): no token is sent.

A monitor that cannot be reached or answers an error is named once (``monitors`` in ``--json``) and in each of
its models' rows (``monitor_error``); a model the monitor does not list, or whose monitor there is not running,
is named in its row. Neither stops the row's other parts.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

from driftloop.core.fleet import FleetModel
from monitoring.model_summary import DRIFT_FIELDS, MONITOR_FIELDS

__all__ = ["monitor_fields", "monitor_url"]

log = logging.getLogger(__name__)


def monitor_url(model: FleetModel, override: str | None = None) -> str | None:
    """Where the model's monitor is read: ``override`` (``--monitor-url``), else its ``monitor.url``."""
    url = override or model.settings.monitor.url
    return url.rstrip("/") if url else None


def _one_line(text: str) -> str:
    return " ".join(text.split())[:200]


def _read(url: str, timeout: float) -> tuple[dict[str, dict[str, Any]] | None, str | None]:
    """({name: the model's entry of GET /models}, None), or (None, why the monitor cannot be read)."""
    import httpx

    try:
        resp = httpx.get(f"{url}/models", timeout=timeout, follow_redirects=False)
    except httpx.TimeoutException:
        return None, f"no answer within {timeout:g}s"
    except httpx.HTTPError as exc:
        text = str(exc)
        return None, "connection refused" if "refused" in text.lower() else _one_line(text) or type(exc).__name__
    if resp.status_code != 200:
        try:
            detail = resp.json().get("error") or ""
        except ValueError:
            detail = resp.text
        return None, _one_line(f"HTTP {resp.status_code} {resp.reason_phrase} {detail}")
    try:
        entries = resp.json()["models"]
        return {e["name"]: e for e in entries}, None
    except (ValueError, KeyError, TypeError) as exc:
        return None, f"not a driftloop fleet monitor's GET /models answer ({type(exc).__name__})"


def _model_fields(name: str, url: str, entries: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """One model's monitor fields from its entry (``part_errors``: what the monitor could not read of it), or its
    ``monitor_error``."""
    entry = entries.get(name)
    if entry is None:
        return {"monitor_error": f"monitor {url}: no model {name!r} there (it lists: {', '.join(entries) or 'none'})"}
    if entry.get("state") == "unavailable":
        return {"monitor_error": _one_line(f"monitor {url}: model {name!r} unavailable: {entry.get('error')}")}
    fields: dict[str, Any] = {k: entry.get(k) for k in MONITOR_FIELDS if k in entry}
    if "drift" in fields and fields["drift"] is not None:  # the monitor adds what the local read has not
        fields["drift"] = {k: fields["drift"].get(k) for k in DRIFT_FIELDS}
    missing = [k for k in MONITOR_FIELDS if k not in entry]
    errors = [f"alerts: {entry['alerts_error']}"] if entry.get("alerts_error") else []
    errors += [f"history: {entry['history_error']}"] if entry.get("history_error") else []
    if missing:
        errors.append(f"monitor {url}: its GET /models lacks {', '.join(missing)} (an older monitor?)")
    if fields.get("open_alerts") is None:
        fields["open_alerts"] = 0
    fields.setdefault("open", [])
    return {**fields, "part_errors": errors}


def monitor_fields(models: Iterable[FleetModel], *, override: str | None = None, timeout: float = 3.0
                   ) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, Any]]]:
    """({model: ``monitor_url``, ``monitor_error`` (None, or why the monitor says nothing of the model),
    ``part_errors`` and the fields of :data:`MONITOR_FIELDS` it answered}, {url: {"reachable", "error"}}), for
    the models with a monitor URL."""
    groups: dict[str, list[FleetModel]] = {}
    for m in models:
        url = monitor_url(m, override)
        if url:
            groups.setdefault(url, []).append(m)
    rows: dict[str, dict[str, Any]] = {}
    monitors: dict[str, dict[str, Any]] = {}
    for url, members in groups.items():
        entries, error = _read(url, timeout)
        monitors[url] = {"reachable": error is None, "error": error}
        if error is not None:
            log.debug("monitor %s: %s", url, error)
        for m in members:
            fields = {"monitor_error": f"monitor {url} unreachable: {error}"} if entries is None else \
                _model_fields(m.name, url, entries)
            rows[m.name] = {"monitor_url": url, "monitor_error": None, "part_errors": [], **fields}
    return rows, monitors
