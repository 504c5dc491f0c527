"""infra/: the check passes on the real tree, fails on broken copies naming file and field,
and the manifests agree with the Python builders (image, GPU, logger, alerts, InferenceService)."""

import shutil
import tomllib
from pathlib import Path
from urllib.parse import urlparse

import pytest
import yaml

from driftloop.core.config import DEFAULT_IMAGE
from driftloop.app.infra_check import build, check_target, check_tree, main, objects_by_kind, settings_from_objects

ROOT = Path(__file__).resolve().parents[1]
OVERLAYS = ["dev", "prod"]


@pytest.fixture(scope="module")
def rendered() -> dict:
    """Each overlay rendered once by the real kustomize: {env: (objects, settings)}."""
    out = {}
    for env in OVERLAYS:
        objects = build(ROOT / "infra" / "overlays" / env)
        out[env] = (objects, settings_from_objects(objects))
    return out


def one(objects: list[dict], kind: str, name: str | None = None, namespace: str | None = None) -> dict:
    found = [o for o in objects_by_kind(objects, kind)
             if (name is None or o["metadata"]["name"] == name or o["metadata"]["name"].rsplit("-", 1)[0] == name)
             and (namespace is None or o["metadata"].get("namespace") == namespace)]
    assert len(found) == 1, f"expected one {kind} {name or ''} in {namespace or 'any namespace'}, found {len(found)}"
    return found[0]


# --- the check on the real tree ----------------------------------------------------------------------
def test_check_passes_on_the_real_tree(capsys):
    assert main([str(ROOT)]) == 0, capsys.readouterr().err
    assert "5 kustomizations built and valid" in capsys.readouterr().out


# --- broken copies ----------------------------------------------------------------------------------------
@pytest.fixture()
def tree(tmp_path) -> Path:
    shutil.copytree(ROOT / "infra", tmp_path / "infra")
    return tmp_path


def edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, f"{old!r} not in {path}"
    path.write_text(text.replace(old, new, 1))


def problems_of(tree: Path, target: str) -> str:
    found = check_target(tree / "infra" / target, tree / "infra")
    assert found, f"{target}: expected problems, the check passed"
    return "\n".join(str(p) for p in found)


def test_overlay_referencing_a_missing_file_fails_naming_it(tree):
    from typer.testing import CliRunner

    from driftloop.app.cli import app

    edit(tree / "infra/overlays/dev/kustomization.yaml", "  - monitor.yaml", "  - monitor.yaml\n  - scheduler-on.yaml")
    text = problems_of(tree, "overlays/dev")
    assert "infra/overlays/dev" in text and "scheduler-on.yaml" in text
    # `driftloop infra check` says the same and exits non-zero
    result = CliRunner().invoke(app, ["infra", "check", "--root", str(tree)])
    assert result.exit_code == 1
    assert "scheduler-on.yaml" in result.output and "1 problem(s)" in result.output


def test_json_patch_that_no_longer_matches_fails_naming_the_path(tree):
    # the model loses the field the prod overlay replaces
    edit(tree / "infra/model/inference-service.yaml", "    scaleTarget: 10\n", "")
    text = problems_of(tree, "overlays/prod")
    assert "infra/overlays/prod/inference-service.yaml (patch of InferenceService driftloop-model)" in text
    assert "replace /spec/predictor/scaleTarget" in text
    assert not check_target(tree / "infra" / "overlays/dev", tree / "infra"), "dev does not patch scaleTarget"


def test_strategic_patch_whose_container_was_renamed_fails(tree):
    edit(tree / "infra/base/monitor.yaml", "        - name: monitor\n", "        - name: sink\n")
    text = problems_of(tree, "overlays/dev")
    assert "infra/overlays/dev/monitor.yaml (patch of Deployment driftloop-monitor)" in text
    assert "spec.template.spec.containers: no item named 'monitor'" in text


def test_unknown_field_in_a_core_object_names_file_and_field(tree):
    edit(tree / "infra/base/monitor.yaml", "          resources:\n            requests:\n              cpu: 250m",
         "          resourcez:\n            requests:\n              cpu: 250m")
    text = problems_of(tree, "base")
    assert "infra/base/monitor.yaml" in text and "Deployment driftloop/driftloop-monitor" in text
    assert "resourcez" in text and "spec.template.spec.containers[0]" in text


def test_unknown_field_in_the_inference_service_fails_through_kserve_classes(tree):
    edit(tree / "infra/model/inference-service.yaml", "    scaleMetric: concurrency\n",
         "    scaleMetric: concurrency\n    canaryTraficPercent: 10\n")
    text = problems_of(tree, "model")
    assert "infra/model/inference-service.yaml (InferenceService driftloop/driftloop-model, infra/model)" in text
    assert "spec.predictor.canaryTraficPercent" in text and "V1beta1PredictorSpec" in text


def test_wrong_type_in_the_inference_service_fails(tree):
    edit(tree / "infra/model/inference-service.yaml", "    minReplicas: 1\n", "    minReplicas: one\n")
    assert "spec.predictor.minReplicas: must be int" in problems_of(tree, "model")


def test_a_patch_deleting_a_whole_object_fails_whatever_the_kustomize(tree):
    """The kustomize of kubectl 1.20 keeps a custom resource that a strategic `$patch: delete` removes (and kubectl
    would create it); today's kustomize deletes it. The check refuses the patch itself, so it fails on either."""
    (tree / "infra/overlays/dev/remove-model.yaml").write_text(
        "apiVersion: serving.kserve.io/v1beta1\nkind: InferenceService\nmetadata:\n  name: driftloop-model\n"
        "  namespace: driftloop\n$patch: delete\n")
    edit(tree / "infra/overlays/dev/kustomization.yaml", "  - monitor.yaml", "  - monitor.yaml\n  - remove-model.yaml")
    text = problems_of(tree, "overlays/dev")
    assert "infra/overlays/dev/remove-model.yaml (patch of InferenceService driftloop-model): deletes the whole " \
           "object ($patch: delete), which the kustomize of kubectl 1.20 leaves in the render" in text


def test_prometheus_operator_objects_are_checked_against_their_crds(tree):
    monitoring = tree / "infra/base/monitoring"
    edit(monitoring / "service-monitors.yaml", "  selector:\n    matchLabels:\n      app.kubernetes.io/name: driftloop\n"
         "      app.kubernetes.io/component: monitor\n", "")
    edit(monitoring / "alertmanager-config.yaml", "          sendResolved: false", "          sendResolved: no-thanks")
    edit(monitoring / "prometheus-rule.yaml", "          for: 10m", "          for: 10m\n          severity: high")
    text = problems_of(tree, "base")
    assert "service-monitors.yaml (ServiceMonitor driftloop/driftloop-monitor" in text
    assert "spec.selector: required by the CRD" in text
    assert "spec.receivers[0].webhookConfigs[0].sendResolved: must be boolean" in text
    assert "spec.groups[0].rules[0].severity: unknown to the CRD" in text


def test_config_key_typo_and_foreign_image_tag_fail(tree):
    edit(tree / "infra/base/config/driftloop.yaml", "  drift_share: 0.5", "  drift_shares: 0.5")
    edit(tree / "infra/overlays/prod/kustomization.yaml", 'newTag: "0.1.0"', 'newTag: "0.2.0"')
    text = problems_of(tree, "overlays/prod")
    assert "monitor.drift_shares: unknown key" in text
    assert "ghcr.io/driftloop/driftloop:0.2.0 differs from driftloop.core.config.DEFAULT_IMAGE" in text


def test_committed_secret_values_fail(tree):
    (tree / "infra/base/secret.yaml").write_text(
        "apiVersion: v1\nkind: Secret\nmetadata:\n  name: driftloop-webhook\n  namespace: driftloop\n"
        "stringData:\n  token: hunter2\n")
    edit(tree / "infra/base/kustomization.yaml", "  - namespace.yaml\n", "  - namespace.yaml\n  - secret.yaml\n")
    text = problems_of(tree, "base")
    assert "infra/base/secret.yaml" in text and "Secret with values" in text


# --- manifests and Python builders agree ---------------------------------------------------------
def test_one_image_for_pipelines_manifests_and_package(rendered, tmp_path):
    from pipelines.training import compile_pipeline

    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert DEFAULT_IMAGE.endswith(f":{version}")
    for env, (objects, settings) in rendered.items():
        images = {c["image"] for d in objects_by_kind(objects, "Deployment") for c in d["spec"]["template"]["spec"]["containers"]}
        isvc = one(objects, "InferenceService")
        images |= {c["image"] for c in isvc["spec"]["predictor"]["containers"]}
        assert images == {DEFAULT_IMAGE}, env
        assert settings.serving.image == DEFAULT_IMAGE
        spec = next(yaml.safe_load_all(compile_pipeline(settings, tmp_path / f"{env}.yaml").read_text()))
        assert {e["container"]["image"] for e in spec["deploymentSpec"]["executors"].values()} == {DEFAULT_IMAGE}


def test_gpu_train_step_fits_the_quota_and_runs_as_the_pipeline_account(rendered, tmp_path):
    from pipelines.training import compile_pipeline

    objects, settings = rendered["prod"]
    assert settings.model.gpu, "prod trains on a GPU"
    docs = list(yaml.safe_load_all(compile_pipeline(settings, tmp_path / "prod.yaml").read_text()))
    accelerator = docs[0]["deploymentSpec"]["executors"]["exec-train-op"]["container"]["resources"]["accelerator"]
    quota = one(objects, "ResourceQuota", "driftloop-pipeline-gpu", namespace=settings.kfp.namespace)
    resource = f"requests.{accelerator['resourceType']}"
    assert resource in quota["spec"]["hard"], "the quota counts the resource the train step asks for"
    assert int(accelerator["resourceCount"]) <= int(quota["spec"]["hard"][resource])
    tolerations = docs[1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]["exec-train-op"]["tolerations"]
    assert [t["key"] for t in tolerations] == [settings.model.gpu_toleration_key] == [accelerator["resourceType"]]
    # the steps' ServiceAccount and MLflow Secret are the ones the manifests provide for
    one(objects, "ServiceAccount", settings.kfp.service_account, namespace=settings.kfp.namespace)
    executors = docs[1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    assert {s["secretName"] for e in executors.values() for s in e.get("secretAsEnv", [])} == {settings.kfp.mlflow_secret}
    # dev trains on CPUs: no GPU is requested anywhere
    dev_objects, dev_settings = rendered["dev"]
    dev_spec = next(yaml.safe_load_all(compile_pipeline(dev_settings, tmp_path / "dev.yaml").read_text()))
    assert "resources" not in dev_spec["deploymentSpec"]["executors"]["exec-train-op"]["container"]


def test_logger_alerts_and_network_policy_point_at_the_monitor(rendered):
    for env, (objects, settings) in rendered.items():
        service = one(objects, "Service", "driftloop-monitor")
        monitor = one(objects, "Deployment", "driftloop-monitor")
        container = monitor["spec"]["template"]["spec"]["containers"][0]
        url = urlparse(settings.serving.logger_url)
        assert url.hostname == f"{service['metadata']['name']}.{service['metadata']['namespace']}.svc.cluster.local"
        assert (url.port or 80) == service["spec"]["ports"][0]["port"] and url.path == "/events"
        named = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert named[service["spec"]["ports"][0]["targetPort"]] == settings.monitor.port
        isvc = one(objects, "InferenceService")
        assert isvc["spec"]["predictor"]["logger"] == {"mode": settings.serving.logger_mode,
                                                       "url": settings.serving.logger_url,
                                                       "metadataHeaders": ["X-Request-Id"]}
        # the sink admits the predictor's pods (where KServe's logger runs)
        policy = one(objects, "NetworkPolicy", "driftloop-monitor-ingress")
        selectors = [f.get("podSelector", {}).get("matchLabels", {}) for rule in policy["spec"]["ingress"] for f in rule["from"]]
        assert {"serving.kserve.io/inferenceservice": settings.serving.name} in selectors
        # ... and its shadow's (shadow phase), and the rollout controller, which reads GET /shadow with the token
        from serving.inference_service import shadow_name

        assert {"serving.kserve.io/inferenceservice": shadow_name(settings)} in selectors
        rollout = one(objects, "Deployment", "driftloop-rollout")
        assert rollout["spec"]["template"]["metadata"]["labels"].items() >= next(
            s for s in selectors if s.get("app.kubernetes.io/component") == "rollout-controller").items()
        rollout_env = rollout["spec"]["template"]["spec"]["containers"][0]["env"]
        assert next(e for e in rollout_env if e["name"] == "DRIFTLOOP_WEBHOOK_TOKEN")["valueFrom"] == \
            next(e for e in container["env"] if e["name"] == "DRIFTLOOP_WEBHOOK_TOKEN")["valueFrom"]
        # the drift alert fires at the monitor's drift share and reaches /alerts/alertmanager with the token Secret
        rule = one(objects, "PrometheusRule")["spec"]["groups"][0]["rules"][0]
        assert rule["alert"] == "DriftloopDatasetDrift"
        assert float(rule["expr"].rsplit(">=", 1)[1]) == settings.monitor.drift_share
        hook = one(objects, "AlertmanagerConfig")["spec"]["receivers"][0]["webhookConfigs"][0]
        assert hook["url"] == f"http://{url.hostname}/alerts/alertmanager"
        token = next(e for e in container["env"] if e["name"] == "DRIFTLOOP_WEBHOOK_TOKEN")["valueFrom"]["secretKeyRef"]
        assert hook["httpConfig"]["authorization"]["credentials"] == {"name": token["name"], "key": token["key"]}
        scheduler = one(objects, "Deployment", "driftloop-scheduler")
        assert scheduler["spec"]["replicas"] == 0, "KFP recurring runs keep time on a cluster"


def test_the_scoring_pipelines_drift_step_may_post_its_alert_to_the_monitor(rendered, tmp_path):
    # the step runs in the run namespace (kfp.namespace) and posts a drifted batch's alert to the
    # monitor's webhook: its pod carries the labels the monitor's NetworkPolicy admits from there
    from pipelines.scoring import compile_scoring_pipeline

    for env, (objects, settings) in rendered.items():
        docs = list(yaml.safe_load_all(compile_scoring_pipeline(settings, tmp_path / f"{env}-score.yaml").read_text()))
        executors = docs[1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
        labels = executors["exec-score-drift-op"]["podMetadata"]["labels"]
        assert "secretAsEnv" in executors["exec-score-drift-op"]  # ... with the webhook token
        policy = one(objects, "NetworkPolicy", "driftloop-monitor-ingress")
        admitted = [f for rule in policy["spec"]["ingress"] for f in rule["from"]
                    if f.get("namespaceSelector", {}).get("matchLabels") ==
                    {"kubernetes.io/metadata.name": settings.kfp.namespace}]
        assert any(labels.items() >= f["podSelector"]["matchLabels"].items() for f in admitted), (env, admitted)
        # and no other pipeline pod of that namespace: the scoring chunks carry no such labels
        assert "podMetadata" not in executors["exec-score-chunk-op"]


def test_rollout_controller_may_only_touch_inference_services_in_its_namespace(rendered):
    objects, settings = rendered["prod"]
    assert not objects_by_kind(objects, "ClusterRole") and not objects_by_kind(objects, "ClusterRoleBinding")
    deployment = one(objects, "Deployment", "driftloop-rollout")
    account = deployment["spec"]["template"]["spec"]["serviceAccountName"]
    bindings = [b for b in objects_by_kind(objects, "RoleBinding")
                if any(s["name"] == account for s in b["subjects"])]
    rules = [r for b in bindings for r in one(objects, "Role", b["roleRef"]["name"])["rules"]]
    assert rules[0] == {"apiGroups": ["serving.kserve.io"], "resources": ["inferenceservices"],
                        "verbs": ["get", "watch", "patch", "update"]}
    # the shadow phase: create the shadow InferenceService and the mirror, delete only those two by name
    from serving.inference_service import mirror_name, shadow_name

    assert rules[1:] == [
        {"apiGroups": ["serving.kserve.io"], "resources": ["inferenceservices"], "verbs": ["create"]},
        {"apiGroups": ["serving.kserve.io"], "resources": ["inferenceservices"],
         "resourceNames": [shadow_name(settings)], "verbs": ["delete"]},
        {"apiGroups": ["networking.istio.io"], "resources": ["virtualservices"], "verbs": ["get", "create"]},
        {"apiGroups": ["networking.istio.io"], "resources": ["virtualservices"],
         "resourceNames": [mirror_name(settings)], "verbs": ["update", "delete"]}]
    assert {b["metadata"]["namespace"] for b in bindings} == {settings.serving.namespace}


def test_inference_service_manifest_matches_the_builder(rendered):
    """kustomize's InferenceService vs build_inference_service(settings) with the overlay's settings."""
    from serving.inference_service import build_inference_service, from_dict, to_dict

    for env, (objects, settings) in rendered.items():
        manifest = one(objects, "InferenceService", settings.serving.name, namespace=settings.serving.namespace)
        # kserve's ApiClient round trip (what KServeClient would send back) keeps every field
        assert to_dict(from_dict(manifest)) == manifest, env
        built = to_dict(build_inference_service(settings))
        assert manifest["apiVersion"] == built["apiVersion"] and manifest["kind"] == built["kind"]
        assert manifest["metadata"]["annotations"] == built["metadata"]["annotations"], env
        assert built["metadata"]["labels"].items() <= manifest["metadata"]["labels"].items(), env
        m_predictor, b_predictor = dict(manifest["spec"]["predictor"]), dict(built["spec"]["predictor"])
        m_containers, b_containers = m_predictor.pop("containers"), b_predictor.pop("containers")
        # replicas, autoscaling, canary, logger, tolerations: the same
        assert m_predictor == b_predictor, env
        assert len(m_containers) == len(b_containers) == 1
        m_container, b_container = dict(m_containers[0]), dict(b_containers[0])
        # The manifest adds a restricted securityContext and marks the MLflow Secret optional
        # (a tracking server without auth needs none); everything else is the builder's.
        assert m_container.pop("securityContext")["allowPrivilegeEscalation"] is False
        assert [e["secretRef"]["name"] for e in m_container.pop("envFrom")] == \
            [e["secretRef"]["name"] for e in b_container.pop("envFrom")]
        assert m_container == b_container, env


def _directives(node: object, path: str = "") -> list[str]:
    """Where kustomize's strategic-merge directives (``$patch``, ``$setElementOrder/…``) are left in ``node``."""
    if isinstance(node, dict):
        return [f"{path}.{k}" for k in node if str(k).startswith("$")] + \
            [d for k, v in node.items() for d in _directives(v, f"{path}.{k}")]
    if isinstance(node, list):
        return [d for i, v in enumerate(node) for d in _directives(v, f"{path}[{i}]")]
    return []


def _at(obj: dict, pointer: str) -> object:
    for part in pointer.strip("/").split("/"):
        obj = obj[int(part)] if isinstance(obj, list) else obj[part]
    return obj


def test_only_the_one_model_installs_render_its_inference_service_and_no_directive_is_left(rendered):
    """infra/model holds the one-model InferenceService: dev and prod (which list it beside the base) render it
    once with their JSON patches applied; the platform (base) and the fleet render none, so no overlay has to
    delete it -- the kustomize of kubectl 1.20 keeps a custom resource that a `$patch: delete` removes, the
    directive as a field, and kubectl would create it. No render carries a directive, whichever kubectl builds it."""
    renders = {env: objects for env, (objects, _) in rendered.items()}
    renders |= {name: build(ROOT / "infra" / path) for name, path in
                (("base", "base"), ("model", "model"), ("fleet", "overlays/fleet"))}
    source = yaml.safe_load((ROOT / "infra/model/inference-service.yaml").read_text())
    for name, objects in renders.items():
        assert [f"{o['kind']} {o['metadata']['name']}{d}" for o in objects for d in _directives(o)] == [], name
        services = objects_by_kind(objects, "InferenceService")
        if name in ("base", "fleet"):
            assert services == [], name
            continue
        (isvc,) = services
        assert (isvc["metadata"]["namespace"], isvc["metadata"]["name"]) == ("driftloop", "driftloop-model")
        if name == "model":
            assert isvc == source
            continue
        operations = yaml.safe_load((ROOT / "infra/overlays" / name / "inference-service.yaml").read_text())
        assert operations and {op["op"] for op in operations} == {"replace"}
        for op in operations:
            assert _at(isvc, op["path"]) == op["value"] != _at(source, op["path"]), (name, op["path"])


def test_dockerfile_builds_the_shared_image_as_a_non_root_user():
    """No Docker engine here: check what the build would do, and that the version matches the image tag."""
    lines = [line.strip() for line in (ROOT / "Dockerfile").read_text().splitlines()]
    instructions = [line for line in lines if line and not line.startswith("#")]
    assert instructions[0] == "FROM python:3.11-slim"
    assert f"ARG VERSION={DEFAULT_IMAGE.rsplit(':', 1)[1]}" in instructions
    assert 'ENTRYPOINT ["driftloop"]' in instructions
    user = [line.split()[1] for line in instructions if line.startswith("USER ")]
    assert user and user[-1].split(":")[0] not in ("0", "root")
    assert any(line.startswith('RUN pip install ".') for line in instructions), "installs the project from pyproject"
    # every package pyproject ships is copied into the build context
    packages = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["include"]
    for package in packages:
        assert f"COPY {package.rstrip('*')} ./{package.rstrip('*')}" in instructions
    text = (ROOT / "Dockerfile").read_text()
    assert not any(secret in text for secret in ("MLFLOW_TRACKING_TOKEN", "MLFLOW_TRACKING_PASSWORD", "DRIFTLOOP_WEBHOOK_TOKEN",
                                                 "AWS_SECRET_ACCESS_KEY", "KFP_TOKEN"))
    ignored = (ROOT / ".dockerignore").read_text().splitlines()
    assert ".venv" in ignored and ".git" in ignored


def _metric_names(promql: str) -> set[str]:
    import re

    return set(re.findall(r"\b((?:driftloop_monitor|revision)_[a-z_]+)\s*\{", promql))


def test_dashboard_and_alerts_query_metrics_that_exist(rendered):
    """Every series the dashboard and PrometheusRule read is exported by the monitor or queried by the rollout controller."""
    import json

    from monitoring.metrics import MonitorMetrics
    from serving.rollout import PrometheusMetrics

    exported: set[str] = set()
    for family in MonitorMetrics().registry.collect():
        suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"]}.get(family.type, [""])
        exported |= {family.name + s for s in suffixes}
    exported |= {n for q in PrometheusMetrics("http://prometheus", "driftloop").queries("rev", 60).values() for n in _metric_names(q)}
    objects, _ = rendered["prod"]
    dashboard = json.loads(one(objects, "ConfigMap", "driftloop-dashboard")["data"]["driftloop-loop.json"])
    panels = {p["title"]: {n for t in p["targets"] for n in _metric_names(t["expr"])} for p in dashboard["panels"]}
    assert all(panels.values()), "every panel reads a driftloop or revision metric"
    rules = {r["alert"]: _metric_names(r["expr"]) for g in one(objects, "PrometheusRule")["spec"]["groups"] for r in g["rules"]}
    for name, used in {**panels, **rules}.items():
        assert used <= exported, f"{name}: {sorted(used - exported)} is exported by nothing"
    titles = " ".join(panels).lower()
    for topic in ("traffic split", "error rate", "latency", "drift score per feature", "retraining"):
        assert topic in titles


def test_namespace_quota_holds_the_predictor_at_full_scale_during_a_canary(rendered):
    """Primary and canary revisions both at max_replicas, with their sidecars, plus driftloop's Deployments."""
    from kubernetes.utils import parse_quantity

    for env, (objects, settings) in rendered.items():
        hard = one(objects, "ResourceQuota", "driftloop", namespace=settings.serving.namespace)["spec"]["hard"]
        defaults = one(objects, "LimitRange", namespace=settings.serving.namespace)["spec"]["limits"][0]
        pods = 2 * settings.serving.max_replicas
        sidecars = 2  # Knative's queue-proxy and KServe's agent (the logger) get the LimitRange defaults
        deployments = [d for d in objects_by_kind(objects, "Deployment") if d["metadata"]["namespace"] == settings.serving.namespace]
        for kind, default_key in (("requests", "defaultRequest"), ("limits", "default")):
            for resource in ("cpu", "memory"):
                per_pod = parse_quantity(getattr(settings.serving, f"{resource}_{kind[:-1]}"))
                per_pod += sidecars * parse_quantity(defaults[default_key][resource])
                total = pods * per_pod + sum(d["spec"]["replicas"] * parse_quantity(c["resources"][kind][resource])
                                             for d in deployments for c in d["spec"]["template"]["spec"]["containers"])
                assert total <= parse_quantity(hard[f"{kind}.{resource}"]), f"{env}: {kind}.{resource} needs {total}"
        assert pods * settings.serving.gpu <= int(hard["requests.nvidia.com/gpu"]), env
        assert pods + sum(d["spec"]["replicas"] for d in deployments) <= int(hard["pods"]), env


def test_without_kubectl_the_check_says_what_to_install(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("KUBECTL", str(tmp_path / "no-kubectl"))
    assert main([str(ROOT)]) == 2
    assert "kubectl not found (install Debian's kubernetes-client" in capsys.readouterr().err


def test_every_driftloop_container_runs_a_real_cli_command(rendered):
    """The Deployments' commands (after the image's `driftloop` entrypoint, or inside a shell loop) exist."""
    import re
    import shlex

    from typer.testing import CliRunner

    from driftloop.app.cli import app

    objects, _ = rendered["prod"]
    commands = set()
    for deployment in objects_by_kind(objects, "Deployment"):
        for c in deployment["spec"]["template"]["spec"]["containers"]:
            if c.get("command", ["driftloop"])[0] == "driftloop":
                commands.add(tuple(c["args"]))
            else:  # a shell script: every `driftloop …` it runs
                script = c["args"][-1]
                commands |= {tuple(shlex.split(m)) for m in re.findall(r"\bdriftloop ([a-z][a-z -]*?)\s*(?:&|;|\n|$)", script)}
    assert commands == {("monitor",), ("rollout", "run"), ("scheduler",), ("agent", "run", "--cluster")}
    for args in commands:
        result = CliRunner().invoke(app, [*args, "--help"])
        assert result.exit_code == 0, f"driftloop {' '.join(args)}: {result.output}"
