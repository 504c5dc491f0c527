"""What ``driftloop demo`` prints: a line per event with the time since the start, and the closing summary
(the registered versions, where the MLflow store, the Evidently reports and the logs are, the quality
check on the labelled traffic). On a terminal a progress line (share done, time left) stands under the
last event while the demo waits."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.table import Table

from driftloop.core.progress import Progress

if TYPE_CHECKING:
    from driftloop.core.registry import Registry

__all__ = ["console", "Narrator", "drift_summary", "version_rows", "versions_table", "quality_text"]

console = Console(highlight=False)


@dataclass
class Narrator:
    """One line per event, with the seconds since the demo started; on a terminal, a progress line under it.

    ``phases`` are the demo's steps with the seconds each took in a measured run: :meth:`phase` marks
    the start of one, and the share done is the finished phases' seconds (plus the current one's, up to
    its measure) over the sum."""

    started: float = field(default_factory=time.monotonic)
    phases: dict[str, float] = field(default_factory=dict)
    progress: Progress = field(default_factory=lambda: Progress("demo"))

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._done = 0.0
        self._current: tuple[str, float] | None = None
        self._took: dict[str, float] = {}  # seconds each finished phase took in this run
        self._stop = threading.Event()
        if self.progress.tty and self.phases:
            threading.Thread(target=self._tick, name="demo-progress", daemon=True).start()

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def say(self, phase: str, text: str) -> None:
        with self._lock:
            self.progress.close()  # the event line takes the progress line's place; the next tick redraws it
            console.print(f"[dim]{self.elapsed:6.1f}s[/] [bold cyan]{phase:<9}[/] {text}")

    def phase(self, name: str) -> None:
        """The demo enters phase ``name`` (one of ``phases``)."""
        with self._lock:
            self._end_phase()
            self._current = (name, time.monotonic())

    def _end_phase(self) -> None:
        if self._current is not None:
            self._done += self.phases.get(self._current[0], 0.0)
            self._took[self._current[0]] = time.monotonic() - self._current[1]
            self._current = None

    def timings(self) -> str:
        """The seconds each phase took in this run (the phases :meth:`phase` marked), in one line."""
        return ", ".join(f"{name} {seconds:.1f}" for name, seconds in self._took.items())

    def share(self) -> float:
        total = sum(self.phases.values())
        if not total or self._current is None:
            return 0.0
        name, since = self._current
        expected = self.phases.get(name, 0.0)
        return (self._done + min(time.monotonic() - since, 0.95 * expected)) / total

    def close(self) -> None:
        self._stop.set()
        with self._lock:
            self._end_phase()
            self.progress.close()

    def _tick(self) -> None:
        while not self._stop.wait(0.5):
            with self._lock:
                self.progress(self.share())


def drift_summary(outcome: dict[str, Any]) -> str:
    """A monitor check's drifted columns and share, in one line."""
    result = outcome.get("result") or {}
    cols = result.get("columns") or []
    drifted = [c["column"] for c in cols if c.get("drifted")]
    share = result.get("share")
    text = f"{len(drifted)}/{len(cols)} columns drifted" if cols else outcome.get("reason", "")
    if drifted:
        text += ": " + ", ".join(drifted)
    if share is not None:
        text += f"; share {share:.2f}"
    return text


def version_rows(registry: Registry, model_name: str) -> list[dict[str, Any]]:
    """Each registered version: its trigger, gate decision, accuracy, rollout outcome and aliases."""
    rows = []
    for v in registry.list_versions(model_name):
        v = registry.get_version(model_name, v.version)
        acc = registry.run(v.run_id).data.metrics.get("accuracy") if v.run_id else None
        rows.append({"version": v.version, "trigger": v.tags.get("driftloop.trigger", ""),
                     "gate": v.tags.get("driftloop.gate.decision", ""), "accuracy": acc,
                     "rollout": v.tags.get("driftloop.rollout.outcome", ""), "aliases": list(v.aliases)})
    return rows


def versions_table(rows: list[dict[str, Any]]) -> Table:
    table = Table(title="driftloop demo — the loop closed")
    for col in ("version", "trigger", "gate", "accuracy", "rollout", "aliases"):
        table.add_column(col, overflow="fold")  # a long trigger folds in 80 columns; summary.json has all
    for row in rows:
        acc = row["accuracy"]
        table.add_row(row["version"], row["trigger"], row["gate"], f"{acc:.3f}" if acc else "-", row["rollout"],
                      ", ".join(row["aliases"]))
    return table


def quality_text(outcome: dict[str, Any]) -> str:
    """The monitor's quality check per version: the realised accuracy on its labelled window, the estimate
    from calibrated scores, the holdout."""
    parts = []
    for version, q in sorted(outcome.get("versions", {}).items()):
        if "holdout" not in q:
            parts.append(f"v{version}: {q.get('reason', q.get('verdict'))}")
            continue
        live = (q.get("live") or {}).get("accuracy")
        est = (q.get("estimated") or q.get("estimated_latest") or {}).get("accuracy")
        parts.append(f"v{version} {q['verdict']}: accuracy realised "
                     f"{f'{live:.3f}' if live is not None else '-'} ({q['labelled_rows']} labels), estimated "
                     f"{f'{est:.3f}' if est is not None else '-'}, holdout {q['holdout'].get('accuracy', 0):.3f}")
    return "; ".join(parts) or "no labelled predictions"
