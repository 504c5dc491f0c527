"""What every command of the CLI shares: the consoles, the ``--config`` / ``--param`` options
and loading the settings for a command (file, environment, ``--param``, then flag values).

Sub-command modules take these from here, never from the main CLI module, so that no
sub-command imports the module that registers it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from driftloop.core.config import Settings
from driftloop.core.errors import ConfigError
from driftloop.core.fleet import load_fleet
from driftloop.core.workspace import tighten_workspace

__all__ = ["console", "err_console", "settings_from", "ConfigOpt", "ParamOpt", "ModelOpt"]

console = Console(highlight=False)
# soft_wrap: an error is one line also when stderr is a pipe (rich would wrap it at 80 columns).
err_console = Console(stderr=True, highlight=False, soft_wrap=True)

ConfigOpt = Annotated[Optional[Path], typer.Option("--config", "-c", help="YAML config file (or $DRIFTLOOP_CONFIG).")]
ParamOpt = Annotated[Optional[list[str]], typer.Option("--param", "-p", help="Override a config key: section.key=value.")]
ModelOpt = Annotated[Optional[str], typer.Option("--model", "-m", help="The model of a fleet file to act on "
                                                                      "(a one-model file: its model).")]


def settings_from(config: Path | None, params: list[str] | None = None, *, model: str | None = None,
                  **extra: object) -> Settings:
    """Load the settings for a command: file, environment, ``--param`` overrides, then flag values.

    A fleet file (docs/fleet.md) gives the settings of the model ``model`` names; a command that acts on
    one model refuses a fleet file without ``--model`` (one line listing the models). On a one-model
    file ``--model`` must name its model.

    A workspace that already exists is tightened to owner-only modes (one made by an older release
    may hold group- or world-readable logs, labels and tokens).
    """
    overrides = list(params or [])
    overrides += [f"{k}={v}" for k, v in extra.items() if v is not None]
    fleet = load_fleet(config, overrides)
    if model is None and not fleet.single:
        raise ConfigError(f"{fleet.source} is a fleet of {len(fleet.models)} models: pass --model NAME "
                          f"(models: {', '.join(fleet.names)})")
    settings = fleet.model(model).settings if model is not None else fleet.models[0].settings
    tighten_workspace(settings.workspace_dir)
    return settings
