"""driftloop: the closed loop train → serve → monitor → retrain on Kubeflow, KServe, MLflow and Evidently.

The public surface is small: the configuration (:func:`load_settings`), the error
hierarchy, the MLflow adapter (:class:`Registry`) and the pipeline runner adapter
(:func:`runner_for`). Everything else is reached through the ``driftloop`` CLI.
Names are imported lazily: each pipeline step is a fresh process, and importing
``driftloop.core.errors`` there should not pay for pydantic and the config module.
"""

from typing import Any

from driftloop.core import skops_names as _skops_names

__version__ = "0.1.0"
__all__ = ["Settings", "load_settings", "DriftloopError", "Registry", "runner_for", "__version__"]

_LAZY = {
    "Settings": "driftloop.core.config",
    "load_settings": "driftloop.core.config",
    "DriftloopError": "driftloop.core.errors",
    "Registry": "driftloop.core.registry",
    "runner_for": "pipelines.runner",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'driftloop' has no attribute {name!r}")


# Every process of the project (CLI, model servers, pipeline tasks) imports this package first: skops' import,
# when MLflow or a step asks for it, then skips its walk of all of scikit-learn (driftloop.core.skops_names).
_skops_names.install()
