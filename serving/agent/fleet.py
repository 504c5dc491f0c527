"""One agent for a fleet: every model scaled by its own agent, inside one replica budget.

Each model keeps its own :class:`~serving.agent.agent.ServingAgent` -- its samples, forecasts,
anomaly detectors, planner, policy (:class:`~serving.agent.policy.Guard`), actuator and decision
log. Each round the fleet asks every model's agent what it would do (its proposals, judged by its
guard without counting: ``Guard.check(commit=False)``), then :func:`allocate` shares
``fleet.replicas`` -- the model-server replicas all models together may hold -- between them:

* when the models' own decisions together fit the budget (or there is none), each gets its own;
* when they do not, every lowering a model wants is granted, and the replicas still asked for go
  one at a time to the model nearest to breaching its SLO (the highest *pressure*: load per
  replica over what a replica serves at the target utilisation, ``agent.capacity_rps x
  agent.target_utilisation``; the load is the larger of the load now and the forecast's upper
  bound over the next interval). Free replicas first; then one is taken from the idlest model
  (the lowest pressure once it has given it) -- but only while that model, having given it, is
  still less pressed than the one that gets it, so replicas never move from a busier model to an
  idler one;
* no model ever goes below its own floor or above its own ceiling, nor further than its policy
  allows this round (largest step, cooldown, mode, kill switch, blackout: the range is asked of
  its guard);
* when the budget cannot even cover the models' floors together, every model is kept at its floor
  and one line says so.

Every change the budget makes to a model's own decision is recorded in that model's decision log
with why (``churn 3→2: idle (0.1 of target) — 1 replica to demand, about to breach its p99 SLO
(1.5 of target)``); a raise the budget cannot give is recorded as refused. Lowerings run before
raises, and a raise only takes what is free once they have run, so the fleet never holds more than
its budget on the way. One model's failure (metrics it cannot read, a backend that errors) is
logged on its own line; it keeps the replicas it was last seen with, and every other model is
still scaled.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from driftloop.core.errors import DriftloopError
from serving.agent.agent import Sampler, ServingAgent, merge_samples
from serving.agent.policy import SET_FLOOR, Action, Decision

__all__ = ["Allocation", "Claim", "FleetAgent", "FleetRound", "Member", "allocate"]

log = logging.getLogger(__name__)
IDLE = 0.5  # pressure below this reads "idle"


@dataclass(frozen=True)
class Claim:
    """One model's part of a fleet round: the replicas it has, what its own agent decided, its
    policy's floor and ceiling, and its load. ``low``/``high``: the range its policy lets it move
    in this round (default: floor..ceiling)."""

    model: str
    current: int
    desired: int
    floor: int
    ceiling: int
    load_rps: float = 0.0
    per_replica_rps: float = 15.0  # what one replica serves at the target utilisation
    low: int | None = None
    high: int | None = None

    @property
    def bounds(self) -> tuple[int, int]:
        lo = self.floor if self.low is None else self.low
        hi = self.ceiling if self.high is None else self.high
        return lo, max(lo, hi)

    @property
    def wish(self) -> int:
        lo, hi = self.bounds
        return min(max(self.desired, lo), hi)

    def pressure(self, replicas: int) -> float:
        """Load per replica over what a replica serves at the target utilisation (1: at the target)."""
        if replicas <= 0:
            return math.inf if self.load_rps > 0 else 0.0
        return self.load_rps / (replicas * self.per_replica_rps)


@dataclass(frozen=True)
class Allocation:
    """Each model's replicas; ``reasons``: why a model's count differs from its own decision (or was
    part of a move); ``note``: one line when the budget cannot be kept."""

    replicas: dict[str, int]
    reasons: dict[str, str] = field(default_factory=dict)
    note: str | None = None
    budget: int | None = None


def state(pressure: float) -> str:
    """How pressed a model is, in words."""
    if pressure >= 1.0:
        return f"about to breach its p99 SLO ({pressure:.1f} of target)"
    if pressure < IDLE:
        return f"idle ({pressure:.1f} of target)"
    return f"{pressure:.1f} of target"


def allocate(claims: Sequence[Claim], budget: int | None) -> Allocation:
    """Each model's replicas so that together they hold at most ``budget`` (None: no budget): see the
    module's docstring for the rule."""
    by = {c.model: c for c in claims}
    wish = {c.model: c.wish for c in claims}
    if budget is None or sum(wish.values()) <= budget:
        return Allocation(wish, budget=budget)
    floors = {c.model: c.floor for c in claims}
    if sum(floors.values()) > budget:
        kept = {m: min(max(floors[m], by[m].bounds[0]), by[m].bounds[1]) for m in by}
        parts = ", ".join(f"{m} {f}" for m, f in floors.items())
        note = (f"fleet.replicas {budget} cannot cover the models' floors ({sum(floors.values())}: {parts}): "
                f"each model is kept at its floor")
        reasons = {m: f"{m} {by[m].current}→{n}: kept at its floor ({note})" for m, n in kept.items()
                   if n != wish[m]}
        return Allocation(kept, reasons, note, budget)
    return _share(claims, budget, wish)


def _share(claims: Sequence[Claim], budget: int, wish: dict[str, int]) -> Allocation:
    """The binding budget: lowerings granted, raises by urgency, taken from the idlest."""
    by = {c.model: c for c in claims}
    order = {c.model: i for i, c in enumerate(claims)}
    lo = {m: c.bounds[0] for m, c in by.items()}
    held = {m: min(max(min(c.current, wish[m]), lo[m]), c.bounds[1]) for m, c in by.items()}
    moved: dict[tuple[str, str], int] = {}
    note = None

    def idlest(exclude: str | None) -> str | None:
        able = [m for m in by if m != exclude and held[m] > lo[m]]
        return min(able, key=lambda m: (by[m].pressure(held[m] - 1), order[m]), default=None)

    while sum(held.values()) > budget:  # the fleet holds more than its budget already
        donor = idlest(None)
        if donor is None:
            note = (f"fleet.replicas {budget}: the models hold {sum(held.values())} and none can be lowered "
                    f"further this round (floors, cooldown, mode or kill switch)")
            break
        held[donor] -= 1
        moved[(donor, "")] = moved.get((donor, ""), 0) + 1
    pending = {m for m in by if held[m] < wish[m]}
    for _ in range(sum(wish.values()) * max(1, len(by)) + 1):  # every move lowers the peak pressure
        if not pending:
            break
        taker = max(pending, key=lambda m: (by[m].pressure(held[m]), -order[m]))
        if sum(held.values()) < budget:
            held[taker] += 1
        else:
            donor = idlest(taker)
            if donor is None or by[donor].pressure(held[donor] - 1) >= by[taker].pressure(held[taker]):
                pending.discard(taker)
                continue
            held[donor] -= 1
            held[taker] += 1
            moved[(donor, taker)] = moved.get((donor, taker), 0) + 1
        if held[taker] >= wish[taker]:
            pending.discard(taker)
    return Allocation(held, _reasons(by, wish, held, moved, budget), note, budget)


def _replicas(n: int) -> str:
    return f"{n} replica{'' if n == 1 else 's'}"


def _reasons(by: dict[str, Claim], wish: dict[str, int], held: dict[str, int], moved: dict[tuple[str, str], int],
             budget: int) -> dict[str, str]:
    """Why each model that the budget touched has what it has."""
    now = {m: state(c.pressure(c.current)) for m, c in by.items()}
    out = {}
    for m, c in by.items():
        gave = [f"{_replicas(n)} to {t}, {now[t]}" for (d, t), n in moved.items() if d == m and t]
        got = [f"{_replicas(n)} from {d}, {now[d]}" for (d, t), n in moved.items() if t == m]
        parts = gave + got
        if moved.get((m, "")):
            parts.append(f"{_replicas(moved[(m, '')])} back: the fleet held more than fleet.replicas {budget}")
        if held[m] < wish[m] and wish[m] > c.current:
            parts.append(f"wanted {wish[m]}: fleet.replicas {budget} is spent and the others are as pressed")
        if parts:
            out[m] = f"{m} {c.current}→{held[m]}: {now[m]} — " + "; ".join(parts)
    return out


@dataclass
class Member:
    """One model of the fleet: its name, its agent and where its traffic is read."""

    name: str
    agent: ServingAgent
    sampler: Sampler | None = None


@dataclass
class _Plan:
    claim: Claim
    own: Action | None  # the model's own replica proposal
    others: list[Action]  # its alerts and rollbacks


@dataclass
class FleetRound:
    """What one fleet round did: each model's decision records, the models that failed (one line
    each), the allocation."""

    records: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    failures: dict[str, str] = field(default_factory=dict)
    allocation: Allocation | None = None


class FleetAgent:
    """Every model's agent, one round at a time, sharing ``budget`` replicas (None: no budget)."""

    def __init__(self, members: Sequence[Member], budget: int | None) -> None:
        self.members = list(members)
        self.budget = budget
        self._known: dict[str, int] = {}  # each model's replicas when last read
        self._ticks = 0
        self._backoff: dict[str, tuple[int, int]] = {}  # a model whose change failed: (tick it may move again, failures)
        self._failing: dict[str, str] = {}  # models that failed last round, and why
        self.note: str | None = None

    # -- one round --------------------------------------------------------------------------------
    def round(self, now: float, samples: dict[str, dict[str, float] | None], *,
              deciding: set[str] | None = None, failed: dict[str, str] | None = None) -> FleetRound:
        """Every model's proposals (a decision round for the models in ``deciding`` -- default all --, the
        reactive guard for the others), shared out by :func:`allocate`, carried out. ``failed``: models
        whose metrics could not be read this round (they keep their replicas)."""
        out = FleetRound(failures=dict(failed or {}))
        self._ticks += 1
        plans: dict[str, _Plan] = {}
        for m in self.members:
            if m.name in out.failures:
                self._remember(m)  # it holds what it has: counted against the budget
                continue
            try:
                decide = deciding is None or m.name in deciding
                plans[m.name] = self._plan(m, now, samples.get(m.name), decide)
            except Exception as exc:  # one model's failure never stops the others
                out.failures[m.name] = _why(exc)
        claims = [p.claim for p in plans.values()]
        claims += [Claim(m.name, n, n, n, n) for m in self.members if m.name not in plans
                   for n in [self._known.get(m.name)] if n is not None]  # failed: holds what it had
        out.allocation = allocate(claims, self.budget)
        if out.allocation.note != self.note and out.allocation.note:
            log.warning("%s", out.allocation.note)
        self.note = out.allocation.note
        self._carry_out(now, plans, out)
        for name, why in out.failures.items():
            if self._failing.get(name) != why:  # once, and again when the reason changes
                log.warning("agent %s: %s; left as it is, the other models are scaled", name, why)
        for name in set(self._failing) - set(out.failures):
            log.warning("agent %s: scaled again", name)
        self._failing = dict(out.failures)
        return out

    def _remember(self, m: Member) -> None:
        try:
            current = m.agent.current()
        except Exception:  # noqa: BLE001 -- its last known count stands
            return
        if current is not None:
            self._known[m.name] = current

    def _plan(self, m: Member, now: float, sample: dict[str, float] | None, decide: bool) -> _Plan:
        agent = m.agent
        events = agent.observe(now, sample) if decide and sample else []
        current = agent.current()
        if current is None:
            raise DriftloopError("its replicas cannot be read")
        self._known[m.name] = current
        observed = sample["rps"] if sample else None
        if decide:
            actions = agent.proposals(events, current, agent.observed_rps(observed))
        else:
            actions = [a for a in [agent.guard_proposal(now, observed, current)] if a] if observed is not None else []
        own = next((a for a in reversed(actions) if a.kind == SET_FLOOR), None)
        return _Plan(self._claim(m.name, agent, now, current, own, agent.observed_rps(observed)), own,
                     [a for a in actions if a.kind != SET_FLOOR])

    def _claim(self, name: str, agent: ServingAgent, now: float, current: int, own: Action | None,
               observed: float | None) -> Claim:
        floor, ceiling = agent.policy.bounds(agent.model)
        per = agent.planner.capacity_rps * agent.planner.target_utilisation
        if self._held(name):
            return Claim(name, current, current, floor, ceiling, observed or 0.0, per, current, current)
        urgent = bool(own and own.urgent)
        lo = self._reach(agent, now, Action(SET_FLOOR, agent.model, floor, current), current)
        hi = self._reach(agent, now, Action(SET_FLOOR, agent.model, ceiling, current, urgent=urgent), current)
        desired = current if own is None else self._reach(agent, now, own, current)
        load = observed or 0.0
        planner = agent.planner
        if agent.selector is not None and not agent.selector.reactive:
            load = max(load, planner.need(agent.selector)[1].upper)
        return Claim(name, current, desired, floor, ceiling, load, per, min(lo, hi), max(lo, hi))

    def _held(self, name: str) -> bool:
        """Its last replica change failed: held at its count for a while (see :meth:`_failed`)."""
        return self._backoff.get(name, (0, 0))[0] > self._ticks

    @staticmethod
    def _reach(agent: ServingAgent, now: float, action: Action, current: int) -> int:
        """Where the model's policy would let ``action`` take it this round (asked, not counted)."""
        d = agent.guard.check(action, now, commit=False)
        if d.applied is not None and (d.allowed or agent.policy.mode == "observe"):
            return int(d.applied)
        return current

    def _carry_out(self, now: float, plans: dict[str, _Plan], out: FleetRound) -> None:
        """Lowerings first, then raises up to what is free, each model through its own guard and actuator."""
        alloc = out.allocation
        assert alloc is not None
        held = {name: self._known[name] for name in alloc.replicas if name in self._known}
        order = sorted(plans, key=lambda n: (alloc.replicas[n] - plans[n].claim.current,
                                             -plans[n].claim.pressure(plans[n].claim.current)))
        for name in order:
            plan = plans[name]
            agent = next(m.agent for m in self.members if m.name == name)
            target, why = alloc.replicas[name], alloc.reasons.get(name)
            if self.budget is not None and target > plan.claim.current + self.budget - sum(held.values()):
                free = max(0, self.budget - sum(held.values()))  # a lowering before it did not happen
                target = plan.claim.current + free
                why = f"{why + '; ' if why else ''}{_replicas(free)} free: a lowering before it did not happen"
            try:
                records = [agent.carry_out(agent.guard.check(a, now)) for a in plan.others]
                rec = self._replicas(agent, now, plan, target, why)
            except Exception as exc:  # one model's failure never stops the others
                out.failures[name] = _why(exc)
                self._failed(name)
                continue
            if rec is not None:
                records.append(rec)
                held[name] = _holds(rec, plan.claim.current)
                if rec.get("error"):
                    self._failed(name)
                elif rec["allowed"]:
                    self._backoff.pop(name, None)
            out.records[name] = records

    def _failed(self, name: str) -> None:
        """A model whose replica change failed is held at its count -- given nothing, so it does not keep
        the others' replicas -- for 1, 2, 4 ... (at most 32) ticks, then tried again."""
        n = self._backoff.get(name, (0, 0))[1] + 1
        self._backoff[name] = (self._ticks + 1 + min(2 ** (n - 1), 32), n)

    def _replicas(self, agent: ServingAgent, now: float, plan: _Plan, target: int,
                  why: str | None) -> dict[str, Any] | None:
        claim, own = plan.claim, plan.own
        if own is not None and self._held(claim.model):
            return agent.log.record(Decision(now, agent.policy.mode, own, False, "its last replica change failed: "
                                             "held at its count for a while, then tried again", claim.current))
        if target == claim.desired and why is None:
            return None if own is None else agent.carry_out(agent.guard.check(own, now))
        why = f"fleet.replicas {self.budget}: {why or f'{claim.model} kept inside its policy'}"
        if target == claim.current:
            if own is None or claim.desired == claim.current:
                return None
            return agent.log.record(Decision(now, agent.policy.mode, own, False, why, claim.current))
        detail = {**(own.detail if own else {}), "fleet_replicas": self.budget, "wanted": claim.desired,
                  **({"own_reason": own.reason} if own else {})}
        action = Action(SET_FLOOR, agent.model, target, claim.current, why, detail,
                        urgent=bool(own and own.urgent and target > claim.current))
        return agent.carry_out(agent.guard.check(action, now))

    # -- the loop ---------------------------------------------------------------------------------
    def run(self, stop: threading.Event, *, clock: Callable[[], float] = time.time, rounds: int | None = None,
            on_round: Callable[[FleetRound], None] | None = None) -> None:
        """Every model decides on its own ``agent.interval_seconds``; owning the count, its reactive guard
        looks every ``agent.guard_seconds``; the fleet ticks at the shortest of these. Until ``stop`` is
        set (or after ``rounds`` decision rounds)."""
        ticks_of = {m.name: self._tick(m.agent) for m in self.members}
        tick = min(ticks_of.values())
        every = {m.name: max(1, round(m.agent.settings.agent.interval_seconds / tick)) for m in self.members}
        window: dict[str, list[dict[str, float]]] = {m.name: [] for m in self.members}
        self._sample_all(clock())
        ticks = done = 0
        while not stop.wait(tick):
            now = clock()
            ticks += 1
            deciding = {n for n, k in every.items() if ticks % k == 0}
            got, failed = self._sample_all(now)
            samples: dict[str, dict[str, float] | None] = {}
            for name, sample in got.items():
                if sample:
                    window[name].append(sample)
                if name in deciding:
                    samples[name], window[name] = merge_samples(window[name]), []
                else:
                    samples[name] = sample
            result = self.round(now, samples, deciding=deciding, failed=failed)
            if on_round:
                on_round(result)
            done += bool(deciding)
            if rounds is not None and done >= rounds:
                break

    @staticmethod
    def _tick(agent: ServingAgent) -> float:
        a = agent.settings.agent
        return min(a.guard_seconds, a.interval_seconds) if agent.owns else a.interval_seconds

    def _sample_all(self, now: float) -> tuple[dict[str, dict[str, float] | None], dict[str, str]]:
        got: dict[str, dict[str, float] | None] = {}
        failed: dict[str, str] = {}
        for m in self.members:
            if m.sampler is None:
                got[m.name] = None
                continue
            try:
                got[m.name] = m.sampler.sample(now)
            except Exception as exc:  # one model's metrics never stop the others
                failed[m.name] = f"metrics unreadable: {_why(exc)}"
        return got, failed

    def hand_back(self, now: float) -> dict[str, dict[str, Any] | str]:
        """Each model's agent hands its count back (see :meth:`ServingAgent.hand_back`); a failure is that
        model's line."""
        out: dict[str, dict[str, Any] | str] = {}
        for m in self.members:
            try:
                rec = m.agent.hand_back(now)
            except Exception as exc:
                out[m.name] = _why(exc)
                continue
            if rec is not None:
                out[m.name] = rec
        return out


def _holds(rec: dict[str, Any], current: int) -> int:
    """The replicas a model holds after a replica decision was carried out (or not)."""
    if rec.get("applied") is not None and not rec.get("error") and (rec["allowed"] or rec["mode"] == "observe"):
        return int(rec["applied"])
    return current


def _why(exc: BaseException) -> str:
    """One line for a model's failure: a driftloop error says what it is; anything else also names its type."""
    return str(exc) if isinstance(exc, DriftloopError) else f"{type(exc).__name__}: {exc}"
