"""driftloop: the closed loop train → serve → monitor → retrain on Kubeflow, KServe, MLflow and Evidently.

The public surface is small: the configuration (:func:`load_settings`), the error
hierarchy, the MLflow adapter (:class:`Registry`) and the pipeline runner adapter
(:func:`runner_for`). Everything else is reached through the ``driftloop`` CLI.
"""

from driftloop.config import Settings, load_settings
from driftloop.errors import DriftloopError

__version__ = "0.1.0"
__all__ = ["Settings", "load_settings", "DriftloopError", "__version__"]
