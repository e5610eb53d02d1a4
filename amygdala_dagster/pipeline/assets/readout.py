"""All emotions' readout vectors, and the Contract 3 pair (vectors.safetensors + manifest.json)."""


import json
import time
from typing import Any

import dagster as dg

from amygdala_dagster.pipeline.assets.activations import activation_stats, read_stats, read_stats_info
from amygdala_dagster.pipeline.assets.common import (
    GROUP, MANIFEST_FILE, STAGED_INFO, STAGED_VECTORS, VECTORS_FILE, emotion_partitions, file_meta,
    readout_freshness, table,
)
from amygdala_dagster.pipeline.assets.emotions import emotion_catalog, read_examples_from, tagged_examples
from amygdala_dagster.pipeline.resources import ArtifactStorage, EvaluationResource, SelectionResource
from amygdala_dagster.publish import current_pair


class ReadoutConfig(dg.Config):
    """Run config of ``readout_vectors``."""

    skip_untrainable: bool = True  # leave out (with a warning) an emotion lacking train positives/negatives


def _readout_concepts(context: Any) -> list[str]:
    concepts = sorted(emotion_partitions(context.instance))
    if not concepts:
        raise ValueError(
            "no emotion partitions exist: materialize emotion_catalog (it registers the qualifying emotions) "
            "and then tagged_examples/activation_stats for them"
        )
    return concepts


@dg.asset(
    group_name=GROUP,
    deps=[activation_stats, tagged_examples, emotion_catalog],
    code_version="1",
    kinds={"numpy", "safetensors"},
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
    from amygdala_dagster.atomic import atomic_write_text
    from amygdala_dagster.cache import ActivationCache
    from amygdala_dagster.examples import examples_hash
    from amygdala_dagster.manifest import vectors_bytes
    from amygdala_dagster.vectors import train_readout

    t0 = time.perf_counter()
    threshold = evaluation.threshold()
    concepts = _readout_concepts(context)
    infos = {e: read_stats_info(storage, e) for e in concepts}
    sets = {e: read_examples_from(storage, e)[1] for e in concepts}
    stale = [e for e in concepts if infos[e]["examples_sha256"] != examples_hash(sets[e])]
    if stale:
        raise ValueError(
            f"activation_stats is older than tagged_examples for {', '.join(stale)}: "
            "materialize activation_stats for those partitions first"
        )
    fingerprint_ids = {infos[e]["fingerprint_id"] for e in concepts}
    if len(fingerprint_ids) > 1:
        by = {e: infos[e]["fingerprint_id"][:12] for e in concepts}
        raise ValueError(f"emotion statistics come from different models/settings ({by}); rematerialize activation_stats")
    first = infos[concepts[0]]
    fingerprint, layers = first["fingerprint"], first["layers"]
    stats = {e: read_stats(storage, e) for e in concepts}
    with ActivationCache(first["cache_root"], fingerprint) as cache:
        readout = train_readout(sets, cache, layers, order=concepts, stats=stats,
                                skip_invalid=config.skip_untrainable, **threshold)
    skipped = readout.skipped
    for reason in skipped:
        context.log.warning(f"skipping: {reason}")
    data = vectors_bytes(readout)
    import hashlib

    sha = hashlib.sha256(data).hexdigest()
    info = {
        "concepts": readout.concepts, "layers": readout.layers, "hidden_size": readout.hidden_size,
        "raw_norms": readout.raw_norms, "counts": readout.counts,
        "calibration": {c: {str(k): v for k, v in cal.items()} for c, cal in readout.calibration.items()},
        "estimator": readout.estimator, "skipped": skipped, "fingerprint": fingerprint,
        "examples_sha256": {e: infos[e]["examples_sha256"] for e in readout.concepts}, "vectors_sha256": sha,
        "cache_root": first["cache_root"],
    }
    store = storage.store()
    with store.local_for_write(STAGED_VECTORS) as path:
        from amygdala_dagster.atomic import atomic_write_bytes

        atomic_write_bytes(path, data)
    with store.local_for_write(STAGED_INFO) as path:
        atomic_write_text(path, json.dumps(info, indent=1, sort_keys=True) + "\n")
    rows = []
    for c in readout.concepts:
        row = {"emotion": c, **readout.counts[c]}
        for layer, norm in zip(readout.layers, readout.raw_norms[c]):
            row[f"raw_norm_L{layer}"] = round(float(norm), 4)
        rows.append(row)
    context.log.info(f"readout: {len(readout.concepts)} concepts x {len(readout.layers)} layers, sha256 {sha[:12]}")
    return dg.MaterializeResult(
        data_version=dg.DataVersion(sha),
        metadata={
            "n_concepts": len(readout.concepts),
            "layers": ", ".join(str(x) for x in readout.layers),
            "hidden_size": readout.hidden_size,
            "shape": f"{len(readout.layers)} x [{len(readout.concepts)}, {readout.hidden_size}]",
            "skipped": "; ".join(skipped) or "none",
            "threshold": threshold["threshold_method"] + (
                f" (target FPR {threshold['target_fpr']})" if threshold["threshold_method"] == "fixed_fpr" else ""),
            "per_emotion": table(rows),
            "vectors_sha256": sha,
            "seconds": round(time.perf_counter() - t0, 3),
            **file_meta(store, STAGED_VECTORS),
        },
    )


def load_staged_readout(storage: ArtifactStorage) -> tuple[Any, dict[str, Any]]:
    """The :class:`~amygdala_dagster.vectors.ReadoutVectors` written by ``readout_vectors`` and its info."""
    import numpy as np

    from amygdala_dagster.manifest import layer_key, read_vectors_file
    from amygdala_dagster.vectors import ReadoutVectors

    store = storage.store()
    for rel in (STAGED_VECTORS, STAGED_INFO):
        if not store.exists(rel):
            raise FileNotFoundError(f"{store.uri(rel)} does not exist: materialize readout_vectors first")
    info = json.loads(store.read_bytes(STAGED_INFO))
    with store.local_for_read(STAGED_VECTORS) as path:
        tensors, _meta, _dtype = read_vectors_file(path)
    vectors = {int(l): np.ascontiguousarray(tensors[layer_key(int(l))], dtype=np.float32) for l in info["layers"]}
    readout = ReadoutVectors(
        concepts=list(info["concepts"]), layers=[int(x) for x in info["layers"]], vectors=vectors,
        raw_norms=info["raw_norms"], counts=info["counts"],
        calibration={c: {int(k): v for k, v in cal.items()} for c, cal in info["calibration"].items()},
        estimator=info["estimator"], skipped=list(info.get("skipped", [])),
    )
    return readout, info


@dg.asset(
    group_name=GROUP,
    deps=[readout_vectors],
    code_version="1",
    kinds={"json"},
    freshness_policy=readout_freshness(),
    description=(
        "The Contract 3 pair for vLLM: vectors.safetensors + manifest.json (VLLM_READOUT_MANIFEST), "
        "written atomically; the manifest carries the vectors' SHA-256 and per-concept calibration."
    ),
)
def readout_manifest(
    context: dg.AssetExecutionContext, storage: ArtifactStorage, selection: SelectionResource
) -> dg.MaterializeResult:
    from amygdala_dagster.manifest import write_readout

    readout, info = load_staged_readout(storage)
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
    )
    manifest = write_readout(store.uri(VECTORS_FILE), store.uri(MANIFEST_FILE), readout, **fields)
    vectors_rel, manifest_rel = current_pair(store.uri(""))
    context.log.info(f"published {store.uri(vectors_rel)} and {store.uri(manifest_rel)}")
    return dg.MaterializeResult(
        data_version=dg.DataVersion(manifest["vectors_sha256"]),
        metadata={
            "concepts": ", ".join(manifest["concepts"]),
            "layers": ", ".join(str(x) for x in manifest["layers"]),
            "hidden_size": manifest["hidden_size"],
            "model": str(manifest["model"]),
            "dtype": str(manifest["dtype"]),
            "vectors_sha256": manifest["vectors_sha256"],
            **file_meta(store, vectors_rel, "vectors_"),
            **file_meta(store, manifest_rel, "manifest_"),
        },
    )
