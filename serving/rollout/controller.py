"""The rollout controller: Flagger-style canary analysis aimed at the local gateway or an InferenceService.

Each interval the controller reads the canary's and the primary's numbers over the window since the
last weight change (or the last failed analysis), and the labelled requests logged since the canary
steps began, each scored by both versions (:mod:`serving.rollout.paired`); it runs the checks
(:func:`~serving.rollout.analysis.evaluate_checks`) and acts on what they come to
(:func:`~serving.rollout.analysis.judge`), by the rule docs/rollouts.md states:

* **pass** — the weight moves one step up (``step_weights`` or multiples of ``step_weight`` up to
  ``max_weight``); after the last step the canary is promoted (MLflow alias ``champion``, 100 %
  traffic), or waits for a manual approval;
* **fail** — a hard limit broken, quality worse than the champion, or (labels missing) answers
  unlike the champion's: ``threshold`` failed analyses in a row roll back (0 %, ``champion``
  unchanged, the version tagged with the reason); a failed analysis restarts the window, so the
  next one judges fresh requests, and any analysis that judged the canary without a failure ends
  the row;
* **hold** — the labels decide and are inconclusive: the weight stays and more labelled requests
  are awaited; ``max_holds`` holds at one weight roll back (not shown to be within the margin);
* **wait** — too few requests reached the canary: nothing is judged.

An interval whose numbers cannot be read (the target refuses or is unreachable, the monitor holding
the labels or the registry holding the versions is down) is recorded as ``unavailable`` and counts as
nothing.

Every step (time, weight, each check's number and verdict, decision, reason) is appended to
the state in ``<workspace>/rollout/<model>/state.json`` (written atomically, so the
controller resumes after a restart) and ``history.jsonl``; the outcome goes to MLflow tags
on the canary version and the history to an artifact on its run.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict
from datetime import datetime, timezone
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from driftloop.core.errors import RolloutAborted, ServingError
from serving.rollout.analysis import (FAIL, HOLD, WAIT, Check, evaluate_checks, judge, quality_check, shadow_checks,
                                      weight_schedule)
from serving.rollout.paired import Pairing, RegistryScorer, Scorer, compare_versions
from serving.rollout.state import (AWAITING_APPROVAL, PENDING, PROGRESSING, PROMOTED, ROLLED_BACK, SHADOW, RolloutState,
                                   RolloutStore)
from serving.rollout.targets import RolloutTarget

if TYPE_CHECKING:
    from driftloop.core.config import Settings

__all__ = ["RolloutController", "HISTORY_ARTIFACT", "WEIGHT_TAG"]

log = logging.getLogger(__name__)

WEIGHT_TAG = "driftloop.rollout.weight"
HISTORY_ARTIFACT = "rollout/history.json"
_CHAMPION_SAMPLE = 4_000  # the champion's latest answers the output-PSI guard reads


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, tz=timezone.utc).isoformat(timespec="seconds")


class RolloutController:
    """Drives one canary rollout step by step; state survives restarts."""

    def __init__(self, settings: Settings, target: RolloutTarget, registry: Any | None = None, *,
                 model_name: str | None = None, scorer: Scorer | None = None, preload: bool = False) -> None:
        """``scorer``: how both versions answer the labelled requests (default: each version loaded from
        the MLflow registry, :class:`~serving.rollout.paired.RegistryScorer`). ``preload``: load both versions
        in the background as soon as a rollout with a champion is seen, so the first analysis with enough
        labels does not stop for it (``driftloop rollout run``, a process of its own; the gateway's own
        controller loads them when they are needed, off its request path's interpreter time until then)."""
        self.settings = settings
        self.cfg = settings.rollout
        self.target = target
        self.registry = registry
        self.model_name = model_name or settings.mlflow.model_name
        self.store = RolloutStore(settings.workspace_dir / "rollout", self.model_name)
        self.schedule = weight_schedule(self.cfg)
        self._scorer = scorer
        self._preload = preload
        self._preloaded: tuple[str, str] | None = None

    # -- lifecycle ------------------------------------------------------------------
    @classmethod
    def begin(cls, settings: Settings, *, canary_version: str, primary_version: str | None, canary_uri: str = "",
              model_name: str | None = None) -> RolloutState:
        """Record a new pending rollout (the deploy step calls this); a finished one is replaced."""
        name = model_name or settings.mlflow.model_name
        store = RolloutStore(settings.workspace_dir / "rollout", name)
        current = store.load()
        if current is not None and not current.done and current.canary_version != str(canary_version):
            log.warning("replacing unfinished rollout of %s v%s with v%s", name, current.canary_version, canary_version)
        state = RolloutState(model_name=name, canary_version=str(canary_version),
                             primary_version=str(primary_version) if primary_version else None, canary_uri=canary_uri)
        store.save(state, {"time": _iso(time.time()), "decision": "pending", "canary": state.canary_version,
                           "primary": state.primary_version})
        return state

    def state(self) -> RolloutState:
        state = self.store.load()
        if state is None or state.done:
            adopted = self.adopt_pending(state)
            state = adopted or state
        if state is None:
            raise RolloutAborted(f"no rollout recorded for model {self.model_name!r} in {self.store.dir}")
        return state

    def adopt_pending(self, current: RolloutState | None = None) -> RolloutState | None:
        """Take over a canary that the deploy step marked pending in MLflow.

        On a cluster the deploy step runs in a pipeline pod and the controller in its own
        Deployment: they share MLflow, not a disk. The deploy step tags the canary version
        ``driftloop.rollout.outcome=pending``; a controller without an open rollout for it
        begins one (primary = the current champion).
        """
        from driftloop.core.registry import CHALLENGER, CHAMPION, TAG

        if self.registry is None:
            return None
        challenger = self.registry.version_by_alias(self.model_name, CHALLENGER)
        if challenger is None or challenger.tags.get(TAG.ROLLOUT) != PENDING:
            return None
        if current is not None and current.canary_version == challenger.version:
            return None  # this version's rollout already ran here
        champion = self.registry.version_by_alias(self.model_name, CHAMPION)
        if champion is not None and champion.version == challenger.version:
            return None
        log.info("adopting the pending canary %s v%s from MLflow", self.model_name, challenger.version)
        return type(self).begin(self.settings, canary_version=challenger.version,
                                primary_version=champion.version if champion else None,
                                canary_uri=f"models:/{self.model_name}/{challenger.version}", model_name=self.model_name)

    def _record(self, state: RolloutState, decision: str, reason: str, checks: list[Check] = (),
                **extra: Any) -> dict[str, Any]:
        now = time.time()
        rec = {"time": _iso(now), "ts": now, "weight": state.weight, "decision": decision, "reason": reason,
               "failed_checks": state.failed_checks, "checks": [asdict(c) for c in checks], **extra}
        state.history.append(rec)
        state.reason = reason
        self.store.save(state, rec)
        # debug only: the command driving the rollout prints each step once (``on_step`` of :meth:`run`)
        log.debug("rollout %s v%s: %s at %s%% — %s", state.model_name, state.canary_version, decision, state.weight,
                  reason)
        return rec

    # -- one interval -----------------------------------------------------------------
    def step(self) -> dict[str, Any]:
        """Run one analysis interval and act on it; returns the recorded step."""
        state = self.state()
        if state.done:
            return state.history[-1] if state.history else {"decision": state.status}
        self._warm(state)  # with ``preload``: both versions load while this and the next intervals run
        if state.status == PENDING and self.cfg.shadow_percent > 0 and not any(
                h.get("decision") == "shadow_pass" for h in state.history):
            if hasattr(self.target, "set_shadow"):
                return self._start_shadow(state)
            log.warning("rollout.shadow_percent is set but this serving target has no shadow; canary steps only")
        if state.status == SHADOW:
            rec = self._judge_shadow(state)
            if rec is not None:
                return rec
        if state.status == PENDING:
            state.step_index = 0
            state.weight = self.schedule[0]
            self.target.set_weight(state.weight)
            state.status = PROGRESSING
            state.window_start = state.quality_since = time.time()
            self._tag(state, {WEIGHT_TAG: str(state.weight)})
            return self._record(state, "start", f"canary v{state.canary_version} at {state.weight}%")
        if state.status == AWAITING_APPROVAL:
            if state.approved:
                return self._promote(state, "approved")
            return self._record(state, "await_approval", "analysis passed; waiting for manual approval")
        try:
            canary, primary = self.target.stats(state.window_start, state.canary_version, state.primary_version)
            pairing, note = self._pairing(state, canary, primary)
            labels_missing = quality_check(pairing, self.cfg, note).value is None  # then the PSI guard judges
            champion = (self.target.champion_predictions(state.primary_version, _CHAMPION_SAMPLE)
                        if state.primary_version and labels_missing else [])
        except ServingError as exc:
            # no numbers is not a failed check: the canary keeps its weight and is judged next interval
            return self._record(state, "unavailable", f"statistics unavailable, judged next interval: {exc}")
        checks = evaluate_checks(canary, primary, self.cfg, pairing=pairing, quality_note=note, champion=champion)
        outcome = judge(checks)
        if outcome == FAIL:
            state.failed_checks += 1
            state.window_start = time.time()  # the next analysis judges fresh requests
            failed = [c for c in checks if c.passed is False and c.name != "requests"]  # too few is no failure
            reason = "; ".join(f"{c.name}={_fmt(c.value)} breaks limit {_fmt(c.limit)}" for c in failed)
            if state.failed_checks >= self.cfg.threshold:
                return self._rollback(state, f"{state.failed_checks} failed analyses in a row: {reason}", checks)
            return self._record(state, "fail", f"failed analysis {state.failed_checks}/{self.cfg.threshold} in a row: "
                                f"{reason}", checks)
        if outcome == WAIT:
            return self._record(state, "wait", checks[0].detail, checks)
        state.failed_checks = 0  # judged, and nothing failed: the row of failed analyses ends
        if outcome == HOLD:
            state.holds += 1
            quality = next(c for c in checks if c.name == "quality_delta")
            if state.holds >= self.cfg.max_holds:
                return self._rollback(state, f"quality not shown within rollout.quality_margin after {state.holds} "
                                             f"inconclusive analyses: {quality.detail}", checks)
            return self._record(state, "hold", f"hold {state.holds}/{self.cfg.max_holds}: {quality.detail}", checks)
        if state.step_index + 1 < len(self.schedule):
            state.step_index += 1
            state.weight = self.schedule[state.step_index]
            state.holds = 0
            self.target.set_weight(state.weight)
            state.window_start = time.time()
            self._tag(state, {WEIGHT_TAG: str(state.weight)})
            return self._record(state, "advance", f"checks passed; canary weight -> {state.weight}%", checks)
        if self.cfg.manual_approval and not state.approved:
            state.status = AWAITING_APPROVAL
            return self._record(state, "await_approval", "analysis passed at max weight; waiting for manual approval",
                                checks)
        return self._promote(state, f"checks passed at {state.weight}%", checks)

    def _warm(self, state: RolloutState) -> None:
        """Start loading both versions of an open rollout with a champion (once a pair; ``preload``)."""
        if not self._preload or state.done or state.primary_version is None:
            return
        pair = (state.canary_version, state.primary_version)
        if pair == self._preloaded:
            return
        if self._scorer is None:
            self._scorer = RegistryScorer(self.model_name, self.settings.tracking_uri)
        if isinstance(self._scorer, RegistryScorer):
            self._scorer.preload(pair)
        self._preloaded = pair

    def _pairing(self, state: RolloutState, canary: dict[str, Any] | None, primary: dict[str, Any] | None
                 ) -> tuple[Pairing | None, str]:
        """The labelled requests since the canary steps began, scored by both versions; or None and why
        not (then the labels count as missing). Raises ``ServingError`` when labels exist but the monitor
        or the registry cannot be read: the interval is then unavailable."""
        if state.primary_version is None:
            return None, "no champion to compare with"
        since = state.quality_since or state.started_at
        try:
            rows = self.target.labelled_rows(since, self.settings.serving.name)
        except ServingError as exc:
            seen = [s.get("labels") for s in (canary, primary) if s is not None]
            if seen and not any(seen):  # the target's own count says no label came in this window
                return None, f"no labels reached the canary or the primary, and the monitor cannot be read: {exc}"
            raise
        if rows is None:
            return None, "no monitor holds this target's labelled requests"
        if len(rows) < max(self.cfg.min_labels, 1):  # not worth loading two models yet
            return Pairing(rows=len(rows)), ""
        if self._scorer is None:
            self._scorer = RegistryScorer(self.model_name, self.settings.tracking_uri)
        pairing = compare_versions(rows, self._scorer, candidate=state.canary_version, champion=state.primary_version,
                                   metric=self.settings.gate_metric, task=self.settings.model.task,
                                   confidence=self.cfg.confidence)
        return pairing, ""

    # -- shadow phase (serving.shadow mirrors, shadow_checks judges) ------------------
    def _start_shadow(self, state: RolloutState) -> dict[str, Any]:
        self.target.set_weight(0)
        self.target.set_shadow(self.cfg.shadow_percent, state)
        state.status, state.weight, state.window_start = SHADOW, 0, time.time()
        self._tag(state, {WEIGHT_TAG: "0", "driftloop.rollout.phase": SHADOW})
        return self._record(state, "shadow_start", f"candidate v{state.canary_version} gets a copy of "
                            f"{self.cfg.shadow_percent:g}% of requests; no user sees its answers",
                            shadow_percent=self.cfg.shadow_percent)

    def _judge_shadow(self, state: RolloutState) -> dict[str, Any] | None:
        """One interval of the shadow phase: a record to return, or None when it passed (canary starts)."""
        try:
            summary = self.target.shadow_stats(state.window_start, state.canary_version)
        except ServingError as exc:
            return self._record(state, "unavailable", f"shadow statistics unavailable, judged next interval: {exc}")
        checks = shadow_checks(summary, self.cfg)
        failed = [c for c in checks if c.passed is False and c.name != "shadow_requests"]
        if failed:
            reason = "; ".join(f"{c.name}={_fmt(c.value)} breaks limit {_fmt(c.limit)}" for c in failed)
            self.target.set_shadow(0)
            return self._rollback(state, f"shadow phase failed, no user request was served by it: {reason}", checks)
        elapsed = time.time() - state.window_start
        if not checks[0].passed or elapsed < self.cfg.shadow_seconds:
            why = checks[0].detail or f"{elapsed:.1f}s < rollout.shadow_seconds={self.cfg.shadow_seconds:g}"
            return self._record(state, "shadow_wait", why, checks)
        self.target.set_shadow(0)
        state.status = PENDING
        self._record(state, "shadow_pass", f"shadow phase passed on {summary.get('requests')} mirrored requests",
                     checks)
        return None

    def run(self, until_done: bool = True, max_steps: int | None = None,
            on_step: Callable[[dict[str, Any]], None] | None = None) -> RolloutState:
        """Step every ``interval_seconds`` until promoted/rolled back (or ``max_steps``); ``on_step`` gets each
        recorded step."""
        steps = 0
        while True:
            started = time.monotonic()
            rec = self.step()
            if on_step is not None:
                on_step(rec)
            steps += 1
            state = self.state()
            if state.done or (max_steps is not None and steps >= max_steps) or not until_done:
                return state
            if state.status == AWAITING_APPROVAL and not self.cfg.manual_approval:
                return state
            time.sleep(max(0.0, self.cfg.interval_seconds - (time.monotonic() - started)))

    # -- outcomes ---------------------------------------------------------------------
    def approve(self) -> RolloutState:
        state = self._open_state()
        state.approved = True
        self._record(state, "approved", "manual approval given")
        return state

    def _open_state(self) -> RolloutState:
        state = self.state()
        if state.done:
            raise RolloutAborted(f"rollout of v{state.canary_version} is already {state.status}")
        return state

    def promote(self, reason: str = "promoted by hand") -> dict[str, Any]:
        return self._promote(self._open_state(), reason)

    def rollback(self, reason: str = "rolled back by hand") -> dict[str, Any]:
        return self._rollback(self._open_state(), reason)

    def _promote(self, state: RolloutState, reason: str, checks: list[Check] = ()) -> dict[str, Any]:
        from driftloop.core.registry import CHAMPION

        if self.registry is not None:
            self.registry.set_alias(state.model_name, CHAMPION, state.canary_version)
        self.target.promote(state)
        return self._finish(state, PROMOTED, 100, "promote", reason, checks)

    def _rollback(self, state: RolloutState, reason: str, checks: list[Check] = ()) -> dict[str, Any]:
        self.target.rollback(state)
        return self._finish(state, ROLLED_BACK, 0, "rollback", reason, checks)

    def _finish(self, state: RolloutState, status: str, weight: int, decision: str, reason: str,
                checks: list[Check]) -> dict[str, Any]:
        from driftloop.core.registry import TAG

        state.status, state.weight = status, weight
        rec = self._record(state, decision, reason, checks)
        self._tag(state, {TAG.ROLLOUT: status, TAG.ROLLOUT_REASON: reason[:500], WEIGHT_TAG: str(weight)})
        self._log_history(state)
        return rec

    def _tag(self, state: RolloutState, tags: dict[str, str]) -> None:
        if self.registry is not None:
            self.registry.tag_version(state.model_name, state.canary_version, tags)

    def _log_history(self, state: RolloutState) -> None:
        """The step history as an artifact on the canary version's MLflow run."""
        if self.registry is None:
            return
        info = self.registry.get_version(state.model_name, state.canary_version)
        if not info.run_id:
            return
        with self.registry.translate_errors(f"cannot log the rollout history on run {info.run_id}"):
            self.registry.client.log_text(info.run_id, json.dumps(asdict(state), indent=1, default=str),
                                          HISTORY_ARTIFACT)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)
