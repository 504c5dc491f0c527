"""One drift, one alert: Alertmanager's alert for a drift the monitor raised itself is its duplicate.

On a cluster the same drift reaches the trigger twice: as the monitor's own alert and, ``for:``
later, as Alertmanager's (the PrometheusRule ``DriftloopDatasetDrift`` fires on the monitor's
``driftloop_monitor_dataset_drift_share``). The monitor's **drift episode** here is the time from
the check whose verdict turned to drift (the check that sets ``driftloop_monitor_dataset_drift`` to
1) to the first later check that finds none, or to the start of a new monitor process (its gauges
read 0 until its first check); the drift check reports each verdict through
:meth:`GaugeEpisodes.observe_drift`, and the episodes are stored with the alerts (table
``drift_episodes``). A firing ``DriftloopDatasetDrift`` whose labels fit this monitor
(``namespace`` = the loop's ``serving.namespace``; ``model`` and ``version``, where a rule sets
them, = its model and the own alert's champion version) reports the episode that was open at its
``startsAt`` (give or take :data:`EPISODE_MARGIN_SECONDS`). When the monitor raised an alert in
that episode, the Alertmanager alert is recorded as its duplicate (``duplicate_of``; decision
``duplicate``, reason ``duplicate of <id>: …``) and starts nothing; the original is the latest of
the episode's own alerts that started a run, else its latest. Failing that, an earlier
Alertmanager alert with the same fingerprint in the same episode is the original. Anything else —
no episode at ``startsAt`` (drift seen only by Prometheus, a monitor whose store is new), no own
alert in it (Evidently did not confirm the drift), another alert name (``DriftloopBatchDrift``) —
goes through the guardrails. See docs/monitoring.md ("One drift, one alert").

These gauge episodes follow every verdict as Prometheus sees it; the episodes that decide how
many alerts the monitor itself raises are :mod:`monitoring.alert_episodes`'.
"""

from __future__ import annotations

import datetime as dt
import logging
import sqlite3
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from monitoring.alerts import STARTED, Alert

if TYPE_CHECKING:
    from driftloop.core.config import Settings
    from monitoring.alerts import AlertStore

__all__ = ["DRIFT_ALERTNAMES", "EPISODE_MARGIN_SECONDS", "GaugeEpisodes"]

log = logging.getLogger(__name__)

#: Alertmanager alerts that report the monitor's own drift gauge (infra/base/monitoring/prometheus-rule.yaml
#: and each tenant's rule); only these can be duplicates of the monitor's drift alerts.
DRIFT_ALERTNAMES = frozenset({"DriftloopDatasetDrift"})

#: How far a ``startsAt`` may lie outside a drift episode and still report it: Prometheus sees the
#: gauge a scrape and an evaluation interval late, keeps a series that is no longer scraped for its
#: 5-minute lookback, and its clock is not the monitor's.
EPISODE_MARGIN_SECONDS = 300.0


def _iso(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, (int, float)):
        return dt.datetime.fromtimestamp(value, dt.UTC).isoformat()
    return str(value)


class GaugeEpisodes:
    """The drift gauge's episodes and the Alertmanager alerts that duplicate the monitor's own."""

    def __init__(self, settings: Settings, alerts: AlertStore, clock: Callable[[], float] = time.time) -> None:
        self.settings = settings
        self.alerts = alerts
        self.clock = clock
        self.born = clock()  # this process's drift gauge reads 0 from here until its first check
        self._observed: set[str] = set()

    def observe_drift(self, model: str, drift: bool) -> None:
        """The drift check's verdict, as just exported on ``driftloop_monitor_dataset_drift``.

        Opens ``model``'s drift episode on drift, closes it on no drift; the first call of a new
        monitor process closes an episode an earlier one left open (at this process's start). A
        store that cannot be written costs only the de-duplication of Alertmanager alerts.
        """
        restarted = None if model in self._observed else self.born
        try:
            self.alerts.observe_drift(model, drift, now=self.clock(), restarted_at=restarted)
        except sqlite3.Error as exc:
            log.warning("drift episode of %s not recorded: %s", model, exc)
            return
        self._observed.add(model)

    def duplicate_of(self, alert: Alert, now: float) -> tuple[str, str] | None:
        """(id of the alert that ``alert`` duplicates, how it was recognised), or None (module doc)."""
        if alert.source != "alertmanager":
            return None
        details = alert.details or {}
        labels = details.get("labels") if isinstance(details.get("labels"), dict) else {}
        name = labels.get("alertname")
        if not isinstance(name, str) or name not in DRIFT_ALERTNAMES or alert.window_end is None:
            return None
        s = self.settings
        if "namespace" in labels and str(labels["namespace"]) != s.serving.namespace:
            return None
        if "model" in labels and str(labels["model"]) not in (s.mlflow.model_name, s.serving.name):
            return None
        model = s.mlflow.model_name
        try:
            starts = dt.datetime.fromisoformat(alert.window_end).timestamp()
            return self._original(alert, model, labels, starts, now)
        except Exception as exc:  # noqa: BLE001 - the alert is stored already; the guardrails still judge it
            log.warning("alert %s not checked for duplicates: %s", alert.id, exc)
            return None

    def _original(self, alert: Alert, model: str, labels: dict[str, Any], starts: float,
                  now: float) -> tuple[str, str] | None:
        margin = EPISODE_MARGIN_SECONDS
        episodes = self.alerts.drift_episodes(model, since=starts - margin, until=starts + margin)
        if not episodes:
            return None
        # the episode open at startsAt, else the latest one within the margin of it
        holding = [e for e in episodes if e["opened"] <= starts and (e["closed"] is None or e["closed"] >= starts)]
        episode = (holding or episodes)[-1]
        since = _iso(episode["opened"])
        end = now if episode["closed"] is None else episode["closed"]
        own = self.alerts.raised_between(episode["opened"], end)
        if "version" in labels:
            own = [a for a in own if str((a.get("details") or {}).get("champion_version")) == str(labels["version"])]
        if own:
            started = [a for a in own if a.get("decision") == STARTED]
            original = (started or own)[-1]
            return original["id"], (f"the monitor raised this drift of {model} itself (its alert's decision: "
                                    f"{original['decision']}); drift episode since {since}, Alertmanager's "
                                    f"startsAt {alert.window_end}")
        fingerprint = (alert.details or {}).get("fingerprint")
        for earlier in self.alerts.alertmanager_by_fingerprint(str(fingerprint)):
            starts_at = (earlier.get("details") or {}).get("startsAt")  # its window is the run's once it started one
            if earlier["id"] == alert.id or not starts_at:
                continue
            at = dt.datetime.fromisoformat(str(starts_at).replace("Z", "+00:00")).timestamp()
            if episode["opened"] - margin <= at <= end + margin:
                return earlier.get("duplicate_of") or earlier["id"], (
                    f"Alertmanager alert {fingerprint} again, with startsAt {alert.window_end}, in the same drift "
                    f"episode of {model} (since {since})")
        return None
