"""The training-examples directory (Contract 2): writing and reading it, and the whole extraction."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from amygdala_dagster.examples.catalog import DEFAULT_CORE_NODE_TYPES, catalog_of, qualifying_emotions, sources
from amygdala_dagster.examples.selection import (
    EXAMPLE_FIELDS,
    FORMAT_VERSION,
    POLARITY_FILES,
    SPLITS,
    Example,
    ExampleSet,
    ExamplesFormatError,
    SelectionParams,
    body_rows,
    check_dir_name,
    is_number,
    select_from_rows,
)
from amygdala_dagster.files.atomic import atomic_directory, atomic_write_bytes
from amygdala_dagster.files.jsonio import jsonl_objects
from amygdala_dagster.graph.nodes import MemoryNode
from amygdala_dagster.graph.snapshot import build_snapshot, snapshot_hash
from amygdala_dagster.graph.tags import check_emotion_name

log = logging.getLogger(__name__)


def _jsonl(examples: Sequence[Example]) -> bytes:
    return "".join(e.to_json() + "\n" for e in examples).encode("utf-8")


def _files_and_hash(example_set: ExampleSet) -> tuple[dict[str, bytes], str]:
    files = {p: _jsonl(example_set.examples(p)) for p in POLARITY_FILES}
    h = hashlib.sha256(f"amygdala-examples-v1\0{example_set.emotion}\0".encode())
    for polarity, data in files.items():
        h.update(f"{polarity}\0{len(data)}\0".encode())
        h.update(data)
    return files, h.hexdigest()


def examples_hash(example_set: ExampleSet) -> str:
    """Content hash of one emotion's examples (its data version): sha256 over its JSONL files' bytes."""
    return _files_and_hash(example_set)[1]


def _emotion_entry(s: ExampleSet, digest: str) -> dict[str, Any]:
    entry: dict[str, Any] = dict(s.counts())
    entry["node_types"] = {p: s.node_type_mix(p) for p in POLARITY_FILES}
    entry["eligible_positives"] = s.n_eligible_positive
    entry["eligible_negatives"] = s.n_eligible_negative
    entry["examples_sha256"] = digest
    entry["problems"] = s.problems()
    return entry


_INDEX_FIELDS = ("format_version", "parameters", "snapshot_hash", "emotion_order", "emotions")


def _check_replaceable(path: Path) -> None:
    if not path.exists():
        return
    if not path.is_dir():
        raise ExamplesFormatError(f"{path}: exists and is not a directory")
    if any(path.iterdir()) and not (path / "index.json").is_file():
        raise ExamplesFormatError(
            f"{path}: refusing to replace a non-empty directory that holds no index.json "
            "(it does not look like an examples directory)"
        )


def write_examples_dir(
    output_dir: str | os.PathLike[str],
    example_sets: Sequence[ExampleSet],
    params: SelectionParams,
    snapshot_hash: str,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Write ``OUTPUT_DIR/<emotion>/{positive,negative}.jsonl`` and ``index.json``; return the index.

    The directory is replaced whole (built beside it, then renamed), so a crash
    never leaves a half-written directory. Output is byte-deterministic.
    """
    output_dir = Path(output_dir)
    _check_replaceable(output_dir)
    seen: set[str] = set()
    for s in example_sets:
        check_dir_name(s.emotion, str(output_dir))
        if s.emotion in seen:
            raise ExamplesFormatError(f"{output_dir}: emotion {s.emotion!r} given twice")
        seen.add(s.emotion)
    for k in extra or {}:
        if k in _INDEX_FIELDS:
            raise ValueError(f"extra index field {k!r} would overwrite a standard field")
    with atomic_directory(output_dir) as tmp:
        entries = {}
        for s in example_sets:
            files, digest = _files_and_hash(s)
            for polarity, filename in POLARITY_FILES.items():
                atomic_write_bytes(tmp / s.emotion / filename, files[polarity])
            entries[s.emotion] = _emotion_entry(s, digest)
        index: dict[str, Any] = {
            "format_version": FORMAT_VERSION,
            "parameters": params.to_dict(),
            "snapshot_hash": snapshot_hash,
            "emotion_order": [s.emotion for s in example_sets],
            "emotions": entries,
            **(extra or {}),
        }
        index_bytes = (json.dumps(index, ensure_ascii=False, sort_keys=True, indent=2) + "\n").encode("utf-8")
        # Written last: a directory with an index.json is a complete one.
        atomic_write_bytes(tmp / "index.json", index_bytes)
    written: dict[str, Any] = json.loads(index_bytes)
    return written


def _read_jsonl(path: Path) -> list[Example]:
    if not path.is_file():
        raise ExamplesFormatError(f"{path}: missing")
    out = []
    for where, obj in jsonl_objects(path, ExamplesFormatError):
        missing = [f for f in EXAMPLE_FIELDS if f not in obj]
        if missing:
            raise ExamplesFormatError(f"{where}: missing field(s) {', '.join(missing)}")
        key, text_, node_type, score, split = (obj[f] for f in EXAMPLE_FIELDS)
        if not isinstance(key, str) or not key:
            raise ExamplesFormatError(f"{where}: 'key' must be a non-empty string, got {key!r}")
        if not isinstance(text_, str) or not text_.strip():
            raise ExamplesFormatError(f"{where}: example {key!r} has an empty or non-string 'text'")
        if not isinstance(node_type, str):
            raise ExamplesFormatError(f"{where}: example {key!r}: 'node_type' must be a string")
        if score is not None and not is_number(score):
            raise ExamplesFormatError(f"{where}: example {key!r}: 'score' must be a number or null, got {score!r}")
        if split not in SPLITS:
            raise ExamplesFormatError(f"{where}: example {key!r}: 'split' must be 'train' or 'holdout', got {split!r}")
        out.append(Example(key, text_, node_type, None if score is None else float(score), split))
    return out


def read_examples_dir(path: str | os.PathLike[str]) -> tuple[dict[str, Any], dict[str, ExampleSet]]:
    """Read an examples directory: ``(index, {emotion: ExampleSet})``.

    Without an ``index.json`` (a directory written by another program) the
    emotions are the sub-directories holding ``positive.jsonl``; the index is then empty.
    """
    path = Path(path)
    if not path.is_dir():
        raise ExamplesFormatError(f"{path}: not a directory")
    index_path = path / "index.json"
    index: dict[str, Any] = {}
    if index_path.is_file():
        try:
            index = json.loads(index_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ExamplesFormatError(f"{index_path}: not valid JSON ({exc})") from None
        if not isinstance(index, dict) or not isinstance(index.get("emotions"), dict):
            raise ExamplesFormatError(f"{index_path}: expected an object with an 'emotions' object")
        names = index.get("emotion_order") or sorted(index["emotions"])
        if not isinstance(names, list) or sorted(names) != sorted(index["emotions"]):
            raise ExamplesFormatError(f"{index_path}: 'emotion_order' does not match 'emotions'")
    else:
        names = sorted(
            d.name for d in path.iterdir() if d.is_dir() and not d.name.startswith(".")
            and (d / POLARITY_FILES["positive"]).is_file()
        )
        if not names:
            raise ExamplesFormatError(f"{path}: no index.json and no <emotion>/positive.jsonl inside")
        log.warning("%s: no index.json; found emotions %s", path, ", ".join(names))
    sets: dict[str, ExampleSet] = {}
    for name in names:
        if not isinstance(name, str):
            raise ExamplesFormatError(f"{index_path}: emotion name {name!r} is not a string")
        check_dir_name(name, str(index_path))
        pos = _read_jsonl(path / name / POLARITY_FILES["positive"])
        neg = _read_jsonl(path / name / POLARITY_FILES["negative"])
        entry = index.get("emotions", {}).get(name) or {}
        for label, items, filename in (("positives", pos, "positive"), ("negatives", neg, "negative")):
            expected = entry.get(label)
            if expected is not None and expected != len(items):
                raise ExamplesFormatError(
                    f"{path / name / POLARITY_FILES[filename]}: holds {len(items)} examples, "
                    f"index.json says {expected}"
                )
        sets[name] = ExampleSet(
            name, pos, neg,
            n_eligible_positive=entry.get("eligible_positives"),
            n_eligible_negative=entry.get("eligible_negatives"),
        )
    return index, sets


def run_extraction(
    nodes: Iterable[MemoryNode],
    output_dir: str | os.PathLike[str],
    params: SelectionParams | None = None,
    *,
    emotions: Sequence[str] | None = None,
    min_positives: int = 10,
    max_emotions: int = 200,
    core_node_types: Sequence[str] = DEFAULT_CORE_NODE_TYPES,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Nodes -> snapshot -> catalog -> examples directory (what ``extract_training_pairs`` does).

    ``emotions`` are curated names, always included besides the data-driven
    choice, and ``core_node_types`` the node types whose emotions are candidates
    beside the most-tagged ones (see :mod:`amygdala_dagster.examples.catalog`).
    Returns the written index.
    """
    params = params or SelectionParams()
    snapshot = build_snapshot(nodes)
    rows = body_rows(snapshot)
    catalog, eligible = catalog_of(rows, params, min_positives, max_emotions, emotions or (), core_node_types)
    sets = [select_from_rows(rows, e, params, eligible[e]) for e in qualifying_emotions(catalog)]
    n_tagged = int((snapshot["scores"].list.len() > 0).sum())  # nodes, not distinct bodies
    info: dict[str, Any] = {
        "emotion_selection": {
            "min_positives": min_positives,
            "max_emotions": max_emotions,
            "curated": list(dict.fromkeys(check_emotion_name(n) for n in emotions or ())),
            "core_node_types": list(core_node_types),
            "emotions_seen": catalog.height,
            "emotions_qualifying": len(sets),
            "sources": {e: src for e, src in sources(catalog).items() if e in qualifying_emotions(catalog)},
        },
        "snapshot": {
            "nodes": snapshot.height,
            "tagged_nodes": n_tagged,
            "malformed_tag_tokens": int(snapshot["n_malformed"].sum() or 0),
        },
    }
    info.update(extra or {})
    return write_examples_dir(output_dir, sets, params, snapshot_hash(snapshot), extra=info)
