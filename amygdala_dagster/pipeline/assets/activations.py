"""The GPU step: pooled activations of every requested emotion's examples -> per-emotion statistics."""


import json
import time

import dagster as dg

from amygdala_dagster.files.atomic import sha256_file
from amygdala_dagster.files.atomic import atomic_write_text
from amygdala_dagster.engine.cache import ActivationCache, ensure_cached
from amygdala_dagster.pipeline.assets.common import (
    EMOTION, GPU_POOL, GROUP, add_partition_metadata, combined_hash, file_meta, table,
)
from amygdala_dagster.pipeline.assets.emotions import read_examples_from, tagged_examples
from amygdala_dagster.pipeline.assets.shards import activation_cache
from amygdala_dagster.pipeline.k8s import gpu_op_tags
from amygdala_dagster.pipeline.resources import ArtifactStorage, ModelResource
from amygdala_dagster.readout.vectors import EmotionStats, emotion_stats, load_stats, save_stats
from amygdala_dagster.workflow import collect_texts, engine_report, stats_file, stats_info, stats_info_file


@dg.asset(
    group_name=GROUP,
    deps=[tagged_examples, activation_cache],
    partitions_def=EMOTION,
    backfill_policy=dg.BackfillPolicy.single_run(),
    pool=GPU_POOL,
    op_tags=gpu_op_tags(),  # on Kubernetes: a GPU pod (the only step that forwards through the model)
    code_version="1",
    kinds={"pytorch", "safetensors"},
    description=(
        "Per-layer sums and counts of the pooled activations of one emotion's train examples. "
        "All partitions of a run are computed in ONE step: the model loads once and the union of "
        "their texts goes through the activation cache (each text forwarded at most once per model "
        "fingerprint)."
    ),
)
def activation_stats(
    context: dg.AssetExecutionContext, model: ModelResource, storage: ArtifactStorage
) -> dg.MaterializeResult:
    t0 = time.perf_counter()
    emotions = list(context.partition_keys)
    sets = {e: read_examples_from(storage, e)[1] for e in emotions}
    texts, keys = collect_texts(sets)
    context.log.info(f"{len(emotions)} emotion(s) in this step: {', '.join(emotions)}; {len(texts)} example texts")

    t_load = time.perf_counter()
    engine = model.engine()
    load_seconds = time.perf_counter() - t_load
    loads0 = engine.stats.load_seconds
    fingerprint = dict(engine.fingerprint)
    cache_root = model.cache_root()
    store = storage.store()
    hashes: dict[str, str] = {}
    rows = []
    partition_metadata: dict[str, dict] = {}
    with ActivationCache(cache_root, fingerprint) as cache:
        run = ensure_cached(engine, cache, texts, keys=keys, progress=True)
        context.log.info(
            f"activations: {run.unique_texts} unique texts, {run.forwarded} forwarded, {run.cached} from cache, "
            f"{run.tokens} tokens ({run.tokens_per_s:.0f} tokens/s) on {run.device}"
        )
        for emotion in emotions:
            stats = emotion_stats(cache, sets[emotion], "train")
            with store.local_for_write(stats_file(emotion)) as path:
                save_stats(path, stats)
                info = stats_info(sets[emotion], stats, fingerprint, cache_root, sha256_file(path))
            with store.local_for_write(stats_info_file(emotion)) as path:
                atomic_write_text(path, json.dumps(info, indent=2, sort_keys=True) + "\n")
            hashes[emotion] = info["stats_sha256"]
            rows.append({"emotion": emotion, "train_positives": stats.pos_n, "train_negatives": stats.neg_n,
                         "stats_sha256": info["stats_sha256"][:16]})
            partition_metadata[emotion] = {
                "train_positives": stats.pos_n, "train_negatives": stats.neg_n,
                "stats_sha256": info["stats_sha256"], "examples_sha256": info["examples_sha256"],
                **file_meta(store, stats_file(emotion))}
    add_partition_metadata(context, partition_metadata)
    # The weights are read inside the first forward pass, and only if some text was not cached.
    load_seconds += engine.stats.load_seconds - loads0
    version = next(iter(hashes.values())) if len(hashes) == 1 else combined_hash(hashes)
    return dg.MaterializeResult(
        data_version=dg.DataVersion(version),
        metadata={
            "texts_total": run.texts_total,
            "unique_texts": run.unique_texts,
            "texts_forwarded": run.forwarded,
            "texts_cached": run.cached,
            "tokens": run.tokens,
            "tokens_truncated": run.truncated,
            "tokens_per_s": run.tokens_per_s,
            "forward_seconds": run.seconds,
            "peak_memory_bytes": run.peak_memory_bytes if run.peak_memory_bytes is not None else -1,
            "device": run.device,
            "model": fingerprint.get("model"),
            "layers": ", ".join(str(x) for x in fingerprint.get("layers", [])),
            "model_load_seconds": round(load_seconds, 3),
            "model_weights_loaded": bool(engine.weights_loaded),
            **_engine_metadata(engine),
            "cache_dir": dg.MetadataValue.path(str(cache_root)),
            "cache_fingerprint_id": cache.fingerprint_id,
            "emotions_in_step": table(rows),
            "seconds": round(time.perf_counter() - t0, 3),
        },
    )


def _engine_metadata(engine) -> dict:
    """Fast path, kernels and device map of the engine, as metadata (lists as comma-separated text)."""
    report = engine_report(engine)
    return {"fast_path": report["fast_path"], "kernels_found": ", ".join(report["kernels_found"]),
            "kernels_missing": ", ".join(report["kernels_missing"]),
            "device_map": json.dumps(report["device_map"], sort_keys=True) if report["device_map"] else "none"}


def has_stats(storage: ArtifactStorage, emotion: str) -> bool:
    store = storage.store()
    return store.exists(stats_info_file(emotion)) and store.exists(stats_file(emotion))


def read_stats_info(storage: ArtifactStorage, emotion: str) -> dict:
    store = storage.store()
    rel = stats_info_file(emotion)
    if not store.exists(rel):
        raise FileNotFoundError(
            f"{store.uri(rel)} does not exist: materialize activation_stats for partition {emotion!r} "
            f"(e.g. `amygdala backfill-emotion {emotion}`)"
        )
    return json.loads(store.read_bytes(rel))


def read_stats(storage: ArtifactStorage, emotion: str) -> EmotionStats:
    with storage.store().local_for_read(stats_file(emotion)) as path:
        return load_stats(path)
