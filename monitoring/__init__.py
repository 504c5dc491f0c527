"""The drift monitor: stores the inference log, checks drift and quality, alerts, starts retraining.

Where each concern lives:

* process and wiring — :mod:`monitoring.service` (``MonitorService``: builds the parts, one app,
  the check loop); its own HTTP routes in :mod:`monitoring.routes`, the OpenAPI document in
  :mod:`monitoring.openapi`, Prometheus metrics in :mod:`monitoring.metrics`; a fleet's one monitor
  (every model's ``MonitorService`` under ``/models/<name>``, one check loop) in
  :mod:`monitoring.fleet_service`;
* ingest — :mod:`monitoring.sink` (``POST /events``, ``/feedback``, ``/quality``, health; group
  commit) on :mod:`monitoring.events` (parsing and flattening KServe's CloudEvents);
* the inference log — :mod:`monitoring.store` (``InferenceStore``: one SQLite file, its
  durability), composed of :mod:`~monitoring.store_write` (events paired into rows),
  :mod:`~monitoring.store_labels` (labels written), :mod:`~monitoring.store_query` (reads),
  :mod:`~monitoring.store_window` (the drift windows) and :mod:`~monitoring.store_schema`
  (tables, migrations);
* drift — :mod:`monitoring.drift_check` (the check of the current window, its report and alert)
  on :mod:`monitoring.drift` (the statistics: the fast path and Evidently) and
  :mod:`monitoring.reference` (the champion's reference sample and profile);
* shadow comparison on a cluster — :mod:`monitoring.shadow_check`;
* alerts and retraining — :mod:`monitoring.alerts` (the alert store, the guardrails),
  :mod:`monitoring.trigger` (starts the training pipeline for an alert that passes them, in the
  data's time window, and follows it), :mod:`monitoring.outcomes` (what became of a run: its
  rollout's outcome read from MLflow, needs-attention when a degraded champion stays),
  :mod:`monitoring.duplicates` (Alertmanager's alert for a drift the monitor raised itself);
* history — :mod:`monitoring.history` (every check, alert, run and rollout outcome a snapshot in the
  model's Evidently project, through :mod:`driftloop.core.history`; written off the checks' path) and
  :mod:`monitoring.loglines` (the check loop's log: a line per change, a summary a minute);
* episodes — :mod:`monitoring.alert_episodes` (the stretches of failing windows, table
  ``episodes`` of the alert store) and :mod:`monitoring.episodes` (one alert per episode: what the
  drift and quality checks do with a window's verdict).

Labelled quality runs across four modules, from the label to the alert. Labels are posted to
``/feedback`` (:mod:`monitoring.sink`) and written by :mod:`monitoring.store_labels`;
:mod:`monitoring.labels` checks what a label may be and reads the labelled (and scored)
predictions back out of the log; :mod:`monitoring.quality` holds the metrics, the holdout
baseline of each version, the rules that compare the two and the tumbling blocks;
:mod:`monitoring.estimate` estimates accuracy from calibrated scores before labels arrive (CBPE);
:mod:`monitoring.quality_check` (``QualityMonitor``) puts them together per version and raises
quality alerts through the same trigger as drift.
"""
