"""Asset checks. Blocking where a bad result must not reach vLLM; WARN for weak evaluation results.

Each check's logic is a plain function returning the list of problems (empty = pass), so the
rules are testable on crafted inputs; the decorated checks turn them into AssetCheckResults.
"""


import json
from collections.abc import Mapping, Sequence
from typing import Any

import dagster as dg
import numpy as np

from amygdala_dagster.files.atomic import sha256_file
from amygdala_dagster.pipeline.assets import (
    activation_stats, evaluation_report, memory_snapshot, readout_manifest, readout_vectors, tagged_examples,
)
from amygdala_dagster.pipeline.assets.activations import read_stats
from amygdala_dagster.readout.manifest import ReadoutFileError, load_readout, row_problems
from amygdala_dagster.pipeline.assets.common import run_partition_keys
from amygdala_dagster.pipeline.assets.emotions import read_examples_from
from amygdala_dagster.pipeline.assets.graph import read_snapshot_from
from amygdala_dagster.pipeline.assets.readout_pair import load_staged_readout, read_staged_info
from amygdala_dagster.pipeline.resources import ArtifactStorage, EvaluationResource, SelectionResource
from amygdala_dagster.readout.publish import current_pair, open_pair
from amygdala_dagster.graph.tags import is_tag_line, parse_tags
from amygdala_dagster.readout.episode import episode_problems, manifest_episode_rules
from amygdala_dagster.readout.token_calibration import heldout_problems, manifest_token_calibration
from amygdala_dagster.workflow import EVALUATION_JSON, MANIFEST_FILE, VECTORS_FILE

_SHOWN = 10


def _result(problems: Sequence[str], *, severity: dg.AssetCheckSeverity = dg.AssetCheckSeverity.ERROR,
            metadata: Mapping[str, Any] | None = None) -> dg.AssetCheckResult:
    shown = list(problems[:_SHOWN]) + ([f"... and {len(problems) - _SHOWN} more"] if len(problems) > _SHOWN else [])
    return dg.AssetCheckResult(
        passed=not problems,
        severity=severity,
        description="; ".join(shown) if problems else "ok",
        metadata={"n_problems": len(problems), **(metadata or {})},
    )


# ----------------------------------------------------------------------------- rules
def snapshot_problems(df: Any) -> list[str]:
    """A usable snapshot has at least one node and unique keys."""
    if df.height == 0:
        return ["the snapshot is empty: the memory graph returned no usable node"]
    keys = df["key"].to_list()
    dupes = sorted({k for k in keys if keys.count(k) > 1}) if len(set(keys)) != len(keys) else []
    return [f"duplicate node key {k!r}" for k in dupes]


def examples_problems(example_set: Any) -> list[str]:
    """No example text carries a tag block; train and holdout (and positives and negatives) are disjoint."""
    e = example_set.emotion
    out = []
    for pol, items in (("positive", example_set.positives), ("negative", example_set.negatives)):
        for ex in items:
            lines = [ln for ln in ex.text.strip().splitlines() if ln.strip()]
            if (lines and is_tag_line(lines[-1])) or parse_tags(ex.text).scores:
                out.append(f"{e}: {pol} example {ex.key!r} still ends with a tag block")
    all_items = list(example_set.positives) + list(example_set.negatives)
    train = {x.key for x in all_items if x.split == "train"}
    holdout = {x.key for x in all_items if x.split == "holdout"}
    out += [f"{e}: node {k!r} is in both train and holdout" for k in sorted(train & holdout)]
    both = {x.key for x in example_set.positives} & {x.key for x in example_set.negatives}
    out += [f"{e}: node {k!r} is both a positive and a negative" for k in sorted(both)]
    return out


def min_positives_problems(example_set: Any, minimum: int) -> list[str]:
    n = len(example_set.positives)
    return [] if n >= minimum else [f"{example_set.emotion}: {n} positives, fewer than the minimum {minimum}"]


def stats_problems(stats: Any) -> list[str]:
    e = stats.emotion
    out = []
    for name in ("pos_sum", "neg_sum"):
        arr = getattr(stats, name)
        if not np.all(np.isfinite(arr)):
            out.append(f"{e}: {name} holds {int((~np.isfinite(arr)).sum())} non-finite values")
        if arr.shape[0] != len(stats.layers):
            out.append(f"{e}: {name} has {arr.shape[0]} rows for {len(stats.layers)} layers")
    if stats.pos_n <= 0 or stats.neg_n <= 0:
        out.append(f"{e}: {stats.pos_n} train positives and {stats.neg_n} train negatives")
    return out


def vectors_problems(concepts: Sequence[str], layers: Sequence[int], vectors: Mapping[int, np.ndarray],
                     hidden_size: int | None = None) -> list[str]:
    """Every layer's matrix is [len(concepts), H], finite, with unit-norm rows."""
    out = []
    if sorted(int(l) for l in vectors) != sorted(int(l) for l in layers):
        out.append(f"vector layers {sorted(vectors)} differ from the listed layers {list(layers)}")
    for layer in layers:
        m = vectors.get(int(layer))
        if m is None:
            continue
        if m.ndim != 2 or m.shape[0] != len(concepts) or (hidden_size is not None and m.shape[1] != hidden_size):
            out.append(f"layer {layer}: shape {tuple(m.shape)}, expected [{len(concepts)}, {hidden_size or 'H'}]")
            continue
        out += row_problems(m, concepts, layer)
    return out


def manifest_problems(vectors_path: Any, manifest_path: Any, expected_concepts: Sequence[str] | None = None) -> list[str]:
    """The manifest's SHA-256 matches the vectors file; shapes, norms and row order match the manifest."""
    try:
        manifest = json.loads(open(manifest_path, encoding="utf-8").read())
    except (OSError, ValueError) as exc:
        return [f"{manifest_path}: unreadable manifest ({exc})"]
    out = []
    try:
        actual = sha256_file(vectors_path)
    except OSError as exc:
        return [f"{vectors_path}: unreadable ({exc})"]
    if manifest.get("vectors_sha256") != actual:
        out.append(f"manifest vectors_sha256 {str(manifest.get('vectors_sha256'))[:12]}... != "
                   f"SHA-256 of {vectors_path} {actual[:12]}...")
    try:
        readout = load_readout(vectors_path, manifest_path)
    except ReadoutFileError as exc:
        if not out:
            out.append(str(exc))
        return out
    out += vectors_problems(readout.concepts, readout.layers, readout.vectors, readout.hidden_size)
    if expected_concepts is not None and list(readout.concepts) != list(expected_concepts):
        out.append(f"manifest concepts {readout.concepts} are not the trained rows {list(expected_concepts)}")
    return out


# The evaluation's flags (written by evaluation.verdicts.judge into evaluation.json) are the one source of
# truth for verdicts; each check shows the flags of some kinds, and counts the emotions it names.
SEPARATION_FLAGS = ("not_evaluable", "below_min_auroc", "small_holdout", "wide_interval")
BASELINE_FLAGS = ("confound", "crosstalk")
CONVERSATION_FLAGS = ("conversation_auroc", "conversation_fires", "episode_auroc", "episode_false_alarms",
                      "episode_hits")


def flag_messages(evaluation: Mapping[str, Any], kinds: Sequence[str]) -> list[str]:
    return [f["message"] for f in evaluation.get("flags", []) if f.get("kind") in kinds]


def separation_problems(evaluation: Mapping[str, Any]) -> list[str]:
    """Emotions whose held-out separation is missing, below the minimum, or measured on too few positives."""
    return flag_messages(evaluation, SEPARATION_FLAGS)


def baseline_problems(evaluation: Mapping[str, Any]) -> list[str]:
    return flag_messages(evaluation, BASELINE_FLAGS)


def _flagged_emotions(evaluation: Mapping[str, Any], kinds: Sequence[str]) -> list[str]:
    return list(dict.fromkeys(f["emotion"] for f in evaluation.get("flags", []) if f.get("kind") in kinds))


def flags_by_kind(evaluation: Mapping[str, Any], kinds: Sequence[str]) -> dict[str, str]:
    """Per flag kind a check shows, the emotions flagged with it (comma-separated; "none")."""
    return {kind: ", ".join(_flagged_emotions(evaluation, [kind])) or "none" for kind in kinds}


# ----------------------------------------------------------------------------- checks
@dg.asset_check(asset=memory_snapshot, blocking=True, description="the snapshot is non-empty and its keys are unique")
def snapshot_nonempty_unique_keys(storage: ArtifactStorage) -> dg.AssetCheckResult:
    df = read_snapshot_from(storage)
    return _result(snapshot_problems(df), metadata={"rows": df.height})


@dg.asset_check(asset=tagged_examples, blocking=True,
                description="no example text holds a tag block; train/holdout and positives/negatives are disjoint")
def examples_clean_and_disjoint(context: dg.AssetCheckExecutionContext, storage: ArtifactStorage) -> dg.AssetCheckResult:
    problems: list[str] = []
    keys = run_partition_keys(context)
    for e in keys:
        problems += examples_problems(read_examples_from(storage, e)[1])
    return _result(problems, metadata={"emotions_checked": ", ".join(keys)})


@dg.asset_check(asset=tagged_examples, blocking=True,
                description="each emotion has at least the configured minimum of positives (selection.min_positives)")
def examples_min_positives(context: dg.AssetCheckExecutionContext, storage: ArtifactStorage,
                           selection: SelectionResource) -> dg.AssetCheckResult:
    problems: list[str] = []
    keys = run_partition_keys(context)
    for e in keys:
        problems += min_positives_problems(read_examples_from(storage, e)[1], int(selection.min_positives))
    return _result(problems, metadata={"emotions_checked": ", ".join(keys), "minimum": int(selection.min_positives)})


@dg.asset_check(asset=activation_stats, blocking=True, description="activation statistics are finite and non-empty")
def stats_finite(context: dg.AssetCheckExecutionContext, storage: ArtifactStorage) -> dg.AssetCheckResult:
    problems: list[str] = []
    keys = run_partition_keys(context)
    for e in keys:
        problems += stats_problems(read_stats(storage, e))
    return _result(problems, metadata={"emotions_checked": ", ".join(keys)})


def fast_path_problems(metadata: Mapping[str, Any]) -> list[str]:
    """A CUDA run of a linear-attention model that took transformers' reference path (about 12x slower), or
    whose path the probe could not tell."""
    device, fast = str(metadata.get("device") or ""), str(metadata.get("fast_path") or "not-applicable")
    if not device.startswith("cuda") or fast not in ("no", "unknown"):
        return []
    if fast == "unknown":
        return [f"the linear-attention layers' path on {device} is unknown: the probe forward failed (see the "
                "step's log)"]
    missing = str(metadata.get("kernels_missing") or "") or "?"
    return [f"the linear-attention layers ran the reference PyTorch path on {device} (kernels missing: {missing}); "
            'install the fast path on the GPU image: pip install -e ".[gpu]"']


@dg.asset_check(asset=activation_stats,
                description="a CUDA run of a linear-attention model uses the fast kernels, not the reference path")
def linear_attention_fast_path(context: dg.AssetCheckExecutionContext) -> dg.AssetCheckResult:
    event = context.instance.get_latest_materialization_event(activation_stats.key)
    meta = ({k: getattr(v, "value", v) for k, v in event.asset_materialization.metadata.items()}
            if event is not None and event.asset_materialization is not None else {})
    return _result(fast_path_problems(meta), severity=dg.AssetCheckSeverity.WARN,
                   metadata={"device": str(meta.get("device", "")),
                             "fast_path": str(meta.get("fast_path", "not-applicable"))})


@dg.asset_check(asset=readout_vectors, blocking=True,
                description="vectors are finite and unit-norm, one [n_concepts, hidden] matrix per layer")
def vectors_finite_unit_norm(storage: ArtifactStorage) -> dg.AssetCheckResult:
    readout, info = load_staged_readout(storage)
    return _result(vectors_problems(info["concepts"], info["layers"], readout.vectors, info["hidden_size"]))


@dg.asset_check(asset=readout_manifest, blocking=True,
                description="manifest SHA-256 matches vectors.safetensors; shapes and row order match the manifest")
def manifest_matches_vectors(storage: ArtifactStorage) -> dg.AssetCheckResult:
    store = storage.store()
    info = read_staged_info(storage)
    with open_pair(store.uri(VECTORS_FILE), store.uri(MANIFEST_FILE)) as files:
        return _result(manifest_problems(files.vectors, files.manifest, info["concepts"]))


@dg.asset_check(asset=readout_manifest,
                description="each token threshold fires on held-out calibration tokens at most twice its target rate")
def token_threshold_heldout_rate(storage: ArtifactStorage) -> dg.AssetCheckResult:
    store = storage.store()
    pair = current_pair(store.uri(""))  # only the manifest is needed: no vectors download
    if pair is None:
        return _result([f"no published pair under {store.uri('')}"], severity=dg.AssetCheckSeverity.WARN)
    token_cal = manifest_token_calibration(json.loads(store.read_bytes(pair[1])))
    return _result(heldout_problems(token_cal), severity=dg.AssetCheckSeverity.WARN,
                   metadata={"max_ratio_to_target": 2.0})


@dg.asset_check(asset=readout_manifest,
                description="no episode rule fires on held-out calibration episodes above its target rate beyond the "
                            "95% interval")
def episode_rule_heldout_rate(storage: ArtifactStorage) -> dg.AssetCheckResult:
    store = storage.store()
    pair = current_pair(store.uri(""))
    if pair is None:
        return _result([f"no published pair under {store.uri('')}"], severity=dg.AssetCheckSeverity.WARN)
    rules = manifest_episode_rules(json.loads(store.read_bytes(pair[1])))
    return _result(episode_problems(rules), severity=dg.AssetCheckSeverity.WARN)


def _evaluation(storage: ArtifactStorage) -> dict[str, Any]:
    return json.loads(storage.store().read_bytes(EVALUATION_JSON))


@dg.asset_check(asset=evaluation_report,
                description="every emotion separates held-out examples (AUROC >= evaluation.min_auroc) on a holdout "
                            "of at least evaluation.min_holdout_positives positives")
def separation_above_threshold(storage: ArtifactStorage, evaluation: EvaluationResource) -> dg.AssetCheckResult:
    ev = _evaluation(storage)
    flagged = _flagged_emotions(ev, SEPARATION_FLAGS)
    return _result(separation_problems(ev), severity=dg.AssetCheckSeverity.WARN,
                   metadata={"min_auroc": evaluation.min_auroc, "n_flagged": len(flagged),
                             "flagged": ", ".join(flagged) or "none"})


def _flag_check(kinds: Sequence[str], storage: ArtifactStorage) -> dg.AssetCheckResult:
    ev = _evaluation(storage)
    flagged = _flagged_emotions(ev, kinds)
    return _result(flag_messages(ev, kinds), severity=dg.AssetCheckSeverity.WARN,
                   metadata={"n_flagged": len(flagged), "flagged": ", ".join(flagged) or "none",
                             **{f"flagged_{kind}": names for kind, names in flags_by_kind(ev, kinds).items()}})


@dg.asset_check(asset=evaluation_report,
                description="every vector beats the trivial length / node-type baselines and is not so close to "
                            "another emotion's vector that it reads both")
def better_than_baseline(storage: ArtifactStorage) -> dg.AssetCheckResult:
    return _flag_check(BASELINE_FLAGS, storage)


@dg.asset_check(asset=evaluation_report,
                description="on the labelled conversations, every vector separates at text and token level and "
                            "does not fire on most conversations without its emotion, and its episode rule "
                            "separates, keeps to its false-alarm rate and detects the emotion")
def readout_on_conversations(storage: ArtifactStorage) -> dg.AssetCheckResult:
    return _flag_check(CONVERSATION_FLAGS, storage)


ALL_CHECKS = [
    snapshot_nonempty_unique_keys, examples_clean_and_disjoint, examples_min_positives, stats_finite,
    linear_attention_fast_path,
    vectors_finite_unit_norm, manifest_matches_vectors, separation_above_threshold, better_than_baseline,
    readout_on_conversations, token_threshold_heldout_rate, episode_rule_heldout_rate,
]
