"""A history record as an Evidently snapshot, and the model's dashboard over them.

A record is a plain dict that says what one check (or one event of the loop) found — see
:mod:`driftloop.core.history` for its keys. Here it becomes a snapshot Evidently's UI can plot:

* a drift check (the monitor's, kind ``drift``) holds Evidently's own metric types with the
  values the check computed: ``DriftedColumnsCount`` (count and share of drifted columns) and one
  ``ValueDrift`` per column (its method's score, with ``column``, ``method`` and ``threshold`` as
  labels) — the series a ``DataDriftPreset`` report has, so Evidently's panels read both;
* a quality check (kind ``quality``) holds, per metric, the live value, the holdout value and
  the limit of its rule (label ``value_type``: ``live`` / ``holdout`` / ``limit``, and
  ``version``), under Evidently's type for that metric (``Accuracy``, ``F1Score``, ``RocAuc``,
  ``RMSE``, ``MAE``, ``R2Score``, ``MeanError``) or ``DriftloopECE`` where Evidently has none;
* alerts, retraining runs and rollout outcomes are ``DriftloopEvent`` values (label ``event``)
  on the snapshot that carries them, and tags of it.

Each snapshot also carries a few widgets (the numbers as a table), so opening it in the UI's
Reports tab shows what was found. Nothing here computes a statistic: building a snapshot costs
microseconds, however large the window was.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from typing import Any

__all__ = ["EVENT_TYPE", "KIND_TAGS", "LIST_KEYS", "QUALITY_TYPES", "dashboard_panels", "record_metadata",
           "record_snapshot", "record_tags"]

PREFIX = "evidently:metric_v2:"
EVENT_TYPE = "DriftloopEvent"
#: driftloop's quality metric -> the Evidently metric type it is stored under
QUALITY_TYPES = {"accuracy": "Accuracy", "f1": "F1Score", "roc_auc": "RocAuc", "ece": "DriftloopECE",
                 "rmse": "RMSE", "mae": "MAE", "r2": "R2Score", "mean_error": "MeanError"}
#: record kind -> the tag its snapshots carry (panels select on it)
KIND_TAGS = {"drift": "drift-check", "quality": "quality-check", "batch": "batch-check", "rollout": "rollout"}
#: keys whose value is a list (in metadata: joined by ", ")
LIST_KEYS = ("drifted_columns", "degraded", "events")
#: keys of a record that go into a snapshot's metadata as they are (strings, lists of strings)
_META_KEYS = ("kind", "model", "version", "time", "window", "window_start", "window_end", "rows", "verdict",
              "share", "drift_share", "drifted_columns", "degraded", "alert", "decision", "reason", "run",
              "outcome", "input", "request", "events", "report")


def _config(metric_type: str, **params: Any) -> Any:
    from evidently.core.metric_types import MetricConfig

    params = {"type": PREFIX + metric_type, **params}
    digest = hashlib.sha256(json.dumps(params, sort_keys=True, default=str).encode()).hexdigest()[:32]
    return MetricConfig(metric_id=digest, params=params)


def _value(config: Any, value: float, name: str, **location: Any) -> Any:
    from evidently.core.metric_types import MetricValueLocation, SingleValue

    result = SingleValue(value=float(value), display_name=name)
    result.metric_value_location = MetricValueLocation(config, location)
    return result


def _drift_results(record: dict[str, Any]) -> dict[str, Any]:
    from evidently.core.metric_types import CountValue, SingleValue

    columns = record.get("columns") or []
    results: dict[str, Any] = {}
    count = _config("DriftedColumnsCount", drift_share=record.get("drift_share"))
    drifted = sum(1 for c in columns if c.get("drifted"))
    counted = CountValue(display_name="Count of drifted columns",
                         count=SingleValue(value=drifted, display_name="count"),
                         share=SingleValue(value=float(record.get("share", 0.0)), display_name="share"))
    counted.set_metric_location(count)
    results[count.metric_id] = counted
    for col in columns:
        config = _config("ValueDrift", column=col["column"], method=col["method"], threshold=col["threshold"])
        results[config.metric_id] = _value(config, col["score"], f"Value drift for {col['column']}")
    return results


def _quality_results(record: dict[str, Any]) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for m in record.get("metrics") or []:
        kind = QUALITY_TYPES.get(m["metric"], "Driftloop" + m["metric"].title().replace("_", ""))
        config = _config(kind, version=str(record.get("version")))
        for value_type in ("live", "holdout", "limit"):
            value = m.get(value_type)
            if value is not None:
                results[f"{config.metric_id}:{value_type}"] = _value(config, value, f"{m['metric']} ({value_type})",
                                                                     value_type=value_type)
    return results


def _event_results(record: dict[str, Any]) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for event in record.get("events") or []:
        config = _config(EVENT_TYPE, event=event)
        results[config.metric_id] = _value(config, 1.0, event)
    return results


def _num(value: Any, spec: str = ".4g") -> str:
    """A figure of a record as the dashboard shows it; a metric without a limit (or a score Evidently left out)
    shows a dash instead of failing the whole snapshot."""
    return "—" if value is None else format(float(value), spec)


def _widgets(record: dict[str, Any]) -> list[Any]:
    from evidently.legacy.renderers.html_widgets import CounterData, WidgetSize, counter, table_data, text_widget

    kind = record["kind"]
    title = f"{record['model']} v{record.get('version') or '?'}: {kind} — {record.get('verdict', '')}"
    counters = [CounterData(label="verdict", value=str(record.get("verdict", "")))]
    if record.get("rows") is not None:
        counters.append(CounterData(label="rows", value=str(record["rows"])))
    if record.get("share") is not None:
        counters.append(CounterData(label="share of drifted columns", value=f"{float(record['share']):.3g}"))
    widgets = [counter(counters=counters, title=title, size=WidgetSize.FULL)]
    if record.get("columns"):
        widgets.append(table_data(
            title="columns", column_names=["column", "method", "score", "threshold", "drifted"],
            data=[[c["column"], c["method"], _num(c.get("score")), _num(c.get("threshold"), "g"), "yes" if c["drifted"] else "no"]
                  for c in record["columns"]]))
    if record.get("metrics"):
        widgets.append(table_data(
            title="metrics against the holdout", column_names=["metric", "live", "holdout", "limit", "rule", "degraded"],
            data=[[m["metric"], _num(m.get("live")), _num(m.get("holdout")), _num(m.get("limit")), m.get("rule", ""),
                   "yes" if m.get("degraded") else "no"] for m in record["metrics"]]))
    lines = [f"{key}: {record[key]}" for key in ("window", "alert", "decision", "reason", "run", "outcome", "input",
                                                 "report") if record.get(key)]
    if lines:
        widgets.append(text_widget(title="what the loop did", text="\n".join(lines)))
    return widgets


def record_tags(record: dict[str, Any]) -> list[str]:
    """The snapshot's tags: its kind's tag, ``verdict:<verdict>`` and each event (``alert``, ``run``, …)."""
    tags = [KIND_TAGS.get(record["kind"], record["kind"])]
    if record.get("verdict"):
        tags.append(f"verdict:{record['verdict']}")
    tags += [e for e in record.get("events") or [] if e not in tags]
    return tags


def record_metadata(record: dict[str, Any]) -> dict[str, str]:
    """The record's plain fields as snapshot metadata: strings only (the UI's series carry them as such);
    a list is its items joined by ``", "`` (:data:`LIST_KEYS`)."""
    meta: dict[str, str] = {}
    for key in _META_KEYS:
        value = record.get(key)
        if value is None or value == [] or value == "":
            continue
        meta[key] = ", ".join(str(v) for v in value) if isinstance(value, (list, tuple)) else str(value)
    values = [f"{c['column']} {_num(c.get('score'))}" for c in record.get("columns") or [] if c.get("drifted")]
    values += [f"{m['metric']} {_num(m.get('live'))}" + (f" (limit {_num(m['limit'])})" if m.get("limit") is not None else "")
               for m in record.get("metrics") or []]
    if values:
        meta["values"] = ", ".join(values)  # how bad: each drifted column's score, each metric against its limit
    if record["kind"] == "quality" and (record.get("metrics") or record.get("estimated") is not None):
        # the numbers themselves, read back by HistoryWorkspace.records (driftloop status shows them)
        meta["quality"] = json.dumps({"metrics": [{k: m.get(k) for k in ("metric", "live", "holdout", "limit",
                                                                          "degraded")}
                                                  for m in record.get("metrics") or []],
                                      "estimated": record.get("estimated")}, separators=(",", ":"))
    return meta


def record_snapshot(record: dict[str, Any]) -> Any:
    """The Evidently snapshot (``SnapshotModel``) of one record."""
    from evidently.core.serialization import ReportModel, SnapshotModel

    results: dict[str, Any] = {}
    if record["kind"] in ("drift", "batch"):
        results.update(_drift_results(record))
    if record["kind"] == "quality":
        results.update(_quality_results(record))
    results.update(_event_results(record))
    when = dt.datetime.fromisoformat(record["time"]).astimezone(dt.UTC).replace(tzinfo=None)  # the UI's clock: UTC
    name = f"{record['kind']} check: {record.get('verdict', '')}" if record["kind"] != "rollout" else \
        f"rollout: {record.get('outcome', '')}"
    return SnapshotModel(report=ReportModel(items=[]), name=name, timestamp=when, metadata=record_metadata(record),
                         tags=record_tags(record), metric_results=results, top_level_metrics=list(results),
                         widgets=_widgets(record), tests_widgets=[])


# -- the dashboard ---------------------------------------------------------------------------------
def _metric(metric: str, legend: str, tag: str | None = None, **labels: str) -> Any:
    from evidently.sdk.models import PanelMetric

    return PanelMetric(legend=legend, metric=PREFIX + metric, metric_labels=labels, tags=[tag] if tag else [])


def dashboard_panels(model: str, quality_metrics: tuple[str, ...] = ()) -> list[Any]:
    """The model's panels, in order: drift over time, per-column scores, each quality metric against
    its holdout limit, the loop's events, batch drift."""
    from evidently.sdk.panels import bar_plot_panel, counter_panel, line_plot_panel, text_panel

    drift = KIND_TAGS["drift"]
    panels = [
        text_panel(title=f"{model}: drift and quality over time",
                   description="Every drift and quality check of the driftloop monitor and every batch drift check; "
                               "alerts, retraining runs and rollout outcomes as events."),
        counter_panel(title="Share of drifted columns, last window", size="half", aggregation="last",
                      values=[_metric("DriftedColumnsCount", "share", drift, value_type="share")]),
        counter_panel(title="Alerts raised", size="half", aggregation="sum",
                      values=[_metric(EVENT_TYPE, "alerts", None, event="alert")]),
        line_plot_panel(title="Share of drifted columns", size="half",
                        values=[_metric("DriftedColumnsCount", "share", drift, value_type="share")]),
        bar_plot_panel(title="Drifted columns", size="half",
                       values=[_metric("DriftedColumnsCount", "drifted columns", drift, value_type="count")]),
        line_plot_panel(title="Drift score per column (method's statistic)", size="full",
                        description="ks, chisquare, z: a p-value, drift below the threshold; wasserstein, "
                                    "jensenshannon, psi: a distance, drift above it",
                        values=[_metric("ValueDrift", "{{column}} ({{method}})", drift)]),
    ]
    quality = KIND_TAGS["quality"]
    for name in quality_metrics:
        kind = QUALITY_TYPES.get(name, name)
        panels.append(line_plot_panel(title=f"{name}: live against the holdout limit", size="half", values=[
            _metric(kind, "v{{version}} live", quality, value_type="live"),
            _metric(kind, "v{{version}} limit", quality, value_type="limit")]))
    panels += [
        bar_plot_panel(title="Alerts, retraining runs and rollouts", size="half", stacked=True,
                       values=[_metric(EVENT_TYPE, "{{event}}")]),
        line_plot_panel(title="Batch drift: share of drifted columns", size="half",
                        values=[_metric("DriftedColumnsCount", "share", KIND_TAGS["batch"], value_type="share")]),
    ]
    return panels
