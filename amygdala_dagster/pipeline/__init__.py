"""The Dagster layer: assets, resources, checks, sensor and definitions (wiring only, no algorithms).

``amygdala_dagster.pipeline.definitions`` is the code location loaded by
``dagster dev`` (``workspace.yaml``) and ``dagster asset materialize -m``.
"""
