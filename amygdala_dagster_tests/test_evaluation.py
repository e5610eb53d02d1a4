"""Evaluation metrics and the evaluate() orchestration, on constructed data and a real activation cache."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest
from scipy.stats import mannwhitneyu
from sklearn.metrics import f1_score, roc_auc_score

from amygdala_dagster.engine.cache import ActivationCache, text_sha256
from amygdala_dagster.evaluation.core import DEFAULT_ESTIMATORS, calibration_for_manifest, evaluate
from amygdala_dagster.examples.selection import Example, ExampleSet
from amygdala_dagster.readout.metrics import (
    accuracy_at,
    auroc,
    bootstrap_auroc_ci,
    calibration,
    cohens_d,
    confusion_at,
    f1_at,
    probability,
    separation,
    threshold_fixed_fpr,
    threshold_max_f1,
    z_score,
)
from amygdala_dagster.readout.vectors import train_readout

# ----------------------------------------------------------------------------- AUROC


def _auroc_by_pairs(pos, neg):
    """Independent definition: fraction of (pos, neg) pairs ordered right, ties half."""
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in itertools.product(pos, neg))
    return wins / (len(pos) * len(neg))


@pytest.mark.parametrize(
    "pos,neg",
    [
        ([3.0, 4.0, 5.0], [0.0, 1.0, 2.0]),  # perfectly separable
        ([0.0, 1.0], [3.0, 4.0, 5.0]),  # perfectly inverted
        ([1.0, 2.0, 2.0, 3.0], [2.0, 2.0, 1.0, 0.5]),  # ties across classes
        ([1.0, 1.0, 1.0], [1.0, 1.0]),  # all tied
        ([0.3], [0.1, 0.3, 0.5]),
    ],
)
def test_auroc_matches_pairwise_definition_sklearn_and_mann_whitney(pos, neg):
    expected = _auroc_by_pairs(pos, neg)
    assert auroc(pos, neg) == pytest.approx(expected, abs=1e-12)
    y = [1] * len(pos) + [0] * len(neg)
    if len(set(pos + neg)) > 1:
        assert auroc(pos, neg) == pytest.approx(roc_auc_score(y, pos + neg), abs=1e-12)
    u = mannwhitneyu(pos, neg, alternative="two-sided").statistic
    assert auroc(pos, neg) == pytest.approx(u / (len(pos) * len(neg)), abs=1e-12)


def test_auroc_random_against_sklearn_and_edge_cases():
    rng = np.random.default_rng(1)
    for _ in range(20):
        pos = np.round(rng.normal(0.5, 1, size=rng.integers(1, 40)), 1)  # rounding makes ties
        neg = np.round(rng.normal(0.0, 1, size=rng.integers(1, 40)), 1)
        y = np.r_[np.ones(len(pos)), np.zeros(len(neg))]
        assert auroc(pos, neg) == pytest.approx(roc_auc_score(y, np.r_[pos, neg]), abs=1e-12)
    assert auroc([1.0, 2.0], [3.0]) == 0.0
    assert math.isnan(auroc([], [1.0]))
    with pytest.raises(ValueError, match="finite"):
        auroc([np.nan], [1.0])


def test_bootstrap_ci_reproducible_contains_point_and_degenerates_when_separable():
    rng = np.random.default_rng(2)
    pos, neg = rng.normal(1.0, 1, 25), rng.normal(0.0, 1, 30)
    ci = bootstrap_auroc_ci(pos, neg, n_boot=500, seed=7)
    assert ci == bootstrap_auroc_ci(pos, neg, n_boot=500, seed=7)
    assert ci[0] < auroc(pos, neg) < ci[1]
    # Independent loop bootstrap with the same resampling distribution gives a similar interval.
    vals = []
    rr = np.random.default_rng(3)
    for _ in range(500):
        vals.append(_auroc_by_pairs(rr.choice(pos, len(pos)), rr.choice(neg, len(neg))))
    lo, hi = np.quantile(vals, [0.025, 0.975])
    assert abs(lo - ci[0]) < 0.06 and abs(hi - ci[1]) < 0.06
    assert bootstrap_auroc_ci([2.0, 3.0], [0.0, 1.0], n_boot=200) == (1.0, 1.0)
    assert bootstrap_auroc_ci([1.0], [], n_boot=10) is None
    assert bootstrap_auroc_ci([1.0], [0.0, 2.0], n_boot=10) is None  # one positive: nothing to resample
    # Several score sets (layers) share one resampling: same intervals as one by one with the same seed.
    both = bootstrap_auroc_ci(np.stack([pos, pos * 2]), np.stack([neg, neg * 2]), n_boot=500, seed=7)
    assert both.shape == (2, 2)
    assert tuple(both[0]) == pytest.approx(ci) and tuple(both[1]) == pytest.approx(ci)


# ----------------------------------------------------------------------------- Cohen's d


def test_cohens_d_against_hand_computation():
    pos, neg = np.array([2.0, 4.0, 6.0, 8.0]), np.array([1.0, 2.0, 3.0])
    sp2, sn2 = np.var(pos, ddof=1), np.var(neg, ddof=1)
    pooled = math.sqrt((3 * sp2 + 2 * sn2) / 5)
    assert cohens_d(pos, neg) == pytest.approx((5.0 - 2.0) / pooled)
    assert cohens_d(neg, pos) == pytest.approx(-(5.0 - 2.0) / pooled)
    assert cohens_d([1.0, 1.0], [0.0, 0.0]) == math.inf  # separable with no spread
    assert cohens_d([1.0, 1.0], [1.0]) == 0.0
    assert math.isnan(cohens_d([], [1.0]))


# ----------------------------------------------------------------------------- thresholds


def _brute_max_f1(pos, neg):
    best = None
    for t in sorted(set(pos) | set(neg), reverse=True):
        y = [1] * len(pos) + [0] * len(neg)
        pred = [1 if s >= t else 0 for s in list(pos) + list(neg)]
        f = f1_score(y, pred, zero_division=0)
        if best is None or f > best[0] + 1e-15:
            best = (f, t)
    return best


def test_max_f1_threshold_matches_brute_force_with_ties():
    rng = np.random.default_rng(4)
    for _ in range(25):
        pos = list(np.round(rng.normal(0.8, 1, rng.integers(1, 15)), 1))
        neg = list(np.round(rng.normal(0.0, 1, rng.integers(1, 15)), 1))
        f_best, t_best = _brute_max_f1(pos, neg)
        t = threshold_max_f1(pos, neg)
        y = [1] * len(pos) + [0] * len(neg)
        pred = [1 if s >= t else 0 for s in pos + neg]
        assert f1_score(y, pred, zero_division=0) == pytest.approx(f_best)
        # The midpoint rule: same classification as the best candidate, strictly below it.
        assert t <= t_best
        assert not any(t <= s < t_best for s in pos + neg)


def test_thresholds_perfectly_separable_and_fixed_fpr():
    pos, neg = [3.0, 4.0, 5.0], [0.0, 1.0, 2.0]
    assert threshold_max_f1(pos, neg) == pytest.approx(2.5)
    assert accuracy_at(pos, neg, 2.5) == 1.0
    neg20 = list(np.arange(20.0))
    pos5 = [100.0, 101.0, 9.5, 5.5, 0.5]
    t = threshold_fixed_fpr(pos5, neg20, 0.10)  # at most 2 of 20 negatives above
    assert sum(n >= t for n in neg20) == 2
    assert t == pytest.approx(17.5)  # midpoint between 18 (lowest allowed) and 17
    t0 = threshold_fixed_fpr(pos5, neg20, 0.0)
    assert sum(n >= t0 for n in neg20) == 0 and sum(p >= t0 for p in pos5) == 2
    # No candidate qualifies when the top score is a negative and FPR 0 is asked.
    t_none = threshold_fixed_fpr([0.0], [1.0], 0.0)
    assert t_none > 1.0
    with pytest.raises(ValueError):
        threshold_fixed_fpr([1.0], [0.0], 1.5)


def test_calibration_dict_and_scores():
    pos, neg = np.array([2.0, 3.0, 4.0]), np.array([0.0, 1.0, 1.0, 2.0])
    cal = calibration(pos, neg)
    assert cal["pos_mean"] == pytest.approx(3.0)
    assert cal["pos_std"] == pytest.approx(np.std(pos, ddof=1))
    assert cal["neg_mean"] == pytest.approx(1.0)
    assert cal["neg_std"] == pytest.approx(np.std(neg, ddof=1))
    assert (cal["n_pos"], cal["n_neg"], cal["threshold_method"]) == (3, 4, "max_f1")
    assert cal["threshold"] == pytest.approx(threshold_max_f1(pos, neg))
    fixed = calibration(pos, neg, threshold_method="fixed_fpr", target_fpr=0.25)
    assert fixed["threshold_method"] == "fixed_fpr" and fixed["target_fpr"] == 0.25
    assert z_score(1.0 + cal["neg_std"], cal["neg_mean"], cal["neg_std"]) == pytest.approx(1.0)
    p = probability(np.array([-10.0, 2.0, 10.0]), cal)
    assert p[0] < 0.01 and p[1] == pytest.approx(0.5) and p[2] > 0.99
    with pytest.raises(ValueError, match="threshold method"):
        calibration(pos, neg, threshold_method="youden")


def test_z_score_one_definition_broadcasts_and_refuses_zero_spread():
    raw = np.array([[1.0, 5.0, 3.0], [2.0, 6.0, 3.0]])  # [T, C]
    z = z_score(raw, np.array([1.0, 4.0, 3.0]), np.array([0.5, 2.0, 0.0]))
    np.testing.assert_allclose(z[:, :2], [[0.0, 0.5], [2.0, 1.0]])
    # No spread: no scale to invent (1.0 and 1e-6 disagreed by a factor of a million).
    assert np.isnan(z[:, 2]).all()
    assert np.isnan(z_score(2.0, 1.0, float("nan")))


def test_separation_agrees_with_sklearn_at_its_threshold():
    rng = np.random.default_rng(6)
    for method in ("max_f1", "fixed_fpr"):
        for _ in range(10):
            pos = np.round(rng.normal(0.7, 1, rng.integers(1, 20)), 1)
            neg = np.round(rng.normal(0.0, 1, rng.integers(1, 40)), 1)
            sep = separation(pos, neg, threshold_method=method, target_fpr=0.1)
            t = sep["calibration"]["threshold"]
            assert sep["auroc"] == pytest.approx(auroc(pos, neg), abs=1e-12)
            assert sep["confusion"] == confusion_at(pos, neg, t)
            assert sep["accuracy"] == pytest.approx(accuracy_at(pos, neg, t))
            assert sep["f1"] == pytest.approx(f1_at(pos, neg, t))
    assert separation([], [1.0])["calibration"] is None


def test_metrics_module_has_no_hand_written_ranking():
    """AUROC, ROC points, confusion counts, F1 and the threshold search come from scikit-learn."""
    import inspect

    from amygdala_dagster.readout import metrics

    src = inspect.getsource(metrics)
    for banned in ("argsort", "searchsorted", "average_ranks", "einsum"):
        assert banned not in src, banned


# ----------------------------------------------------------------------------- evaluate() on a real cache


LAYERS = [0, 1]
H = 16


def _fill_cache(tmp_path, texts_to_rows):
    cache = ActivationCache(tmp_path / "cache", {"model": "synthetic", "layers": LAYERS, "pooling": "mean"})
    shas = [text_sha256(t) for t in texts_to_rows]
    cache.add(shas, np.stack(list(texts_to_rows.values())))
    cache.flush()
    return cache


def _synthetic(tmp_path, *, n=40, seed=0):
    """Two emotions with planted directions (joy at layer 1 strongly, at layer 0 weakly)."""
    rng = np.random.default_rng(seed)
    d_joy = rng.normal(size=H)
    d_joy /= np.linalg.norm(d_joy)
    d_calm = rng.normal(size=H)
    d_calm /= np.linalg.norm(d_calm)
    rows, sets = {}, {}
    for emotion, d in (("joy", d_joy), ("calm", d_calm)):
        pos, neg = [], []
        for i in range(n):
            for polarity, out in (("p", pos), ("n", neg)):
                text = f"{emotion} {polarity} example number {i} " + "x" * int(rng.integers(40, 80))
                a = rng.normal(size=(len(LAYERS), H))
                if polarity == "p":
                    a[0] += 0.4 * d
                    a[1] += 3.0 * d
                rows[text] = a
                split = "holdout" if i % 4 == 0 else "train"
                out.append(Example(f"{emotion}-{polarity}-{i}", text, "journal" if i % 2 else "digest",
                                   9.0 if polarity == "p" else None, split))
        sets[emotion] = ExampleSet(emotion, pos, neg)
    return _fill_cache(tmp_path, rows), sets, {"joy": d_joy, "calm": d_calm}


def test_evaluate_numbers_match_independent_recomputation(tmp_path):
    cache, sets, planted = _synthetic(tmp_path)
    readout = train_readout(sets, cache, LAYERS)
    ev = evaluate(cache, sets, readout, bootstrap=200, estimators=DEFAULT_ESTIMATORS)
    json.dumps(ev, allow_nan=False)  # strict JSON
    assert set(ev["emotions"]) == {"joy", "calm"}
    for emotion, res in ev["emotions"].items():
        ci = readout.concepts.index(emotion)
        hp = [e for e in sets[emotion].positives if e.split == "holdout"]
        hn = [e for e in sets[emotion].negatives if e.split == "holdout"]
        for li, layer in enumerate(LAYERS):
            v = readout.vectors[layer][ci].astype(np.float64)
            p = cache.get([text_sha256(e.text) for e in hp])[:, li].astype(np.float64) @ v
            n = cache.get([text_sha256(e.text) for e in hn])[:, li].astype(np.float64) @ v
            entry = res["layers"][str(layer)]
            y = np.r_[np.ones(len(p)), np.zeros(len(n))]
            assert entry["auroc"] == pytest.approx(roc_auc_score(y, np.r_[p, n]), abs=1e-9)
            assert entry["calibration"]["pos_mean"] == pytest.approx(p.mean())
            assert entry["calibration"]["neg_std"] == pytest.approx(n.std(ddof=1))
            assert (entry["n_pos"], entry["n_neg"]) == (len(hp), len(hn))
            lo, hi = entry["auroc_ci"]
            assert lo <= entry["auroc"] <= hi
        assert res["best_layer"] == 1  # the strongly planted layer
        assert res["layers"]["1"]["auroc"] > 0.95
        assert res["estimators"]["mean_difference"]["1"] == pytest.approx(res["layers"]["1"]["auroc"])
        for name in ("lda", "logistic"):
            assert res["estimators"][name]["1"] > 0.9
        assert "confound" not in ev["verdicts"][emotion]["flags"]
    assert ev["summary"]["recommended_layers"][0] == 1
    # Vectors of unrelated random directions: no cross-talk pair at 0.9.
    assert all(p["cosine"] >= 0.5 for p in ev["crosstalk"]["pairs"])
    cos = np.array(ev["crosstalk"]["cosine"]["1"])
    assert cos[0, 0] == pytest.approx(1.0)
    manifest_cal = calibration_for_manifest(ev)
    assert set(manifest_cal) == {"joy", "calm"}
    assert set(manifest_cal["joy"]) == {"0", "1"}
    assert manifest_cal["joy"]["1"]["threshold"] == ev["emotions"]["joy"]["layers"]["1"]["calibration"]["threshold"]


def test_evaluate_reads_only_the_cache(tmp_path):
    cache, sets, _ = _synthetic(tmp_path, n=12)
    readout = train_readout(sets, cache, LAYERS)
    extra = Example("new", "a text that was never forwarded", "journal", 9.0, "holdout")
    broken = dict(sets)
    broken["joy"] = ExampleSet("joy", [*sets["joy"].positives, extra], sets["joy"].negatives)
    with pytest.raises(KeyError, match="'new'"):
        evaluate(cache, broken, readout, bootstrap=0)


def test_confound_flag_fires_when_positives_differ_only_in_length(tmp_path):
    rng = np.random.default_rng(5)
    rows, pos, neg = {}, [], []
    for i in range(40):
        long_text = f"entry {i:03d} " + "the same words again " * 12
        short_text = f"entry {i:03d} " + "the same words again "
        rows[long_text] = rng.normal(size=(len(LAYERS), H))  # activations carry no signal
        rows[short_text] = rng.normal(size=(len(LAYERS), H))
        split = "holdout" if i % 3 == 0 else "train"
        pos.append(Example(f"p{i}", long_text, "journal", 9.0, split))
        neg.append(Example(f"n{i}", short_text, "journal", None, split))
    cache = _fill_cache(tmp_path, rows)
    sets = {"longing": ExampleSet("longing", pos, neg)}
    readout = train_readout(sets, cache, LAYERS)
    ev = evaluate(cache, sets, readout, bootstrap=0)
    conf = ev["emotions"]["longing"]["confounds"]
    assert conf["baseline_auroc"]["length"] == 1.0
    assert conf["baseline_auroc"]["node_type"] == 0.5  # one node type: no information
    assert ev["verdicts"]["longing"]["verdict"] == "do_not_use"
    assert "confound" in ev["verdicts"]["longing"]["flags"]
    confound = [f for f in ev["flags"] if f["kind"] == "confound"]
    assert len(confound) == 1 and "length" in confound[0]["message"]
    assert conf["text_length"]["positive"]["median"] > conf["text_length"]["negative"]["median"]


def test_fallback_calibration_on_train_when_holdout_lacks_a_class(tmp_path):
    cache, sets, _ = _synthetic(tmp_path, n=12)
    only_train_neg = [Example(e.key, e.text, e.node_type, e.score, "train") for e in sets["joy"].negatives]
    sets = {"joy": ExampleSet("joy", sets["joy"].positives, only_train_neg)}
    readout = train_readout(sets, cache, LAYERS)
    ev = evaluate(cache, sets, readout, bootstrap=0)
    entry = ev["emotions"]["joy"]["layers"]["1"]
    assert entry["auroc"] is None and entry["calibration"]["split"] == "train"
    assert [f["kind"] for f in ev["flags"]] == ["not_evaluable"]
    assert ev["verdicts"]["joy"]["verdict"] == "do_not_use"
    assert calibration_for_manifest(ev)["joy"]["1"]["n_neg"] == 12
