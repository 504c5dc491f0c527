"""What the monitor's check loop prints: one line per change, one summary at most every minute.

At the default level (INFO) the loop speaks when something changed: a drift verdict (or champion)
different from the last check's, the champion's quality verdict changing, a check that starts
failing or being skipped (and the reason, once). Alerts and retraining runs are logged once by the
trigger (its first decision on an alert; re-deliveries only at DEBUG), rollout outcomes once by
:mod:`monitoring.outcomes`. At most every ``every`` seconds (60) one line sums up the checks since
the last summary. Each check's own verdict line is DEBUG: ``driftloop -v monitor`` shows it.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

__all__ = ["LoopLines"]


class LoopLines:
    """The check loop's log lines (see the module doc); ``clock`` is monotonic seconds (tests pass their own)."""

    def __init__(self, logger: logging.Logger, *, every: float = 60.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.log = logger
        self.every = every
        self.clock = clock
        self._state: dict[str, str] = {}
        self._since = clock()
        self._counts: Counter[str] = Counter()
        self._last: dict[str, str] = {}

    def change(self, key: str, value: str, message: str, *args: Any, level: int = logging.INFO,
               exc_info: bool = False) -> bool:
        """Log ``message`` at ``level`` when ``key``'s value differs from the last one, else at DEBUG."""
        changed = self._state.get(key) != value
        self._state[key] = value
        self.log.log(level if changed else logging.DEBUG, message, *args, exc_info=exc_info and changed)
        return changed

    def drift(self, outcome: dict[str, Any]) -> None:
        verdict = outcome["verdict"]
        result = outcome.get("result")
        window = outcome.get("window") or {}
        if result:
            drifted = f" ({', '.join(result['drifted_columns'])})" if result["drifted_columns"] else ""
            text = (f"{verdict}, share {result['share']:.2f} of {len(result['columns'])} columns{drifted}, "
                    f"{window.get('rows', 0)} rows, window {window.get('id')}")
        else:
            text = f"{verdict}: {outcome.get('reason', '')}"
        self._counts[verdict] += 1
        self._last["drift"] = text
        self.change("drift", f"{outcome.get('champion')}:{verdict}", "drift check of %s: %s", outcome.get("champion"),
                    text)

    def quality(self, outcome: dict[str, Any]) -> None:
        champion = outcome.get("champion")
        entry = (outcome.get("versions") or {}).get(champion) if champion else None
        verdict = entry["verdict"] if entry else "no labelled predictions"
        degraded = ", ".join(v["metric"] for v in (entry or {}).get("verdicts", []) if v.get("degraded"))
        text = f"v{champion} {verdict}" + (f" ({degraded})" if degraded else "")
        self._last["quality"] = text
        self.change("quality", f"{champion}:{verdict}", "quality check of the champion: %s", text)

    def skipped(self, check: str, exc: BaseException) -> None:
        """A check that could not run (no champion yet, MLflow away): the reason once, while it stays."""
        self._counts[f"{check} skipped"] += 1
        self.change(check, f"skipped: {exc}", "%s check skipped: %s", check, exc, level=logging.WARNING)

    def failed(self, check: str, exc: BaseException) -> None:
        """A check that failed on a bug: the traceback once per distinct error."""
        self._counts[f"{check} failed"] += 1
        self.change(check, f"failed: {type(exc).__name__}: {exc}", "%s check failed", check, level=logging.ERROR,
                    exc_info=True)

    def summary(self, extra: str = "") -> bool:
        """One line about the checks since the last summary, when ``every`` seconds have passed; True if said."""
        now = self.clock()
        if now - self._since < self.every or not self._counts:
            return False
        counts = ", ".join(f"{n} {what}" for what, n in sorted(self._counts.items()))
        parts = [f"monitor, last {now - self._since:.0f}s: checks {counts}"]
        parts += [f"last {key}: {text}" for key, text in self._last.items()]
        if extra:
            parts.append(extra)
        self.log.info("; ".join(parts))
        self._since, self._counts = now, Counter()
        return True
