"""Shared pieces of the asset modules: the emotion partitions, freshness, metadata helpers.

The file layout is :mod:`amygdala_dagster.workflow.layout`'s.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

import dagster as dg

from amygdala_dagster.workflow.settings import current_settings

#: The dynamic partitions of the per-emotion assets.
EMOTION_PARTITIONS = "emotion"
EMOTION = dg.DynamicPartitionsDefinition(name=EMOTION_PARTITIONS)
GROUP = "amygdala"
GPU_POOL = "gpu"
RANGE_START_TAG = "dagster/asset_partition_range_start"
RANGE_END_TAG = "dagster/asset_partition_range_end"
PARTITION_TAG = "dagster/partition"
#: The emotions a run trains and publishes (the readout takes them from here, not from the instance's
#: partitions, which a concurrent run may change) and the output it writes (one run per output at a time).
EMOTIONS_TAG = "amygdala/emotions"
OUTPUT_TAG = "amygdala/output"

def freshness_hours() -> float:
    """``$AMYGDALA_FRESHNESS_HOURS`` (default 24): how old the readout may get before it is overdue."""
    return current_settings().freshness_hours


def readout_freshness() -> dg.FreshnessPolicy:
    return dg.FreshnessPolicy.time_window(fail_window=timedelta(hours=freshness_hours()))


def combined_hash(items: Mapping[str, str]) -> str:
    """One hash over ``{name: hash}`` (order-independent)."""
    h = hashlib.sha256(b"amygdala-combined-v1\n")
    for k in sorted(items):
        h.update(f"{k}\0{items[k]}\n".encode())
    return h.hexdigest()


def json_hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None) -> dg.TableMetadataValue:
    """A TableMetadataValue from dict rows (column types inferred; None kept as null)."""
    columns = list(columns or (rows[0].keys() if rows else []))
    schema_cols = []
    for c in columns:
        sample = next((r.get(c) for r in rows if r.get(c) is not None), None)
        kind = ("bool" if isinstance(sample, bool) else "int" if isinstance(sample, int)
                else "float" if isinstance(sample, float) else "string")
        schema_cols.append(dg.TableColumn(c, kind))
    records = [dg.TableRecord({c: _cell(r.get(c)) for c in columns}) for r in rows]
    return dg.MetadataValue.table(records, schema=dg.TableSchema(columns=schema_cols))


def _cell(v: Any) -> Any:
    if isinstance(v, float):
        return float(f"{v:.4g}")  # a table is read, not recomputed: 4 significant digits
    if v is None or isinstance(v, (bool, int, str)):
        return v
    return str(v)


def emotion_partitions(instance: dg.DagsterInstance) -> list[str]:
    return list(instance.get_dynamic_partitions(EMOTION_PARTITIONS))


def run_partition_keys(context: Any) -> list[str]:
    """The emotion partitions a run targets (from its partition tags); all partitions when unpartitioned."""
    tags = context.run.tags
    keys = emotion_partitions(context.instance)
    if PARTITION_TAG in tags:
        return [tags[PARTITION_TAG]]
    if RANGE_START_TAG in tags and RANGE_END_TAG in tags:
        start, end = tags[RANGE_START_TAG], tags[RANGE_END_TAG]
        if start in keys and end in keys:
            return keys[keys.index(start): keys.index(end) + 1]
    return keys


def add_partition_metadata(context: dg.AssetExecutionContext,
                           metadata_by_partition: Mapping[str, Mapping[str, Any]]) -> None:
    """``context.add_asset_metadata(meta, partition_key=key)`` for every partition of a multi-partition step.

    Each such call checks its key against the dynamic partitions, which Dagster reads from the
    instance every time (three queries, 20-40 ms on SQLite: 4-8 s at 200 emotions); here the
    partitions are read once for all the calls.
    """
    with _dynamic_partitions_read_once(context.instance):
        for key, metadata in metadata_by_partition.items():
            context.add_asset_metadata(metadata, partition_key=key)


@contextmanager
def _dynamic_partitions_read_once(instance: Any) -> Iterator[None]:
    """Within the block, ``instance``'s dynamic-partition lookups come from one read per definition.

    Only the two public lookups of Dagster's ``DynamicPartitionsStore`` are shadowed (on this
    object, for this block); anything else keeps reading the instance.
    """
    read = instance.get_dynamic_partitions
    keys: dict[str, list[str]] = {}
    members: dict[str, set[str]] = {}

    def get_dynamic_partitions(partitions_def_name: str) -> list[str]:
        if partitions_def_name not in keys:
            keys[partitions_def_name] = list(read(partitions_def_name))
            members[partitions_def_name] = set(keys[partitions_def_name])
        return keys[partitions_def_name]

    def has_dynamic_partition(partitions_def_name: str, partition_key: str) -> bool:
        get_dynamic_partitions(partitions_def_name)
        return partition_key in members[partitions_def_name]

    instance.get_dynamic_partitions = get_dynamic_partitions
    instance.has_dynamic_partition = has_dynamic_partition
    try:
        yield
    finally:
        del instance.get_dynamic_partitions
        del instance.has_dynamic_partition


def file_meta(store: Any, rel: str, prefix: str = "") -> dict[str, Any]:
    """Path and size metadata of one stored artifact."""
    uri = store.uri(rel)
    return {
        f"{prefix}path": dg.MetadataValue.path(uri) if store.is_local else dg.MetadataValue.url(uri),
        f"{prefix}size_bytes": store.size(rel),
    }


def sorted_unique(items: Iterable[str]) -> list[str]:
    return sorted(set(items))
