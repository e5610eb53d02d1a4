"""What is staged between steps and the rules that decide whether it is current.

The per-emotion statistics' info (what ``activation_stats`` computed them from) and the staged readout
(the trained matrix between ``readout_vectors`` and ``readout_manifest``), with the drift against the
previous readout.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from amygdala_dagster.engine.cache import fingerprint_id
from amygdala_dagster.examples.directory import examples_hash
from amygdala_dagster.examples.selection import ExampleSet
from amygdala_dagster.readout.manifest import layer_key, read_vectors_file
from amygdala_dagster.readout.vectors import EmotionStats, TrainedReadout


# ----------------------------------------------------------------------------- statistics and staleness
def stats_info(example_set: ExampleSet, stats: EmotionStats, fingerprint: Mapping[str, Any],
               cache_root: str | os.PathLike[str], stats_sha256: str) -> dict[str, Any]:
    """The JSON written beside one emotion's statistics: what they were computed from."""
    return {
        "emotion": example_set.emotion,
        "examples_sha256": examples_hash(example_set),
        "layers": [int(x) for x in stats.layers],
        "pos_n": int(stats.pos_n),
        "neg_n": int(stats.neg_n),
        "fingerprint": dict(fingerprint),
        "fingerprint_id": fingerprint_id(fingerprint),
        "cache_root": str(cache_root),
        "stats_sha256": stats_sha256,
    }


class StaleInputError(ValueError):
    """Stored intermediate results that do not belong together; the message says what to rematerialise."""


def check_stats_current(infos: Mapping[str, Mapping[str, Any]], sets: Mapping[str, ExampleSet]) -> dict[str, Any]:
    """The shared ``{fingerprint, layers, cache_root}`` of per-emotion statistics, if they are current.

    Current: each emotion's statistics were computed from its examples as they
    are now, and all of them under one activation fingerprint.
    """
    stale = [e for e in infos if infos[e]["examples_sha256"] != examples_hash(sets[e])]
    if stale:
        raise StaleInputError(
            f"activation_stats is older than tagged_examples for {', '.join(stale)}: "
            "materialize activation_stats for those partitions first"
        )
    ids = {e: fingerprint_id(info["fingerprint"]) for e, info in infos.items()}
    if len(set(ids.values())) > 1:
        by = {e: i[:12] for e, i in ids.items()}
        raise StaleInputError(f"emotion statistics come from different models/settings ({by}); "
                              "rematerialize activation_stats")
    first = next(iter(infos.values()))
    return {"fingerprint": first["fingerprint"], "layers": [int(x) for x in first["layers"]],
            "cache_root": first["cache_root"]}


# ----------------------------------------------------------------------------- staged readout
def staged_info(readout: TrainedReadout, *, vectors_sha256: str, fingerprint: Mapping[str, Any],
                examples_sha256: Mapping[str, str], cache_root: str) -> dict[str, Any]:
    """The JSON beside the staged vectors: everything the manifest and the report need besides the matrix."""
    return {
        "concepts": readout.concepts, "layers": readout.layers, "hidden_size": readout.hidden_size,
        "raw_norms": readout.raw_norms, "counts": readout.counts,
        "calibration": {c: {str(k): v for k, v in cal.items()} for c, cal in readout.calibration.items()},
        "estimator": readout.estimator, "skipped": readout.skipped, "fingerprint": dict(fingerprint),
        "examples_sha256": {e: examples_sha256[e] for e in readout.concepts}, "vectors_sha256": vectors_sha256,
        "cache_root": cache_root,
    }


def encode_staged_info(info: Mapping[str, Any]) -> str:
    return json.dumps(info, indent=1, sort_keys=True) + "\n"


def read_staged_readout(vectors_path: str | os.PathLike[str], info: Mapping[str, Any]) -> TrainedReadout:
    """The :class:`TrainedReadout` from the staged vectors file and its info."""
    tensors, _meta, _dtype = read_vectors_file(vectors_path)
    vectors = {int(layer): np.ascontiguousarray(tensors[layer_key(int(layer))], dtype=np.float32)
               for layer in info["layers"]}
    return TrainedReadout(
        concepts=list(info["concepts"]), layers=[int(x) for x in info["layers"]], vectors=vectors,
        raw_norms=info["raw_norms"], counts=info["counts"],
        calibration={c: {int(k): v for k, v in cal.items()} for c, cal in info["calibration"].items()},
        estimator=info["estimator"], skipped=list(info.get("skipped", [])),
    )


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def drift_cosines(previous: TrainedReadout | None, current: TrainedReadout) -> dict[str, float]:
    """Per concept in both: the lowest cosine, over the shared layers, between its new and previous vector.

    1.0 = unchanged direction; a graph change that moves a direction shows here.
    """
    if previous is None:
        return {}
    shared = [layer for layer in current.layers if layer in previous.layers]
    out = {}
    for concept in current.concepts:
        if concept not in previous.concepts or not shared:
            continue
        i, j = current.concepts.index(concept), previous.concepts.index(concept)
        cosines = []
        for layer in shared:
            a = current.vectors[layer][i].astype(np.float64)
            b = previous.vectors[layer][j].astype(np.float64)
            if a.shape != b.shape:
                break
            cosines.append(float(a @ b / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-12)))
        if cosines:
            out[concept] = round(min(cosines), 6)
    return out
