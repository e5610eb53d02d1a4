"""Asset checks, run inside their asset's step (``check_specs``): blocking where a bad result must not
reach vLLM; WARN for weak evaluation results.

Each check's logic is a plain function returning the list of problems (empty = pass), so the rules
are testable on crafted inputs; :func:`check_result` turns them into the asset's AssetCheckResult.
The specs name their asset by key, so the asset modules import this one and not the reverse.
"""


import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import dagster as dg
import numpy as np

from amygdala_dagster.files.atomic import sha256_file
from amygdala_dagster.graph.tags import is_tag_line, parse_tags
from amygdala_dagster.readout.manifest import ReadoutFileError, load_readout, row_problems

_SHOWN = 10
ERROR, WARN = dg.AssetCheckSeverity.ERROR, dg.AssetCheckSeverity.WARN


def _spec(asset: str, name: str, description: str, *, blocking: bool = False) -> dg.AssetCheckSpec:
    return dg.AssetCheckSpec(name=name, asset=asset, blocking=blocking, description=description)


SNAPSHOT_CHECKS = [_spec("memory_snapshot", "snapshot_nonempty_unique_keys",
                         "the snapshot is non-empty and its keys are unique", blocking=True)]
EXAMPLES_CHECKS = [
    _spec("tagged_examples", "examples_clean_and_disjoint",
          "no example text holds a tag block; train/holdout and positives/negatives are disjoint", blocking=True),
    _spec("tagged_examples", "examples_min_positives",
          "each emotion has at least the configured minimum of positives (selection.min_positives)", blocking=True),
]
STATS_CHECKS = [
    _spec("activation_stats", "stats_finite", "activation statistics are finite and non-empty", blocking=True),
    _spec("activation_stats", "linear_attention_fast_path",
          "a CUDA run of a linear-attention model uses the fast kernels, not the reference path"),
]
VECTORS_CHECKS = [_spec("readout_vectors", "vectors_finite_unit_norm",
                        "vectors are finite and unit-norm, one [n_concepts, hidden] matrix per layer", blocking=True)]
MANIFEST_CHECKS = [
    _spec("readout_manifest", "manifest_matches_vectors",
          "manifest SHA-256 matches vectors.safetensors; shapes and row order match the manifest", blocking=True),
    _spec("readout_manifest", "token_threshold_heldout_rate",
          "each token threshold fires on held-out calibration tokens at most twice its target rate"),
    _spec("readout_manifest", "episode_rule_heldout_rate",
          "no episode rule fires on held-out calibration episodes above its target rate beyond the 95% interval"),
]
EVALUATION_CHECKS = [
    _spec("evaluation_report", "separation_above_threshold",
          "every emotion separates held-out examples (AUROC >= evaluation.min_auroc) on a holdout of at least "
          "evaluation.min_holdout_positives positives"),
    _spec("evaluation_report", "better_than_baseline",
          "every vector beats the trivial length / node-type baselines and is not so close to another emotion's "
          "vector that it reads both"),
    _spec("evaluation_report", "readout_on_conversations",
          "on the labelled conversations, every vector separates at text and token level and does not fire on "
          "most conversations without its emotion, and its episode rule separates, keeps to its false-alarm rate "
          "and detects the emotion"),
]
ALL_CHECK_SPECS = [*SNAPSHOT_CHECKS, *EXAMPLES_CHECKS, *STATS_CHECKS, *VECTORS_CHECKS, *MANIFEST_CHECKS,
                   *EVALUATION_CHECKS]


def check_result(name: str, problems: Sequence[str], *, severity: dg.AssetCheckSeverity = ERROR,
                 metadata: Mapping[str, Any] | None = None) -> dg.AssetCheckResult:
    """The result of check ``name``: passed when ``problems`` is empty, else the first few problems."""
    shown = list(problems[:_SHOWN]) + ([f"... and {len(problems) - _SHOWN} more"] if len(problems) > _SHOWN else [])
    return dg.AssetCheckResult(
        check_name=name,
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
    if sorted(int(layer) for layer in vectors) != sorted(int(layer) for layer in layers):
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


def manifest_problems(vectors_path: Any, manifest_path: Any,
                      expected_concepts: Sequence[str] | None = None) -> list[str]:
    """The manifest's SHA-256 matches the vectors file; shapes, norms and row order match the manifest."""
    try:
        manifest = json.loads(Path(manifest_path).read_text(encoding="utf-8"))
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


def flagged_emotions(evaluation: Mapping[str, Any], kinds: Sequence[str]) -> list[str]:
    """The emotions named by the evaluation's flags of ``kinds``, first mention first."""
    return list(dict.fromkeys(f["emotion"] for f in evaluation.get("flags", []) if f.get("kind") in kinds))


def flags_by_kind(evaluation: Mapping[str, Any], kinds: Sequence[str]) -> dict[str, str]:
    """Per flag kind a check shows, the emotions flagged with it (comma-separated; "none")."""
    return {kind: ", ".join(flagged_emotions(evaluation, [kind])) or "none" for kind in kinds}


def evaluation_checks(evaluation: Mapping[str, Any], min_auroc: float) -> list[dg.AssetCheckResult]:
    """The evaluation report's three WARN checks, each showing the verdict flags of some kinds."""
    out = []
    for spec, kinds, extra in ((EVALUATION_CHECKS[0], SEPARATION_FLAGS, {"min_auroc": min_auroc}),
                               (EVALUATION_CHECKS[1], BASELINE_FLAGS, {}),
                               (EVALUATION_CHECKS[2], CONVERSATION_FLAGS, {})):
        flagged = flagged_emotions(evaluation, kinds)
        by_kind = {f"flagged_{kind}": names for kind, names in flags_by_kind(evaluation, kinds).items()}
        out.append(check_result(spec.name, flag_messages(evaluation, kinds), severity=WARN,
                                metadata={**extra, "n_flagged": len(flagged), "flagged": ", ".join(flagged) or "none",
                                          **by_kind}))
    return out
