"""infra/ and every tenant render applied to a real kube-apiserver (tests/kube_server.py).

Server-side apply, a server-side dry run first, then every object read back and compared with what
was sent: a field the server drops (pruned by a CRD's structural schema, or unknown to a core
kind) is a failure here -- 1.20 has no strict field validation, so the read-back is how an unknown
field is caught. The CRDs of infra/crds/ are structural and list the same properties as the compact
schemas the offline infra check uses. Tenants are kept apart by the API server itself: RBAC
(SubjectAccessReview and real ServiceAccount tokens) and admission (a ResourceQuota on GPUs).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from driftloop.app.infra_check import build, kustomize_targets
from driftloop.app.tenants import add_tenant, load_tenants, tenants_dir
from tests.kube_server import CRDS, FIELD_MANAGER, ROOT, cluster, missing, point_webhook_here, service_account_user

TENANTS = [dict(name="team-a", gpu=2, borrow=1, pool_gpus=8),
           dict(name="team-b", gpu=4, borrow=0, profile=True, owner="lead-b@example.com")]


@pytest.fixture(scope="module")
def kube():
    return cluster()


def _key(obj: dict) -> tuple[str, str, str, str]:
    meta = obj["metadata"]
    return obj["apiVersion"], obj["kind"], meta.get("namespace", ""), meta["name"]


def live_objects(kube, docs: list[dict]) -> dict[tuple, dict]:
    """Every object of ``docs`` as the server holds it now (one ``kubectl get -f -``)."""
    out = kube.kubectl("get", "-f", "-", "-o", "json", "--show-managed-fields", stdin=yaml.safe_dump_all(docs))
    items = json.loads(out.stdout)
    items = items.get("items", [items]) if items.get("kind") == "List" else [items]
    return {_key(i): i for i in items}


def apply_and_compare(kube, docs: list[dict], label: str) -> None:
    """Namespaces for real, then a dry run of everything (which persists nothing), then the apply;
    every object read back must hold every field that was sent, with the value sent."""
    namespaces = [d for d in docs if d["kind"] == "Namespace"]
    if namespaces:
        kube.apply(namespaces)
    rest = [d for d in docs if d["kind"] != "Namespace"]
    dry = kube.apply(rest, dry_run=True)
    assert "serverside-applied (server dry run)" in dry.stdout, dry.stdout
    kube.apply(rest)
    live = live_objects(kube, docs)
    problems = []
    for doc in docs:
        obj = live.get(_key(doc))
        if obj is None:
            problems.append(f"{label}: {doc['kind']} {doc['metadata']['name']} is not there after the apply")
            continue
        problems += [f"{label}: {doc['kind']} {doc['metadata'].get('namespace', '')}/{doc['metadata']['name']}{d}"
                     for d in missing(doc, obj)]
    assert not problems, "\n".join(problems)


# -- CRDs ------------------------------------------------------------------------------------------------
def _props(schema: dict, path: str = "") -> set[str]:
    out = set()
    for name, sub in (schema.get("properties") or {}).items():
        out.add(f"{path}.{name}")
        out |= _props(sub, f"{path}.{name}")
    if isinstance(schema.get("items"), dict):
        out |= _props(schema["items"], f"{path}[]")
    return out


def test_every_crd_is_structural_established_and_lists_what_the_compact_schemas_list(kube):
    from kubernetes import client

    from driftloop.app.infra_crds import CRD_SCHEMAS
    from driftloop.app.istio_crds import ISTIO_CRD_SCHEMAS
    from driftloop.app.tenant_crds import TENANT_CRD_SCHEMAS

    api = client.ApiextensionsV1Api(kube.admin)
    installed = {}
    for path in sorted(CRDS.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        assert path.read_text().startswith("# "), f"{path} has no header saying where it came from"
        for doc in yaml.safe_load_all(path.read_text()):
            crd = api.read_custom_resource_definition(doc["metadata"]["name"])
            conditions = {c.type: c.status for c in crd.status.conditions or []}
            assert conditions.get("Established") == "True", (path.name, conditions)
            assert conditions.get("NonStructuralSchema") is None, (path.name, conditions)
            version = doc["spec"]["versions"][0]
            installed[f"{doc['spec']['group']}/{version['name']}/{doc['spec']['names']['kind']}"] = \
                version["schema"]["openAPIV3Schema"]
    sent = {"serving.kserve.io/v1beta1/InferenceService", "trainer.kubeflow.org/v1alpha1/TrainJob",
            "trainer.kubeflow.org/v1alpha1/TrainingRuntime", *CRD_SCHEMAS, *TENANT_CRD_SCHEMAS, *ISTIO_CRD_SCHEMAS}
    assert sent <= set(installed), sorted(sent - set(installed))
    for key, compact in {**CRD_SCHEMAS, **TENANT_CRD_SCHEMAS, **ISTIO_CRD_SCHEMAS}.items():
        assert _props(installed[key]["properties"]["spec"]) == _props(compact["properties"]["spec"]), key


def test_structural_schemas_refuse_a_wrong_type_and_prune_an_unknown_field(kube):
    """What 1.20 does with a bad custom object: a wrong type is refused (422, naming the field); an
    unknown field is pruned silently -- the read-back of every apply below catches that."""
    isvc = {"apiVersion": "serving.kserve.io/v1beta1", "kind": "InferenceService",
            "metadata": {"name": "schema-probe", "namespace": "default"},
            "spec": {"predictor": {"minReplicas": "one", "containers": [{"name": "kserve-container", "image": "i"}]}}}
    out = kube.kubectl("apply", "--server-side", "--validate=false", "-f", "-", stdin=yaml.safe_dump(isvc), check=False)
    assert out.returncode != 0 and "spec.predictor.minReplicas" in out.stderr and "integer" in out.stderr, out.stderr
    isvc["spec"]["predictor"] = {"minReplica": 2, "containers": [{"name": "kserve-container", "image": "i"}]}
    kube.apply([isvc], client_validation=False)  # kubectl may refuse it itself once the CRD's OpenAPI is published
    live = live_objects(kube, [isvc])[_key(isvc)]
    assert missing(isvc, live) == [".spec.predictor.minReplica: dropped by the server"]
    kube.kubectl("delete", "-f", "-", stdin=yaml.safe_dump(isvc))


# -- infra/ ----------------------------------------------------------------------------------------------
def test_base_and_every_overlay_apply_server_side_and_read_back_unchanged(kube):
    """The Kubeflow Pipelines namespace is KFP's (not in infra/); the test creates it as KFP's install would."""
    kube.apply([{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "kubeflow"}}])
    targets = [t for t in kustomize_targets(ROOT / "infra")
               if t.parent.name != "tenants" and t.name not in ("model", "fleet")]  # model: in dev and prod
    assert [t.relative_to(ROOT).as_posix() for t in targets] == ["infra/base", "infra/overlays/dev",
                                                                 "infra/overlays/prod"]  # fleet: test_fleet_infra.py
    for target in targets:  # the platform alone, then each one-model install (base + model)
        docs = build(target)
        assert {d["kind"] for d in docs} >= {"ServiceMonitor", "PrometheusRule", "AlertmanagerConfig", "Role",
                                             "Deployment"}
        assert len([d for d in docs if d["kind"] == "InferenceService"]) == (0 if target.name == "base" else 1)
        apply_and_compare(kube, docs, target.relative_to(ROOT).as_posix())
        # the webhook's Service cannot be reached here: point it at this process's driftloop webhook
        # again, or the next InferenceService update would wait 5 s and fail (failurePolicy: Fail)
        point_webhook_here(kube)
    # the last apply (prod) owns every field it sent, under one field manager
    live = live_objects(kube, [d for d in docs if d["kind"] == "InferenceService"])
    (isvc,) = live.values()
    assert {m["manager"] for m in isvc["metadata"]["managedFields"]} == {FIELD_MANAGER}


# -- tenants -----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tenants(kube, tmp_path_factory) -> Path:
    """Two tenants rendered by `driftloop tenant add` (one a Kubeflow Profile) and applied: shared/ first, then
    each tenant; the test plays the Profile controller (namespace + quota) and the quota controller (status)."""
    infra = tmp_path_factory.mktemp("tenants") / "infra"
    for spec in TENANTS:
        spec = dict(spec)
        add_tenant(infra, spec.pop("name"), **spec)
    root = tenants_dir(infra)
    apply_and_compare(kube, build(root / "shared"), "tenants/shared")
    for t in load_tenants(infra):
        docs = build(root / t.name)
        if t.profile:  # the Profile controller makes the namespace and its quota from resourceQuotaSpec
            (profile,) = [d for d in docs if d["kind"] == "Profile"]
            kube.apply([profile])
            kube.apply([{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": t.namespace}},
                        {"apiVersion": "v1", "kind": "ResourceQuota",
                         "metadata": {"name": "kf-resource-quota", "namespace": t.namespace},
                         "spec": profile["spec"]["resourceQuotaSpec"]}])
        apply_and_compare(kube, docs, f"tenants/{t.name}")
        play_quota_controller(kube, t.namespace)
    return infra


def play_quota_controller(kube, namespace: str) -> None:
    """What kube-controller-manager's quota controller does first: status.hard from spec, nothing used.
    Without it the ResourceQuota admission plugin refuses every pod ("status unknown for quota")."""
    from kubernetes import client

    core = client.CoreV1Api(kube.admin)
    for quota in core.list_namespaced_resource_quota(namespace).items:
        hard = dict(quota.spec.hard or {})
        core.patch_namespaced_resource_quota_status(quota.metadata.name, namespace, {
            "status": {"hard": hard, "used": {k: "0" for k in hard}}})


def _granted(infra: Path, tenant: str) -> dict[str, set[tuple[str, str, str, str | None]]]:
    """ServiceAccount → (group, resource, verb, name or None) its Roles in the tenant's namespace grant."""
    docs = build(tenants_dir(infra) / tenant)
    roles = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Role"}
    out: dict[str, set] = {}
    for b in (d for d in docs if d["kind"] == "RoleBinding"):
        for s in b["subjects"]:
            out.setdefault(s["name"], set()).update(
                (g, r, v, (rule.get("resourceNames") or [None])[0]) for rule in roles[b["roleRef"]["name"]]["rules"]
                for g in rule["apiGroups"] for r in rule["resources"] for v in rule["verbs"])
    return out


def test_each_tenants_accounts_may_act_in_their_own_namespace_and_in_no_other(kube, tenants):
    """For every verb a tenant's Roles grant (every verb driftloop uses there), the API server says yes in
    the tenant's namespace and no in the other's -- asked for each ServiceAccount (SubjectAccessReview)."""
    assert [t.name for t in load_tenants(tenants)] == ["team-a", "team-b"]
    for own, other in (("team-a", "team-b"), ("team-b", "team-a")):
        granted = _granted(tenants, own)
        assert set(granted) == {"driftloop-pipeline", "driftloop-monitor", "driftloop-rollout"}
        for sa, verbs in granted.items():
            user = service_account_user(own, sa)
            for group, resource, verb, name in sorted(verbs, key=str):
                res, _, sub = resource.partition("/")
                ask = dict(group=group, resource=res, subresource=sub or None, name=name)
                assert kube.can(user, verb, namespace=own, **ask), (user, verb, resource, own)
                assert not kube.can(user, verb, namespace=other, **ask), (user, verb, resource, other)


def test_a_tenants_real_token_is_refused_in_the_other_namespace(kube, tenants):
    """Not only the review: team-a's rollout controller, with its own TokenRequest token, reads team-a's
    InferenceService and gets a 403 from RBAC on team-b's."""
    from kubernetes import client
    from kubernetes.client.rest import ApiException

    token = kube.token("team-a", "driftloop-rollout")
    api = client.CustomObjectsApi(kube.api_client(token))
    isvcs = [d for d in build(tenants_dir(tenants) / "team-a") if d["kind"] == "InferenceService"]
    name = isvcs[0]["metadata"]["name"]
    assert api.get_namespaced_custom_object("serving.kserve.io", "v1beta1", "team-a", "inferenceservices", name)
    other = [d for d in build(tenants_dir(tenants) / "team-b") if d["kind"] == "InferenceService"][0]
    with pytest.raises(ApiException) as refused:
        api.patch_namespaced_custom_object("serving.kserve.io", "v1beta1", "team-b", "inferenceservices",
                                           other["metadata"]["name"], {"spec": {"predictor": {"canaryTrafficPercent": 0}}})
    assert refused.value.status == 403
    assert 'User "system:serviceaccount:team-a:driftloop-rollout" cannot patch resource "inferenceservices"' \
        in json.loads(refused.value.body)["message"]


def _gpu_pod(name: str, namespace: str, gpus: int) -> dict:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": namespace},
            "spec": {"containers": [{"name": "train", "image": "ghcr.io/driftloop/driftloop:0.1.0",
                                     "resources": {"limits": {"nvidia.com/gpu": str(gpus)},
                                                   "requests": {"nvidia.com/gpu": str(gpus)}}}]}}


def test_a_pod_asking_more_gpus_than_the_tenants_quota_is_refused_by_admission(kube, tenants):
    """team-a may use 2 + 1 borrowed GPUs: a pod asking 4 is refused by the ResourceQuota plugin; 3 fit."""
    from kubernetes import client
    from kubernetes.client.rest import ApiException

    core = client.CoreV1Api(kube.admin)
    quota = core.read_namespaced_resource_quota("driftloop", "team-a")
    assert quota.spec.hard["requests.nvidia.com/gpu"] == "3"
    with pytest.raises(ApiException) as refused:
        core.create_namespaced_pod("team-a", _gpu_pod("too-many-gpus", "team-a", 4))
    assert refused.value.status == 403
    message = json.loads(refused.value.body)["message"]
    assert "exceeded quota: driftloop" in message and "requests.nvidia.com/gpu=4" in message, message
    created = core.create_namespaced_pod("team-a", _gpu_pod("fits", "team-a", 3))
    assert created.spec.containers[0].resources.requests["cpu"] == "100m"  # the tenant's LimitRange defaulted it
    core.delete_namespaced_pod("fits", "team-a", grace_period_seconds=0)
    # team-b (a Profile) gets its quota from the Profile's resourceQuotaSpec: 4 GPUs, no borrowing
    with pytest.raises(ApiException) as refused:
        core.create_namespaced_pod("team-b", _gpu_pod("too-many-gpus", "team-b", 5))
    assert "exceeded quota: kf-resource-quota" in json.loads(refused.value.body)["message"]
