"""The deploy step: put a newly registered version out as a canary and hand over to the rollout.

Where it goes is the serving backend of the configuration (:func:`serving.backend.backend_for`).
Cluster home: the InferenceService gets the new version as a canary revision at the first
rollout weight (at 0 % — dark — when a shadow phase comes first, on both homes) (``KServeBackend.set_canary``). Embedded default: the canary model server starts
behind the running local gateway at the first weight; when nothing is served the canary is
recorded as pending (``driftloop serve`` starts it) — the run never fails because nothing is
being served. The first version of a model is the champion already and needs no canary. In
every case the rollout is recorded as pending for the rollout controller.

The step is given only the part of the configuration it reads (:class:`DeployConfig`: the
workspace, the registry and model name, the serving and rollout sections), not the whole document.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict

from driftloop.core.config import MlflowConfig, RolloutConfig, ServingConfig, Settings
from serving.backend import backend_for, serving_home

if TYPE_CHECKING:
    from driftloop.core.registry import Registry

__all__ = ["DeployConfig", "DeployResult", "deploy_canary", "serving_home"]

log = logging.getLogger(__name__)


class DeployConfig(BaseModel):
    """What the deploy step reads of the configuration: the document its pipeline parameter carries."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    workspace: Path  # absolute (a step's working directory need not be the caller's): serving state, rollout record
    mlflow: MlflowConfig  # the registry (and the embedded store in the workspace) and the model's name
    serving: ServingConfig  # the local model servers or the InferenceService the canary joins
    rollout: RolloutConfig  # the first weight, the shadow phase

    @classmethod
    def from_settings(cls, settings: Settings) -> DeployConfig:
        return cls(workspace=settings.workspace_dir, mlflow=settings.mlflow, serving=settings.serving,
                   rollout=settings.rollout)

    def settings(self) -> Settings:
        """As the configuration object the serving backends and the rollout record take; the sections the
        step does not read keep their defaults."""
        return Settings(workspace=self.workspace, mlflow=self.mlflow, serving=self.serving, rollout=self.rollout)


@dataclass(frozen=True)
class DeployResult:
    action: str  # none | canary | pending | skipped
    message: str
    percent: int = 0


def deploy_canary(settings: Settings, *, version: str, model_uri: str | None = None, home: str | None = None,
                  registry: Registry | None = None, backend: Any | None = None) -> DeployResult:
    """Put ``version`` of the configured model out as a canary at the first rollout weight.

    ``home`` defaults to :func:`serving_home`; ``backend`` is that home's client to drive (a
    ``LocalBackend`` or ``KServeBackend``, see :func:`serving.backend.backend_for`).
    """
    from driftloop.core.registry import CHAMPION, TAG, Registry
    from serving.rollout import RolloutController, weight_schedule

    home = home or serving_home(settings)
    name = settings.mlflow.model_name
    if home == "none":
        return DeployResult("skipped", f"deploy disabled (rollout.deploy=none); v{version} stays a challenger")
    registry = registry or Registry.from_settings(settings)
    info = registry.get_version(name, str(version))  # fails clearly for a missing version
    champion = registry.version_by_alias(name, CHAMPION)
    if champion is None or champion.version == info.version:
        return DeployResult("none", f"v{info.version} is the champion; no canary needed")
    uri = model_uri or f"models:/{name}/{info.version}"
    percent = weight_schedule(settings.rollout)[0]
    if settings.rollout.shadow_percent > 0:
        percent = 0  # dark: the shadow phase comes first, no user sees the candidate's answers before it passes
    out = backend_for(settings, home, using=backend).deploy_canary(info.version, uri, percent)
    message, action = out.message, out.action
    RolloutController.begin(settings, canary_version=info.version, primary_version=champion.version, canary_uri=uri)
    # The handover shared by both homes: a controller elsewhere (a cluster Deployment) finds it in MLflow.
    registry.tag_version(name, info.version, {TAG.ROLLOUT: "pending", TAG.ROLLOUT_REASON: message[:500]})
    log.info("%s; rollout of v%s is pending", message, info.version)
    return DeployResult(action, message, percent if action == "canary" else 0)
