"""Lineage of a model version: trigger → pipeline run → data window → metrics and gate → rollout.

Everything comes from what the loop recorded: MLflow version tags and run data
(trigger, pipeline/KFP run id, window, metrics, gate decision), the alert store (the
drift report behind a ``drift:<alert-id>`` trigger) and the rollout history — including
the shadow phase before the canary steps (:func:`shadow_phase`, also used by
``driftloop rollout status``).

Windows are the data's (its time column), printed half-open as ``[start, end)`` — the end is
exclusive, as ``data.window_end`` is: the data window the run was asked for with the first and
last row it read, and the window the alert's retraining run was given.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from typing import Any

from components.register import describe_window, half_open
from driftloop.core.config import Settings
from driftloop.core.errors import RegistryError
from driftloop.core.registry import TAG, Registry

__all__ = ["Lineage", "SHADOW_CHECKS", "build_lineage", "format_shadow_check", "render_lineage", "shadow_phase",
           "shadow_steps"]

log = logging.getLogger(__name__)


@dataclass
class Lineage:
    model: str
    version: str
    aliases: list[str]
    trigger: str
    trigger_detail: dict[str, Any] = field(default_factory=dict)
    pipeline_run_id: str = ""
    mlflow_run_id: str = ""
    data_source: str = ""
    data_window: str = ""
    train_rows: int | None = None
    test_rows: int | None = None
    device: str = ""
    metrics: dict[str, float] = field(default_factory=dict)
    champion_metrics: dict[str, float] = field(default_factory=dict)
    gate: str = ""
    gate_reason: str = ""
    rollout_outcome: str = ""
    rollout_reason: str = ""
    rollout_steps: list[dict[str, Any]] = field(default_factory=list)
    shadow: dict[str, Any] | None = None  # the shadow phase, when the rollout had one (shadow_phase)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _alert_detail(settings: Settings, alert_id: str) -> dict[str, Any]:
    """The alert behind a drift trigger, from the monitor's alert store (if this machine has it)."""
    try:
        from monitoring.alerts import lookup_alert
    except ImportError:
        return {"alert_id": alert_id}
    try:
        found = lookup_alert(settings, alert_id)
    except Exception as exc:  # the store is optional on machines that never ran the monitor
        log.debug("alert store not readable: %s", exc)
        found = None
    if not found:
        return {"alert_id": alert_id}
    details = found.get("details") or {}
    if found.get("source") == "quality":
        verdicts = [v for v in details.get("verdicts") or [] if v.get("degraded")]
        return {
            "alert_id": alert_id,
            "source": "quality",
            "degraded metrics": ", ".join(f"{v['metric']} {v['live']:.4g} vs holdout {v['holdout']:.4g} "
                                          f"(limit {v['limit']:.4g})" for v in verdicts) or None,
            "estimated": (f"accuracy {details['estimated_accuracy']:.4g} (from calibrated scores, before labels)"
                          if details.get("estimated") else None),
            "labelled rows": details.get("labelled_rows"),
            "quality report": found.get("report_uri") or found.get("report_path"),
            "decision": f"{found.get('decision')}: {found.get('reason')}" if found.get("decision") else None,
            "data window": _alert_window(found),
            "run outcome": _outcome(found),
        }
    return {
        "alert_id": alert_id,
        "source": found.get("source"),
        "drifted columns": ", ".join(details.get("drifted_columns") or []),
        "drift share": details.get("share"),
        "drift report": found.get("report_uri") or found.get("report_path"),
        "decision": f"{found.get('decision')}: {found.get('reason')}" if found.get("decision") else None,
        "data window": _alert_window(found),
        "drift windows": found.get("episode_windows"),
        "run outcome": _outcome(found),
    }


def _alert_window(alert: dict[str, Any]) -> str | None:
    """The data window of the alert's retraining run, half-open (None before a run was started)."""
    if not alert.get("started"):
        return None
    return half_open(alert.get("window_start"), alert.get("window_end"))


def _outcome(alert: dict[str, Any]) -> str | None:
    return f"{alert['outcome']}: {alert.get('outcome_reason') or ''}".rstrip(": ") if alert.get("outcome") else None


def _rollout_steps(settings: Settings, registry: Registry, model: str, version: str, run_id: str | None) -> list[dict[str, Any]]:
    """Rollout steps of this version: the history artifact on its run, else the controller's local state."""
    try:
        from serving.rollout import HISTORY_ARTIFACT, RolloutStore
    except ImportError:
        return []
    if run_id:
        try:
            data = json.loads(registry.download(run_id, HISTORY_ARTIFACT).read_text())
            return list(data.get("history", []))
        except (RegistryError, ValueError, OSError):
            pass  # no rollout finished for this version yet
    try:
        state = RolloutStore(settings.workspace_dir / "rollout", model).load()
    except Exception as exc:  # a damaged local state must not hide the rest of the lineage
        log.debug("rollout state not readable: %s", exc)
        return []
    return list(state.history) if state is not None and state.canary_version == version else []


def build_lineage(settings: Settings, ref: str) -> Lineage:
    """Lineage of ``model``, ``model@alias`` or ``model/version``."""
    registry = Registry.from_settings(settings)
    info = registry.resolve(ref if ("@" in ref or "/" in ref) else f"{ref}@champion")
    tags = info.tags
    lineage = Lineage(model=info.name, version=info.version, aliases=list(info.aliases),
                      trigger=tags.get(TAG.TRIGGER, "unknown"), pipeline_run_id=tags.get(TAG.PIPELINE_RUN, ""),
                      mlflow_run_id=info.run_id or "", data_window=tags.get(TAG.WINDOW, ""),
                      data_source=tags.get(TAG.SOURCE, ""), gate=tags.get(TAG.GATE, ""),
                      gate_reason=tags.get(TAG.GATE_REASON, ""), device=tags.get(TAG.DEVICE, ""),
                      rollout_outcome=tags.get(TAG.ROLLOUT, "pending" if "champion" not in info.aliases else ""),
                      rollout_reason=tags.get(TAG.ROLLOUT_REASON, ""))
    if lineage.trigger.startswith(("drift:", "quality:")):
        lineage.trigger_detail = _alert_detail(settings, lineage.trigger.split(":", 1)[1])
    elif lineage.trigger.startswith("schedule:"):
        lineage.trigger_detail = {"schedule": lineage.trigger.split(":", 1)[1]}
    if info.run_id:
        run = registry.run(info.run_id)
        metrics = run.data.metrics
        lineage.metrics = {k: v for k, v in metrics.items() if not k.startswith("champion_") and k != "gate_passed"}
        lineage.champion_metrics = {k[len("champion_"):]: v for k, v in metrics.items() if k.startswith("champion_")}
        params = run.data.params
        lineage.train_rows = int(params["train_rows"]) if "train_rows" in params else None
        lineage.data_window = describe_window(params.get("data_window"), lineage.data_window)
        lineage.test_rows = int(params["test_rows"]) if "test_rows" in params else None
    lineage.rollout_steps = _rollout_steps(settings, registry, info.name, info.version, info.run_id)
    lineage.shadow = shadow_phase(lineage.rollout_steps)
    return lineage


def render_lineage(lineage: Lineage):
    """A rich Tree, read top to bottom: trigger, run, data, gate, rollout."""
    from rich.tree import Tree

    from rich.markup import escape

    aliases = escape(f" [{', '.join(lineage.aliases)}]") if lineage.aliases else ""
    tree = Tree(f"[bold]{lineage.model}[/] v{lineage.version}{aliases}")
    trig = tree.add(f"trigger: [cyan]{lineage.trigger}[/]")
    for key, value in lineage.trigger_detail.items():
        if value not in (None, "", {}):
            trig.add(f"{key}: {value}")
    run = tree.add(f"pipeline run: {lineage.pipeline_run_id or '-'}")
    run.add(f"MLflow run: {lineage.mlflow_run_id or '-'}")
    if lineage.device:
        run.add(f"trained on: {lineage.device}")
    data = tree.add(f"data: {lineage.data_source or '-'}")
    data.add(f"window: {lineage.data_window or '-'}")
    if lineage.train_rows is not None:
        data.add(f"rows: {lineage.train_rows} train / {lineage.test_rows} test")
    gate = tree.add(f"gate: [{'green' if lineage.gate == 'passed' else 'yellow'}]{lineage.gate or '-'}[/]: {lineage.gate_reason}")
    if lineage.metrics:
        gate.add("metrics: " + ", ".join(f"{k}={v:.4f}" for k, v in sorted(lineage.metrics.items())))
    if lineage.champion_metrics:
        gate.add("champion then: " + ", ".join(f"{k}={v:.4f}" for k, v in sorted(lineage.champion_metrics.items())))
    colour = {"promoted": "green", "bootstrap": "green", "rolled_back": "red"}.get(lineage.rollout_outcome, "yellow")
    roll = tree.add(f"rollout: [{colour}]{lineage.rollout_outcome or '-'}[/] {lineage.rollout_reason}")
    if lineage.shadow:
        _add_shadow(roll, lineage.shadow)
    for step in lineage.rollout_steps:
        roll.add(_format_step(step))
    return tree


def _add_shadow(node: Any, shadow: dict[str, Any]) -> None:
    from rich.markup import escape

    colour = {"passed": "green", "failed": "red"}.get(shadow["verdict"], "yellow")
    pct = f" at {shadow['percent']:g}% mirrored" if shadow.get("percent") is not None else ""
    branch = node.add(f"shadow phase: [{colour}]{shadow['verdict']}[/]{pct} — {escape(shadow.get('reason') or '')}")
    for c in shadow["checks"]:
        branch.add(escape(format_shadow_check(c)))


def _format_step(step: dict[str, Any]) -> str:
    parts = [str(step.get(k)) for k in ("time", "weight", "decision") if step.get(k) is not None]
    reason = step.get("reason")
    return " | ".join(parts) + (f" — {reason}" if reason else "")


# --- the shadow phase of a rollout ------------------------------------------------------------
# the checks serving.rollout.analysis.shadow_checks records, in the order a person reads them
SHADOW_CHECKS = ("shadow_requests", "shadow_error_rate", "shadow_p99_ms", "agreement", "relative_diff",
                 "shadow_prediction_psi", "shadow_quality_delta")
_SHADOW_LABELS = {"shadow_requests": "mirrored requests", "shadow_error_rate": "errors (share)",
                  "shadow_p99_ms": "p99 ms", "agreement": "agreement with the primary",
                  "relative_diff": "relative difference", "shadow_prediction_psi": "output PSI",
                  "shadow_quality_delta": "quality vs primary on the same labelled rows"}


def _is_shadow_step(step: dict[str, Any]) -> bool:
    names = {c.get("name") for c in step.get("checks") or []}
    return (str(step.get("decision", "")).startswith("shadow_") or bool(names & set(SHADOW_CHECKS))
            or str(step.get("reason", "")).startswith("shadow "))


def shadow_steps(history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The steps of a rollout history that belong to its shadow phase (start, waits, verdict)."""
    return [step for step in history if _is_shadow_step(step)]


def shadow_phase(history: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The shadow phase of a recorded rollout, or None when it had none.

    ``verdict`` is ``passed`` (the canary steps followed), ``failed`` (rolled back before any
    user request reached the candidate), ``stopped`` (decided by hand during it) or ``running``; ``checks`` are the last judged
    interval's numbers — mirrored requests, error share, p99, agreement or relative difference,
    output PSI and quality on labelled rows — each with its limit and verdict (None = not enough data).
    """
    steps = shadow_steps(history)
    if not steps:
        return None
    decisions = [s.get("decision") for s in steps]
    if "shadow_pass" in decisions:
        verdict = "passed"
    elif "rollback" in decisions:
        verdict = "failed"
    elif any(h.get("decision") in ("promote", "rollback") for h in history):
        verdict = "stopped"  # promoted or rolled back by hand while the shadow phase ran
    else:
        verdict = "running"
    judged = [s for s in steps if s.get("checks")]
    last = judged[-1] if judged else steps[-1]
    order = {name: i for i, name in enumerate(SHADOW_CHECKS)}
    checks = sorted((c for c in last.get("checks") or [] if c.get("name") in order), key=lambda c: order[c["name"]])
    start = next((s for s in steps if s.get("decision") == "shadow_start"), steps[0])
    return {
        "verdict": verdict,
        "percent": start.get("shadow_percent"),
        "started": start.get("time"),
        "ended": steps[-1].get("time") if verdict != "running" else None,
        "intervals": sum(1 for s in steps if s.get("decision") != "shadow_start"),
        "reason": steps[-1].get("reason", ""),
        "checks": [{"name": c["name"], "value": c.get("value"), "limit": c.get("limit"), "passed": c.get("passed"),
                    "detail": c.get("detail", "")} for c in checks],
    }


def format_shadow_check(check: dict[str, Any]) -> str:
    """One judged number of the shadow phase: ``agreement with the primary: 0.96 (limit 0.9) ok``."""
    value, limit = check.get("value"), check.get("limit")
    verdict = {True: "ok", False: "fail", None: "n/a"}[check.get("passed")]
    number = f"{value:.4g}" if isinstance(value, float) else ("-" if value is None else str(value))
    bound = f" (limit {limit:.4g})" if isinstance(limit, float) else (f" (limit {limit})" if limit is not None else "")
    detail = f" — {check['detail']}" if check.get("detail") else ""
    return f"{_SHADOW_LABELS.get(check.get('name'), check.get('name'))}: {number}{bound} {verdict}{detail}"
