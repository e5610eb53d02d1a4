"""The Dagster layer: assets, resources, checks, sensor, jobs and definitions (wiring only, no algorithms).

Owns the asset graph (asset and job names, the ``emotion`` partitions, the checks) and how runs are
recorded and launched (:mod:`.runner`, :mod:`.instance`, :mod:`.k8s`); calls the workflow and the stages
below for every computation. ``amygdala_dagster.pipeline.definitions`` is the code location loaded by
``dagster dev`` (``workspace.yaml``) and ``dagster asset materialize -m``.
"""

import warnings

import dagster as _dg

# observable_source_asset and backfill_policy are beta in 1.13; we use them on purpose
# (lineage from the real source, single-run backfills), so their warning is noise.
warnings.filterwarnings("ignore", category=_dg.BetaWarning)
