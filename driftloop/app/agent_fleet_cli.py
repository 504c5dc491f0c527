"""``driftloop agent run -c FLEET``: one agent for every model of a fleet, sharing ``fleet.replicas``.

Each model is wired as ``driftloop agent run --model NAME`` wires it (its actuator, its traffic source,
its policy and decision log); :class:`serving.agent.fleet.FleetAgent` runs their rounds together and
shares the budget. A model that cannot be wired (a cluster model without a traffic source) is named
on its own line and left out; the others are scaled.
"""

from __future__ import annotations

import threading
import time
from typing import Any, Callable

from rich.markup import escape

from driftloop.core.console import console, err_console
from driftloop.core.errors import DriftloopError
from driftloop.core.fleet import Fleet

__all__ = ["run_fleet", "fleet_members"]


def fleet_members(fleet: Fleet, mode: str | None, cluster: bool | None, wire: Callable[..., tuple[Any, Any, str, bool]]
                  ) -> list[Any]:
    """Every model of ``fleet`` as a :class:`~serving.agent.fleet.Member` (``wire``: settings, mode, cluster
    -> actuator, sampler, where, on_cluster); one line per model, and one for each that cannot be wired."""
    from serving.agent.agent import ServingAgent, agent_paths
    from serving.agent.fleet import Member

    members = []
    for m in fleet.models:
        try:
            actuator, sampler, where, _ = wire(m.settings, mode, cluster)
            agent = ServingAgent(m.settings, actuator, mode=mode)
        except DriftloopError as exc:
            err_console.print(f"[red]{escape(m.name)}: not scaled: {escape(str(exc))}[/]")
            continue
        lo, hi = agent.policy.bounds(agent.model)
        console.print(f"· {escape(m.name)}: {agent.policy.mode} mode, {lo}..{hi} replicas, on {where}; decisions -> "
                      f"{agent_paths(m.settings)['decisions']}")
        members.append(Member(m.name, agent, sampler))
    return members


def run_fleet(fleet: Fleet, mode: str | None, cluster: bool | None, rounds: int | None,
              wire: Callable[..., tuple[Any, Any, str, bool]], stop: threading.Event,
              show: Callable[[dict[str, Any], str], None]) -> None:
    """Scale every model of ``fleet`` until ``stop`` is set (or after ``rounds`` decision rounds); stopped,
    each model's count is handed back as ``agent run`` does for one."""
    from serving.agent.fleet import FleetAgent, FleetRound

    budget = fleet.limits.replicas
    share = f"sharing fleet.replicas {budget}" if budget is not None else "no fleet.replicas budget (each model " \
                                                                           "inside its own policy)"
    console.print(f"[bold]driftloop agent[/] for the fleet {fleet.source}: {len(fleet.models)} models, {share}")
    members = fleet_members(fleet, mode, cluster, wire)
    if not members:
        raise DriftloopError(f"no model of {fleet.source} can be scaled (see the lines above)")

    def on_round(result: FleetRound) -> None:
        for name, records in result.records.items():
            for rec in records:
                show(rec, name)

    agent = FleetAgent(members, budget)
    agent.run(stop, rounds=rounds, on_round=on_round if rounds is not None else None)
    if stop.is_set():  # stopped (SIGTERM/Ctrl-C): no count is left pinned
        for name, rec in agent.hand_back(time.time()).items():
            line = rec if isinstance(rec, str) else f"{rec['reason']}: {rec.get('result') or rec.get('error', '')}"
            console.print(f"{escape(name)}: {escape(line)}")
