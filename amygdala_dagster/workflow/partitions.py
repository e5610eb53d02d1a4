"""Which emotions a run trains: the texts of a set of emotions, trainability, qualification, partition planning."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import polars as pl

from amygdala_dagster.examples.selection import ExampleSet, SelectionParams, training_problems
from amygdala_dagster.graph.tags import check_emotion_name


# ----------------------------------------------------------------------------- texts and trainability
def collect_texts(example_sets: Mapping[str, ExampleSet]) -> tuple[list[str], list[str]]:
    """Every example text of every emotion (both splits, duplicates kept) and a key naming each."""
    texts: list[str] = []
    keys: list[str] = []
    for name, s in example_sets.items():
        for polarity, items in (("positive", s.positives), ("negative", s.negatives)):
            for ex in items:
                texts.append(ex.text)
                keys.append(f"{ex.key} ({name} {polarity})")
    return texts, keys


def untrainable(example_sets: Mapping[str, ExampleSet]) -> dict[str, str]:
    """``{emotion: reason}`` for the emotions whose train split cannot give a direction."""
    out = {}
    for name, s in example_sets.items():
        counts = s.counts()
        problems = training_problems(name, counts["train_positives"], counts["train_negatives"])
        if problems:
            out[name] = "; ".join(problems)
    return out


class NotQualifiedError(ValueError):
    """Emotions asked for by name that the graph cannot train; the message says why and what would help."""


def qualification_problems(catalog: pl.DataFrame, sets: Mapping[str, ExampleSet], min_positives: int,
                           params: SelectionParams) -> dict[str, str]:
    """``{emotion: why it does not qualify and what would make it}`` for the emotions of ``sets``."""
    eligible = dict(zip(catalog["emotion"].to_list(), catalog["n_positive"].to_list()))
    out = {}
    for name, s in sets.items():
        n_pos = int(eligible.get(name, 0) or 0)
        reasons = []
        if n_pos < min_positives:
            reasons.append(f"{n_pos} eligible positive(s), {min_positives} needed (a positive is a node tagged "
                           f"{name}:{params.min_positive_score:g} or higher with at least "
                           f"{params.min_content_chars} characters of text); tag more nodes, or lower "
                           "--min-positives")
        trainability = untrainable({name: s}).get(name)
        if trainability and not reasons:
            reasons.append(trainability)
        if reasons:
            out[name] = "; ".join(reasons)
    return out


@dataclass
class PartitionPlan:
    """Which emotion partitions a run covers: ``partitions`` = kept existing ones + ``new``."""

    new: list[str]
    dropped: dict[str, str]  # emotion -> why its partition goes
    partitions: list[str]


def plan_partitions(catalog: pl.DataFrame, existing: Sequence[str], min_positives: int,
                    curated: Iterable[str] = ()) -> PartitionPlan:
    """Keep the registered emotions that still qualify, add the newly qualifying ones.

    An existing partition goes when its name is not a valid emotion name (e.g.
    registered by an older version) or when it has fewer than ``min_positives``
    eligible positives (curated or not): it would fail the blocking checks and
    hold back every other emotion's refresh.
    """
    qualifying = catalog.filter(pl.col("qualifies")).sort("rank")["emotion"].to_list()
    positives = dict(zip(catalog["emotion"].to_list(), catalog["n_positive"].to_list()))
    curated = set(curated)
    dropped: dict[str, str] = {}
    for e in existing:
        try:
            if check_emotion_name(e) != e:
                raise ValueError(f"it normalises to {check_emotion_name(e)!r}")
        except ValueError as exc:
            dropped[e] = f"not a valid emotion name ({exc})"
            continue
        n = int(positives.get(e, 0) or 0)
        if n < min_positives:
            dropped[e] = (f"{n} eligible positive(s), fewer than {min_positives}"
                          + (" (curated, but it cannot pass the min-positives check)" if e in curated else ""))
    kept = [e for e in existing if e not in dropped]
    new = [e for e in qualifying if e not in existing and int(positives.get(e, 0) or 0) >= min_positives]
    return PartitionPlan(new=new, dropped=dropped, partitions=kept + new)
