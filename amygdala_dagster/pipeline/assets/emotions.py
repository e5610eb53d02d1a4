"""Which emotions qualify (the catalog) and each emotion's training examples."""


import json
import time

import dagster as dg
import polars as pl

from amygdala_dagster.examples.catalog import SOURCES, cooccurrence, qualifying_emotions
from amygdala_dagster.examples.directory import read_examples_dir, write_examples_dir
from amygdala_dagster.examples.selection import ExampleSet, select_all
from amygdala_dagster.files.atomic import atomic_write_text
from amygdala_dagster.graph.snapshot import snapshot_hash
from amygdala_dagster.pipeline.assets.common import (
    EMOTION,
    EMOTION_PARTITIONS,
    GROUP,
    add_partition_metadata,
    combined_hash,
    emotion_partitions,
    file_meta,
    json_hash,
    table,
)
from amygdala_dagster.pipeline.assets.graph import memory_snapshot, read_snapshot_from
from amygdala_dagster.pipeline.checks import EXAMPLES_CHECKS, check_result, examples_problems, min_positives_problems
from amygdala_dagster.pipeline.resources import ArtifactStorage, SelectionResource
from amygdala_dagster.workflow.layout import CATALOG_FILE, COOCCURRENCE_FILE, examples_dir

#: Up to this many emotions in a step, each gets its own log line.
_LOGGED_EMOTIONS = 20


@dg.asset(
    group_name=GROUP,
    deps=[memory_snapshot],
    code_version="1",
    kinds={"polars", "parquet"},
    description=(
        "Per-emotion counts (tagged, eligible positives/negatives), rank, co-occurrence and which "
        "emotions qualify, with where each comes from (source: tags, core/pattern nodes, both, curated). "
        "Newly qualifying emotions are registered as `emotion` partitions."
    ),
)
def emotion_catalog(
    context: dg.AssetExecutionContext, selection: SelectionResource, storage: ArtifactStorage
) -> dg.MaterializeResult:
    t0 = time.perf_counter()
    snapshot = read_snapshot_from(storage)
    catalog = selection.catalog(snapshot)
    qualifying = qualifying_emotions(catalog)
    names, corr = cooccurrence(snapshot, qualifying)
    store = storage.store()
    with store.local_for_write(CATALOG_FILE) as path:
        path.parent.mkdir(parents=True, exist_ok=True)
        catalog.write_parquet(path)
    cooc = {"emotions": names, "pearson": [[round(float(x), 6) for x in row] for row in corr]}
    with store.local_for_write(COOCCURRENCE_FILE) as path:
        atomic_write_text(path, json.dumps(cooc, indent=1) + "\n")
    existing = set(emotion_partitions(context.instance))
    new = [e for e in qualifying if e not in existing]
    if new:
        context.instance.add_dynamic_partitions(EMOTION_PARTITIONS, new)
        context.log.info(f"new emotion partitions: {', '.join(new)}")
    rows = catalog.sort("rank").to_dicts()
    pairs = sorted(
        ((names[i], names[j], float(corr[i, j])) for i in range(len(names)) for j in range(i + 1, len(names))),
        key=lambda t: -t[2],
    )[:10]
    context.log.info(f"catalog: {catalog.height} emotions, {len(qualifying)} qualify: {', '.join(qualifying)}")
    return dg.MaterializeResult(
        data_version=dg.DataVersion(json_hash({"catalog": rows, "cooccurrence": cooc})),
        metadata={
            "dagster/row_count": catalog.height,
            "n_qualifying": len(qualifying),
            "qualifying": ", ".join(qualifying),
            "new_partitions": ", ".join(new) or "none",
            "emotions": table(rows, ["rank", "emotion", "source", "n_tagged", "n_core", "n_positive", "n_negative",
                                     "mean_score", "qualifies"]),
            "sources": ", ".join(f"{src}: {sum(1 for r in rows if r['source'] == src and r['qualifies'])}"
                                 for src in SOURCES),
            "top_cooccurrence": dg.MetadataValue.md(
                "| a | b | pearson |\n|---|---|---|\n" + "".join(f"| {a} | {b} | {r:.2f} |\n" for a, b, r in pairs)
            ),
            "parameters": selection.params().to_dict() | {
                "min_positives": selection.min_positives, "max_emotions": selection.max_emotions,
                "curated": list(selection.curated), "core_node_types": list(selection.core_node_types),
            },
            "seconds": round(time.perf_counter() - t0, 3),
            **file_meta(store, CATALOG_FILE),
        },
    )


def read_catalog_from(storage: ArtifactStorage) -> pl.DataFrame:
    store = storage.store()
    if not store.exists(CATALOG_FILE):
        raise FileNotFoundError(f"{store.uri(CATALOG_FILE)} does not exist: materialize emotion_catalog first")
    with store.local_for_read(CATALOG_FILE) as path:
        return pl.read_parquet(path)


@dg.asset(
    group_name=GROUP,
    deps=[memory_snapshot, emotion_catalog],
    partitions_def=EMOTION,
    backfill_policy=dg.BackfillPolicy.single_run(),
    code_version="1",
    kinds={"json"},
    check_specs=EXAMPLES_CHECKS,
    description=(
        "Positives, negatives and the train/holdout split of one emotion (Contract 2 directory "
        "`examples/<emotion>/`). Data version = content hash of the examples."
    ),
)
def tagged_examples(
    context: dg.AssetExecutionContext, selection: SelectionResource, storage: ArtifactStorage
) -> dg.MaterializeResult:
    t0 = time.perf_counter()
    snapshot = read_snapshot_from(storage)
    snap_hash = snapshot_hash(snapshot)
    params = selection.params()
    store = storage.store()
    hashes: dict[str, str] = {}
    rows = []
    partition_metadata: dict[str, dict] = {}
    clean: list[str] = []
    enough: list[str] = []
    for emotion, example_set in select_all(snapshot, context.partition_keys, params).items():
        clean += examples_problems(example_set)
        enough += min_positives_problems(example_set, int(selection.min_positives))
        rel = examples_dir(emotion)
        with store.local_for_write(rel) as path:
            index = write_examples_dir(path, [example_set], params, snap_hash)
        digest = index["emotions"][emotion]["examples_sha256"]
        hashes[emotion] = digest
        counts = example_set.counts()
        row = {"emotion": emotion, **counts, "examples_sha256": digest[:16],
               "problems": "; ".join(example_set.problems()) or ""}
        rows.append(row)
        partition_metadata[emotion] = {
            **counts,
            "examples_sha256": digest,
            "node_types_positive": example_set.node_type_mix("positive"),
            "node_types_negative": example_set.node_type_mix("negative"),
            **file_meta(store, rel),
        }
        if len(hashes) <= _LOGGED_EMOTIONS:
            context.log.info(
                f"{emotion}: {counts['positives']} positives, {counts['negatives']} negatives "
                f"({counts['holdout_positives']}/{counts['holdout_negatives']} held out)"
            )
    add_partition_metadata(context, partition_metadata)
    if len(hashes) > _LOGGED_EMOTIONS:
        # One line, not one per emotion: each is a stored Dagster event (~50 ms on SQLite); the
        # per-emotion counts are in the step's emotions_in_step table and each partition's metadata.
        pos = sorted(r["positives"] for r in rows)
        context.log.info(f"{len(rows)} emotions: {pos[0]}-{pos[-1]} positives (median {pos[len(pos) // 2]}); "
                         f"counts per emotion in the emotions_in_step metadata")
    # One step may cover several partitions and Dagster records one data version per step:
    # with a single partition it is that emotion's examples hash, else a hash over the step's emotions
    # (each partition's own hash is in its metadata as examples_sha256).
    version = next(iter(hashes.values())) if len(hashes) == 1 else combined_hash(hashes)
    checked = {"emotions_checked": ", ".join(hashes)}
    return dg.MaterializeResult(
        data_version=dg.DataVersion(version),
        check_results=[
            check_result(EXAMPLES_CHECKS[0].name, clean, metadata=checked),
            check_result(EXAMPLES_CHECKS[1].name, enough,
                         metadata={**checked, "minimum": int(selection.min_positives)}),
        ],
        metadata={
            "emotions_in_step": table(rows),
            "snapshot_sha256": snap_hash,
            "seconds": round(time.perf_counter() - t0, 3),
        },
    )


def read_examples_from(storage: ArtifactStorage, emotion: str) -> tuple[dict, ExampleSet]:
    """``(index, ExampleSet)`` of one emotion."""
    store = storage.store()
    rel = examples_dir(emotion)
    if not store.exists(f"{rel}/index.json"):
        raise FileNotFoundError(
            f"{store.uri(rel)} does not exist: materialize tagged_examples for partition {emotion!r} first"
        )
    with store.local_for_read(rel) as path:
        index, sets = read_examples_dir(path)
    if emotion not in sets:
        raise ValueError(f"{store.uri(rel)}: holds no examples for {emotion!r}")
    return index, sets[emotion]
