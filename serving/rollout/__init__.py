"""Flagger-style canary rollouts aimed at the local gateway or an InferenceService.

The package follows Flagger's seams, each module importing only those listed before it:

* :mod:`~serving.rollout.analysis` — the checks of one interval (canary steps and the shadow
  phase) and the weight schedule;
* :mod:`~serving.rollout.state` — the persisted state (``state.json`` + ``history.jsonl``);
* :mod:`~serving.rollout.metrics` — what is read about an InferenceService (Prometheus, the monitor);
* :mod:`~serving.rollout.targets` — where the canary runs (the local gateway, an InferenceService);
* :mod:`~serving.rollout.controller` — the controller that steps, promotes and rolls back.
"""

from __future__ import annotations

from driftloop.core.statistics import psi
from serving.rollout.analysis import Check, evaluate_checks, shadow_checks, weight_schedule
from serving.rollout.controller import HISTORY_ARTIFACT, WEIGHT_TAG, RolloutController
from serving.rollout.metrics import MonitorClient, MonitorPredictions, MonitorQuality, MonitorShadow, PrometheusMetrics
from serving.rollout.state import (AWAITING_APPROVAL, PENDING, PROGRESSING, PROMOTED, ROLLED_BACK, SHADOW, RolloutState,
                                   RolloutStore)
from serving.rollout.targets import GatewayTarget, KServeTarget, RolloutTarget

__all__ = [
    "Check", "RolloutState", "RolloutStore", "RolloutTarget", "GatewayTarget", "KServeTarget", "PrometheusMetrics",
    "MonitorClient", "MonitorQuality", "MonitorShadow", "MonitorPredictions", "HISTORY_ARTIFACT", "WEIGHT_TAG",
    "RolloutController", "evaluate_checks", "psi", "shadow_checks", "weight_schedule",
    "PENDING", "SHADOW", "PROGRESSING", "AWAITING_APPROVAL", "PROMOTED", "ROLLED_BACK",
]
