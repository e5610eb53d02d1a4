"""All emotions' readout vectors (the staged trained matrix) and the Contract 3 pair.

The pair is ``vectors.safetensors`` + ``manifest.json``.
"""

import json
import time
from typing import Any

import dagster as dg

from amygdala_dagster.engine.cache import ActivationCache
from amygdala_dagster.files.atomic import atomic_write_bytes, atomic_write_text
from amygdala_dagster.pipeline.assets.activations import activation_stats, has_stats, read_stats, read_stats_info
from amygdala_dagster.pipeline.assets.common import (
    EMOTIONS_TAG,
    GROUP,
    emotion_partitions,
    file_meta,
    readout_freshness,
    table,
)
from amygdala_dagster.pipeline.assets.emotions import emotion_catalog, read_examples_from, tagged_examples
from amygdala_dagster.pipeline.checks import (
    MANIFEST_CHECKS,
    VECTORS_CHECKS,
    WARN,
    check_result,
    manifest_problems,
    vectors_problems,
)
from amygdala_dagster.pipeline.resources import ArtifactStorage, EvaluationResource, SelectionResource
from amygdala_dagster.readout.episode import episode_problems, episode_summary
from amygdala_dagster.readout.manifest import vectors_bytes, write_readout
from amygdala_dagster.readout.releases import current_pair, open_pair
from amygdala_dagster.readout.token_calibration import (
    calibrate_episodes,
    calibrate_readout,
    calibration_entries,
    heldout_problems,
    heldout_summary,
    project_calibration,
)
from amygdala_dagster.readout.vectors import TrainedReadout, train_readout
from amygdala_dagster.workflow.layout import (
    MANIFEST_FILE,
    STAGED_INFO,
    STAGED_VECTORS,
    TOKEN_SAMPLES_FILE,
    VECTORS_FILE,
)
from amygdala_dagster.workflow.samples import StoredSamples
from amygdala_dagster.workflow.settings import current_settings
from amygdala_dagster.workflow.staging import (
    check_stats_current,
    drift_cosines,
    encode_staged_info,
    read_staged_readout,
    sha256_bytes,
    staged_info,
)


class ReadoutConfig(dg.Config):
    """Run config of ``readout_vectors``."""

    skip_untrainable: bool = True  # leave out (with a warning) an emotion lacking train positives/negatives


def _readout_concepts(context: Any, storage: ArtifactStorage) -> tuple[list[str], list[str]]:
    """``(concepts, leftovers)``: the emotion partitions with statistics, and those without.

    The emotions are the run's (its ``amygdala/emotions`` tag, set by the sensor and the command lines),
    else the registered partitions (a run launched by hand). A partition without statistics (e.g. left by
    a backfill that failed) is left out with a warning: it must not block every other emotion's readout.
    """
    named = context.run.tags.get(EMOTIONS_TAG)
    registered = sorted(named.split(",")) if named else sorted(emotion_partitions(context.instance))
    if not registered:
        raise ValueError(
            "no emotion partitions exist: materialize emotion_catalog (it registers the qualifying emotions) "
            "and then tagged_examples/activation_stats for them"
        )
    concepts = [e for e in registered if has_stats(storage, e)]
    leftovers = [e for e in registered if e not in concepts]
    if not concepts:
        raise ValueError(f"no emotion partition has activation statistics yet ({', '.join(registered)}): "
                         "materialize activation_stats for them first")
    return concepts, leftovers


def _previous_readout(storage: ArtifactStorage) -> TrainedReadout | None:
    store = storage.store()
    if not (store.exists(STAGED_VECTORS) and store.exists(STAGED_INFO)):
        return None
    try:
        return load_staged_readout(storage)[0]
    except (OSError, ValueError, KeyError):
        return None


@dg.asset(
    group_name=GROUP,
    deps=[activation_stats, tagged_examples, emotion_catalog],
    code_version="1",
    kinds={"numpy", "safetensors"},
    check_specs=VECTORS_CHECKS,
    freshness_policy=readout_freshness(),
    description=(
        "Unit mean-difference direction per emotion and hooked layer, from every emotion partition's "
        "statistics, with held-out calibration. Data version = SHA-256 of the vectors."
    ),
)
def readout_vectors(
    context: dg.AssetExecutionContext, config: ReadoutConfig, storage: ArtifactStorage,
    evaluation: EvaluationResource,
) -> dg.MaterializeResult:
    t0 = time.perf_counter()
    threshold = evaluation.threshold()
    concepts, leftovers = _readout_concepts(context, storage)
    for e in leftovers:
        context.log.warning(f"emotion partition {e!r} has no activation statistics (a failed or unfinished "
                            "run?); leaving it out of the readout")
    infos = {e: read_stats_info(storage, e) for e in concepts}
    sets = {e: read_examples_from(storage, e)[1] for e in concepts}
    current = check_stats_current(infos, sets)
    stats = {e: read_stats(storage, e) for e in concepts}
    with ActivationCache(current["cache_root"], current["fingerprint"]) as cache:
        readout = train_readout(sets, cache, current["layers"], order=concepts, stats=stats,
                                skip_invalid=config.skip_untrainable, **threshold)
    skipped = readout.skipped
    for reason in skipped:
        context.log.warning(f"skipping: {reason}")
    previous = _previous_readout(storage)
    drift = drift_cosines(previous, readout)
    data = vectors_bytes(readout)
    sha = sha256_bytes(data)
    info = staged_info(readout, vectors_sha256=sha, fingerprint=current["fingerprint"],
                       examples_sha256={e: infos[e]["examples_sha256"] for e in concepts},
                       cache_root=current["cache_root"])
    store = storage.store()
    with store.local_for_write(STAGED_VECTORS) as path:
        atomic_write_bytes(path, data)
    with store.local_for_write(STAGED_INFO) as path:
        atomic_write_text(path, encode_staged_info(info))
    rows = []
    for c in readout.concepts:
        row = {"emotion": c, **readout.counts[c]}
        for layer, norm in zip(readout.layers, readout.raw_norms[c]):
            row[f"raw_norm_L{layer}"] = round(float(norm), 4)
        row["drift_cosine"] = drift.get(c)
        rows.append(row)
    for c, cosine in drift.items():  # per emotion partition, so its page plots the drift over time
        context.log_event(dg.AssetObservation(asset_key=activation_stats.key, partition=c,
                                              metadata={"drift_cosine": dg.MetadataValue.float(cosine)}))
    context.log.info(f"readout: {len(readout.concepts)} concepts x {len(readout.layers)} layers, sha256 {sha[:12]}")
    return dg.MaterializeResult(
        data_version=dg.DataVersion(sha),
        check_results=[check_result(VECTORS_CHECKS[0].name, vectors_problems(
            readout.concepts, readout.layers, readout.vectors, readout.hidden_size))],
        metadata={
            "n_concepts": len(readout.concepts),
            "layers": ", ".join(str(x) for x in readout.layers),
            "hidden_size": readout.hidden_size,
            "shape": f"{len(readout.layers)} x [{len(readout.concepts)}, {readout.hidden_size}]",
            "skipped": "; ".join(skipped) or "none",
            "left_out_partitions": ", ".join(leftovers) or "none",
            # Numbers to follow over time (the Plots tab): how far the directions moved since the last run.
            "min_drift_cosine": dg.MetadataValue.float(min(drift.values())) if drift else dg.MetadataValue.float(1.0),
            "n_new_concepts": len([c for c in readout.concepts if c not in drift]),
            "threshold": threshold["threshold_method"] + (
                f" (target FPR {threshold['target_fpr']})" if threshold["threshold_method"] == "fixed_fpr" else ""),
            "per_emotion": table(rows),
            "vectors_sha256": sha,
            "seconds": round(time.perf_counter() - t0, 3),
            **file_meta(store, STAGED_VECTORS),
        },
    )


def read_staged_info(storage: ArtifactStorage) -> dict[str, Any]:
    """The info of the trained matrix written by ``readout_vectors`` (without reading the matrix)."""
    store = storage.store()
    if not store.exists(STAGED_INFO):
        raise FileNotFoundError(f"{store.uri(STAGED_INFO)} does not exist: materialize readout_vectors first")
    return json.loads(store.read_bytes(STAGED_INFO))


def load_staged_readout(storage: ArtifactStorage) -> tuple[TrainedReadout, dict[str, Any]]:
    """The trained matrix written by ``readout_vectors`` and its info."""
    info = read_staged_info(storage)
    store = storage.store()
    if not store.exists(STAGED_VECTORS):
        raise FileNotFoundError(f"{store.uri(STAGED_VECTORS)} does not exist: materialize readout_vectors first")
    with store.local_for_read(STAGED_VECTORS) as path:
        return read_staged_readout(path, info), info


@dg.asset(
    group_name=GROUP,
    deps=[readout_vectors],
    code_version="1",
    kinds={"json"},
    check_specs=MANIFEST_CHECKS,
    freshness_policy=readout_freshness(),
    description=(
        "The Contract 3 pair for vLLM: vectors.safetensors + manifest.json (VLLM_READOUT_VECTORS, "
        "VLLM_READOUT_MANIFEST), published as one release (a new directory under releases/, then the "
        "current link switched atomically). The manifest (format 3) carries the vectors' SHA-256 and, per concept "
        "and layer, the text-level calibration, the per-token one (token threshold and its held-out firing rate) "
        "and the episode rule (conversation-level threshold and its held-out false-alarm rate)."
    ),
)
def readout_manifest(
    context: dg.AssetExecutionContext, storage: ArtifactStorage, selection: SelectionResource,
    evaluation: EvaluationResource,
) -> dg.MaterializeResult:
    readout, info = load_staged_readout(storage)
    token_cal, episode = compute_token_calibration(context, readout, info, storage, evaluation)
    fp = info["fingerprint"]
    training = {
        "pipeline": "amygdala_dagster.pipeline",
        "dagster_run_id": context.run.run_id,
        "selection": selection.params().to_dict(),
        "examples_sha256": info["examples_sha256"],
        "skipped": info.get("skipped", []),
        "estimator": info["estimator"],
        "cache_root": info["cache_root"],
    }
    store = storage.store()
    fields = dict(
        model=fp.get("model"), model_revision=fp.get("revision"), dtype=fp.get("dtype"),
        pooling=fp.get("pooling"), layer_path=fp.get("layer_path"), fingerprint=fp, training=training,
        token_calibration=token_cal, episode=episode,
    )
    manifest = write_readout(store.uri(VECTORS_FILE), store.uri(MANIFEST_FILE), readout,
                             keep_releases=current_settings().keep_releases, **fields)
    published = current_pair(store.uri(""))
    assert published is not None  # write_readout has just switched current to the new release
    vectors_rel, manifest_rel = published
    with open_pair(store.uri(VECTORS_FILE), store.uri(MANIFEST_FILE)) as files:  # what a reader gets now
        pair_problems = manifest_problems(files.vectors, files.manifest, readout.concepts)
    context.log.info(f"published {store.uri(vectors_rel)} and {store.uri(manifest_rel)}")
    return dg.MaterializeResult(
        data_version=dg.DataVersion(manifest["vectors_sha256"]),
        check_results=[
            check_result(MANIFEST_CHECKS[0].name, pair_problems),
            check_result(MANIFEST_CHECKS[1].name, heldout_problems(token_cal), severity=WARN,
                         metadata={"max_ratio_to_target": 2.0}),
            check_result(MANIFEST_CHECKS[2].name, episode_problems(episode), severity=WARN),
        ],
        metadata={
            "concepts": ", ".join(manifest["concepts"]),
            "layers": ", ".join(str(x) for x in manifest["layers"]),
            "hidden_size": manifest["hidden_size"],
            "model": str(manifest["model"]),
            "dtype": str(manifest["dtype"]),
            "vectors_sha256": manifest["vectors_sha256"],
            "token_calibration": table(heldout_summary(token_cal)),
            "episode_rules": table(episode_summary(episode)),
            **file_meta(store, vectors_rel, "vectors_"),
            **file_meta(store, manifest_rel, "manifest_"),
        },
    )


def read_samples(storage: ArtifactStorage, fingerprint: dict[str, Any]) -> StoredSamples:
    """The per-token samples the GPU step kept, checked to come from the model behind ``fingerprint``."""
    store = storage.store()
    if not store.exists(TOKEN_SAMPLES_FILE):
        raise FileNotFoundError(f"{store.uri(TOKEN_SAMPLES_FILE)} does not exist: materialize activation_stats first")
    samples = StoredSamples.from_json(store.read_bytes(TOKEN_SAMPLES_FILE).decode("utf-8"))
    if samples.fingerprint != fingerprint:
        raise ValueError(f"{store.uri(TOKEN_SAMPLES_FILE)} comes from other model settings than the readout's "
                         "statistics: rematerialize activation_stats")
    return samples


def compute_token_calibration(context: Any, readout: Any, info: dict[str, Any], storage: ArtifactStorage,
                              evaluation: EvaluationResource) -> tuple[dict[str, Any], dict[str, Any]]:
    """Per-token calibration and episode rule of every concept and layer, from the per-token activations the
    GPU step kept (read and projected once for both)."""
    samples = read_samples(storage, info["fingerprint"])
    sets = {c: read_examples_from(storage, c)[1] for c in readout.concepts}
    entries, source = calibration_entries(samples.calibration, sets, readout.concepts)
    t0 = time.perf_counter()
    projections = project_calibration(readout, entries, samples.tokens, hidden_layers=samples.layers)
    cal = calibrate_readout(readout, entries, samples.tokens, hidden_layers=samples.layers, source=source,
                            target_rate=float(evaluation.token_target_rate), projections=projections)
    episode = calibrate_episodes(projections, cal, source=source, **evaluation.episode_settings())
    summary = samples.calibration.summary()
    cut = f", {summary['truncated']} cut to the token limit" if summary["truncated"] else ""
    context.log.info(f"token calibration and episode rules of {len(readout.concepts)} concepts on "
                     f"{summary['texts']} texts of {', '.join(sorted(set(source.values())))} ({summary['tokens']} "
                     f"tokens{cut}) in {time.perf_counter() - t0:.1f}s")
    for line in episode_problems(episode):
        context.log.warning(line)
    return cal, episode
