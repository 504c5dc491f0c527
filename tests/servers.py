"""Real servers for the tests: Prometheus, Alertmanager, an MLflow tracking server, an S3 API.

Each starts on 127.0.0.1 with a free port, is waited for until it answers, and is stopped
(its whole process group) when the ``with`` block ends. Nothing here reaches the network.
Prometheus and Alertmanager are Debian's ``prometheus`` / ``prometheus-alertmanager``
packages (``make test`` installs them as root); the MLflow server is ``mlflow server
--app-name basic-auth`` (``mlflow[auth]``); S3 is moto's server mode (``moto[server]``).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from driftloop.core.processes import free_port, spawn, stop_process

ROOT = Path(__file__).resolve().parents[1]
MONITORING = ROOT / "infra" / "base" / "monitoring"
PROMETHEUS_RULE = MONITORING / "prometheus-rule.yaml"
ALERTMANAGER_CONFIG = MONITORING / "alertmanager-config.yaml"
RULE_TESTS = MONITORING / "prometheus-rule.test.yaml"

#: Debian names the Alertmanager binary ``prometheus-alertmanager``; upstream calls it ``alertmanager``.
ALERTMANAGER_BINARIES = ("prometheus-alertmanager", "alertmanager")


def binary(*names: str) -> str:
    """The first of ``names`` on PATH; fails the test naming the package to install."""
    for name in names:
        found = shutil.which(name)
        if found:
            return found
    raise RuntimeError(f"{names[0]} is not installed: `make test` installs it as root (Debian: apt-get install "
                       "prometheus prometheus-alertmanager), or install it yourself")


def wait_until(probe: Any, *, timeout: float, what: str, proc: subprocess.Popen | None = None,
               log: Path | None = None, interval: float = 0.2) -> Any:
    """Call ``probe`` until it returns something truthy; fail naming ``what`` (with the server's log tail)."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            break
        try:
            last = probe()
            if last:
                return last
        except (httpx.HTTPError, OSError) as exc:
            last = exc
        time.sleep(interval)
    tail = log.read_text(errors="replace")[-3000:] if log is not None and log.exists() else ""
    state = f"exited with {proc.returncode}" if proc is not None and proc.poll() is not None else f"last: {last!r}"
    raise AssertionError(f"{what} not reached within {timeout:.0f}s ({state})\n{tail}")


@dataclass
class Server:
    """A started server: its base URL, process and log file."""

    url: str
    proc: subprocess.Popen
    log: Path
    home: Path

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


@contextlib.contextmanager
def _process(cmd: list[str], home: Path, url: str, ready_path: str, *, env: dict[str, str] | None = None,
             timeout: float = 60.0) -> Iterator[Server]:
    home.mkdir(parents=True, exist_ok=True)
    log = home / "server.log"
    with open(log, "wb") as fh:
        proc = spawn(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=home, env={**os.environ, **(env or {})})
    try:
        wait_until(lambda: httpx.get(url + ready_path, timeout=2).status_code == 200, timeout=timeout,
                   what=f"{Path(cmd[0]).name} at {url}", proc=proc, log=log)
        yield Server(url, proc, log, home)
    finally:
        stop_process(proc.pid)


# -- Prometheus and Alertmanager --------------------------------------------------------------------
def rule_groups(*, rule_for: dict[str, str] | None = None) -> dict[str, Any]:
    """The rule groups of infra/'s PrometheusRule (its ``spec``), as a plain Prometheus rule file.

    ``rule_for`` rewrites only the ``for:`` duration of the named alerts (tests shorten it);
    every expression, label and annotation stays as the manifest has it.
    """
    spec = yaml.safe_load(PROMETHEUS_RULE.read_text())["spec"]
    for group in spec["groups"]:
        for rule in group["rules"]:
            if rule_for and rule.get("alert") in rule_for:
                rule["for"] = rule_for[rule["alert"]]
    return spec


def alertmanager_config(webhook_url: str, token_file: Path, *, group_wait: str, group_interval: str,
                        namespace: str | None = None) -> dict[str, Any]:
    """alertmanager.yml for infra/'s AlertmanagerConfig, as the Prometheus Operator renders it.

    The receiver, route (groupBy, matchers, repeatInterval) and webhook settings are read from the
    manifest; the webhook URL's host is the test's monitor, its path stays the manifest's, and the
    bearer token comes from ``token_file`` (where Kubernetes mounts the Secret). Only the group
    timings are the caller's (a test cannot wait 30 s / 5 m). The operator adds a matcher on the
    object's namespace to the route; so does this.
    """
    doc = yaml.safe_load(ALERTMANAGER_CONFIG.read_text())
    spec = doc["spec"]
    namespace = namespace or doc["metadata"]["namespace"]
    route = spec["route"]
    matchers = [f'{m["name"]}{m.get("matchType", "=")}"{m["value"]}"' for m in route.get("matchers", [])]
    matchers.append(f'namespace="{namespace}"')
    receivers = []
    for receiver in spec["receivers"]:
        hooks = []
        for hook in receiver.get("webhookConfigs", []):
            path = httpx.URL(hook["url"]).path
            auth = hook.get("httpConfig", {}).get("authorization", {})
            hooks.append({
                "url": webhook_url.rstrip("/") + path,
                "send_resolved": hook.get("sendResolved", True),
                "max_alerts": hook.get("maxAlerts", 0),
                "http_config": {"authorization": {"type": auth.get("type", "Bearer"),
                                                  "credentials_file": str(token_file)}},
            })
        receivers.append({"name": receiver["name"], "webhook_configs": hooks})
    return {
        "route": {
            "receiver": "null",
            "routes": [{
                "receiver": route["receiver"],
                "group_by": route.get("groupBy", []),
                "group_wait": group_wait,
                "group_interval": group_interval,
                "repeat_interval": route.get("repeatInterval", "4h"),
                "matchers": matchers,
            }],
        },
        "receivers": [{"name": "null"}, *receivers],
    }


@contextlib.contextmanager
def alertmanager(home: Path, config: dict[str, Any]) -> Iterator[Server]:
    """A real Alertmanager on 127.0.0.1 (no cluster gossip port)."""
    home.mkdir(parents=True, exist_ok=True)
    cfg = home / "alertmanager.yml"
    cfg.write_text(yaml.safe_dump(config, sort_keys=False))
    port = free_port()
    cmd = [binary(*ALERTMANAGER_BINARIES), f"--config.file={cfg}", f"--storage.path={home / 'data'}",
           f"--web.listen-address=127.0.0.1:{port}", "--cluster.listen-address="]
    with _process(cmd, home, f"http://127.0.0.1:{port}", "/-/ready") as server:
        yield server


@contextlib.contextmanager
def prometheus(home: Path, *, targets: list[str], target_labels: dict[str, str], rules: dict[str, Any],
               alertmanager_url: str, interval: str = "1s") -> Iterator[Server]:
    """A real Prometheus scraping ``targets`` every ``interval``, evaluating ``rules``, alerting to Alertmanager.

    ``target_labels`` stand for what the ServiceMonitor's relabelling attaches on a cluster
    (namespace, service), which the rules select on.
    """
    home.mkdir(parents=True, exist_ok=True)
    rule_file = home / "rules.yml"
    rule_file.write_text(yaml.safe_dump(rules, sort_keys=False))
    cfg = home / "prometheus.yml"
    cfg.write_text(yaml.safe_dump({
        "global": {"scrape_interval": interval, "evaluation_interval": interval},
        "rule_files": [str(rule_file)],
        "alerting": {"alertmanagers": [{"static_configs": [{"targets": [alertmanager_url.split("://", 1)[1]]}]}]},
        "scrape_configs": [{"job_name": "driftloop-monitor", "metrics_path": "/metrics",
                            "static_configs": [{"targets": targets, "labels": target_labels}]}],
    }, sort_keys=False))
    port = free_port()
    cmd = [binary("prometheus"), f"--config.file={cfg}", f"--storage.tsdb.path={home / 'data'}",
           f"--web.listen-address=127.0.0.1:{port}"]
    with _process(cmd, home, f"http://127.0.0.1:{port}", "/-/ready") as server:
        yield server


def promtool(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([binary("promtool"), *args], capture_output=True, text=True, timeout=60, cwd=cwd)


# -- MLflow tracking server ---------------------------------------------------------------------------
@dataclass
class MlflowServer(Server):
    admin_user: str = "admin"
    admin_password: str = ""


@contextlib.contextmanager
def mlflow_server(home: Path, *, admin_password: str, artifacts_destination: str | None = None,
                  env: dict[str, str] | None = None) -> Iterator[MlflowServer]:
    """``mlflow server --app-name basic-auth`` with proxied artifacts, on 127.0.0.1.

    The admin user is created on first start from ``MLFLOW_AUTH_ADMIN_PASSWORD`` (MLflow ships
    no default password); the auth config keeps the user store in ``home`` (the shipped
    ``basic_auth.ini`` would put ``basic_auth.db`` in the working directory).
    """
    home.mkdir(parents=True, exist_ok=True)
    ini = home / "basic_auth.ini"
    ini.write_text("[mlflow]\ndefault_permission = READ\n"
                   f"database_uri = sqlite:///{home / 'basic_auth.db'}\n"
                   "admin_username = admin\n"
                   "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
                   # Every request otherwise re-hashes the password (scrypt): seconds each on a busy machine.
                   "auth_cache_ttl_seconds = 600\n")
    port = free_port()
    artifacts = artifacts_destination or str(home / "artifacts")
    cmd = [str(Path(sys.executable).parent / "mlflow"), "server", "--app-name", "basic-auth",
           "--backend-store-uri", f"sqlite:///{home / 'mlflow.db'}", "--serve-artifacts",
           "--artifacts-destination", artifacts, "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    server_env = {"MLFLOW_AUTH_CONFIG_PATH": str(ini), "MLFLOW_AUTH_ADMIN_PASSWORD": admin_password,
                  "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_hex(16),  # CSRF key; the server refuses to start without
                  **(env or {})}
    for key in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_URI"):
        server_env.setdefault(key, "")
    url = f"http://127.0.0.1:{port}"
    with _process(cmd, home, url, "/health", env=server_env, timeout=90) as server:
        yield MlflowServer(url, server.proc, server.log, home, "admin", admin_password)


# -- S3 (moto server mode) ---------------------------------------------------------------------------
@dataclass
class S3Server:
    url: str
    env: dict[str, str]

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.url, region_name=self.env["AWS_DEFAULT_REGION"],
                            aws_access_key_id=self.env["AWS_ACCESS_KEY_ID"],
                            aws_secret_access_key=self.env["AWS_SECRET_ACCESS_KEY"])


@contextlib.contextmanager
def s3_server() -> Iterator[S3Server]:
    """moto's S3 API on 127.0.0.1 (a thread of this process) and the environment a cluster pod would have."""
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one access-log line per request otherwise
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: httpx.get(f"{url}/moto-api/", timeout=2).status_code < 500, timeout=30, what="moto S3")
        yield S3Server(url, {"AWS_ENDPOINT_URL": url, "AWS_ACCESS_KEY_ID": "testing",
                             "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"})
    finally:
        server.stop()


# -- one tracking server for the session --------------------------------------------------------------
@dataclass
class Tracking:
    """A real MLflow server (basic auth, artifacts proxied to S3) holding a champion trained through kfp.local.

    ``env`` is what a cluster pod would get from its Secrets (MLflow user, S3 endpoint and keys);
    tests apply it with ``monkeypatch`` so that pipeline tasks and workers inherit it.
    """

    mlflow: MlflowServer
    s3: S3Server
    env: dict[str, str]
    source: str  # s3:// URI of the scenario (parquet)
    start: Any  # first day of the scenario; it ends today
    champion: Any  # RunResult of the champion's training run
    user: str = "driftloop"

    def settings(self, workspace: Path, **overrides: Any) -> Any:
        from tests.conftest import make_settings

        return make_settings(workspace, self.source, **{"mlflow.tracking_uri": self.mlflow.url, **overrides})


TRACKING_USER, TRACKING_PASSWORD = "driftloop", "driftloop-pass-1"
DATA_BUCKET, ARTIFACT_BUCKET = "driftloop-data", "driftloop-artifacts"


@pytest.fixture(scope="session")
def tracking(tmp_path_factory) -> Iterator[Tracking]:
    import datetime as dt

    from driftloop.app.scenario import generate
    from pipelines.runner import LocalRunner, RunRequest
    from pipelines.training import run_training

    home = tmp_path_factory.mktemp("tracking")
    with s3_server() as s3:
        client = s3.client()
        client.create_bucket(Bucket=DATA_BUCKET)
        client.create_bucket(Bucket=ARTIFACT_BUCKET)
        start = (dt.datetime.now(dt.UTC) - dt.timedelta(days=60)).date()
        frame = generate(rows=4000, start=str(start))  # ends today, drifts from day 30 on
        frame.to_parquet(home / "scenario.parquet", index=False)
        frame.to_csv(home / "scenario.csv", index=False)
        client.upload_file(str(home / "scenario.parquet"), DATA_BUCKET, "scenario/scenario.parquet")
        client.upload_file(str(home / "scenario.csv"), DATA_BUCKET, "scenario/scenario.csv")
        with mlflow_server(home / "mlflow", admin_password=secrets.token_hex(12),
                           artifacts_destination=f"s3://{ARTIFACT_BUCKET}/mlflow", env=s3.env) as server:
            created = httpx.post(f"{server.url}/api/2.0/mlflow/users/create", timeout=30,
                                 json={"username": TRACKING_USER, "password": TRACKING_PASSWORD},
                                 auth=(server.admin_user, server.admin_password))
            assert created.status_code == 200, created.text
            env = {**s3.env, "MLFLOW_TRACKING_USERNAME": TRACKING_USER, "MLFLOW_TRACKING_PASSWORD": TRACKING_PASSWORD}
            tracking = Tracking(server, s3, env, f"s3://{DATA_BUCKET}/scenario/scenario.parquet", start, None)
            with pytest.MonkeyPatch.context() as mp:
                for key, value in env.items():
                    mp.setenv(key, value)
                settings = tracking.settings(home / "ws")
                result = run_training(LocalRunner(settings), RunRequest(window_end=str(start + dt.timedelta(days=30))))
            assert result.state == "SUCCEEDED", result.error
            tracking.champion = result
            yield tracking
