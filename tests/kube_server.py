"""A real Kubernetes API server for the tests: etcd + kube-apiserver 1.20.2 on 127.0.0.1.

Both binaries are built once from Debian's packages and source by ``make cluster``
(``infra/cluster/build.sh``, cached outside the clone; ../shared FACTS, "A real kube-apiserver").
One cluster serves the whole test process (:func:`cluster`): etcd on free loopback ports with its
data in memory where the machine has /dev/shm, kube-apiserver with TLS (a CA made here, never
committed), token authentication (an admin token in system:masters; every ServiceAccount token
comes from the TokenRequest API), ``--authorization-mode=RBAC`` and the admission plugins
NamespaceLifecycle, LimitRanger, ResourceQuota and the admission webhooks. The ServiceAccount
admission plugin is off: no token controller runs here, so it would refuse every pod. Every
CRD under ``infra/crds/`` is installed and established before the first test uses the cluster.

No controller, scheduler or kubelet runs: objects are stored and validated only. Tests play the
missing controllers by writing ``status`` through the API. Both processes die with the test
process (:func:`driftloop.core.processes.spawn`), and are stopped at its end.
"""

from __future__ import annotations

import atexit
import base64
import datetime as dt
import json
import os
import secrets
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import yaml

from driftloop.core.processes import free_port, process_alive, spawn, stop_process
from tests.servers import wait_until

ROOT = Path(__file__).resolve().parents[1]
BUILD = ROOT / "infra" / "cluster" / "build.sh"
CRDS = ROOT / "infra" / "crds"
#: The admission plugins the tests rely on (1.20 enables most of them by default; named here so that
#: the cluster under test does not depend on that default).
ADMISSION = "NamespaceLifecycle,LimitRanger,ResourceQuota,MutatingAdmissionWebhook,ValidatingAdmissionWebhook"
#: Generous: other work may keep this machine's two cores busy while the server starts.
READY_TIMEOUT_S = 180.0
FIELD_MANAGER = "driftloop-tests"


def binaries() -> Path:
    """The folder with ``kube-apiserver`` and ``etcd``; fails naming ``make cluster`` when not built."""
    explicit = os.environ.get("DRIFTLOOP_KUBE_BIN")
    if explicit:
        folder = Path(explicit)
    else:
        out = subprocess.run(["bash", str(BUILD), "--where"], capture_output=True, text=True, check=False)
        folder = Path(out.stdout.strip())
    if not ((folder / "kube-apiserver").is_file() and (folder / "etcd").is_file()):
        raise RuntimeError(f"kube-apiserver and etcd are not built ({folder}): run `make cluster` once "
                           "(~8 min of one core; `make test` does it), or set DRIFTLOOP_KUBE_BIN")
    return folder


# -- certificates and keys (made per run, never committed) ----------------------------------------------
def _key() -> Any:
    from cryptography.hazmat.primitives.asymmetric import rsa

    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _pem_key(key: Any) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                             serialization.NoEncryption())


def make_ca(common_name: str) -> tuple[Any, Any]:
    """A self-signed CA: (certificate, key)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import NameOID

    key = _key()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=2))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    return cert, key


def issue_cert(ca: tuple[Any, Any], common_name: str, *, dns: tuple[str, ...] = (), ips: tuple[str, ...] = ("127.0.0.1",)
               ) -> tuple[bytes, bytes]:
    """A serving certificate signed by ``ca`` for ``dns`` names and ``ips``: (cert PEM, key PEM)."""
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    ca_cert, ca_key = ca
    key = _key()
    now = dt.datetime.now(dt.timezone.utc)
    names = [x509.DNSName(d) for d in dns] + [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
    cert = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
            .issuer_name(ca_cert.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=2))
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    return cert.public_bytes(serialization.Encoding.PEM), _pem_key(key)


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    path.chmod(0o600)
    return path


# -- the cluster -------------------------------------------------------------------------------------------
@dataclass
class KubeCluster:
    """A running etcd + kube-apiserver; ``url`` is the API server's https address on 127.0.0.1."""

    home: Path
    bin: Path
    url: str
    ca_file: Path
    admin_token: str
    etcd_url: str
    apiserver_cmd: list[str]
    etcd: subprocess.Popen
    apiserver: subprocess.Popen | None = None
    _clients: dict[str, Any] = field(default_factory=dict)

    # -- processes -----------------------------------------------------------------------------------
    @property
    def log(self) -> Path:
        return self.home / "kube-apiserver.log"

    def start_apiserver(self) -> None:
        with open(self.log, "ab") as fh:
            self.apiserver = spawn(self.apiserver_cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=self.home)
        self.wait_ready()

    def stop_apiserver(self) -> None:
        if self.apiserver is not None:
            stop_process(self.apiserver.pid, timeout=20)
            self.apiserver = None

    def wait_ready(self, timeout: float = READY_TIMEOUT_S) -> None:
        headers = {"authorization": f"Bearer {self.admin_token}"}
        wait_until(lambda: httpx.get(f"{self.url}/readyz", headers=headers, verify=str(self.ca_file),
                                     timeout=5).status_code == 200,
                   timeout=timeout, what=f"kube-apiserver at {self.url}", proc=self.apiserver, log=self.log,
                   interval=0.5)

    def stop(self) -> None:
        self.stop_apiserver()
        stop_process(self.etcd.pid, timeout=20)

    # -- clients and credentials ------------------------------------------------------------------------
    def kubeconfig(self, token: str | None = None, name: str = "admin") -> Path:
        """A kubeconfig file for ``token`` (default: the admin's); the tests' KUBECONFIG for a ServiceAccount."""
        path = self.home / "kubeconfigs" / f"{name}.yaml"
        path.parent.mkdir(exist_ok=True)
        doc = {"apiVersion": "v1", "kind": "Config", "current-context": name,
               "clusters": [{"name": "test", "cluster": {"server": self.url,
                                                         "certificate-authority": str(self.ca_file)}}],
               "users": [{"name": name, "user": {"token": token or self.admin_token}}],
               "contexts": [{"name": name, "context": {"cluster": "test", "user": name}}]}
        _write(path, yaml.safe_dump(doc).encode())
        return path

    def api_client(self, token: str | None = None) -> Any:
        """A ``kubernetes.client.ApiClient`` that sends ``token`` (default: the admin's)."""
        from kubernetes import client

        cfg = client.Configuration()
        cfg.host = self.url
        cfg.ssl_ca_cert = str(self.ca_file)
        cfg.api_key = {"authorization": token or self.admin_token}
        cfg.api_key_prefix = {"authorization": "Bearer"}
        return client.ApiClient(cfg)

    @property
    def admin(self) -> Any:
        if "admin" not in self._clients:
            self._clients["admin"] = self.api_client()
        return self._clients["admin"]

    def token(self, namespace: str, service_account: str, *, audiences: list[str] | None = None,
              seconds: int = 3600) -> str:
        """A real ServiceAccount token from the TokenRequest API (the kubelet's projected token, minus the kubelet)."""
        from kubernetes import client

        body = client.AuthenticationV1TokenRequest(
            spec=client.V1TokenRequestSpec(audiences=audiences or [], expiration_seconds=seconds))
        out = client.CoreV1Api(self.admin).create_namespaced_service_account_token(service_account, namespace, body)
        return out.status.token

    def can(self, user: str, verb: str, *, namespace: str | None = None, group: str = "", resource: str = "",
            name: str | None = None, subresource: str | None = None, groups: list[str] | None = None) -> bool:
        """The API server's own answer (SubjectAccessReview) to: may ``user`` do ``verb`` on that resource?"""
        from kubernetes import client

        attrs = client.V1ResourceAttributes(namespace=namespace, verb=verb, group=group, resource=resource,
                                            name=name, subresource=subresource)
        review = client.V1SubjectAccessReview(spec=client.V1SubjectAccessReviewSpec(
            user=user, groups=groups, resource_attributes=attrs))
        return bool(client.AuthorizationV1Api(self.admin).create_subject_access_review(review).status.allowed)

    def kubectl(self, *args: str, kubeconfig: Path | None = None, stdin: str | None = None, check: bool = True,
                timeout: float = 120) -> subprocess.CompletedProcess:
        """``kubectl`` against this cluster (as the admin unless ``kubeconfig`` says otherwise)."""
        kubectl = os.environ.get("KUBECTL") or shutil.which("kubectl")
        assert kubectl, "kubectl is needed (Debian: kubernetes-client; `make test` installs it)"
        cmd = [kubectl, "--kubeconfig", str(kubeconfig or self.kubeconfig()), *args]
        proc = subprocess.run(cmd, input=stdin, capture_output=True, text=True, timeout=timeout, check=False)
        if check and proc.returncode != 0:
            raise AssertionError(f"{' '.join(cmd[1:])} failed ({proc.returncode}): {proc.stderr.strip()}")
        return proc

    def apply(self, docs: list[dict[str, Any]], *, dry_run: bool = False, manager: str = FIELD_MANAGER,
              kubeconfig: Path | None = None, client_validation: bool = True) -> subprocess.CompletedProcess:
        """``kubectl apply --server-side`` of ``docs`` (``--dry-run=server`` with ``dry_run``; without
        ``client_validation`` kubectl does not check against the server's OpenAPI first: the server decides)."""
        args = ["apply", "--server-side", f"--field-manager={manager}", "-f", "-"]
        if dry_run:
            args.append("--dry-run=server")
        if not client_validation:
            args.append("--validate=false")
        return self.kubectl(*args, stdin=yaml.safe_dump_all(docs, sort_keys=False), kubeconfig=kubeconfig)

    # -- etcd (for the watch tests) ------------------------------------------------------------------------
    def etcd_revision(self) -> int:
        out = httpx.post(f"{self.etcd_url}/v3/kv/range", json={"key": base64.b64encode(b"/").decode(), "limit": 1},
                         timeout=10)
        out.raise_for_status()
        return int(out.json()["header"]["revision"])

    def compact(self) -> int:
        """Compact etcd up to its current revision: older resourceVersions are gone (a watch from one gets 410)."""
        revision = self.etcd_revision()
        out = httpx.post(f"{self.etcd_url}/v3/kv/compaction", json={"revision": str(revision), "physical": True},
                         timeout=30)
        out.raise_for_status()
        return revision


def _crd_documents() -> list[dict[str, Any]]:
    docs = []
    for path in sorted(CRDS.glob("*.yaml")):
        if path.name != "kustomization.yaml":
            docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


def install_crds(kube: KubeCluster) -> list[str]:
    """Apply every CRD under ``infra/crds/`` and wait until each is established; their names."""
    from kubernetes import client

    docs = _crd_documents()
    kube.apply(docs, manager="driftloop-crds")
    api = client.ApiextensionsV1Api(kube.admin)
    names = [d["metadata"]["name"] for d in docs]

    def established() -> bool:
        for name in names:
            conds = api.read_custom_resource_definition(name).status.conditions or []
            if not any(c.type == "Established" and c.status == "True" for c in conds):
                return False
        return True

    wait_until(established, timeout=READY_TIMEOUT_S, what="the CRDs of infra/crds established")
    # discovery catches up a moment after Established; kubectl and clients need it
    wait_until(lambda: all(kube.kubectl("get", d["spec"]["names"]["plural"] + "." + d["spec"]["group"], "-A",
                                        check=False).returncode == 0 for d in docs[:1] + docs[-1:]),
               timeout=READY_TIMEOUT_S, what="the custom resources in discovery")
    return names


def start_cluster(home: Path) -> KubeCluster:
    """Start etcd and kube-apiserver on free loopback ports and wait until both answer."""
    folder = binaries()
    home.mkdir(parents=True, exist_ok=True)
    shm = Path("/dev/shm")
    in_memory = shm.is_dir() and os.access(shm, os.W_OK)
    if in_memory:  # what a test process killed with SIGKILL left in memory
        for stale in shm.glob("driftloop-etcd-*-*"):
            owner = stale.name.split("-")[2]
            if owner.isdigit() and not process_alive(int(owner)):
                shutil.rmtree(stale, ignore_errors=True)
    data = Path(tempfile.mkdtemp(prefix=f"driftloop-etcd-{os.getpid()}-", dir=shm if in_memory else home))
    atexit.register(shutil.rmtree, data, True)
    client_port, peer_port, api_port = free_port(), free_port(), free_port()
    etcd_url = f"http://127.0.0.1:{client_port}"
    peer = f"http://127.0.0.1:{peer_port}"
    etcd_cmd = [str(folder / "etcd"), "--name", "kube", "--data-dir", str(data),
                "--listen-client-urls", etcd_url, "--advertise-client-urls", etcd_url,
                "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
                "--initial-cluster", f"kube={peer}", "--log-level", "warn", "--logger", "zap"]
    etcd_log = home / "etcd.log"
    with open(etcd_log, "wb") as fh:
        etcd = spawn(etcd_cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=home)
    try:
        wait_until(lambda: httpx.get(f"{etcd_url}/health", timeout=5).json().get("health") == "true",
                   timeout=READY_TIMEOUT_S, what=f"etcd at {etcd_url}", proc=etcd, log=etcd_log)
        ca = make_ca("driftloop-test-kube-ca")
        cert, key = issue_cert(ca, "kube-apiserver", dns=("kubernetes", "kubernetes.default", "localhost"))
        from cryptography.hazmat.primitives import serialization

        ca_file = _write(home / "ca.crt", ca[0].public_bytes(serialization.Encoding.PEM))
        _write(home / "apiserver.crt", cert)
        _write(home / "apiserver.key", key)
        sa_key = _key()
        _write(home / "sa.key", _pem_key(sa_key))
        _write(home / "sa.pub", sa_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
        admin_token = secrets.token_urlsafe(32)
        _write(home / "tokens.csv", f'{admin_token},admin,admin-uid,"system:masters"\n'.encode())
        cmd = [str(folder / "kube-apiserver"), "--etcd-servers", etcd_url,
               "--bind-address=127.0.0.1", f"--secure-port={api_port}", "--advertise-address=127.0.0.1",
               f"--tls-cert-file={home / 'apiserver.crt'}", f"--tls-private-key-file={home / 'apiserver.key'}",
               f"--cert-dir={home / 'certs'}", f"--token-auth-file={home / 'tokens.csv'}",
               "--authorization-mode=RBAC", "--anonymous-auth=false",
               "--service-account-issuer=https://kubernetes.default.svc",
               f"--service-account-key-file={home / 'sa.pub'}",
               f"--service-account-signing-key-file={home / 'sa.key'}",
               "--service-cluster-ip-range=10.0.0.0/24",
               f"--enable-admission-plugins={ADMISSION}", "--disable-admission-plugins=ServiceAccount",
               # watches are served straight from etcd (no watch cache, which keeps 75 s of history whatever
               # etcd does), so compacting etcd expires a watch at once (tests/test_kube_paths.py)
               "--watch-cache=false",
               "--profiling=false", "--logtostderr=true", "--v=1"]
        kube = KubeCluster(home, folder, f"https://127.0.0.1:{api_port}", ca_file, admin_token, etcd_url, cmd, etcd)
        kube.start_apiserver()
    except BaseException:
        stop_process(etcd.pid)
        raise
    return kube


_CLUSTER: KubeCluster | None = None


def cluster() -> KubeCluster:
    """The test process's one cluster, started on first use with every CRD of ``infra/crds/`` installed."""
    global _CLUSTER
    if _CLUSTER is None:
        home = Path(tempfile.mkdtemp(prefix="driftloop-kube-"))
        atexit.register(shutil.rmtree, home, True)  # atexit runs last-in first: stopped, then removed
        kube = start_cluster(home)
        atexit.register(kube.stop)
        install_crds(kube)
        _CLUSTER = kube
    elif _CLUSTER.apiserver is None:  # a test stopped it and failed before starting it again
        _CLUSTER.start_apiserver()
    return _CLUSTER


def service_account_user(namespace: str, name: str) -> str:
    return f"system:serviceaccount:{namespace}:{name}"


def strip_server_fields(obj: dict[str, Any]) -> dict[str, Any]:
    """A live object without what the server adds to every object (for printing a difference)."""
    meta = {k: v for k, v in (obj.get("metadata") or {}).items()
            if k not in ("uid", "resourceVersion", "creationTimestamp", "managedFields", "generation", "selfLink")}
    return {**obj, "metadata": meta}


def missing(sent: Any, live: Any, path: str = "") -> list[str]:
    """Where ``live`` lacks or differs from what was ``sent`` (``live`` may hold more: defaults, status)."""
    if isinstance(sent, dict):
        if not isinstance(live, dict):
            return [f"{path or '.'}: sent an object, the server holds {json.dumps(live)[:80]}"]
        out: list[str] = []
        for key, value in sent.items():
            if key not in live:
                out.append(f"{path}.{key}: dropped by the server")
            else:
                out += missing(value, live[key], f"{path}.{key}")
        return out
    if isinstance(sent, list):
        if not isinstance(live, list) or len(live) != len(sent):
            return [f"{path}: sent {len(sent)} items, the server holds {json.dumps(live)[:80]}"]
        return [d for i, (a, b) in enumerate(zip(sent, live)) for d in missing(a, b, f"{path}[{i}]")]
    if sent != live:
        return [f"{path}: sent {sent!r}, the server holds {live!r}"]
    return []


def wait_for(probe: Any, *, timeout: float = 60.0, what: str) -> Any:
    """``wait_until`` for API-level conditions (no process, no log)."""
    return wait_until(probe, timeout=timeout, what=what, interval=0.2)


def now_rfc3339() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


# -- the agent's guardrails webhook (serving.admission), called by the real API server --------------------
WEBHOOK_MANIFEST = ROOT / "infra" / "base" / "admission-webhook.yaml"


@dataclass
class Guardrails:
    """driftloop's admission webhook on 127.0.0.1 over TLS (a CA made here), reading ``policy_file``."""

    server: Any
    policy_file: Path
    ca_pem: bytes

    def use(self, agent: dict[str, Any], *, max_replicas: int = 3) -> None:
        """Write the policy file the webhook reads (as the agent would read it): ``agent:`` and
        ``serving.max_replicas``. The webhook reloads it on its next request."""
        doc = {"agent": agent, "serving": {"max_replicas": max_replicas}}
        tmp = self.policy_file.with_suffix(".tmp")
        tmp.write_text(yaml.safe_dump(doc))
        tmp.replace(self.policy_file)

    def configuration(self) -> dict[str, Any]:
        """infra/'s ValidatingWebhookConfiguration, its clientConfig pointed at this server (URL + caBundle):
        the API server cannot reach a Service here (no kube-proxy, no pods)."""
        (doc,) = [d for d in yaml.safe_load_all(WEBHOOK_MANIFEST.read_text())
                  if d and d["kind"] == "ValidatingWebhookConfiguration"]
        for hook in doc["webhooks"]:
            hook["clientConfig"] = {"url": self.server.url, "caBundle": base64.b64encode(self.ca_pem).decode()}
        return doc


_GUARDRAILS: Guardrails | None = None
DEFAULT_AGENT_POLICY = {"mode": "full", "floor": 1, "ceiling": 10, "max_step": 4}


def guardrails() -> Guardrails:
    """The test process's one webhook server (a daemon thread), policy ``DEFAULT_AGENT_POLICY`` to start with."""
    global _GUARDRAILS
    if _GUARDRAILS is None:
        import threading

        from cryptography.hazmat.primitives import serialization

        from serving.admission import AdmissionServer, PolicySource

        home = Path(tempfile.mkdtemp(prefix="driftloop-admission-"))
        atexit.register(shutil.rmtree, home, True)
        ca = make_ca("driftloop-test-webhook-ca")
        cert, key = issue_cert(ca, "driftloop-admission", dns=("driftloop-admission.driftloop.svc",))
        _write(home / "tls.crt", cert)
        _write(home / "tls.key", key)
        policy = home / "config.yaml"
        server = AdmissionServer(home / "tls.crt", home / "tls.key", PolicySource(policy, environ={}), port=free_port())
        threading.Thread(target=server.serve_forever, name="admission-webhook", daemon=True).start()
        atexit.register(server.shutdown)
        _GUARDRAILS = Guardrails(server, policy, ca[0].public_bytes(serialization.Encoding.PEM))
        _GUARDRAILS.use(DEFAULT_AGENT_POLICY)
    return _GUARDRAILS


def point_webhook_here(kube: KubeCluster) -> Guardrails:
    """Apply infra/'s webhook configuration with its clientConfig on this process's webhook server."""
    hooks = guardrails()
    kube.apply([hooks.configuration()])
    return hooks


_INFRA_APPLIED = False


def infra_applied() -> KubeCluster:
    """The cluster with infra/overlays/dev applied (ServiceAccounts, Roles, the InferenceService...) and the
    agent's guardrails webhook live: what the code-path tests run against. Applied once per process."""
    global _INFRA_APPLIED
    kube = cluster()
    if not _INFRA_APPLIED:
        from driftloop.app.infra_check import build

        kube.apply([{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "kubeflow"}}])
        docs = build(ROOT / "infra" / "overlays" / "dev")
        kube.apply([d for d in docs if d["kind"] == "Namespace"])
        kube.apply([d for d in docs if d["kind"] not in ("Namespace", "ValidatingWebhookConfiguration")])
        point_webhook_here(kube)
        _INFRA_APPLIED = True
    return kube
