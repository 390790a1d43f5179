"""Best-of-n and overoptimisation maths (ALGORITHMS.md §15): the unbiased BoN estimator against brute force,
KL_bon hand values, and Gao et al.'s functional forms (peaks and least-squares fits)."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from alignpipe.evaluation.best_of_n import (
    OveroptimisationFit,
    best_of_n_curve,
    best_of_n_weights,
    fit_bon,
    fit_measured,
    fit_rl,
    gold_bon,
    gold_rl,
    kl_best_of_n,
    peak_bon,
    peak_rl,
    unbiased_best_of_n,
)


def brute_force_best_of_n(proxy, gold, n: int) -> float:
    """Mean over all size-n subsets of the gold of the proxy-best sample (ties broken uniformly at random)."""
    values = []
    for subset in itertools.combinations(range(len(proxy)), n):
        best = max(proxy[i] for i in subset)
        tied = [gold[i] for i in subset if proxy[i] == best]
        values.append(sum(tied) / len(tied))
    return sum(values) / len(values)


# --------------------------------------------------------------------------------------------------------------------
# Unbiased estimator
# --------------------------------------------------------------------------------------------------------------------

def test_hand_value_from_algorithms_md():
    # §15: N = 3, n = 2: (1/3)·2 + (2/3)·3 = 8/3, the mean of max over the pairs {1,2}, {1,3}, {2,3}
    assert unbiased_best_of_n([1, 2, 3], [1, 2, 3], 2) == pytest.approx(8 / 3, abs=1e-12)
    assert unbiased_best_of_n([3, 1, 2], [3, 1, 2], 2) == pytest.approx(8 / 3, abs=1e-12)  # input order is irrelevant


def test_limits_n_equals_one_and_n_equals_N():
    proxy = [0.3, -1.0, 2.0, 0.7]
    gold = [5.0, 1.0, -2.0, 4.0]
    assert unbiased_best_of_n(proxy, gold, 1) == pytest.approx(np.mean(gold), abs=1e-12)  # no selection
    assert unbiased_best_of_n(proxy, gold, 4) == pytest.approx(-2.0, abs=1e-12)  # gold of the proxy-best
    # gold ⟂ proxy-order: overoptimisation shows up as gold FALLING with n
    assert unbiased_best_of_n(proxy, gold, 3) < unbiased_best_of_n(proxy, gold, 1)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_brute_force_over_all_subsets(seed):
    rng = np.random.default_rng(seed)
    proxy = rng.normal(size=7)
    gold = proxy + rng.normal(size=7)
    for n in range(1, 8):
        assert unbiased_best_of_n(proxy, gold, n) == pytest.approx(brute_force_best_of_n(proxy, gold, n), abs=1e-12)


def test_ties_are_averaged_which_is_exact_for_random_tie_breaking_and_order_free():
    rng = np.random.default_rng(3)
    proxy = rng.integers(0, 3, size=7).astype(float)  # many ties
    gold = rng.normal(size=7)
    for n in range(1, 8):
        expected = brute_force_best_of_n(proxy, gold, n)
        assert unbiased_best_of_n(proxy, gold, n) == pytest.approx(expected, abs=1e-12)
        perm = rng.permutation(7)
        assert unbiased_best_of_n(proxy[perm], gold[perm], n) == pytest.approx(expected, abs=1e-12)
    # all tied: best-of-n is a random pick, so every n gives the mean gold
    assert unbiased_best_of_n([1.0, 1.0, 1.0], [0.0, 3.0, 6.0], 3) == pytest.approx(3.0, abs=1e-12)


def test_weights_are_exact_and_stable_for_large_N():
    for n in range(1, 21):
        w = best_of_n_weights(20, n)
        exact = [math.comb(i - 1, n - 1) / math.comb(20, n) for i in range(1, 21)]
        np.testing.assert_allclose(w, exact, rtol=1e-13, atol=0)
    big = 1000
    for n in (1, 2, 10, 100, 500, 999, 1000):
        w = best_of_n_weights(big, n)
        assert np.all(np.isfinite(w)) and np.all(w >= 0)
        assert w.sum() == pytest.approx(1.0, abs=1e-12)
        i = np.arange(n, big + 1)  # compare to log-binomials where they are representable
        log_exact = np.array([math.lgamma(k) - math.lgamma(n) - math.lgamma(k - n + 1) for k in i]) - (
            math.lgamma(big + 1) - math.lgamma(n + 1) - math.lgamma(big - n + 1)
        )
        ok = log_exact > -600
        np.testing.assert_allclose(w[n - 1 :][ok], np.exp(log_exact[ok]), rtol=1e-9)


def test_large_N_against_closed_form_expected_maximum():
    # max of a uniformly random n-subset of {1..N} has mean n(N + 1)/(n + 1)
    big = 1000
    scores = np.arange(1, big + 1, dtype=float)
    for n in (1, 4, 16, 64, 1000):
        assert unbiased_best_of_n(scores, scores, n) == pytest.approx(n * (big + 1) / (n + 1), rel=1e-12)


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match=r"n in \[1, N=3\]"):
        unbiased_best_of_n([1, 2, 3], [1, 2, 3], 4)
    with pytest.raises(ValueError, match=r"n in \[1, N=3\]"):
        unbiased_best_of_n([1, 2, 3], [1, 2, 3], 0)
    with pytest.raises(ValueError, match="differ in length"):
        unbiased_best_of_n([1, 2, 3], [1, 2], 1)
    with pytest.raises(ValueError, match="NaN"):
        unbiased_best_of_n([1, float("nan")], [1, 2], 1)


# --------------------------------------------------------------------------------------------------------------------
# Curves over n and prompts
# --------------------------------------------------------------------------------------------------------------------

def test_curve_for_one_prompt_and_averaged_over_prompts():
    rng = np.random.default_rng(4)
    proxy = rng.normal(size=(3, 8))
    gold = proxy + rng.normal(size=(3, 8))
    ns = [1, 2, 4, 8]
    one = best_of_n_curve(proxy[0], gold[0], ns)
    np.testing.assert_allclose(one, [unbiased_best_of_n(proxy[0], gold[0], n) for n in ns], atol=1e-12)
    per_prompt = np.array([[unbiased_best_of_n(p, g, n) for n in ns] for p, g in zip(proxy, gold)])
    np.testing.assert_allclose(best_of_n_curve(proxy, gold, ns), per_prompt.mean(0), atol=1e-12)
    # ragged: prompts with different N, each weighted equally
    ragged_p = [proxy[0], proxy[1, :5]]
    ragged_g = [gold[0], gold[1, :5]]
    expected = [(unbiased_best_of_n(proxy[0], gold[0], n) + unbiased_best_of_n(proxy[1, :5], gold[1, :5], n)) / 2
                for n in (1, 5)]
    np.testing.assert_allclose(best_of_n_curve(ragged_p, ragged_g, [1, 5]), expected, atol=1e-12)
    with pytest.raises(ValueError, match="prompt 1"):
        best_of_n_curve(ragged_p, ragged_g, [8])
    with pytest.raises(ValueError, match="prompts"):
        best_of_n_curve(proxy, gold[:2], ns)


# --------------------------------------------------------------------------------------------------------------------
# KL of best-of-n and Gao et al.'s forms
# --------------------------------------------------------------------------------------------------------------------

def test_kl_best_of_n_hand_values():
    expected = {1: 0.0, 2: 0.19315, 4: 0.63629, 16: 1.83509, 64: 3.17451}  # §15e
    for n, kl in expected.items():
        assert kl_best_of_n(n) == pytest.approx(kl, abs=5e-6)
    assert isinstance(kl_best_of_n(4), float)
    np.testing.assert_allclose(kl_best_of_n(np.array(list(expected))), list(expected.values()), atol=5e-6)
    with pytest.raises(ValueError, match="n >= 1"):
        kl_best_of_n(0)


def test_peaks_hand_values():
    assert peak_bon(1.0, 0.2) == pytest.approx((2.5, 1.25), abs=1e-12)  # α/(2β), α²/(4β)
    d_star, r_star = peak_rl(1.0, 0.2)
    assert d_star == pytest.approx(math.e**4, rel=1e-12)  # exp(α/β − 1) ≈ 54.6
    assert r_star == pytest.approx(0.2 * math.e**4, rel=1e-12)
    assert gold_rl(d_star, 1.0, 0.2) == pytest.approx(r_star, rel=1e-12)
    grid = np.linspace(0.0, 200.0, 20001)  # the analytic peaks are the curves' maxima
    assert gold_rl(grid, 1.0, 0.2).max() <= r_star + 1e-12
    assert gold_bon(grid, 1.0, 0.2).max() == pytest.approx(1.25, abs=1e-6)
    # no overoptimisation within the fit, and curves that never rise
    assert peak_bon(1.0, 0.0) == (math.inf, math.inf) and peak_rl(1.0, -0.1) == (math.inf, math.inf)
    assert peak_bon(-1.0, 0.2) == (0.0, 0.0) and peak_rl(-1.0, 0.0) == (0.0, 0.0)
    assert peak_rl(1000.0, 1.0) == (math.inf, math.inf)  # exp overflow


def test_fits_recover_coefficients_from_noiseless_points():
    d = np.sqrt(kl_best_of_n(np.array([1, 2, 4, 8, 16, 32, 64, 128])))  # includes d = 0
    fit = fit_bon(d, gold_bon(d, 1.0, 0.2))
    assert isinstance(fit, OveroptimisationFit)
    np.testing.assert_allclose(fit, (1.0, 0.2, 2.5, 1.25), rtol=1e-10)
    d = np.array([0.0, 0.5, 2.0, 5.0, 10.0, 30.0, 80.0])
    alpha, beta, peak_d, peak_r = fit_rl(d, gold_rl(d, 1.0, 0.2))
    np.testing.assert_allclose((alpha, beta), (1.0, 0.2), rtol=1e-10)
    assert peak_d == pytest.approx(math.e**4, rel=1e-8) and peak_r == pytest.approx(0.2 * math.e**4, rel=1e-8)


def test_a_fit_needs_three_distinct_d_above_zero():
    """Two points with d > 0 are matched exactly by either two-coefficient form, whatever their values, so they say
    nothing about the curve's shape; d = 0 (R(0) = 0 by construction) and a repeated d add nothing either."""
    d, r = np.array([0.0, 0.5, 2.0]), np.array([0.0, 0.9, -3.0])  # arbitrary gains: no Gao curve behind them
    for fitter, model in ((fit_rl, gold_rl), (fit_bon, gold_bon)):
        exact = fitter(d, r)
        np.testing.assert_allclose(model(d, exact.alpha, exact.beta), r, atol=1e-12)  # interpolated, not fitted
        fit, note = fit_measured(fitter, d, r)
        assert fit is None and note.startswith("2 points with distinct d > 0")
        assert fit_measured(fitter, [0.0, 0.5, 0.5, 2.0], [0.0, 0.9, 1.0, -3.0])[0] is None
    d = np.array([0.0, 0.5, 2.0, 5.0])
    fit, note = fit_measured(fit_rl, d, gold_rl(d, 1.0, 0.2))
    assert note is None and (fit.alpha, fit.beta) == (pytest.approx(1.0), pytest.approx(0.2))
    fit, note = fit_measured(fit_bon, [0.5, 1.0, math.nan], [0.1, 0.2, 0.3])
    assert fit is None and "2 points" in note  # a NaN d is no measured point


def test_fits_reject_underdetermined_or_bad_points():
    with pytest.raises(ValueError, match="cannot fit"):
        fit_bon([0.0, 1.0, 1.0], [0.0, 0.5, 0.5])  # one distinct d > 0
    with pytest.raises(ValueError, match="cannot fit"):
        fit_rl([0.0, 1.0], [0.0, 0.5])  # log 1 = 0
    with pytest.raises(ValueError, match=">= 0"):
        fit_bon([-1.0, 1.0, 2.0], [0.0, 0.5, 0.7])
    with pytest.raises(ValueError, match="differ in length"):
        fit_rl([1.0, 2.0], [0.5])
