"""Tenants: golden renders, every object validated (kubernetes-validate, pinned Kueue/Profile
schemas), invariants as properties over generated tenant sets, refusals that write nothing,
MLflow spaces kept apart on a real tracking server, two local loops side by side."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pytest
import yaml
from hypothesis import HealthCheck, given, settings as hsettings, strategies as st
from typer.testing import CliRunner

from driftloop.app.cli import app
from driftloop.app.infra_check import build, check_target, main as infra_main
from driftloop.app.tenants import (
    RESERVED_NAMES, TenantError, add_tenant, check_invariants, load_pool, load_rendered, load_tenants,
    remove_tenant, tenant_problems, tenants_dir,
)
from driftloop.core.config import load_settings
from driftloop.core.processes import free_port, spawn, stop_process

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = Path(__file__).resolve().parent / "golden" / "tenants"
UPDATE = os.environ.get("DRIFTLOOP_UPDATE_GOLDEN") == "1"

ONE = [dict(name="team-a", gpu=2, borrow=2, pool_gpus=8)]
THREE = ONE + [dict(name="team-b", gpu=4, borrow=0, cpu="32", memory="128Gi", profile=True, owner="lead-b@example.com",
                    source="s3://team-b-data/events.parquet"),
               dict(name="team-c", gpu=0, borrow=4)]


def _render(root: Path, specs: list[dict]) -> Path:
    infra = root / "infra"
    for spec in specs:
        spec = dict(spec)
        add_tenant(infra, spec.pop("name"), **spec)
    return infra


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# --- golden renders ---------------------------------------------------------------------------------
@pytest.mark.parametrize("case,specs", [("one", ONE), ("three", THREE)])
def test_golden_render(tmp_path, case, specs):
    infra = _render(tmp_path, specs)
    got = _files(tenants_dir(infra))
    golden = GOLDEN / case
    if UPDATE:
        shutil.rmtree(golden, ignore_errors=True)
        for rel, data in got.items():
            (golden / rel).parent.mkdir(parents=True, exist_ok=True)
            (golden / rel).write_bytes(data)
    want = _files(golden)
    assert sorted(got) == sorted(want), "rendered files differ from the golden set (DRIFTLOOP_UPDATE_GOLDEN=1 renews)"
    for rel in want:
        assert got[rel].decode() == want[rel].decode(), f"{rel} differs from tests/golden/tenants/{case}/{rel}"


def test_golden_three_tenants_say_what_the_issue_asks():
    """Read the golden files themselves: quota covers nominal + borrowed, queues, profile, no secret values."""
    g = GOLDEN / "three"
    quota = yaml.safe_load_all((g / "team-a" / "quota.yaml").read_text())
    assert next(d for d in quota if d["kind"] == "ResourceQuota")["spec"]["hard"]["requests.nvidia.com/gpu"] == "4"
    profile = yaml.safe_load((g / "team-b" / "namespace.yaml").read_text())
    assert profile["kind"] == "Profile" and profile["spec"]["owner"]["name"] == "lead-b@example.com"
    assert profile["spec"]["resourceQuotaSpec"]["hard"]["requests.nvidia.com/gpu"] == "4"
    assert not (g / "team-b" / "quota.yaml").read_text().count("kind: ResourceQuota")  # the Profile carries it
    cq, lq = yaml.safe_load_all((g / "team-c" / "queue.yaml").read_text())
    gpu = cq["spec"]["resourceGroups"][0]["flavors"][0]["resources"][2]
    assert gpu == {"name": "nvidia.com/gpu", "nominalQuota": 0, "borrowingLimit": 4}
    assert cq["spec"]["cohort"] == "driftloop" and lq["spec"]["clusterQueue"] == "driftloop-team-c"
    cfg = yaml.safe_load((g / "team-a" / "config" / "driftloop.yaml").read_text())
    assert cfg["kfp"]["queue_name"] == "team-a" and cfg["mlflow"]["workspace"] == "team-a"
    assert cfg["rollout"]["prometheus_url"]  # the rollout controller reads canary metrics of its namespace there
    assert yaml.safe_load((g / "shared" / "resource-flavor.yaml").read_text())["kind"] == "ResourceFlavor"
    for path in g.rglob("*.yaml"):
        for doc in yaml.safe_load_all(path.read_text()):
            assert not (isinstance(doc, dict) and doc.get("kind") == "Secret"), f"{path}: a Secret is rendered"


# --- every object validated by the infra check ------------------------------------------------------
@pytest.fixture(scope="module")
def three(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("three")
    _render(root, THREE)
    return root


def test_infra_check_validates_every_tenant_like_the_base(tmp_path, three):
    shutil.copytree(ROOT / "infra" / "base", tmp_path / "infra" / "base")
    shutil.copytree(three / "infra" / "tenants", tmp_path / "infra" / "tenants")
    result = CliRunner().invoke(app, ["infra", "check", "--root", str(tmp_path)])
    assert result.exit_code == 0, result.output
    for label in ("base", "tenants/shared", "tenants/team-a", "tenants/team-b", "tenants/team-c"):
        assert label in result.output
    # what kustomize renders: the tenant's ConfigMaps are generated in its namespace, with the MLflow workspace
    objects = build(three / "infra" / "tenants" / "team-a")
    env = next(o for o in objects if o["kind"] == "ConfigMap" and o["metadata"]["name"].startswith("driftloop-env"))
    assert env["metadata"]["namespace"] == "team-a" and env["data"]["MLFLOW_WORKSPACE"] == "team-a"
    monitor = next(o for o in objects if o["kind"] == "Deployment" and o["metadata"]["name"] == "driftloop-monitor")
    assert monitor["spec"]["template"]["spec"]["volumes"][0]["configMap"]["name"].startswith("driftloop-config-")


@pytest.mark.parametrize("file,old,new,expect", [
    ("team-a/queue.yaml", "queueingStrategy: BestEffortFIFO", "queueingStrategy: Fifo",
     "field spec.queueingStrategy: 'Fifo' is not one of"),
    ("team-a/queue.yaml", "  clusterQueue: driftloop-team-a", "  clusterQueu: driftloop-team-a",
     "field spec.clusterQueu: unknown to the CRD"),
    ("team-b/namespace.yaml", "    kind: User", "    knd: User", "field spec.owner.kind: required by the CRD"),
    ("shared/resource-flavor.yaml", "  nodeLabels: {}", "  nodeLabels: []", "field spec.nodeLabels: must be object"),
    ("team-a/network-policy.yaml", "policyTypes:", "policyType:", "policyType"),
])
def test_infra_check_names_file_and_field_of_a_broken_tenant(tmp_path, three, file, old, new, expect):
    infra = tmp_path / "infra"
    shutil.copytree(three / "infra", infra)
    path = infra / "tenants" / file
    assert old in path.read_text()
    path.write_text(path.read_text().replace(old, new, 1))
    text = "\n".join(str(p) for p in check_target(path.parent, infra))
    assert f"infra/tenants/{file}" in text and expect in text, text


def test_infra_check_reports_a_broken_invariant(tmp_path, three):
    infra = tmp_path / "infra"
    shutil.copytree(three / "infra", infra)
    quota = infra / "tenants" / "team-a" / "quota.yaml"
    quota.write_text(quota.read_text().replace("requests.nvidia.com/gpu: '4'", "requests.nvidia.com/gpu: '1'"))
    assert infra_main([str(tmp_path)]) == 1
    assert tenant_problems(infra) == ["team-a: ResourceQuota driftloop: quota of 1 GPUs does not cover nominal 2 + borrowed 2"]


# --- invariants as properties -----------------------------------------------------------------------
_names = st.from_regex(r"[a-z][a-z0-9]{0,6}(-[a-z0-9]{1,5})?", fullmatch=True).filter(
    lambda n: len(n) >= 2 and n not in RESERVED_NAMES and not n.startswith("kube-") and n != "zz-new")


@st.composite
def tenant_sets(draw):
    pool_gpus = draw(st.integers(0, 16))
    names = draw(st.lists(_names, min_size=1, max_size=5, unique=True))
    left, specs = pool_gpus, []
    for name in names:
        gpu = draw(st.integers(0, left))
        left -= gpu
        borrow = draw(st.integers(0, pool_gpus - gpu))
        profile = draw(st.booleans())
        specs.append(dict(name=name, gpu=gpu, borrow=borrow, profile=profile, owner=f"{name}@example.com" if profile else None))
    specs[0]["pool_gpus"] = pool_gpus
    return specs


_fast = hsettings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@_fast
@given(tenant_sets(), st.data())
def test_invariants_hold_for_any_set_of_tenants_and_removal_touches_only_its_own(specs, data):
    with tempfile.TemporaryDirectory() as tmp:
        infra = _render(Path(tmp), specs)
        assert tenant_problems(infra) == []
        objects = load_rendered(infra)
        # every selector, binding and policy names only the tenant's own namespace (or the platform's)
        for name, objs in objects.items():
            for obj in objs:
                text = yaml.safe_dump(obj)
                for other in objects:
                    if other != name:
                        assert f"namespace: {other}\n" not in text and f".{other}.svc" not in text
        victim = data.draw(st.sampled_from([s["name"] for s in specs]))
        before = _files(tenants_dir(infra))
        remove_tenant(infra, victim)
        after = _files(tenants_dir(infra))
        assert {k: v for k, v in before.items() if not k.startswith(victim + "/")} == after
        assert tenant_problems(infra) == []
        # the freed GPUs and ports can go to a new tenant
        freed = next(s for s in specs if s["name"] == victim)
        add_tenant(infra, "zz-new", gpu=freed["gpu"])
        assert tenant_problems(infra) == []


@_fast
@given(tenant_sets())
def test_the_invariant_check_catches_a_tenant_reaching_into_another(specs):
    """Mutations a renderer bug could make are each reported (the check is not vacuous)."""
    with tempfile.TemporaryDirectory() as tmp:
        infra = _render(Path(tmp), specs)
        tenants, pool = load_tenants(infra), load_pool(infra)
        a = tenants[0]
        b_ns = tenants[1].namespace if len(tenants) > 1 else "elsewhere"
        for mutate, expect in [
            (lambda o: o["kind"] == "RoleBinding" and o["subjects"][0].update(namespace=b_ns), "is not a ServiceAccount of"),
            (lambda o: o["kind"] == "ClusterQueue" and o["spec"]["namespaceSelector"]["matchLabels"].update(
                {"kubernetes.io/metadata.name": b_ns}), "does not select exactly"),
            (lambda o: o["kind"] == "NetworkPolicy" and o["spec"]["ingress"].append({"from": [{"namespaceSelector": {}}]}),
             "may match other tenants"),
            (lambda o: o["kind"] == "LocalQueue" and o["spec"].update(clusterQueue="driftloop-x"), "points at ClusterQueue"),
            (lambda o: o["kind"] == "Deployment" and o["metadata"].update(namespace=b_ns), "not " + a.namespace),
        ]:
            objects = load_rendered(infra)
            for obj in objects[a.name]:
                mutate(obj)
            found = check_invariants(pool, tenants, objects)
            assert any(expect in p for p in found), (expect, found)
        over = [t.__class__(**{**t.__dict__, "gpu": pool.gpus + 1}) if t is a else t for t in tenants]
        assert any("over the pool" in p for p in check_invariants(pool, over, {}))


@_fast
@given(tenant_sets(), st.integers(1, 8), st.integers(0, 8))
def test_gpus_over_the_pool_are_refused_and_nothing_is_written(specs, over, borrow):
    with tempfile.TemporaryDirectory() as tmp:
        infra = _render(Path(tmp), specs)
        pool, tenants = load_pool(infra), load_tenants(infra)
        left = pool.gpus - sum(t.gpu for t in tenants)
        before = _files(Path(tmp))
        with pytest.raises(TenantError, match="does not fit the pool"):
            add_tenant(infra, "zz-new", gpu=left + over)
        with pytest.raises(TenantError, match="exceeds the pool"):
            add_tenant(infra, "zz-new", gpu=0, borrow=pool.gpus + 1 + borrow)
        assert _files(Path(tmp)) == before


_bad_names = st.one_of(
    st.text(min_size=1, max_size=12).filter(lambda s: not __import__("re").fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", s)),
    st.sampled_from(["kube-system", "default", "shared", "monitoring", "a" * 41, "x"]),
)


@_fast
@given(_bad_names)
def test_a_bad_name_is_refused_and_nothing_is_written(name):
    with tempfile.TemporaryDirectory() as tmp:
        infra = Path(tmp) / "infra"
        with pytest.raises(TenantError) as err:
            add_tenant(infra, name, gpu=1, pool_gpus=4)
        assert "\n" not in str(err.value) and repr(name)[1:-1][:5] in str(err.value)
        assert not infra.exists()


# --- the shadow phase on a tenant's cluster: level with infra/base ---------------------------------------
def _selects(selector: dict, labels: dict[str, str]) -> bool:
    """A Kubernetes label selector (matchLabels, matchExpressions) against a pod's or namespace's labels."""
    if not (selector.get("matchLabels") or {}).items() <= labels.items():
        return False
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr["key"], expr["operator"], expr.get("values") or []
        if not {"In": key in labels and labels[key] in values, "NotIn": labels.get(key) not in values,
                "Exists": key in labels, "DoesNotExist": key not in labels}[op]:
            return False
    return True


def _admits(policies: list[dict], ns: str, pod: dict[str, str], src_ns: str, src: dict[str, str]) -> bool:
    """Whether the NetworkPolicies of namespace ``ns`` let a pod of ``src_ns`` (labels ``src``) reach ``pod``."""
    isolating = [p for p in policies if p["metadata"]["namespace"] == ns and _selects(p["spec"]["podSelector"], pod)
                 and "Ingress" in p["spec"].get("policyTypes", ["Ingress"])]
    if not isolating:
        return True
    src_ns_labels = {"kubernetes.io/metadata.name": src_ns}
    for policy in isolating:
        for rule in policy["spec"].get("ingress") or []:
            if "from" not in rule:
                return True
            for peer in rule["from"]:
                ns_ok = (_selects(peer["namespaceSelector"], src_ns_labels) if "namespaceSelector" in peer
                         else src_ns == ns)
                if ns_ok and _selects(peer.get("podSelector") or {}, src):
                    return True
    return False


def _pod_labels(objects: list[dict], deployment: str) -> dict[str, str]:
    return next(o for o in objects if o["kind"] == "Deployment" and o["metadata"]["name"] == deployment
                )["spec"]["template"]["metadata"]["labels"]


def _base_rollout_rules() -> list[dict]:
    docs = yaml.safe_load_all((ROOT / "infra" / "base" / "rbac.yaml").read_text())
    return next(d for d in docs if d and d["kind"] == "Role" and d["metadata"]["name"] == "driftloop-rollout")["rules"]


def test_tenant_pipeline_steps_have_the_roles_of_infra_base_in_their_own_namespace(three):
    """Executor, deployer and distributed trainer: the pipeline's ServiceAccount may do in the tenant's
    namespace what infra/base lets it do in the run namespace, and nothing more."""
    base = {d["metadata"]["name"]: d["rules"] for d in yaml.safe_load_all((ROOT / "infra" / "base" / "rbac.yaml").read_text())
            if d and d["kind"] == "Role" and d["metadata"]["name"].startswith("driftloop-pipeline-")}
    assert "driftloop-pipeline-trainer" in base
    infra = three / "infra"
    objects = load_rendered(infra)
    for t in load_tenants(infra):
        objs = objects[t.name]
        bound = {b["roleRef"]["name"] for b in objs if b["kind"] == "RoleBinding"
                 and b["subjects"] == [{"kind": "ServiceAccount", "name": "driftloop-pipeline", "namespace": t.namespace}]}
        roles = {r["metadata"]["name"]: r for r in objs if r["kind"] == "Role" and r["metadata"]["name"] in bound}
        assert set(roles) == set(base), (t.name, sorted(roles))
        for name, role in roles.items():
            assert role["metadata"]["namespace"] == t.namespace
            assert role["rules"] == base[name], (t.name, name)


def test_tenant_rollout_controller_can_run_the_shadow_phase_in_its_own_namespace_only(three):
    """As in infra/base: the controller reads GET /shadow with the tenant's token (from its Secret), may create the
    shadow InferenceService and the Istio mirror and delete only those two, all in its namespace; the monitor admits
    the tenant's shadow pods and controller and no other tenant's; the loggers carry the request id of the join."""
    from serving.inference_service import build_inference_service, mirror_name, shadow_name, to_dict

    infra = three / "infra"
    objects = load_rendered(infra)
    policies = [o for objs in objects.values() for o in objs if o["kind"] == "NetworkPolicy"]
    for t in load_tenants(infra):
        ns, objs = t.namespace, objects[t.name]
        settings = load_settings(tenants_dir(infra) / t.name / "config" / "driftloop.yaml", environ={})
        assert settings.serving.namespace == ns

        # the token: the monitor's own Secret in the tenant's namespace, referenced, never a value
        rollout = next(o for o in objs if o["kind"] == "Deployment" and o["metadata"]["name"] == "driftloop-rollout")
        env = {e["name"]: e for e in rollout["spec"]["template"]["spec"]["containers"][0]["env"]}
        token = env["DRIFTLOOP_WEBHOOK_TOKEN"]
        assert "value" not in token and token["valueFrom"] == {"secretKeyRef": {"name": "driftloop-webhook", "key": "token"}}
        monitor = next(o for o in objs if o["kind"] == "Deployment" and o["metadata"]["name"] == "driftloop-monitor")
        assert token in monitor["spec"]["template"]["spec"]["containers"][0]["env"]
        assert settings.serving.logger_url == f"http://driftloop-monitor.{ns}.svc.cluster.local/events"  # GET /shadow there

        # RBAC: the Roles bound to the controller's ServiceAccount, in the tenant's namespace only
        account = rollout["spec"]["template"]["spec"]["serviceAccountName"]
        bindings = [o for o in objs if o["kind"] == "RoleBinding"
                    and any(s["name"] == account and s["namespace"] == ns for s in o["subjects"])]
        assert bindings and all(b["metadata"]["namespace"] == ns and b["roleRef"]["kind"] == "Role" for b in bindings)
        roles = [o for o in objs if o["kind"] == "Role" and o["metadata"]["name"] in {b["roleRef"]["name"] for b in bindings}]
        assert {r["metadata"]["namespace"] for r in roles} == {ns}
        rules = [rule for r in roles for rule in r["rules"]]
        assert rules == _base_rollout_rules()  # level with the single-tenant controller
        isvc_rules = [r for r in rules if r["apiGroups"] == ["serving.kserve.io"] and r["resources"] == ["inferenceservices"]]
        vs_rules = [r for r in rules if r["apiGroups"] == ["networking.istio.io"] and r["resources"] == ["virtualservices"]]
        assert any("create" in r["verbs"] and "resourceNames" not in r for r in isvc_rules)
        assert [r["resourceNames"] for r in isvc_rules if "delete" in r["verbs"]] == [[shadow_name(settings)]]
        assert any({"get", "create"} <= set(r["verbs"]) and "resourceNames" not in r for r in vs_rules)
        assert [r["resourceNames"] for r in vs_rules if {"update", "delete"} & set(r["verbs"])] == [[mirror_name(settings)]]

        # the monitor admits the tenant's predictor, shadow and controller pods; another tenant's shadow, no
        monitor_pod = _pod_labels(objs, "driftloop-monitor")
        for source in ({"serving.kserve.io/inferenceservice": settings.serving.name},
                       {"serving.kserve.io/inferenceservice": shadow_name(settings)},
                       _pod_labels(objs, "driftloop-rollout")):
            assert _admits(policies, ns, monitor_pod, ns, source), (t.name, source)
        for other in load_tenants(infra):
            if other.name != t.name:
                shadow = {"serving.kserve.io/inferenceservice": shadow_name(settings), "driftloop.io/tenant": other.name}
                assert not _admits(policies, ns, monitor_pod, other.namespace, shadow), (t.name, other.name)
                assert not _admits(policies, ns, monitor_pod, other.namespace, _pod_labels(objects[other.name],
                                                                                            "driftloop-rollout"))

        # the InferenceService's logger and scores, as the builder makes them (and the shadow it puts up)
        isvc = next(o for o in objs if o["kind"] == "InferenceService")
        built = to_dict(build_inference_service(settings))["spec"]["predictor"]
        assert isvc["spec"]["predictor"]["logger"] == built["logger"]
        assert built["logger"]["metadataHeaders"] == ["X-Request-Id"]
        scores = {"name": "DRIFTLOOP_LOG_SCORES", "value": "1"}
        assert scores in built["containers"][0]["env"] and scores in isvc["spec"]["predictor"]["containers"][0]["env"]


# --- the CLI: one line per refusal, nothing written ---------------------------------------------------
class _Result:
    def __init__(self, exit_code: int, output: str) -> None:
        self.exit_code, self.output = exit_code, output


@pytest.fixture()
def cli(monkeypatch, capsys):
    """``driftloop tenant …`` through the real entry point (which prints a DriftloopError as one line)."""
    from driftloop.app.cli import main

    def run(*args: str) -> _Result:
        monkeypatch.setattr(sys, "argv", ["driftloop", "tenant", *args])
        with pytest.raises(SystemExit) as exit_:
            main()
        out = capsys.readouterr()
        return _Result(exit_.value.code or 0, out.out + out.err)

    return run


def test_cli_add_list_remove_and_refusals(tmp_path, cli):
    infra = str(tmp_path / "infra")
    ok = cli("add", "team-a", "--gpu", "2", "--borrow", "2", "--pool-gpus", "4", "--infra", infra)
    assert ok.exit_code == 0, ok.output
    assert "rendered tenant team-a" in ok.output and "nothing applied" in ok.output
    assert cli("add", "team-b", "--gpu", "1", "--profile", "--owner", "b@example.com", "--infra", infra).exit_code == 0
    snapshot = _files(tmp_path)
    refusals = [
        (["add", "Team_C", "--infra", infra], "is not a DNS label"),
        (["add", "team-a", "--infra", infra], "already exists"),
        (["add", "team-c", "--gpu", "2", "--infra", infra], "does not fit the pool: 4 GPUs, 3 already given"),
        (["add", "team-c", "--gpu", "1", "--borrow", "4", "--infra", infra], "exceeds the pool of 4 GPUs"),
        (["add", "team-c", "--profile", "--infra", infra], "--profile needs --owner"),
        (["add", "team-c", "--cpu", "lots", "--infra", infra], "--cpu 'lots' is not a Kubernetes quantity"),
        (["add", "team-c", "--pool-gpus", "16", "--infra", infra], "the pool already has 4 GPUs"),
        (["add", "team-c", "--cohort", "other", "--infra", infra], "the pool's cohort is 'driftloop'"),
        (["add", "team-c", "--gpu", "-1", "--infra", infra], "--gpu and --borrow must be >= 0"),
        (["remove", "team-x", "--infra", infra], "no tenant 'team-x'"),
    ]
    for args, expect in refusals:
        result = cli(*args)
        assert result.exit_code != 0, args
        assert expect in " ".join(result.output.split()), (args, result.output)
        assert "Traceback" not in result.output
        assert _files(tmp_path) == snapshot, f"{args} wrote something"
    listed = cli("list", "--infra", infra)
    assert listed.exit_code == 0 and "team-a" in listed.output and "team-b" in listed.output
    assert "3 of 4 GPUs given" in listed.output
    assert cli("remove", "team-a", "--infra", infra).exit_code == 0
    assert [t.name for t in load_tenants(Path(infra))] == ["team-b"]


def test_borrowing_without_a_cohort_is_refused(tmp_path, cli):
    infra = tmp_path / "infra"
    first = cli("add", "team-a", "--gpu", "1", "--pool-gpus", "4", "--cohort", "", "--infra", str(infra))
    assert first.exit_code == 0, first.output
    cq = yaml.safe_load_all((infra / "tenants" / "team-a" / "queue.yaml").read_text())
    spec = next(cq)["spec"]
    assert "cohort" not in spec and all("borrowingLimit" not in r for r in spec["resourceGroups"][0]["flavors"][0]["resources"])
    snapshot = _files(tmp_path)
    result = cli("add", "team-b", "--gpu", "1", "--borrow", "1", "--infra", str(infra))
    assert result.exit_code == 2 and "needs a cohort to borrow from" in " ".join(result.output.split())
    assert _files(tmp_path) == snapshot


# --- the compiled pipeline of a tenant -----------------------------------------------------------------
def test_compiled_pipeline_labels_the_train_pod_with_the_tenants_queue(tmp_path, three):
    from pipelines.training import compile_pipeline

    settings = load_settings(three / "infra" / "tenants" / "team-a" / "config" / "driftloop.yaml", environ={})
    assert (settings.kfp.namespace, settings.kfp.service_account, settings.kfp.queue_name) == \
        ("team-a", "driftloop-pipeline", "team-a")
    docs = list(yaml.safe_load_all(compile_pipeline(settings, tmp_path / "p.yaml").read_text()))
    executors = docs[1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    assert executors["exec-train-op"]["podMetadata"]["labels"] == {"kueue.x-k8s.io/queue-name": "team-a"}
    assert not any("podMetadata" in e for name, e in executors.items() if name != "exec-train-op")
    containers = docs[0]["deploymentSpec"]["executors"]
    train = containers["exec-train-op"]["container"]
    assert train["resources"]["accelerator"]["resourceCount"] == "1"  # a GPU tenant's train step asks for a GPU
    for step in ("exec-evaluate-op", "exec-register-op"):
        assert {"name": "MLFLOW_WORKSPACE", "value": "team-a"} in containers[step]["container"]["env"]


# --- MLflow spaces on a real tracking server ----------------------------------------------------------
@pytest.fixture(scope="module")
def mlflow_workspaces(tmp_path_factory):
    """One `mlflow server --enable-workspaces` (sqlite) for the module, on 127.0.0.1."""
    home = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    log = home / "server.log"
    cmd = [str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
           "--backend-store-uri", f"sqlite:///{home / 'mlflow.db'}", "--default-artifact-root", str(home / "artifacts"),
           "--enable-workspaces", "--workers", "1"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    with open(log, "wb") as fh:
        proc = spawn(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=home)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-2000:]
            time.sleep(0.3)
        yield url
    finally:
        stop_process(proc.pid)


def test_mlflow_spaces_keep_tenants_apart(mlflow_workspaces, three, monkeypatch):
    """Tenant B, in its own workspace, sees none of tenant A's runs or models (as the pods' MLFLOW_WORKSPACE sets it)."""
    import mlflow

    from driftloop.core.registry import Registry

    tenants = {}
    for name in ("team-a", "team-b"):
        s = load_settings(three / "infra" / "tenants" / name / "config" / "driftloop.yaml",
                          overrides={"mlflow.tracking_uri": mlflow_workspaces}, environ={})
        tenants[name] = s
    mlflow.set_tracking_uri(mlflow_workspaces)
    for s in tenants.values():  # the platform team creates each tenant's workspace once
        mlflow.create_workspace(s.mlflow.workspace)

    a, b = tenants["team-a"], tenants["team-b"]
    monkeypatch.setenv("MLFLOW_WORKSPACE", a.mlflow.workspace)
    reg_a = Registry.from_settings(a)
    reg_a.client.create_registered_model(a.mlflow.model_name)
    with reg_a.translate_errors("log"):
        mlflow.set_experiment(a.mlflow.experiment)
        with mlflow.start_run() as run:
            mlflow.log_metric("accuracy", 0.9)
    version = reg_a.client.create_model_version(a.mlflow.model_name, f"runs:/{run.info.run_id}/model", run.info.run_id)
    reg_a.set_alias(a.mlflow.model_name, "champion", version.version)
    assert reg_a.version_by_alias(a.mlflow.model_name, "champion") is not None

    monkeypatch.setenv("MLFLOW_WORKSPACE", b.mlflow.workspace)
    reg_b = Registry.from_settings(b)
    assert reg_b.client.search_registered_models() == []
    assert reg_b.client.search_experiments() == [] or all(e.name != a.mlflow.experiment
                                                          for e in reg_b.client.search_experiments())
    assert reg_b.version_by_alias(a.mlflow.model_name, "champion") is None
    with pytest.raises(Exception):
        reg_b.client.get_run(run.info.run_id)
    monkeypatch.setenv("MLFLOW_WORKSPACE", a.mlflow.workspace)  # A still sees its own
    assert [m.name for m in reg_a.client.search_registered_models()] == [a.mlflow.model_name]


# --- two local loops side by side ---------------------------------------------------------------------
def test_two_local_loops_do_not_collide(three):
    """Each tenant's local.yaml: own workspace, stores, ports, model; an alert in A starts nothing in B."""
    from monitoring.alerts import Alert, AlertStore, drift_alert_id
    from monitoring.trigger import Trigger
    from pipelines.runner import RunResult

    class RecordingRunner:
        def __init__(self) -> None:
            self.requests = []

        def run_training(self, request, *, wait: bool = True) -> RunResult:
            self.requests.append(request)
            return RunResult(request.request_id, "run-1", "SUCCEEDED", "local", summary={"model_version": "1"})

    loops = {}
    for name in ("team-a", "team-b", "team-c"):
        s = load_settings(three / "infra" / "tenants" / name / "local.yaml", environ={},
                          overrides={"trigger.cooldown_seconds": 0, "trigger.min_samples": 1})
        assert not s.is_cluster
        loops[name] = s
    for attr in (lambda s: s.workspace_dir, lambda s: s.tracking_uri, lambda s: s.mlflow.model_name,
                 lambda s: s.serving.gateway_port, lambda s: s.monitor.port, lambda s: s.serving.name):
        values = [attr(s) for s in loops.values()]
        assert len(set(values)) == len(values), values
    ports = [p for s in loops.values() for p in (s.serving.gateway_port, s.monitor.port)]
    assert len(set(ports)) == len(ports) and not {8080, 8090} & set(ports)  # nor the single loop's defaults
    assert loops["team-a"].workspace_dir == (three / ".driftloop" / "tenants" / "team-a").resolve()
    from serving.local_backend import LocalBackend  # where each tenant's gateway logs to and keeps its state

    backends = [LocalBackend(s) for s in loops.values()]
    assert len({b.sink_url() for b in backends}) == 3 and len({b.state_path for b in backends}) == 3
    assert LocalBackend(loops["team-b"]).sink_url() == f"http://127.0.0.1:{loops['team-b'].monitor.port}/events"

    runners = {name: RecordingRunner() for name in loops}
    stores = {name: AlertStore.from_settings(s) for name, s in loops.items()}
    assert len({str(st_.path) for st_ in stores.values()}) == 3
    triggers = {name: Trigger(s, stores[name], runner=runners[name]) for name, s in loops.items()}
    alert = Alert(drift_alert_id("team-a-model", "1", 0, 1), "drift", samples=500,
                  window_end="2026-02-01T00:00:00+00:00")
    decision = triggers["team-a"].submit(alert)
    assert decision.decision == "started", decision
    triggers["team-a"].wait(alert.id, timeout=30)
    assert len(runners["team-a"].requests) == 1
    assert runners["team-b"].requests == [] and runners["team-c"].requests == []
    assert stores["team-b"].get(alert.id) is None and stores["team-c"].get(alert.id) is None
    assert triggers["team-b"].refresh() is None
