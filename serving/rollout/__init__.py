"""Flagger-style canary rollouts aimed at the local gateway or an InferenceService.

The package follows Flagger's seams, each module importing only those listed before it:

* :mod:`~serving.rollout.paired` — the rollout's labelled requests scored by both versions and
  compared on the gate's metric (``driftloop.core.statistics.paired_comparison``);
* :mod:`~serving.rollout.analysis` — the checks of one interval (canary steps and the shadow
  phase), what an analysis comes to (pass, fail, hold, wait) and the weight schedule;
* :mod:`~serving.rollout.state` — the persisted state (``state.json`` + ``history.jsonl``);
* :mod:`~serving.rollout.metrics` — what is read about a canary (Prometheus, the monitor);
* :mod:`~serving.rollout.targets` — where the canary runs (the local gateway, an InferenceService);
* :mod:`~serving.rollout.controller` — the controller that steps, promotes and rolls back.
"""

from __future__ import annotations

from driftloop.core.statistics import psi
from serving.rollout.analysis import Check, evaluate_checks, judge, psi_guard, quality_check, shadow_checks, weight_schedule
from serving.rollout.controller import HISTORY_ARTIFACT, WEIGHT_TAG, RolloutController
from serving.rollout.metrics import (MonitorClient, MonitorLabelled, MonitorPredictions, MonitorQuality, MonitorShadow,
                                     PrometheusMetrics)
from serving.rollout.paired import Answers, Pairing, RegistryScorer, compare_versions
from serving.rollout.state import (AWAITING_APPROVAL, PENDING, PROGRESSING, PROMOTED, ROLLED_BACK, SHADOW, RolloutState,
                                   RolloutStore)
from serving.rollout.targets import GatewayTarget, KServeTarget, RolloutTarget

__all__ = [
    "Check", "RolloutState", "RolloutStore", "RolloutTarget", "GatewayTarget", "KServeTarget", "PrometheusMetrics",
    "MonitorClient", "MonitorQuality", "MonitorShadow", "MonitorPredictions", "MonitorLabelled", "HISTORY_ARTIFACT",
    "WEIGHT_TAG", "RolloutController", "evaluate_checks", "judge", "psi", "psi_guard", "quality_check", "shadow_checks",
    "weight_schedule", "Answers", "Pairing", "RegistryScorer", "compare_versions",
    "PENDING", "SHADOW", "PROGRESSING", "AWAITING_APPROVAL", "PROMOTED", "ROLLED_BACK",
]
