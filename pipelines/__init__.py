"""KFP pipeline wiring only: ``dsl.pipeline`` functions and their compile targets."""

from pipelines.scoring import scoring_pipeline
from pipelines.training import training_pipeline, pipeline_arguments, compile_pipeline

__all__ = ["training_pipeline", "scoring_pipeline", "pipeline_arguments", "compile_pipeline", "PIPELINES"]

PIPELINES = {"train": training_pipeline, "score": scoring_pipeline}
