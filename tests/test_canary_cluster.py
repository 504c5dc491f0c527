"""The canary steps on a cluster: both prediction samples from the monitor's inference log.

KServe's logger on the InferenceService logs the primary's and the canary's revision alike; the
model server names its version in every response (``model_version``), so the monitor's
``GET /predictions`` returns what each version answered, and where no labelled request decides, the
controller judges ``prediction_psi`` as on the embedded default: the canary's answers against the
champion's latest, limited by how much 19 earlier blocks of the champion's own answers differ.
The monitor runs for real, in-process; Prometheus and the Kubernetes API are stood in for at their
boundary (tests/test_shadow_cluster.py).
"""

import time
import uuid

import httpx
import pytest

from driftloop.core.errors import ServingError
from serving.kserve_backend import KServeBackend
from serving.rollout import (PROGRESSING, PROMOTED, ROLLED_BACK, KServeTarget, MonitorPredictions, MonitorShadow,
                             RolloutController)
from tests.ce_events import instance, kserve_logged
from tests.test_shadow_cluster import monitor  # noqa: F401 - the monitor fixture, shared
from tests.test_shadow_cluster import (NS, TOKEN, RecordingCustomObjects, RecordingKServeClient, production,
                                       prometheus, settings_at)

AUTH = {"authorization": f"Bearer {TOKEN}"}


@pytest.fixture
def canary_cluster(tmp_path):
    """The production InferenceService with candidate v2 out dark, no shadow phase configured."""
    s = settings_at(tmp_path)
    client = RecordingKServeClient(production(s))
    return s, KServeBackend(s, client=client, custom_api=RecordingCustomObjects()), client


def log_served(client, version: str, predictions: list, *, per_request: int = 10, shadow: bool = False,
               first: int = 0) -> list[str]:
    """``predictions`` answered by ``version`` of the InferenceService, as its logger sends them:
    the version in the response body (the model server's ``model_version``), no role; the rows are
    ``instance(first + k)``. Returns each request's ce-id (the key labels are posted under)."""
    ids = []
    isvc, annotations = "churn", None
    if shadow:
        isvc, annotations = "churn-shadow", {"driftloop.io/serving-role": "shadow",
                                             "driftloop.io/model-version": version}
    for start in range(0, len(predictions), per_request):
        preds = predictions[start:start + per_request]
        ce_id, rid = str(uuid.uuid4()), f"req-{uuid.uuid4().hex[:8]}"
        ids.append(ce_id)
        for kind, data in (("request", {"instances": [instance(first + start + i) for i in range(len(preds))]}),
                           ("response", {"predictions": preds, "model_version": version})):
            headers, body = kserve_logged(kind, data, isvc=isvc, ce_id=ce_id, request_id=rid,
                                          annotations=annotations, namespace=NS)
            r = client.post("/events", content=body, headers=headers)
            assert r.status_code == 200, r.text
    return ids


def alternating(n: int) -> list[int]:
    return [i % 2 for i in range(n)]


# -- the monitor's endpoint ---------------------------------------------------------------------
def test_monitor_answers_the_latest_predictions_per_version_without_shadow_rows(monitor):
    service, client = monitor
    log_served(client, "1", alternating(60))
    log_served(client, "2", [1] * 40)
    log_served(client, "2", [0] * 30, shadow=True)  # a shadow's answers to mirrored copies are not served
    later = time.time()
    log_served(client, "1", [7] * 10)

    r = client.get("/predictions", params={"since": 0, "versions": "1,2,9"}, headers=AUTH)
    assert r.status_code == 200, r.text
    found = r.json()["versions"]
    assert found["1"]["n"] == 70 and found["1"]["predictions"] == alternating(60) + [7] * 10
    assert found["2"] == {"n": 40, "predictions": [1] * 40}
    assert found["9"] == {"n": 0, "predictions": []}

    latest = client.get("/predictions", params={"versions": "1", "limit": 15}, headers=AUTH).json()
    assert latest["versions"]["1"]["predictions"] == alternating(60)[-5:] + [7] * 10  # the most recent, in order
    since = client.get("/predictions", params={"versions": "1", "since": later}, headers=AUTH).json()
    assert since["versions"]["1"]["predictions"] == [7] * 10


def test_monitor_refuses_predictions_without_the_token_or_with_a_bad_query(monitor):
    service, client = monitor
    log_served(client, "1", alternating(10))
    assert client.get("/predictions", params={"versions": "1"}).status_code == 401
    wrong = client.get("/predictions", params={"versions": "1"}, headers={"authorization": "Bearer wrong"})
    assert wrong.status_code == 401 and "predictions" not in wrong.json()
    assert service.metrics.events_rejected.labels(reason="predictions_unauthorized")._value.get() == 2
    for params, needle in (({}, "versions"), ({"versions": " , "}, "versions"),
                           ({"versions": "1", "limit": "0"}, "limit"), ({"versions": "1", "limit": "x"}, "limit"),
                           ({"versions": "1", "since": "not a time"}, "since")):
        r = client.get("/predictions", params=params, headers=AUTH)
        assert r.status_code == 400 and needle in r.json()["error"], (params, r.text)


def label(client, ids: list[str], labels: list, per_request: int = 10) -> None:
    """One label per row of each request (its ce-id), posted to the monitor's /feedback."""
    items = [{"id": ce_id, "row_index": j, "label": y} for k, ce_id in enumerate(ids)
             for j, y in enumerate(labels[k * per_request:(k + 1) * per_request])]
    r = client.post("/feedback", json=items)
    assert r.status_code == 200 and r.json()["stored"] == len(items), r.text


def test_monitor_answers_the_labelled_requests_with_their_features_for_either_token(monitor):
    service, client = monitor
    v1 = log_served(client, "1", alternating(30))
    v2 = log_served(client, "2", [1] * 20, first=100)
    log_served(client, "2", [0] * 10, shadow=True, first=200)  # mirrored copies: never a user's answer
    label(client, v1[:2], [1] * 20)  # the third request of v1 gets no label
    later = time.time()
    label(client, v2, [0, 1] * 10)
    found = client.get("/labelled", params={"since": 0}).json()  # the client sends the ingest token
    assert found["n"] == 40 and len(found["rows"]) == 40
    first = found["rows"][0]
    assert first["features"] == instance(0) and first["version"] == "1" and first["prediction"] == 0
    assert first["label"] == 1 and first["request_id"] == v1[0] and first["row_index"] == 0
    assert [r["version"] for r in found["rows"]] == ["1"] * 20 + ["2"] * 20  # oldest first, shadow rows left out
    assert client.get("/labelled", params={"since": 0}, headers=AUTH).json()["n"] == 40  # the webhook token too
    latest = client.get("/labelled", params={"limit": 5, "model": "churn"}).json()["rows"]
    assert [r["features"] for r in latest] == [instance(115 + k) for k in range(5)]
    assert client.get("/labelled", params={"model": "other"}).json()["n"] == 0
    assert client.get("/labelled", params={"since": later + 60}).json()["n"] == 0  # served before that time
    refused = client.get("/labelled", headers={"authorization": "Bearer wrong"})
    assert refused.status_code == 401 and "ingest token" in refused.json()["error"] and "rows" not in refused.json()
    for params, needle in (({"limit": "0"}, "limit"), ({"limit": "x"}, "limit"), ({"since": "not a time"}, "since")):
        r = client.get("/labelled", params=params)
        assert r.status_code == 400 and needle in r.json()["error"], (params, r.text)


# -- the controller on the cluster target -------------------------------------------------------
def canary_interval(canary_cluster, monitor, canary_predictions: list, *, target: KServeTarget | None = None):
    """start at 20 %, then one judged interval in which the primary (v1) answered 0/1 alternately
    — as it had 2,000 times before — and the canary (v2) answered ``canary_predictions``."""
    s, backend, _ = canary_cluster
    _, monitor_client = monitor
    log_served(monitor_client, "1", alternating(2000), per_request=100)  # the champion's own recent answers
    RolloutController.begin(s, canary_version="2", primary_version="1", canary_uri="models:/churn/2")
    target = target or KServeTarget(backend, prometheus(0.0)[0], predictions=MonitorPredictions(
        "http://testserver", client=monitor_client, token=TOKEN))
    ctl = RolloutController(s, target)
    assert ctl.step()["decision"] == "start"
    log_served(monitor_client, "1", alternating(80))
    log_served(monitor_client, "2", canary_predictions)
    return ctl, ctl.step()


def checks_of(record: dict) -> dict[str, dict]:
    return {c["name"]: c for c in record["checks"]}


def test_a_canary_answering_differently_is_rolled_back_on_prediction_psi(canary_cluster, monitor):
    s, _, client = canary_cluster
    ctl, first = canary_interval(canary_cluster, monitor, [1] * 60)
    psi = checks_of(first)["prediction_psi"]
    assert psi["limit"] == pytest.approx(0.0, abs=1e-9)  # the champion answers 0/1 alike in every block
    assert psi["value"] > 1.0 and psi["passed"] is False and "19 earlier blocks of 52" in psi["detail"]
    assert checks_of(first)["quality_delta"]["value"] is None  # no labelled request: the guard judges
    assert first["decision"] == "fail" and "prediction_psi=" in first["reason"]
    assert all(checks_of(first)[name]["passed"] for name in ("requests", "error_rate", "p99_ms"))
    log_served(monitor[1], "2", [1] * 60)  # the next analysis judges the canary's fresh answers
    second = ctl.step()
    assert second["decision"] == "rollback" and ctl.state().status == ROLLED_BACK
    assert "prediction_psi=" in second["reason"]
    patches = [c[2]["spec"]["predictor"]["canaryTrafficPercent"] for c in client.changes() if c[0] == "patch"]
    assert patches == [20, 0]


def test_a_canary_answering_like_the_primary_passes_prediction_psi_and_is_promoted(canary_cluster, monitor):
    ctl, first = canary_interval(canary_cluster, monitor, alternating(60))
    psi = checks_of(first)["prediction_psi"]
    assert psi["passed"] is True and psi["value"] == pytest.approx(0.0, abs=1e-9)
    assert first["decision"] == "advance" and ctl.state().weight == 50
    log_served(monitor[1], "1", alternating(60))
    log_served(monitor[1], "2", alternating(60))
    last = ctl.step()
    assert last["decision"] == "promote" and ctl.state().status == PROMOTED
    assert checks_of(last)["prediction_psi"]["passed"] is True


def test_the_cluster_wiring_reads_predictions_from_the_monitor_it_reads_the_shadow_join_from(canary_cluster,
                                                                                           monitor):
    """``driftloop rollout`` builds KServeTarget with MonitorShadow; the samples come from the same monitor."""
    _, backend, _ = canary_cluster
    shadow = MonitorShadow("http://testserver", client=monitor[1], token=TOKEN)
    target = KServeTarget(backend, prometheus(0.0)[0], shadow=shadow)
    assert isinstance(target.predictions, MonitorPredictions) and target.predictions.url == "http://testserver"
    _, first = canary_interval(canary_cluster, monitor, [1] * 60, target=target)
    assert checks_of(first)["prediction_psi"]["passed"] is False


def _down(request: httpx.Request) -> httpx.Response:
    raise httpx.ConnectError("connection refused")


@pytest.mark.parametrize("answer", [
    _down,
    lambda request: httpx.Response(401, json={"error": "missing or wrong bearer token"}),
    lambda request: httpx.Response(200, json={"unexpected": True}),
], ids=["down", "refused", "malformed"])
def test_a_monitor_that_cannot_be_read_makes_the_canary_interval_unavailable(canary_cluster, answer):
    s, backend, client = canary_cluster
    unreadable = MonitorPredictions("http://monitor", client=httpx.Client(transport=httpx.MockTransport(answer)),
                                    token=TOKEN)
    RolloutController.begin(s, canary_version="2", primary_version="1", canary_uri="models:/churn/2")
    ctl = RolloutController(s, KServeTarget(backend, prometheus(0.0)[0], predictions=unreadable))
    ctl.step()
    second = ctl.step()
    assert second["decision"] == "unavailable" and "monitor predictions query" in second["reason"]
    state = ctl.state()
    assert state.status == PROGRESSING and state.weight == 20 and state.failed_checks == 0  # neither pass nor fail
    with pytest.raises(ServingError):
        unreadable.samples(0.0, ["1", "2"])


class RuleScorer:
    """The two versions as functions of a request's features: v1 always answers 0, v2 the truth
    (churn when tenure is short) — what RegistryScorer does with MLflow models."""

    def answers(self, version: str, rows: list[dict]):
        from serving.rollout import Answers

        return Answers([truth(r) if version == "2" else 0 for r in rows])


def truth(row: dict) -> int:
    return int(row["tenure"] < 12)


def test_on_labels_the_cluster_canary_is_judged_on_the_same_requests_not_on_its_output_psi(canary_cluster, monitor):
    """The canary answers unlike the champion (it is right where the champion is not): without labels the
    PSI guard would fail it; with 300 labelled requests from the monitor, both versions scored on each, it
    is better on the same requests, and that decides."""
    s, backend, _ = canary_cluster
    _, client = monitor
    log_served(client, "1", alternating(2000), per_request=100, first=5000)  # the champion's recent answers
    RolloutController.begin(s, canary_version="2", primary_version="1", canary_uri="models:/churn/2")
    target = KServeTarget(backend, prometheus(0.0)[0], shadow=MonitorShadow("http://testserver", client=client,
                                                                            token=TOKEN))
    ctl = RolloutController(s, target, scorer=RuleScorer())
    assert ctl.step()["decision"] == "start"
    rows_1, rows_2 = [instance(i) for i in range(200)], [instance(i) for i in range(200, 300)]
    label(client, log_served(client, "1", [0] * 200), [truth(r) for r in rows_1])
    label(client, log_served(client, "2", [truth(r) for r in rows_2], first=200), [truth(r) for r in rows_2])
    first = ctl.step()
    quality, guard = checks_of(first)["quality_delta"], checks_of(first)["prediction_psi"]
    assert first["decision"] == "advance", first["reason"]
    assert quality["passed"] is True and quality["value"] == pytest.approx(0.24)  # 76 % -> 100 % on all 300
    assert "accuracy on the same 300 labelled requests" in quality["detail"]
    assert guard["passed"] is None and "labelled requests decide" in guard["detail"]
