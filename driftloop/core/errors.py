"""The error hierarchy users can act on.

Every failure a user can fix has its own class; third-party exceptions are
translated at the boundary with ``raise ... from exc`` so the CLI can print one
clear line instead of a traceback. Catch :class:`DriftloopError` to catch them all.

The whole hierarchy (classes defined beside their code are marked with the module)::

    DriftloopError
    ├── ConfigError
    ├── DataSourceError
    │   └── OutputExistsError      (components.score)
    ├── DataValidationError
    ├── TrainingError
    │   └── DeviceUnavailableError
    ├── RegistryError
    ├── PipelineRunError
    ├── ServingError
    │   └── DuplicateLabel         (serving.traffic)
    ├── RolloutAborted
    ├── MonitorError
    │   └── EventError             (monitoring.events)
    │       └── StoreUnavailable   (monitoring.store)
    ├── ScheduleError
    ├── InfraCheckError
    ├── TenantError                (driftloop.app.tenants)
    └── WorkspaceBusy
"""

from __future__ import annotations

__all__ = [
    "DriftloopError",
    "ConfigError",
    "DataSourceError",
    "DataValidationError",
    "TrainingError",
    "DeviceUnavailableError",
    "RegistryError",
    "PipelineRunError",
    "ServingError",
    "RolloutAborted",
    "MonitorError",
    "ScheduleError",
    "InfraCheckError",
    "WorkspaceBusy",
]


class DriftloopError(Exception):
    """Base class of every error driftloop raises on purpose."""


class ConfigError(DriftloopError):
    """The configuration is missing, unreadable or has a wrong key or value."""


class DataSourceError(DriftloopError):
    """The data source cannot be read: missing file, corrupt parquet, empty window."""


class DataValidationError(DriftloopError):
    """The data breaks a schema or quality rule; names the column and the rule."""

    def __init__(self, message: str, *, column: str | None = None, rule: str | None = None):
        super().__init__(message)
        self.column = column
        self.rule = rule


class TrainingError(DriftloopError):
    """The model could not be trained (e.g. a single class in the labels)."""


class DeviceUnavailableError(TrainingError):
    """A GPU was required explicitly but none is visible."""


class RegistryError(DriftloopError):
    """MLflow could not be reached, or a model, version or alias is missing."""


class PipelineRunError(DriftloopError):
    """A pipeline run failed or could not be submitted."""


class ServingError(DriftloopError):
    """A model server, gateway or InferenceService operation failed."""


class RolloutAborted(DriftloopError):
    """A canary rollout was stopped (rolled back or refused)."""


class MonitorError(DriftloopError):
    """The drift monitor could not check (e.g. no reference for the champion)."""


class ScheduleError(DriftloopError):
    """A schedule is malformed, clashes with another, or cannot be created."""


class InfraCheckError(DriftloopError):
    """The Kubernetes manifests in infra/ cannot be built or checked (e.g. no kubectl, a broken overlay)."""


class WorkspaceBusy(DriftloopError):
    """Another process is running a pipeline in the same workspace (one writer at a time)."""
