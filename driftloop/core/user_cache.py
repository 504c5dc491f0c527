"""Small facts about installed libraries, kept in the user's cache between processes.

Some answers cost a process a library import it would not otherwise pay (scikit-learn's estimators,
skops' walk of every scikit-learn module) and never change for one installed version of that library.
They are kept in ``$XDG_CACHE_HOME/driftloop`` (else ``~/.cache/driftloop``), one JSON file per library
version: read there, asked of the library once per installed version. A cache that cannot be read is
asked again; one that cannot be written is passed by. Nothing here imports more than the standard library.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any

__all__ = ["cache_file", "read_json", "write_json"]


def cache_file(stem: str, **versions: str) -> Path | None:
    """The cache file for ``stem`` at these library versions (None: no home directory to keep one in)."""
    try:
        root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "driftloop"
    except RuntimeError:  # no home directory to be found (a bare container user): nothing cached
        return None
    parts = [stem] + [f"{name}-{version}" for name, version in versions.items()]
    return root / (re.sub(r"[^A-Za-z0-9.+-]", "_", "-".join(parts)) + ".json")


def read_json(path: Path | None) -> Any:
    """The file's JSON value, or None when there is none yet or it is damaged (then it is asked again)."""
    if path is None:
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def write_json(path: Path | None, value: Any) -> None:
    """Write ``value`` whole, then rename: a reader never sees half a file. Errors are passed by."""
    if path is None:
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
        try:
            with os.fdopen(fd, "w") as fh:
                json.dump(value, fh)
            os.replace(tmp, path)
        except OSError:
            Path(tmp).unlink(missing_ok=True)
            raise
    except OSError:
        pass  # a read-only or full cache: the library is asked again next time
