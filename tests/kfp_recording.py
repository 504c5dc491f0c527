"""A recording stand-in for ``kfp.Client`` (tests only).

Every call is checked against the real ``kfp.Client`` method's signature, recorded with
its bound arguments, and answered with the ``kfp_server_api`` model objects the real
client returns, built from what was sent before (pipelines, versions, experiments,
recurring runs, runs). Tests assert on ``calls``: exactly what would reach Kubeflow.
"""

from __future__ import annotations

import hashlib
import inspect
import json
from pathlib import Path
from typing import Any

import kfp
import kfp_server_api as api

__all__ = ["RecordingKfpClient"]


def _predicate(filter_json: str | None) -> tuple[str, str] | None:
    if not filter_json:
        return None
    (pred,) = json.loads(filter_json)["predicates"]
    assert pred["operation"] == 1, pred  # EQUALS
    return pred["key"], pred["stringValue"]


class RecordingKfpClient:
    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.pipelines: dict[str, api.V2beta1Pipeline] = {}
        self.versions: dict[str, list[api.V2beta1PipelineVersion]] = {}
        self.version_digests: dict[str, str] = {}
        self.experiments: dict[str, api.V2beta1Experiment] = {}
        self.recurring: dict[str, api.V2beta1RecurringRun] = {}
        self.runs: list[api.V2beta1Run] = []
        self._ids = 0

    # bookkeeping -------------------------------------------------------------------
    def _record(self, method: str, *args: Any, **kwargs: Any) -> dict[str, Any]:
        bound = inspect.signature(getattr(kfp.Client, method)).bind(None, *args, **kwargs)
        arguments = dict(bound.arguments)
        arguments.pop("self")
        self.calls.append((method, arguments))
        return arguments

    def _id(self, prefix: str) -> str:
        self._ids += 1
        return f"{prefix}-{self._ids}"

    def names(self) -> list[str]:
        return [name for name, _ in self.calls]

    def of(self, method: str) -> list[dict[str, Any]]:
        return [args for name, args in self.calls if name == method]

    def add_run(self, recurring_run_id: str, state: str) -> api.V2beta1Run:
        """A run the KFP scheduler started for a recurring run (as if time had passed)."""
        rr = self.recurring[recurring_run_id]
        run = api.V2beta1Run(run_id=self._id("run"), display_name=f"{rr.display_name}-run", state=state,
                             recurring_run_id=recurring_run_id, experiment_id=rr.experiment_id)
        self.runs.append(run)
        return run

    # pipelines -----------------------------------------------------------------------
    def get_pipeline_id(self, name: str) -> str | None:
        self._record("get_pipeline_id", name)
        p = self.pipelines.get(name)
        return p.pipeline_id if p else None

    def upload_pipeline(self, pipeline_package_path: str, pipeline_name: str | None = None,
                        description: str | None = None, namespace: str | None = None) -> api.V2beta1Pipeline:
        self._record("upload_pipeline", pipeline_package_path, pipeline_name=pipeline_name, description=description,
                     namespace=namespace)
        p = api.V2beta1Pipeline(pipeline_id=self._id("pipeline"), display_name=pipeline_name, description=description)
        self.pipelines[pipeline_name] = p
        # KFP makes the first version from the same package, named like the pipeline.
        self._add_version(p.pipeline_id, pipeline_name, pipeline_package_path)
        return p

    def _add_version(self, pipeline_id: str, name: str, package: str) -> api.V2beta1PipelineVersion:
        v = api.V2beta1PipelineVersion(pipeline_id=pipeline_id, pipeline_version_id=self._id("version"), display_name=name)
        self.versions.setdefault(pipeline_id, []).append(v)
        self.version_digests[v.pipeline_version_id] = hashlib.sha256(Path(package).read_bytes()).hexdigest()
        return v

    def list_pipeline_versions(self, pipeline_id: str, page_token: str = "", page_size: int = 10, sort_by: str = "",
                               filter: str | None = None) -> api.V2beta1ListPipelineVersionsResponse:
        self._record("list_pipeline_versions", pipeline_id, page_token=page_token, page_size=page_size,
                     sort_by=sort_by, filter=filter)
        pred = _predicate(filter)
        found = [v for v in self.versions.get(pipeline_id, []) if pred is None or getattr(v, pred[0]) == pred[1]]
        return api.V2beta1ListPipelineVersionsResponse(pipeline_versions=found or None, total_size=len(found))

    def upload_pipeline_version(self, pipeline_package_path: str, pipeline_version_name: str,
                                pipeline_id: str | None = None, pipeline_name: str | None = None,
                                description: str | None = None) -> api.V2beta1PipelineVersion:
        self._record("upload_pipeline_version", pipeline_package_path, pipeline_version_name, pipeline_id=pipeline_id,
                     pipeline_name=pipeline_name, description=description)
        return self._add_version(pipeline_id, pipeline_version_name, pipeline_package_path)

    # experiments -----------------------------------------------------------------------
    def get_experiment(self, experiment_id: str | None = None, experiment_name: str | None = None,
                       namespace: str | None = None) -> api.V2beta1Experiment:
        self._record("get_experiment", experiment_id=experiment_id, experiment_name=experiment_name, namespace=namespace)
        if experiment_name not in self.experiments:
            raise ValueError(f"No experiment is found with name {experiment_name}.")
        return self.experiments[experiment_name]

    def create_experiment(self, name: str, description: str | None = None,
                          namespace: str | None = None) -> api.V2beta1Experiment:
        self._record("create_experiment", name, description=description, namespace=namespace)
        exp = api.V2beta1Experiment(experiment_id=self._id("experiment"), display_name=name, namespace=namespace)
        self.experiments[name] = exp
        return exp

    # runs ---------------------------------------------------------------------------------
    def run_pipeline(self, experiment_id: str, job_name: str, pipeline_package_path: str | None = None,
                     params: dict | None = None, pipeline_id: str | None = None, version_id: str | None = None,
                     pipeline_root: str | None = None, enable_caching: bool | None = None,
                     cache_key: str | None = None, service_account: str | None = None) -> api.V2beta1Run:
        self._record("run_pipeline", experiment_id, job_name, pipeline_package_path=pipeline_package_path,
                     params=params, pipeline_id=pipeline_id, version_id=version_id, pipeline_root=pipeline_root,
                     enable_caching=enable_caching, cache_key=cache_key, service_account=service_account)
        run = api.V2beta1Run(run_id=self._id("run"), display_name=job_name, experiment_id=experiment_id,
                             state="PENDING")
        self.runs.append(run)
        return run

    def wait_for_run_completion(self, run_id: str, timeout: int, sleep_duration: int = 5) -> api.V2beta1Run:
        self._record("wait_for_run_completion", run_id, timeout, sleep_duration=sleep_duration)
        run = next(r for r in self.runs if r.run_id == run_id)
        run.state = "FAILED"
        return run

    def list_runs(self, page_token: str = "", page_size: int = 10, sort_by: str = "", experiment_id: str | None = None,
                  namespace: str | None = None, filter: str | None = None) -> api.V2beta1ListRunsResponse:
        self._record("list_runs", page_token=page_token, page_size=page_size, sort_by=sort_by,
                     experiment_id=experiment_id, namespace=namespace, filter=filter)
        pred = _predicate(filter)
        found = [r for r in self.runs if pred is None or getattr(r, pred[0]) == pred[1]]
        start = int(page_token or 0)
        page = found[start:start + page_size]
        token = str(start + page_size) if start + page_size < len(found) else ""
        return api.V2beta1ListRunsResponse(runs=page or None, total_size=len(found), next_page_token=token)

    # recurring runs ----------------------------------------------------------------------
    def create_recurring_run(self, experiment_id: str, job_name: str, description: str | None = None,
                             start_time: str | None = None, end_time: str | None = None,
                             interval_second: int | None = None, cron_expression: str | None = None,
                             max_concurrency: int | None = 1, no_catchup: bool | None = None,
                             params: dict | None = None, pipeline_package_path: str | None = None,
                             pipeline_id: str | None = None, version_id: str | None = None, enabled: bool = True,
                             pipeline_root: str | None = None, enable_caching: bool | None = None,
                             cache_key: str | None = None,
                             service_account: str | None = None) -> api.V2beta1RecurringRun:
        self._record("create_recurring_run", experiment_id, job_name, description=description, start_time=start_time,
                     end_time=end_time, interval_second=interval_second, cron_expression=cron_expression,
                     max_concurrency=max_concurrency, no_catchup=no_catchup, params=params,
                     pipeline_package_path=pipeline_package_path, pipeline_id=pipeline_id, version_id=version_id,
                     enabled=enabled, pipeline_root=pipeline_root, enable_caching=enable_caching, cache_key=cache_key,
                     service_account=service_account)
        rr = api.V2beta1RecurringRun(
            recurring_run_id=self._id("recurring"), display_name=job_name, description=description,
            experiment_id=experiment_id, max_concurrency=str(max_concurrency), no_catchup=no_catchup,
            mode="ENABLE" if enabled else "DISABLE", status="ENABLED" if enabled else "DISABLED",
            trigger=api.V2beta1Trigger(cron_schedule=api.V2beta1CronSchedule(cron=cron_expression)),
            pipeline_version_reference=api.V2beta1PipelineVersionReference(pipeline_id=pipeline_id,
                                                                           pipeline_version_id=version_id),
            runtime_config=api.V2beta1RuntimeConfig(parameters=params), service_account=service_account,
        )
        self.recurring[rr.recurring_run_id] = rr
        return rr

    def list_recurring_runs(self, page_token: str = "", page_size: int = 10, sort_by: str = "",
                            experiment_id: str | None = None, namespace: str | None = None,
                            filter: str | None = None) -> api.V2beta1ListRecurringRunsResponse:
        self._record("list_recurring_runs", page_token=page_token, page_size=page_size, sort_by=sort_by,
                     experiment_id=experiment_id, namespace=namespace, filter=filter)
        found = [rr for rr in self.recurring.values() if experiment_id in (None, rr.experiment_id)]
        start = int(page_token or 0)
        page = found[start:start + page_size]
        token = str(start + page_size) if start + page_size < len(found) else ""
        return api.V2beta1ListRecurringRunsResponse(recurring_runs=page or None, total_size=len(found),
                                                    next_page_token=token)

    def disable_recurring_run(self, recurring_run_id: str) -> dict:
        self._record("disable_recurring_run", recurring_run_id)
        rr = self.recurring[recurring_run_id]
        rr.mode, rr.status = "DISABLE", "DISABLED"
        return {}

    def delete_recurring_run(self, recurring_run_id: str) -> dict:
        self._record("delete_recurring_run", recurring_run_id)
        del self.recurring[recurring_run_id]
        return {}
