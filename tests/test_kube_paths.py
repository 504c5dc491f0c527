"""Every cluster code path of driftloop against a real kube-apiserver, each as its own ServiceAccount.

infra/overlays/dev is applied (tests/kube_server.py); each path runs with a real token from the
TokenRequest API for the ServiceAccount infra/ gives it, under the Roles infra/ grants -- no admin
shortcut. Nothing else runs in the cluster: the tests play KServe's controller and the Trainer's
(they write ``status`` through the status subresource, as those controllers do), and Prometheus
is stood in for at its boundary (the canary's numbers). The agent's changes also pass the
guardrails webhook (serving.admission), which the API server calls.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml
from kubernetes import client as k8s
from kubernetes.client.rest import ApiException

from components.deploy import deploy_canary
from components.trainjob import GROUP, PLURAL, VERSION, TrainJobLauncher, TrainJobSpec, render_trainjob
from driftloop.core.errors import ServingError, TrainingError
from driftloop.core.registry import CHAMPION, Registry
from serving.agent.actions import KServeActuator
from serving.inference_service import build_inference_service, to_dict
from serving.kserve_backend import KServeBackend
from serving.rollout import PROMOTED, ROLLED_BACK, KServeTarget, RolloutController
from tests.conftest import make_settings
from tests.kube_server import DEFAULT_AGENT_POLICY, guardrails, infra_applied, service_account_user
from tests.test_shadow_cluster import prometheus

NS = "driftloop"
KFP_NS = "kubeflow"
ISVC = ("serving.kserve.io", "v1beta1", "inferenceservices")


@pytest.fixture(scope="module")
def kube():
    return infra_applied()


def kserve_client(kube, namespace: str, service_account: str):
    """kserve's real KServeClient, sending a TokenRequest token of that ServiceAccount (and nothing else)."""
    from kserve import KServeClient

    api = kube.api_client(kube.token(namespace, service_account))
    kc = KServeClient.__new__(KServeClient)  # its __init__ only loads a kubeconfig into the global default
    kc.core_api, kc.app_api = k8s.CoreV1Api(api), k8s.AppsV1Api(api)
    kc.api_instance, kc.hpa_v2_api = k8s.CustomObjectsApi(api), k8s.AutoscalingV2Api(api)
    return kc


def settings_for(tmp_path, name: str, **overrides):
    base = {"serving.name": name, "serving.namespace": NS, "kfp.host": "http://kfp.invalid",
            "rollout.step_weights": [20, 50], "rollout.interval_seconds": 0.05, "rollout.min_requests": 5}
    base.update(overrides)
    return make_settings(tmp_path / "ws", tmp_path / "none.parquet", **base)


def registry_with_two_versions(settings, tmp_path) -> Registry:
    reg = Registry.from_settings(settings)
    name = settings.mlflow.model_name
    reg.client.create_registered_model(name)
    for i in (1, 2):
        reg.client.create_model_version(name, source=str(tmp_path / f"m{i}"))
    reg.set_alias(name, CHAMPION, "1")
    reg.set_alias(name, "challenger", "2")
    return reg


class KServeController:
    """Plays KServe's controller for one InferenceService (Serverless mode): a change of the predictor
    (other than ``canaryTrafficPercent``) is a new revision; ``canaryTrafficPercent: N`` splits N % to
    the latest and the rest to the last rolled-out one; without it the latest takes 100 % and becomes
    the rolled-out one. Written through the status subresource, as the controller writes it."""

    def __init__(self, kube, name: str, namespace: str = NS) -> None:
        self.api = k8s.CustomObjectsApi(kube.admin)
        self.name, self.namespace = name, namespace
        self.templates: list[str] = []
        self.rolled_out: str | None = None
        self.previous: str | None = None

    def revision(self, n: int) -> str:
        return f"{self.name}-predictor-{n:05d}"

    def reconcile(self) -> dict:
        obj = self.api.get_namespaced_custom_object(*ISVC[:2], self.namespace, ISVC[2], self.name)
        predictor = dict(obj["spec"]["predictor"])
        canary = predictor.pop("canaryTrafficPercent", None)
        template = json.dumps(predictor, sort_keys=True)
        if not self.templates or self.templates[-1] != template:
            self.templates.append(template)
        latest = self.revision(len(self.templates))
        if canary is None or self.rolled_out in (None, latest):
            if self.rolled_out != latest:
                self.previous, self.rolled_out = self.rolled_out, latest
            traffic = [{"revisionName": latest, "percent": 100, "latestRevision": True}]
        else:
            traffic = [{"revisionName": latest, "percent": canary, "latestRevision": True, "tag": "latest"},
                       {"revisionName": self.rolled_out, "percent": 100 - canary, "latestRevision": False,
                        "tag": "prev"}]
        predictor_status = {"latestCreatedRevision": latest, "latestReadyRevision": latest,
                            "latestRolledoutRevision": self.rolled_out, "traffic": traffic,
                            "url": f"http://{self.name}-predictor.{self.namespace}.example.com"}
        if self.previous:
            predictor_status["previousRolledoutRevision"] = self.previous
        status = {"observedGeneration": obj["metadata"]["generation"],
                  "conditions": [{"type": "Ready", "status": "True", "lastTransitionTime": "2026-12-06T00:00:00Z"}],
                  "url": f"http://{self.name}.{self.namespace}.example.com",
                  "components": {"predictor": predictor_status}}
        return self.api.patch_namespaced_custom_object_status(*ISVC[:2], self.namespace, ISVC[2], self.name,
                                                              {"status": status})


def put_up(kube, settings, model_uri: str = "models:/churn/1") -> KServeController:
    """The InferenceService as infra/ (an admin's apply) puts it up, and KServe's first reconcile."""
    obj = to_dict(build_inference_service(settings, model_uri=model_uri))
    kube.apply([obj])
    controller = KServeController(kube, settings.serving.name)
    controller.reconcile()
    return controller


def live(kube, name: str) -> dict:
    return k8s.CustomObjectsApi(kube.admin).get_namespaced_custom_object(*ISVC[:2], NS, ISVC[2], name)


def args_of(obj: dict) -> list[str]:
    return obj["spec"]["predictor"]["containers"][0]["args"]


# -- deploy step → rollout controller → promotion / rollback ----------------------------------------------
def test_deploy_step_then_rollout_steps_and_promotion_as_their_service_accounts(kube, tmp_path):
    s = settings_for(tmp_path, "churn-promote")
    reg = registry_with_two_versions(s, tmp_path)
    controller = put_up(kube, s)

    deployer = KServeBackend(s, client=kserve_client(kube, KFP_NS, "driftloop-pipeline"))
    result = deploy_canary(s, version="2", home="kserve", registry=reg, backend=deployer)
    assert result.action == "canary" and result.percent == 20
    obj = live(kube, "churn-promote")
    assert obj["spec"]["predictor"]["canaryTrafficPercent"] == 20
    assert args_of(obj)[args_of(obj).index("--model-uri") + 1] == "models:/churn/2"
    controller.reconcile()

    target = KServeTarget(KServeBackend(s, client=kserve_client(kube, NS, "driftloop-rollout")), prometheus(0.0)[0])
    ctl = RolloutController(s, target, reg)
    status = target.backend.status()
    assert (status.latest_ready_revision, status.latest_rolledout_revision) == (
        "churn-promote-predictor-00002", "churn-promote-predictor-00001")
    assert ctl.step()["decision"] == "start"  # the controller adopts the deploy step's canary at 20 %
    time.sleep(0.06)
    step = ctl.step()
    assert step["decision"] == "advance" and live(kube, "churn-promote")["spec"]["predictor"]["canaryTrafficPercent"] == 50
    controller.reconcile()
    time.sleep(0.06)
    assert ctl.step()["decision"] == "promote" and ctl.state().status == PROMOTED
    obj = live(kube, "churn-promote")
    assert "canaryTrafficPercent" not in obj["spec"]["predictor"]
    assert obj["metadata"]["annotations"]["driftloop.io/model-uri"] == "models:/churn/2"
    final = controller.reconcile()
    assert final["status"]["components"]["predictor"]["traffic"] == [
        {"revisionName": "churn-promote-predictor-00002", "percent": 100, "latestRevision": True}]
    assert reg.version_by_alias("churn", CHAMPION).version == "2"


def test_a_failing_canary_is_rolled_back_by_the_rollout_controller(kube, tmp_path):
    s = settings_for(tmp_path, "churn-rollback", **{"rollout.threshold": 1})
    reg = registry_with_two_versions(s, tmp_path)
    controller = put_up(kube, s)
    deploy_canary(s, version="2", home="kserve", registry=reg,
                  backend=KServeBackend(s, client=kserve_client(kube, KFP_NS, "driftloop-pipeline")))
    controller.reconcile()
    target = KServeTarget(KServeBackend(s, client=kserve_client(kube, NS, "driftloop-rollout")), prometheus(0.5)[0])
    ctl = RolloutController(s, target, reg)
    assert ctl.step()["decision"] == "start"
    time.sleep(0.06)
    step = ctl.step()
    assert step["decision"] == "rollback" and ctl.state().status == ROLLED_BACK, step
    assert live(kube, "churn-rollback")["spec"]["predictor"]["canaryTrafficPercent"] == 0
    traffic = controller.reconcile()["status"]["components"]["predictor"]["traffic"]
    assert {t["revisionName"]: t["percent"] for t in traffic} == {"churn-rollback-predictor-00002": 0,
                                                                 "churn-rollback-predictor-00001": 100}
    assert reg.version_by_alias("churn", CHAMPION).version == "1"


def test_a_stale_resource_version_is_a_409_that_the_backend_answers_with_a_re_read(kube, tmp_path):
    """The deploy step reads the object, the agent changes minReplicas, the deploy step writes: the
    server refuses the stale write (409); the backend reads again and re-applies its change, so both
    changes are in (nothing lost, nothing half-applied)."""
    s = settings_for(tmp_path, "churn-conflict", **{"serving.max_replicas": 5})
    put_up(kube, s)
    pipeline = kserve_client(kube, KFP_NS, "driftloop-pipeline")
    agent = KServeActuator(s, client=kserve_client(kube, NS, "driftloop-agent"))
    conflicts: list[int] = []
    real_replace = pipeline.api_instance.replace_namespaced_custom_object

    def replace_after_the_agent(*args, **kwargs):
        if not conflicts:
            agent.set_floor("churn-conflict", 2)  # lands between the deploy step's read and its write
        try:
            return real_replace(*args, **kwargs)
        except ApiException as exc:
            conflicts.append(exc.status)
            raise

    pipeline.api_instance.replace_namespaced_custom_object = replace_after_the_agent
    KServeBackend(s, client=pipeline).set_canary("models:/churn/2", 10)
    assert conflicts == [409]
    predictor = live(kube, "churn-conflict")["spec"]["predictor"]
    assert predictor["minReplicas"] == 2 and predictor["canaryTrafficPercent"] == 10
    assert "models:/churn/2" in predictor["containers"][0]["args"]


# -- the agent ---------------------------------------------------------------------------------------------
def test_agent_dry_run_and_min_replicas_patch_then_hand_back(kube, tmp_path, request):
    s = settings_for(tmp_path, "churn-agent", **{"serving.max_replicas": 5, "agent.mode": "full"})
    guardrails().use(DEFAULT_AGENT_POLICY, max_replicas=5)  # the webhook reads the agent's serving.max_replicas
    request.addfinalizer(lambda: guardrails().use(DEFAULT_AGENT_POLICY))
    put_up(kube, s)
    actuator = KServeActuator(s, client=kserve_client(kube, NS, "driftloop-agent"), owns=True)
    assert actuator.current_floor("churn-agent") == 1 and actuator.paused("churn-agent") is None
    said = actuator.set_floor("churn-agent", 3)
    assert said == "spec.predictor.minReplicas=3, maxReplicas=3 on InferenceService driftloop/churn-agent"
    predictor = live(kube, "churn-agent")["spec"]["predictor"]
    assert (predictor["minReplicas"], predictor["maxReplicas"]) == (3, 3)
    assert actuator.hand_back("churn-agent").startswith("spec.predictor.minReplicas=3, maxReplicas=5")
    predictor = live(kube, "churn-agent")["spec"]["predictor"]
    assert (predictor["minReplicas"], predictor["maxReplicas"]) == (3, 5)
    # the kill switch the agent reads is the annotation an operator sets
    k8s.CustomObjectsApi(kube.admin).patch_namespaced_custom_object(
        *ISVC[:2], NS, ISVC[2], "churn-agent", {"metadata": {"annotations": {"driftloop.io/agent-paused": "true"}}})
    assert actuator.paused("churn-agent") == "annotation driftloop.io/agent-paused=true"


def test_rbac_refuses_the_agent_what_its_role_does_not_grant_with_one_line(kube, tmp_path):
    s = settings_for(tmp_path, "churn-agent-rbac")
    put_up(kube, s)
    backend = KServeBackend(s, client=kserve_client(kube, NS, "driftloop-agent"))
    with pytest.raises(ServingError) as refused:
        backend.set_canary("models:/churn/2", 10)  # a replace is an update: the agent may only patch
    text = str(refused.value)
    assert "\n" not in text and "403" in text, text
    assert 'cannot update resource "inferenceservices"' in text, text


# -- the distributed train step: a Kubeflow Trainer TrainJob ----------------------------------------------
class TrainerController(threading.Thread):
    """Plays the Trainer's controller (and JobSet's) for one TrainJob: once it is there, its node pods
    appear and then its status says ``outcome`` (none: it never finishes)."""

    def __init__(self, kube, name: str, outcome: str, reason: str = "", message: str = ""):
        super().__init__(daemon=True)
        self.api, self.core = k8s.CustomObjectsApi(kube.admin), k8s.CoreV1Api(kube.admin)
        self.name, self.outcome, self.reason, self.message = name, outcome, reason, message

    def run(self) -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                job = self.api.get_namespaced_custom_object(GROUP, VERSION, KFP_NS, PLURAL, self.name)
            except ApiException:
                time.sleep(0.1)
                continue
            for i in range(job["spec"]["trainer"]["numNodes"]):
                self.core.create_namespaced_pod(KFP_NS, {
                    "apiVersion": "v1", "kind": "Pod",
                    "metadata": {"name": f"{self.name}-node-0-{i}", "labels": {
                        "jobset.sigs.k8s.io/jobset-name": self.name, "batch.kubernetes.io/job-completion-index": str(i)}},
                    "spec": {"containers": [{"name": "node", "image": job["spec"]["trainer"]["image"]}]}})
            if self.outcome:
                condition = {"type": self.outcome, "status": "True", "reason": self.reason or self.outcome,
                             "message": self.message, "lastTransitionTime": "2026-12-06T00:00:00Z"}
                self.api.patch_namespaced_custom_object_status(GROUP, VERSION, KFP_NS, PLURAL, self.name,
                                                               {"status": {"conditions": [condition]}})
            return


def trainjob(name: str, deadline: int = 600) -> dict:
    return render_trainjob(TrainJobSpec(name=name, namespace=KFP_NS, image="ghcr.io/driftloop/driftloop:0.1.0",
                                        command=["python", "-m", "components.distributed"], nodes=2,
                                        active_deadline_seconds=deadline))


def launcher_as_pipeline(kube, lines: list[str], **kwargs) -> TrainJobLauncher:
    api = kube.api_client(kube.token(KFP_NS, "driftloop-pipeline"))
    return TrainJobLauncher(k8s.CustomObjectsApi(api), k8s.CoreV1Api(api), poll_seconds=0.2, echo=lines.append,
                            watch=True, watch_seconds=1, **kwargs)


def test_trainjob_launcher_creates_waits_shows_nodes_and_finishes_as_the_pipeline_account(kube):
    kube.apply([{"apiVersion": "trainer.kubeflow.org/v1alpha1", "kind": "TrainingRuntime",
                 "metadata": {"name": "xgboost-distributed", "namespace": KFP_NS},
                 "spec": {"mlPolicy": {"numNodes": 1, "xgboost": {}}, "template": {"spec": {"replicatedJobs": []}}}}])
    lines: list[str] = []
    launcher = launcher_as_pipeline(kube, lines)
    assert launcher.runtime_kind(KFP_NS, "xgboost-distributed") == "TrainingRuntime"
    assert launcher.runtime_kind(KFP_NS, "no-such-runtime") == "ClusterTrainingRuntime"
    TrainerController(kube, "tj-complete", "Complete").start()
    body = trainjob("tj-complete")
    final = launcher.run(body)
    assert final["status"]["conditions"][0]["type"] == "Complete"
    assert lines[0] == "TrainJob kubeflow/tj-complete: 2 nodes on runtime 'xgboost-distributed'"
    # the node pods were listed and each one's log read (list pods, get pods/log are granted; a refusal
    # would be echoed as "(log unavailable: ...)"): empty, as no kubelet ever ran them
    assert lines[1:] == ["TrainJob kubeflow/tj-complete complete"]
    stored = k8s.CustomObjectsApi(kube.admin).get_namespaced_custom_object(GROUP, VERSION, KFP_NS, PLURAL,
                                                                            "tj-complete")
    assert stored["spec"] == body["spec"]  # nothing pruned: every field the launcher sent is in the CRD


def test_trainjob_failure_and_timeout_are_one_line_and_a_timed_out_job_is_deleted(kube):
    lines: list[str] = []
    TrainerController(kube, "tj-failed", "Failed", reason="JobFailed", message="worker 1 exited with code 3").start()
    with pytest.raises(TrainingError, match=r"^TrainJob kubeflow/tj-failed failed \(JobFailed\): worker 1 exited"):
        launcher_as_pipeline(kube, lines).run(trainjob("tj-failed"))

    ticks = iter(range(0, 10**6, 30))
    TrainerController(kube, "tj-slow", "").start()  # pods, never a terminal condition
    with pytest.raises(TrainingError, match=r"did not finish within 60 s .* deleted it"):
        launcher_as_pipeline(kube, lines, clock=lambda: float(next(ticks))).run(trainjob("tj-slow", 60),
                                                                                grace_seconds=30)
    with pytest.raises(ApiException) as gone:
        k8s.CustomObjectsApi(kube.admin).get_namespaced_custom_object(GROUP, VERSION, KFP_NS, PLURAL, "tj-slow")
    assert gone.value.status == 404


def test_trainjob_watch_expires_and_resumes(kube):
    """The launcher waits with a watch (verb watch, granted; list is not). Each watch ends after its
    timeout and resumes from the version it saw; once etcd is compacted past that version the API
    server answers 410 Gone, and the launcher watches again from now -- and still sees the job finish."""
    lines: list[str] = []
    launcher = launcher_as_pipeline(kube, lines)
    watches: list[str | None] = []
    real_list = launcher.api.list_namespaced_custom_object

    def counted(*args, **kwargs):
        watches.append(kwargs.get("resource_version"))
        return real_list(*args, **kwargs)

    launcher.api.list_namespaced_custom_object = counted
    result: dict = {}
    waiting = threading.Thread(target=lambda: result.update(launcher.run(trainjob("tj-watch"))), daemon=True)
    waiting.start()
    wait_for_count = time.monotonic() + 60
    while len(watches) < 2 and time.monotonic() < wait_for_count:  # one watch expired by its timeout, resumed
        time.sleep(0.1)
    assert len(watches) >= 2 and watches[0] == watches[1] is not None, watches
    # move etcd on (two writes: a watch from version v starts at v + 1) and compact it: the version the
    # launcher resumes from is gone
    for i in range(2):
        k8s.CoreV1Api(kube.admin).create_namespaced_config_map(KFP_NS, {"metadata": {"name": f"advance-etcd-{i}"}})
    kube.compact()
    deadline = time.monotonic() + 60
    while not launcher.expired and time.monotonic() < deadline:
        time.sleep(0.1)
    assert launcher.expired >= 1 and None in watches  # a 410, then watching again from now
    TrainerController(kube, "tj-watch", "Complete").start()
    waiting.join(timeout=60)
    assert result["status"]["conditions"][0]["type"] == "Complete"
    assert lines[-1] == "TrainJob kubeflow/tj-watch complete"


# -- `driftloop deploy --apply` ------------------------------------------------------------------------------
def test_cli_deploy_apply_as_the_pipeline_account(kube, tmp_path):
    """`driftloop deploy --apply` (the real command, a process) with the pipeline's kubeconfig: it replaces the
    existing InferenceService (get + update are granted); creating a new one is refused by RBAC with one
    line on stderr, exit status 2, nothing created."""
    s = settings_for(tmp_path, "churn-cli")
    put_up(kube, s)
    config = tmp_path / "driftloop.yaml"
    config.write_text(yaml.safe_dump({"workspace": str(tmp_path / "ws"), "data": {"source": str(tmp_path / "x.parquet")},
                                      "mlflow": {"model_name": "churn"}, "kfp": {"host": "http://kfp.invalid"},
                                      "serving": {"name": "churn-cli", "namespace": NS, "max_replicas": 4}}))
    env = {**os.environ, "KUBECONFIG": str(kube.kubeconfig(kube.token(KFP_NS, "driftloop-pipeline"), "pipeline"))}
    command = [str(Path(sys.executable).parent / "driftloop"), "deploy", "-c", str(config), "--apply"]
    out = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "applied InferenceService driftloop/churn-cli" in out.stdout
    assert live(kube, "churn-cli")["spec"]["predictor"]["maxReplicas"] == 4

    config.write_text(config.read_text().replace("churn-cli", "churn-cli-new"))
    out = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    (message,) = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert message.startswith("error: cannot create InferenceService driftloop/churn-cli-new: 403 Forbidden: ")
    assert 'cannot create resource "inferenceservices"' in message, message
    with pytest.raises(ApiException) as gone:
        live(kube, "churn-cli-new")
    assert gone.value.status == 404


# -- RBAC: what each ServiceAccount may do, asked of the API server ---------------------------------------------
RBAC_TABLE = [
    # (namespace, service account, group, resource, name or None, allowed verbs) in the namespace given;
    # every other verb of VERBS is refused there
    (NS, "driftloop-agent", NS, "serving.kserve.io", "inferenceservices", None, {"get", "watch", "patch"}),
    (NS, "driftloop-rollout", NS, "serving.kserve.io", "inferenceservices", None,
     {"get", "watch", "patch", "update", "create"}),
    (NS, "driftloop-rollout", NS, "serving.kserve.io", "inferenceservices", "driftloop-model-shadow",
     {"get", "watch", "patch", "update", "create", "delete"}),
    (NS, "driftloop-rollout", NS, "networking.istio.io", "virtualservices", None, {"get", "create"}),
    (NS, "driftloop-rollout", NS, "networking.istio.io", "virtualservices", "driftloop-model-mirror",
     {"get", "create", "update", "delete"}),
    (KFP_NS, "driftloop-pipeline", NS, "serving.kserve.io", "inferenceservices", None, {"get", "update", "patch"}),
    (KFP_NS, "driftloop-pipeline", KFP_NS, "trainer.kubeflow.org", "trainjobs", None,
     {"create", "get", "watch", "delete"}),
    (KFP_NS, "driftloop-pipeline", KFP_NS, "trainer.kubeflow.org", "trainingruntimes", None, {"get", "list"}),
    (KFP_NS, "driftloop-pipeline", KFP_NS, "", "pods", None, {"get", "list"}),
    (KFP_NS, "driftloop-pipeline", KFP_NS, "argoproj.io", "workflowtaskresults", None, {"create", "patch"}),
    (KFP_NS, "driftloop-pipeline", NS, "trainer.kubeflow.org", "trainjobs", None, set()),
    (NS, "driftloop-monitor", KFP_NS, "pipelines.kubeflow.org", "runs", None, {"create", "get", "list"}),
    (NS, "driftloop-monitor", NS, "serving.kserve.io", "inferenceservices", None, set()),
    (NS, "driftloop-agent", KFP_NS, "serving.kserve.io", "inferenceservices", None, set()),
    (NS, "driftloop-agent", NS, "", "pods", None, set()),
    (NS, "driftloop-admission", NS, "serving.kserve.io", "inferenceservices", None, set()),
]
VERBS = ("get", "list", "watch", "create", "update", "patch", "delete", "deletecollection")


@pytest.mark.parametrize("sa_ns,sa,ns,group,resource,name,allowed", RBAC_TABLE,
                         ids=[f"{r[1]}:{r[4]}@{r[2]}{'/' + r[5] if r[5] else ''}" for r in RBAC_TABLE])
def test_rbac_table_each_account_may_do_exactly_what_infra_grants(kube, sa_ns, sa, ns, group, resource, name, allowed):
    user = service_account_user(sa_ns, sa)
    groups = ["system:serviceaccounts", f"system:serviceaccounts:{sa_ns}", "system:authenticated"]
    answered = {verb for verb in VERBS
                if kube.can(user, verb, namespace=ns, group=group, resource=resource, name=name, groups=groups)}
    assert answered == allowed


def test_pod_logs_are_the_only_subresource_the_pipeline_reads(kube):
    user = service_account_user(KFP_NS, "driftloop-pipeline")
    assert kube.can(user, "get", namespace=KFP_NS, resource="pods", subresource="log")
    assert not kube.can(user, "create", namespace=KFP_NS, resource="pods", subresource="exec")
    assert not kube.can(user, "get", namespace=NS, resource="pods", subresource="log")


# -- the API server goes away and comes back ------------------------------------------------------------------
def test_an_api_server_that_goes_away_and_comes_back(kube, tmp_path):
    """While it is away: a change fails with one line and nothing is half-applied; a TrainJob launcher
    that is waiting keeps waiting (and logs the failed reads). When it is back (same etcd, same signing
    key: the tokens still hold) the change goes through and the launcher sees its job finish."""
    s = settings_for(tmp_path, "churn-away")
    put_up(kube, s)
    backend = KServeBackend(s, client=kserve_client(kube, NS, "driftloop-rollout"))
    before = live(kube, "churn-away")
    lines: list[str] = []
    launcher = launcher_as_pipeline(kube, lines)
    waited: dict = {}
    waiting = threading.Thread(target=lambda: waited.update(launcher.run(trainjob("tj-outage"))), daemon=True)
    waiting.start()
    deadline = time.monotonic() + 60
    while not lines and time.monotonic() < deadline:  # created, now polling
        time.sleep(0.1)
    kube.stop_apiserver()
    try:
        with pytest.raises(ServingError) as down:
            backend.set_traffic(30)
        text = str(down.value)
        assert "\n" not in text and text.startswith("cannot patch InferenceService driftloop/churn-away: ")
        assert "Connection refused" in text, text
        time.sleep(1.0)  # the launcher polls into the outage
        assert waiting.is_alive()
    finally:
        kube.start_apiserver()
    after = live(kube, "churn-away")
    assert after["metadata"]["resourceVersion"] == before["metadata"]["resourceVersion"]  # nothing half-applied
    backend.set_traffic(30)
    assert live(kube, "churn-away")["spec"]["predictor"]["canaryTrafficPercent"] == 30
    TrainerController(kube, "tj-outage", "Complete").start()
    waiting.join(timeout=120)
    assert not waiting.is_alive() and waited["status"]["conditions"][0]["type"] == "Complete"
    assert lines[-1] == "TrainJob kubeflow/tj-outage complete"


# -- the shadow phase: a second InferenceService and the Istio mirror -------------------------------------------
def test_shadow_phase_puts_up_and_takes_down_its_objects_as_the_rollout_account(kube, tmp_path):
    """infra/'s InferenceService (driftloop-model): the rollout controller creates the shadow, waits for
    KServe to call it ready (the test plays KServe), creates the mirror VirtualService, replaces it with a
    new percentage and deletes both -- update and delete granted for those two names only."""
    s = settings_for(tmp_path, "driftloop-model")
    backend = KServeBackend(s, client=kserve_client(kube, NS, "driftloop-rollout"))
    shadow = KServeController(kube, "driftloop-model-shadow")

    def play_kserve() -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                shadow.reconcile()
                return
            except ApiException:
                time.sleep(0.2)

    threading.Thread(target=play_kserve, daemon=True).start()
    mirror = backend.set_shadow("models:/churn/2", "2", 5.0, ready_timeout=60)
    assert mirror["spec"]["http"][0]["mirrorPercentage"] == {"value": 5.0}
    assert mirror["spec"]["http"][0]["mirror"]["host"].startswith("driftloop-model-shadow-predictor-00001")
    again = backend.set_shadow("models:/churn/2", "2", 10.0, ready_timeout=60)
    assert again["spec"]["http"][0]["mirrorPercentage"] == {"value": 10.0}
    backend.remove_shadow()
    assert backend.mirror() is None and backend.shadow_status() is None
