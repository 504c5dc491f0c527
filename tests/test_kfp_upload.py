"""What the Kubeflow Pipelines backend checks when a pipeline is uploaded and run, reproduced on every
pipeline driftloop compiles.

The backend (Go, not buildable here) reads an upload in ``backend/src/apiserver/template/
v2_template.go`` (``NewV2SpecTemplate``): each YAML document that is a pipeline spec is parsed with
``protojson.Unmarshal`` into ``PipelineSpec`` -- strict, an unknown field is refused --, its
``schemaVersion`` must be 2.1.0, its ``pipelineInfo.name`` non-empty and matching the DNS-1123-like
pattern the backend tests it against, ``root`` present; a document with a ``kubernetes`` platform
is parsed (strictly) as ``PlatformSpec``, and at run time the driver parses each executor's
Kubernetes config as kfp-kubernetes' ``KubernetesExecutorConfig``. A run request must give every
root input that has no default and is not optional, each with the value type its declared
parameter type needs (``validatePipelineJobInputs``). The same checks here use the same protobuf
messages (kfp-pipeline-spec, kfp-kubernetes) through ``google.protobuf.json_format``, which refuses
unknown fields like protojson.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from google.protobuf import json_format
from google.protobuf.struct_pb2 import Value
from kfp.kubernetes import kubernetes_executor_config_pb2 as k8s_pb
from kfp.pipeline_spec import pipeline_spec_pb2 as spec_pb

from pipelines.scoring import ScoreRequest, compile_scoring_pipeline, score_arguments
from pipelines.training import compile_pipeline, pipeline_arguments
from tests.conftest import make_settings

SCHEMA_VERSION = "2.1.0"
# v2_template.go tests the name with regexp.MatchString, which is not anchored (any substring
# matching passes); its message asks for the whole name to match, which is what driftloop holds to.
NAME = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")

CONFIGS = {
    "default": {},
    "gpu": {"model.gpu": True, "model.accelerator_limit": 1, "model.gpu_node_selector": {"pool": "gpu"},
            "kfp.queue_name": "team-a-queue"},
    "distributed": {"model.learner": "xgboost", "model.distributed.workers": 2, "model.params": {"max_depth": 3}},
}


class UploadRefused(Exception):
    """What the backend would answer with a 400 (InvalidInputError)."""


def _strict(doc: dict[str, Any], message: Any, refusal: str) -> Any:
    try:
        return json_format.ParseDict(doc, message)
    except json_format.ParseError as exc:
        raise UploadRefused(f"{refusal}: {exc}") from exc


def upload_check(text: str) -> tuple[Any, Any]:
    """``NewV2SpecTemplate``: the pipeline spec and the Kubernetes platform spec (None if there is none)."""
    spec = platform = None
    for doc in yaml.safe_load_all(text):
        if not doc:
            continue
        if "pipelineInfo" in doc or "root" in doc or "deploymentSpec" in doc:
            if spec is not None:
                raise UploadRefused("multiple pipeline specs provided")
            spec = _strict(doc, spec_pb.PipelineSpec(), "invalid v2 pipeline spec")
            if spec.schema_version != SCHEMA_VERSION:
                raise UploadRefused(f"KFP only supports schema version 2.1.0, but the pipeline spec has version "
                                    f"{spec.schema_version}")
            if not spec.pipeline_info.name:
                raise UploadRefused("invalid v2 pipeline spec: name is empty")
            if not NAME.fullmatch(spec.pipeline_info.name):
                raise UploadRefused("invalid v2 pipeline spec: name should consist of lower case alphanumeric "
                                    "characters, '-' or '.', and must start and end with an alphanumeric character")
            if not spec.HasField("root"):
                raise UploadRefused("invalid v2 pipeline spec: root component is empty")
        elif "kubernetes" in (doc.get("platforms") or {}):
            if platform is not None:
                raise UploadRefused("multiple platform specs provided")
            platform = _strict(doc, spec_pb.PlatformSpec(), "cannot unmarshal platform specific configs")
    if spec is None:
        raise UploadRefused("no pipeline spec is provided")
    return spec, platform


def executor_configs(spec: Any, platform: Any) -> dict[str, Any]:
    """Each executor's Kubernetes config, parsed strictly as the driver does (``KubernetesExecutorConfig``)."""
    if platform is None:
        return {}
    executors = platform.platforms["kubernetes"].deployment_spec.executors
    out = {}
    for name, struct in executors.items():
        assert name in spec.deployment_spec["executors"], f"platform config for unknown executor {name}"
        out[name] = json_format.ParseDict(json_format.MessageToDict(struct), k8s_pb.KubernetesExecutorConfig())
    return out


_KINDS = {spec_pb.ParameterType.NUMBER_DOUBLE: "number_value", spec_pb.ParameterType.NUMBER_INTEGER: "number_value",
          spec_pb.ParameterType.STRING: "string_value", spec_pb.ParameterType.BOOLEAN: "bool_value",
          spec_pb.ParameterType.LIST: "list_value", spec_pb.ParameterType.STRUCT: "struct_value"}


def run_inputs_check(spec: Any, arguments: dict[str, Any]) -> None:
    """``validatePipelineJobInputs``: required inputs given (or defaulted), each value of its declared type."""
    declared = spec.root.input_definitions.parameters
    for name, param in declared.items():
        if name not in arguments:
            if not param.is_optional and not param.HasField("default_value"):
                raise UploadRefused(f"parameter {name} is not optional, yet has neither default value nor user "
                                    "provided value")
            continue
        if param.parameter_type == spec_pb.ParameterType.PARAMETER_TYPE_ENUM_UNSPECIFIED:
            raise UploadRefused(f"input parameter {name} has unspecified type")
        value = json_format.ParseDict(arguments[name], Value())
        if value.WhichOneof("kind") != _KINDS[param.parameter_type]:
            raise UploadRefused(f"input parameter {name} requires {_KINDS[param.parameter_type]}, "
                                f"got {value.WhichOneof('kind')}")
    unknown = set(arguments) - set(declared)
    if unknown:
        raise UploadRefused(f"unknown input parameter(s): {', '.join(sorted(unknown))}")


def compiled(tmp_path: Path, name: str) -> tuple[Any, list[tuple[Path, dict[str, Any]]]]:
    settings = make_settings(tmp_path / name, tmp_path / "data.parquet", **{"kfp.host": "http://kfp.invalid",
                                                                            **CONFIGS[name]})
    training = compile_pipeline(settings, tmp_path / name / "training.yaml")
    scoring = compile_scoring_pipeline(settings, tmp_path / name / "scoring.yaml")
    return settings, [(training, pipeline_arguments(settings, request_id="run-1")),
                      (scoring, score_arguments(settings, ScoreRequest(request_id="run-1", started="")))]


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_every_compiled_pipeline_passes_the_backends_upload_and_run_checks(tmp_path, name):
    _, packages = compiled(tmp_path, name)
    for path, arguments in packages:
        spec, platform = upload_check(path.read_text())
        assert spec.schema_version == SCHEMA_VERSION and spec.pipeline_info.name
        configs = executor_configs(spec, platform)
        assert configs, f"{path.name}: no Kubernetes executor config (the MLflow Secret at least)"
        run_inputs_check(spec, arguments)  # what the runner submits
        run_inputs_check(spec, {})  # an upload run from the UI with every default
        if name == "gpu" and path.name == "training.yaml":
            train = [c for c in configs.values() if c.node_selector.labels]
            assert train and train[0].node_selector.labels["pool"] == "gpu" and train[0].tolerations
            assert any(c.pod_metadata.labels.get("kueue.x-k8s.io/queue-name") == "team-a-queue"
                       for c in configs.values())


def test_the_checks_refuse_what_the_backend_refuses(tmp_path):
    _, packages = compiled(tmp_path, "default")
    text = packages[0][0].read_text()
    docs = list(yaml.safe_load_all(text))

    def refused(edit, pattern: str) -> None:
        copy = yaml.safe_load(yaml.safe_dump(docs[0]))
        edit(copy)
        with pytest.raises(UploadRefused, match=pattern):
            upload_check(yaml.safe_dump_all([copy, *docs[1:]]))

    refused(lambda d: d.__setitem__("sdkVersionTypo", "x"), r"invalid v2 pipeline spec: .*sdkVersionTypo")
    refused(lambda d: d.__setitem__("schemaVersion", "2.0.0"), r"only supports schema version 2.1.0")
    refused(lambda d: d["pipelineInfo"].__setitem__("name", "Driftloop_Training"), r"name should consist of")
    refused(lambda d: d["pipelineInfo"].__setitem__("name", ""), r"name is empty")
    refused(lambda d: d.pop("root"), r"root component is empty")
    platform = yaml.safe_load(yaml.safe_dump(docs[1]))
    executor = next(iter(platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"].values()))
    executor["secretAsEnvTypo"] = []
    spec, parsed = upload_check(yaml.safe_dump_all([docs[0], platform]))
    with pytest.raises(json_format.ParseError, match="secretAsEnvTypo"):
        executor_configs(spec, parsed)
    spec, _ = upload_check(text)
    with pytest.raises(UploadRefused, match="input parameter test_size requires number_value"):
        run_inputs_check(spec, {"test_size": "0.2"})
    with pytest.raises(UploadRefused, match="unknown input parameter"):
        run_inputs_check(spec, {"no_such_input": 1})
