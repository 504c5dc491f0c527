"""One rollout controller for a fleet: ``driftloop rollout run -c FLEET`` drives every model's rollout in one process.

Each model keeps its own :class:`~serving.rollout.RolloutController` -- its state (``<model workspace>/rollout``),
its serving target (its split on the fleet's gateway, or its InferenceService), its registry and its
``rollout`` section -- exactly as ``driftloop rollout run --model NAME`` builds it. :class:`FleetRollouts` visits
each model once per its ``rollout.interval_seconds``: a model with an open rollout (pending, in its shadow phase,
progressing, awaiting approval; a canary the deploy step marked pending in MLflow is adopted as a one-model
controller adopts it) takes one step; the steps of several models run at once in a small pool, and a model never
has two steps at once. A model without an open rollout is left alone (its target is not even built). A model
whose controller cannot be built or whose step fails is named on its own line and visited again at its next
interval; the others go on. ``run`` returns once no model has an open rollout (as ``rollout run`` returns once
its one rollout is promoted or rolled back), so the controller's loop of ``infra/base`` serves a fleet unchanged:
a new rollout of any model, or a model added to the file, is picked up at the next start.
"""

from __future__ import annotations

import concurrent.futures as cf
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from driftloop.core.errors import DriftloopError, RolloutAborted

if TYPE_CHECKING:
    from driftloop.core.fleet import FleetModel
    from serving.rollout import RolloutController

__all__ = ["FleetRollouts", "Visit"]

# what a controller factory is asked for: the model, and whether its serving target is needed (a step) or only
# its state (a model without an open rollout never builds its target)
ControllerFactory = Callable[["FleetModel", bool], "RolloutController"]


@dataclass
class Visit:
    """What one visit of a model did: ``step`` (the recorded step) when it stepped, ``error`` when it failed."""

    model: str
    open: bool = False
    step: dict[str, Any] | None = None
    error: str | None = None
    status: str | None = None


@dataclass
class _Model:
    model: FleetModel
    due: float = 0.0
    steps: int = 0
    last: Visit | None = None
    controller: Any = None
    future: cf.Future | None = field(default=None, repr=False)


class FleetRollouts:
    """Every model's rollout of a fleet, stepped at its own interval, several at once (``workers``)."""

    def __init__(self, models: Sequence[FleetModel], controller: ControllerFactory, *, workers: int = 4,
                 on_visit: Callable[[Visit], None] | None = None, clock: Callable[[], float] = time.monotonic):
        self._models = {m.name: _Model(m) for m in models}
        self._controller = controller
        self._workers = max(1, min(workers, len(self._models) or 1))
        self._on_visit = on_visit or (lambda visit: None)
        self._clock = clock

    def run(self, *, max_steps: int | None = None, stop: threading.Event | None = None,
            tick: float = 0.1) -> dict[str, Visit]:
        """Visit the models until none has an open rollout (or each has taken ``max_steps`` steps, or ``stop`` is
        set); returns each model's last visit. A step in flight when it stops is finished, never cut in half."""
        stop = stop or threading.Event()
        with cf.ThreadPoolExecutor(self._workers, thread_name_prefix="rollout") as pool:
            try:
                while True:
                    self._collect()
                    if stop.is_set():
                        break
                    settled = all(m.last is not None and m.future is None for m in self._models.values())
                    if settled and not self._open(max_steps):  # every model visited, none with an open rollout
                        break
                    now = self._clock()
                    for m in self._models.values():
                        if m.future is None and now >= m.due and (max_steps is None or m.steps < max_steps):
                            m.future = pool.submit(self._visit, m)
                    stop.wait(tick)
            finally:
                for m in self._models.values():  # the steps in flight end as they would have
                    if m.future is not None:
                        cf.wait([m.future])
                self._collect()
        return {name: m.last for name, m in self._models.items() if m.last is not None}

    def _open(self, max_steps: int | None) -> bool:
        return any(m.last is not None and m.last.open and (max_steps is None or m.steps < max_steps)
                   for m in self._models.values())

    def _collect(self) -> None:
        for m in self._models.values():
            if m.future is None or not m.future.done():
                continue
            visit: Visit = m.future.result()  # _visit never raises
            m.future, m.last = None, visit
            m.steps += visit.step is not None
            self._on_visit(visit)

    def _visit(self, m: _Model) -> Visit:
        from serving.rollout.state import AWAITING_APPROVAL, TERMINAL

        name = m.model.name
        interval = m.model.settings.rollout.interval_seconds
        m.due = self._clock() + interval
        visit = Visit(name)
        try:
            probe = m.controller or self._controller(m.model, False)  # the stepping one while a rollout is open
            try:
                state = probe.state()  # adopts a canary the deploy step marked pending in MLflow
            except RolloutAborted:  # nothing recorded for this model: nothing to do
                m.controller = None
                return visit
            visit.status = state.status
            if state.done or (state.status == AWAITING_APPROVAL and not probe.cfg.manual_approval):
                m.controller = None
                return visit
            visit.open = True
            if m.controller is None:
                m.controller = self._controller(m.model, True)
            visit.step = m.controller.step()
            visit.status = m.controller.state().status
            visit.open = visit.status not in TERMINAL
            m.due = self._clock() + interval  # the next interval starts when this step has ended
        except Exception as exc:  # noqa: BLE001 - one model's failure never stops another's rollout
            m.controller = None  # built again at the next visit (a registry or cluster back up)
            visit.open = False  # not waited for: with no other rollout open the run ends, naming it (exit 1)
            visit.error = str(exc) if isinstance(exc, DriftloopError) else f"{type(exc).__name__}: {exc}"
        return visit
