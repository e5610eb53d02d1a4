"""Each asset check's rule fails on a crafted bad input (and passes on a good one)."""

from __future__ import annotations

import json

import numpy as np
import polars as pl

from amygdala_dagster.examples.selection import Example, ExampleSet
from amygdala_dagster.graph.nodes import MemoryNode
from amygdala_dagster.graph.snapshot import build_snapshot
from amygdala_dagster.pipeline import checks as C
from amygdala_dagster.readout.manifest import write_readout
from amygdala_dagster.readout.vectors import EmotionStats, readout_from_directions


def ex(key, text="A calm paragraph about a long walk by the river.", split="train", score=9.0):
    return Example(key, text, "journal", score, split)


def test_snapshot_rule():
    good = build_snapshot([MemoryNode("a", "journal", "hello there\n\nwarmth:9")])
    assert C.snapshot_problems(good) == []
    assert "empty" in C.snapshot_problems(good.head(0))[0]
    dup = pl.concat([good, good])
    assert C.snapshot_problems(dup) == ["duplicate node key 'a'"]


def test_examples_rule_catches_tag_blocks_and_split_overlap():
    clean = ExampleSet("joy", [ex("a"), ex("b", split="holdout")], [ex("c", score=None)])
    assert C.examples_problems(clean) == []
    tagged = ExampleSet("joy", [ex("a", text="A good day at the lake.\n\njoy:9 calm:3")], [ex("c", score=None)])
    assert "tag block" in C.examples_problems(tagged)[0]
    overlap = ExampleSet("joy", [ex("a", split="train")], [ex("a", split="holdout", score=None)])
    problems = C.examples_problems(overlap)
    assert any("both train and holdout" in p for p in problems)
    assert any("both a positive and a negative" in p for p in problems)


def test_min_positives_rule():
    s = ExampleSet("joy", [ex("a"), ex("b")], [ex("c", score=None)])
    assert C.min_positives_problems(s, 2) == []
    assert "fewer than the minimum 3" in C.min_positives_problems(s, 3)[0]


def test_stats_rule():
    ok = EmotionStats("joy", [1, 2], np.ones((2, 4)), np.zeros((2, 4)), 3, 4)
    assert C.stats_problems(ok) == []
    bad = EmotionStats("joy", [1, 2], np.array([[np.nan] * 4, [1.0] * 4]), np.zeros((2, 4)), 3, 0)
    problems = C.stats_problems(bad)
    assert any("non-finite" in p for p in problems) and any("0 train negatives" in p for p in problems)


def _readout(rows=2, hidden=8):
    rng = np.random.default_rng(0)
    dirs = {}
    for c in ["a", "b"][:rows]:
        u = rng.normal(size=(2, hidden))
        u /= np.linalg.norm(u, axis=1, keepdims=True)
        dirs[c] = (u.astype(np.float32), np.ones(2), {"train_positives": 3, "train_negatives": 3})
    return readout_from_directions(dirs, [1, 3])


def test_vectors_rule():
    r = _readout()
    assert C.vectors_problems(r.concepts, r.layers, r.vectors, 8) == []
    scaled = {layer: m * 2 for layer, m in r.vectors.items()}
    assert any("expected unit norm" in p for p in C.vectors_problems(r.concepts, r.layers, scaled, 8))
    nan = {layer: np.full_like(m, np.nan) for layer, m in r.vectors.items()}
    assert any("non-finite" in p for p in C.vectors_problems(r.concepts, r.layers, nan, 8))
    assert any("shape" in p for p in C.vectors_problems(["a", "b", "c"], r.layers, r.vectors, 8))


def test_manifest_rule_on_real_files(tmp_path):
    r = _readout()
    v, m = tmp_path / "vectors.safetensors", tmp_path / "manifest.json"
    write_readout(v, m, r, model="m", model_revision=None, dtype="float32", pooling="mean", layer_path=None,
                  fingerprint=None, training={})
    assert C.manifest_problems(v, m, ["a", "b"]) == []
    assert any("not the trained rows" in p for p in C.manifest_problems(v, m, ["b", "a"]))
    manifest = json.loads(m.read_text())
    manifest["vectors_sha256"] = "0" * 64
    m.write_text(json.dumps(manifest))
    assert "vectors_sha256" in C.manifest_problems(v, m)[0]


def test_evaluation_rules():
    """The checks show the evaluation's own flags (one source of truth), by kind."""
    evaluation = {
        "flags": [
            {"emotion": "b", "kind": "below_min_auroc", "severity": "do_not_use",
             "message": "b: AUROC 0.550 below 0.7"},
            {"emotion": "b", "kind": "confound", "severity": "do_not_use",
             "message": "b: no better than the length baseline"},
            {"emotion": "c", "kind": "not_evaluable", "severity": "do_not_use", "message": "c: no held-out AUROC"},
            {"emotion": "d", "kind": "crosstalk", "severity": "weak", "message": "d: close to e's vector"},
        ],
    }
    problems = C.separation_problems(evaluation)
    assert problems == ["b: AUROC 0.550 below 0.7", "c: no held-out AUROC"]
    assert C.baseline_problems(evaluation) == ["b: no better than the length baseline", "d: close to e's vector"]
    assert C.baseline_problems({"emotions": {}, "flags": []}) == []
    evaluation["flags"] += [
        {"emotion": "b", "kind": "episode_hits", "severity": "weak", "message": "b: episode rule fires on only 0 of 9"},
        {"emotion": "e", "kind": "episode_false_alarms", "severity": "weak", "message": "e: episode rule fires on 20"},
        {"emotion": "e", "kind": "conversation_auroc", "severity": "weak", "message": "e: text-level AUROC"},
    ]
    assert C.flags_by_kind(evaluation, C.CONVERSATION_FLAGS) == {
        "conversation_auroc": "e", "conversation_fires": "none", "episode_auroc": "none",
        "episode_false_alarms": "e", "episode_hits": "b"}
    assert C.flag_messages(evaluation, C.CONVERSATION_FLAGS) == [
        "b: episode rule fires on only 0 of 9", "e: episode rule fires on 20", "e: text-level AUROC"]
    res = C.check_result("separation_above_threshold", problems, severity=C.WARN)
    assert res.passed is False and res.severity == C.dg.AssetCheckSeverity.WARN


def test_fast_path_rule_fires_only_for_cuda_on_the_reference_path():
    from amygdala_dagster.pipeline.checks import fast_path_problems

    slow = {"device": "cuda:0", "fast_path": "no", "kernels_missing": "fla, causal_conv1d"}
    assert len(fast_path_problems(slow)) == 1 and "fla, causal_conv1d" in fast_path_problems(slow)[0]
    assert fast_path_problems({**slow, "fast_path": "yes"}) == []
    assert fast_path_problems({**slow, "fast_path": "not-applicable"}) == []
    assert fast_path_problems({**slow, "device": "cpu"}) == []  # the reference path is the only one on CPU
    assert fast_path_problems({}) == []
    assert "unknown" in fast_path_problems({**slow, "fast_path": "unknown"})[0]


def test_cpu_run_of_a_linear_attention_model_reports_no_and_passes_the_check():
    from amygdala_dagster.pipeline.assets.activations import _engine_metadata
    from amygdala_dagster.pipeline.checks import fast_path_problems
    from amygdala_dagster.workflow.engine_settings import EngineSettings, build_engine, fast_path_line
    from amygdala_dagster_tests.tiny_models import build_tiny_model

    engine = build_engine(EngineSettings(model=build_tiny_model("qwen3_5"), device="cpu", layers="1"))
    meta = {"device": engine.stats.device, **_engine_metadata(engine)}
    assert meta["fast_path"] == "no" and meta["device"] == "cpu" and meta["device_map"] == "none"
    assert fast_path_problems(meta) == []
    assert fast_path_line({"fast_path": "no", "kernels_found": [], "kernels_missing": ["fla"]}).startswith(
        "fast_path: no (kernels found: none; missing: fla)")


def test_every_flag_kind_is_shown_by_exactly_one_check():
    from amygdala_dagster.evaluation.verdicts import FLAG_KINDS

    shown = [*C.SEPARATION_FLAGS, *C.BASELINE_FLAGS, *C.CONVERSATION_FLAGS]
    assert sorted(shown) == sorted(FLAG_KINDS) and len(set(shown)) == len(shown)
