"""The agent's guardrails enforced by the cluster: a validating admission webhook.

The serving agent checks every action against its policy (:mod:`serving.agent.policy`) before it
patches an InferenceService. This webhook checks the same policy again where the agent cannot
skip it: the API server sends it every change of an InferenceService, and it refuses -- for the
agent's ServiceAccount only -- a ``minReplicas`` below the model's floor or above its ceiling, a
step larger than the policy allows, any change inside a blackout window or while the kill switch
annotation is on, a lowering or a canary rollback the mode does not allow, any change in observe
mode, and any change of another field (the agent may touch ``minReplicas``, ``maxReplicas`` and
``canaryTrafficPercent`` only -- not the kill switch). It reads the policy from the same
configuration file as the agent (``agent:``; ``$DRIFTLOOP_CONFIG`` and the ``DRIFTLOOP_*``
environment, reloaded when the file changes), so a bug in the agent cannot break it.

A fleet file (docs/fleet.md) is judged per model: the InferenceService ``<serving.namespace>/<serving.name>`` of
each model is held to that model's ``agent`` policy and ``serving.max_replicas``; the agent's change of an
InferenceService that is no model of the file is refused (the agent has no policy for it). A fleet's agent runs
in one namespace and acts in the teams' (``--agent-namespace``: the namespace of its ServiceAccount; unset, the
ServiceAccount is looked for in each object's own namespace, as a one-model install has it).

Stateless on purpose: the cooldown and the hourly budget need the agent's own history and stay
in the agent's guard; an agent's graceful hand-back (``maxReplicas`` back to
``serving.max_replicas``, nothing else) is allowed in full mode unless the kill switch is on,
as in the agent. Everyone else's changes (deploy step, rollout controller, people) are allowed
here untouched. ``infra/base/admission-webhook.yaml`` wires it in (why ``failurePolicy: Fail``
and the ``namespaceSelector``: see there); :func:`constraint_template` renders the same rules -- of one model
or of a fleet file -- as an OPA Gatekeeper ConstraintTemplate + Constraint for clusters that run Gatekeeper
instead (``driftloop infra gatekeeper``).

``python -m serving.admission --cert tls.crt --key tls.key [--host 127.0.0.1] [--port 8443]``
serves ``POST /validate`` (an ``admission.k8s.io/v1`` AdmissionReview) over TLS and ``GET /healthz``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import ssl
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from driftloop.core.config import Settings
from driftloop.core.errors import ConfigError
from driftloop.core.fleet import Fleet, load_fleet
from serving.agent.policy import Policy, in_blackout, urgent_step

__all__ = ["AGENT_SERVICE_ACCOUNT", "WEBHOOK_NAME", "Verdict", "judge", "review", "FleetPolicies", "policies_of",
           "PolicySource", "AdmissionServer",
           "constraint_template", "main"]

log = logging.getLogger(__name__)

#: The agent's ServiceAccount (infra/base/agent.yaml); the webhook judges it in the object's namespace.
AGENT_SERVICE_ACCOUNT = "driftloop-agent"
#: The webhook's name in the ValidatingWebhookConfiguration (it prefixes every refusal the client sees).
WEBHOOK_NAME = "agent-guardrails.driftloop.io"
#: The only fields of an InferenceService the agent may change.
AGENT_FIELDS = ("minReplicas", "maxReplicas", "canaryTrafficPercent")
_MAX_BODY = 4 * 1024 * 1024
_TRUE = ("true", "1", "yes")


@dataclass(frozen=True)
class Verdict:
    allowed: bool
    reason: str


def _predictor(obj: dict[str, Any] | None) -> dict[str, Any]:
    return ((obj or {}).get("spec") or {}).get("predictor") or {}


def _without_agent_fields(obj: dict[str, Any] | None) -> tuple[Any, Any, Any]:
    """What the agent may not change: the spec without its three fields, the labels and annotations."""
    spec = json.loads(json.dumps((obj or {}).get("spec") or {}))
    for key in AGENT_FIELDS:
        (spec.get("predictor") or {}).pop(key, None)
    meta = (obj or {}).get("metadata") or {}
    return spec, meta.get("labels") or {}, meta.get("annotations") or {}


def judge(old: dict[str, Any], new: dict[str, Any], *, policy: Policy, kill_annotation: str, max_replicas: int,
          now: float) -> Verdict:
    """The policy's answer to the agent changing ``old`` into ``new`` (one InferenceService) at ``now``."""
    model = str(((new.get("metadata") or {}).get("name")) or "")
    if _without_agent_fields(old) != _without_agent_fields(new):
        return Verdict(False, f"the agent may change only spec.predictor.{{{','.join(AGENT_FIELDS)}}} of "
                              "an InferenceService; this request changes other fields")
    before, after = _predictor(old), _predictor(new)
    if all(before.get(k) == after.get(k) for k in AGENT_FIELDS):
        return Verdict(True, "no change of replicas or traffic")
    if policy.mode == "observe":
        return Verdict(False, "observe mode: the agent may change nothing")
    switch = str(((old.get("metadata") or {}).get("annotations") or {}).get(kill_annotation, "")).lower()
    if switch in _TRUE:
        return Verdict(False, f"kill switch: annotation {kill_annotation}={switch}")
    old_min, new_min = int(before.get("minReplicas", 1)), int(after.get("minReplicas", 1))
    old_max, new_max = before.get("maxReplicas"), after.get("maxReplicas")
    if (new_min == old_min and before.get("canaryTrafficPercent") == after.get("canaryTrafficPercent")
            and new_max == max_replicas and policy.mode == "full"):
        return Verdict(True, f"hand-back: maxReplicas {old_max} -> {new_max} (serving.max_replicas)")
    window = in_blackout(policy.blackout, now)
    if window:
        return Verdict(False, f"blackout window {window} (UTC): no automatic change")
    if before.get("canaryTrafficPercent") != after.get("canaryTrafficPercent"):
        if policy.mode != "full":
            return Verdict(False, f"mode {policy.mode} may not roll back a canary")
        if after.get("canaryTrafficPercent") != 0:
            return Verdict(False, f"the agent may only roll a canary back (canaryTrafficPercent: 0), "
                                  f"not set it to {after.get('canaryTrafficPercent')}")
    lo, hi = policy.bounds(model)
    if new_min != old_min:
        if new_min < lo:
            return Verdict(False, f"minReplicas {new_min} is below the floor {lo} of {model}")
        if new_min > hi:
            return Verdict(False, f"minReplicas {new_min} is above the ceiling {hi} of {model}")
        if new_min < old_min and policy.mode != "full":
            return Verdict(False, f"mode {policy.mode} may not lower a floor ({old_min} -> {new_min})")
        largest = urgent_step(policy.max_step, old_min) if new_min > old_min else policy.max_step
        if abs(new_min - old_min) > largest:
            return Verdict(False, f"minReplicas {old_min} -> {new_min} is a step of {abs(new_min - old_min)}, "
                                  f"more than the {largest} the policy allows")
    if new_max != old_max and new_max not in (new_min, max_replicas):
        return Verdict(False, f"maxReplicas {new_max} is neither minReplicas {new_min} (the agent owns the count) "
                              f"nor serving.max_replicas {max_replicas} (handed back)")
    return Verdict(True, f"within the policy: minReplicas {old_min} -> {new_min}, floor {lo}, ceiling {hi}")


@dataclass(frozen=True)
class FleetPolicies:
    """A fleet file's models by the InferenceService each is served as: ``(serving.namespace, serving.name)``."""

    source: str
    models: dict[tuple[str, str], Settings]

    @classmethod
    def of(cls, fleet: Any) -> "FleetPolicies":
        return cls(str(fleet.source), {(m.settings.serving.namespace, m.settings.serving.name): m.settings
                                       for m in fleet.models})

    def settings_for(self, namespace: str, name: str) -> Settings | None:
        return self.models.get((namespace, name))


def policies_of(fleet: Fleet) -> Settings | FleetPolicies:
    """What the guardrails hold the agent to: a one-model file's settings, or a fleet file's models by their
    InferenceService."""
    return fleet.models[0].settings if fleet.single else FleetPolicies.of(fleet)


def review(doc: dict[str, Any], settings: Settings | FleetPolicies | None, *, now: float | None = None,
           service_account: str = AGENT_SERVICE_ACCOUNT, policy_error: str | None = None,
           agent_namespace: str | None = None) -> dict[str, Any]:
    """The AdmissionReview answer to ``doc`` (``admission.k8s.io/v1``). ``settings`` None with
    ``policy_error``: the policy could not be read, so the agent's changes are refused (fail closed); a
    :class:`FleetPolicies`: the object's model's. ``agent_namespace``: where the agent's ServiceAccount is
    (None: the object's own namespace)."""
    request = doc.get("request") or {}
    uid = request.get("uid", "")
    user = (request.get("userInfo") or {}).get("username", "")
    namespace = request.get("namespace") or ""
    agent = f"system:serviceaccount:{agent_namespace or namespace}:{service_account}"
    resource = request.get("resource") or {}
    unknown = None  # a fleet file: the object is none of its models
    if isinstance(settings, FleetPolicies):
        name = request.get("name") or ((request.get("object") or {}).get("metadata") or {}).get("name") or ""
        fleet, settings = settings, settings.settings_for(namespace, name)
        if settings is None:
            unknown = (f"InferenceService {namespace}/{name} is no model of the fleet file {fleet.source}: the agent "
                       "has no policy for it")
    if user != agent or request.get("operation") != "UPDATE" or resource.get("resource") != "inferenceservices":
        verdict = Verdict(True, "not the agent's change")
    elif settings is None:
        verdict = Verdict(False, unknown or f"the agent's policy cannot be read: {policy_error}")
    else:
        verdict = judge(request.get("oldObject") or {}, request.get("object") or {},
                        policy=Policy.from_config(settings.agent), kill_annotation=settings.agent.kill_switch_annotation,
                        max_replicas=int(settings.serving.max_replicas), now=time.time() if now is None else now)
    if user == agent:
        log.info("%s %s %s/%s: %s", "allowed" if verdict.allowed else "refused", user, namespace,
                 request.get("name"), verdict.reason)
    response: dict[str, Any] = {"uid": uid, "allowed": verdict.allowed}
    if not verdict.allowed:
        response["status"] = {"code": 403, "reason": "Forbidden", "message": verdict.reason}
    return {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "response": response}


class PolicySource:
    """The agent's configuration, loaded from ``path`` (default ``$DRIFTLOOP_CONFIG``) and loaded again
    whenever the file changes; a file that does not load leaves the agent's changes refused."""

    def __init__(self, path: str | Path | None = None, environ: dict[str, str] | None = None) -> None:
        self.environ = dict(os.environ if environ is None else environ)
        found = path or self.environ.get("DRIFTLOOP_CONFIG")
        self.path = Path(found) if found else None
        self._stamp: tuple[int, int] | None = None
        self._settings: Settings | FleetPolicies | None = None
        self._error: str | None = None
        self._lock = threading.Lock()

    def current(self) -> tuple[Settings | FleetPolicies | None, str | None]:
        """The configuration's settings (a fleet file: :class:`FleetPolicies`), or None and why it does not load."""
        with self._lock:
            stamp = None
            if self.path is not None:
                try:
                    st = self.path.stat()
                    stamp = (st.st_mtime_ns, st.st_size)
                except OSError as exc:
                    self._settings, self._error, self._stamp = None, f"{self.path}: {exc.strerror}", None
                    return None, self._error
            if self._stamp is None or stamp != self._stamp:
                try:
                    self._settings = policies_of(load_fleet(self.path, environ=self.environ))
                    self._error = None
                except ConfigError as exc:
                    self._settings, self._error = None, str(exc)
                self._stamp = stamp or (0, 0)
            return self._settings, self._error


class _Handler(BaseHTTPRequestHandler):
    server: "AdmissionServer"

    def log_message(self, fmt: str, *args: Any) -> None:  # access log at debug level only
        log.debug("%s " + fmt, self.address_string(), *args)

    def _send(self, code: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        if self.path == "/healthz":
            settings, error = self.server.policy.current()
            self._send(200 if settings is not None else 503, {"ok": settings is not None, "error": error})
        else:
            self._send(404, {"error": f"no such path {self.path}"})

    def do_POST(self) -> None:  # noqa: N802
        if self.path.split("?")[0] != "/validate":
            self._send(404, {"error": f"no such path {self.path}; the webhook is POST /validate"})
            return
        try:
            length = int(self.headers.get("content-length") or 0)
        except ValueError:
            length = -1
        if length <= 0 or length > _MAX_BODY:
            self._send(400, {"error": f"an AdmissionReview body of 1 to {_MAX_BODY} bytes is needed"})
            return
        try:
            doc = json.loads(self.rfile.read(length))
            if not isinstance(doc, dict) or not isinstance(doc.get("request"), dict):
                raise ValueError("not an AdmissionReview (no request)")
        except ValueError as exc:
            self._send(400, {"error": f"bad AdmissionReview: {exc}"})
            return
        settings, error = self.server.policy.current()
        self._send(200, review(doc, settings, policy_error=error, service_account=self.server.service_account,
                               agent_namespace=self.server.agent_namespace))


class AdmissionServer(ThreadingHTTPServer):
    """The webhook over TLS. ``serve_forever`` in a thread (tests) or in the process (``main``)."""

    daemon_threads = True

    def __init__(self, cert: str | Path, key: str | Path, policy: PolicySource, *, host: str = "127.0.0.1",
                 port: int = 8443, service_account: str = AGENT_SERVICE_ACCOUNT,
                 agent_namespace: str | None = None) -> None:
        super().__init__((host, port), _Handler)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(str(cert), str(key))
        self.socket = context.wrap_socket(self.socket, server_side=True)
        self.policy = policy
        self.service_account = service_account
        self.agent_namespace = agent_namespace

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"https://{host}:{port}/validate"


# -- OPA Gatekeeper: the same rules as a ConstraintTemplate + Constraint --------------------------------------
# ``policy``: the parameters themselves (one model's policy, for every InferenceService), or of a fleet the entry
# ``fleet["<namespace>/<name>"]`` of the reviewed InferenceService (undefined for one of no model: refused).
_REGO = """package driftloopagentguardrails

agent := sprintf("system:serviceaccount:%v:%v", [object.get(input.parameters, "agentNamespace", input.review.namespace), input.parameters.serviceAccount])
is_agent { input.review.userInfo.username == agent; input.review.operation == "UPDATE" }
key := sprintf("%v/%v", [input.review.namespace, input.review.object.metadata.name])
is_fleet { input.parameters.fleet }
policy := input.parameters.fleet[key] { is_fleet }
policy := input.parameters { not is_fleet }
old := object.get(input.review.oldObject.spec, "predictor", {})
new := object.get(input.review.object.spec, "predictor", {})
old_min := object.get(old, "minReplicas", 1)
new_min := object.get(new, "minReplicas", 1)
agent_fields := {"minReplicas", "maxReplicas", "canaryTrafficPercent"}
rest(o) := {"spec": object.union(object.get(o, "spec", {}), {"predictor": object.remove(object.get(object.get(o, "spec", {}), "predictor", {}), agent_fields)}),
            "labels": object.get(o.metadata, "labels", {}), "annotations": object.get(o.metadata, "annotations", {})}
changed { some f; agent_fields[f]; object.get(old, f, null) != object.get(new, f, null) }
bounds := [lo, hi] {
  m := object.get(object.get(policy, "models", {}), input.review.object.metadata.name, {})
  lo := object.get(m, "floor", policy.floor)
  hi := object.get(m, "ceiling", policy.ceiling)
}
now_minute := floor(time.now_ns() / 60000000000) % 1440
in_window(w) { w.start <= w.end; now_minute >= w.start; now_minute < w.end }
in_window(w) { w.start > w.end; now_minute >= w.start }
in_window(w) { w.start > w.end; now_minute < w.end }
paused { lower(object.get(object.get(input.review.oldObject.metadata, "annotations", {}), policy.killSwitchAnnotation, "")) == {"true", "1", "yes"}[_] }
hand_back { new_min == old_min; object.get(old, "canaryTrafficPercent", null) == object.get(new, "canaryTrafficPercent", null)
            object.get(new, "maxReplicas", null) == policy.maxReplicas; policy.mode == "full" }
largest := s { new_min > old_min; s := max({policy.maxStep, old_min, 4}) }
largest := policy.maxStep { new_min <= old_min }

violation[{"msg": sprintf("InferenceService %v is no model of the fleet: the agent has no policy for it", [key])}] { is_agent; is_fleet; not input.parameters.fleet[key] }
violation[{"msg": "the agent may change only minReplicas, maxReplicas and canaryTrafficPercent"}] { is_agent; rest(input.review.oldObject) != rest(input.review.object) }
violation[{"msg": "observe mode: the agent may change nothing"}] { is_agent; changed; policy.mode == "observe" }
violation[{"msg": "kill switch is on"}] { is_agent; changed; paused }
violation[{"msg": "blackout window: no automatic change"}] { is_agent; changed; not hand_back; w := policy.blackout[_]; in_window(w) }
violation[{"msg": sprintf("minReplicas %v is below the floor %v", [new_min, bounds[0]])}] { is_agent; new_min != old_min; new_min < bounds[0] }
violation[{"msg": sprintf("minReplicas %v is above the ceiling %v", [new_min, bounds[1]])}] { is_agent; new_min != old_min; new_min > bounds[1] }
violation[{"msg": "this mode may not lower a floor"}] { is_agent; new_min < old_min; policy.mode != "full" }
violation[{"msg": sprintf("a step of %v is more than the policy allows", [abs(new_min - old_min)])}] { is_agent; abs(new_min - old_min) > largest }
violation[{"msg": "the agent may only roll a canary back (canaryTrafficPercent: 0)"}] { is_agent; object.get(old, "canaryTrafficPercent", null) != object.get(new, "canaryTrafficPercent", null); object.get(new, "canaryTrafficPercent", null) != 0 }
violation[{"msg": "this mode may not roll back a canary"}] { is_agent; object.get(old, "canaryTrafficPercent", null) != object.get(new, "canaryTrafficPercent", null); policy.mode != "full" }
violation[{"msg": "maxReplicas is neither minReplicas nor serving.max_replicas"}] { is_agent; m := object.get(new, "maxReplicas", null); m != object.get(old, "maxReplicas", null); m != new_min; m != policy.maxReplicas }
"""
_KIND = "DriftloopAgentGuardrails"


def _policy_schema() -> dict[str, Any]:
    """The schema of one model's policy in the Constraint's parameters (:func:`_policy_parameters`)."""
    window = {"type": "object", "properties": {"start": {"type": "integer"}, "end": {"type": "integer"}}}
    bounds = {"type": "object", "properties": {"floor": {"type": "integer"}, "ceiling": {"type": "integer"}}}
    return {"mode": {"type": "string", "enum": ["observe", "scale-up", "full"]},
            "floor": {"type": "integer"}, "ceiling": {"type": "integer"}, "maxStep": {"type": "integer"},
            "maxReplicas": {"type": "integer"}, "killSwitchAnnotation": {"type": "string"},
            "blackout": {"type": "array", "items": window},
            "models": {"type": "object", "additionalProperties": bounds}}


def _minutes(hhmm: str) -> int:
    hours, minutes = hhmm.split(":")
    return int(hours) * 60 + int(minutes)


def _policy_parameters(settings: Settings) -> dict[str, Any]:
    """One model's ``agent`` policy and ``serving.max_replicas`` as the Rego reads them."""
    a = settings.agent
    return {
        "mode": a.mode, "floor": a.floor, "ceiling": a.ceiling, "maxStep": a.max_step,
        "maxReplicas": int(settings.serving.max_replicas), "killSwitchAnnotation": a.kill_switch_annotation,
        "blackout": [{"start": _minutes(w.split("-")[0]), "end": _minutes(w.split("-")[1])} for w in a.blackout],
        "models": {name: {k: v for k, v in (("floor", m.floor), ("ceiling", m.ceiling)) if v is not None}
                   for name, m in a.models.items()},
    }


def constraint_template(settings: Settings | FleetPolicies, *, service_account: str = AGENT_SERVICE_ACCOUNT,
                        namespaces: list[str] | None = None,
                        agent_namespace: str | None = None) -> list[dict[str, Any]]:
    """The webhook's rules for OPA Gatekeeper: a ``ConstraintTemplate`` (Rego, parameters typed) and
    its ``Constraint`` carrying this configuration's policy -- for clusters that run Gatekeeper instead
    of (or beside) this webhook. One model's settings: its policy, for every InferenceService the Constraint
    matches; a fleet (:class:`FleetPolicies`): each model's under ``fleet["<namespace>/<name>"]``, and the
    agent's change of an InferenceService of no model refused. ``agent_namespace``: where the agent's
    ServiceAccount is (None: each object's own namespace). The policy is rendered into the Constraint, so
    re-render it when the configuration changes (the webhook reads the file itself)."""
    schema = {"type": "object", "properties": {
        "serviceAccount": {"type": "string"}, "agentNamespace": {"type": "string"}, **_policy_schema(),
        "fleet": {"type": "object", "additionalProperties": {"type": "object", "properties": _policy_schema()}}}}
    labels = {"app.kubernetes.io/part-of": "driftloop"}
    template = {
        "apiVersion": "templates.gatekeeper.sh/v1", "kind": "ConstraintTemplate",
        "metadata": {"name": _KIND.lower(), "labels": labels},
        "spec": {"crd": {"spec": {"names": {"kind": _KIND}, "validation": {"openAPIV3Schema": schema}}},
                 "targets": [{"target": "admission.k8s.gatekeeper.sh", "rego": _REGO}]},
    }
    parameters: dict[str, Any] = {"serviceAccount": service_account}
    if agent_namespace:
        parameters["agentNamespace"] = agent_namespace
    if isinstance(settings, FleetPolicies):
        parameters["fleet"] = {f"{ns}/{name}": _policy_parameters(s) for (ns, name), s in settings.models.items()}
    else:
        parameters.update(_policy_parameters(settings))
    constraint = {
        "apiVersion": "constraints.gatekeeper.sh/v1beta1", "kind": _KIND,
        "metadata": {"name": "driftloop-agent", "labels": labels},
        "spec": {
            "enforcementAction": "deny",
            "match": {"kinds": [{"apiGroups": ["serving.kserve.io"], "kinds": ["InferenceService"]}],
                      **({"namespaces": namespaces} if namespaces else {})},
            "parameters": parameters,
        },
    }
    return [template, constraint]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m serving.admission", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", help="the agent's configuration file (default: $DRIFTLOOP_CONFIG)")
    parser.add_argument("--cert", required=True, help="TLS certificate (PEM) the API server trusts (caBundle)")
    parser.add_argument("--key", required=True, help="its private key (PEM)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (in a pod: 0.0.0.0)")
    parser.add_argument("--port", type=int, default=8443)
    parser.add_argument("--service-account", default=AGENT_SERVICE_ACCOUNT,
                        help="the agent's ServiceAccount name (judged in the namespace of each object)")
    parser.add_argument("--agent-namespace", default=None,
                        help="the namespace of the agent's ServiceAccount, where it is not each object's own (a "
                             "fleet's agent acts in the teams' namespaces)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    policy = PolicySource(args.config)
    settings, error = policy.current()
    if settings is None:
        raise SystemExit(f"the agent's policy cannot be read: {error}")
    server = AdmissionServer(args.cert, args.key, policy, host=args.host, port=args.port,
                             service_account=args.service_account, agent_namespace=args.agent_namespace)
    modes = ({s.agent.mode for s in settings.models.values()} if isinstance(settings, FleetPolicies)
             else {settings.agent.mode})
    log.info("agent guardrails webhook on %s (policy: %s, mode %s)", server.url, policy.path or "defaults",
             ", ".join(sorted(modes)))
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
