"""infra/overlays/fleet: a fleet's install, rendered by the real kustomize, checked by the infra check, and
applied to the real kube-apiserver of tests/kube_server.py.

The overlay holds the fleet file (four models of teams growth and planning) in driftloop-config, points
every driftloop process at it, renders no one-model InferenceService, and gives each team a namespace with
a quota that counts InferenceServices and a deployer ServiceAccount whose Role works in that namespace
only. The API server itself refuses a team's deployer in another team's namespace (RBAC, 403) and the
InferenceService past its team's count (ResourceQuota admission).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from kubernetes import client as k8s
from kubernetes.client.rest import ApiException
from typer.testing import CliRunner

from driftloop.app.infra_check import build, check_target, fleet_from_objects, objects_by_kind
from tests.kube_server import ROOT, cluster, point_webhook_here
from tests.test_kube_infra import apply_and_compare, play_quota_controller

FLEET = ROOT / "infra" / "overlays" / "fleet"
KSERVE = ("serving.kserve.io", "v1beta1")
COUNT = "count/inferenceservices.serving.kserve.io"
TEAMS = {"growth": ["churn", "upsell"], "planning": ["demand", "spend"]}
CONTROLLERS = ("driftloop-monitor", "driftloop-rollout", "driftloop-scheduler", "driftloop-agent")


@pytest.fixture(scope="module")
def rendered() -> list[dict]:
    return build(FLEET)


def _container(objects: list[dict], deployment: str) -> dict:
    (found,) = [d for d in objects_by_kind(objects, "Deployment") if d["metadata"]["name"] == deployment]
    return found["spec"]["template"]["spec"]["containers"][0]


def test_the_fleet_overlay_renders_the_fleet_for_every_process_and_no_one_model_service(rendered):
    assert check_target(FLEET, ROOT / "infra") == []
    fleet = fleet_from_objects(rendered)
    assert not fleet.single and {(m.team, m.name) for m in fleet.models} == {(t, n) for t, ns in TEAMS.items() for n in ns}
    assert {m.settings.model.task for m in fleet.models} == {"classification", "regression"}
    for m in fleet.models:  # each model in its team's namespace, logging to its path on the one monitor
        assert m.settings.serving.namespace == m.team
        assert m.settings.serving.logger_url == f"http://driftloop-monitor.driftloop.svc.cluster.local/models/{m.name}/events"
    assert objects_by_kind(rendered, "InferenceService") == []
    webhook = _container(rendered, "driftloop-admission")  # the agent's guardrails: the fleet file, its agent's namespace
    assert {e["name"]: e.get("value") for e in webhook["env"]}["DRIFTLOOP_CONFIG"] == "/etc/driftloop/config/fleet.yaml"
    assert webhook["args"][-2:] == ["--agent-namespace", "driftloop"]
    env = next(o for o in objects_by_kind(rendered, "ConfigMap") if o["metadata"]["name"].startswith("driftloop-env"))
    assert "DRIFTLOOP_SERVING__NAMESPACE" not in env["data"]  # it would move every model into driftloop
    for name in CONTROLLERS:
        values = {e["name"]: e.get("value") for e in _container(rendered, name)["env"]}
        assert values["DRIFTLOOP_CONFIG"] == "/etc/driftloop/fleet.yaml", name


def test_every_command_the_fleets_processes_run_exists():
    """monitor, scheduler, agent and rollout controller take the fleet file as it is."""
    from driftloop.app.cli import app

    objects = build(FLEET)
    assert _container(objects, "driftloop-monitor")["args"] == ["monitor"]
    assert _container(objects, "driftloop-scheduler")["args"] == ["scheduler"]
    assert _container(objects, "driftloop-agent")["args"] == ["agent", "run", "--cluster"]
    script = _container(objects, "driftloop-rollout")["args"][-1]  # infra/base's loop: the whole fleet file
    assert "driftloop rollout run & pid=$!" in script and "--model" not in script
    for args in (["monitor"], ["scheduler"], ["agent", "run"], ["rollout", "run"], ["config", "show"]):
        result = CliRunner().invoke(app, [*args, "--help"])
        assert result.exit_code == 0, f"driftloop {' '.join(args)}: {result.output}"
        if args[0] in ("rollout", "monitor", "agent"):
            assert "--model" in result.output


@pytest.fixture()
def tree(tmp_path) -> Path:
    shutil.copytree(ROOT / "infra", tmp_path / "infra")
    return tmp_path / "infra"


def test_an_invalid_fleet_file_is_one_problem_naming_the_configmap_and_key(tree):
    path = tree / "overlays" / "fleet" / "fleet.yaml"
    path.write_text(path.read_text().replace("gate: {metric: mae}", "gate: {metric: mae, marginn: 0.1}"))
    problems = check_target(tree / "overlays" / "fleet", tree)
    assert len(problems) == 1, problems
    text = str(problems[0])
    assert "ConfigMap driftloop/driftloop-config" in text and "infra/overlays/fleet" in text
    assert "driftloop configuration does not load: models.spend.gate.marginn: unknown key (fleet.yaml)" in text
    assert "/tmp" not in text  # the check's temporary copy is never named


def test_a_team_left_out_of_the_render_names_each_of_its_models(tree):
    kustomization = tree / "overlays" / "fleet" / "kustomization.yaml"
    kustomization.write_text(kustomization.read_text().replace("  - team-planning.yaml\n", ""))
    policy = tree / "overlays" / "fleet" / "monitor-ingress.yaml"
    policy.write_text(policy.read_text().replace('"spend", "spend-shadow"', '"spend-shadow"'))
    messages = sorted(p.message for p in check_target(tree / "overlays" / "fleet", tree))
    assert messages == [
        "fleet.yaml: models.demand.serving.namespace: namespace planning of model demand is not in this render "
        "(no Namespace or Profile of that name)",
        "fleet.yaml: models.spend.serving.logger_url: no NetworkPolicy of namespace driftloop admits the predictor "
        "pods of planning/spend (serving.kserve.io/inferenceservice=spend) to the monitor's port 8090/http",
        "fleet.yaml: models.spend.serving.namespace: namespace planning of model spend is not in this render "
        "(no Namespace or Profile of that name)",
    ]


# -- on the real kube-apiserver ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def kube(rendered):
    """The fleet overlay applied server-side (dry run first, every field read back); the test plays the quota controller."""
    kube = cluster()
    kube.apply([{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "kubeflow"}}])  # KFP's, not infra/'s
    apply_and_compare(kube, rendered, "infra/overlays/fleet")
    # the webhook's Service cannot be reached here: point it at this process's webhook again, or the next
    # InferenceService update of this test process would wait 5 s and fail (failurePolicy: Fail)
    point_webhook_here(kube)
    for team in TEAMS:
        play_quota_controller(kube, team)
    return kube


def _isvc(name: str, namespace: str) -> dict:
    return {"apiVersion": "serving.kserve.io/v1beta1", "kind": "InferenceService",
            "metadata": {"name": name, "namespace": namespace},
            "spec": {"predictor": {"containers": [{"name": "kserve-container", "image": "ghcr.io/driftloop/driftloop:0.1.0"}]}}}


def _refusal(call) -> tuple[int, str]:  # noqa: ANN001
    with pytest.raises(ApiException) as refused:
        call()
    return refused.value.status, json.loads(refused.value.body)["message"]


def test_a_teams_deployer_creates_in_its_namespace_is_refused_in_anothers_and_stops_at_its_count(kube):
    custom = k8s.CustomObjectsApi(kube.api_client(kube.token("growth", "driftloop-deployer")))
    quota = k8s.CoreV1Api(kube.admin).read_namespaced_resource_quota("driftloop-team", "growth")
    limit = int(quota.spec.hard[COUNT])
    assert limit == 4 and int(quota.status.used[COUNT]) == 0
    for i in range(limit):
        created = custom.create_namespaced_custom_object(*KSERVE, "growth", "inferenceservices", _isvc(f"fleet-infra-{i}", "growth"))
        assert created["metadata"]["namespace"] == "growth"
    assert custom.list_namespaced_custom_object(*KSERVE, "growth", "inferenceservices")["items"]
    status, message = _refusal(lambda: custom.create_namespaced_custom_object(
        *KSERVE, "planning", "inferenceservices", _isvc("fleet-infra-0", "planning")))
    assert status == 403 and 'User "system:serviceaccount:growth:driftloop-deployer" cannot create resource ' \
        '"inferenceservices"' in message and 'in the namespace "planning"' in message, message
    status, message = _refusal(lambda: custom.create_namespaced_custom_object(
        *KSERVE, "growth", "inferenceservices", _isvc(f"fleet-infra-{limit}", "growth")))
    assert status == 403 and "exceeded quota: driftloop-team" in message and f"limited: {COUNT}={limit}" in message, message
    for i in range(limit):  # the deployer may take its models down again
        custom.delete_namespaced_custom_object(*KSERVE, "growth", "inferenceservices", f"fleet-infra-{i}")


def test_the_fleets_controllers_may_drive_the_teams_models_and_nothing_else(kube):
    """What the rollout controller, the agent and the pipeline's deploy step (ServiceAccounts of driftloop and
    kubeflow) may do in a team's namespace, as the API server answers it (SubjectAccessReview)."""
    isvc = dict(group=KSERVE[0], resource="inferenceservices")
    rollout, agent = "system:serviceaccount:driftloop:driftloop-rollout", "system:serviceaccount:driftloop:driftloop-agent"
    pipeline = "system:serviceaccount:kubeflow:driftloop-pipeline"
    for team, models in TEAMS.items():
        assert kube.can(rollout, "patch", namespace=team, name=models[0], **isvc)
        assert kube.can(rollout, "delete", namespace=team, name=f"{models[0]}-shadow", **isvc)
        assert not kube.can(rollout, "delete", namespace=team, name=models[0], **isvc)
        assert kube.can(agent, "patch", namespace=team, **isvc) and not kube.can(agent, "create", namespace=team, **isvc)
        assert kube.can(pipeline, "update", namespace=team, **isvc) and not kube.can(pipeline, "delete", namespace=team, **isvc)
    assert not kube.can(rollout, "patch", namespace="kube-system", **isvc)


# -- the agent's admission webhook judges a fleet ----------------------------------------------------------------
FLEET_AGENT = "system:serviceaccount:driftloop:driftloop-agent"


def _fleet_policy(tmp_path: Path) -> Path:
    """The overlay's fleet file with two models' own agent policies: demand full, ceiling 4; spend full, ceiling 2."""
    text = (FLEET / "fleet.yaml").read_text()
    for model, ceiling in (("demand", 4), ("spend", 2)):
        text = text.replace(f"\n  {model}:\n", f"\n  {model}:\n    agent: {{mode: full, floor: 1, ceiling: {ceiling}}}\n", 1)
    path = tmp_path / "fleet.yaml"
    path.write_text(text)
    return path


def _agent_update(namespace: str, name: str, old: int, new: int, user: str = FLEET_AGENT) -> dict:
    def obj(n: int) -> dict:
        return {"metadata": {"name": name, "namespace": namespace}, "spec": {"predictor": {"minReplicas": n, "maxReplicas": n}}}
    return {"request": {"uid": "u", "operation": "UPDATE", "namespace": namespace, "name": name, "userInfo": {"username": user},
                        "resource": {"group": KSERVE[0], "version": KSERVE[1], "resource": "inferenceservices"},
                        "oldObject": obj(old), "object": obj(new)}}


def test_the_webhook_holds_each_models_inference_service_to_that_models_policy(tmp_path):
    """A fleet file: each team's InferenceService by its model's own agent policy, the fleet's agent being the
    ServiceAccount of driftloop; an InferenceService of no model is refused to the agent; anyone else passes."""
    from serving.admission import FleetPolicies, PolicySource, review

    policies, error = PolicySource(_fleet_policy(tmp_path), environ={}).current()
    assert error is None and isinstance(policies, FleetPolicies)
    assert set(policies.models) == {(t, n) for t, ns in TEAMS.items() for n in ns}

    def answer(doc: dict) -> tuple[bool, str]:
        out = review(doc, policies, agent_namespace="driftloop")["response"]
        return out["allowed"], out.get("status", {}).get("message", "")

    assert answer(_agent_update("planning", "demand", 2, 4)) == (True, "")
    assert answer(_agent_update("planning", "spend", 2, 4))[1].startswith("minReplicas 4 is above the ceiling 2")
    assert answer(_agent_update("planning", "demand", 2, 5))[1].startswith("minReplicas 5 is above the ceiling 4")
    assert answer(_agent_update("growth", "churn", 1, 2))[1] == "observe mode: the agent may change nothing"
    allowed, message = answer(_agent_update("planning", "stray", 1, 2))
    assert not allowed and message == (f"InferenceService planning/stray is no model of the fleet file {tmp_path / 'fleet.yaml'}: "
                                       "the agent has no policy for it")
    assert answer(_agent_update("growth", "demand", 1, 2))[0] is False  # demand is planning's, not growth's
    assert answer(_agent_update("planning", "stray", 1, 9, user="system:serviceaccount:planning:driftloop-deployer")) == (True, "")


def test_the_api_server_asks_the_fleets_webhook_for_the_agents_patches_in_a_teams_namespace(kube, tmp_path):
    """The overlay's webhook configuration (its own name here, its clientConfig on a webhook server of this test
    reading the fleet file with --agent-namespace driftloop): the fleet agent's patches of planning's models are
    judged by each model's policy, and of an InferenceService of no model refused, by the API server itself."""
    import base64
    import threading

    from cryptography.hazmat.primitives import serialization

    from serving.admission import WEBHOOK_NAME, AdmissionServer, PolicySource
    from tests.conftest import free_port
    from tests.kube_server import issue_cert, make_ca

    ca = make_ca("driftloop-fleet-webhook-ca")
    cert, key = issue_cert(ca, "driftloop-admission", dns=("driftloop-admission.driftloop.svc",))
    (tmp_path / "tls.crt").write_bytes(cert)
    (tmp_path / "tls.key").write_bytes(key)
    server = AdmissionServer(tmp_path / "tls.crt", tmp_path / "tls.key", PolicySource(_fleet_policy(tmp_path), environ={}),
                             port=free_port(), agent_namespace="driftloop")
    threading.Thread(target=server.serve_forever, daemon=True).start()
    (hooks,) = [d for d in build(FLEET) if d["kind"] == "ValidatingWebhookConfiguration"]
    hooks["metadata"]["name"] = "driftloop-fleet-guardrails-test"
    for hook in hooks["webhooks"]:
        hook["clientConfig"] = {"url": server.url, "caBundle": base64.b64encode(ca[0].public_bytes(serialization.Encoding.PEM)).decode()}
        hook["namespaceSelector"] = {"matchLabels": {"driftloop.io/team": "planning"}}
    admin = k8s.CustomObjectsApi(kube.admin)
    agent = k8s.CustomObjectsApi(kube.api_client(kube.token("driftloop", "driftloop-agent")))
    play_quota_controller(kube, "planning")
    names = ("demand", "spend", "stray")
    try:
        kube.apply([hooks])
        for name in names:
            body = _isvc(name, "planning")
            body["spec"]["predictor"].update(minReplicas=2, maxReplicas=2)
            admin.create_namespaced_custom_object(*KSERVE, "planning", "inferenceservices", body)

        def patch(name: str, n: int) -> dict:
            return agent.patch_namespaced_custom_object(*KSERVE, "planning", "inferenceservices", name,
                                                        {"spec": {"predictor": {"minReplicas": n, "maxReplicas": n}}})

        assert patch("demand", 4)["spec"]["predictor"]["minReplicas"] == 4  # within demand's ceiling of 4
        for name, n, reason in (("spend", 3, "minReplicas 3 is above the ceiling 2"),
                                ("stray", 3, "InferenceService planning/stray is no model of the fleet file")):
            status, message = _refusal(lambda: patch(name, n))
            assert status == 403 and f'admission webhook "{WEBHOOK_NAME}" denied the request: {reason}' in message, message
        live = {n: admin.get_namespaced_custom_object(*KSERVE, "planning", "inferenceservices", n)["spec"]["predictor"]["minReplicas"]
                for n in names}
        assert live == {"demand": 4, "spend": 2, "stray": 2}
    finally:
        k8s.AdmissionregistrationV1Api(kube.admin).delete_validating_webhook_configuration(hooks["metadata"]["name"])
        for name in names:
            try:
                admin.delete_namespaced_custom_object(*KSERVE, "planning", "inferenceservices", name)
            except ApiException:
                pass
        server.shutdown()
