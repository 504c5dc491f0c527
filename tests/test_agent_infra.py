"""The agent's manifests: its own ServiceAccount may only get/watch/patch InferenceServices in its
namespace; its Deployment runs `driftloop agent run --cluster` in observe mode; the Prometheus
sampler asks for the metrics Knative's queue-proxy exports."""

from __future__ import annotations

from pathlib import Path

import httpx

from driftloop.app.infra_check import build, objects_by_kind
from serving.agent.agent import PrometheusSampler

ROOT = Path(__file__).resolve().parents[1]


def test_agent_rbac_is_get_watch_patch_of_inference_services_in_its_namespace_only() -> None:
    objects = build(ROOT / "infra" / "overlays" / "prod")
    assert not objects_by_kind(objects, "ClusterRole") and not objects_by_kind(objects, "ClusterRoleBinding")
    [deployment] = [d for d in objects_by_kind(objects, "Deployment") if d["metadata"]["name"] == "driftloop-agent"]
    pod = deployment["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == "driftloop-agent"
    [container] = pod["containers"]
    assert container["args"] == ["agent", "run", "--cluster"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["DRIFTLOOP_AGENT__MODE"] == "observe"  # roll out observing first
    bindings = [b for b in objects_by_kind(objects, "RoleBinding")
                if any(s["name"] == "driftloop-agent" for s in b["subjects"])]
    assert [b["metadata"]["namespace"] for b in bindings] == [deployment["metadata"]["namespace"]]
    [role] = [r for r in objects_by_kind(objects, "Role") if r["metadata"]["name"] == bindings[0]["roleRef"]["name"]]
    assert role["metadata"]["namespace"] == deployment["metadata"]["namespace"]
    assert role["rules"] == [{"apiGroups": ["serving.kserve.io"], "resources": ["inferenceservices"],
                              "verbs": ["get", "watch", "patch"]}]
    deny = [p for p in objects_by_kind(objects, "NetworkPolicy") if p["metadata"]["name"].endswith("deny-ingress")]
    assert any("agent" in e["values"] for p in deny for e in p["spec"]["podSelector"]["matchExpressions"])


def test_prometheus_sampler_queries_knative_revision_metrics() -> None:
    asked = []

    def answer(request: httpx.Request) -> httpx.Response:
        q = request.url.params["query"]
        asked.append(q)
        value = "40" if "5xx" not in q and "histogram" not in q else ("2" if "5xx" in q else "120.5")
        return httpx.Response(200, json={"status": "success", "data": {"resultType": "vector",
                                                                        "result": [{"value": [0, value]}]}})

    client = httpx.Client(transport=httpx.MockTransport(answer))
    sampler = PrometheusSampler("http://prom:9090", "churn", "team-a", 60, client=client)
    assert sampler.sample(0.0) == {"rps": 40.0, "latency_p99_ms": 120.5, "error_rate": 0.05}
    assert all('namespace_name="team-a"' in q and "churn-predictor" in q for q in asked)
    assert all("revision_app_request" in q for q in asked)
    broken = PrometheusSampler("http://prom:9090", "churn", "team-a",
                               client=httpx.Client(transport=httpx.MockTransport(lambda r: httpx.Response(503))))
    assert broken.sample(0.0) is None  # a Prometheus outage is a skipped round, not a crash
