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

from driftloop.core.config import Settings, load_settings
from driftloop.core.workspace import tighten_workspace

__all__ = ["console", "err_console", "settings_from", "ConfigOpt", "ParamOpt"]

console = Console(highlight=False)
# soft_wrap: an error is one line also when stderr is a pipe (rich would wrap it at 80 columns).
err_console = Console(stderr=True, highlight=False, soft_wrap=True)

ConfigOpt = Annotated[Optional[Path], typer.Option("--config", "-c", help="YAML config file (or $DRIFTLOOP_CONFIG).")]
ParamOpt = Annotated[Optional[list[str]], typer.Option("--param", "-p", help="Override a config key: section.key=value.")]


def settings_from(config: Path | None, params: list[str] | None = None, **extra: object) -> Settings:
    """Load the settings for a command: file, environment, ``--param`` overrides, then flag values.

    A workspace that already exists is tightened to owner-only modes (one made by an older release
    may hold group- or world-readable logs, labels and tokens).
    """
    overrides = list(params or [])
    overrides += [f"{k}={v}" for k, v in extra.items() if v is not None]
    settings = load_settings(config, overrides)
    tighten_workspace(settings.workspace_dir)
    return settings
