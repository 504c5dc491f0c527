"""The application on top of every layer: the ``driftloop`` CLI and its sub-commands, the demo,
lineage and the infra check. The only layer that imports across all the others."""
