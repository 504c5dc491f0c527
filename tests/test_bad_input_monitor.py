"""Bad input against the monitor and the CLI: one clear refusal naming the problem, nothing else hurt.

A table of malformed inputs — CloudEvents (binary and ``application/cloudevents-batch+json``), the
Alertmanager webhook, config files, data files and CLI flags. Each case checks: a 4xx (or a CLI
exit status 2 with one ``error:`` message, no traceback) that names the problem; the monitor still
answers; every event acknowledged before is still in the store.
"""

from __future__ import annotations

import json
import sys
import uuid
from pathlib import Path

import pytest
from starlette.testclient import TestClient

from monitoring.service import WEBHOOK_TOKEN_ENV, MonitorService
from tests.ce_events import COLUMNS, binary, instance, pair, structured
from tests.conftest import make_settings
from tests.test_trigger import RecordingRunner

TOKEN = "bad-input-token"
BATCH = {"content-type": "application/cloudevents-batch+json"}
MAX_BODY = 64 * 1024


@pytest.fixture(scope="module")
def monitor(tmp_path_factory, trained):
    """The monitor's app (sink + webhook) on the trained champion, with a few events acknowledged."""
    base, _ = trained
    settings = make_settings(tmp_path_factory.mktemp("bad-input") / "ws", base.data.source,
                             **{"mlflow.tracking_uri": base.tracking_uri, "serving.name": "churn",
                                "monitor.max_body_bytes": MAX_BODY})
    mp = pytest.MonkeyPatch()
    mp.setenv(WEBHOOK_TOKEN_ENV, TOKEN)
    service = MonitorService(settings, runner=RecordingRunner())
    mp.undo()
    with TestClient(service.app, headers={"authorization": f"Bearer {service.ingest_token}"}) as client:
        acked = set()
        for i in range(3):
            ce_id = f"good-{i}"
            for headers, body in pair(ce_id, n=2, start=i):
                assert client.post("/events", content=body, headers=headers).status_code == 200
            acked.add(ce_id)
        yield service, client, acked
    service.store.close()
    service.alerts.close()


def _binary(row: dict | None = None, drop: str | None = None, **changes: str) -> tuple[dict, bytes]:
    headers, body = binary(uuid.uuid4().hex, "request", {"instances": [row or instance(1)]})
    if drop:
        headers.pop(drop)
    headers.update(changes)
    return headers, body


def _with(**values) -> dict:
    return {**instance(2), **values}


def _batch(*items) -> bytes:
    return json.dumps(list(items)).encode()


def _request(row: dict) -> dict:
    return structured(uuid.uuid4().hex, "request", {"instances": [row]})


def _alertmanager(payload: bytes | str, token: str | None = TOKEN) -> tuple[dict, bytes]:
    headers = {"content-type": "application/json"}
    if token is not None:
        headers["authorization"] = f"Bearer {token}"
    return headers, payload.encode() if isinstance(payload, str) else payload


# (id, path, (headers, body), status, what the error must name)
HTTP_CASES = [
    ("binary-missing-ce-id", "/events", _binary(drop="ce-id"), 400, "ce-id"),
    ("binary-missing-ce-type", "/events", _binary(drop="ce-type"), 400, "ce-type"),
    ("binary-missing-ce-source", "/events", _binary(drop="ce-source"), 400, "ce-source"),
    ("binary-unknown-type", "/events", _binary(**{"ce-type": "org.example.other"}), 400, "unknown ce-type"),
    ("binary-bad-json", "/events", ({**_binary()[0]}, b"{not json"), 400, "JSON"),
    ("binary-instances-not-a-list", "/events", ({**_binary()[0]}, b'{"instances": 5}'), 422, "instances"),
    ("binary-no-instances", "/events", ({**_binary()[0]}, b'{"rows": []}'), 422, "instances"),
    ("binary-missing-column", "/events", _binary({k: v for k, v in instance(1).items() if k != "plan"}), 422,
     "missing ['plan']"),
    ("binary-unknown-column", "/events", _binary({**instance(1), "colour": "red"}), 422, "unexpected ['colour']"),
    ("binary-text-in-numeric-column", "/events", _binary(_with(tenure="abc")), 422, "'tenure'"),
    ("binary-bool-in-numeric-column", "/events", _binary(_with(monthly_spend=True)), 422, "'monthly_spend'"),
    ("binary-list-in-numeric-column", "/events", _binary(_with(sessions=[1, 2])), 422, "'sessions'"),
    ("binary-unknown-model", "/events", _binary(**{"ce-inferenceservicename": "other"}), 404, "unknown model"),
    ("binary-oversize", "/events", ({**_binary()[0]}, b" " * (MAX_BODY + 1)), 413, "over the limit"),
    ("batch-bad-json", "/events", (BATCH, b"[{"), 400, "JSON"),
    ("batch-not-a-list", "/events", (BATCH, b'{"id": "x"}'), 400, "non-empty JSON list"),
    ("batch-empty", "/events", (BATCH, b"[]"), 400, "non-empty JSON list"),
    ("batch-item-not-object", "/events", (BATCH, b"[1]"), 400, "JSON object"),
    ("batch-item-without-id", "/events",
     (BATCH, _batch({k: v for k, v in _request(instance(1)).items() if k != "id"})), 400, "id"),
    ("batch-text-in-numeric-column", "/events", (BATCH, _batch(_request(instance(3)), _request(_with(tenure="abc")))),
     422, "batch event #1"),
    ("batch-oversize", "/events", (BATCH, b"[" + b" " * MAX_BODY + b"]"), 413, "over the limit"),
    ("webhook-no-token", "/alerts/alertmanager", _alertmanager("{}", token=None), 401, "bearer token"),
    ("webhook-wrong-token", "/alerts/alertmanager", _alertmanager("{}", token="guess"), 401, "bearer token"),
    ("webhook-not-json", "/alerts/alertmanager", _alertmanager("alerts!"), 400, "not JSON"),
    ("webhook-empty", "/alerts/alertmanager", _alertmanager("{}"), 400, "no 'alerts'"),
    ("webhook-empty-alerts", "/alerts/alertmanager", _alertmanager('{"alerts": []}'), 400, "no 'alerts'"),
    ("webhook-no-fingerprint", "/alerts/alertmanager",
     _alertmanager('{"alerts": [{"startsAt": "2026-01-01T00:00:00Z"}]}'), 400, "fingerprint"),
    ("webhook-bad-time", "/alerts/alertmanager",
     _alertmanager('{"alerts": [{"fingerprint": "f", "startsAt": "yesterday"}]}'), 400, "RFC 3339"),
]


def _still_whole(service: MonitorService, client: TestClient, acked: set[str]) -> None:
    assert client.get("/healthz").status_code == 200
    assert client.get("/readyz").status_code == 200
    assert acked <= service.store.event_ids()
    assert service.store.count() == 2 * len(acked)  # nothing paired from a refused event either


@pytest.mark.parametrize("path,request_,status,needle", [c[1:] for c in HTTP_CASES], ids=[c[0] for c in HTTP_CASES])
def test_malformed_http_input_is_refused_by_name(monitor, path, request_, status, needle):
    service, client, acked = monitor
    headers, body = request_
    r = client.post(path, content=body, headers=headers)
    assert r.status_code == status, r.text
    assert needle in r.json()["error"], r.json()
    _still_whole(service, client, acked)


def _corrupt_parquet(d: Path) -> list[str]:
    (d / "bad.parquet").write_bytes(b"PAR1 this is not parquet")
    _good(d)
    return ["drift", "check", "--reference", str(d / "ref.csv"), "--current", str(d / "bad.parquet")]


def _good(d: Path) -> None:
    from driftloop.app.scenario import generate

    generate(rows=200, seed=1)[COLUMNS].to_csv(d / "ref.csv", index=False)


def _missing_column(d: Path) -> list[str]:
    from driftloop.app.scenario import generate

    _good(d)
    generate(rows=200, seed=2)[COLUMNS].drop(columns=["tenure"]).to_csv(d / "cur.csv", index=False)
    return ["drift", "check", "--reference", str(d / "ref.csv"), "--current", str(d / "cur.csv")]


def _empty(d: Path) -> list[str]:
    _good(d)
    (d / "empty.csv").write_text(",".join(COLUMNS) + "\n")
    return ["drift", "check", "--reference", str(d / "ref.csv"), "--current", str(d / "empty.csv")]


def _config(text: str):
    def make(d: Path) -> list[str]:
        (d / "bad.yaml").write_text(text)
        return ["config", "show", "-c", str(d / "bad.yaml")]
    return make


# (id, argv builder, what the one-line error must name)
CLI_CASES = [
    ("config-unknown-key", _config("monitor:\n  min_sample: 5\n"), "min_sample"),
    ("config-wrong-type", _config("monitor:\n  min_samples: many\n"), "monitor.min_samples"),
    ("config-bad-yaml", _config("monitor: [unclosed\n"), "not valid YAML"),
    ("config-not-a-mapping", _config("- a\n- b\n"), "mapping"),
    ("data-corrupt-parquet", _corrupt_parquet, "bad.parquet"),
    ("data-missing-column", _missing_column, "tenure"),
    ("data-empty", _empty, "no rows"),
    ("flag-bad-window", lambda d: ["run", "train", "--window-end", "notadate"], "--window-end 'notadate'"),
    ("flag-window-backwards", lambda d: ["run", "train", "--window-start", "2026-02-01", "--window-end", "2026-01-01"],
     "not before"),
    ("flag-bad-trigger", lambda d: ["run", "train", "--trigger", "cron"], "trigger 'cron'"),
    ("flag-empty-trigger", lambda d: ["run", "train", "--trigger", "drift:"], "names no schedule or alert"),
    ("flag-param-without-value", lambda d: ["config", "show", "--param", "monitor.min_samples"], "monitor.min_samples"),
    ("flag-param-unknown-key", lambda d: ["config", "show", "--param", "monitor.nope=1"], "nope"),
]


@pytest.mark.parametrize("build,needle", [c[1:] for c in CLI_CASES], ids=[c[0] for c in CLI_CASES])
def test_malformed_cli_input_is_one_line(monitor, tmp_path, monkeypatch, capsys, build, needle):
    from driftloop.app import cli

    service, client, acked = monitor
    monkeypatch.setenv("DRIFTLOOP_WORKSPACE", str(tmp_path / "ws"))
    monkeypatch.setattr(sys, "argv", ["driftloop", *build(tmp_path)])
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    out = capsys.readouterr()
    err = out.err
    assert exit_info.value.code == 2, (out.out[-2000:], err[-2000:])
    assert "Traceback" not in err and "Traceback" not in out.out
    assert err.lstrip().startswith("error:") and err.count("error:") == 1, err
    assert needle in " ".join(err.split()), err
    assert not (tmp_path / "ws" / "pipeline-root").exists()  # nothing was started
    _still_whole(service, client, acked)
