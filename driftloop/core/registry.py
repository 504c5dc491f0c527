"""The MLflow adapter: tracking, the model registry (aliases, tags) and reference samples.

One small interface over MLflow for the rest of driftloop. The embedded default is
a SQLite store with an artifact folder in the workspace; a remote tracking URI from
config is used unchanged (credentials come from ``MLFLOW_TRACKING_*`` env vars).
MLflow exceptions are translated to :class:`RegistryError` here.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from driftloop.core.errors import RegistryError

if TYPE_CHECKING:
    from driftloop.core.config import Settings

__all__ = ["Registry", "VersionInfo", "CHAMPION", "CHALLENGER", "TAG"]

log = logging.getLogger(__name__)

CHAMPION = "champion"
CHALLENGER = "challenger"


class TAG:
    """Tag keys driftloop writes on runs and model versions."""

    TRIGGER = "driftloop.trigger"
    PIPELINE_RUN = "driftloop.pipeline_run_id"
    KFP_RUN = "driftloop.kfp_run_id"
    REQUEST = "driftloop.request_id"
    WINDOW = "driftloop.data_window"
    SOURCE = "driftloop.data_source"
    GATE = "driftloop.gate.decision"
    GATE_REASON = "driftloop.gate.reason"
    DEVICE = "driftloop.train.device"
    ROLLOUT = "driftloop.rollout.outcome"
    ROLLOUT_REASON = "driftloop.rollout.reason"
    ALERT = "driftloop.alert_id"
    SCHEDULE = "driftloop.schedule"


#: How long a tracking server that refuses connections is retried before the error (seconds).
_PROBE_SECONDS = 5.0

REFERENCE_ARTIFACT = "reference/reference.parquet"
SCHEMA_ARTIFACT = "schema/schema.json"


@dataclass(frozen=True)
class VersionInfo:
    name: str
    version: str
    run_id: str | None
    source: str
    aliases: tuple[str, ...]
    tags: dict[str, str]

    @property
    def uri(self) -> str:
        return f"models:/{self.name}/{self.version}"


def _is_missing(exc: Exception) -> bool:
    code = getattr(exc, "error_code", "") or ""
    return "RESOURCE_DOES_NOT_EXIST" in code or "not found" in str(exc).lower()


def _is_denied(exc: Exception) -> bool:
    code = getattr(exc, "error_code", "") or ""
    return "PERMISSION_DENIED" in code or "error code 403" in str(exc)


class Registry:
    """MLflow tracking + registry for one project."""

    def __init__(
        self,
        tracking_uri: str,
        *,
        registry_uri: str | None = None,
        experiment: str = "driftloop",
        artifact_location: str | None = None,
    ) -> None:
        self.tracking_uri = tracking_uri
        self.registry_uri = registry_uri or tracking_uri
        self.experiment = experiment
        self.artifact_location = artifact_location
        self._client = None
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
        if tracking_uri.startswith("sqlite:///"):
            Path(tracking_uri[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)

    @classmethod
    def from_settings(cls, settings: Settings) -> "Registry":
        return cls(
            settings.tracking_uri,
            registry_uri=settings.mlflow.registry_uri,
            experiment=settings.mlflow.experiment,
            artifact_location=settings.artifact_location,
        )

    # -- plumbing -------------------------------------------------------------------
    @property
    def client(self):
        if self._client is None:
            import mlflow
            from mlflow.tracking import MlflowClient

            self._probe()
            self._activate()
            self._client = MlflowClient(tracking_uri=self.tracking_uri, registry_uri=self.registry_uri)
        return self._client

    def _activate(self) -> None:
        """Point MLflow's process-wide URIs at this registry (``models:/`` loads resolve through them).

        Set again before every load: another Registry of the same process (another workspace, a
        tenant) may have moved them since this one's client was made.
        """
        import mlflow

        mlflow.set_tracking_uri(self.tracking_uri)
        # Only a registry configured apart from tracking is set process-wide: MLflow follows the
        # tracking URI otherwise, and a sticky global would outlive a switch of workspace.
        if self.registry_uri != self.tracking_uri:
            mlflow.set_registry_uri(self.registry_uri)

    @property
    def _remote(self) -> bool:
        return self.tracking_uri.startswith(("http://", "https://"))

    def _probe(self) -> None:
        """Fail fast, naming the server, when a tracking server does not answer at all.

        MLflow's REST client retries a refused connection with backoff for minutes
        (``MLFLOW_HTTP_REQUEST_MAX_RETRIES``) before it gives up; a server that is down should
        say so at once. A server that answers anything (even 401) is reachable.
        """
        if not self._remote:
            return
        import time

        import httpx

        deadline, last = time.monotonic() + _PROBE_SECONDS, None
        while True:
            try:
                httpx.get(f"{self.tracking_uri.rstrip('/')}/health", timeout=5.0)
                return
            except httpx.HTTPError as exc:
                last = exc
            if time.monotonic() >= deadline:
                break
            time.sleep(1.0)
        raise RegistryError(f"cannot reach the MLflow tracking server at {self.tracking_uri}: "
                            f"{type(last).__name__}: {last}")

    def describe(self, exc: Exception) -> str:
        """One line for an MLflow failure: credentials refused and unreachable servers name the server."""
        message = getattr(exc, "message", None) or str(exc)
        status = None
        with contextlib.suppress(Exception):
            status = exc.get_http_status_code()  # type: ignore[attr-defined]
        if status == 401 or "error code 401" in message:
            return (f"the MLflow tracking server at {self.tracking_uri} refused the credentials (HTTP 401); "
                    "set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN)")
        if status == 403 or "error code 403" in message:
            user = os.environ.get("MLFLOW_TRACKING_USERNAME") or "this user"
            return f"the MLflow tracking server at {self.tracking_uri} denied {user} permission (HTTP 403)"
        if "Max retries exceeded" in message or "Failed to establish a new connection" in message:
            return f"cannot reach the MLflow tracking server at {self.tracking_uri}"
        return message

    @contextlib.contextmanager
    def translate_errors(self, what: str) -> Iterator[None]:
        """Turn MLflow and connection failures inside the block into one RegistryError naming ``what``."""
        from mlflow.exceptions import MlflowException

        try:
            yield
        except MlflowException as exc:
            raise RegistryError(f"{what}: {self.describe(exc)}") from exc
        except OSError as exc:  # unreachable server, refused connection
            raise RegistryError(f"{what}: cannot reach MLflow at {self.tracking_uri}: {exc}") from exc

    def check(self) -> None:
        """Fail early and clearly when the tracking server cannot be reached."""
        with self.translate_errors("MLflow is not reachable"):
            self.client.search_experiments(max_results=1)

    def experiment_id(self) -> str:
        import mlflow

        with self.translate_errors(f"cannot open experiment {self.experiment!r}"):
            exp = self.client.get_experiment_by_name(self.experiment)
            if exp is not None:
                return exp.experiment_id
            try:
                return self.client.create_experiment(self.experiment, artifact_location=self.artifact_location)
            except mlflow.exceptions.MlflowException:
                exp = self.client.get_experiment_by_name(self.experiment)  # created concurrently
                if exp is None:
                    raise
                return exp.experiment_id

    # -- registry -------------------------------------------------------------------
    def _info(self, mv: Any) -> VersionInfo:
        return VersionInfo(
            name=mv.name,
            version=str(mv.version),
            run_id=mv.run_id,
            source=mv.source,
            aliases=tuple(getattr(mv, "aliases", []) or []),
            tags=dict(mv.tags or {}),
        )

    def version_by_alias(self, name: str, alias: str) -> VersionInfo | None:
        """The version behind ``name@alias``, or None when the model or the alias does not exist."""
        from mlflow.exceptions import MlflowException

        try:
            mv = self.client.get_model_version_by_alias(name, alias)
        except MlflowException as exc:
            if _is_missing(exc) or (_is_denied(exc) and not self._model_exists(name)):
                return None
            raise RegistryError(f"cannot read alias {name}@{alias}: {self.describe(exc)}") from exc
        return self._info(mv)

    def _model_exists(self, name: str) -> bool:
        """Whether registered model ``name`` exists. An MLflow server with basic auth answers an alias
        lookup on a model that does not exist yet with 403 (no permission on a missing resource),
        not 404; looking the model itself up tells the two apart."""
        from mlflow.exceptions import MlflowException

        try:
            self.client.get_registered_model(name)
        except MlflowException as exc:
            if _is_missing(exc):
                return False
            raise RegistryError(f"cannot read model {name!r}: {self.describe(exc)}") from exc
        return True

    def get_version(self, name: str, version: str) -> VersionInfo:
        with self.translate_errors(f"model version {name}/{version} not found"):
            return self._info(self.client.get_model_version(name, str(version)))

    def resolve(self, ref: str) -> VersionInfo:
        """Resolve ``name``, ``name@alias``, ``name/version`` or ``models:/…`` to a version."""
        ref = ref.removeprefix("models:/")
        if "@" in ref:
            name, alias = ref.split("@", 1)
            info = self.version_by_alias(name, alias)
            if info is None:
                raise RegistryError(f"model {name!r} has no alias {alias!r}")
            return self.get_version(name, info.version)  # the alias lookup omits the version's aliases
        if "/" in ref:
            name, version = ref.rsplit("/", 1)
            return self.get_version(name, version)
        info = self.version_by_alias(ref, CHAMPION)
        if info is None:
            raise RegistryError(f"model {ref!r} has no {CHAMPION!r} alias")
        return info

    def files_location(self, name: str, version: str) -> str:
        """Where version ``version``'s model files are (its logged model's artifact location, e.g.
        ``file:///…/artifacts``): a URI MLflow loads without asking the tracking store again."""
        info = self.get_version(name, version)
        if not info.source.startswith("models:/"):  # a runs:/ source needs the store to be found
            if info.source.startswith("runs:/"):
                raise RegistryError(f"model version {name}/{version} has a run source: {info.source}")
            return info.source
        with self.translate_errors(f"logged model of {name}/{version} not found"):
            return self.client.get_logged_model(info.source.removeprefix("models:/")).artifact_location

    def list_versions(self, name: str) -> list[VersionInfo]:
        with self.translate_errors(f"cannot list versions of {name!r}"):
            found = self.client.search_model_versions(f"name = '{name}'")
        return sorted((self._info(mv) for mv in found), key=lambda v: int(v.version))

    def version_of_run(self, name: str, run_id: str) -> VersionInfo | None:
        """The version of ``name`` registered from ``run_id`` (aliases included), if any."""
        with self.translate_errors(f"cannot search versions of {name!r}"):
            found = self.client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
        return self.get_version(name, found[0].version) if found else None

    def set_alias(self, name: str, alias: str, version: str) -> None:
        with self.translate_errors(f"cannot set alias {name}@{alias} -> {version}"):
            self.client.set_registered_model_alias(name, alias, str(version))

    def tag_version(self, name: str, version: str, tags: dict[str, str]) -> None:
        with self.translate_errors(f"cannot tag {name}/{version}"):
            for key, value in tags.items():
                self.client.set_model_version_tag(name, str(version), key, str(value))

    def load_sklearn(self, uri: str) -> Any:
        import mlflow.sklearn

        with self.translate_errors(f"cannot load model {uri}"):
            self._activate()
            return mlflow.sklearn.load_model(uri)

    def load_pyfunc(self, uri: str) -> Any:
        import mlflow.pyfunc

        with self.translate_errors(f"cannot load model {uri}"):
            self._activate()
            return mlflow.pyfunc.load_model(uri)

    # -- run artifacts ----------------------------------------------------------------
    def download(self, run_id: str, artifact_path: str, dst: str | Path | None = None) -> Path:
        import mlflow.artifacts

        dst = Path(dst or tempfile.mkdtemp(prefix="driftloop-"))
        with self.translate_errors(f"artifact {artifact_path!r} of run {run_id} not found"):
            local = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=artifact_path, dst_path=str(dst), tracking_uri=self.tracking_uri)
        return Path(local)

    def reference_sample(self, ref: str):
        """The monitoring reference sample logged with a model version (DataFrame)."""
        import pandas as pd

        info = self.resolve(ref)
        if not info.run_id:
            raise RegistryError(f"model version {info.uri} has no MLflow run; its reference sample is unknown")
        try:
            path = self.download(info.run_id, REFERENCE_ARTIFACT)
        except RegistryError as exc:
            raise RegistryError(f"no reference sample for {info.uri} (run {info.run_id}): {exc}") from exc
        return pd.read_parquet(path)

    def schema(self, ref: str) -> dict[str, Any]:
        import json

        info = self.resolve(ref)
        path = self.download(info.run_id, SCHEMA_ARTIFACT)
        return json.loads(path.read_text())

    def run(self, run_id: str) -> Any:
        with self.translate_errors(f"run {run_id} not found"):
            return self.client.get_run(run_id)

    def find_runs(self, filter_string: str, max_results: int = 50) -> list[Any]:
        with self.translate_errors("cannot search runs"):
            return self.client.search_runs([self.experiment_id()], filter_string=filter_string, max_results=max_results, order_by=["attributes.start_time DESC"])
