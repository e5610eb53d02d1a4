"""The forward work as N parallel shard steps: ``activation_cache``, a graph-backed asset that fans out.

``plan_activation_shards`` yields one dynamic output per shard index (``sharding.shards``; it
needs no model); ``forward_activation_shard`` runs once per index -- each its own step, so its own
process under the multiprocess executor or its own GPU pod under ``k8s_job_executor`` -- loads the
model once and forwards the uncached inputs whose hash falls in its shard (pooled texts and the
per-token samples, chosen the same way by every shard) into the shared caches
(:func:`amygdala_dagster.engine.shards.forward_shard`); ``summarise_activation_shards`` collects the
per-shard counts. ``activation_stats`` then reads every emotion's statistics from the cache in one
cheap step (all cached: no weights read). Only the executor differs between a
box and Kubernetes. With one shard the runs leave this asset out and ``activation_stats``
forwards the texts itself, in one step, as it always did.

Step outputs (shard indices, shard results) are small JSON files under the output directory's
``steps/`` (:class:`JsonStepIOManager`): the steps may run in different processes or pods, and
nothing is pickled.
"""


import json
import time
from typing import Any

import dagster as dg
import torch

from amygdala_dagster.engine.shards import ShardResult, forward_shard
from amygdala_dagster.files.storage import location
from amygdala_dagster.pipeline.assets.common import GPU_POOL, GROUP, run_partition_keys, table
from amygdala_dagster.pipeline.assets.emotions import read_examples_from, tagged_examples
from amygdala_dagster.pipeline.assets.inputs import run_inputs
from amygdala_dagster.pipeline.k8s import gpu_op_tags
from amygdala_dagster.pipeline.resources import (
    ArtifactStorage,
    EvaluationResource,
    ModelResource,
    SelectionResource,
    ShardingResource,
)

STEP_IO = "step_io"


class JsonStepIOManager(dg.UPathIOManager):
    """Step outputs as JSON files (local directory or any fsspec URL)."""

    extension = ".json"

    def dump_to_path(self, context: dg.OutputContext, obj: Any, path: Any) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(obj, sort_keys=True))

    def load_from_path(self, context: dg.InputContext, path: Any) -> Any:
        return json.loads(path.read_text())


@dg.io_manager(required_resource_keys={"storage"},
               description="JSON step outputs under <output dir>/steps (the shard steps' results)")
def json_step_io_manager(init_context: dg.InitResourceContext) -> JsonStepIOManager:
    return JsonStepIOManager(base_path=location(init_context.resources.storage.base_path) / "steps")


@dg.op(ins={"examples": dg.In(dg.Nothing)}, out=dg.DynamicOut(int, io_manager_key=STEP_IO),
       description="one dynamic output per shard index (sharding.shards)")
def plan_activation_shards(context: dg.OpExecutionContext, sharding: ShardingResource):
    n = int(sharding.shards)
    context.log.info(f"forward work split into {n} shard(s) by text hash")
    for i in range(n):
        yield dg.DynamicOutput(i, mapping_key=f"shard_{i}")


@dg.op(pool=GPU_POOL, tags=gpu_op_tags(), out=dg.Out(dict, io_manager_key=STEP_IO),
       description="forward the uncached texts of one shard into the activation cache (loads the model once)")
def forward_activation_shard(context: dg.OpExecutionContext, model: ModelResource, storage: ArtifactStorage,
                             selection: SelectionResource, evaluation: EvaluationResource,
                             sharding: ShardingResource, index: int) -> dict:
    n = int(sharding.shards)
    emotions = run_partition_keys(context)
    engine = model.engine()
    texts, keys, samples = run_inputs({e: read_examples_from(storage, e)[1] for e in emotions}, storage,
                                      selection, evaluation, engine.tokenizer, engine.max_tokens)
    if n > 1 and str(engine.stats.device).startswith("cpu"):
        torch.set_num_threads(max(1, torch.get_num_threads() // n))  # the box's threads split between shards
    result = forward_shard(engine, model.cache_root(), texts, index=index, n=n, keys=keys,
                           sequences=samples.sequences())
    s = result.stats
    context.log.info(f"shard {index}/{n}: {result.shard_texts} unique texts, {s.forwarded} forwarded, "
                     f"{s.cached} from cache, {s.tokens} tokens on {s.device}")
    return result.to_dict()


@dg.op(out=dg.Out(dict, io_manager_key=STEP_IO), description="per-shard counts of the forward work")
def summarise_activation_shards(context: dg.OpExecutionContext, results: list[dict]) -> dg.Output:
    shards = sorted((ShardResult.from_dict(r) for r in results), key=lambda r: r.index)
    rows = [{"shard": r.index, "unique_texts": r.shard_texts, "forwarded": r.stats.forwarded,
             "cached": r.stats.cached, "tokens": r.stats.tokens, "device": r.stats.device,
             "seconds": round(r.finished_at - r.started_at, 3)} for r in shards]
    summary: dict[str, Any] = {
        "shards": len(shards),
        "unique_texts": sum(r.shard_texts for r in shards),
        "texts_forwarded": sum(r.stats.forwarded for r in shards),
        "texts_cached": sum(r.stats.cached for r in shards),
        "tokens": sum(r.stats.tokens for r in shards),
        "forwarded_per_shard": [r.stats.forwarded for r in shards],
        "wall_seconds": round(max((r.finished_at for r in shards), default=0.0)
                              - min((r.started_at for r in shards), default=0.0), 3),
    }
    return dg.Output(summary, metadata={
        **{k: (", ".join(map(str, v)) if isinstance(v, list) else v) for k, v in summary.items()},
        "per_shard": table(rows), "finished_at": time.time(),
    })


@dg.graph_asset(
    group_name=GROUP,
    ins={"examples": dg.AssetIn(key=tagged_examples.key, dagster_type=dg.Nothing)},
    kinds={"pytorch", "safetensors"},
    code_version="1",
    resource_defs={STEP_IO: json_step_io_manager},
    description=(
        "The activation cache filled for the run's emotions by N parallel shard steps (sharding.shards; one "
        "process, or one GPU pod on Kubernetes, each). Every unique text is forwarded by exactly one shard. "
        "Runs with one shard leave this out: activation_stats forwards the texts itself."
    ),
)
def activation_cache(examples):
    results = plan_activation_shards(examples).map(forward_activation_shard)
    return summarise_activation_shards(results.collect())
