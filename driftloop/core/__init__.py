"""The core every layer stands on: configuration, errors, the MLflow adapter, table I/O,
process helpers and the console/settings helpers shared by every command.

Nothing here imports ``pipelines``, ``components``, ``serving``, ``monitoring`` or the
application (``driftloop.app``); ``tests/test_layers.py`` checks it.
"""
