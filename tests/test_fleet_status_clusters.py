"""``driftloop status`` over several clusters and gateways (driftloop/app/status_serving.py): replicas, error
rate and p99 of each model read from what serves it.

A fleet of four models: ``alpha`` served on the kube context ``east`` (the real kube-apiserver of
tests/kube_server.py; the test plays KServe's and Knative's controllers by writing the InferenceService's
and the revisions' status through the API), ``beta`` on the context ``west`` (a closed port on 127.0.0.1),
``gamma`` served by a running local gateway (the real gateway and backend; its model servers are
tests.fake_model_server processes) and ``delta`` not served. Prometheus is not part of this test: without
``rollout.prometheus_url`` a cluster model shows its replicas only (the queries are the rollout
controller's, tested with it).
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import httpx
import pytest
import yaml
from rich.console import Console

from driftloop.core.fleet import load_fleet
from driftloop.core.processes import free_port
from tests.kube_server import cluster, wait_for
from tests.test_agent_replicas import FakeServerBackend
from tests.test_trust_workspace import run_cli

NS = "status-east"
REVISION_CRD = {
    "apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
    "metadata": {"name": "revisions.serving.knative.dev"},
    "spec": {"group": "serving.knative.dev", "scope": "Namespaced",
             "names": {"kind": "Revision", "listKind": "RevisionList", "plural": "revisions", "singular": "revision"},
             "versions": [{"name": "v1", "served": True, "storage": True, "subresources": {"status": {}},
                           "schema": {"openAPIV3Schema": {"type": "object",
                                                          "x-kubernetes-preserve-unknown-fields": True}}}]}}
KNATIVE = ("serving.knative.dev", "v1")
KSERVE = ("serving.kserve.io", "v1beta1")


def _kubeconfig(kube, path: Path) -> Path:
    """Two contexts: ``east`` on the live API server, ``west`` on a port nothing listens on."""
    doc = {"apiVersion": "v1", "kind": "Config", "current-context": "east",
           "clusters": [{"name": "east", "cluster": {"server": kube.url, "certificate-authority": str(kube.ca_file)}},
                        {"name": "west", "cluster": {"server": f"https://127.0.0.1:{free_port()}",
                                                     "certificate-authority": str(kube.ca_file)}}],
           "users": [{"name": "admin", "user": {"token": kube.admin_token}}],
           "contexts": [{"name": "east", "context": {"cluster": "east", "user": "admin"}},
                        {"name": "west", "context": {"cluster": "west", "user": "admin"}}]}
    path.write_text(yaml.safe_dump(doc))
    path.chmod(0o600)
    return path


def _play_kserve(kube, settings) -> None:
    """alpha's InferenceService as driftloop builds it, its status as KServe's controller writes it (a canary at
    10 %: two revisions take traffic), and each revision's ready replicas as Knative writes them (2 + 1)."""
    from kubernetes import client

    from serving.inference_service import build_inference_service, to_dict

    core, custom = client.CoreV1Api(kube.admin), client.CustomObjectsApi(kube.admin)
    try:
        core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=NS)))
    except client.ApiException as exc:
        if exc.status != 409:
            raise
    custom.create_namespaced_custom_object(*KSERVE, NS, "inferenceservices", to_dict(build_inference_service(settings)))
    primary, canary = "alpha-predictor-00001", "alpha-predictor-00002"
    custom.patch_namespaced_custom_object_status(*KSERVE, NS, "inferenceservices", "alpha", {"status": {
        "conditions": [{"type": "Ready", "status": "True"}],
        "components": {"predictor": {
            "latestReadyRevision": canary, "latestCreatedRevision": canary, "latestRolledoutRevision": primary,
            "traffic": [{"revisionName": primary, "percent": 90, "latestRevision": False},
                        {"revisionName": canary, "percent": 10, "latestRevision": True, "tag": "latest"}]}}}})
    for name, ready in ((primary, 2), (canary, 1)):
        wait_for(lambda name=name: _create_revision(custom, name), what=f"revision {name} created")
        custom.patch_namespaced_custom_object_status(*KNATIVE, NS, "revisions", name, {"status": {
            "actualReplicas": ready, "desiredReplicas": ready,
            "conditions": [{"type": "Ready", "status": "True"}]}})


def _create_revision(custom, name: str) -> bool:
    from kubernetes import client

    try:
        custom.create_namespaced_custom_object(*KNATIVE, NS, "revisions", {
            "apiVersion": "serving.knative.dev/v1", "kind": "Revision", "metadata": {"name": name}})
    except client.ApiException as exc:
        if exc.status == 404:  # the new kind is not served yet
            return False
        raise
    return True


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    """The fleet file, its kubeconfig and gamma's gateway (under load: 40 requests, 10 of them failing)."""
    from kubernetes import client

    kube = cluster()
    root = tmp_path_factory.mktemp("status-clusters")
    path = root / "fleet.yaml"
    path.write_text(f"""\
workspace: ws
defaults:
  data: {{source: data.parquet}}
  serving: {{gateway_port: 0}}
  monitor: {{port: {free_port()}}}
models:
  alpha: {{team: east, serving: {{kube_context: east, namespace: {NS}}}, rollout: {{deploy: kserve}}}}
  beta: {{team: west, serving: {{kube_context: west}}, rollout: {{deploy: kserve}}}}
  gamma: {{team: local}}
  delta: {{}}
""")
    models = {m.name: m.settings for m in load_fleet(path, environ={}).models}
    kube.apply([REVISION_CRD], manager="driftloop-tests")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DRIFTLOOP_GATEWAY_TOKEN", "test-token")
        backend = FakeServerBackend(models["gamma"], ready_timeout=60.0, stop_timeout=5.0)
        backend.serve("1")
        try:
            _play_kserve(kube, models["alpha"])
            url = backend.gateway_url + "/v2/models/gamma/infer"
            with httpx.Client(timeout=10.0) as http:
                codes = [http.post(url, json={"inputs": [{"name": "tenure", "shape": [1], "datatype": "FP64",
                                                          "data": [3.0]}] if i % 4 else []}).status_code
                         for i in range(40)]
            yield path, _kubeconfig(kube, root / "kubeconfig"), codes
        finally:
            backend.stop()
            client.CustomObjectsApi(kube.admin).delete_namespaced_custom_object(*KSERVE, NS, "inferenceservices",
                                                                               "alpha")
            client.ApiextensionsV1Api(kube.admin).delete_custom_resource_definition(REVISION_CRD["metadata"]["name"])


def test_json_reads_each_cluster_and_gateway_and_marks_the_unreachable_cluster(fleet, monkeypatch, capsys):
    path, kubeconfig, codes = fleet
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
    code, out, err = run_cli(["status", "-c", str(path), "--json", "--timeout", "5"], monkeypatch, capsys)
    assert code == 0, err  # an unreachable cluster is shown, not failed on
    doc = json.loads(out)
    assert doc["clusters"] == {"east": {"reachable": True, "error": None},
                               "west": {"reachable": False, "error": "connection refused"}}
    by = {r["model"]: r for r in doc["models"]}
    alpha, beta, gamma, delta = by["alpha"], by["beta"], by["gamma"], by["delta"]
    assert (alpha["replicas"], alpha["served"], alpha["serving_error"], alpha["kube_context"]) == (3, True, None, "east")
    assert alpha["error_rate"] is None and alpha["p99_ms"] is None  # no rollout.prometheus_url
    assert beta["serving_error"] == "cluster west unreachable: connection refused" and beta["replicas"] is None
    assert beta["attention"]["reason"] == "cluster west unreachable: connection refused"
    assert doc["models"][0]["model"] == "beta"  # what cannot be read comes first
    failed = sum(1 for c in codes if c >= 500)
    assert failed == 10, codes
    assert (gamma["served"], gamma["replicas"], gamma["requests"], gamma["serving_error"]) == (True, 1, 40, None)
    assert gamma["error_rate"] == pytest.approx(failed / 40) and gamma["p99_ms"] > 0
    assert (delta["served"], delta["replicas"], delta["serving_error"]) == (False, 0, None)
    assert delta["attention"]["reason"] == "not trained yet" and gamma["attention"]["reason"] == "not trained yet"


def test_the_table_shows_the_same_in_80_columns(fleet, monkeypatch, capsys):
    from driftloop.app.status_cli import status_table, status_view

    path, kubeconfig, _ = fleet
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
    rows, _ = status_view(list(load_fleet(path, environ={}).models), timeout=5.0)
    out = io.StringIO()
    Console(file=out, width=80, highlight=False).print(status_table(rows))
    text = out.getvalue()
    assert max(len(line) for line in text.splitlines()) <= 80
    cells = _row_texts(text, {r["model"] for r in rows})
    assert "cluster west" in cells["beta"] and "unreachable" in cells["beta"] and "refused" in cells["beta"]
    assert "3 rep" in cells["alpha"]
    assert "1 rep" in cells["gamma"] and "25.0% err" in cells["gamma"] and "p99" in cells["gamma"]
    assert "not served" in cells["delta"] and "unreachable" not in cells["delta"]
    assert list(cells).index("beta") < list(cells).index("alpha")


def _row_texts(table: str, names: set[str]) -> dict[str, str]:
    """Each model's row as one line of text, in the table's order (a row starts where its name does)."""
    out: dict[str, str] = {}
    current = None
    for line in table.splitlines():
        if not line.startswith("│"):
            continue
        first = line.split("│")[1].strip()
        current = first if first in names else current
        if current:
            out[current] = (out.get(current, "") + " " + " ".join(line.replace("│", " ").split())).strip()
    return out


def test_an_unknown_context_and_a_silent_server_are_unreachable_within_the_timeout(fleet, tmp_path, monkeypatch):
    """A context the kubeconfig lacks, and a server that accepts but never answers, are named in one line."""
    import socket

    from driftloop.app.status_serving import serving_view

    path, kubeconfig, _ = fleet
    doc = yaml.safe_load(kubeconfig.read_text())
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)  # accepts connections (the kernel's backlog), never answers the TLS handshake
    try:
        doc["clusters"][1]["cluster"]["server"] = f"https://127.0.0.1:{silent.getsockname()[1]}"
        (tmp_path / "kubeconfig").write_text(yaml.safe_dump(doc))
        monkeypatch.setenv("KUBECONFIG", str(tmp_path / "kubeconfig"))
        text = path.read_text().replace("kube_context: east", "kube_context: north")
        (path.parent / "other.yaml").write_text(text)
        models = list(load_fleet(path.parent / "other.yaml", environ={}).models)
        rows, clusters = serving_view(models, timeout=1.0)
    finally:
        silent.close()
    assert clusters["west"] == {"reachable": False, "error": "no answer within 1s"}
    assert clusters["north"]["reachable"] is False and "north" in clusters["north"]["error"]
    assert rows["alpha"]["serving_error"].startswith("cluster north unreachable: kubeconfig: ")
    assert "\n" not in rows["alpha"]["serving_error"]
    assert rows["gamma"]["served"] and rows["gamma"]["serving_error"] is None


def test_a_cluster_that_refuses_the_read_names_it_in_the_row(fleet, tmp_path, monkeypatch):
    """A reachable cluster that answers 401 is no unreachable cluster: the row says what it answered."""
    from driftloop.app.status_serving import serving_view

    path, kubeconfig, _ = fleet
    doc = yaml.safe_load(kubeconfig.read_text())
    doc["users"].append({"name": "stranger", "user": {"token": "not-a-token"}})
    doc["contexts"].append({"name": "south", "context": {"cluster": "east", "user": "stranger"}})
    (tmp_path / "kubeconfig").write_text(yaml.safe_dump(doc))
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "kubeconfig"))
    (path.parent / "south.yaml").write_text(path.read_text().replace("kube_context: east", "kube_context: south"))
    rows, clusters = serving_view(list(load_fleet(path.parent / "south.yaml", environ={}).models), timeout=5.0)
    assert clusters["south"] == {"reachable": True, "error": None}
    assert rows["alpha"]["serving_error"].startswith(f"cluster south: cannot read InferenceService {NS}/alpha: 401")
