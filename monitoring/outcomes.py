"""What became of a retraining run: its outcome, and a degraded champion it left in place.

A started alert's run ends (``SUCCEEDED``, ``FAILED``, ``LOST``, …). When it registered a version,
the deploy step put that version out as a canary and the rollout controller ends the rollout by
tagging the version in MLflow: ``driftloop.rollout.outcome`` = ``pending`` → ``promoted`` or
``rolled_back`` (``bootstrap`` for a model's first version, which is the champion at once). The
monitor reads the outcome there. MLflow is the one record the rollout controller and the monitor
share in both homes: on a cluster they run in separate pods with separate volumes (the controller's
``<workspace>/rollout/<model>/state.json`` is not on the monitor's disk) and the controller serves
no HTTP, while the monitor already reads its champion from MLflow. Nothing of ``serving/`` is
imported; the tag is the contract.

The **outcome** is recorded on the alert (``outcome``, ``outcome_reason``):

* ``promoted`` — the canary became the champion;
* ``rolled_back`` — the canary was judged and rolled back; the champion stays;
* ``not_registered`` — the run registered no version: the gate rejected the model, or it was
  trained on the same data with the same parameters as the champion;
* ``no_rollout`` — a version was registered but no rollout started for it (``rollout.deploy:
  none``), or none ended within ``trigger.rollout_wait_seconds``;
* ``failed`` — the run did not succeed;
* ``registered`` — a version was registered and the trigger was given no registry to follow its
  rollout (an embedding without MLflow; the monitor always has one).

Until a run that succeeded has an outcome, the trigger counts it as in flight. When the outcome is
anything but ``promoted`` while the model has open episodes (:mod:`monitoring.alert_episodes`),
the champion is degraded and still serving: :meth:`RunOutcomes.attention` raises a
**needs-attention** alert (source ``needs-attention``, decision ``notify``) — one per degraded
spell, later runs that fail to replace the champion are added to it — shown by ``driftloop
alerts`` and exported as ``driftloop_monitor_needs_attention{model}`` = 1, which the
PrometheusRule ``DriftloopNeedsAttention`` sends to Alertmanager. It is resolved when none of its
episodes is open any more (they passed again, or another version became the champion).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from driftloop.core.errors import DriftloopError
from monitoring.alert_episodes import Episode, episode_dict
from monitoring.alerts import ATTENTION, Alert

if TYPE_CHECKING:
    from driftloop.core.config import Settings
    from monitoring.alerts import AlertStore

__all__ = ["FAILED", "NOT_REGISTERED", "NO_ROLLOUT", "PROMOTED", "REGISTERED", "ROLLED_BACK", "Outcome",
           "RunOutcomes", "attention_id"]

log = logging.getLogger(__name__)

PROMOTED = "promoted"
ROLLED_BACK = "rolled_back"
NOT_REGISTERED = "not_registered"
NO_ROLLOUT = "no_rollout"
FAILED = "failed"
REGISTERED = "registered"  # a version, whose rollout this trigger cannot follow (no registry)

_PHRASES = {ROLLED_BACK: "was rolled back", NOT_REGISTERED: "registered no model version",
            NO_ROLLOUT: "was not rolled out", FAILED: "failed"}


def _iso(ts: float | None) -> str | None:
    return None if ts is None else dt.datetime.fromtimestamp(ts, dt.UTC).isoformat(timespec="seconds")


def attention_id(model: str, first_episode: int) -> str:
    """One needs-attention alert per degraded spell: the model and the first of its open episodes."""
    return f"attention-{hashlib.sha256(f'{model}:{first_episode}'.encode()).hexdigest()[:16]}"


@dataclass(frozen=True)
class Outcome:
    """A run's outcome as just recorded: the alert that started it (as it was), the outcome and why."""

    alert: dict[str, Any]
    outcome: str
    reason: str


class RunOutcomes:
    """Reads the outcome of finished runs from MLflow and keeps the needs-attention alerts."""

    def __init__(self, settings: Settings, alerts: AlertStore, *, registry: Any | None, metrics: Any | None,
                 since: float) -> None:
        self.settings = settings
        self.alerts = alerts
        self.registry = registry  # None: rollouts are not followed (a run's outcome is known when it finishes)
        self.metrics = metrics
        self.model = settings.mlflow.model_name
        self.wait = settings.trigger.rollout_wait_seconds
        self.since = since - self.wait  # runs that finished before this process could have followed them are left

    # -- outcomes ----------------------------------------------------------------------------
    def pending(self) -> str | None:
        """The alert of a run that succeeded and whose rollout has no outcome yet (in flight), if any."""
        if self.registry is None:
            return None
        for rec in self.alerts.unfollowed(self.since):
            if rec.get("run_state") == "SUCCEEDED":
                return rec["id"]
        return None

    def ended(self, now: float) -> list[Outcome]:
        """Record the outcome of every finished run that has one now; returns them."""
        records = self.alerts.unfollowed(self.since)
        if not records:
            return []
        versions = self._versions() if self.registry is not None else {}
        out = []
        for rec in records:
            found = self._classify(rec, versions, now)
            if found is None:
                continue
            outcome, reason, version = found
            fields: dict[str, Any] = {"outcome": outcome, "outcome_reason": reason, "followed": now}
            if version and not rec.get("model_version"):
                fields["model_version"] = version
            self.alerts.update(rec["id"], **fields)
            log.info("the run of alert %s: %s — %s", rec["id"], outcome, reason)
            out.append(Outcome(rec, outcome, reason))
        return out

    def _versions(self) -> dict[str, Any] | None:
        """The model's versions by number, or None while MLflow cannot be read."""
        try:
            return {v.version: v for v in self.registry.list_versions(self.model)}
        except DriftloopError as exc:
            log.warning("rollout outcomes not read: %s", exc)
            return None

    def _classify(self, rec: dict[str, Any], versions: dict[str, Any] | None,
                  now: float) -> tuple[str, str, str | None] | None:
        """(outcome, reason, version) of the run of ``rec``, or None while its rollout is still going."""
        from driftloop.core.registry import TAG

        state = rec.get("run_state") or "unknown"
        if state != "SUCCEEDED":
            return FAILED, f"the run ended {state}" + (f" ({rec['reason']})" if rec.get("reason") else ""), None
        waited = now - float(rec.get("finished") or now)
        if versions is None:
            if waited < self.wait:
                return None
            return NO_ROLLOUT, f"MLflow was not readable for trigger.rollout_wait_seconds={self.wait:g}", None
        version = rec.get("model_version") or next(
            (v.version for v in versions.values() if v.tags.get(TAG.ALERT) == rec["id"]), None)
        if not version:
            return NOT_REGISTERED, rec.get("outcome_reason") or (
                "the run registered no model version (the gate rejected the model, or it equals the champion)"), None
        if self.registry is None:
            return REGISTERED, f"v{version} registered; its rollout is not followed here (no registry)", str(version)
        info = versions.get(str(version))
        tag = info.tags.get(TAG.ROLLOUT) if info is not None else None
        why = info.tags.get(TAG.ROLLOUT_REASON, "") if info is not None else ""
        if tag in (PROMOTED, "bootstrap"):
            return PROMOTED, f"v{version} is the champion" + (f": {why}" if why else ""), str(version)
        if tag == ROLLED_BACK:
            return ROLLED_BACK, f"v{version} was rolled back: {why}", str(version)
        if tag == "pending" and waited < self.wait:
            return None
        if tag == "pending":
            return NO_ROLLOUT, (f"v{version}'s rollout has no outcome after trigger.rollout_wait_seconds="
                                f"{self.wait:g}: is the rollout controller running?"), str(version)
        return NO_ROLLOUT, (f"v{version} was registered but no rollout started for it"
                            + (f" ({why})" if why else " (rollout.deploy, or its deploy step did not run)")), \
            str(version)

    # -- needs-attention ---------------------------------------------------------------------
    def attention(self, ended: Outcome, now: float) -> str | None:
        """Raise (or add to) the needs-attention alert when ``ended`` left a degraded champion in place;
        returns its id."""
        if ended.outcome in (PROMOTED, REGISTERED):
            return None
        finished = float(ended.alert.get("finished") or now)
        # the champion's episodes the run was meant to end; one that opened after the run is not its to end
        episodes = [e for e in self.alerts.open_episodes(self.model) if e.opened <= finished]
        if not episodes:
            return None
        alert_id = attention_id(self.model, episodes[0].seq)
        run = {"alert": ended.alert["id"], "outcome": ended.outcome, "reason": ended.reason,
               "model_version": ended.alert.get("model_version"), "at": _iso(now)}
        known = self.alerts.get(alert_id)
        runs = [*((known or {}).get("details") or {}).get("runs", []), run]
        details = {"model": self.model, "champion_version": episodes[0].version,
                   "episodes": [episode_dict(e) for e in episodes], "runs": runs}
        reason = self._reason(ended, episodes)
        if known is None:
            self.alerts.insert(Alert(alert_id, ATTENTION, created=now, details=details))
            if self.metrics is not None:
                self.metrics.alerts.labels(source=ATTENTION).inc()
        else:
            self.alerts.set_details(alert_id, details)
        self.alerts.record_decision(alert_id, "notify", reason, now=now)
        log.warning("needs attention (%s): %s", alert_id, reason)
        return alert_id

    def _reason(self, ended: Outcome, episodes: list[Episode]) -> str:
        spells = "; ".join(f"{e.kind} since {_iso(e.opened)}, {e.failing} failing window(s)" for e in episodes)
        then = (" The next alert of its episodes may start a run at once (trigger.cooldown_seconds does not count "
                "a rolled-back run)." if ended.outcome == ROLLED_BACK else "")
        return (f"the retraining run of alert {ended.alert['id']} {_PHRASES.get(ended.outcome, ended.outcome)} "
                f"({ended.reason}); champion v{episodes[0].version} of {self.model} is still degraded ({spells}).{then}")

    def resolve(self, now: float) -> None:
        """Resolve each needs-attention alert none of whose episodes is open any more; export the gauge."""
        open_count = 0
        for rec in self.alerts.unresolved(ATTENTION):
            seqs = [int(e["seq"]) for e in (rec.get("details") or {}).get("episodes", [])]
            episodes = self.alerts.episodes_of(seqs)
            if any(e.open for e in episodes):
                open_count += 1
                continue
            why = "; ".join(f"{e.kind} episode of v{e.version}: {e.close_reason}" for e in episodes) or "no episode"
            self.alerts.update(rec["id"], resolved=now)
            self.alerts.record_decision(rec["id"], "resolved", f"the champion is no longer degraded ({why})", now=now)
            log.info("needs-attention %s resolved: %s", rec["id"], why)
        if self.metrics is not None:
            self.metrics.needs_attention.labels(model=self.model).set(1.0 if open_count else 0.0)
