"""One alert per episode, alerts attached to the run in flight, and a degraded champion never left in silence.

The alert store, the trigger and the episodes are real; the retraining run is a recording runner
and MLflow is what the rollout controller leaves there (versions and their rollout tags), read
through the same ``list_versions`` the monitor calls.
"""

from __future__ import annotations

import json

import pytest

from driftloop.core.registry import TAG, VersionInfo
from monitoring.alerts import Alert, AlertStore, drift_alert_id
from monitoring.episodes import EpisodeAlerts
from monitoring.metrics import MonitorMetrics
from monitoring.quality import quality_alert_id
from monitoring.trigger import Trigger
from tests.conftest import make_settings
from tests.test_trigger import Clock, RecordingRunner


class Versions:
    """The model's versions in MLflow as the rollout controller leaves them (``driftloop.rollout.outcome``)."""

    def __init__(self) -> None:
        self.tags: dict[str, dict[str, str]] = {}
        self.down = False

    def tag(self, version: str, outcome: str, reason: str = "") -> None:
        self.tags.setdefault(version, {}).update({TAG.ROLLOUT: outcome, TAG.ROLLOUT_REASON: reason})

    def list_versions(self, name: str) -> list[VersionInfo]:
        from driftloop.core.errors import RegistryError

        if self.down:
            raise RegistryError("cannot reach the MLflow tracking server at http://mlflow:5000")
        return [VersionInfo(name, v, None, "", (), dict(t)) for v, t in sorted(self.tags.items())]


class Loop:
    """A trigger, its store, metrics and the episodes of the monitor's drift and quality checks."""

    def __init__(self, tmp_path, *, hold: bool = True, **trigger_cfg) -> None:
        cfg = {"trigger.cooldown_seconds": 3600, "trigger.daily_budget": 10, "trigger.min_samples": 10,
               **{f"trigger.{k}": v for k, v in trigger_cfg.items()}}
        self.settings = make_settings(tmp_path / "ws", tmp_path / "none.parquet", **cfg)
        self.clock = Clock()
        self.metrics = MonitorMetrics()
        self.versions = Versions()
        self.runner = RecordingRunner(hold=hold)
        self.alerts = AlertStore.from_settings(self.settings)
        self.trigger = Trigger(self.settings, self.alerts, runner=self.runner, metrics=self.metrics, clock=self.clock,
                               registry=self.versions)
        self.drift = EpisodeAlerts(self.alerts, self.trigger, kind="drift", resolve_after=2, metrics=self.metrics)
        self.quality = EpisodeAlerts(self.alerts, self.trigger, kind="quality", resolve_after=2, metrics=self.metrics)
        self._n = 0

    def window(self, episodes: EpisodeAlerts, failed: bool, *, samples: int = 500) -> dict | None:
        """One complete window of a check, as the drift and quality checks hand it over: its verdict, then
        (failing) the episode's alert it counts on, or a new alert raised for it."""
        self._n += 1
        self.clock.now += 60
        step = episodes.verdict("churn", "1", failed=failed, window=f"rows:{self._n}", now=self.clock.now)
        if not failed:
            return None
        counted = episodes.counted(step, samples=samples, now=self.clock.now)
        if counted is not None:
            return counted
        source = "drift" if episodes.kind == "drift" else "quality"
        alert_id = (drift_alert_id("churn", "1", self._n, self._n + 1) if source == "drift"
                    else quality_alert_id("churn", "1", f"rows:{self._n}"))
        d = self.trigger.submit(Alert(alert_id, source, created=self.clock.now, samples=samples,
                                      details={"champion_version": "1"}))
        episodes.bind(step, alert_id)
        return {"id": alert_id, "decision": d.decision, "reason": d.reason}

    def finish(self, alert_id: str, version: str | None) -> None:
        """Let the held run end (registering ``version``, or nothing) and wait for it."""
        self.runner.release.set()
        self.trigger.wait(alert_id, timeout=30)
        self.runner.release.clear()
        if version is None:
            self.alerts.update(alert_id, model_version=None, outcome_reason="gate rejected: accuracy 0.70 < 0.78")
        else:
            self.alerts.update(alert_id, model_version=version)

    def gauge(self) -> float:
        return self.metrics.needs_attention.labels(model="churn")._value.get()


@pytest.fixture
def loop(tmp_path):
    made = []

    def make(**kw) -> Loop:
        made.append(Loop(tmp_path / str(len(made)), **kw))
        return made[-1]

    yield make
    for one in made:
        one.alerts.close()


def test_a_drift_storm_is_one_alert_and_one_run(loop):
    """14 drifted windows in a few minutes: one alert, one run; each later window is counted on that alert."""
    lp = loop(**{"cooldown_seconds": 0})
    first = lp.window(lp.drift, True)
    assert first["decision"] == "started"
    later = [lp.window(lp.drift, True) for _ in range(13)]
    assert {e["id"] for e in later} == {first["id"]} and {e["decision"] for e in later} == {"counted"}
    assert later[-1]["episode_windows"] == 14 and len(lp.runner.requests) == 1
    assert [a["id"] for a in lp.alerts.recent(50)] == [first["id"]]
    listed = lp.alerts.recent(1)[0]
    assert listed["episode_windows"] == 14 and listed["episode_closed"] is None
    decisions = [d["decision"] for d in lp.alerts.decisions(first["id"])]
    assert decisions == ["started"] + ["counted"] * 13  # each window is on the record, none judged again
    assert lp.metrics.open_episodes.labels(kind="drift")._value.get() == 1.0


def test_an_episode_ends_after_passing_windows_in_a_row_and_the_next_drift_is_a_new_alert(loop):
    lp = loop(**{"cooldown_seconds": 0}, hold=False)
    first = lp.window(lp.drift, True)
    lp.trigger.wait(first["id"], timeout=30)
    lp.window(lp.drift, False)
    assert lp.window(lp.drift, True)["id"] == first["id"]  # one pass, then drift again: the same episode
    lp.window(lp.drift, False)
    lp.window(lp.drift, False)  # resolve_after=2 passing windows in a row: the episode ends
    episode = lp.alerts.episode_of_alert(first["id"])
    assert episode.closed is not None and episode.close_reason == "2 complete window(s) in a row passed"
    assert episode.failing == 2 and lp.metrics.open_episodes.labels(kind="drift")._value.get() == 0.0
    second = lp.window(lp.drift, True)
    assert second["id"] != first["id"] and second["decision"] == "started"


def test_a_window_counts_once_and_a_new_champion_ends_the_old_ones_episode(tmp_path):
    store = AlertStore(tmp_path / "alerts.db")
    try:
        step = store.record_verdict("m", "drift", "1", failed=True, window="tumbling:0-500", now=1.0, resolve_after=3)
        again = store.record_verdict("m", "drift", "1", failed=True, window="tumbling:0-500", now=2.0, resolve_after=3)
        assert step.opened and not again.counted and again.episode.failing == 1
        newer = store.record_verdict("m", "drift", "2", failed=False, window="tumbling:500-1000", now=3.0,
                                     resolve_after=3)
        assert newer.episode is None and store.open_episode("m", "drift") is None
        assert store.episode(step.episode.seq).close_reason == "v2 is the champion now"
        store.record_verdict("m", "quality", "2", failed=True, window="rows:0", now=4.0, resolve_after=3)
        assert [e.version for e in store.close_superseded("m", "3", now=5.0)] == ["2"]
    finally:
        store.close()


def test_a_held_alert_is_judged_again_by_the_next_failing_window(loop):
    lp = loop(**{"cooldown_seconds": 600}, hold=False)
    lp.trigger.submit(Alert("drift-earlier", "drift", samples=500))  # a run started a moment ago
    lp.trigger.wait("drift-earlier", timeout=30)
    held = lp.window(lp.quality, True)
    assert held["decision"] == "cooldown"
    lp.clock.now += 600
    now_started = lp.window(lp.quality, True)
    assert (now_started["id"], now_started["decision"]) == (held["id"], "started")
    assert "failing window 2 of the quality episode" in now_started["reason"]
    assert [d["decision"] for d in lp.alerts.decisions(held["id"])] == ["cooldown", "counted", "started"]


def test_a_quality_alert_during_the_drift_run_is_attached_and_acted_on_after_the_rollback(loop, monkeypatch):
    """The issue's case: a quality alert 30 ms after a drift alert waited behind the drift run and was never
    acted on. Now it is attached to that run, which stays in flight until its canary's rollout ends; the
    rollback raises needs-attention and the attached alert starts the next run at once, cooldown or not."""
    lp = loop()
    drift = lp.window(lp.drift, True)
    assert drift["decision"] == "started"
    lp.clock.now += 0.03
    quality = lp.window(lp.quality, True)
    assert quality["decision"] == "attached" and drift["id"] in quality["reason"]
    lp.finish(drift["id"], "2")
    lp.versions.tag("2", "pending", "canary at 20 %")
    lp.trigger.follow()
    assert lp.alerts.get(drift["id"])["outcome"] is None  # the run ended, its rollout did not: still in flight
    assert lp.window(lp.quality, True)["decision"] == "counted" and len(lp.runner.requests) == 1

    lp.versions.tag("2", "rolled_back", "canary quality worse than the champion")
    lp.clock.now += 30
    ended = lp.trigger.follow()
    assert [(o.alert["id"], o.outcome) for o in ended] == [(drift["id"], "rolled_back")]
    assert lp.alerts.get(drift["id"])["outcome_reason"] == "v2 was rolled back: canary quality worse than the champion"
    rec = lp.alerts.get(quality["id"])
    assert rec["decision"] == "started", rec["reason"]  # 30 s after the last start: no cooldown after a rollback
    assert [d["decision"] for d in lp.alerts.decisions(quality["id"])] == ["attached", "counted", "started"]
    assert [r.trigger for r in lp.runner.requests] == [f"drift:{drift['id']}", f"quality:{quality['id']}"]

    attention = [a for a in lp.alerts.recent(50) if a["source"] == "needs-attention"]
    assert len(attention) == 1 and attention[0]["decision"] == "notify" and lp.gauge() == 1.0
    reason = attention[0]["reason"]
    assert f"retraining run of alert {drift['id']} was rolled back" in reason and "champion v1" in reason
    assert "quality since" in reason and "drift since" in reason and "at once" in reason
    assert attention[0]["details"]["runs"][0]["outcome"] == "rolled_back"


def test_needs_attention_is_one_per_degraded_spell_and_resolved_when_the_champion_recovers(loop):
    lp = loop(**{"cooldown_seconds": 0})
    first = lp.window(lp.quality, True)
    lp.finish(first["id"], "2")
    lp.versions.tag("2", "rolled_back", "worse than the champion")
    lp.trigger.follow()
    second = lp.window(lp.quality, True)  # its run has an outcome: the still-open episode raises a new attempt
    assert second["id"] != first["id"] and second["decision"] == "started"
    lp.finish(second["id"], None)  # the gate rejected this one: nothing registered
    lp.trigger.follow()
    [attention] = [a for a in lp.alerts.recent(50) if a["source"] == "needs-attention"]
    assert [r["outcome"] for r in attention["details"]["runs"]] == ["rolled_back", "not_registered"]
    assert "registered no model version (gate rejected: accuracy 0.70 < 0.78)" in attention["reason"]
    assert lp.gauge() == 1.0
    lp.window(lp.quality, False)
    lp.window(lp.quality, False)  # the champion's windows pass again: the spell is over
    lp.trigger.follow()
    resolved = lp.alerts.get(attention["id"])
    assert resolved["decision"] == "resolved" and resolved["resolved"] is not None and lp.gauge() == 0.0
    assert "2 complete window(s) in a row passed" in resolved["reason"]


def test_an_alert_attached_to_a_run_whose_follow_up_was_missed_is_judged_by_its_next_window(loop):
    """The monitor was down longer than trigger.rollout_wait_seconds: the run it waited for ended unobserved.
    The attached alert is not stranded: its episode's next failing window judges it again."""
    lp = loop(**{"cooldown_seconds": 0})
    drift = lp.window(lp.drift, True)
    quality = lp.window(lp.quality, True)
    assert quality["decision"] == "attached"
    lp.finish(drift["id"], None)
    lp.alerts.update(drift["id"], followed=lp.clock.now, outcome="not_registered")  # as if followed elsewhere
    assert lp.trigger.follow() == [] and lp.alerts.get(quality["id"])["decision"] == "attached"
    nxt = lp.window(lp.quality, True)
    assert (nxt["id"], nxt["decision"]) == (quality["id"], "started")


def test_a_promoted_canary_supersedes_what_waited_and_the_cooldown_still_holds(loop):
    lp = loop()
    drift = lp.window(lp.drift, True)
    quality = lp.window(lp.quality, True)
    lp.finish(drift["id"], "2")
    lp.versions.tag("2", "promoted", "all steps passed")
    lp.trigger.follow()
    rec = lp.alerts.get(quality["id"])
    assert rec["decision"] == "superseded" and "was promoted (v2 is the champion: all steps passed)" in rec["reason"]
    assert not [a for a in lp.alerts.recent(50) if a["source"] == "needs-attention"] and lp.gauge() == 0.0
    later = lp.trigger.submit(Alert("drift-later", "drift", samples=500))
    assert later.decision == "cooldown" and len(lp.runner.requests) == 1


def test_without_a_rollout_outcome_the_trigger_stops_waiting_after_rollout_wait_seconds(loop):
    lp = loop(**{"rollout_wait_seconds": 600})
    drift = lp.window(lp.drift, True)
    lp.finish(drift["id"], "2")
    lp.versions.tag("2", "pending")
    lp.versions.down = True  # MLflow unreachable meanwhile: the run stays in flight, no second run starts
    assert lp.trigger.submit(Alert("am-1", "alertmanager", samples=500)).decision == "in_flight"
    lp.versions.down = False
    lp.clock.now += 601
    [ended] = lp.trigger.follow()
    assert ended.outcome == "no_rollout" and "is the rollout controller running?" in ended.reason
    [attention] = [a for a in lp.alerts.recent(50) if a["source"] == "needs-attention"]
    assert "was not rolled out" in attention["reason"]


def test_alerts_command_shows_needs_attention(loop, monkeypatch):
    from typer.testing import CliRunner

    from driftloop.app.cli import app

    lp = loop()
    drift = lp.window(lp.drift, True)
    lp.finish(drift["id"], "2")
    lp.versions.tag("2", "rolled_back", "errors above 5 %")
    lp.trigger.follow()
    for key, value in {"WORKSPACE": str(lp.settings.workspace_dir), "MLFLOW__MODEL_NAME": "churn",
                       "MLFLOW__EXPERIMENT": "test"}.items():
        monkeypatch.setenv(f"DRIFTLOOP_{key}", value)
    listed = json.loads(CliRunner().invoke(app, ["alerts", "--json"]).output)["alerts"]
    [attention] = [a for a in listed if a["source"] == "needs-attention"]
    assert attention["decision"] == "notify" and "was rolled back (v2 was rolled back: errors above 5 %)" in \
        attention["reason"]
    shown = CliRunner().invoke(app, ["alerts"], terminal_width=120)
    assert shown.exit_code == 0, shown.output
    assert "needs attention" in shown.output and "notify" in shown.output
