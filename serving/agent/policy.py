"""The agent's guardrails: every proposed action is checked here before it runs.

A :class:`Policy` is the declarative part of ``agent`` in the configuration (floors and
ceilings per model, largest step, cooldown, blackout windows, actions per hour, the mode);
a :class:`Guard` applies it to one :class:`Action` at a time and answers a :class:`Decision`
-- allowed or refused, always with the reason. The same guard runs in ``agent run`` and in
``agent simulate``, so what the simulator shows is what the policy lets through.

Modes: ``observe`` records every decision and runs none; ``scale-up`` may only raise a floor
and raise alerts; ``full`` may also lower a floor (never below the model's floor) and roll back
an in-flight canary. A kill switch (a file locally, an annotation on the InferenceService on a
cluster) stops every action while it is set.
"""

from __future__ import annotations

from collections import deque
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, Callable, Literal

from driftloop.core.statistics import in_blackout

if TYPE_CHECKING:
    from driftloop.core.config import AgentConfig

__all__ = ["Action", "Decision", "Policy", "Guard", "in_blackout", "urgent_step", "MODES", "SET_FLOOR", "ROLLBACK",
           "ALERT"]

MODES = ("observe", "scale-up", "full")
SET_FLOOR = "set_floor"
ROLLBACK = "rollback_canary"
ALERT = "alert"
HAND_BACK = "hand_back"  # stopping while it owns the count: the autoscaler gets its range back
ActionKind = Literal["set_floor", "rollback_canary", "alert"]


@dataclass(frozen=True)
class Action:
    """Something the agent would like to do to one served model."""

    kind: str
    model: str
    target: int | None = None  # set_floor: the wanted floor
    current: int | None = None  # set_floor: the floor in force
    reason: str = ""
    detail: dict[str, Any] = field(default_factory=dict)
    urgent: bool = False  # set_floor: a raise for load already observed (the reactive guard), not a forecast


@dataclass(frozen=True)
class Decision:
    """What the guard made of an action. ``applied`` is the floor that may be set (after
    clamping to floor/ceiling and the largest step); ``allowed`` False means nothing runs."""

    time: float
    mode: str
    action: Action
    allowed: bool
    reason: str
    applied: int | None = None

    def to_dict(self) -> dict[str, Any]:
        doc = asdict(self)
        doc["at"] = datetime.fromtimestamp(self.time, timezone.utc).isoformat()
        return doc


@dataclass(frozen=True)
class Policy:
    """The guardrails, per model where the configuration says so."""

    mode: str = "observe"
    floor: int = 1
    ceiling: int = 10
    max_step: int = 4
    cooldown_seconds: float = 600.0
    max_actions_per_hour: int = 12
    blackout: tuple[str, ...] = ()
    models: dict[str, tuple[int | None, int | None]] = field(default_factory=dict)  # name -> (floor, ceiling)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"agent mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        for name, (lo, hi) in [("(default)", (self.floor, self.ceiling)), *self.models.items()]:
            lo = self.floor if lo is None else lo
            hi = self.ceiling if hi is None else hi
            if lo < 0 or hi < lo:
                raise ValueError(f"model {name}: floor {lo} / ceiling {hi} is not 0 <= floor <= ceiling")
        if self.max_step < 1:
            raise ValueError("max_step must be at least 1")

    @classmethod
    def from_config(cls, agent: AgentConfig, mode: str | None = None) -> "Policy":
        """From ``settings.agent`` (``AgentConfig``); ``mode`` overrides the configured one."""
        return cls(mode=mode or agent.mode, floor=agent.floor, ceiling=agent.ceiling, max_step=agent.max_step,
                   cooldown_seconds=agent.cooldown_seconds, max_actions_per_hour=agent.max_actions_per_hour,
                   blackout=tuple(agent.blackout),
                   models={k: (v.floor, v.ceiling) for k, v in agent.models.items()})

    def bounds(self, model: str) -> tuple[int, int]:
        lo, hi = self.models.get(model, (None, None))
        return (self.floor if lo is None else lo), (self.ceiling if hi is None else hi)


def urgent_step(max_step: int, current: int) -> int:
    """The largest raise an urgent action (load already observed) may make at once: ``max_step``, or
    what Kubernetes' HPA allows by default per 15 s period (double the count, or 4 pods), whichever is
    more. ``max_step`` bounds what the agent does on a forecast; observed load is not a guess, and
    holding it to ``max_step`` would make the agent take a burst step by step, as the HPA it replaces."""
    return max(max_step, current, 4)


class Guard:
    """Checks actions against a :class:`Policy`; keeps what it needs to (last change per model,
    actions in the last hour). ``kill_switch`` answers the reason it is set, or None."""

    def __init__(self, policy: Policy, kill_switch: Callable[[str], str | None] | None = None) -> None:
        self.policy = policy
        self.kill_switch = kill_switch or (lambda model: None)
        self._last_change: dict[str, float] = {}
        self._recent: deque[float] = deque()

    def check(self, action: Action, now: float, *, commit: bool = True) -> Decision:
        """The decision on ``action`` at ``now``. An allowed action counts against the hourly budget
        (and starts the model's cooldown) whether or not carrying it out then succeeds; ``commit``
        False asks what the answer would be and counts nothing (the fleet's allocation probes with it)."""
        p = self.policy

        def refuse(reason: str, applied: int | None = None) -> Decision:
            return Decision(now, p.mode, action, False, reason, applied)

        applied: int | None = None
        if action.kind == SET_FLOOR:
            if action.target is None or action.current is None:
                return refuse("a floor change needs target and current")
            lo, hi = p.bounds(action.model)
            wanted = min(max(action.target, lo), hi)
            up = urgent_step(p.max_step, action.current) if action.urgent else p.max_step
            step = max(-p.max_step, min(up, wanted - action.current))
            applied = min(max(action.current + step, lo), hi)
            if applied == action.current:
                if wanted != action.target:
                    return refuse(f"already at the policy's {'ceiling' if action.target > hi else 'floor'} "
                                  f"({applied}; wanted {action.target})", applied)
                return refuse("no change", applied)
            lowering = applied < action.current
            if lowering and p.mode != "full":
                return refuse(f"mode {p.mode} may not lower a floor ({action.current} -> {applied})", applied)
            last = self._last_change.get(action.model)
            if lowering and last is not None and now - last < p.cooldown_seconds:
                return refuse(f"cooldown: last change {now - last:.0f} s ago (< {p.cooldown_seconds:g} s)", applied)
        elif action.kind == ROLLBACK:
            if p.mode != "full":
                return refuse(f"mode {p.mode} may not roll back a canary")
        elif action.kind == ALERT:
            pass
        else:
            return refuse(f"unknown action {action.kind!r}")
        if p.mode == "observe":
            return refuse("observe mode: recorded only", applied)
        switched = self.kill_switch(action.model)
        if switched:
            return refuse(f"kill switch: {switched}", applied)
        window = in_blackout(p.blackout, now)
        if window:
            return refuse(f"blackout window {window} (UTC)", applied)
        while self._recent and now - self._recent[0] >= 3600:
            self._recent.popleft()
        if len(self._recent) >= p.max_actions_per_hour:
            return refuse(f"budget: {p.max_actions_per_hour} actions in the last hour", applied)
        if commit:
            self._recent.append(now)
            if action.kind == SET_FLOOR:
                self._last_change[action.model] = now
        if action.kind == SET_FLOOR:
            clamp = "" if applied == action.target else f" (wanted {action.target}; policy allows {applied})"
            return Decision(now, p.mode, action, True, f"{action.reason}{clamp}".strip() or "allowed", applied)
        return Decision(now, p.mode, action, True, action.reason or "allowed", applied)
