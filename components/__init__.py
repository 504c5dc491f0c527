"""Pipeline steps: one module per step, each a plain typed function plus a thin KFP wrapper.

The plain functions (``ingest``, ``validate_frames``, ``train_model``, ``evaluate_models``,
``register_model``) take DataFrames, paths and small config values and never touch KFP;
the ``*_op`` wrappers turn KFP artifacts into paths and call them.
"""
