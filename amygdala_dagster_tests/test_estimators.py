"""Direction estimators: each recovers a planted direction; registry and options."""

from __future__ import annotations

import numpy as np
import pytest

from amygdala_dagster.readout.estimators import (
    ESTIMATORS,
    DegenerateDirectionError,
    get_estimator,
    make_estimator,
    mean_difference,
    shrinkage_lda,
    unit_direction,
)

H = 48


def _planted(n_pos=300, n_neg=320, shift=2.0, seed=0, cov_root=None):
    rng = np.random.default_rng(seed)
    d = rng.normal(size=H)
    d /= np.linalg.norm(d)
    offset = rng.normal(size=H) * 3.0  # a shared offset the direction must ignore
    noise_p = rng.normal(size=(n_pos, H))
    noise_n = rng.normal(size=(n_neg, H))
    if cov_root is not None:
        noise_p, noise_n = noise_p @ cov_root.T, noise_n @ cov_root.T
    pos = (offset + noise_p + shift * d).astype(np.float32)
    neg = (offset + noise_n).astype(np.float32)
    return pos, neg, d


@pytest.mark.parametrize("name", ["mean_difference", "lda", "logistic"])
def test_each_estimator_recovers_a_planted_direction(name):
    pos, neg, d = _planted()
    u, norm = unit_direction(get_estimator(name)(pos, neg), name)
    assert norm > 0
    assert np.linalg.norm(u) == pytest.approx(1.0)
    assert u @ d > 0.9, f"{name}: cosine {u @ d:.3f} with the planted direction"
    # Points from negatives towards positives.
    assert (pos.astype(np.float64) @ u).mean() > (neg.astype(np.float64) @ u).mean()


def test_lda_whitens_correlated_noise_better_than_mean_difference():
    """With a high-variance nuisance axis tilted into the signal, LDA recovers Sigma^-1 * delta."""
    rng = np.random.default_rng(3)
    basis, _ = np.linalg.qr(rng.normal(size=(H, H)))
    scales = np.ones(H)
    scales[0] = 8.0  # one loud nuisance direction
    cov_root = basis @ np.diag(scales)
    pos, neg, d = _planted(n_pos=400, n_neg=400, shift=0.8, seed=3, cov_root=cov_root)
    # Mix the planted direction with the loud axis so mean-difference and LDA disagree.
    sigma = cov_root @ cov_root.T
    ideal = np.linalg.solve(sigma, d)
    ideal /= np.linalg.norm(ideal)
    u_lda, _ = unit_direction(shrinkage_lda(pos, neg), "lda")
    u_md, _ = unit_direction(mean_difference(pos, neg), "md")
    assert u_lda @ ideal > 0.85

    def separation(u):
        p, n = pos.astype(np.float64) @ u, neg.astype(np.float64) @ u
        return (p.mean() - n.mean()) / np.sqrt((p.var() + n.var()) / 2)

    assert separation(u_lda) >= separation(u_md) - 1e-9


def test_estimators_work_with_fewer_examples_than_dimensions():
    pos, neg, d = _planted(n_pos=10, n_neg=12, shift=4.0, seed=1)
    for name in ("lda", "logistic"):
        u, _ = unit_direction(get_estimator(name)(pos, neg), name)
        assert np.all(np.isfinite(u))
        assert u @ d > 0.5, name


def test_registry_options_and_refusals():
    assert {"mean_difference", "lda", "logistic"} <= set(ESTIMATORS)
    pos, neg, d = _planted(seed=2)
    strong = make_estimator("logistic", C=1e-4)
    weak = make_estimator("logistic", C=100.0)
    u_s, _ = unit_direction(strong(pos, neg), "strong")
    u_w, _ = unit_direction(weak(pos, neg), "weak")
    assert not np.allclose(u_s, u_w)  # C really reaches the fit
    assert u_s @ d > 0.9  # heavy regularisation ~ scaled mean difference
    with pytest.raises(ValueError, match="takes no options"):
        make_estimator("lda", C=1.0)
    with pytest.raises(ValueError, match="unknown estimator"):
        make_estimator("pca")
    with pytest.raises(DegenerateDirectionError, match="lda"):
        shrinkage_lda(np.zeros((0, H)), neg)
    with pytest.raises(ValueError, match="expected pos"):
        get_estimator("logistic")(pos, neg[:, :3])
    # Identical classes: mean difference and LDA give a zero direction, refused by unit_direction.
    same = np.ones((5, H))
    with pytest.raises(DegenerateDirectionError):
        unit_direction(shrinkage_lda(same, same), "flat")
    # Existing default unchanged.
    assert np.allclose(mean_difference(pos, neg), pos.astype(np.float64).mean(0) - neg.astype(np.float64).mean(0))


@pytest.mark.parametrize("n,h", [(20, 64), (150, 12)])  # Woodbury path and direct path
def test_lda_equals_ledoit_wolf_solve(n, h):
    from sklearn.covariance import ledoit_wolf

    rng = np.random.default_rng(n)
    mix = rng.normal(size=(h, h)) * 0.4
    pos = rng.normal(size=(n, h)) @ mix + 0.3
    neg = rng.normal(size=(n + 5, h)) @ mix
    centred = np.concatenate([pos - pos.mean(0), neg - neg.mean(0)])
    cov, _ = ledoit_wolf(centred, assume_centered=True)
    expected = np.linalg.solve(cov, pos.mean(0) - neg.mean(0))
    np.testing.assert_allclose(shrinkage_lda(pos, neg), expected, rtol=1e-7, atol=1e-9 * np.abs(expected).max())
