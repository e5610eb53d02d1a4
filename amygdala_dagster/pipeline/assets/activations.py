"""The GPU step: every forward pass of a run, once per input -> per-emotion statistics and per-token samples."""


import json
import time
from collections.abc import Mapping
from typing import Any

import dagster as dg

from amygdala_dagster.engine.cache import ActivationCache
from amygdala_dagster.engine.token_cache import bytes_per_token
from amygdala_dagster.files.atomic import atomic_write_text, sha256_file
from amygdala_dagster.pipeline.assets.common import (
    EMOTION,
    GPU_POOL,
    GROUP,
    add_partition_metadata,
    combined_hash,
    file_meta,
    table,
)
from amygdala_dagster.pipeline.assets.emotions import read_examples_from, tagged_examples
from amygdala_dagster.pipeline.assets.inputs import run_inputs
from amygdala_dagster.pipeline.assets.shards import activation_cache
from amygdala_dagster.pipeline.checks import STATS_CHECKS, WARN, check_result, fast_path_problems, stats_problems
from amygdala_dagster.pipeline.k8s import gpu_op_tags
from amygdala_dagster.pipeline.resources import ArtifactStorage, EvaluationResource, ModelResource, SelectionResource
from amygdala_dagster.readout.vectors import EmotionStats, emotion_stats, load_stats, save_stats
from amygdala_dagster.workflow.engine_settings import engine_report
from amygdala_dagster.workflow.layout import TOKEN_SAMPLES_FILE, stats_file, stats_info_file
from amygdala_dagster.workflow.samples import forward_run
from amygdala_dagster.workflow.staging import stats_info


@dg.asset(
    group_name=GROUP,
    deps=[tagged_examples, activation_cache],
    partitions_def=EMOTION,
    backfill_policy=dg.BackfillPolicy.single_run(),
    pool=GPU_POOL,
    op_tags=gpu_op_tags(),  # on Kubernetes: a GPU pod (the only step that forwards through the model)
    code_version="2",
    kinds={"pytorch", "safetensors"},
    check_specs=STATS_CHECKS,
    description=(
        "Every forward pass of the run, in ONE step that loads the model once: the pooled activations of "
        "every example text and snippet (-> per-layer sums and counts of each emotion's train examples) and, "
        "from the same forward, the per-token activations of a bounded calibration sample and of the "
        "evaluation conversations (tokens/samples.json). Each input is forwarded at most once per model "
        "fingerprint; a fully cached run reads no weights."
    ),
)
def activation_stats(
    context: dg.AssetExecutionContext, model: ModelResource, storage: ArtifactStorage, selection: SelectionResource,
    evaluation: EvaluationResource,
) -> dg.MaterializeResult:
    t0 = time.perf_counter()
    emotions = list(context.partition_keys)
    sets = {e: read_examples_from(storage, e)[1] for e in emotions}
    engine = model.engine()
    texts, keys, samples = run_inputs(sets, storage, selection, evaluation, engine.tokenizer, engine.max_tokens)
    context.log.info(f"{len(emotions)} emotion(s) in this step: {', '.join(emotions)}; {len(texts)} texts")
    load0 = engine.stats.load_seconds
    fingerprint = dict(engine.fingerprint)
    cache_root = model.cache_root()
    store = storage.store()
    hashes: dict[str, str] = {}
    rows = []
    partition_metadata: dict[str, dict[str, Any]] = {}
    problems: list[str] = []
    with ActivationCache(cache_root, fingerprint) as cache:
        run = forward_run(engine, cache, texts, keys, samples)
        context.log.info(
            f"activations: {run.unique_texts} unique texts, {run.forwarded} forwarded, {run.cached} from cache; "
            f"{run.sequences} per-token sequence(s), {run.sequences_forwarded} forwarded; {run.tokens} tokens "
            f"({run.tokens_per_s:.0f} tokens/s) on {run.device}"
        )
        for emotion in emotions:
            stats = emotion_stats(cache, sets[emotion], "train")
            problems += stats_problems(stats)
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
    with store.local_for_write(TOKEN_SAMPLES_FILE) as path:
        atomic_write_text(path, samples.to_json(engine, cache_root))
    add_partition_metadata(context, partition_metadata)
    per_token = bytes_per_token(len(engine.layers), engine.loaded.hidden_size)
    version = next(iter(hashes.values())) if len(hashes) == 1 else combined_hash(hashes)
    engine_meta = {"device": run.device, **_engine_metadata(engine)}
    return dg.MaterializeResult(
        data_version=dg.DataVersion(version),
        check_results=[
            check_result(STATS_CHECKS[0].name, problems, metadata={"emotions_checked": ", ".join(emotions)}),
            check_result(STATS_CHECKS[1].name, fast_path_problems(engine_meta), severity=WARN,
                         metadata={"device": run.device, "fast_path": engine_meta["fast_path"]}),
        ],
        metadata={
            "texts_total": run.texts_total,
            "unique_texts": run.unique_texts,
            "texts_forwarded": run.forwarded,
            "texts_cached": run.cached,
            "per_token_sequences": run.sequences,
            "per_token_sequences_forwarded": run.sequences_forwarded,
            "per_token_only_forwards": run.extra_forwards,
            "tokens": run.tokens,
            "texts_truncated": run.truncated,
            "tokens_per_s": run.tokens_per_s,
            "forward_seconds": run.seconds,
            "peak_memory_bytes": run.peak_memory_bytes if run.peak_memory_bytes is not None else -1,
            "device": run.device,
            "model": fingerprint.get("model"),
            "layers": ", ".join(str(x) for x in fingerprint.get("layers", [])),
            # The weights are read inside the first forward pass, and only if some input was not cached.
            "model_load_seconds": round(engine.stats.load_seconds - load0, 3),
            "model_weights_loaded": bool(engine.weights_loaded),
            **_engine_metadata(engine),
            "calibration_sample": _sample_line(samples.calibration.summary()),
            "conversations_sample": _sample_line(samples.conversations.summary()) if samples.conversations else "none",
            "per_token_bytes_per_token": per_token,
            "cache_dir": dg.MetadataValue.path(str(cache_root)),
            "cache_fingerprint_id": cache.fingerprint_id,
            "emotions_in_step": table(rows),
            "seconds": round(time.perf_counter() - t0, 3),
        },
    )


def _sample_line(s: Mapping[str, Any]) -> str:
    line = f"{s['texts']} inputs, {s['tokens']} tokens (budget {s['budget']})"
    if s["left_out"]:
        line += f", {s['left_out']} left out by the budget"
    if s["truncated"]:
        line += f", {s['truncated']} cut to the token limit"
    return line


def _engine_metadata(engine: Any) -> dict[str, Any]:
    """Fast path, kernels and device map of the engine, as metadata (lists as comma-separated text)."""
    report = engine_report(engine)
    return {"fast_path": report["fast_path"], "kernels_found": ", ".join(report["kernels_found"]),
            "kernels_missing": ", ".join(report["kernels_missing"]),
            "device_map": json.dumps(report["device_map"], sort_keys=True) if report["device_map"] else "none"}


def has_stats(storage: ArtifactStorage, emotion: str) -> bool:
    store = storage.store()
    return store.exists(stats_info_file(emotion)) and store.exists(stats_file(emotion))


def read_stats_info(storage: ArtifactStorage, emotion: str) -> dict[str, Any]:
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
