"""A fleet on a cluster: ``driftloop deploy -c FLEET --apply`` against the real kube-apiserver of tests/kube_server.py.

Three models of two teams (growth: churn and upsell; planning: demand). Each model gets its own
InferenceService in its team's namespace, its logger posting to its own path on the fleet's one monitor
(driftloop/app/fleet_deploy.py). The command runs as a process, as a user runs it, with the kubeconfig of
the one who deploys: the admin, or team growth's ServiceAccount (a real TokenRequest token; a Role in
``growth`` only). What the API server refuses -- RBAC, the team's ResourceQuota on the count of
InferenceServices, a cluster that cannot be reached -- is that model's line, and the others are applied.
No controller runs: the quota's status is written by the test, as the quota controller would write it.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from kubernetes import client as k8s
from kubernetes.client.rest import ApiException

from driftloop.core.processes import free_port, spawn
from serving.inference_service import from_dict
from tests.kube_server import cluster, wait_for
from tests.test_trust_workspace import run_cli

KSERVE = ("serving.kserve.io", "v1beta1")
PLURAL = "inferenceservices"
COUNT = "count/inferenceservices.serving.kserve.io"
TEAMS = {"growth": ("churn", "upsell"), "planning": ("demand",)}
MONITOR = "http://driftloop-monitor.ml.svc.cluster.local"
DEPLOYER = "fleet-deployer"  # team growth's ServiceAccount that deploys its models
FLEET = f"""\
workspace: ws
defaults:
  data: {{source: data.parquet}}
  serving: {{logger_url: "{MONITOR}/events", max_replicas: 2}}
models:
  churn: {{team: growth}}
  upsell: {{team: growth}}
  demand: {{team: planning, model: {{task: regression}}}}
"""


@pytest.fixture(scope="module")
def kube():
    """The cluster with both teams' namespaces and growth's deployer: a Role for InferenceServices in growth only."""
    kube = cluster()
    core, rbac = k8s.CoreV1Api(kube.admin), k8s.RbacAuthorizationV1Api(kube.admin)
    for make in ([lambda ns=ns: core.create_namespace({"metadata": {"name": ns}}) for ns in TEAMS] +
                 [lambda: core.create_namespaced_service_account("growth", {"metadata": {"name": DEPLOYER}}),
                  lambda: rbac.create_namespaced_role("growth", {
                      "metadata": {"name": DEPLOYER},
                      "rules": [{"apiGroups": [KSERVE[0]], "resources": [PLURAL],
                                 "verbs": ["get", "create", "update", "patch"]}]}),
                  lambda: rbac.create_namespaced_role_binding("growth", {
                      "metadata": {"name": DEPLOYER},
                      "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": DEPLOYER},
                      "subjects": [{"kind": "ServiceAccount", "name": DEPLOYER, "namespace": "growth"}]})]):
        try:
            make()
        except ApiException as exc:
            if exc.status != 409:  # already there: the one cluster serves the whole test process
                raise
    return kube


@pytest.fixture
def fleet(kube, tmp_path):
    """The fleet file, no InferenceService of its models and no quota in the teams' namespaces."""
    custom, core = k8s.CustomObjectsApi(kube.admin), k8s.CoreV1Api(kube.admin)
    for ns, names in TEAMS.items():
        for name in names:
            try:
                custom.delete_namespaced_custom_object(*KSERVE, ns, PLURAL, name)
            except ApiException as exc:
                if exc.status != 404:
                    raise
        for quota in core.list_namespaced_resource_quota(ns).items:
            core.delete_namespaced_resource_quota(quota.metadata.name, ns)
    path = tmp_path / "fleet.yaml"
    path.write_text(FLEET)
    return path


def deploy(path: Path, kubeconfig: Path, *extra: str) -> tuple[int, list[str], str]:
    """``driftloop deploy -c FLEET --apply`` as a process (it dies with this one): (exit code, stdout lines, stderr)."""
    command = [str(Path(sys.executable).parent / "driftloop"), "deploy", "-c", str(path), "--apply", *extra]
    env = {"PATH": "/usr/bin:/bin", "HOME": str(path.parent), "KUBECONFIG": str(kubeconfig)}
    proc = spawn(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert "Traceback" not in err, err
    return proc.returncode, out.splitlines(), err


def live(kube, ns: str, name: str) -> dict | None:
    try:
        return k8s.CustomObjectsApi(kube.admin).get_namespaced_custom_object(*KSERVE, ns, PLURAL, name)
    except ApiException as exc:
        if exc.status == 404:
            return None
        raise


def line_of(lines: list[str], model: str) -> str:
    (line,) = [x for x in lines if x.split(" ", 2)[1:2] == [model]]
    return line


def test_dry_run_prints_every_models_inference_service_in_its_teams_namespace(tmp_path, monkeypatch, capsys):
    (tmp_path / "fleet.yaml").write_text(FLEET)
    code, out, err = run_cli(["deploy", "-c", str(tmp_path / "fleet.yaml"), "--dry-run"], monkeypatch, capsys)
    assert code == 0, err
    docs = [from_dict(d) for d in yaml.safe_load_all(out)]  # kserve's own model classes
    assert [(d.metadata.namespace, d.metadata.name) for d in docs] == [("growth", "churn"), ("growth", "upsell"),
                                                                       ("planning", "demand")]
    assert [d.spec.predictor.logger.url for d in docs] == [f"{MONITOR}/models/{n}/events"
                                                           for n in ("churn", "upsell", "demand")]
    code, out, err = run_cli(["deploy", "-c", str(tmp_path / "fleet.yaml"), "--canary-percent", "10"], monkeypatch,
                             capsys)
    assert code == 2 and err.count("\n") == 1 and "--canary-percent acts on one model" in err, err


def test_apply_as_admin_puts_each_model_in_its_teams_namespace_with_its_logger(kube, fleet):
    code, lines, err = deploy(fleet, kube.kubeconfig())
    assert code == 0, (lines, err)
    assert lines == ["✓ churn growth/churn applied", "✓ upsell growth/upsell applied",
                     "✓ demand planning/demand applied"]
    for ns, names in TEAMS.items():
        for name in names:
            isvc = from_dict(live(kube, ns, name))  # read back, parsed by kserve's model classes
            assert (isvc.metadata.namespace, isvc.metadata.name) == (ns, name)
            assert isvc.spec.predictor.logger.url == f"{MONITOR}/models/{name}/events"
            assert isvc.spec.predictor.max_replicas == 2
    # applied again: each is replaced with the spec it has now, nothing else changes
    fleet.write_text(fleet.read_text().replace("max_replicas: 2", "max_replicas: 4"))
    code, lines, err = deploy(fleet, kube.kubeconfig())
    assert code == 0 and len(lines) == 3, (lines, err)
    assert {live(kube, ns, n)["spec"]["predictor"]["maxReplicas"] for ns, ns_names in TEAMS.items()
            for n in ns_names} == {4}


def test_a_team_deploys_its_own_models_and_is_refused_anothers_on_its_line(kube, fleet):
    growth = kube.kubeconfig(kube.token("growth", DEPLOYER), "growth-deployer")
    code, lines, err = deploy(fleet, growth)
    assert code == 1, (lines, err)
    assert lines[:2] == ["✓ churn growth/churn applied", "✓ upsell growth/upsell applied"]
    refused = line_of(lines, "demand")
    assert refused.startswith("✗ demand planning/demand: ") and "403 Forbidden" in refused, refused
    assert f"system:serviceaccount:growth:{DEPLOYER}" in refused and 'in the namespace "planning"' in refused
    assert "1 of 3 models not applied: demand" in err
    assert live(kube, "growth", "churn") and live(kube, "growth", "upsell") and live(kube, "planning", "demand") is None


def test_a_teams_quota_on_inference_services_lets_the_first_in_and_refuses_the_second(kube, fleet):
    """``count/inferenceservices.serving.kserve.io`` is enforced by the API server's ResourceQuota admission
    for a custom resource; its status is written here as the quota controller writes it (hard, used 0)."""
    core = k8s.CoreV1Api(kube.admin)
    core.create_namespaced_resource_quota("growth", {"metadata": {"name": "growth-budget"},
                                                     "spec": {"hard": {COUNT: "1"}}})
    core.replace_namespaced_resource_quota_status("growth-budget", "growth", {
        "metadata": {"name": "growth-budget"}, "spec": {"hard": {COUNT: "1"}},
        "status": {"hard": {COUNT: "1"}, "used": {COUNT: "0"}}})
    wait_for(lambda: core.read_namespaced_resource_quota("growth-budget", "growth").status.used == {COUNT: "0"},
             what="the quota's status")
    code, lines, err = deploy(fleet, kube.kubeconfig())
    assert code == 1, (lines, err)
    assert lines[0] == "✓ churn growth/churn applied" and lines[2] == "✓ demand planning/demand applied"
    refused = line_of(lines, "upsell")
    assert refused.startswith("✗ upsell growth/upsell: ") and "exceeded quota: growth-budget" in refused, refused
    assert f"limited: {COUNT}=1" in refused
    assert live(kube, "growth", "upsell") is None and live(kube, "growth", "churn")


def test_a_model_whose_cluster_cannot_be_reached_is_its_line_and_the_others_are_applied(kube, fleet, tmp_path):
    """Each model on its own kube context: ``gone`` is a closed port; it is also the kubeconfig's current
    context, so the models naming ``live`` reach the cluster only through their own."""
    closed = free_port()
    config = {"apiVersion": "v1", "kind": "Config", "current-context": "gone",
              "clusters": [{"name": "live", "cluster": {"server": kube.url, "certificate-authority": str(kube.ca_file)}},
                           {"name": "gone", "cluster": {"server": f"https://127.0.0.1:{closed}",
                                                        "certificate-authority": str(kube.ca_file)}}],
              "users": [{"name": "admin", "user": {"token": kube.admin_token}}],
              "contexts": [{"name": n, "context": {"cluster": n, "user": "admin"}} for n in ("live", "gone")]}
    kubeconfig = tmp_path / "two-clusters.yaml"
    kubeconfig.write_text(yaml.safe_dump(config))
    kubeconfig.chmod(0o600)
    fleet.write_text(fleet.read_text()
                     .replace("churn: {team: growth}", "churn: {team: growth, serving: {kube_context: live}}")
                     .replace("upsell: {team: growth}", "upsell: {team: growth, serving: {kube_context: live}}")
                     .replace("demand: {team: planning,", "demand: {team: planning, serving: {kube_context: gone},"))
    code, lines, err = deploy(fleet, kubeconfig)
    assert code == 1, (lines, err)
    assert lines[:2] == ["✓ churn growth/churn applied", "✓ upsell growth/upsell applied"]
    gone = line_of(lines, "demand")
    assert gone.startswith(f"✗ demand planning/demand: cluster gone unreachable: https://127.0.0.1:{closed}")
    assert gone.endswith("Connection refused") and gone.count("127.0.0.1") == 1, gone
    assert live(kube, "growth", "churn") and live(kube, "planning", "demand") is None
