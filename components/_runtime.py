"""What every KFP step wrapper shares: clear failures and lean start-up.

A step that fails on a user error (bad data, bad config) prints one line naming
the problem, exits non-zero and, when the local runner asked for it through
``DRIFTLOOP_ERROR_FILE``, writes the error there so the CLI can show it without
a traceback. Other exceptions propagate unchanged (they are bugs).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import warnings
from collections.abc import Iterator

from driftloop.core.errors import DriftloopError

ERROR_FILE_ENV = "DRIFTLOOP_ERROR_FILE"


@contextlib.contextmanager
def step(name: str) -> Iterator[None]:
    warnings.filterwarnings("ignore", category=FutureWarning)
    logging.basicConfig(level=logging.INFO, format=f"[{name}] %(message)s")
    try:
        yield
    except DriftloopError as exc:
        message = f"{type(exc).__name__}: {exc}"
        print(f"driftloop step {name!r} failed: {message}", file=sys.stderr, flush=True)
        path = os.environ.get(ERROR_FILE_ENV)
        if path:
            with open(path, "w") as fh:
                json.dump({"step": name, "type": type(exc).__name__, "message": str(exc)}, fh)
        # A user error ends the step with one line, not a traceback; the task fails.
        raise SystemExit(1) from None
