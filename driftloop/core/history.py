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
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from driftloop.core.errors import DriftloopError
from driftloop.core.files import atomic_write, private_dir
from driftloop.core.history_snapshots import LIST_KEYS, dashboard_panels, record_snapshot

if TYPE_CHECKING:
    from driftloop.core.config import Settings

__all__ = ["HISTORY_DIR", "SECRET_ENV", "HistoryError", "HistoryWorkspace", "history_target", "step_history_target",
           "write_record"]

log = logging.getLogger(__name__)

HISTORY_DIR = "evidently"
#: beside the projects of a history folder: each model's newest snapshot of each kind (HistoryWorkspace.latest)
INDEX_DIR = ".driftloop-latest"
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
        self._read: dict[str, dict[str, dict[str, Any]]] = {}  # snapshots read by latest(): id -> record, per model
        self._reading = threading.Lock()

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
            if not self.remote:
                self._index(record, str(ref.id))
        except DriftloopError:
            raise
        except Exception as exc:  # noqa: BLE001 - the folder, the service or Evidently: one line that says where
            raise HistoryError(f"cannot write to the Evidently workspace {self.target}: {_one_line(exc)}") from exc
        return str(ref.id)

    def _index_path(self, model: str) -> Path:
        return Path(self.target) / INDEX_DIR / f"{model}.json"

    def _index(self, record: dict[str, Any], snapshot_id: str) -> None:
        """Note the snapshot as its model's newest of its kind (by the record's time) in the folder's index, which
        :meth:`latest` reads instead of the snapshots; an index made with the project's first snapshot is
        ``complete`` (a kind it does not name has no record)."""
        path = self._index_path(record["model"])
        with self._exclusive():
            index = _read_index(path)
            if index is None:
                project = self.project_id(record["model"], create=False)
                index = {"complete": len(self._open().list_runs(project)) == 1, "newest": {}}
            newest = index["newest"].get(record["kind"])
            if newest is None or record["time"] >= newest.get("time", ""):
                index["newest"][record["kind"]] = {"id": snapshot_id, "time": record["time"]}
                try:
                    private_dir(path.parent)
                    atomic_write(path, json.dumps(index, sort_keys=True))
                except OSError:
                    path.unlink(missing_ok=True)  # no index rather than a stale one: latest() reads the snapshots
                    raise

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

    def latest(self, model: str, kinds: tuple[str, ...] = ("drift", "quality"), *,
               accept: Callable[[dict[str, Any]], bool] | None = None) -> dict[str, dict[str, Any]]:
        """The newest record of each of ``kinds`` (of those ``accept`` takes), as :meth:`records` would end with
        them, without reading the whole history: ``{kind: record}``, a kind without a record left out.

        Local folder: :meth:`add` notes each model's newest snapshot of each kind in an index beside the projects
        (``<folder>/.driftloop-latest/<model>.json``), so a kind it names is one snapshot read. A kind it does not
        name (a history written before the index, a snapshot deleted, a newest record ``accept`` refuses) is found
        by reading the snapshots newest written first: their ids are UUIDv7 (Evidently's ``new_id``, the time each
        was written to the millisecond), and the reading stops at the first one written before the newest record
        found of each kind (a record is written after what it records, so an older snapshot cannot hold a newer
        one); a kind with no record at all is looked for through the whole history. Each snapshot read is kept, so
        the next call reads only what was written since (the fleet monitor's ``GET /models`` is polled). An
        Evidently UI service: its listing of the project's snapshot metadata (one call, no snapshot bodies), as
        :meth:`records` reads it."""
        def wanted(record: dict[str, Any]) -> bool:
            return record.get("kind") in kinds and (accept is None or accept(record))

        if self.remote:
            found = {r["kind"]: r for r in self.records(model) if wanted(r)}
        else:
            try:
                with self._reading:
                    found = self._latest_local(model, kinds, wanted)
            except DriftloopError:
                raise
            except Exception as exc:  # noqa: BLE001 - translated at the boundary
                raise HistoryError(f"cannot read the Evidently workspace {self.target}: {_one_line(exc)}") from exc
        return {kind: dict(found[kind]) for kind in kinds if kind in found}

    def _latest_local(self, model: str, kinds: tuple[str, ...],
                      wanted: Callable[[dict[str, Any]], bool]) -> dict[str, dict[str, Any]]:
        project = self.project_id(model, create=False)
        if project is None:
            return {}
        ws = self._open()
        read = self._read.setdefault(model, {})
        index = _read_index(self._index_path(model)) or {"complete": False, "newest": {}}
        indexed: dict[str, dict[str, Any]] = {}
        settled = 0  # kinds the index answers: its newest record, or none at all (a complete index)
        for kind in kinds:
            entry = index["newest"].get(kind)
            if entry is None:
                settled += index["complete"]
                continue
            record = read.get(entry["id"])
            if record is None:
                record = read[entry["id"]] = self._read_snapshot(ws, project, entry["id"])
            if record and wanted(record):
                indexed[kind] = record
                settled += 1
        if settled == len(kinds):
            keep = {e["id"] for e in index["newest"].values()}
            for old in set(read) - keep:  # what the next call may need: the indexed snapshots
                del read[old]
            return indexed
        ids = [str(i) for i in ws.list_runs(project)]
        written = {i: _written_at(i) for i in ids}
        ids.sort(key=lambda i: written[i] or 0.0, reverse=True)
        ordered = all(written.values())  # every id a UUIDv7: else the whole history is read
        for gone in set(read) - set(ids):
            del read[gone]
        found: dict[str, tuple[str, float, dict[str, Any]]] = {}  # kind -> (time, written, record)
        for snapshot_id in ids:
            # an id's time is the millisecond it was made or later (uuid6 runs ahead, never behind), never before
            # the record it holds was timed -- but both may share that millisecond, hence the margin of one
            if ordered and len(found) == len(kinds) and \
                    written[snapshot_id] + 0.001 < min(_epoch(t) for t, _, _ in found.values()):  # type: ignore[operator]
                break
            record = read.get(snapshot_id)
            if record is None:
                record = read[snapshot_id] = self._read_snapshot(ws, project, snapshot_id)
            if record and wanted(record):
                key = (record["time"], written[snapshot_id] or 0.0)
                best = found.get(record["kind"])
                if best is None or key > best[:2]:
                    found[record["kind"]] = (*key, record)
        return {kind: record for kind, (_, _, record) in found.items()}

    @staticmethod
    def _read_snapshot(ws: Any, project: Any, snapshot_id: str) -> dict[str, Any]:
        """One snapshot's record ({} when it is gone); a snapshot being written as it is read is read again."""
        for attempt in range(3):
            try:
                snap = ws.get_run(project, snapshot_id)
                break
            except FileNotFoundError:
                return {}
            except Exception:  # noqa: BLE001 - a half-written file (the monitor's writer): once more, then raise
                if attempt == 2:
                    raise
                time.sleep(0.05)
        if snap is None:
            return {}
        when = snap.timestamp if snap.timestamp.tzinfo else snap.timestamp.replace(tzinfo=dt.UTC)
        return _from_metadata(dict(snap.metadata), when)

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


def _read_index(path: Path) -> dict[str, Any] | None:
    """A model's index: ``{"complete": bool, "newest": {kind: {"id", "time"}}}``; None when there is none, or
    it cannot be read."""
    try:
        index = json.loads(path.read_text())
        newest = {k: v for k, v in index["newest"].items() if isinstance(v, dict) and isinstance(v.get("id"), str)}
        return {"complete": index.get("complete") is True, "newest": newest}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def _written_at(snapshot_id: str) -> float | None:
    """When a snapshot was written (unix seconds), from its UUIDv7 id; None for an id of another version."""
    try:
        value = uuid.UUID(snapshot_id)
    except ValueError:
        return None
    return (value.int >> 80) / 1000.0 if value.version == 7 else None


def _epoch(iso: str) -> float:
    when = dt.datetime.fromisoformat(iso)
    return (when if when.tzinfo else when.replace(tzinfo=dt.UTC)).timestamp()


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:300]}" if text else type(exc).__name__
