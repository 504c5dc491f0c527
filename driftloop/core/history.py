"""The model's history in an Evidently workspace: one project per model, one snapshot per check.

Every drift and quality check of the monitor, every batch drift check and every rollout outcome is
a *record* (a plain dict, below) stored as an Evidently snapshot
(:mod:`driftloop.core.history_snapshots`) in a workspace:

* on the embedded default a folder, ``<workspace>/evidently`` — ``evidently ui --workspace
  <workspace>/evidently`` shows it; a fleet's models share ``<fleet workspace>/evidently``, a project
  each;
* on a cluster an Evidently UI service (``monitor.history_url``, e.g.
  ``http://evidently-ui.driftloop.svc.cluster.local:8000``; infra/base/evidently-ui.yaml), written
  with the secret in ``DRIFTLOOP_EVIDENTLY_SECRET`` (the service's ``EVIDENTLY_SECRET``).

Each model is one project (named after the model) whose dashboard shows drift share, drifted
columns, per-column scores, the quality metrics against their holdout limits and the loop's events
over time. :meth:`HistoryWorkspace.records` reads the records back (``driftloop history``).

A record's keys (absent when they do not apply): ``kind`` (``drift``, ``quality``, ``batch``,
``rollout``), ``model``, ``version``, ``time`` (ISO), ``window``, ``window_start``, ``window_end``,
``rows``, ``verdict``; drift and batch: ``share``, ``drift_share``, ``drifted_columns``,
``columns`` (``column``, ``method``, ``score``, ``threshold``, ``drifted``); quality: ``metrics``
(``metric``, ``live``, ``holdout``, ``limit``, ``rule``, ``degraded``), ``degraded``; what the loop
did: ``alert``, ``decision``, ``reason``, ``run``, ``outcome``, ``events`` (``alert``, ``run``,
``promoted``, ``rolled_back``, …); batch: ``input``, ``request``, ``report``.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import json
import logging
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from driftloop.core.errors import DriftloopError
from driftloop.core.history_snapshots import LIST_KEYS, dashboard_panels, record_snapshot

if TYPE_CHECKING:
    from driftloop.core.config import Settings

__all__ = ["HISTORY_DIR", "SECRET_ENV", "HistoryError", "HistoryWorkspace", "history_target", "step_history_target",
           "write_record"]

log = logging.getLogger(__name__)

HISTORY_DIR = "evidently"
SECRET_ENV = "DRIFTLOOP_EVIDENTLY_SECRET"
_NUMBERS = ("rows", "share", "drift_share")


class HistoryError(DriftloopError):
    """The Evidently workspace of the history cannot be read or written (folder, service, secret)."""


def history_target(settings: Settings) -> str:
    """Where the history goes: ``monitor.history_url`` (an Evidently UI service), else ``<workspace>/evidently``;
    a fleet's models share the fleet's ``<root>/evidently`` (one project per model: one ``evidently ui`` shows
    the whole fleet)."""
    if settings.monitor.history_url:
        return settings.monitor.history_url
    root = settings.fleet.root if settings.fleet is not None else settings.workspace_dir
    return str(root / HISTORY_DIR)


def step_history_target(settings: Settings) -> str:
    """Where a pipeline step (the batch drift check) writes: the Evidently UI service, else on the embedded
    default the workspace's folder; "" on a cluster without a service (a pod has no shared folder)."""
    if settings.monitor.history_url:
        return settings.monitor.history_url
    return "" if settings.is_cluster else history_target(settings)


def write_record(target: str, record: dict[str, Any], *, secret: str | None = None, timeout: float = 60.0) -> str:
    """Write one record and say how it went, in a few words; never raises and never waits past ``timeout``
    (a step's check stands whether or not its history could be written)."""
    said: list[str] = []

    def write() -> None:
        try:
            HistoryWorkspace(target, secret=secret).add(record)
            said.append(f"written to {target}")
        except Exception as exc:  # noqa: BLE001 - reported, never raised: the check itself is done
            said.append(f"not written: {exc}")

    worker = threading.Thread(target=write, name="history-write", daemon=True)
    worker.start()
    worker.join(timeout)
    return said[0] if said else f"not written: {target} did not answer within {timeout:g}s"


def _is_url(target: str) -> bool:
    return target.startswith(("http://", "https://"))


class HistoryWorkspace:
    """One Evidently workspace (a folder or a UI service) holding one project per model."""

    def __init__(self, target: str, *, secret: str | None = None, timeout: float = 10.0) -> None:
        self.target = target
        self.secret = secret
        self.timeout = timeout
        self._workspace: Any = None
        self._projects: dict[str, Any] = {}
        self._lock = threading.Lock()

    @property
    def remote(self) -> bool:
        return _is_url(self.target)

    def _open(self) -> Any:
        if self._workspace is None:
            if self.remote:
                from evidently.ui.workspace import RemoteWorkspace

                self._workspace = RemoteWorkspace(self.target.rstrip("/"), secret=self.secret)
            else:
                from evidently.ui.workspace import Workspace

                from driftloop.core.files import private_dir

                self._workspace = Workspace(str(private_dir(Path(self.target))))
        return self._workspace

    @contextlib.contextmanager
    def _exclusive(self) -> Iterator[None]:
        """Across processes (the monitor, a batch step): one creates a model's project, not two."""
        if self.remote:
            yield
            return
        with open(Path(self.target) / ".driftloop.lock", "a") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def project_id(self, model: str, *, create: bool = True, quality_metrics: tuple[str, ...] = ()) -> Any:
        """The id of the model's project (made, with its dashboard, when missing); None if absent and not made."""
        with self._lock:
            if model in self._projects:
                return self._projects[model]
            ws = self._open()
            found = [p for p in ws.search_project(model) if p.name == model]
            if not found and not create:
                return None
            with self._exclusive():
                found = found or [p for p in ws.search_project(model) if p.name == model]
                project = found[0] if found else ws.create_project(
                    model, description=f"driftloop: the history of model {model} (drift, quality, alerts, rollouts)")
                self._complete_dashboard(project.id, model, quality_metrics)
            self._projects[model] = project.id
            return project.id

    def _complete_dashboard(self, project_id: Any, model: str, quality_metrics: tuple[str, ...]) -> None:
        """Add the panels the dashboard lacks (by title); panels a person added stay."""
        ws = self._open()
        dashboard = ws.get_dashboard(project_id)
        have = {p.title for p in dashboard.panels}
        missing = [p for p in dashboard_panels(model, quality_metrics) if p.title not in have]
        if not missing:
            return
        from evidently.sdk.models import DashboardTabModel

        dashboard.panels.extend(missing)
        if not dashboard.tabs:  # as Evidently's own add_panel does: panels live in a tab
            dashboard.tabs.append(DashboardTabModel(title="General", panels=[p.id for p in dashboard.panels]))
        else:
            dashboard.tabs[0].panels.extend(p.id for p in missing)
        ws.save_dashboard(project_id, dashboard)

    def add(self, record: dict[str, Any], *, quality_metrics: tuple[str, ...] = ()) -> str:
        """Store one record as a snapshot in its model's project; returns the snapshot's id."""
        from evidently.core.report import Snapshot

        try:
            project = self.project_id(record["model"], quality_metrics=quality_metrics)
            ref = self._open().add_run(project, Snapshot.load_model(record_snapshot(record)))
        except DriftloopError:
            raise
        except Exception as exc:  # noqa: BLE001 - the folder, the service or Evidently: one line that says where
            raise HistoryError(f"cannot write to the Evidently workspace {self.target}: {_one_line(exc)}") from exc
        return str(ref.id)

    # -- reading -------------------------------------------------------------------------------
    def models(self) -> list[str]:
        """The models (projects) the workspace holds."""
        try:
            return sorted({p.name for p in self._open().list_projects()})
        except Exception as exc:  # noqa: BLE001 - translated at the boundary
            raise HistoryError(f"cannot read the Evidently workspace {self.target}: {_one_line(exc)}") from exc

    def records(self, model: str, *, since: dt.datetime | None = None) -> list[dict[str, Any]]:
        """The model's records, oldest first (``since``: from that time on, UTC)."""
        try:
            project = self.project_id(model, create=False)
            if project is None:
                return []
            entries = self._remote_entries(project) if self.remote else self._local_entries(project)
        except DriftloopError:
            raise
        except Exception as exc:  # noqa: BLE001 - translated at the boundary
            raise HistoryError(f"cannot read the Evidently workspace {self.target}: {_one_line(exc)}") from exc
        out = []
        for timestamp, metadata in entries:
            when = timestamp if timestamp.tzinfo else timestamp.replace(tzinfo=dt.UTC)
            if since is not None and when < since:
                continue
            out.append(_from_metadata(metadata, when))
        return sorted(out, key=lambda r: r["time"])

    def _local_entries(self, project: Any) -> list[tuple[dt.datetime, dict[str, Any]]]:
        ws = self._open()
        entries = []
        for snapshot_id in ws.list_runs(project):
            snap = ws.get_run(project, snapshot_id)
            if snap is not None:
                entries.append((snap.timestamp, dict(snap.metadata)))
        return entries

    def _remote_entries(self, project: Any) -> list[tuple[dt.datetime, dict[str, Any]]]:
        import httpx

        headers = {"evidently-secret": self.secret} if self.secret else {}
        resp = httpx.get(f"{self.target.rstrip('/')}/api/projects/{project}/snapshots", headers=headers,
                         timeout=self.timeout)
        resp.raise_for_status()
        return [(dt.datetime.fromisoformat(s["timestamp"]), s.get("metadata") or {}) for s in resp.json()]


def _from_metadata(metadata: dict[str, Any], when: dt.datetime) -> dict[str, Any]:
    record: dict[str, Any] = {k: v for k, v in metadata.items()}
    record["time"] = record.get("time") or when.isoformat()
    for key in LIST_KEYS:
        if isinstance(record.get(key), str):
            record[key] = [v for v in record[key].split(", ") if v]
    if isinstance(record.get("quality"), str):  # a quality check's numbers (history_snapshots.record_metadata)
        with contextlib.suppress(ValueError):
            numbers = json.loads(record.pop("quality"))
            record["metrics"], record["estimated"] = numbers.get("metrics") or [], numbers.get("estimated")
    for key in _NUMBERS:
        if key in record:
            with contextlib.suppress(TypeError, ValueError):
                record[key] = float(record[key]) if key != "rows" else int(float(record[key]))
    return record


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:300]}" if text else type(exc).__name__
