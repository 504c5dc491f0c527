"""Prometheus metrics of the drift monitor, in one dedicated registry.

A dedicated ``CollectorRegistry`` (not the process-global one) lets several monitors — and the
tests — live in one process without "duplicated timeseries" errors, and keeps ``/metrics`` to
what the monitor itself measures. The sink sets the ingest metrics; the drift check and the
trigger set the drift and decision metrics; the checks' episodes set ``open_episodes``, and the
trigger's follow-up of finished runs sets ``needs_attention`` (monitoring.outcomes).

A fleet's one monitor (:mod:`monitoring.fleet_service`) keeps a registry per model, so each model's
series keep their one-model names; its ``/metrics`` is one scrape of all of them, each sample
labelled ``model="<name>"`` by :class:`ModelLabelled` (the same family of every model under one
``HELP``/``TYPE``, as Prometheus requires).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample

__all__ = ["MonitorMetrics", "ModelLabelled", "CONTENT_TYPE_LATEST"]

_PREFIX = "driftloop_monitor"


class MonitorMetrics:
    """Every metric the monitor exports, registered in ``self.registry``."""

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        r = self.registry
        # ingest (sink)
        self.events_ingested = Counter(f"{_PREFIX}_events_ingested", "Inference events stored, by CloudEvent kind",
                                       ["type"], registry=r)
        self.events_rejected = Counter(f"{_PREFIX}_events_rejected", "Events refused with a 4xx/5xx, by reason",
                                       ["reason"], registry=r)
        self.events_duplicate = Counter(f"{_PREFIX}_events_duplicate", "Re-sent events already stored (acked again)",
                                        registry=r)
        self.rows_stored = Counter(f"{_PREFIX}_rows_stored", "Paired feature rows (request + response) stored",
                                   registry=r)
        self.labels_stored = Counter(f"{_PREFIX}_labels_stored", "Ground-truth labels stored from feedback",
                                     registry=r)
        self.commit_seconds = Histogram(f"{_PREFIX}_commit_seconds", "Duration of one group commit to the store",
                                        registry=r, buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                                                             0.25, 1.0))
        self.commit_group_events = Histogram(f"{_PREFIX}_commit_group_events", "Events per group commit",
                                             registry=r, buckets=(1, 2, 5, 10, 25, 50, 100, 250, 1000, 5000))
        # drift check
        self.window_size = Gauge(f"{_PREFIX}_window_rows", "Rows in the window of the last drift check", registry=r)
        self.dataset_drift_share = Gauge(f"{_PREFIX}_dataset_drift_share", "Share of drifted columns, last check",
                                         registry=r)
        self.dataset_drift = Gauge(f"{_PREFIX}_dataset_drift", "1 if the last check found dataset drift", registry=r)
        self.feature_drift_score = Gauge(f"{_PREFIX}_feature_drift_score", "Drift statistic per column, last check",
                                         ["feature", "method"], registry=r)
        self.feature_drifted = Gauge(f"{_PREFIX}_feature_drifted", "1 if the column drifted in the last check",
                                     ["feature", "method"], registry=r)
        self.last_check_timestamp = Gauge(f"{_PREFIX}_last_check_timestamp_seconds",
                                          "Unix time of the last completed drift check", registry=r)
        self.check_seconds = Histogram(f"{_PREFIX}_check_seconds", "Duration of one drift check", registry=r)
        # quality check (labelled windows, per model version)
        self.quality_metric = Gauge(f"{_PREFIX}_quality_metric", "Metric on the last labelled window, by version",
                                    ["version", "metric"], registry=r)
        self.quality_holdout = Gauge(f"{_PREFIX}_quality_holdout", "The version's holdout metric at registration",
                                     ["version", "metric"], registry=r)
        self.quality_estimated = Gauge(f"{_PREFIX}_quality_estimated", "Metric estimated from calibrated scores (CBPE)",
                                       ["version", "metric"], registry=r)
        self.quality_labelled_rows = Gauge(f"{_PREFIX}_quality_labelled_rows", "Labelled predictions of the version",
                                           ["version"], registry=r)
        self.quality_degraded = Gauge(f"{_PREFIX}_quality_degraded", "1 if the last labelled window broke a quality "
                                      "rule", ["version"], registry=r)
        # trigger
        self.trigger_decisions = Counter(f"{_PREFIX}_trigger_decisions", "Retraining trigger decisions, by decision",
                                         ["decision"], registry=r)
        self.alerts = Counter(f"{_PREFIX}_alerts", "Alerts received or raised, by source", ["source"], registry=r)
        # episodes and what became of their runs
        self.open_episodes = Gauge(f"{_PREFIX}_open_episodes", "1 while the model's drift or quality episode is "
                                   "open (one alert stands for all its failing windows)", ["kind"], registry=r)
        self.needs_attention = Gauge(f"{_PREFIX}_needs_attention", "1 while a retrain failed to replace a degraded "
                                     "champion (rolled back, nothing registered, not rolled out, failed)", ["model"],
                                     registry=r)

    def render(self) -> tuple[bytes, str]:
        """The Prometheus text exposition of the registry and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class ModelLabelled(Collector):
    """Every model's registry as one collector: each sample gets the label ``model="<name>"`` (a series'
    own ``model`` label, e.g. ``needs_attention``'s, is the same model and is replaced by the fleet's name)."""

    def __init__(self, registries: Mapping[str, CollectorRegistry], label: str = "model") -> None:
        self.registries = registries
        self.label = label

    def collect(self) -> Iterator[Metric]:
        families: dict[str, Metric] = {}
        for model, registry in self.registries.items():
            for family in registry.collect():
                out = families.get(family.name)
                if out is None:
                    out = families[family.name] = Metric(family.name, family.documentation, family.type, family.unit)
                for s in family.samples:
                    labels = {self.label: model, **{k: v for k, v in s.labels.items() if k != self.label}}
                    out.samples.append(Sample(s.name, labels, s.value, s.timestamp, s.exemplar))
        yield from families.values()
