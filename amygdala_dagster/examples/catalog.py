"""Which emotions to train: the catalog of every emotion the graph tags, curates or names in its core nodes.

The seed's open question ("most-common tags in the graph" or "from
core-personality / pattern nodes": probably both) is answered with both:

- *tags*: every emotion tagged on some node is a candidate, ranked by its
  eligible positives (then tags, then name);
- *core/pattern*: the emotions that the graph's core-personality and pattern
  nodes (``core_node_types``, by default ``core``, ``core-personality`` and
  ``pattern``) carry (a tag on such a node, any score) or name (a whole-word
  mention of the emotion's name in their body, the mention rule of the
  example selection); the names looked for are those the graph tags anywhere
  or the curated ones;
- *curated*: the names given with ``--emotions`` / ``AMYGDALA_EMOTIONS``.

``source`` says where an emotion comes from: ``curated``; ``both`` (carried or
named by a core/pattern node and tagged on some other node); ``core/pattern``
(only from those nodes); ``tags`` (tagged, never carried or named by them).

Qualifying is the same rule for all (``min_positives`` eligible positives;
trainability is checked when the examples are selected), and the
``max_emotions`` slots are shared in this order: curated names first (they
always qualify), then the emotions from core/pattern nodes in rank order, then
the most-tagged others in rank order. So an emotion a core node names
qualifies even when more than ``max_emotions`` emotions are tagged more often.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import polars as pl

from amygdala_dagster.examples.selection import (
    BodyRow,
    SelectionParams,
    body_mentions,
    body_rows,
    eligible_rows,
    is_int,
)
from amygdala_dagster.graph.tags import check_emotion_name

log = logging.getLogger(__name__)

#: Node types whose emotions are candidates beside the most-tagged ones (compared case-insensitively).
DEFAULT_CORE_NODE_TYPES = ("core", "core-personality", "pattern")
SOURCES = ("curated", "both", "core/pattern", "tags")

CATALOG_SCHEMA: dict[str, pl.DataType | type[pl.DataType]] = {
    "emotion": pl.Utf8,
    "n_tagged": pl.Int64,
    "n_positive": pl.Int64,
    "n_negative": pl.Int64,
    "mean_score": pl.Float64,
    "qualifies": pl.Boolean,
    "curated": pl.Boolean,
    "rank": pl.Int64,
    "n_core": pl.Int64,
    "source": pl.Utf8,
}


def emotion_catalog(
    snapshot: pl.DataFrame,
    params: SelectionParams | None = None,
    *,
    min_positives: int = 10,
    max_emotions: int = 200,
    curated: Sequence[str] = (),
    core_node_types: Sequence[str] = DEFAULT_CORE_NODE_TYPES,
) -> pl.DataFrame:
    """One row per candidate emotion (tagged anywhere, curated, or carried/named by a core/pattern node),
    sorted by rank (see the module docstring for ``source``, ``n_core`` and which qualify).

    ``n_positive``/``n_negative`` count eligible examples after the rules, before the cap. Rank 1 has
    the most positives (then most tags, then name).
    """
    params = params or SelectionParams()
    return catalog_of(body_rows(snapshot), params, min_positives, max_emotions, curated, core_node_types)[0]


def core_emotions(rows: Sequence[BodyRow], names: Sequence[str], core_node_types: Sequence[str]) -> dict[str, int]:
    """``{emotion: number of core/pattern bodies that carry or name it}`` among ``names``."""
    types = {str(t).casefold() for t in core_node_types}
    out: dict[str, int] = {}
    for r in rows:
        if r.node_type.casefold() not in types:
            continue
        for e in names:
            if e in r.scores or body_mentions(r.folded, e):
                out[e] = out.get(e, 0) + 1
    return out


def _source(curated: bool, n_core: int, tagged_elsewhere: bool) -> str:
    if curated:
        return "curated"
    if n_core:
        return "both" if tagged_elsewhere else "core/pattern"
    return "tags"


def catalog_of(
    rows: Sequence[BodyRow], params: SelectionParams, min_positives: int, max_emotions: int, curated: Sequence[str],
    core_node_types: Sequence[str] = DEFAULT_CORE_NODE_TYPES,
) -> tuple[pl.DataFrame, dict[str, tuple[list[BodyRow], list[BodyRow]]]]:
    """The catalog and, per emotion, its eligible (positives, negatives)."""
    if not is_int(min_positives) or min_positives < 0:
        raise ValueError(f"min_positives must be an integer >= 0, got {min_positives!r}")
    if not is_int(max_emotions) or max_emotions < 0:
        raise ValueError(f"max_emotions must be an integer >= 0, got {max_emotions!r}")
    if isinstance(curated, str):
        raise ValueError(f"curated must be a sequence of emotion names, not the string {curated!r}")
    if isinstance(core_node_types, str):
        raise ValueError(f"core_node_types must be a sequence of node types, not the string {core_node_types!r}")
    curated_names = list(dict.fromkeys(check_emotion_name(n) for n in curated))
    types = {str(t).casefold() for t in core_node_types}
    tag_scores: dict[str, list[float]] = {}
    elsewhere: set[str] = set()
    for r in rows:
        for e, s in r.scores.items():
            tag_scores.setdefault(e, []).append(s)
            if r.node_type.casefold() not in types:
                elsewhere.add(e)
    absent = [n for n in curated_names if n not in tag_scores]
    if absent:
        log.warning("curated emotion(s) not tagged on any node of the graph: %s", ", ".join(absent))
    names = sorted(set(tag_scores) | set(curated_names))
    n_core = core_emotions(rows, names, core_node_types)
    records: list[dict[str, Any]] = []
    eligible = {}
    for e in names:
        pos, neg = eligible[e] = eligible_rows(rows, e, params)
        scores = tag_scores.get(e, [])
        records.append({
            "emotion": e, "n_tagged": len(scores), "n_positive": len(pos), "n_negative": len(neg),
            "mean_score": sum(scores) / len(scores) if scores else None, "curated": e in curated_names,
            "n_core": n_core.get(e, 0), "source": _source(e in curated_names, n_core.get(e, 0), e in elsewhere),
        })
    records.sort(key=lambda r: (-r["n_positive"], -r["n_tagged"], r["emotion"]))
    for rank, rec in enumerate(records, 1):
        rec["rank"] = rank
        rec["qualifies"] = rec["curated"]
    slots = max(0, max_emotions - len(curated_names))
    for from_core in (True, False):  # the core/pattern nodes' emotions take the slots before the others
        for rec in records:
            if rec["qualifies"] or (rec["n_core"] > 0) != from_core:
                continue
            if slots > 0 and rec["n_positive"] >= min_positives:
                rec["qualifies"] = True
                slots -= 1
    return pl.DataFrame(records, schema=CATALOG_SCHEMA), eligible


def qualifying_emotions(catalog: pl.DataFrame) -> list[str]:
    """The emotions of a catalog that qualify, in rank order."""
    return catalog.filter(pl.col("qualifies")).sort("rank")["emotion"].to_list()


def sources(catalog: pl.DataFrame) -> dict[str, str]:
    """``{emotion: source}`` of a catalog (``tags`` for a catalog written before the column existed)."""
    if "source" not in catalog.columns:
        return {e: "tags" for e in catalog["emotion"].to_list()}
    return dict(zip(catalog["emotion"].to_list(), catalog["source"].to_list()))


def catalog_summary(catalog: pl.DataFrame, emotions: Sequence[str]) -> dict[str, Any]:
    """What the evaluation shows of a catalog for ``emotions``: ``{"emotions": {emotion: {"source", "n_core",
    "n_tagged", "rank"}}, "source_counts": {source: n}}`` (JSON-ready; emotions not in it are left out)."""
    src = sources(catalog)
    rows = {r["emotion"]: r for r in catalog.to_dicts()}
    per = {e: {"source": src[e], "n_core": int(rows[e].get("n_core") or 0), "n_tagged": int(rows[e]["n_tagged"]),
               "rank": int(rows[e]["rank"])} for e in emotions if e in rows}
    return {"emotions": per, "source_counts": {s: sum(1 for v in per.values() if v["source"] == s) for s in SOURCES}}


def cooccurrence(snapshot: pl.DataFrame, emotions: Sequence[str]) -> tuple[list[str], np.ndarray]:
    """Pearson correlation of the emotions' scores across tagged nodes (a missing tag counts 0).

    Only nodes with at least one valid tag take part (untagged nodes carry no
    label). An emotion whose scores are constant correlates 0 with the others
    (1 with itself).
    """
    names = list(emotions)
    rows = [r for r in body_rows(snapshot) if r.scores]
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
