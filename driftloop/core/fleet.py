"""A fleet: many models in one validated file (docs/fleet.md).

A fleet file is YAML with four top-level keys::

    workspace: .driftloop/fleet        # the fleet's root; model NAME lives in <workspace>/models/NAME
    fleet:                             # limits across the models
      max_concurrent_runs: 2
      daily_runs: 12
      gpus: 1
    defaults:                          # any Settings sections, shared by every model
      data: {time_column: event_time}
    models:                            # name -> that model's own sections (merged over defaults) + team
      churn:
        team: growth
        data: {source: data/churn.parquet}

Each model's merged configuration is validated by :class:`~driftloop.core.config.Settings`, exactly as
a one-model file is; unless its own section says otherwise a model gets its own workspace
(``<workspace>/models/<name>``), its name as MLflow model name and serving name, its path on the
fleet's one monitor (``monitor.base_path`` ``/models/<name>``) and, on a cluster, its team's namespace and
its inference logger to that path (``serving.logger_url``: the defaults' origin + ``/models/<name>/events``);
the models share one gateway and one monitor, so their ports are set under ``defaults`` only. Each model's settings carry the fleet they
belong to (``Settings.fleet``: root, name, team, every model's name, the limits). A file without ``models:`` (every
one-model configuration) loads as a fleet of one whose settings are :func:`load_settings`'s.

Every problem is one :class:`~driftloop.core.errors.ConfigError` line at load time naming the key
path: a model named twice, a model section that fails validation (``models.<name>.<section>.<key>``),
two models on one route (serving name, MLflow model name, workspace, monitor path or model-server port), a model
setting the shared gateway or monitor port of its own, a fleet whose serving and largest train step
are over its GPU budget, an unknown top-level key. The runs' limits (``fleet.max_concurrent_runs``,
``fleet.daily_runs``, ``fleet.gpus``) are kept at run time by the models' triggers (monitoring.fleet_runs).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml
from pydantic import Field, ValidationError

from driftloop.core.config import (
    FleetLimits,
    FleetMembership,
    ServingConfig,
    Settings,
    apply_overrides,
    dns_label,
    env_overrides,
    load_settings,
    merge_trees,
    read_yaml,
    split_override,
)
from driftloop.core.errors import ConfigError
from driftloop.core.workspace import check_workspace_path

__all__ = ["Fleet", "FleetLimits", "FleetModel", "load_fleet", "model_gpus", "serving_gpus", "train_gpus",
           "FLEET_KEYS", "MODELS_DIR"]

#: The top-level keys of a fleet file.
FLEET_KEYS = ("defaults", "fleet", "models", "workspace")
#: Folder of the fleet's workspace that holds one workspace per model.
MODELS_DIR = "models"
# override keys that address the fleet file itself; any other ``--param`` applies to every model
_FLEET_OVERRIDES = ("defaults", "fleet", "models", "workspace")
# ports a model holds on this machine, and which of them the fleet gives out when a model sets none
_PORTS = (("serving", "primary_port"), ("serving", "canary_port"))
# ports of the fleet's one gateway and one monitor (every model has the same: set under defaults)
_SHARED = (("serving", "gateway_port"), ("monitor", "port"))


@dataclass(frozen=True)
class FleetModel:
    """One model of the fleet: its name, owner team and validated settings."""

    name: str
    settings: Settings
    team: str | None = None


@dataclass(frozen=True)
class Fleet:
    """The models of one configuration, in file order; ``single``: a one-model file (no ``models:``)."""

    models: tuple[FleetModel, ...]
    limits: FleetLimits
    source: Path | None = None
    single: bool = True
    workspace: Path | None = None  # the fleet's root (a fleet file's ``workspace``); None for a one-model file

    @property
    def names(self) -> list[str]:
        return [m.name for m in self.models]

    def model(self, name: str) -> FleetModel:
        """The model called ``name``; an unknown name is a ConfigError listing the names."""
        for m in self.models:
            if m.name == name:
                return m
        raise ConfigError(f"--model {name!r}: no such model in {self.source or 'the configuration'} "
                          f"(models: {', '.join(self.names)})")

    def select(self, name: str | None) -> list[FleetModel]:
        """Every model, or the one called ``name``."""
        return list(self.models) if name is None else [self.model(name)]


def train_gpus(settings: Settings) -> int:
    """GPUs one model's train step holds while it runs (every worker of a distributed one)."""
    m = settings.model
    if m.distributed.workers > 1:
        return m.distributed.workers * m.distributed.gpus_per_worker
    return m.accelerator_limit if m.gpu else 0


def serving_gpus(settings: Settings) -> int:
    """GPUs one model's serving may hold: its replicas at ``serving.max_replicas``."""
    return settings.serving.gpu * settings.serving.max_replicas


def model_gpus(settings: Settings) -> int:
    """GPUs one model may hold at once: its train step (every worker of a distributed one) and its
    serving replicas at ``serving.max_replicas``."""
    return train_gpus(settings) + serving_gpus(settings)


def load_fleet(path: str | Path | None = None, overrides: list[str] | None = None,
               environ: dict[str, str] | None = None) -> Fleet:
    """Load ``path`` (or ``$DRIFTLOOP_CONFIG``) as a fleet; a file without ``models:`` is a fleet of one.

    ``overrides`` (``--param key=value``) whose first key is one of the fleet file's top-level keys
    change the file (``models.churn.gate.margin=0.1``); any other applies to every model, over its
    own sections, as environment variables (``DRIFTLOOP_*``) do.
    """
    environ = dict(os.environ if environ is None else environ)
    path = path or environ.get("DRIFTLOOP_CONFIG")
    raw = _read_file(Path(path)) if path else {}
    if "models" not in raw:
        stray = [k for k in ("defaults", "fleet") if k in raw]
        if stray:
            raise ConfigError(f"{stray[0]}: a fleet file needs a models: section ({path})")
        settings = load_settings(path, overrides, environ)
        return Fleet((FleetModel(settings.mlflow.model_name, settings),), FleetLimits(),
                     Path(path) if path else None, single=True)
    return _build(Path(str(path)), raw, list(overrides or []), environ)


def _read_file(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    _refuse_repeated_models(path)
    loaded = read_yaml(path) or {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level")
    return loaded


def _refuse_repeated_models(path: Path) -> None:
    """A model named twice under ``models:``, named as such (the YAML loader's own message names only the key)."""
    try:
        root = yaml.compose(path.read_text(encoding="utf-8"), Loader=yaml.SafeLoader)
    except (yaml.YAMLError, UnicodeDecodeError):
        return  # the full load says what is wrong with the text
    if not isinstance(root, yaml.MappingNode):
        return
    for key, value in root.value:
        if key.value != "models" or not isinstance(value, yaml.MappingNode):
            continue
        seen: dict[str, int] = {}
        for name, _ in value.value:
            line = name.start_mark.line + 1
            if name.value in seen:
                raise ConfigError(f"models.{name.value}: model {name.value!r} is declared twice (lines "
                                  f"{seen[name.value]} and {line} of {path}); model names must be unique")
            seen[name.value] = line


def _split_overrides(overrides: list[str]) -> tuple[list[str], dict[str, Any]]:
    """(overrides of the fleet file, overrides of every model as a tree)."""
    of_file: list[str] = []
    of_models: dict[str, Any] = {}
    for item in overrides:
        key, value = split_override(item)
        if key.split(".", 1)[0] in _FLEET_OVERRIDES:
            of_file.append(item)
        else:
            of_models = apply_overrides(of_models, [item])
    return of_file, of_models


def _build(path: Path, raw: dict[str, Any], overrides: list[str], environ: dict[str, str]) -> Fleet:
    of_file, of_models = _split_overrides(overrides)
    env = env_overrides(environ)
    if "workspace" in env:
        of_file.append(f"workspace={env.pop('workspace')}")
    raw = apply_overrides(raw, of_file) if of_file else raw
    unknown = [k for k in raw if k not in FLEET_KEYS]
    if unknown:
        hint = " (shared sections go under defaults:)" if unknown[0] in Settings.model_fields else ""
        raise ConfigError(f"{unknown[0]}: unknown top-level key in fleet file {path}{hint}; a fleet file takes "
                          f"{', '.join(FLEET_KEYS)}")
    base = path.resolve().parent
    root = _resolve(base, str(raw.get("workspace") or ".driftloop"))
    limits = _limits(raw.get("fleet"))
    defaults = _section_map(raw.get("defaults"), "defaults")
    if "workspace" in defaults:
        raise ConfigError(f"defaults.workspace: set workspace at the top level; model NAME's workspace is "
                          f"<workspace>/{MODELS_DIR}/NAME")
    models_raw = _section_map(raw.get("models"), "models")
    if not models_raw:
        raise ConfigError(f"models: the fleet in {path} declares no model")
    trees = {name: _model_tree(name, own, defaults, env, of_models, root, base)
             for name, own in models_raw.items()}
    _shared_ports(models_raw)
    names = tuple(trees)
    models = tuple(_validate(name, tree, path) for name, tree in trees.items())
    serving = sum(serving_gpus(m.settings) for m in models)
    models = tuple(FleetModel(m.name, m.settings.model_copy(update={"fleet": FleetMembership(
        root=Path(root), name=m.name, team=m.team, models=names, limits=limits, serving_gpus=serving)}), m.team)
        for m in models)
    _check_routes(models)
    _check_budgets(models, limits)
    return Fleet(models, limits, path, single=False, workspace=Path(root))


def _resolve(base: Path, value: str) -> str:
    """A path of the file, relative to the file's folder (URIs and absolute paths as written)."""
    if "://" in value or Path(value).expanduser().is_absolute():
        return value
    return str((base / value).resolve())


def _limits(value: Any) -> FleetLimits:
    try:
        return FleetLimits.model_validate(_section_map(value, "fleet"))
    except ValidationError as exc:
        raise ConfigError(_one_line(exc, "fleet.")) from exc


def _section_map(value: Any, key: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__}")
    return value


def _model_tree(name: Any, own: Any, defaults: dict[str, Any], env: dict[str, Any], of_models: dict[str, Any],
                root: str, base: Path) -> dict[str, Any]:
    """The model's configuration tree: its defaults, the fleet's defaults, its own sections, environment, --param."""
    try:
        dns_label(str(name))
    except ValueError as exc:
        raise ConfigError(f"models.{name}: {exc}") from exc
    own = dict(_section_map(own, f"models.{name}"))
    team = own.pop("team", None)
    if team is not None and not (isinstance(team, str) and _is_label(team)):
        raise ConfigError(f"models.{name}.team: {team!r} is not a team name (a DNS-1123 label: lower-case "
                          "letters, digits and '-', e.g. growth)")
    serving: dict[str, Any] = {"name": name}
    if team is not None:
        serving["namespace"] = team  # a team's models live in its namespace (unless defaults or the model say)
    tree = {"workspace": str(Path(root) / MODELS_DIR / name), "mlflow": {"model_name": name},
            "serving": serving, "monitor": {"base_path": f"/{MODELS_DIR}/{name}"}}
    tree = merge_trees(tree, defaults)
    if isinstance(tree.get("serving"), dict):  # anything else is refused by validation, naming the key
        tree["serving"] = {**tree["serving"], "logger_url": _logger_url(tree["serving"].get("logger_url"), name)}
    tree = merge_trees(merge_trees(merge_trees(tree, own), env), of_models)
    if "workspace" in own:
        tree["workspace"] = _resolve(base, str(own["workspace"]))
    source = tree.get("data", {}).get("source") if isinstance(tree.get("data"), dict) else None
    if isinstance(source, str) and source:
        tree["data"] = {**tree["data"], "source": _resolve(base, source)}
    tree["team"] = team
    return tree


def _logger_url(shared: Any, name: str) -> Any:
    """The model's path on the fleet's one monitor: the origin of the defaults' ``serving.logger_url`` (or of
    the one-model default) + ``/models/<name>/events``; a value that is no URL is left for validation."""
    url = urlsplit(str(shared if shared is not None else ServingConfig.model_fields["logger_url"].default))
    if not (url.scheme and url.netloc):
        return shared
    return f"{url.scheme}://{url.netloc}/{MODELS_DIR}/{name}/events"


def _is_label(value: str) -> bool:
    try:
        dns_label(value)
    except ValueError:
        return False
    return True


def _shared_ports(models_raw: dict[str, Any]) -> None:
    """The fleet's models share one gateway and one monitor: their ports are set under ``defaults`` only."""
    for name, own in models_raw.items():
        for section, key in _SHARED:
            sub = own.get(section) if isinstance(own, dict) else None
            if isinstance(sub, dict) and key in sub:
                what = "gateway" if section == "serving" else "monitor"
                raise ConfigError(f"models.{name}.{section}.{key}: the fleet's models share one {what}; set "
                                  f"{section}.{key} under defaults")


def _validate(name: str, tree: dict[str, Any], path: Path) -> FleetModel:
    team = tree.pop("team")
    try:
        settings = Settings.model_validate(tree)
    except ValidationError as exc:
        raise ConfigError(_one_line(exc, f"models.{name}.") + f" ({path})") from exc
    try:
        check_workspace_path(settings.workspace_dir)
    except ConfigError as exc:
        raise ConfigError(f"models.{name}.{exc}") from exc
    return FleetModel(name, settings, team)


def _one_line(exc: ValidationError, prefix: str) -> str:
    """Every problem pydantic found, each with its key path under ``prefix``, on one line."""
    out = []
    for err in exc.errors():
        key = f"{prefix}{'.'.join(str(p) for p in err['loc'])}".rstrip(".")
        msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"].removeprefix("Value error, ")
        out.append(f"{key}: {msg}")
    return "; ".join(out)


def _check_routes(models: tuple[FleetModel, ...]) -> None:
    """No two models on one route: serving name, MLflow model name, workspace, monitor path or model-server port."""
    routes: dict[tuple[str, Any], str] = {}
    for m in models:
        s = m.settings
        keys = [("serving.name", s.serving.name), ("mlflow.model_name", s.mlflow.model_name),
                ("workspace", str(s.workspace_dir)), ("monitor.base_path", s.monitor.base_path)]
        keys += [(f"{sec}.{key}", getattr(getattr(s, sec), key)) for sec, key in _PORTS
                 if getattr(getattr(s, sec), key)]
        for key, value in keys:
            kind = "port" if key.endswith("port") else key
            other = routes.get((kind, value))
            if other is not None and other != f"models.{m.name}.{key}":
                raise ConfigError(f"models.{m.name}.{key}: {value} is also {other}; each model needs its own")
            routes[(kind, value)] = f"models.{m.name}.{key}"


def _check_budgets(models: tuple[FleetModel, ...], limits: FleetLimits) -> None:
    """``fleet.gpus`` must hold every model's serving at ``serving.max_replicas`` beside the largest train
    step; the train steps running at once are kept inside it at run time (monitoring.fleet_runs), as is
    ``fleet.daily_runs``, one pool the models' triggers share."""
    if limits.gpus is None:
        return
    each = {m.name: serving_gpus(m.settings) for m in models}
    largest = max(models, key=lambda m: train_gpus(m.settings))
    each[largest.name] += train_gpus(largest.settings)
    if sum(each.values()) > limits.gpus:
        parts = ", ".join(f"{n} {v}" for n, v in each.items() if v)
        raise ConfigError(f"fleet.gpus: the fleet is over its budget of {limits.gpus}: {sum(each.values())} "
                          f"GPUs the models request ({parts})")
