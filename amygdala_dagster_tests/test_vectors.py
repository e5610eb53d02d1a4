"""Directions from cached activations: stats, estimators, refusals, calibration, projection."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from amygdala_dagster.engine.cache import ActivationCache, text_sha256
from amygdala_dagster.examples.selection import Example, ExampleSet
from amygdala_dagster.readout import estimators
from amygdala_dagster.readout.estimators import DegenerateDirectionError
from amygdala_dagster.readout.runtime import calibrated_scores, project
from amygdala_dagster.readout.vectors import (
    EmotionStats,
    TrainingDataError,
    directions_from_stats,
    emotion_stats,
    holdout_calibration,
    load_stats,
    save_stats,
    train_directions,
    train_readout,
)

LAYERS = [2, 5, 7]
H = 16


def _examples(prefix: str, n: int, holdout_every: int = 4) -> list[Example]:
    return [
        Example(f"{prefix}{i:02d}", f"{prefix} text number {i}", "journal", None,
                "holdout" if i % holdout_every == 0 else "train")
        for i in range(n)
    ]


def _fill(cache: ActivationCache, examples: list[Example],
          shift: np.ndarray, rng: np.random.Generator) -> dict[str, np.ndarray]:
    acts = rng.normal(size=(len(examples), len(LAYERS), H)).astype(np.float32) + shift.astype(np.float32)
    cache.add([text_sha256(e.text) for e in examples], acts)
    return {e.key: a for e, a in zip(examples, acts)}


@pytest.fixture
def world(tmp_path):
    """A cache holding synthetic activations for two emotions' examples (plus the arrays)."""
    rng = np.random.default_rng(0)
    cache = ActivationCache(tmp_path / "cache", {"model": "synthetic", "layers": LAYERS}, shard_size=5)
    shift_joy = np.zeros((len(LAYERS), H))
    shift_joy[:, 0] = 3.0
    shift_ire = np.zeros((len(LAYERS), H))
    shift_ire[:, 1] = -2.0
    joy_pos, ire_pos, neutral = _examples("joy", 13), _examples("ire", 9), _examples("neutral", 17)
    acts = {}
    acts.update(_fill(cache, joy_pos, shift_joy, rng))
    acts.update(_fill(cache, ire_pos, shift_ire, rng))
    acts.update(_fill(cache, neutral, np.zeros((len(LAYERS), H)), rng))
    cache.flush()
    sets = {
        "joy": ExampleSet("joy", joy_pos, neutral + ire_pos),
        "ire": ExampleSet("ire", ire_pos, neutral),
    }
    return cache, sets, acts


def _arrays(acts, examples, split):
    return np.stack([acts[e.key] for e in examples if e.split == split])


def test_emotion_stats_sums_and_counts_match_numpy(world):
    cache, sets, acts = world
    st = emotion_stats(cache, sets["joy"])
    pos = _arrays(acts, sets["joy"].positives, "train")
    neg = _arrays(acts, sets["joy"].negatives, "train")
    assert st.layers == LAYERS
    assert (st.pos_n, st.neg_n) == (len(pos), len(neg))
    np.testing.assert_allclose(st.pos_sum, pos.astype(np.float64).sum(0), rtol=1e-12)
    np.testing.assert_allclose(st.neg_mean, neg.astype(np.float64).mean(0), rtol=1e-12)
    hold = emotion_stats(cache, sets["joy"], "holdout")
    assert hold.pos_n == sum(1 for e in sets["joy"].positives if e.split == "holdout")


def test_mean_difference_path_equals_estimator_on_arrays(world):
    cache, sets, acts = world
    for name, s in sets.items():
        unit, norms, counts = train_directions(cache, s, LAYERS, "mean_difference")
        pos = _arrays(acts, s.positives, "train")
        neg = _arrays(acts, s.negatives, "train")
        assert unit.dtype == np.float32 and unit.shape == (len(LAYERS), H)
        for i in range(len(LAYERS)):
            ref = estimators.mean_difference(pos[:, i], neg[:, i])
            ref_unit, ref_norm = estimators.unit_direction(ref, name)
            np.testing.assert_allclose(unit[i], ref_unit, atol=1e-7)
            assert norms[i] == pytest.approx(ref_norm, rel=1e-10)
        assert counts["train_positives"] == len(pos) and counts["train_negatives"] == len(neg)
    # the signal planted along axis 0 for joy is found
    unit, _, _ = train_directions(cache, sets["joy"], LAYERS)
    assert np.all(unit[:, 0] > 0.6)


def test_layer_subset_selects_cache_columns(world):
    cache, sets, _ = world
    full, _, _ = train_directions(cache, sets["ire"], LAYERS)
    sub, _, _ = train_directions(cache, sets["ire"], [7, 2])
    np.testing.assert_array_equal(sub[0], full[2])
    np.testing.assert_array_equal(sub[1], full[0])
    with pytest.raises(ValueError, match=r"\[3\]"):
        train_directions(cache, sets["ire"], [3])


def test_other_estimators_get_the_train_arrays(world, monkeypatch):
    cache, sets, acts = world
    seen = []

    def median_difference(pos, neg):
        seen.append((pos.shape, neg.shape))
        return np.median(pos, axis=0) - np.median(neg, axis=0)

    monkeypatch.setitem(estimators.ESTIMATORS, "median_difference", median_difference)
    unit, norms, _ = train_directions(cache, sets["joy"], LAYERS, "median_difference")
    pos = _arrays(acts, sets["joy"].positives, "train")
    neg = _arrays(acts, sets["joy"].negatives, "train")
    assert seen == [((len(pos), H), (len(neg), H))] * len(LAYERS)
    ref = np.median(pos[:, 1], 0) - np.median(neg[:, 1], 0)
    np.testing.assert_allclose(unit[1], ref / np.linalg.norm(ref), atol=1e-6)
    with pytest.raises(ValueError, match="unknown estimator 'nope'"):
        train_directions(cache, sets["joy"], LAYERS, "nope")


def test_stats_round_trip_through_safetensors(world, tmp_path):
    cache, sets, _ = world
    st = emotion_stats(cache, sets["joy"])
    path = tmp_path / "stats" / "joy.safetensors"
    save_stats(path, st)
    back = load_stats(path)
    assert (back.emotion, back.layers, back.pos_n, back.neg_n) == ("joy", LAYERS, st.pos_n, st.neg_n)
    assert back.pos_sum.dtype == np.float64
    np.testing.assert_array_equal(back.pos_sum, st.pos_sum)
    np.testing.assert_array_equal(directions_from_stats(back)[0], directions_from_stats(st)[0])
    assert not any(p.name.endswith(".tmp") for p in path.parent.iterdir())


def test_refuses_emotion_without_negatives_or_positives(world):
    cache, sets, _ = world
    only_pos = ExampleSet("wistful", sets["joy"].positives, [])
    with pytest.raises(TrainingDataError, match=r"emotion 'wistful': no negative examples in the train split"):
        train_directions(cache, only_pos, LAYERS)
    holdout_only = ExampleSet("awe", [e for e in sets["joy"].positives if e.split == "holdout"], sets["joy"].negatives)
    with pytest.raises(TrainingDataError, match=r"emotion 'awe': no positive examples in the train split"):
        train_directions(cache, holdout_only, LAYERS, "mean_difference")
    with pytest.raises(TrainingDataError, match="'wistful'"):
        directions_from_stats(EmotionStats("wistful", LAYERS, np.ones((3, H)), np.zeros((3, H)), 4, 0))


def test_refuses_zero_norm_direction_naming_emotion_and_layer(world):
    cache, sets, _ = world
    same = ExampleSet("numb", sets["ire"].positives, sets["ire"].positives)
    with pytest.raises(DegenerateDirectionError, match=r"emotion 'numb', layer 2: .*zero direction"):
        train_directions(cache, same, LAYERS)
    st = EmotionStats("flat", LAYERS, np.ones((3, H)), np.ones((3, H)), 1, 1)
    st.pos_sum[0, 0] += 1.0  # layer 2 fine, layer 5 degenerate
    with pytest.raises(DegenerateDirectionError, match=r"emotion 'flat', layer 5"):
        directions_from_stats(st)


def test_holdout_calibration_matches_projections(world):
    cache, sets, acts = world
    unit, _, _ = train_directions(cache, sets["joy"], LAYERS)
    cal = holdout_calibration(cache, sets["joy"], unit, LAYERS)
    assert sorted(cal) == LAYERS
    pos = _arrays(acts, sets["joy"].positives, "holdout").astype(np.float64)
    neg = _arrays(acts, sets["joy"].negatives, "holdout").astype(np.float64)
    for i, layer in enumerate(LAYERS):
        pp, nn = pos[:, i] @ unit[i].astype(np.float64), neg[:, i] @ unit[i].astype(np.float64)
        c = cal[layer]
        assert c["split"] == "holdout" and (c["n_pos"], c["n_neg"]) == (len(pp), len(nn))
        assert c["pos_mean"] == pytest.approx(pp.mean(), abs=1e-9)
        assert c["pos_std"] == pytest.approx(pp.std(ddof=1), abs=1e-9)
        assert c["neg_mean"] == pytest.approx(nn.mean(), abs=1e-9)
        assert c["neg_std"] == pytest.approx(nn.std(ddof=1), abs=1e-9)
        assert c["pos_mean"] > c["neg_mean"] + 1.0
    # no held-out negatives: falls back to the train split and says so
    train_neg = [e for e in sets["joy"].negatives if e.split == "train"]
    cal2 = holdout_calibration(cache, ExampleSet("joy", sets["joy"].positives, train_neg), unit, LAYERS)
    assert cal2[2]["split"] == "train" and cal2[2]["n_neg"] == len(train_neg)


def test_train_readout_orders_rows_and_reports_all_refusals(world):
    cache, sets, _ = world
    ro = train_readout(sets, cache, LAYERS)
    assert ro.concepts == ["ire", "joy"] and ro.layers == LAYERS
    joy, _, _ = train_directions(cache, sets["joy"], LAYERS)
    for i, layer in enumerate(LAYERS):
        assert ro.vectors[layer].shape == (2, H) and ro.vectors[layer].dtype == np.float32
        np.testing.assert_array_equal(ro.vectors[layer][1], joy[i])
    assert set(ro.calibration) == {"ire", "joy"} and set(ro.calibration["joy"]) == set(LAYERS)
    assert ro.counts["joy"]["train_positives"] > 0 and len(ro.raw_norms["ire"]) == 3

    ordered = train_readout(sets, cache, LAYERS, order=["joy", "ire"])
    np.testing.assert_array_equal(ordered.vectors[5][0], ro.vectors[5][1])

    bad = dict(sets, lonely=ExampleSet("lonely", sets["ire"].positives, []),
               numb=ExampleSet("numb", sets["ire"].positives, sets["ire"].positives))
    with pytest.raises(TrainingDataError) as info:
        train_readout(bad, cache, LAYERS)
    assert "'lonely'" in str(info.value) and "'numb'" in str(info.value)
    kept = train_readout(bad, cache, LAYERS, skip_invalid=True)
    assert kept.concepts == ["ire", "joy"] and len(kept.skipped) == 2


def test_train_readout_from_stored_stats_equals_the_cache_pass(world):
    """The pipeline trains from activation_stats' saved statistics; the result must not differ."""
    cache, sets, _ = world
    stats = {name: emotion_stats(cache, s, "train", layers=LAYERS) for name, s in sets.items()}
    from_cache = train_readout(sets, cache, LAYERS, threshold_method="fixed_fpr", target_fpr=0.1)
    from_stats = train_readout(sets, cache, LAYERS, stats=stats, threshold_method="fixed_fpr", target_fpr=0.1)
    assert from_stats.concepts == from_cache.concepts and from_stats.counts == from_cache.counts
    for layer in LAYERS:
        np.testing.assert_array_equal(from_stats.vectors[layer], from_cache.vectors[layer])
    assert from_stats.calibration == from_cache.calibration
    assert from_stats.calibration["joy"][LAYERS[0]]["threshold_method"] == "fixed_fpr"
    with pytest.raises(ValueError, match="mean-difference"):
        train_readout(sets, cache, LAYERS, "lda", stats=stats)


def test_projection_and_calibrated_scores(world):
    cache, sets, acts = world
    ro = train_readout(sets, cache, LAYERS)
    tokens = torch.randn(6, H)
    out = project({5: tokens, 3: torch.randn(2, H)}, ro)
    assert list(out) == [5]  # layer 3 is not hooked
    np.testing.assert_allclose(out[5].numpy(), tokens.numpy() @ ro.vectors[5].T, atol=1e-5)
    manifest = {
        "concepts": ro.concepts,
        "per_concept": {c: {"layers": {str(layer): {"calibration": ro.calibration[c][layer]} for layer in LAYERS}}
                        for c in ro.concepts},
    }
    z = calibrated_scores(out[5], manifest, 5)
    cal = ro.calibration["joy"][5]
    np.testing.assert_allclose(z[:, 1], (out[5][:, 1].double().numpy() - cal["neg_mean"]) / cal["neg_std"])
    # a held-out positive of joy scores well above its negatives
    pos_key = next(e.key for e in sets["joy"].positives if e.split == "holdout")
    zpos = calibrated_scores(project({5: acts[pos_key][1][None]}, ro)[5], manifest, 5)
    assert zpos[0, 1] > 1.0
