"""The one check of the Kubernetes manifests in ``infra/``, run by the tests and CI.

For the base (the platform every install shares), the one-model install's InferenceService
(``infra/model``) and every overlay it

1. builds the kustomization with a real kustomize (``kubectl kustomize``; ``$KUBECTL``
   chooses the binary), so a missing file or a patch that no longer applies fails here, and
   checks each overlay's patches against what its bases render (a patch that deletes a whole
   object fails: the kustomize of kubectl 1.20 keeps a custom resource so);
2. validates every core object against the Kubernetes JSON schemas with
   ``kubernetes-validate`` in strict mode (an unknown field fails);
3. parses the InferenceService with kserve's own model classes and fails on every field
   they would drop (an unknown or misplaced field);
4. checks the Prometheus Operator objects against the compact CRD schemas in
   :mod:`driftloop.app.infra_crds` (and an Istio VirtualService, the shadow mirror, against
   :mod:`driftloop.app.istio_crds`);
5. checks what the manifests share with the Python side: the driftloop configuration in
   the ``driftloop-config``/``driftloop-env`` ConfigMaps -- a one-model file (``config.yaml``) or a
   fleet file (``fleet.yaml``, docs/fleet.md) -- loads with :func:`driftloop.core.fleet.load_fleet`,
   every container's ``DRIFTLOOP_CONFIG`` names a file of the ConfigMap mounted there, each model's
   namespace, logger Service and path and the monitor's NetworkPolicy fit the render
   (:mod:`driftloop.app.infra_fleet`), every driftloop container runs
   :data:`driftloop.core.config.DEFAULT_IMAGE` (the image the compiled pipelines use), and no Secret
   carries values;
6. builds every tenant under ``infra/tenants/`` the same way (Kueue and Kubeflow Profile objects
   against the pinned schemas of :mod:`driftloop.app.tenant_crds`) and checks the invariants that
   keep tenants apart (:func:`driftloop.app.tenants.check_invariants`).

Each problem names the source file(s) of the object (found by kind and name under
``infra/``) and the field. ``python -m driftloop.app.infra_check [ROOT]`` exits 1 with one
line per problem; ``driftloop infra check`` does the same.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import yaml

from driftloop.core.config import DEFAULT_IMAGE, Settings
from driftloop.core.errors import ConfigError, InfraCheckError
from driftloop.core.fleet import Fleet
from driftloop.app.infra_fleet import fleet_from_text, model_problems
from driftloop.app.infra_crds import CRD_SCHEMAS
from driftloop.app.istio_crds import ISTIO_CRD_SCHEMAS
from driftloop.app.tenant_crds import TENANT_CRD_SCHEMAS
from driftloop.app.tenants import TenantError, tenant_problems

__all__ = [
    "K8S_VERSION",
    "IMAGE_REPOSITORY",
    "Problem",
    "find_kubectl",
    "kustomize_targets",
    "build",
    "load_documents",
    "source_index",
    "check_objects",
    "check_target",
    "check_tree",
    "settings_from_objects",
    "fleet_from_objects",
    "objects_by_kind",
    "main",
]

log = logging.getLogger(__name__)

# Kubernetes minor version whose schemas the core objects must satisfy.
K8S_VERSION = "1.30"
# Containers whose image starts with this run driftloop itself and must use DEFAULT_IMAGE.
IMAGE_REPOSITORY = DEFAULT_IMAGE.rsplit(":", 1)[0]
_ISVC = "serving.kserve.io/v1beta1/InferenceService"
#: The keys under which the ConfigMap driftloop-config holds the configuration: one model, or a fleet.
CONFIG_KEYS = ("config.yaml", "fleet.yaml")
_KUSTOMIZE_TIMEOUT_S = 60


@dataclass(frozen=True)
class Problem:
    """One finding: where (files and object) and what (field and rule)."""

    where: str
    message: str

    def __str__(self) -> str:
        return f"{self.where}: {self.message}"


class _Loader(yaml.SafeLoader):
    """SafeLoader that reads a bare ``=`` (kustomize prints it unquoted) as a string."""


_Loader.add_constructor("tag:yaml.org,2002:value", lambda loader, node: loader.construct_scalar(node))


def load_documents(text: str) -> list[dict[str, Any]]:
    """The non-empty mapping documents of a multi-document YAML stream."""
    return [d for d in yaml.load_all(text, Loader=_Loader) if isinstance(d, dict) and d]


def find_kubectl() -> str:
    """The kubectl binary: ``$KUBECTL`` or the one on PATH."""
    explicit = os.environ.get("KUBECTL")
    found = explicit if explicit else shutil.which("kubectl")
    if not found or not Path(found).exists():
        raise InfraCheckError("kubectl not found (install Debian's kubernetes-client or set $KUBECTL); "
                              "the infra check builds the overlays with `kubectl kustomize`")
    return found


def kustomize_targets(infra: Path) -> list[Path]:
    """The base, the one model and every overlay: folders under ``infra/`` that hold a kustomization."""
    targets = [infra / name for name in ("base", "model") if (infra / name / "kustomization.yaml").is_file()]
    overlays = infra / "overlays"
    if overlays.is_dir():
        targets += sorted(p for p in overlays.iterdir() if (p / "kustomization.yaml").is_file())
    tenants = infra / "tenants"  # `driftloop tenant add`: shared/ and one folder per tenant
    if tenants.is_dir():
        targets += sorted(p for p in tenants.iterdir() if (p / "kustomization.yaml").is_file())
    return targets


def build(target: Path, kubectl: str | None = None) -> list[dict[str, Any]]:
    """Render one kustomization with ``kubectl kustomize``; its error text names the file."""
    kubectl = kubectl or find_kubectl()
    try:
        proc = subprocess.run([kubectl, "kustomize", str(target)], capture_output=True, text=True,
                              timeout=_KUSTOMIZE_TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired as exc:
        raise InfraCheckError(f"{target}/kustomization.yaml: kustomize did not finish in {_KUSTOMIZE_TIMEOUT_S} s") from exc
    if proc.returncode != 0:
        detail = " ".join(line.strip() for line in proc.stderr.splitlines() if line.strip() and not line.startswith("# Warning"))
        raise InfraCheckError(f"{target}/kustomization.yaml: kustomize build failed: {detail or 'no message'}")
    return load_documents(proc.stdout)


def _key(obj: dict[str, Any]) -> tuple[str, str]:
    return str(obj.get("kind", "")), str((obj.get("metadata") or {}).get("name", ""))


def source_index(infra: Path) -> dict[tuple[str, str], list[str]]:
    """(kind, name) → the files under ``infra/`` that define or patch that object."""
    index: dict[tuple[str, str], list[str]] = {}
    root = infra.parent
    for path in sorted(infra.rglob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        try:
            docs = load_documents(path.read_text())
        except yaml.YAMLError:
            continue
        for doc in docs:
            index.setdefault(_key(doc), []).append(str(path.relative_to(root)))
    return index


def _where(obj: dict[str, Any], index: dict[tuple[str, str], list[str]], label: str) -> str:
    kind, name = _key(obj)
    # Generated ConfigMaps carry a hash suffix; their source is the kustomization's generator.
    files = index.get((kind, name)) or index.get((kind, name.rsplit("-", 1)[0])) or [f"{label}/kustomization.yaml"]
    namespace = (obj.get("metadata") or {}).get("namespace")
    return f"{', '.join(files)} ({kind} {namespace + '/' if namespace else ''}{name}, {label})"


def _field(path: Iterable[Any]) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(object)"


# --- core objects --------------------------------------------------------------------------
# kubernetes-validate's own validate() re-reads its 5 MB definitions file for every object
# and stops at the first error; the same schema files and registry, built once per kind,
# validate all objects in a fraction of the time and report every error.
@functools.lru_cache(maxsize=None)
def _schema_dir() -> str:
    from kubernetes_validate import utils
    from packaging.version import Version

    versions = [v for v in utils.all_versions() if Version(utils.major_minor(v)) <= Version(K8S_VERSION)]
    if not versions:
        raise InfraCheckError(f"kubernetes-validate has no schemas for Kubernetes {K8S_VERSION}")
    return f"v{versions[-1]}-local-strict"


@functools.lru_cache(maxsize=None)
def _definitions() -> Any:
    from kubernetes_validate import utils
    from referencing import Resource

    return Resource.from_contents(utils.schema_contents(f"kubernetes-json-schema/{_schema_dir()}/_definitions.json", K8S_VERSION))


@functools.lru_cache(maxsize=None)
def _core_validator(api_version: str, kind: str) -> Any | None:
    """The strict schema validator of one Kubernetes kind; None when Kubernetes has no such kind."""
    import jsonschema
    from kubernetes_validate import utils
    from referencing import Registry, Resource

    api = re.sub(r"^([^./]*)(?:\.[^/]*)?/", r"\1-", api_version)  # rbac.authorization.k8s.io/v1 -> rbac-v1
    try:
        schema = utils.schema_contents(f"kubernetes-json-schema/{_schema_dir()}/{kind.lower()}-{api}.json", K8S_VERSION)
    except FileNotFoundError:
        return None
    registry = _definitions() @ (Resource.from_contents(schema) @ Registry())
    return jsonschema.validators.Draft202012Validator(schema, registry=registry)


def _validate_core(obj: dict[str, Any]) -> list[str] | None:
    """Strict schema errors of a core object; None when Kubernetes has no schema for its kind."""
    validator = _core_validator(str(obj.get("apiVersion", "")), str(obj.get("kind", "")))
    if validator is None:
        return None
    errors = sorted(validator.iter_errors(obj), key=lambda e: [str(p) for p in e.path])
    return [f"field {_field(e.path)}: {e.message}" for e in errors]


# --- InferenceService ------------------------------------------------------------------------
# kserve's ApiClient.deserialize only looks classes up in kserve.models, so it cannot build the
# V1ObjectMeta/V1Container parts; this walk does the same over the model classes' own
# ``openapi_types``/``attribute_map`` (kserve.models, then kubernetes.client.models), and
# reports every key those classes have no attribute for instead of dropping it silently.
_PRIMITIVES: dict[str, tuple[type, ...]] = {"str": (str,), "int": (int,), "float": (int, float), "bool": (bool,)}


def _model_class(name: str) -> type:
    import kserve.models
    import kubernetes.client.models

    klass = getattr(kserve.models, name, None) or getattr(kubernetes.client.models, name, None)
    if klass is None:
        raise TypeError(f"no model class {name}")
    return klass


def _parse_model(data: Any, type_name: str, path: list[Any], problems: list[str]) -> Any:
    """Build kserve/kubernetes model objects from ``data``; unknown keys go to ``problems``."""
    if data is None:
        return None
    if type_name.startswith("list["):
        if not isinstance(data, list):
            problems.append(f"field {_field(path)}: must be a list")
            return None
        return [_parse_model(item, type_name[5:-1], path + [i], problems) for i, item in enumerate(data)]
    if type_name.startswith("dict("):
        if not isinstance(data, dict):
            problems.append(f"field {_field(path)}: must be an object")
            return None
        value_type = type_name[5:-1].split(", ", 1)[1]
        return {k: _parse_model(v, value_type, path + [k], problems) for k, v in data.items()}
    if type_name in ("object", "datetime", "date"):
        return data
    if type_name in _PRIMITIVES:
        if not isinstance(data, _PRIMITIVES[type_name]) or (type_name != "bool" and isinstance(data, bool)):
            problems.append(f"field {_field(path)}: must be {type_name}, got {type(data).__name__}")
        return data
    klass = _model_class(type_name)
    if not isinstance(data, dict):
        problems.append(f"field {_field(path)}: must be an object ({type_name})")
        return None
    by_key = {key: attr for attr, key in klass.attribute_map.items()}
    kwargs = {}
    for key, value in data.items():
        if key not in by_key:
            problems.append(f"field {_field(path + [key])}: unknown to kserve's {type_name} (it would be dropped)")
            continue
        attr = by_key[key]
        kwargs[attr] = _parse_model(value, klass.openapi_types[attr], path + [key], problems)
    try:
        return klass(**kwargs)
    except ValueError as exc:  # the classes' own required-field checks
        problems.append(f"field {_field(path)}: {exc}")
        return None


def _validate_inference_service(obj: dict[str, Any]) -> list[str]:
    """Parse into kserve's V1beta1InferenceService; report whatever it would drop or refuse."""
    problems: list[str] = []
    parsed = _parse_model(obj, "V1beta1InferenceService", [], problems)
    if parsed is not None and (parsed.spec is None or parsed.spec.predictor is None):
        problems.append("field spec.predictor: required by kserve")
    return problems


# --- Prometheus Operator custom resources --------------------------------------------------
_TYPES: dict[str, tuple[type, ...]] = {
    "object": (dict,), "array": (list,), "string": (str,), "boolean": (bool,),
    "integer": (int,), "number": (int, float), "int-or-string": (int, str),
}


def _validate_compact(value: Any, schema: dict[str, Any], path: list[Any]) -> list[str]:
    """Check ``value`` against a compact CRD schema (types, required, enums, known keys)."""
    kind = schema.get("type", "any")
    allowed = _TYPES.get(kind)
    if allowed is not None and (not isinstance(value, allowed) or (kind in ("integer", "number") and isinstance(value, bool))):
        return [f"field {_field(path)}: must be {kind}, got {type(value).__name__}"]
    if "enum" in schema and value not in schema["enum"]:
        return [f"field {_field(path)}: {value!r} is not one of {schema['enum']}"]
    out: list[str] = []
    if isinstance(value, dict):
        props = schema.get("properties")
        for name in schema.get("required", []):
            if name not in value:
                out.append(f"field {_field(path + [name])}: required by the CRD")
        if props is not None:
            for name, sub in value.items():
                if name not in props:
                    out.append(f"field {_field(path + [name])}: unknown to the CRD")
                else:
                    out += _validate_compact(sub, props[name], path + [name])
    elif isinstance(value, list) and "items" in schema:
        for i, item in enumerate(value):
            out += _validate_compact(item, schema["items"], path + [i])
    return out


def _validate_custom(obj: dict[str, Any], schema: dict[str, Any]) -> list[str]:
    body = {k: v for k, v in obj.items() if k not in ("apiVersion", "kind", "metadata")}
    return _validate_compact(body, schema, [])


# --- what manifests share with the Python side ---------------------------------------------
def objects_by_kind(objects: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [o for o in objects if o.get("kind") == kind]


def _generated(objects: list[dict[str, Any]], prefix: str) -> dict[str, Any] | None:
    for obj in objects_by_kind(objects, "ConfigMap"):
        name = obj["metadata"]["name"]
        if name == prefix or name.rsplit("-", 1)[0] == prefix:
            return obj
    return None


def _config_file(objects: list[dict[str, Any]]) -> tuple[str, str]:
    """(key, text) of the configuration file in the ConfigMap driftloop-config: ``config.yaml`` (one model)
    or ``fleet.yaml`` (a fleet)."""
    config = _generated(objects, "driftloop-config")
    data = (config or {}).get("data") or {}
    for key in CONFIG_KEYS:
        if key in data:
            return key, str(data[key])
    raise InfraCheckError(f"ConfigMap driftloop-config with key {' or '.join(CONFIG_KEYS)} is missing")


def _environ(objects: list[dict[str, Any]]) -> dict[str, str]:
    env_map = _generated(objects, "driftloop-env")
    return {k: str(v) for k, v in ((env_map or {}).get("data") or {}).items()}


def fleet_from_objects(objects: list[dict[str, Any]]) -> Fleet:
    """The fleet the driftloop pods of this build load (a one-model file: a fleet of one): file + DRIFTLOOP_* env."""
    key, text = _config_file(objects)
    return fleet_from_text(key, text, _environ(objects))


def settings_from_objects(objects: list[dict[str, Any]]) -> Settings:
    """The settings the driftloop pods of a one-model build load: config file + DRIFTLOOP_* env."""
    fleet = fleet_from_objects(objects)
    if not fleet.single:
        raise InfraCheckError(f"ConfigMap driftloop-config holds a fleet of {len(fleet.models)} models "
                              f"({', '.join(fleet.names)}): read it with fleet_from_objects")
    return fleet.models[0].settings


def _containers(obj: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    spec = obj.get("spec") or {}
    found = []
    for base, pod in (("spec.template.spec", (spec.get("template") or {}).get("spec") or {}),
                      ("spec.predictor", spec.get("predictor") or {})):
        for group in ("initContainers", "containers"):
            for i, c in enumerate(pod.get(group) or []):
                if isinstance(c, dict):
                    found.append((f"{base}.{group}[{i}]", c))
    return found


def _shared_with_python(objects: list[dict[str, Any]], where) -> list[Problem]:  # noqa: ANN001 (callable)
    problems: list[Problem] = []
    config = _generated(objects, "driftloop-config")
    if config is not None:
        try:
            key = _config_file(objects)[0]
            fleet = fleet_from_objects(objects)
        except (ConfigError, InfraCheckError) as exc:
            problems.append(Problem(where(config), f"driftloop configuration does not load: {exc}"))
        else:
            problems += [Problem(where(config), f"{key}: {m}") for m in model_problems(fleet, objects)]
        problems += _config_paths(objects, config, where)
    for obj in objects:
        for path, c in _containers(obj):
            image = str(c.get("image", ""))
            if image.startswith(IMAGE_REPOSITORY + ":") or image.startswith(IMAGE_REPOSITORY + "@"):
                if image != DEFAULT_IMAGE:
                    problems.append(Problem(where(obj), f"field {path}.image: {image} differs from "
                                                        f"driftloop.core.config.DEFAULT_IMAGE {DEFAULT_IMAGE}"))
            elif not image:
                problems.append(Problem(where(obj), f"field {path}.image: missing (a patch may have lost its target container)"))
        if obj.get("kind") == "Secret" and (obj.get("data") or obj.get("stringData")):
            problems.append(Problem(where(obj), "a Secret with values is committed; reference Secrets created with kubectl"))
    return problems


def _config_paths(objects: list[dict[str, Any]], config: dict[str, Any], where) -> list[Problem]:  # noqa: ANN001
    """Every container's ``DRIFTLOOP_CONFIG`` names a file of the driftloop-config ConfigMap mounted at its folder."""
    name, keys = config["metadata"]["name"], sorted((config.get("data") or {}))
    problems = []
    for obj in objects:
        pod = ((obj.get("spec") or {}).get("template") or {}).get("spec") or {}
        maps = {v.get("name"): (v.get("configMap") or {}).get("name") for v in pod.get("volumes") or []}
        for path, c in _containers(obj):
            value = next((e.get("value") for e in c.get("env") or [] if e.get("name") == "DRIFTLOOP_CONFIG"), None)
            if not value:
                continue
            folder, _, file = str(value).rpartition("/")
            mounted = [maps.get(m.get("name")) for m in c.get("volumeMounts") or []
                       if str(m.get("mountPath", "")).rstrip("/") == folder]
            if name in mounted and file not in keys:
                problems.append(Problem(where(obj), f"field {path}.env DRIFTLOOP_CONFIG: {value} is not a file of "
                                                    f"ConfigMap {name} mounted at {folder} (it holds {', '.join(keys)})"))
    return problems


# --- patches still match their targets ------------------------------------------------------
# kustomize v5 turns a JSON-patch "replace" of a missing path into an "add", and a strategic
# merge of a renamed container into a second container; both would pass silently. So each
# overlay's patches are checked against what its bases render. A strategic ``$patch: delete`` of
# a whole object is refused outright: the kustomize of kubectl 1.20 (v2) merges a custom
# resource's patch as a JSON merge patch, so the object stays in the render with the directive
# as a field (and kubectl would create it); an object some installs do without belongs in a
# kustomization of its own that only the others list (infra/model).
_WHOLE_DELETE = ("deletes the whole object ($patch: delete), which the kustomize of kubectl 1.20 leaves in the "
                 "render for a custom resource: put the object in a kustomization of its own that only the "
                 "installs which need it list")


def _pointer_exists(obj: Any, pointer: str) -> bool:
    node = obj
    for raw in pointer.lstrip("/").split("/") if pointer.strip("/") else []:
        part = raw.replace("~1", "/").replace("~0", "~")
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                return False
            node = node[int(part)]
        elif isinstance(node, dict) and part in node:
            node = node[part]
        else:
            return False
    return True


def _named_lists_match(patch: Any, target: Any, path: list[Any]) -> list[str]:
    """Lists of named items (containers, ports, volumes) in a strategic patch must name existing items."""
    out: list[str] = []
    if isinstance(patch, dict) and isinstance(target, dict):
        for key, value in patch.items():
            if key in target:
                out += _named_lists_match(value, target[key], path + [key])
    elif isinstance(patch, list) and isinstance(target, list):
        names = {item.get("name") for item in target if isinstance(item, dict)}
        for item in patch:
            if isinstance(item, dict) and "name" in item and names and item["name"] not in names:
                out.append(f"field {_field(path)}: no item named {item['name']!r} in the target (it has {sorted(names)})")
    return out


def _patch_operations(text: str) -> list[dict[str, Any]]:
    """The operations of a JSON-patch file (one YAML list)."""
    data = yaml.load(text, Loader=_Loader) or []
    return [op for op in data if isinstance(op, dict)] if isinstance(data, list) else []


def _check_patches(target: Path, infra: Path, kubectl: str) -> list[Problem]:
    kustomization = yaml.load((target / "kustomization.yaml").read_text(), Loader=_Loader) or {}
    json_patches = kustomization.get("patchesJson6902") or []
    strategic = kustomization.get("patchesStrategicMerge") or []
    if not json_patches and not strategic:
        return []
    base_objects: list[dict[str, Any]] = []
    for entry in (kustomization.get("bases") or []) + (kustomization.get("resources") or []):
        if (target / entry / "kustomization.yaml").is_file():
            base_objects += build(target / entry, kubectl)
    label = lambda name: str((target / name).resolve().relative_to(infra.parent.resolve()))  # noqa: E731
    problems: list[Problem] = []

    def find(kind: str, name: str, namespace: str | None) -> dict[str, Any] | None:
        for obj in base_objects:
            meta = obj.get("metadata") or {}
            if obj.get("kind") == kind and meta.get("name") == name and (namespace is None or meta.get("namespace") == namespace):
                return obj
        return None

    for entry in json_patches:
        t = entry.get("target") or {}
        obj = find(t.get("kind", ""), t.get("name", ""), t.get("namespace"))
        where = f"{label(entry.get('path', ''))} (patch of {t.get('kind')} {t.get('name')})"
        if obj is None:
            problems.append(Problem(where, "its target is in none of its bases"))
            continue
        for op in _patch_operations((target / entry["path"]).read_text()):
            path = str(op.get("path", ""))
            parent = path.rsplit("/", 1)[0]
            needed = path if op.get("op") in ("replace", "remove", "test") else parent
            if not _pointer_exists(obj, needed):
                problems.append(Problem(where, f"{op.get('op')} {path}: field {needed} no longer exists in the target"))
    for name in strategic:
        for patch in load_documents((target / name).read_text()):
            meta = patch.get("metadata") or {}
            obj = find(str(patch.get("kind")), str(meta.get("name")), meta.get("namespace"))
            where = f"{label(name)} (patch of {patch.get('kind')} {meta.get('name')})"
            if patch.get("$patch") == "delete":
                problems.append(Problem(where, _WHOLE_DELETE))
            elif obj is None:
                problems.append(Problem(where, "its target is in none of its bases"))
            else:
                problems += [Problem(where, m) for m in _named_lists_match(patch, obj, [])]
    return problems


# --- the check -----------------------------------------------------------------------------
def check_objects(objects: list[dict[str, Any]], index: dict[tuple[str, str], list[str]], label: str) -> list[Problem]:
    """All checks on the rendered objects of one kustomization."""
    problems: list[Problem] = []

    def where(obj: dict[str, Any]) -> str:
        return _where(obj, index, label)

    for obj in objects:
        kind_key = f"{obj.get('apiVersion', '')}/{obj.get('kind', '')}"
        if kind_key == _ISVC:
            messages = _validate_inference_service(obj)
        elif kind_key in CRD_SCHEMAS or kind_key in TENANT_CRD_SCHEMAS or kind_key in ISTIO_CRD_SCHEMAS:
            messages = _validate_custom(obj, CRD_SCHEMAS.get(kind_key) or TENANT_CRD_SCHEMAS.get(kind_key)
                                        or ISTIO_CRD_SCHEMAS[kind_key])
        else:
            core = _validate_core(obj)
            messages = core if core is not None else [f"no schema for {kind_key} (not a Kubernetes kind, "
                                                      "the InferenceService or a known Prometheus Operator kind)"]
        problems += [Problem(where(obj), m) for m in messages]
    problems += _shared_with_python(objects, where)
    return problems


def check_target(target: Path, infra: Path, kubectl: str | None = None,
                 index: dict[tuple[str, str], list[str]] | None = None) -> list[Problem]:
    """Build one kustomization (base or overlay), check its patches and everything it renders."""
    label = str(target.relative_to(infra.parent))
    kubectl = kubectl or find_kubectl()
    try:
        problems = _check_patches(target, infra, kubectl)
    except (InfraCheckError, OSError, yaml.YAMLError):
        problems = []  # the build below reports what is broken
    try:
        objects = build(target, kubectl)
    except InfraCheckError as exc:
        message = str(exc)
        prefix = f"{target}/kustomization.yaml: "
        return [Problem(f"{label}/kustomization.yaml", message[len(prefix):] if message.startswith(prefix) else message)] + problems
    if not objects:
        return [Problem(f"{label}/kustomization.yaml", "renders no objects")]
    return problems + check_objects(objects, index if index is not None else source_index(infra), label)


def check_tree(root: Path) -> list[Problem]:
    """Check ``root/infra``: build and validate the base and every overlay."""
    infra = Path(root) / "infra"
    targets = kustomize_targets(infra)
    if not targets:
        return [Problem(str(infra), "no kustomization found "
                                    "(expected infra/base, infra/model and infra/overlays/<env>)")]
    kubectl = find_kubectl()
    index = source_index(infra)
    problems: list[Problem] = []
    for target in targets:
        label = str(target.relative_to(infra.parent))
        # a tenant's objects share kind and name with the base's: name only the tenant's files
        own = {k: [f for f in v if f.startswith(label + "/")] or v for k, v in index.items()} \
            if target.parent.name == "tenants" else index
        found = check_target(target, infra, kubectl, own)
        log.info("%s: %s", label, "ok" if not found else f"{len(found)} problem(s)")
        problems += found
    where = str((infra / "tenants").relative_to(infra.parent))
    try:  # what keeps tenants apart and within the GPU pool, over all of them
        problems += [Problem(where, message) for message in tenant_problems(infra)]
    except TenantError as exc:
        problems.append(Problem(where, str(exc)))
    return problems


def main(argv: list[str] | None = None) -> int:
    """``python -m driftloop.app.infra_check [ROOT]``: print each problem, exit 1 if there is one."""
    args = sys.argv[1:] if argv is None else argv
    root = Path(args[0]) if args else Path.cwd()
    try:
        problems = check_tree(root)
    except InfraCheckError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for problem in problems:
        print(problem, file=sys.stderr)
    if problems:
        print(f"infra check: {len(problems)} problem(s)", file=sys.stderr)
        return 1
    print(f"infra check: {len(kustomize_targets(root / 'infra'))} kustomizations built and valid")
    return 0


if __name__ == "__main__":
    sys.exit(main())
