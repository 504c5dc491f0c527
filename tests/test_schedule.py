"""Schedules on both homes: KFP recurring runs (what kfp.Client is sent) and the local scheduler."""

import json
import subprocess
import sys
import threading
from datetime import datetime, timedelta, timezone

import pytest

from driftloop.core.errors import PipelineRunError, ScheduleError
from pipelines.runner import RunResult
from pipelines.schedule import KfpSchedules, LocalSchedules, Schedule, kfp_cron, normalize_cron, schedule_backend
from pipelines.scheduler import Scheduler, SlotPlan, plan_slots
from pipelines.training import pipeline_arguments
from tests.conftest import free_port, make_settings
from tests.kfp_recording import RecordingKfpClient

T0 = datetime(2026, 1, 10, 0, 0, tzinfo=timezone.utc)
CLUSTER = {"kfp.host": "http://kfp.example:8888", "mlflow.tracking_uri": "http://mlflow.example:5000"}


# --- the schedule model ------------------------------------------------------------------

def test_cron_is_standard_five_field_and_gains_a_seconds_field_for_kfp():
    assert normalize_cron("  */15   2 * * 1-5 ") == "*/15 2 * * 1-5"
    assert kfp_cron("*/15 2 * * 1-5") == "0 */15 2 * * 1-5"
    assert kfp_cron("@daily") == "0 0 0 * * *"


@pytest.mark.parametrize("expr, why", [("61 * * * *", "out of range"), ("every day", "expected 5 fields"),
                                       ("0 0 0 * * *", "expected 5 fields"), ("", "expected 5 fields")])
def test_an_invalid_cron_is_named_in_the_error(expr, why):
    with pytest.raises(ScheduleError, match=why) as info:
        Schedule("nightly", expr)
    assert repr(expr) in str(info.value)


def test_schedule_names_are_checked():
    with pytest.raises(ScheduleError, match="schedule name 'Nightly run'"):
        Schedule("Nightly run", "0 3 * * *")


def test_the_window_is_the_last_days_before_the_slot():
    s = Schedule("w", "0 3 * * *", window_days=7)
    assert s.window(datetime(2026, 1, 10, 3, 0, tzinfo=timezone.utc)) == ("2026-01-03T03:00:00+00:00",
                                                                         "2026-01-10T03:00:00+00:00")
    assert Schedule("all", "0 3 * * *").window(T0) == (None, None)


# --- KFP recurring runs --------------------------------------------------------------------

@pytest.fixture
def kfp(tmp_path, scenario_path):
    settings = make_settings(tmp_path / "ws", scenario_path, **CLUSTER)
    client = RecordingKfpClient()
    return settings, client, KfpSchedules(settings, client=client)


def _created(client):
    return client.of("create_recurring_run")


def _nightly_with_a_run(client, backend, state):
    """Create schedule "nightly", give its recurring run one run in ``state``, forget the calls so far."""
    backend.create(Schedule("nightly", "0 3 * * *"))
    (job_id,) = client.recurring
    run = client.add_run(job_id, state)
    client.calls.clear()
    return job_id, run


def test_kfp_create_sends_a_recurring_run_of_the_uploaded_version(kfp):
    settings, client, backend = kfp
    backend.create(Schedule("nightly", "30 2 * * *", {"model.params.max_iter": "20"}, max_concurrency=2,
                            catchup=False))

    (sent,) = _created(client)
    pipeline_id = client.pipelines["driftloop-train"].pipeline_id
    version = client.versions[pipeline_id][-1]
    assert sent["job_name"] == "nightly-v1"
    assert sent["cron_expression"] == "0 30 2 * * *"
    assert sent["max_concurrency"] == 2 and sent["no_catchup"] is True and sent["enabled"] is True
    assert sent["pipeline_id"] == pipeline_id and sent["version_id"] == version.pipeline_version_id
    assert sent["experiment_id"] == client.experiments["driftloop"].experiment_id
    assert sent["pipeline_package_path"] is None
    tuned = make_settings(settings.workspace, settings.data.source, **CLUSTER, **{"model.params": {"max_iter": 20}})
    # an empty request id: each run's register step uses its own KFP run id
    assert sent["params"] == {**pipeline_arguments(tuned, trigger="schedule:nightly"), "request_id": ""}
    assert sent["params"]["learner_params"] == {"max_iter": 20}
    assert json.loads(sent["description"])["driftloop.schedule"]["generation"] == 1


def test_kfp_schedules_are_read_back_from_kfp_itself(kfp):
    settings, client, backend = kfp
    backend.create(Schedule("nightly", "0 3 * * *", {"data.seed": "5"}, catchup=False))

    client.calls.clear()
    (status,) = KfpSchedules(settings, client=client).list()  # another machine: all it knows is in KFP

    experiment_id = client.experiments["driftloop"].experiment_id
    assert client.names()[:2] == ["get_experiment", "list_recurring_runs"]
    assert client.of("list_recurring_runs")[0]["experiment_id"] == experiment_id
    assert not client.of("create_experiment") and not client.of("delete_recurring_run")

    assert status.schedule == Schedule("nightly", "0 3 * * *", {"data.seed": "5"}, catchup=False)
    assert status.state == "active" and status.ident == next(iter(client.recurring))
    assert status.next_run is not None and status.next_run.hour == 3


def test_kfp_name_clash_is_refused_before_anything_is_created(kfp):
    _, client, backend = kfp
    backend.create(Schedule("nightly", "0 3 * * *"))
    with pytest.raises(ScheduleError, match="'nightly' already exists"):
        backend.create(Schedule("nightly", "0 4 * * *"))
    assert len(_created(client)) == 1


def test_kfp_update_creates_the_new_generation_first_and_keeps_runs_in_flight(kfp):
    _, client, backend = kfp
    old_id, run = _nightly_with_a_run(client, backend, "RUNNING")

    backend.update("nightly", cron="0 5 * * *", max_concurrency=3)

    writes = [(n, a) for n, a in client.calls if n in ("create_recurring_run", "disable_recurring_run",
                                                       "delete_recurring_run")]
    assert [n for n, _ in writes] == ["create_recurring_run", "disable_recurring_run"]
    assert writes[0][1]["job_name"] == "nightly-v2" and writes[0][1]["cron_expression"] == "0 0 5 * * *"
    assert writes[0][1]["max_concurrency"] == 3
    assert writes[1][1]["recurring_run_id"] == old_id
    assert old_id in client.recurring  # not deleted: a run of it is in flight
    listed = client.of("list_runs")[-1]
    assert json.loads(listed["filter"])["predicates"][0] == {"operation": 1, "key": "recurring_run_id",
                                                             "stringValue": old_id}

    (status,) = backend.list()
    assert status.schedule.cron == "0 5 * * *" and status.state == "active"
    assert "nightly-v1 (1 run in flight)" in status.note

    run.state = "SUCCEEDED"
    client.calls.clear()
    (status,) = backend.list()
    assert client.of("delete_recurring_run") == [{"recurring_run_id": old_id}]
    assert "retiring" not in status.note and list(client.recurring) != [old_id]


def test_kfp_update_without_runs_replaces_the_old_generation_in_order(kfp):
    _, client, backend = kfp
    old_id, _ = _nightly_with_a_run(client, backend, "SUCCEEDED")

    backend.update("nightly", paused=True)

    order = [(n, a.get("recurring_run_id") or a.get("job_name")) for n, a in client.calls
             if n in ("create_recurring_run", "disable_recurring_run", "delete_recurring_run")]
    assert order == [("create_recurring_run", "nightly-v2"), ("disable_recurring_run", old_id),
                     ("delete_recurring_run", old_id)]
    assert _created(client)[-1]["enabled"] is False
    (status,) = backend.list()
    assert status.state == "paused" and status.next_run is None


def test_kfp_delete_waits_for_runs_in_flight_then_the_name_is_free(kfp):
    _, client, backend = kfp
    job_id, run = _nightly_with_a_run(client, backend, "PENDING")

    backend.delete("nightly")

    assert client.of("disable_recurring_run") == [{"recurring_run_id": job_id}]
    assert not client.of("delete_recurring_run")
    tomb = _created(client)[-1]
    assert tomb["enabled"] is False and json.loads(tomb["description"])["driftloop.schedule"]["deleted"] is True
    assert [s.state for s in backend.list()] == ["deleting"]

    run.state = "CANCELED"
    assert backend.list() == []
    assert client.recurring == {}
    backend.create(Schedule("nightly", "0 6 * * *"))
    assert _created(client)[-1]["job_name"] == "nightly-v1"  # nothing of the old one is left


def test_kfp_unknown_schedule_and_window_days_are_clear_errors(kfp):
    _, client, backend = kfp
    with pytest.raises(ScheduleError, match="no schedule named 'ghost'"):
        backend.update("ghost", cron="0 1 * * *")
    with pytest.raises(ScheduleError, match="window-days"):
        backend.create(Schedule("windowed", "0 1 * * *", window_days=7))
    assert not _created(client)


def test_kfp_schedules_on_an_unreachable_host_name_the_host(tmp_path, scenario_path):
    host = f"http://127.0.0.1:{free_port()}"
    backend = schedule_backend(make_settings(tmp_path / "ws", scenario_path, **{"kfp.host": host}))
    assert isinstance(backend, KfpSchedules)
    with pytest.raises(PipelineRunError, match=host):
        backend.list()


# --- embedded default: store ------------------------------------------------------------------

@pytest.fixture
def local(tmp_path, scenario_path):
    settings = make_settings(tmp_path / "ws", scenario_path)
    return settings, LocalSchedules.from_settings(settings)


def test_local_schedules_persist_and_names_are_unique(local):
    settings, store = local
    s = Schedule("nightly", "0 3 * * *", {"data.seed": "3"}, window_days=14, max_concurrency=2, catchup=False)
    store.create(s, now=T0)

    reopened = LocalSchedules.from_settings(settings)
    assert reopened.get("nightly") == (s, T0)
    with pytest.raises(ScheduleError, match="'nightly' already exists"):
        reopened.create(Schedule("nightly", "0 4 * * *"))
    reopened.update("nightly", now=T0 + timedelta(hours=1), cron="0 5 * * *")
    assert LocalSchedules.from_settings(settings).get("nightly") == (
        Schedule("nightly", "0 5 * * *", {"data.seed": "3"}, 14, 2, False), T0 + timedelta(hours=1))
    reopened.delete("nightly")
    assert store.list() == []
    with pytest.raises(ScheduleError, match="no schedule named 'nightly'"):
        store.delete("nightly")


def test_plan_slots_catch_up_policy():
    start, now = T0, T0 + timedelta(hours=5, minutes=30)
    hourly = [T0 + timedelta(hours=h) for h in range(1, 6)]
    assert plan_slots("0 * * * *", start, now, catchup=True, grace_seconds=60) == \
        plan_slots("0 * * * *", start, now, catchup=True, grace_seconds=0)
    caught = plan_slots("0 * * * *", start, now, catchup=True, grace_seconds=60)
    assert caught.run == hourly[-1] and caught.skipped == tuple(hourly[:-1])
    late = plan_slots("0 * * * *", start, now, catchup=False, grace_seconds=60)
    assert late.run is None and late.skipped == tuple(hourly)
    on_time = plan_slots("0 * * * *", start, hourly[-1] + timedelta(seconds=30), catchup=False, grace_seconds=60)
    assert on_time.run == hourly[-1] and on_time.skipped == tuple(hourly[:-1])
    assert plan_slots("0 * * * *", start, T0 + timedelta(minutes=59), catchup=True, grace_seconds=60).run is None
    just_before = T0 + timedelta(hours=1) - timedelta(milliseconds=500)
    assert plan_slots("0 * * * *", start, just_before, catchup=True, grace_seconds=60) == SlotPlan(None, ())
    assert plan_slots("0 * * * *", start, T0 + timedelta(hours=1), catchup=False, grace_seconds=0).run == hourly[0]


# --- embedded default: scheduler ----------------------------------------------------------------

class Clock:
    def __init__(self, now):
        self.now = now

    def __call__(self):
        return self.now


class RecordingRunner:
    """Stands in for the runner adapter: records each RunRequest and the settings it was built with."""

    def __init__(self, during=None, state="SUCCEEDED"):
        self.requests, self.settings, self.during, self.state = [], [], during, state

    def factory(self, settings):
        self.settings.append(settings)
        return self

    def run_training(self, request, *, wait=True):
        self.requests.append(request)
        if self.during:
            self.during(request)
        return RunResult(request.request_id, f"run-{len(self.requests)}", self.state, "local",
                         error="step 'ingest' failed: empty window" if self.state == "FAILED" else None)


def _scheduler(settings, store, runner, clock):
    return Scheduler(settings, store, runner_factory=runner.factory, clock=clock)


def test_a_due_slot_runs_once_with_its_trigger_window_and_overrides(local):
    settings, store = local
    store.create(Schedule("nightly", "0 3 * * *", {"model.params.max_iter": "7"}, window_days=7), now=T0)
    runner, clock = RecordingRunner(), Clock(T0 + timedelta(hours=2))
    sched = _scheduler(settings, store, runner, clock)

    assert sched.tick() == [] and runner.requests == []  # not due yet
    clock.now = T0 + timedelta(hours=3, seconds=20)
    (outcome,) = sched.tick()
    assert sched.tick() == []  # same slot, no second run

    (req,) = runner.requests
    assert req.trigger == "schedule:nightly"
    assert (req.window_start, req.window_end) == ("2026-01-03T03:00:00+00:00", "2026-01-10T03:00:00+00:00")
    assert runner.settings[0].model.params == {"max_iter": 7}
    assert outcome.state == "done" and outcome.run_id == "run-1"
    (slot,) = store.slots("nightly")
    assert (slot.slot, slot.state, slot.run_id) == (T0 + timedelta(hours=3), "done", "run-1")


def test_a_window_counts_back_from_the_datas_newest_event_when_the_data_ends_before_the_slot(tmp_path):
    """A table whose times are historical (or a feed that lags): the last 7 days *of the data*, not 7 empty days
    before today; a source that cannot be read here leaves the window at the slot."""
    import pandas as pd

    times = pd.date_range("2016-09-01", "2016-09-30 17:45:12", periods=300, tz="UTC")
    frame = pd.DataFrame({"event_time": times, "x": range(300), "label": [0, 1] * 150})
    frame.sample(frac=1.0, random_state=0).to_parquet(tmp_path / "hotels.parquet")  # row order is not time order
    settings = make_settings(tmp_path / "ws", tmp_path / "hotels.parquet")
    store = LocalSchedules.from_settings(settings)
    store.create(Schedule("weekly", "0 3 * * *", window_days=7), now=T0)
    runner = RecordingRunner()
    _scheduler(settings, store, runner, Clock(T0 + timedelta(hours=3, seconds=5))).tick()
    (req,) = runner.requests
    assert (req.window_start, req.window_end) == ("2016-09-23T17:45:13+00:00", "2016-09-30T17:45:13+00:00")

    (tmp_path / "hotels.parquet").write_bytes(b"not parquet")
    store.create(Schedule("later", "0 4 * * *", window_days=7), now=T0)
    _scheduler(settings, store, runner, Clock(T0 + timedelta(hours=4, seconds=5))).tick()
    assert (runner.requests[-1].window_start, runner.requests[-1].window_end) == (
        "2026-01-03T04:00:00+00:00", "2026-01-10T04:00:00+00:00")


def test_two_schedulers_never_run_the_same_slot(local):
    settings, store = local
    store.create(Schedule("often", "*/5 * * * *"), now=T0)
    clock = Clock(T0 + timedelta(minutes=5))
    other_outcomes = []
    other = _scheduler(settings, LocalSchedules(store.path), RecordingRunner(), clock)
    # While the first scheduler runs the slot, the second one ticks against the same store.
    runner = RecordingRunner(during=lambda _req: other_outcomes.extend(other.tick()))
    first = _scheduler(settings, store, runner, clock)

    (outcome,) = first.tick()

    assert outcome.state == "done" and len(runner.requests) == 1
    assert other_outcomes == [] and other.runner_factory.__self__.requests == []
    assert other.tick() == []


def test_a_slot_is_claimed_by_exactly_one_of_many_concurrent_claimers(local):
    _, store = local
    store.create(Schedule("often", "*/5 * * * *", max_concurrency=50), now=T0)
    slot, results = T0 + timedelta(minutes=5), []
    barrier = threading.Barrier(8)

    def claim(i):
        mine = LocalSchedules(store.path)  # its own connection, as another process would have
        barrier.wait()
        results.append(mine.claim("often", slot, f"host:{i}:x", 50))

    threads = [threading.Thread(target=claim, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == [False] * 7 + [True]
    assert [r.state for r in store.slots("often")] == ["claimed"]


@pytest.mark.parametrize("max_concurrency, expected", [(1, "busy"), (2, "done")])
def test_max_concurrency_bounds_runs_across_schedulers(local, max_concurrency, expected):
    settings, store = local
    store.create(Schedule("often", "*/5 * * * *", max_concurrency=max_concurrency), now=T0)
    clock = Clock(T0 + timedelta(minutes=5))
    inner_outcomes = []
    second = _scheduler(settings, LocalSchedules(store.path), RecordingRunner(), clock)

    def next_slot_while_running(req):
        clock.now = T0 + timedelta(minutes=10)  # the next slot comes due while this one still runs
        inner_outcomes.extend(second.tick())

    first = _scheduler(settings, store, RecordingRunner(during=next_slot_while_running), clock)
    (outcome,) = first.tick()

    assert outcome.slot == T0 + timedelta(minutes=5)
    assert [(o.slot, o.state) for o in inner_outcomes] == [(T0 + timedelta(minutes=10), expected)]


def test_restart_does_not_rerun_an_interrupted_slot(local):
    settings, store = local
    store.create(Schedule("nightly", "0 * * * *"), now=T0)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    import socket

    slot = T0 + timedelta(hours=1)
    assert store.claim("nightly", slot, f"{socket.gethostname()}:{int(dead.stdout)}:crashed", 1)
    store.set_slot("nightly", slot, "running")
    runner = RecordingRunner()
    restarted = _scheduler(settings, store, runner, Clock(slot + timedelta(minutes=10)))

    assert restarted.tick() == []
    (rec,) = store.slots("nightly")
    assert rec.state == "failed" and "interrupted" in rec.error and runner.requests == []

    restarted.clock.now = slot + timedelta(hours=1)
    (outcome,) = restarted.tick()
    assert outcome.slot == slot + timedelta(hours=1) and len(runner.requests) == 1


def test_ctrl_c_during_a_run_records_the_slot_failed_and_stops(local):
    settings, store = local
    store.create(Schedule("nightly", "0 * * * *"), now=T0)

    def interrupt(_req):
        raise KeyboardInterrupt

    sched = _scheduler(settings, store, RecordingRunner(during=interrupt), Clock(T0 + timedelta(hours=1)))
    with pytest.raises(KeyboardInterrupt):
        sched.tick()
    (rec,) = store.slots("nightly")
    assert rec.state == "failed" and "stopped" in rec.error
    assert sched.tick() == []  # not run again


@pytest.mark.parametrize("catchup", [True, False])
def test_missed_slots_after_downtime_follow_the_catch_up_policy(local, catchup):
    settings, store = local
    store.create(Schedule("hourly", "0 * * * *", catchup=catchup), now=T0)
    runner = RecordingRunner()
    sched = _scheduler(settings, store, runner, Clock(T0 + timedelta(hours=5, minutes=30)))

    outcomes = sched.tick()

    states = {rec.slot: rec.state for rec in store.slots("hourly")}
    if catchup:
        assert [o.slot for o in outcomes] == [T0 + timedelta(hours=5)] and len(runner.requests) == 1
        assert states == {**{T0 + timedelta(hours=h): "skipped" for h in range(1, 5)}, T0 + timedelta(hours=5): "done"}
    else:
        assert outcomes == [] and runner.requests == []
        assert states == {T0 + timedelta(hours=h): "skipped" for h in range(1, 6)}
    sched.clock.now = T0 + timedelta(hours=6, seconds=5)
    assert [o.slot for o in sched.tick()] == [T0 + timedelta(hours=6)]


def test_paused_updated_and_failing_schedules(local):
    settings, store = local
    store.create(Schedule("paused", "0 * * * *", paused=True), now=T0)
    store.create(Schedule("moved", "0 * * * *"), now=T0)
    store.update("moved", now=T0 + timedelta(hours=3, minutes=10), cron="30 * * * *")
    runner = RecordingRunner(state="FAILED")
    sched = _scheduler(settings, store, runner, Clock(T0 + timedelta(hours=3, minutes=30, seconds=5)))

    (outcome,) = sched.tick()

    # the old cron's slots before the update are not "missed"; the paused schedule runs nothing
    assert outcome.schedule == "moved" and outcome.slot == T0 + timedelta(hours=3, minutes=30)
    assert outcome.state == "failed" and "empty window" in outcome.error
    assert [r.state for r in store.slots("moved")] == ["failed"] and store.slots("paused") == []


def test_cli_schedule_errors_are_one_line(tmp_path, monkeypatch, capsys):
    from driftloop.app import cli

    monkeypatch.setenv("DRIFTLOOP_WORKSPACE", str(tmp_path / "ws"))

    def run(*args):
        monkeypatch.setattr(sys, "argv", ["driftloop", *args])
        try:
            cli.main()
        except SystemExit as exc:
            return exc.code
        return 0

    assert run("schedule", "create", "--name", "nightly", "--cron", "0 3 * * *", "--no-catchup",
               "--window-days", "30") == 0
    assert run("schedule", "create", "--name", "nightly", "--cron", "0 4 * * *") == 2
    assert run("schedule", "create", "--name", "other", "--cron", "0 25 * * *") == 2
    assert run("schedule", "update", "nightly", "--cron", "15 3 * * *", "--max-concurrency", "2",
               "--window-days", "0") == 0
    err = capsys.readouterr().err
    assert "'nightly' already exists" in err and "invalid cron expression '0 25 * * *'" in err
    assert "Traceback" not in err
    (s, _since) = LocalSchedules(tmp_path / "ws" / "schedules.db").get("nightly")
    assert (s.cron, s.max_concurrency, s.catchup, s.window_days) == ("15 3 * * *", 2, False, None)
    assert run("schedule", "delete", "nightly") == 0
    assert LocalSchedules(tmp_path / "ws" / "schedules.db").schedules() == []
    capsys.readouterr()

    host = f"http://127.0.0.1:{free_port()}"
    assert run("schedule", "list", "--kfp-host", host) == 2
    assert run("scheduler", "--once", "--param", f"kfp.host={host}") == 2
    err = capsys.readouterr().err
    assert f"cannot reach Kubeflow Pipelines at {host}: connection refused" in err
    assert "Kubeflow runs the schedules" in err
    assert "Traceback" not in err and "Retrying" not in err and "HTTPConnectionPool" not in err


@pytest.mark.slow
def test_a_scheduled_slot_runs_the_real_pipeline_and_mlflow_records_the_schedule(tmp_path, scenario_path):
    from driftloop.core.registry import TAG, Registry

    settings = make_settings(tmp_path / "ws", scenario_path)
    store = LocalSchedules.from_settings(settings)
    store.create(Schedule("e2e", "0 0 * * *", window_days=20), now=datetime(2026, 1, 30, 12, tzinfo=timezone.utc))
    sched = Scheduler(settings, store, clock=Clock(datetime(2026, 1, 31, 0, 0, 30, tzinfo=timezone.utc)))

    (outcome,) = sched.tick()

    assert outcome.state == "done", outcome.error
    (run,) = Registry.from_settings(settings).find_runs(f"tags.`{TAG.TRIGGER}` = 'schedule:e2e'")
    assert run.data.tags[TAG.REQUEST] == outcome.run_id and run.data.tags[TAG.SCHEDULE] == "e2e"
    window = run.data.tags[TAG.WINDOW]
    assert window.startswith("2026-01-11") and window.split(" .. ")[1].startswith("2026-01-30")
