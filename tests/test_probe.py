"""music2latent2.probe: the logistic probe, macro AUC against a brute-force count, splits."""

from __future__ import annotations

import numpy as np
import pytest

from music2latent2.probe import LinearProbe, evaluate_probe, fit_logistic_probe, macro_auc, stratified_split


def _brute_force_auc(y: np.ndarray, scores: np.ndarray) -> float:
    aucs = []
    for c in np.unique(y):
        pos, neg = scores[y == c, c], scores[y != c, c]
        wins = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
        aucs.append(wins / (len(pos) * len(neg)))
    return float(np.mean(aucs))


def test_macro_auc_counts_pairs_and_ties() -> None:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 4, 120)
    scores = rng.integers(0, 5, (120, 4)).astype(float)  # many ties
    assert macro_auc(y, scores) == pytest.approx(_brute_force_auc(y, scores), abs=1e-12)
    onehot = np.eye(4)[y]
    assert macro_auc(y, onehot) == 1.0 and macro_auc(y, -onehot) == 0.0
    assert macro_auc(y, np.zeros((120, 4))) == 0.5
    with pytest.raises(ValueError, match="two classes"):
        macro_auc(np.zeros(5, int), np.zeros((5, 2)))


def test_logistic_probe_learns_a_linear_rule_and_ignores_constant_features() -> None:
    rng = np.random.default_rng(1)
    n, d, k = 300, 20, 3
    y = rng.integers(0, k, n)
    x = rng.standard_normal((n, d)) + 3.0 * np.eye(k, d)[y]
    x[:, -1] = 7.0  # constant: standardising must not divide by zero
    probe = fit_logistic_probe(x[:200], y[:200], k, l2=1e-3)
    assert isinstance(probe, LinearProbe) and probe.weight.shape == (d, k)
    assert (probe.predict(x[200:]) == y[200:]).mean() > 0.95
    p = probe.predict_proba(x[200:])
    np.testing.assert_allclose(p.sum(1), 1.0, atol=1e-12)
    assert np.isfinite(probe.weight).all()
    # A stronger penalty gives smaller weights.
    assert np.abs(fit_logistic_probe(x, y, k, l2=1.0).weight).sum() < np.abs(probe.weight).sum()
    with pytest.raises(ValueError, match="out of range"):
        fit_logistic_probe(x, y, 2)
    with pytest.raises(ValueError, match="NaN"):
        fit_logistic_probe(np.full((4, 2), np.nan), np.array([0, 1, 0, 1]), 2)


def test_fitting_in_the_row_span_gives_the_direct_probe() -> None:
    rng = np.random.default_rng(4)
    y = np.repeat(np.arange(3), 10)
    x = rng.standard_normal((30, 80)) + np.eye(3, 80)[y]  # more features than rows
    fast = fit_logistic_probe(x, y, 3, l2=0.05)
    direct = fit_logistic_probe(x, y, 3, l2=0.05, in_row_span=False)
    test = rng.standard_normal((10, 80))
    np.testing.assert_allclose(fast.logits(test), direct.logits(test), atol=1e-4)
    np.testing.assert_allclose(fast.weight, direct.weight, atol=1e-4)


def test_stratified_split_is_seeded_and_keeps_every_class() -> None:
    y = np.repeat(np.arange(4), [2, 5, 8, 1])
    train, test = stratified_split(y, 0.25, seed=3)
    assert sorted(np.r_[train, test].tolist()) == list(range(len(y)))
    assert set(y[train]) == {0, 1, 2, 3} and set(y[test]) == {0, 1, 2}  # a lone item stays in train
    assert [int((y[test] == c).sum()) for c in range(3)] == [1, 1, 2]
    again = stratified_split(y, 0.25, seed=3)
    assert np.array_equal(train, again[0]) and np.array_equal(test, again[1])
    with pytest.raises(ValueError, match="test_fraction"):
        stratified_split(y, 1.0, seed=0)


def test_evaluate_probe_scores_signal_and_not_noise() -> None:
    rng = np.random.default_rng(2)
    y = np.repeat(np.arange(3), 40)
    signal = rng.standard_normal((120, 30)) + 4.0 * np.eye(3, 30)[y]
    noise = rng.standard_normal((120, 30))
    train, test = stratified_split(y, 0.3, seed=0)
    good = evaluate_probe(signal[train], y[train], signal[test], y[test], 3)
    bad = evaluate_probe(noise[train], y[train], noise[test], y[test], 3)
    assert good.accuracy > 0.9 and good.macro_auc > 0.97
    assert bad.accuracy < 0.6 and 0.3 < bad.macro_auc < 0.7
    # Group folds are used as given: with one fold the penalty is chosen on it alone.
    folds = [(np.arange(0, len(train), 2), np.arange(1, len(train), 2))]
    chosen = evaluate_probe(signal[train], y[train], signal[test], y[test], 3, validation=folds, l2_grid=(0.5,))
    assert chosen.l2 == 0.5 and 0 <= chosen.accuracy <= 1
