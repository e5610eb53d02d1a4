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

Which emotions are selected at all is :mod:`.catalog`; the directory of
examples (writing, reading, the whole extraction) is :mod:`.directory`.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import re
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import polars as pl

from amygdala_dagster.graph.tags import check_emotion_name, fold_text

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
SPLIT_SALT = "amygdala-split-v1"
RANK_SALT = "amygdala-cap-rank-v1"
POLARITY_FILES = {"positive": "positive.jsonl", "negative": "negative.jsonl"}
SPLITS = ("train", "holdout")
EXAMPLE_FIELDS = ("key", "text", "node_type", "score", "split")

Split = Literal["train", "holdout"]


class ExamplesFormatError(ValueError):
    """An examples directory (or a file in it) that cannot be read or written."""


# --------------------------------------------------------------------------- parameters


def is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def is_int(value: object) -> bool:
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
        if not is_number(self.min_positive_score) or not 0 <= self.min_positive_score <= 10:
            raise ValueError(
                f"min_positive_score must be a number from 0 to 10, got {self.min_positive_score!r}"
            )
        if not is_int(self.max_negative_mentions) or self.max_negative_mentions < 0:
            raise ValueError(
                f"max_negative_mentions must be an integer >= 0, got {self.max_negative_mentions!r}"
            )
        if not is_int(self.min_content_chars) or self.min_content_chars < 0:
            raise ValueError(f"min_content_chars must be an integer >= 0, got {self.min_content_chars!r}")
        if not is_int(self.max_examples_per_emotion) or self.max_examples_per_emotion < 1:
            raise ValueError(
                f"max_examples_per_emotion must be an integer >= 1, got {self.max_examples_per_emotion!r}"
            )
        if not is_number(self.holdout_fraction) or not 0 <= self.holdout_fraction < 1:
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
            {f: getattr(self, f) for f in EXAMPLE_FIELDS}, ensure_ascii=False, sort_keys=True
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


def sets_by_emotion(example_sets: Mapping[str, ExampleSet] | Iterable[ExampleSet]) -> dict[str, ExampleSet]:
    """``{emotion: ExampleSet}`` from such a mapping or from an iterable of sets."""
    if isinstance(example_sets, Mapping):
        return dict(example_sets)
    return {s.emotion: s for s in example_sets}


def split_for_key(key: str, holdout_fraction: float) -> Split:
    """``"holdout"`` for about ``holdout_fraction`` of keys, decided by the key alone."""
    if not is_number(holdout_fraction) or not 0 <= holdout_fraction < 1:
        raise ValueError(f"holdout_fraction must be in [0, 1), got {holdout_fraction!r}")
    return "holdout" if _split_point(key) < holdout_fraction else "train"


@functools.lru_cache(maxsize=1 << 16)
def _split_point(key: str) -> float:
    """A key's uniform point in [0, 1): the same for every emotion, so computed once per key."""
    digest = hashlib.sha256(f"{SPLIT_SALT}\0{key}".encode("utf-8", "surrogatepass")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def _ranker(emotion: str) -> Callable[[BodyRow], tuple[bytes, str]]:
    """The cap's sort key for one emotion: ``(sha256(salt, emotion, key), key)``.

    The salted prefix is hashed once per emotion and copied per row (same digest, a third of the time).
    """
    prefix = hashlib.sha256(f"{RANK_SALT}\0{emotion}\0".encode("utf-8", "surrogatepass"))

    def rank(row: BodyRow) -> tuple[bytes, str]:
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


def body_mentions(folded_body: str, emotion: str) -> int:
    literal, pattern = _mention_regex(emotion)
    if not literal or literal not in folded_body:
        return 0
    return len(pattern.findall(folded_body))


def mention_count(body: str, scores: Mapping[str, float], emotion: str) -> int:
    """How often a node mentions ``emotion``: 1 for a tag (any score) + whole-word occurrences in the body.

    The body is folded like names (:func:`~amygdala_dagster.graph.tags.fold_text`), so "Straße" mentions ``strasse``.
    """
    emotion = check_emotion_name(emotion)
    return (1 if emotion in scores else 0) + body_mentions(fold_text(body), emotion)


# --------------------------------------------------------------------------- selection


@dataclass(frozen=True)
class BodyRow:
    key: str
    node_type: str
    body: str
    folded: str
    scores: dict[str, float]


_REQUIRED_COLUMNS = ("key", "node_type", "body", "scores")


def body_rows(snapshot: pl.DataFrame) -> list[BodyRow]:
    """One row per distinct body (trimmed), sorted by key.

    Copies of a body merge their tags as several agents' lines do (the maximum
    score per emotion, so a tag on any copy is a mention); the smallest key, and
    its node type, stand for the body.
    """
    missing = [c for c in _REQUIRED_COLUMNS if c not in snapshot.columns]
    if missing:
        raise ValueError(f"not a memory snapshot table: missing column(s) {', '.join(missing)}")
    by_body: dict[str, BodyRow] = {}
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
            by_body[body] = BodyRow(key=key, node_type=node_type or "unknown", body=body, folded=fold_text(body),
                                    scores=tags)
            continue
        for emotion, score in tags.items():
            if score > first.scores.get(emotion, -1.0):
                first.scores[emotion] = score
    return sorted(by_body.values(), key=lambda r: r.key)


def eligible_rows(rows: Sequence[BodyRow], emotion: str, params: SelectionParams
                  ) -> tuple[list[BodyRow], list[BodyRow]]:
    """All eligible positives and negatives (one per body, sorted by key), before the cap."""
    positives: list[BodyRow] = []
    negatives: list[BodyRow] = []
    limit = params.max_negative_mentions
    for r in rows:  # one row per body (see body_rows), so a body is a positive or a negative, never both
        if len(r.body) < params.min_content_chars:
            continue
        score = r.scores.get(emotion)
        if score is not None and score >= params.min_positive_score:
            positives.append(r)
            continue
        if not r.scores:
            continue
        tagged = 0 if score is None else 1
        if tagged <= limit and tagged + body_mentions(r.folded, emotion) <= limit:
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


def _cap(items: list[BodyRow], emotion: str, cap: int) -> list[BodyRow]:
    if len(items) <= cap:
        return items
    return sorted(items, key=_ranker(emotion))[:cap]


def _cap_negatives(items: list[BodyRow], emotion: str, cap: int, positives: Sequence[BodyRow]) -> list[BodyRow]:
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


def _to_examples(rows: Iterable[BodyRow], emotion: str, params: SelectionParams) -> list[Example]:
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


def select_from_rows(
    rows: Sequence[BodyRow],
    emotion: str,
    params: SelectionParams,
    eligible: tuple[list[BodyRow], list[BodyRow]] | None = None,
) -> ExampleSet:
    positives, negatives = eligible or eligible_rows(rows, emotion, params)
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
    return [(r.key, r.body) for r in body_rows(snapshot)
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
    rows = body_rows(snapshot)
    return {e: select_from_rows(rows, e, params) for e in (check_emotion_name(n) for n in emotions)}


def check_dir_name(name: str, where: str) -> None:
    """A directory may be named only by a normalised emotion name (Contract 1): safe on every filesystem."""
    try:
        normalized = check_emotion_name(name)
    except ValueError as exc:
        raise ExamplesFormatError(f"{where}: {exc}") from None
    if normalized != name:
        raise ExamplesFormatError(
            f"{where}: emotion name {name!r} is not in normal form (Contract 1 makes it {normalized!r})"
        )
