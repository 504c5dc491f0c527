"""One alert per episode: what the drift and quality checks do with a complete window's verdict.

Each check reports the verdict of every complete window to :meth:`EpisodeAlerts.verdict`, which
keeps the model's episodes (:mod:`monitoring.alert_episodes`: an episode opens at the first failing
window and ends after ``resolve_after`` passing windows in a row, or when another version becomes
the champion). A failing window of an open episode is **counted on the episode's alert** — no new
alert of the same kind for the model, no second report — while that alert:

* started a run that has no outcome yet (:mod:`monitoring.outcomes`: the run, then its rollout);
* is attached to another run in flight (it is re-checked when that run has an outcome; should that
  run be over with nothing in flight any more, the window judges it again); or
* was held by a guardrail (cooldown, budget, blackout, too few rows, a start that failed): then it
  is judged again, with this window's rows — the window starts its run once the guardrails pass.

Each count is a ``counted`` line in the alert's decisions (so Alertmanager's alert for the same
drift still finds the monitor's own alert in its gauge episode) and ``GET /alerts`` shows the
episode's failing windows. A **new** alert is raised for the episode (with its own report) only
when it has none yet, when Evidently did not confirm the last one, or when the last one's run has
an outcome while the episode is still open: that retrain did not make the failures stop, so the
next attempt is an alert of its own with a run of its own (the rollback case is not held back by
``trigger.cooldown_seconds``; see :mod:`monitoring.trigger`).
"""

from __future__ import annotations

import datetime as dt
from typing import TYPE_CHECKING, Any

from monitoring.alert_episodes import EpisodeStep
from monitoring.alerts import ATTACHED, STARTED

if TYPE_CHECKING:
    from monitoring.alerts import AlertStore
    from monitoring.trigger import Trigger

__all__ = ["EpisodeAlerts"]

#: Decisions of an episode's alert after which a failing window raises a new alert instead.
_SPENT = ("not_confirmed", "report_only", "superseded", "resolved", "duplicate")


def _iso(ts: float | None) -> str | None:
    return None if ts is None else dt.datetime.fromtimestamp(ts, dt.UTC).isoformat(timespec="seconds")


class EpisodeAlerts:
    """The episodes of one kind of check (``drift``, ``quality``, ``estimate``) and their alerts."""

    def __init__(self, alerts: AlertStore, trigger: Trigger, *, kind: str, resolve_after: int,
                 metrics: Any | None = None) -> None:
        self.alerts = alerts
        self.trigger = trigger
        self.kind = kind
        self.resolve_after = resolve_after
        self.metrics = metrics

    def verdict(self, model: str, version: str, *, failed: bool, window: str, now: float) -> EpisodeStep:
        """Record one complete window's verdict for the champion ``version`` of ``model``."""
        step = self.alerts.record_verdict(model, self.kind, str(version), failed=failed, window=window, now=now,
                                          resolve_after=self.resolve_after)
        if self.metrics is not None:
            is_open = step.episode is not None and step.episode.open
            self.metrics.open_episodes.labels(kind=self.kind).set(1.0 if is_open else 0.0)
        return step

    def summary(self, step: EpisodeStep) -> dict[str, Any] | None:
        """The episode as a check's outcome shows it."""
        ep = step.episode
        if ep is None:
            return None
        return {"opened": _iso(ep.opened), "closed": _iso(ep.closed), "failing_windows": ep.failing,
                "passing_in_a_row": ep.passing, "resolve_after": self.resolve_after, "alert": ep.alert_id,
                **({"close_reason": ep.close_reason} if ep.close_reason else {})}

    def counted(self, step: EpisodeStep, *, samples: int, now: float) -> dict[str, Any] | None:
        """For a failing window: the entry of the episode's alert it was counted on (judged again when a
        guardrail held it); None when the episode needs a new alert (module doc)."""
        ep = step.episode
        rec = self.alerts.get(ep.alert_id) if ep is not None and ep.alert_id else None
        if ep is None or rec is None or not _counts(rec):
            return None
        if not step.counted:
            return {"id": rec["id"], "decision": "duplicate",
                    "reason": f"window {ep.last_window} was judged already; it counts once on alert {rec['id']}"}
        note = (f"failing window {ep.failing} of the {self.kind} episode open since {_iso(ep.opened)} "
                f"({ep.last_window})")
        self.alerts.record_decision(rec["id"], "counted", f"{note}: counted on this alert", now=now, final=False)
        entry = {"id": rec["id"], "decision": "counted", "reason": f"{note}, counted on alert {rec['id']} "
                 f"(its decision: {rec['decision']})", "episode_windows": ep.failing}
        held = rec["decision"] not in (STARTED, ATTACHED)  # by a guardrail: this window may pass it
        # attached to a run that is over without its follow-up (a monitor down past trigger.rollout_wait_seconds)
        stranded = rec["decision"] == ATTACHED and self.trigger.in_flight() is None
        if held or stranded:
            decision = self.trigger.rejudge(rec["id"], samples=samples, why=note)
            if decision is not None:
                entry.update(decision=decision.decision, reason=decision.reason, request_id=decision.request_id)
        return entry

    def bind(self, step: EpisodeStep, alert_id: str) -> None:
        """``alert_id`` is the episode's alert from now on (its failing windows are counted on it)."""
        if step.episode is None:
            return
        self.alerts.bind_alert(step.episode.seq, alert_id)
        self.alerts.update(alert_id, episode=step.episode.seq)


def _counts(rec: dict[str, Any]) -> bool:
    """Whether a failing window is counted on the alert ``rec`` rather than raising a new one."""
    decision = rec.get("decision")
    if decision in _SPENT or decision is None:
        return False
    if decision == STARTED:
        return rec.get("outcome") is None  # its run or rollout still going; after an outcome: a new attempt
    return True  # attached, or held by a guardrail
