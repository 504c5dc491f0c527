"""The agent's guardrails at admission: driftloop's validating webhook (serving.admission), called by a
real kube-apiserver for the agent's own ServiceAccount token, refuses every kind of out-of-policy
change and allows an in-policy one; the policy is the file the agent reads. The same rules as an OPA
Gatekeeper ConstraintTemplate + Constraint, applied to the API server (schemas) and evaluated with a
Rego interpreter (regopy, rego-cpp) on the same table of cases as the webhook; of a fleet file, one
Constraint deciding each model's InferenceService as the webhook does with that model's policy, and
``driftloop infra gatekeeper`` printing both for kubectl.
"""

from __future__ import annotations

import datetime as dt
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from kubernetes import client as k8s
from kubernetes.client.rest import ApiException

from driftloop.core.errors import ServingError
from driftloop.core.fleet import load_fleet
from serving.admission import (_REGO, WEBHOOK_NAME, FleetPolicies, Verdict, constraint_template, judge, policies_of,
                               review)
from serving.agent.actions import KServeActuator
from serving.agent.policy import Policy
from tests.conftest import make_settings
from tests.kube_server import DEFAULT_AGENT_POLICY, ROOT, guardrails, infra_applied
from tests.test_kube_paths import ISVC, NS, kserve_client, put_up, settings_for

AGENT = f"system:serviceaccount:{NS}:driftloop-agent"
KILL = "driftloop.io/agent-paused"
NOW = dt.datetime(2026, 12, 7, 12, 0, tzinfo=dt.timezone.utc).timestamp()



def around_now() -> str:
    """A blackout window (UTC) from the hour before the present to two hours after it: a test that reads the
    clock at different moments stays inside it."""
    hour = time.gmtime().tm_hour
    return f"{(hour - 1) % 24:02d}:00-{(hour + 2) % 24:02d}:00"

def isvc(min_replicas: int = 2, max_replicas: int | None = 5, canary: int | None = None, **annotations: str) -> dict:
    predictor: dict = {"minReplicas": min_replicas, "containers": [{"name": "kserve-container", "image": "i"}]}
    if max_replicas is not None:
        predictor["maxReplicas"] = max_replicas
    if canary is not None:
        predictor["canaryTrafficPercent"] = canary
    return {"apiVersion": "serving.kserve.io/v1beta1", "kind": "InferenceService",
            "metadata": {"name": "churn", "namespace": NS, "annotations": dict(annotations)},
            "spec": {"predictor": predictor}}


POLICY = dict(mode="full", floor=2, ceiling=8, max_step=2, blackout=())
# (name, policy overrides, old, new, allowed, reason contains)
CASES = [
    ("in policy", {}, isvc(2), isvc(4), True, "within the policy"),
    ("no change", {}, isvc(2), isvc(2), True, "no change"),
    ("below the floor", {}, isvc(3), isvc(1), False, "below the floor 2"),
    ("above the ceiling", {}, isvc(7), isvc(9), False, "above the ceiling 8"),
    ("a planned step too large", {"max_step": 1}, isvc(5), isvc(3), False, "more than the 1"),
    ("an urgent raise is bounded too", {}, isvc(2), isvc(7), False, "step of 5, more than the 4"),
    ("blackout window", {"blackout": ("11:00-13:00",)}, isvc(2), isvc(3), False, "blackout window 11:00-13:00"),
    ("kill switch", {}, isvc(2, **{KILL: "true"}), isvc(3, **{KILL: "true"}), False, "kill switch"),
    ("lifting the kill switch itself", {}, isvc(2, **{KILL: "true"}), isvc(2), False, "may change only"),
    ("another field", {}, isvc(2), {**isvc(2), "spec": {"predictor": {**isvc(2)["spec"]["predictor"],
                                                                       "containers": [{"name": "x", "image": "evil"}]}}},
     False, "may change only"),
    ("observe mode", {"mode": "observe"}, isvc(2), isvc(3), False, "observe mode"),
    ("scale-up may not lower", {"mode": "scale-up"}, isvc(4), isvc(3), False, "may not lower a floor"),
    ("canary rollback in full mode", {}, isvc(2, canary=20), isvc(2, canary=0), True, "within the policy"),
    ("canary rollback in scale-up", {"mode": "scale-up"}, isvc(2, canary=20), isvc(2, canary=0), False,
     "may not roll back"),
    ("the agent may not push a canary", {}, isvc(2, canary=20), isvc(2, canary=50), False, "may only roll a canary back"),
    ("owning the count", {}, isvc(2, 5), isvc(3, 3), True, "within the policy"),
    ("maxReplicas elsewhere", {}, isvc(2, 5), isvc(2, 7), False, "maxReplicas 7 is neither"),
    ("hand-back in a blackout", {"blackout": ("11:00-13:00",)}, isvc(3, 3), isvc(3, 5), True, "hand-back"),
]


@pytest.mark.parametrize("name,overrides,old,new,allowed,reason", CASES, ids=[c[0] for c in CASES])
def test_webhook_judges_the_agents_changes(name, overrides, old, new, allowed, reason):
    verdict = judge(old, new, policy=Policy(**{**POLICY, **overrides}), kill_annotation=KILL, max_replicas=5, now=NOW)
    assert verdict.allowed is allowed and reason in verdict.reason, verdict


def test_only_the_agents_updates_are_judged_and_an_unreadable_policy_refuses_the_agent(tmp_path):
    s = make_settings(tmp_path, tmp_path / "x.parquet", **{"agent.mode": "observe"})
    request = {"uid": "u1", "operation": "UPDATE", "namespace": NS, "name": "churn",
               "resource": {"group": "serving.kserve.io", "version": "v1beta1", "resource": "inferenceservices"},
               "userInfo": {"username": AGENT}, "oldObject": isvc(2), "object": isvc(3)}
    out = review({"request": request}, s)["response"]
    assert out == {"uid": "u1", "allowed": False,
                   "status": {"code": 403, "reason": "Forbidden", "message": "observe mode: the agent may change nothing"}}
    rollout = {**request, "userInfo": {"username": f"system:serviceaccount:{NS}:driftloop-rollout"}}
    assert review({"request": rollout}, s)["response"] == {"uid": "u1", "allowed": True}
    other_ns = {**request, "namespace": "team-a"}  # the agent of driftloop is not team-a's agent
    assert review({"request": other_ns}, s)["response"]["allowed"] is True
    broken = review({"request": request}, None, policy_error="agent.floor: not an integer")["response"]
    assert broken["allowed"] is False and "policy cannot be read: agent.floor" in broken["status"]["message"]


# -- the real API server calls it ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def kube():
    return infra_applied()


@pytest.fixture
def agent_isvc(kube, tmp_path):
    """An InferenceService at minReplicas 2 (maxReplicas 5), the agent's patching client, a policy to set."""
    s = settings_for(tmp_path, f"churn-guard-{int(time.time() * 1000) % 100000}", **{"serving.max_replicas": 5})
    put_up(kube, s)
    patch_as_admin(kube, s.serving.name, {"spec": {"predictor": {"minReplicas": 2}}})
    hooks = guardrails()
    yield s, k8s.CustomObjectsApi(kube.api_client(kube.token(NS, "driftloop-agent"))), hooks
    hooks.use(DEFAULT_AGENT_POLICY)


def patch_as_admin(kube, name: str, body: dict) -> dict:
    return k8s.CustomObjectsApi(kube.admin).patch_namespaced_custom_object(*ISVC[:2], NS, ISVC[2], name, body)


def refusal(api, name: str, body: dict, **kwargs) -> str:
    with pytest.raises(ApiException) as refused:
        api.patch_namespaced_custom_object(*ISVC[:2], NS, ISVC[2], name, body, **kwargs)
    assert refused.value.status == 403, refused.value.body
    message = json.loads(refused.value.body)["message"]
    assert message.startswith(f'admission webhook "{WEBHOOK_NAME}" denied the request: '), message
    return message.split("denied the request: ", 1)[1]


def min_replicas(n: int) -> dict:
    return {"spec": {"predictor": {"minReplicas": n}}}


def test_the_api_server_asks_the_webhook_and_refuses_each_out_of_policy_patch_of_the_agent(kube, agent_isvc):
    s, api, hooks = agent_isvc
    name = s.serving.name
    hooks.use({**POLICY, "blackout": []}, max_replicas=5)
    assert refusal(api, name, min_replicas(1)) == "minReplicas 1 is below the floor 2 of " + name
    assert refusal(api, name, min_replicas(9)).startswith("minReplicas 9 is above the ceiling 8")
    hooks.use({**POLICY, "blackout": [], "max_step": 1, "ceiling": 20}, max_replicas=5)
    patch_as_admin(kube, name, min_replicas(6))  # a person may do anything the RBAC lets them
    assert "more than the 1 the policy allows" in refusal(api, name, min_replicas(4))
    hooks.use({**POLICY, "blackout": [around_now()]},
              max_replicas=5)
    assert refusal(api, name, min_replicas(5)).startswith("blackout window")
    hooks.use({**POLICY, "blackout": []}, max_replicas=5)
    patch_as_admin(kube, name, {"metadata": {"annotations": {KILL: "true"}}})
    assert refusal(api, name, min_replicas(5)) == f"kill switch: annotation {KILL}=true"
    assert "may change only" in refusal(api, name, {"metadata": {"annotations": {KILL: None}}})
    hooks.use({**POLICY, "mode": "observe", "blackout": []}, max_replicas=5)
    assert refusal(api, name, min_replicas(7)) == "observe mode: the agent may change nothing"
    # none of it landed
    live = api.get_namespaced_custom_object(*ISVC[:2], NS, ISVC[2], name)
    assert live["spec"]["predictor"]["minReplicas"] == 6 and live["metadata"]["annotations"][KILL] == "true"


def test_an_in_policy_change_passes_and_the_agents_dry_run_is_judged_too(kube, agent_isvc):
    s, api, hooks = agent_isvc
    name = s.serving.name
    hooks.use({**POLICY, "blackout": []}, max_replicas=5)
    out = api.patch_namespaced_custom_object(*ISVC[:2], NS, ISVC[2], name, min_replicas(4))
    assert out["spec"]["predictor"]["minReplicas"] == 4
    # the agent's own path: dry run first (dryRun=All reaches the webhook: sideEffects None), then the patch
    actuator = KServeActuator(s, client=kserve_client(kube, NS, "driftloop-agent"))
    with pytest.raises(ServingError) as refused:
        actuator.set_floor(name, 1)
    text = str(refused.value)
    assert "(dry run)" in text and "below the floor 2" in text and "\n" not in text, text
    assert actuator.set_floor(name, 5).startswith("spec.predictor.minReplicas=5")
    # everyone else passes untouched: the rollout controller pushes a canary the agent may not
    rollout = k8s.CustomObjectsApi(kube.api_client(kube.token(NS, "driftloop-rollout")))
    rollout.patch_namespaced_custom_object(*ISVC[:2], NS, ISVC[2], name, {"spec": {"predictor": {"canaryTrafficPercent": 30}}})


# -- OPA Gatekeeper: the same rules -------------------------------------------------------------------------------
def _gatekeeper_settings(tmp_path, overrides: dict):
    policy = {**POLICY, **overrides}
    return make_settings(tmp_path, tmp_path / "x.parquet", **{
        "agent.mode": policy["mode"], "agent.floor": policy["floor"], "agent.ceiling": policy["ceiling"],
        "agent.max_step": policy["max_step"], "agent.blackout": list(policy["blackout"]),
        "agent.kill_switch_annotation": KILL, "serving.max_replicas": 5})


def rego_verdict(interpreter, constraint: dict, old: dict, new: dict, now: float, *, namespace: str = NS,
                 user: str = AGENT) -> Verdict:
    review_doc = {"operation": "UPDATE", "namespace": namespace, "userInfo": {"username": user}, "object": new,
                  "oldObject": old}
    interpreter.set_input_term(json.dumps({"review": review_doc, "parameters": constraint["spec"]["parameters"]}))
    result = json.loads(str(interpreter.query("data.driftloopagentguardrails.violation")))["expressions"][0]
    messages = sorted(json.loads(key)["msg"] for key in result)  # rego-cpp answers the set as {member: true}
    return Verdict(not messages, "; ".join(messages))


@pytest.mark.parametrize("name,overrides,old,new,allowed,reason", CASES, ids=[c[0] for c in CASES])
def test_gatekeeper_rego_decides_every_case_as_the_webhook_does(tmp_path, name, overrides, old, new, allowed, reason):
    """Rego's clock is its own: the blackout cases use a window around the real present instead of NOW."""
    from regopy import Interpreter

    if overrides.get("blackout"):
        overrides = {**overrides, "blackout": (around_now(),)}
    now = time.time() if overrides.get("blackout") else NOW
    _, constraint = constraint_template(_gatekeeper_settings(tmp_path, overrides))
    interpreter = Interpreter()
    interpreter.add_module("guardrails", _REGO)
    webhook = judge(old, new, policy=Policy(**{**POLICY, **overrides}), kill_annotation=KILL, max_replicas=5, now=now)
    assert webhook.allowed is allowed
    assert rego_verdict(interpreter, constraint, old, new, now).allowed is allowed, name


def applied_constraint(kube, template: dict, constraint: dict) -> dict:
    """``template`` and ``constraint`` applied as the test below says (a Constraint of an earlier test deleted
    first: server-side apply would keep its empty maps); the Constraint as the API server keeps it."""
    from kubernetes import client

    from tests.kube_server import wait_for

    kube.apply([template])
    kind = template["spec"]["crd"]["spec"]["names"]["kind"]
    schema = {"type": "object", "properties": {"spec": {"type": "object", "properties": {
        "enforcementAction": {"type": "string"},
        "match": {"type": "object", "x-kubernetes-preserve-unknown-fields": True},
        "parameters": template["spec"]["crd"]["spec"]["validation"]["openAPIV3Schema"]}}}}
    names = {"kind": kind, "plural": kind.lower(), "singular": kind.lower(), "listKind": kind + "List"}
    crd = {"apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
           "metadata": {"name": f"{kind.lower()}.constraints.gatekeeper.sh"},
           "spec": {"group": "constraints.gatekeeper.sh", "scope": "Cluster", "names": names,
                    "versions": [{"name": "v1beta1", "served": True, "storage": True,
                                  "schema": {"openAPIV3Schema": schema}}]}}
    kube.apply([crd])
    api = client.ApiextensionsV1Api(kube.admin)
    wait_for(lambda: any(c.type == "Established" and c.status == "True"
                         for c in api.read_custom_resource_definition(crd["metadata"]["name"]).status.conditions or []),
             what="the constraint kind's CRD")
    wait_for(lambda: kube.kubectl("get", f"{kind.lower()}.constraints.gatekeeper.sh", check=False).returncode == 0,
             what="the constraint kind in discovery")
    kube.kubectl("delete", f"{kind.lower()}.constraints.gatekeeper.sh", "driftloop-agent", "--ignore-not-found")
    kube.apply([constraint])
    return json.loads(kube.kubectl("get", f"{kind.lower()}.constraints.gatekeeper.sh", "driftloop-agent",
                                   "-o", "json").stdout)


def refused_apply(kube, doc: dict) -> str:
    """The API server's refusal of ``doc`` (server-side apply), its stderr."""
    out = kube.kubectl("apply", "--server-side", "-f", "-", stdin=json.dumps(doc), check=False)
    assert out.returncode != 0, out.stdout
    return out.stderr


def test_gatekeeper_template_and_constraint_pass_the_api_servers_schemas(kube, tmp_path):
    """The ConstraintTemplate against Gatekeeper's CRD; the Constraint against the CRD Gatekeeper's controller
    makes from the template (the test plays it: the template's parameters schema is its spec.parameters)."""
    template, constraint = constraint_template(_gatekeeper_settings(tmp_path, {"blackout": ("22:00-06:00",)}))
    live = applied_constraint(kube, template, constraint)
    assert live["spec"]["parameters"] == constraint["spec"]["parameters"]  # nothing pruned
    assert live["spec"]["parameters"]["blackout"] == [{"start": 1320, "end": 360}]
    bad = json.loads(json.dumps(constraint))
    bad["spec"]["parameters"]["floor"] = "two"
    stderr = refused_apply(kube, bad)
    assert "spec.parameters.floor" in stderr, stderr


# -- OPA Gatekeeper: a fleet file in one Constraint -------------------------------------------------------------
FLEET_AGENT = "system:serviceaccount:driftloop:driftloop-agent"


def _fleet(tmp_path: Path) -> FleetPolicies:
    """Three models of two teams, each with its own policy: churn (growth) full, ceiling 8, step 2, max 5;
    demand (planning) scale-up, ceiling 3 but 4 for its own InferenceService, step 1, max 4; spend (planning)
    full, in a blackout window around the present hour."""
    own = {
        "churn": ("growth", {"mode": "full", "floor": 2, "ceiling": 8, "max_step": 2}, 5),
        "demand": ("planning", {"mode": "scale-up", "floor": 1, "ceiling": 3, "max_step": 1,
                                "models": {"demand": {"ceiling": 4}}}, 4),
        "spend": ("planning", {"mode": "full", "blackout": [around_now()]}, 5),
    }
    models = {name: {"team": team, "data": {"source": str(tmp_path / f"{name}.parquet")}, "agent": agent,
                     "serving": {"max_replicas": top}} for name, (team, agent, top) in own.items()}
    path = tmp_path / "fleet.yaml"
    path.write_text(yaml.safe_dump({"workspace": str(tmp_path / "fleet"), "models": models,
                                    "defaults": {"data": {"time_column": "event_time"},
                                                 "agent": {"kill_switch_annotation": KILL}}}))
    policies = policies_of(load_fleet(path, environ={}))
    assert isinstance(policies, FleetPolicies)
    return policies


def _at(obj: dict, namespace: str, name: str) -> dict:
    out = json.loads(json.dumps(obj))
    out["metadata"].update(name=name, namespace=namespace)
    return out


def webhook_verdict(policies, old: dict, new: dict, *, namespace: str, user: str = FLEET_AGENT,
                    agent_namespace: str | None = "driftloop") -> Verdict:
    name = new["metadata"]["name"]
    request = {"uid": "u", "operation": "UPDATE", "namespace": namespace, "name": name, "userInfo": {"username": user},
               "resource": {"group": "serving.kserve.io", "version": "v1beta1", "resource": "inferenceservices"},
               "oldObject": old, "object": new}
    out = review({"request": request}, policies, agent_namespace=agent_namespace, now=time.time())["response"]
    return Verdict(out["allowed"], out.get("status", {}).get("message", ""))


# every change of the webhook's table, and two raises that only the models' ceilings tell apart
FLEET_CHANGES = [(c[0], c[2], c[3]) for c in CASES] + [("to 4", isvc(2), isvc(4)), ("to 5", isvc(2), isvc(5))]


def test_gatekeeper_rego_decides_each_fleet_models_changes_as_the_webhook_does(tmp_path):
    """One Constraint for the fleet (the agent a ServiceAccount of driftloop): for each model's InferenceService
    and each change, the Rego's verdict is the webhook's with that model's policy; the models' policies differ,
    and so do their verdicts."""
    from regopy import Interpreter

    policies = _fleet(tmp_path)
    _, constraint = constraint_template(policies, agent_namespace="driftloop")
    assert set(constraint["spec"]["parameters"]["fleet"]) == {"growth/churn", "planning/demand", "planning/spend"}
    interpreter = Interpreter()
    interpreter.add_module("guardrails", _REGO)
    verdicts = {}
    for namespace, name in policies.models:
        row = []
        for change, old, new in FLEET_CHANGES:
            old, new = _at(old, namespace, name), _at(new, namespace, name)
            webhook = webhook_verdict(policies, old, new, namespace=namespace)
            rego = rego_verdict(interpreter, constraint, old, new, time.time(), namespace=namespace, user=FLEET_AGENT)
            assert rego.allowed is webhook.allowed, (namespace, name, change, webhook, rego)
            row.append(webhook.allowed)
        verdicts[namespace, name] = tuple(row)
    assert len(set(verdicts.values())) == 3, verdicts  # each model judged by its own policy
    at = {change: i for i, (change, _, _) in enumerate(FLEET_CHANGES)}
    assert verdicts["growth", "churn"][at["to 5"]] and not verdicts["planning", "demand"][at["to 5"]]
    assert verdicts["planning", "demand"][at["to 4"]]  # its own InferenceService's ceiling, not the policy's 3
    assert not verdicts["planning", "spend"][at["in policy"]]  # the blackout
    assert verdicts["planning", "spend"][at["hand-back in a blackout"]]


def test_the_fleets_constraint_refuses_the_agent_an_inference_service_of_no_model_and_knows_it_by_agent_namespace(
        tmp_path):
    from regopy import Interpreter

    policies = _fleet(tmp_path)
    interpreter = Interpreter()
    interpreter.add_module("guardrails", _REGO)
    _, constraint = constraint_template(policies, agent_namespace="driftloop")
    for namespace, name in (("planning", "stray"), ("growth", "demand")):  # demand is planning's, not growth's
        old, new = _at(isvc(2), namespace, name), _at(isvc(3), namespace, name)
        webhook = webhook_verdict(policies, old, new, namespace=namespace)
        rego = rego_verdict(interpreter, constraint, old, new, NOW, namespace=namespace, user=FLEET_AGENT)
        assert not webhook.allowed and not rego.allowed
        assert rego.reason == (f"InferenceService {namespace}/{name} is no model of the fleet: the agent has no "
                               "policy for it")
    # demand's ceiling is 4: driftloop's agent is judged in planning, planning's own ServiceAccount is not the agent
    old, new = _at(isvc(2), "planning", "demand"), _at(isvc(5), "planning", "demand")
    assert rego_verdict(interpreter, constraint, old, new, NOW, namespace="planning", user=FLEET_AGENT).reason \
        == "minReplicas 5 is above the ceiling 4"
    team_agent = "system:serviceaccount:planning:driftloop-agent"
    assert webhook_verdict(policies, old, new, namespace="planning", user=team_agent).allowed
    assert rego_verdict(interpreter, constraint, old, new, NOW, namespace="planning", user=team_agent).allowed
    # rendered without agentNamespace the agent is looked for in planning: driftloop's is not recognised
    _, local = constraint_template(policies)
    assert "agentNamespace" not in local["spec"]["parameters"]
    assert webhook_verdict(policies, old, new, namespace="planning", agent_namespace=None).allowed
    assert rego_verdict(interpreter, local, old, new, NOW, namespace="planning", user=FLEET_AGENT).allowed
    assert not rego_verdict(interpreter, local, old, new, NOW, namespace="planning", user=team_agent).allowed


def test_the_fleets_constraint_passes_the_api_servers_schema(kube, tmp_path):
    template, constraint = constraint_template(_fleet(tmp_path), agent_namespace="driftloop")
    live = applied_constraint(kube, template, constraint)
    assert live["spec"]["parameters"] == constraint["spec"]["parameters"]  # nothing pruned
    assert live["spec"]["parameters"]["fleet"]["planning/demand"]["models"] == {"demand": {"ceiling": 4}}
    bad = json.loads(json.dumps(constraint))
    bad["spec"]["parameters"]["fleet"]["planning/demand"]["ceiling"] = "four"
    stderr = refused_apply(kube, bad)
    assert "spec.parameters.fleet" in stderr and "ceiling" in stderr, stderr


def gatekeeper_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "driftloop.app.cli", "infra", "gatekeeper", *args],
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("config,args,render", [
    ("infra/overlays/fleet/fleet.yaml", ["--agent-namespace", "driftloop"], {"agent_namespace": "driftloop"}),
    ("examples/demo.yaml", ["--service-account", "guardrails-agent"], {"service_account": "guardrails-agent"})])
def test_driftloop_infra_gatekeeper_prints_the_template_and_constraint_for_kubectl(config, args, render):
    out = gatekeeper_cli("-c", str(ROOT / config), *args)
    assert out.returncode == 0, out.stderr
    docs = list(yaml.safe_load_all(out.stdout))
    assert docs == constraint_template(policies_of(load_fleet(ROOT / config)), **render)
    assert "rego: |" in out.stdout  # the Rego as a block a person can read
    parameters = docs[1]["spec"]["parameters"]
    if "fleet" in config:
        assert parameters["agentNamespace"] == "driftloop" and parameters["serviceAccount"] == "driftloop-agent"
        assert sorted(parameters["fleet"]) == ["growth/churn", "growth/upsell", "planning/demand", "planning/spend"]
        assert "mode" not in parameters
    else:
        assert parameters["serviceAccount"] == "guardrails-agent" and parameters["mode"] == "observe"
        assert "fleet" not in parameters and "agentNamespace" not in parameters


def test_driftloop_infra_gatekeeper_refuses_a_broken_configuration_in_one_line(tmp_path):
    config = tmp_path / "broken.yaml"
    config.write_text("agent:\n  floor: two\n")
    out = gatekeeper_cli("-c", str(config))
    assert out.returncode == 2 and out.stdout == "", out.stdout
    (line,) = out.stderr.strip().splitlines()
    assert line.startswith("error:") and "agent.floor" in line, out.stderr
