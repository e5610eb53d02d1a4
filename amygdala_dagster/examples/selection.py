"""Training-example selection (Contract 2): which nodes are positives and negatives per emotion.

Works on the snapshot table of :mod:`amygdala_dagster.graph.snapshot`. The rules:

- positive: the emotion's score >= ``min_positive_score``;
- negative: the node has at least one valid tag and mentions the emotion at
  most ``max_negative_mentions`` times (a tag for it at any score counts one,
  each whole-word occurrence of its name in the body counts one);
- both: ``len(body) >= min_content_chars``; identical bodies (after trimming)
  count once: their copies' tags merge like several agents' lines (maximum score
  per emotion, a tag on any copy is a mention) and the smallest key stands for
  the body;
- at most ``max_examples_per_emotion`` of each. Below the cap all eligible
  examples are kept; above it the ones with the lowest ``sha256(salt, emotion,
  key)`` rank, so adding nodes displaces at most one earlier choice per new
  node. Kept negatives follow the kept positives' node-type mix as far as the
  graph allows;
- the train/holdout split depends on the key alone (same node, same split for
  every emotion), from a hash salted differently from the cap ranking.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import os
import re
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import polars as pl

from amygdala_dagster.files.atomic import atomic_directory, atomic_write_bytes
from amygdala_dagster.files.jsonio import jsonl_objects
from amygdala_dagster.graph.nodes import MemoryNode
from amygdala_dagster.graph.snapshot import build_snapshot, snapshot_hash
from amygdala_dagster.graph.tags import check_emotion_name, fold_text

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
SPLIT_SALT = "amygdala-split-v1"
RANK_SALT = "amygdala-cap-rank-v1"
POLARITY_FILES = {"positive": "positive.jsonl", "negative": "negative.jsonl"}
SPLITS = ("train", "holdout")
_EXAMPLE_FIELDS = ("key", "text", "node_type", "score", "split")

Split = Literal["train", "holdout"]


class ExamplesFormatError(ValueError):
    """An examples directory (or a file in it) that cannot be read or written."""


# --------------------------------------------------------------------------- parameters


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def training_problems(emotion: str, pos_n: int, neg_n: int, split: str = "train") -> list[str]:
    """Why an emotion with ``pos_n`` positives and ``neg_n`` negatives in ``split`` cannot give a direction.

    The one rule every path uses (example sets, the seed script, the readout): empty when it can.
    """
    missing = " and ".join(w for w, n in (("positive", pos_n), ("negative", neg_n)) if n == 0)
    if not missing:
        return []
    return [f"emotion {emotion!r}: no {missing} examples in the {split} split "
            f"({pos_n} positives, {neg_n} negatives)"]


@dataclass(frozen=True)
class SelectionParams:
    """The knobs of example selection; defaults are the seed design's."""

    min_positive_score: float = 8.0
    max_negative_mentions: int = 0
    min_content_chars: int = 40
    max_examples_per_emotion: int = 500
    holdout_fraction: float = 0.2

    def __post_init__(self) -> None:
        if not _is_number(self.min_positive_score) or not 0 <= self.min_positive_score <= 10:
            raise ValueError(
                f"min_positive_score must be a number from 0 to 10, got {self.min_positive_score!r}"
            )
        if not _is_int(self.max_negative_mentions) or self.max_negative_mentions < 0:
            raise ValueError(
                f"max_negative_mentions must be an integer >= 0, got {self.max_negative_mentions!r}"
            )
        if not _is_int(self.min_content_chars) or self.min_content_chars < 0:
            raise ValueError(f"min_content_chars must be an integer >= 0, got {self.min_content_chars!r}")
        if not _is_int(self.max_examples_per_emotion) or self.max_examples_per_emotion < 1:
            raise ValueError(
                f"max_examples_per_emotion must be an integer >= 1, got {self.max_examples_per_emotion!r}"
            )
        if not _is_number(self.holdout_fraction) or not 0 <= self.holdout_fraction < 1:
            raise ValueError(f"holdout_fraction must be in [0, 1), got {self.holdout_fraction!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SelectionParams:
        known = {f: data[f] for f in cls.__dataclass_fields__ if f in data}
        return cls(**known)


# --------------------------------------------------------------------------- examples


@dataclass(frozen=True)
class Example:
    key: str
    text: str
    node_type: str
    score: float | None
    split: str

    def to_json(self) -> str:
        """One JSONL line (without newline), byte-deterministic."""
        return json.dumps(
            {f: getattr(self, f) for f in _EXAMPLE_FIELDS}, ensure_ascii=False, sort_keys=True
        )


@dataclass(frozen=True)
class ExampleSet:
    """One emotion's kept positives and negatives, each sorted by key.

    ``n_eligible_*`` are the counts before the cap (None when unknown, e.g. read
    from a directory written by another program).
    """

    emotion: str
    positives: list[Example]
    negatives: list[Example]
    n_eligible_positive: int | None = field(default=None, compare=False)
    n_eligible_negative: int | None = field(default=None, compare=False)

    def examples(self, polarity: str, split: str | None = None) -> list[Example]:
        """The positives or negatives, optionally only those of one split."""
        if polarity not in POLARITY_FILES:
            raise ValueError(f"polarity must be 'positive' or 'negative', got {polarity!r}")
        items = self.positives if polarity == "positive" else self.negatives
        if split is None:
            return list(items)
        if split not in SPLITS:
            raise ValueError(f"split must be 'train' or 'holdout', got {split!r}")
        return [e for e in items if e.split == split]

    @property
    def train_positives(self) -> list[Example]:
        return self.examples("positive", "train")

    @property
    def holdout_positives(self) -> list[Example]:
        return self.examples("positive", "holdout")

    @property
    def train_negatives(self) -> list[Example]:
        return self.examples("negative", "train")

    @property
    def holdout_negatives(self) -> list[Example]:
        return self.examples("negative", "holdout")

    def counts(self) -> dict[str, int]:
        out = {"positives": len(self.positives), "negatives": len(self.negatives)}
        for pol, items in (("positives", self.positives), ("negatives", self.negatives)):
            for split in SPLITS:
                out[f"{split}_{pol}"] = sum(1 for e in items if e.split == split)
        return out

    def node_type_mix(self, polarity: str) -> dict[str, int]:
        """Node type -> number of kept examples of that polarity, sorted by type."""
        return dict(sorted(Counter(e.node_type for e in self.examples(polarity)).items()))

    def problems(self) -> list[str]:
        """Why this set cannot train a direction (empty when it can): :func:`training_problems`."""
        counts = self.counts()
        return training_problems(self.emotion, counts["train_positives"], counts["train_negatives"])


def split_for_key(key: str, holdout_fraction: float) -> Split:
    """``"holdout"`` for about ``holdout_fraction`` of keys, decided by the key alone."""
    if not _is_number(holdout_fraction) or not 0 <= holdout_fraction < 1:
        raise ValueError(f"holdout_fraction must be in [0, 1), got {holdout_fraction!r}")
    return "holdout" if _split_point(key) < holdout_fraction else "train"


@functools.lru_cache(maxsize=1 << 16)
def _split_point(key: str) -> float:
    """A key's uniform point in [0, 1): the same for every emotion, so computed once per key."""
    digest = hashlib.sha256(f"{SPLIT_SALT}\0{key}".encode("utf-8", "surrogatepass")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def _ranker(emotion: str) -> Callable[[_Row], tuple[bytes, str]]:
    """The cap's sort key for one emotion: ``(sha256(salt, emotion, key), key)``.

    The salted prefix is hashed once per emotion and copied per row (same digest, a third of the time).
    """
    prefix = hashlib.sha256(f"{RANK_SALT}\0{emotion}\0".encode("utf-8", "surrogatepass"))

    def rank(row: _Row) -> tuple[bytes, str]:
        h = prefix.copy()
        h.update(row.key.encode("utf-8", "surrogatepass"))
        return h.digest(), row.key

    return rank


# --------------------------------------------------------------------------- mentions


@functools.lru_cache(maxsize=4096)
def _mention_regex(emotion: str) -> tuple[str, re.Pattern[str]]:
    """(literal that every match contains, pattern over folded text) for a normalised name.

    Whole word = not preceded or followed by a letter, digit or ``_``; a ``-`` or
    ``_`` inside the name also matches a space or the other separator, so
    ``self-doubt`` is mentioned by "self doubt" and "self_doubt".
    """
    parts = [p for p in re.split(r"[-_]+", emotion) if p]
    if not parts:
        return "", re.compile(r"(?!)")
    core = r"[-_\s]+".join(re.escape(p) for p in parts)
    return parts[0], re.compile(rf"(?<!\w){core}(?!\w)")


def _body_mentions(folded_body: str, emotion: str) -> int:
    literal, pattern = _mention_regex(emotion)
    if not literal or literal not in folded_body:
        return 0
    return len(pattern.findall(folded_body))


def mention_count(body: str, scores: Mapping[str, float], emotion: str) -> int:
    """How often a node mentions ``emotion``: 1 for a tag (any score) + whole-word occurrences in the body.

    The body is folded like names (:func:`~amygdala_dagster.graph.tags.fold_text`), so "Straße" mentions ``strasse``.
    """
    emotion = check_emotion_name(emotion)
    return (1 if emotion in scores else 0) + _body_mentions(fold_text(body), emotion)


# --------------------------------------------------------------------------- selection


@dataclass(frozen=True)
class _Row:
    key: str
    node_type: str
    body: str
    folded: str
    scores: dict[str, float]


_REQUIRED_COLUMNS = ("key", "node_type", "body", "scores")


def _rows(snapshot: pl.DataFrame) -> list[_Row]:
    """One row per distinct body (trimmed), sorted by key.

    Copies of a body merge their tags as several agents' lines do (the maximum
    score per emotion, so a tag on any copy is a mention); the smallest key, and
    its node type, stand for the body.
    """
    missing = [c for c in _REQUIRED_COLUMNS if c not in snapshot.columns]
    if missing:
        raise ValueError(f"not a memory snapshot table: missing column(s) {', '.join(missing)}")
    by_body: dict[str, _Row] = {}
    for key, node_type, body, scores in sorted(
        zip(
            snapshot["key"].to_list(),
            snapshot["node_type"].to_list(),
            snapshot["body"].to_list(),
            snapshot["scores"].to_list(),
        ),
        key=lambda t: t[0],
    ):
        body = (body or "").strip()
        tags = {s["emotion"]: float(s["score"]) for s in scores or ()}
        first = by_body.get(body)
        if first is None:
            by_body[body] = _Row(key=key, node_type=node_type or "unknown", body=body, folded=fold_text(body), scores=tags)
            continue
        for emotion, score in tags.items():
            if score > first.scores.get(emotion, -1.0):
                first.scores[emotion] = score
    return sorted(by_body.values(), key=lambda r: r.key)


def _eligible(rows: Sequence[_Row], emotion: str, params: SelectionParams) -> tuple[list[_Row], list[_Row]]:
    """All eligible positives and negatives (one per body, sorted by key), before the cap."""
    positives: list[_Row] = []
    negatives: list[_Row] = []
    limit = params.max_negative_mentions
    for r in rows:  # one row per body (see _rows), so a body is a positive or a negative, never both
        if len(r.body) < params.min_content_chars:
            continue
        score = r.scores.get(emotion)
        if score is not None and score >= params.min_positive_score:
            positives.append(r)
            continue
        if not r.scores:
            continue
        tagged = 0 if score is None else 1
        if tagged <= limit and tagged + _body_mentions(r.folded, emotion) <= limit:
            negatives.append(r)
    return positives, negatives


def _quotas(mix: Counter[str], total: int) -> dict[str, int]:
    """Split ``total`` across types in proportion to ``mix`` (largest remainder, ties by type name)."""
    n = sum(mix.values())
    if n == 0:
        return {}
    quotas = {t: (total * c) // n for t, c in mix.items()}
    leftover = total - sum(quotas.values())
    by_remainder = sorted(mix, key=lambda t: (-((total * mix[t]) % n), t))
    for t in by_remainder[:leftover]:
        quotas[t] += 1
    return quotas


def _cap(items: list[_Row], emotion: str, cap: int) -> list[_Row]:
    if len(items) <= cap:
        return items
    return sorted(items, key=_ranker(emotion))[:cap]


def _cap_negatives(items: list[_Row], emotion: str, cap: int, positives: Sequence[_Row]) -> list[_Row]:
    if len(items) <= cap:
        return items
    ranked = sorted(items, key=_ranker(emotion))
    quotas = _quotas(Counter(r.node_type for r in positives), cap)
    taken: Counter[str] = Counter()
    kept: set[str] = set()
    for r in ranked:
        if taken[r.node_type] < quotas.get(r.node_type, 0):
            taken[r.node_type] += 1
            kept.add(r.key)
    # Types the graph cannot fill: the shortfall goes to the best-ranked of the rest.
    for r in ranked:
        if len(kept) >= cap:
            break
        kept.add(r.key)
    return [r for r in ranked if r.key in kept]


def _to_examples(rows: Iterable[_Row], emotion: str, params: SelectionParams) -> list[Example]:
    return sorted(
        (
            Example(
                key=r.key,
                text=r.body,
                node_type=r.node_type,
                score=r.scores.get(emotion),
                split=split_for_key(r.key, params.holdout_fraction),
            )
            for r in rows
        ),
        key=lambda e: e.key,
    )


def _select(
    rows: Sequence[_Row],
    emotion: str,
    params: SelectionParams,
    eligible: tuple[list[_Row], list[_Row]] | None = None,
) -> ExampleSet:
    positives, negatives = eligible or _eligible(rows, emotion, params)
    kept_pos = _cap(positives, emotion, params.max_examples_per_emotion)
    kept_neg = _cap_negatives(negatives, emotion, params.max_examples_per_emotion, kept_pos)
    return ExampleSet(
        emotion=emotion,
        positives=_to_examples(kept_pos, emotion, params),
        negatives=_to_examples(kept_neg, emotion, params),
        n_eligible_positive=len(positives),
        n_eligible_negative=len(negatives),
    )


def holdout_texts(snapshot: pl.DataFrame, params: SelectionParams | None = None) -> list[tuple[str, str]]:
    """``(key, text)`` of every body that can be a held-out example of some emotion: at least one valid
    tag and ``min_content_chars``, in the holdout split (one per distinct body, the key that stands for
    it). Each emotion's held-out negatives are among these."""
    params = params or SelectionParams()
    return [(r.key, r.body) for r in _rows(snapshot)
            if r.scores and len(r.body) >= params.min_content_chars
            and split_for_key(r.key, params.holdout_fraction) == "holdout"]


def select_examples(snapshot: pl.DataFrame, emotion: str, params: SelectionParams | None = None) -> ExampleSet:
    """The positives and negatives for one emotion (Contract 2), each list sorted by key."""
    return select_all(snapshot, [emotion], params)[emotion]


def select_all(
    snapshot: pl.DataFrame, emotions: Sequence[str], params: SelectionParams | None = None
) -> dict[str, ExampleSet]:
    """:func:`select_examples` for several emotions, reading the snapshot once."""
    params = params or SelectionParams()
    rows = _rows(snapshot)
    return {e: _select(rows, e, params) for e in (check_emotion_name(n) for n in emotions)}


def _check_dir_name(name: str, where: str) -> None:
    """A directory may be named only by a normalised emotion name (Contract 1): safe on every filesystem."""
    try:
        normalized = check_emotion_name(name)
    except ValueError as exc:
        raise ExamplesFormatError(f"{where}: {exc}") from None
    if normalized != name:
        raise ExamplesFormatError(
            f"{where}: emotion name {name!r} is not in normal form (Contract 1 makes it {normalized!r})"
        )


# --------------------------------------------------------------------------- catalog


CATALOG_SCHEMA: dict[str, pl.DataType] = {
    "emotion": pl.Utf8,
    "n_tagged": pl.Int64,
    "n_positive": pl.Int64,
    "n_negative": pl.Int64,
    "mean_score": pl.Float64,
    "qualifies": pl.Boolean,
    "curated": pl.Boolean,
    "rank": pl.Int64,
}


def emotion_catalog(
    snapshot: pl.DataFrame,
    params: SelectionParams | None = None,
    *,
    min_positives: int = 10,
    max_emotions: int = 200,
    curated: Sequence[str] = (),
) -> pl.DataFrame:
    """One row per emotion seen in any tag (plus curated names), sorted by rank.

    ``n_positive``/``n_negative`` count eligible examples after the rules, before
    the cap. Rank 1 has the most positives (then most tags, then name). Curated
    names always qualify; the other emotions qualify with ``n_positive >=
    min_positives``, best-ranked first, until ``max_emotions`` emotions qualify.
    """
    params = params or SelectionParams()
    return _catalog(_rows(snapshot), params, min_positives, max_emotions, curated)[0]


def _catalog(
    rows: Sequence[_Row], params: SelectionParams, min_positives: int, max_emotions: int, curated: Sequence[str]
) -> tuple[pl.DataFrame, dict[str, tuple[list[_Row], list[_Row]]]]:
    """The catalog and, per emotion, its eligible (positives, negatives)."""
    if not _is_int(min_positives) or min_positives < 0:
        raise ValueError(f"min_positives must be an integer >= 0, got {min_positives!r}")
    if not _is_int(max_emotions) or max_emotions < 0:
        raise ValueError(f"max_emotions must be an integer >= 0, got {max_emotions!r}")
    if isinstance(curated, str):
        raise ValueError(f"curated must be a sequence of emotion names, not the string {curated!r}")
    curated_names = list(dict.fromkeys(check_emotion_name(n) for n in curated))
    tag_scores: dict[str, list[float]] = {}
    for r in rows:
        for e, s in r.scores.items():
            tag_scores.setdefault(e, []).append(s)
    absent = [n for n in curated_names if n not in tag_scores]
    if absent:
        log.warning("curated emotion(s) not tagged on any node of the graph: %s", ", ".join(absent))
    records = []
    eligible = {}
    for e in sorted(set(tag_scores) | set(curated_names)):
        pos, neg = eligible[e] = _eligible(rows, e, params)
        scores = tag_scores.get(e, [])
        records.append(
            {
                "emotion": e,
                "n_tagged": len(scores),
                "n_positive": len(pos),
                "n_negative": len(neg),
                "mean_score": sum(scores) / len(scores) if scores else None,
                "curated": e in curated_names,
            }
        )
    records.sort(key=lambda r: (-r["n_positive"], -r["n_tagged"], r["emotion"]))
    slots = max(0, max_emotions - len(curated_names))
    for rank, rec in enumerate(records, 1):
        rec["rank"] = rank
        qualifies = rec["curated"]
        if not qualifies and slots > 0 and rec["n_positive"] >= min_positives:
            qualifies = True
            slots -= 1
        rec["qualifies"] = qualifies
    return pl.DataFrame(records, schema=CATALOG_SCHEMA), eligible


def qualifying_emotions(catalog: pl.DataFrame) -> list[str]:
    """The emotions of a catalog that qualify, in rank order."""
    return catalog.filter(pl.col("qualifies")).sort("rank")["emotion"].to_list()


def cooccurrence(snapshot: pl.DataFrame, emotions: Sequence[str]) -> tuple[list[str], np.ndarray]:
    """Pearson correlation of the emotions' scores across tagged nodes (a missing tag counts 0).

    Only nodes with at least one valid tag take part (untagged nodes carry no
    label). An emotion whose scores are constant correlates 0 with the others
    (1 with itself).
    """
    names = list(emotions)
    rows = [r for r in _rows(snapshot) if r.scores]
    k = len(names)
    if k == 0:
        return names, np.zeros((0, 0))
    x = np.array([[r.scores.get(e, 0.0) for e in names] for r in rows], dtype=np.float64).reshape(len(rows), k)
    corr = np.eye(k)
    if len(rows) >= 2:
        xc = x - x.mean(axis=0)
        norms = np.sqrt((xc**2).sum(axis=0))
        ok = norms > 1e-12
        cov = xc.T @ xc
        denom = np.outer(np.where(ok, norms, 1.0), np.where(ok, norms, 1.0))
        corr = np.where(np.outer(ok, ok), cov / denom, 0.0)
        corr = np.clip(corr, -1.0, 1.0)
        np.fill_diagonal(corr, 1.0)
    return names, corr


# --------------------------------------------------------------------------- files


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
        _check_dir_name(s.emotion, str(output_dir))
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
    return json.loads(index_bytes)


def _read_jsonl(path: Path) -> list[Example]:
    if not path.is_file():
        raise ExamplesFormatError(f"{path}: missing")
    out = []
    for where, obj in jsonl_objects(path, ExamplesFormatError):
        missing = [f for f in _EXAMPLE_FIELDS if f not in obj]
        if missing:
            raise ExamplesFormatError(f"{where}: missing field(s) {', '.join(missing)}")
        key, text_, node_type, score, split = (obj[f] for f in _EXAMPLE_FIELDS)
        if not isinstance(key, str) or not key:
            raise ExamplesFormatError(f"{where}: 'key' must be a non-empty string, got {key!r}")
        if not isinstance(text_, str) or not text_.strip():
            raise ExamplesFormatError(f"{where}: example {key!r} has an empty or non-string 'text'")
        if not isinstance(node_type, str):
            raise ExamplesFormatError(f"{where}: example {key!r}: 'node_type' must be a string")
        if score is not None and not _is_number(score):
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
        _check_dir_name(name, str(index_path))
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


# --------------------------------------------------------------------------- whole extraction


def run_extraction(
    nodes: Iterable[MemoryNode],
    output_dir: str | os.PathLike[str],
    params: SelectionParams | None = None,
    *,
    emotions: Sequence[str] | None = None,
    min_positives: int = 10,
    max_emotions: int = 200,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Nodes -> snapshot -> catalog -> examples directory (what ``extract_training_pairs`` does).

    ``emotions`` are curated names, always included besides the data-driven
    choice (see :func:`emotion_catalog`). Returns the written index.
    """
    params = params or SelectionParams()
    snapshot = build_snapshot(nodes)
    rows = _rows(snapshot)
    catalog, eligible = _catalog(rows, params, min_positives, max_emotions, emotions or ())
    sets = [_select(rows, e, params, eligible[e]) for e in qualifying_emotions(catalog)]
    n_tagged = int((snapshot["scores"].list.len() > 0).sum())  # nodes, not distinct bodies
    info: dict[str, Any] = {
        "emotion_selection": {
            "min_positives": min_positives,
            "max_emotions": max_emotions,
            "curated": list(dict.fromkeys(check_emotion_name(n) for n in emotions or ())),
            "emotions_seen": catalog.height,
            "emotions_qualifying": len(sets),
        },
        "snapshot": {
            "nodes": snapshot.height,
            "tagged_nodes": n_tagged,
            "malformed_tag_tokens": int(snapshot["n_malformed"].sum() or 0),
        },
    }
    info.update(extra or {})
    return write_examples_dir(output_dir, sets, params, snapshot_hash(snapshot), extra=info)
