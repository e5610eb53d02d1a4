"""The software-defined assets, one module per group of the data flow."""

import dagster as dg

from amygdala_dagster.pipeline.assets.activations import activation_stats
from amygdala_dagster.pipeline.assets.emotions import emotion_catalog, tagged_examples
from amygdala_dagster.pipeline.assets.evaluation import evaluation_report
from amygdala_dagster.pipeline.assets.graph import memory_graph, memory_snapshot
from amygdala_dagster.pipeline.assets.readout_pair import readout_manifest, readout_vectors
from amygdala_dagster.pipeline.assets.shards import activation_cache

ALL_ASSETS: list[dg.AssetsDefinition | dg.SourceAsset] = [
    memory_graph, memory_snapshot, emotion_catalog, tagged_examples, activation_cache, activation_stats,
    readout_vectors, readout_manifest, evaluation_report,
]
