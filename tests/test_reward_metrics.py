"""Numeric tests for alignpipe.evaluation.reward_metrics: hand-computed values, limiting cases, brute force."""

import itertools
import json
import math
import warnings

import numpy as np
import pytest

from alignpipe.evaluation.metrics import MetricValue
from alignpipe.evaluation.reward_metrics import (
    average_ranks,
    brier_score,
    bt_probabilities,
    expected_calibration_error,
    max099_scale,
    negative_log_likelihood,
    pairwise_accuracy,
    reliability_table,
    spearman,
    stratified_uncertainty_auroc,
    uncertainty_auroc,
)

# Small resample counts keep every test well under a second; CI logic is the same at 1000.
R = 200

# ------------------------------------------------------------------------------------------ pairwise_accuracy


def test_accuracy_tie_counts_as_wrong():
    m = pairwise_accuracy([1, 2, 3], [0, 2, 4], resamples=R)
    assert isinstance(m, MetricValue)
    assert m.value == pytest.approx(1 / 3)
    assert m.n == 3
    assert m.higher_is_better is True
    assert m.extra["n_correct"] == 1
    assert m.extra["n_ties"] == 1
    lo, hi = m.ci95
    assert 0.0 <= lo <= m.value <= hi <= 1.0
    json.dumps(m.to_dict())


def test_accuracy_ci_is_seeded_and_brackets_value():
    rng = np.random.default_rng(1)
    c, r = rng.normal(size=300) + 0.5, rng.normal(size=300)
    a, b = pairwise_accuracy(c, r, seed=4, resamples=R), pairwise_accuracy(c, r, seed=4, resamples=R)
    assert a.ci95 == b.ci95
    assert a.ci95[0] < a.value < a.ci95[1]


def test_accuracy_rejects_mismatched_or_nonfinite():
    with pytest.raises(ValueError):
        pairwise_accuracy([1, 2], [1, 2, 3])
    with pytest.raises(ValueError):
        pairwise_accuracy([1, float("nan")], [0, 0])


# ------------------------------------------------------------------------------------------ bt_probabilities


def test_bt_probabilities_unit_scale_is_sigmoid_of_difference():
    p = bt_probabilities([1.0, 0.0, 3.0], [0.0, 0.0, 5.0])
    expected = [1 / (1 + math.exp(-1)), 0.5, 1 / (1 + math.exp(2))]
    np.testing.assert_allclose(p, expected, rtol=1e-14)
    np.testing.assert_allclose(bt_probabilities([1.0], [0.0], scale=2.0), [1 / (1 + math.exp(-2))], rtol=1e-14)


def test_bt_probabilities_is_stable_for_huge_differences():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no overflow warning from exp()
        p = bt_probabilities([1000.0, -1000.0], [0.0, 0.0])
    assert p[0] == 1.0 and 0.0 <= p[1] < 1e-300
    assert np.all(np.isfinite(p))


def test_max099_maps_largest_abs_difference_to_099():
    # diffs [2, -4, 1]: the largest |d| is 4 (favouring rejected) -> p = 0.01; d = 2 -> σ(ln(99)/2) = √99/(√99+1).
    c, r = [2.0, 0.0, 1.0], [0.0, 4.0, 0.0]
    assert max099_scale(c, r) == pytest.approx(math.log(99) / 4)
    p = bt_probabilities(c, r, scale="max099")
    assert max(p.max(), 1 - p.min()) == pytest.approx(0.99, abs=1e-12)
    assert p[1] == pytest.approx(0.01, abs=1e-12)
    assert p[0] == pytest.approx(math.sqrt(99) / (math.sqrt(99) + 1), abs=1e-12)
    # positive largest difference -> exactly 0.99 on the chosen side
    assert bt_probabilities([0.0, 7.5], [0.0, 0.0], scale="max099")[1] == pytest.approx(0.99, abs=1e-12)


def test_max099_all_zero_differences_gives_half():
    np.testing.assert_array_equal(bt_probabilities([1.0, 2.0], [1.0, 2.0], scale="max099"), [0.5, 0.5])


def test_bt_probabilities_rejects_bad_scale():
    for bad in (0.0, -1.0, float("inf"), "max1"):
        with pytest.raises(ValueError):
            bt_probabilities([1.0], [0.0], scale=bad)


# ------------------------------------------------------------------------------------------------ ECE


HAND_P = [0.9, 0.9, 0.9, 0.9, 0.6, 0.6]
HAND_Y = [1, 1, 1, 0, 1, 1]
HAND_ECE = abs(0.75 - 0.9) * 4 / 6 + abs(1.0 - 0.6) * 2 / 6  # 0.1 + 0.1333 = 0.2333


def test_ece_hand_case():
    m = expected_calibration_error(HAND_P, HAND_Y, bins=10, resamples=R)
    assert m.value == pytest.approx(HAND_ECE, abs=1e-12)
    assert m.value == pytest.approx(0.23333333333, abs=1e-9)
    assert m.higher_is_better is False
    assert m.n == 6
    assert m.extra["bins"] == 10
    assert m.extra["mce"] == pytest.approx(0.4)
    assert m.extra["accuracy"] == pytest.approx(5 / 6)
    assert m.extra["mean_confidence"] == pytest.approx((4 * 0.9 + 2 * 0.6) / 6)
    assert m.ci95[0] <= m.ci95[1]
    json.dumps(m.to_dict())


def test_ece_uses_predicted_side_confidence():
    # p = 0.1 with y = 0 is a confident *right* prediction (confidence 0.9): mirror image of the hand case.
    mirrored = expected_calibration_error([1 - p for p in HAND_P], [1 - y for y in HAND_Y], bins=10, resamples=R)
    assert mirrored.value == pytest.approx(HAND_ECE, abs=1e-12)
    # p = 0.1 with y = 1 (every label says chosen wins): confidence 0.9 on the wrong side -> gap 0.9.
    wrong = expected_calibration_error([0.1] * 5, [1] * 5, bins=10, resamples=R)
    assert wrong.value == pytest.approx(0.9)
    assert wrong.extra["accuracy"] == 0.0


def test_ece_tie_probability_gets_half_credit():
    m = expected_calibration_error([0.5, 0.5], [1, 1], bins=15, resamples=R)
    assert m.value == pytest.approx(0.0)


def test_ece_perfectly_calibrated_synthetic_is_small():
    rng = np.random.default_rng(0)
    p = rng.uniform(size=20_000)
    y = (rng.uniform(size=p.size) < p).astype(float)
    assert expected_calibration_error(p, y, bins=15, resamples=50).value < 0.02


def test_ece_overconfident_synthetic_is_large():
    # True P(y = 1) = p but the model reports p pushed towards 0/1: the same test data must then fail the bound.
    rng = np.random.default_rng(0)
    p = rng.uniform(size=20_000)
    y = (rng.uniform(size=p.size) < p).astype(float)
    over = np.where(p > 0.5, 0.99, 0.01)  # confidence 0.99, accuracy E[max(p, 1 - p)] = 0.75
    m = expected_calibration_error(over, y, bins=15, resamples=50)
    assert m.value > 0.2
    assert m.extra["overconfidence"] > 0.2


def test_ece_with_bt_labels_all_ones_and_max099():
    # Typical RM use: outcome = 1 for every labelled pair, probabilities from rescaled reward differences.
    c, r = np.array([3.0, 1.0, -1.0, 0.5]), np.zeros(4)
    p = bt_probabilities(c, r, scale="max099")
    m = expected_calibration_error(p, np.ones(4), bins=15, resamples=R)
    conf = np.maximum(p, 1 - p)
    corr = (p > 0.5).astype(float)
    manual = sum(
        abs((corr[mask] - conf[mask]).sum())
        for mask in [(conf > k / 15) & (conf <= (k + 1) / 15) for k in range(15)]
    ) / 4
    assert m.value == pytest.approx(manual, abs=1e-12)


def test_ece_bootstrap_is_seeded():
    rng = np.random.default_rng(3)
    p, y = rng.uniform(size=200), rng.integers(0, 2, size=200)
    a = expected_calibration_error(p, y, resamples=R, seed=9)
    b = expected_calibration_error(p, y, resamples=R, seed=9)
    assert a.ci95 == b.ci95 and a.ci95[0] < a.ci95[1]


def test_ece_rejects_bad_inputs():
    with pytest.raises(ValueError):
        expected_calibration_error([1.2], [1])
    with pytest.raises(ValueError):
        expected_calibration_error([0.7], [2])
    with pytest.raises(ValueError):
        expected_calibration_error([0.7], [1], bins=0)
    for bad in (2.5, "15", True):
        with pytest.raises(ValueError, match="bins must be a positive integer"):
            expected_calibration_error([0.7], [1], bins=bad)


def test_a_whole_float_bin_count_is_the_same_as_the_int():
    # A bin count read from YAML may arrive as 15.0; every binned metric accepts it and gives the int's result.
    p, y = [0.2, 0.55, 0.7, 0.9, 0.35], [0, 1, 1, 0, 1]
    assert expected_calibration_error(p, y, bins=10.0, resamples=R).value == \
        expected_calibration_error(p, y, bins=10, resamples=R).value
    assert reliability_table(p, y, bins=10.0) == reliability_table(p, y, bins=10)
    u, err, strata = [0.1, 0.9, 0.2, 0.8], [True, False, False, True], [1, 2, 3, 4]
    assert stratified_uncertainty_auroc(u, err, strata, bins=2.0, resamples=R).value == \
        stratified_uncertainty_auroc(u, err, strata, bins=2, resamples=R).value


# ----------------------------------------------------------------------------------------- reliability_table


def test_reliability_table_hand_case_and_consistency_with_ece():
    table = reliability_table(HAND_P, HAND_Y, bins=10)
    assert len(table) == 10
    assert [b["count"] for b in table] == [0, 0, 0, 0, 0, 2, 0, 0, 4, 0]
    assert table[5]["lo"] == pytest.approx(0.5) and table[5]["hi"] == pytest.approx(0.6)
    assert table[5]["mean_confidence"] == pytest.approx(0.6) and table[5]["accuracy"] == 1.0
    assert table[8]["mean_confidence"] == pytest.approx(0.9) and table[8]["accuracy"] == 0.75
    assert table[0]["mean_confidence"] is None and table[0]["accuracy"] is None
    ece = sum(b["count"] / 6 * abs(b["accuracy"] - b["mean_confidence"]) for b in table if b["count"])
    assert ece == pytest.approx(HAND_ECE, abs=1e-12)
    json.dumps(table)


def test_reliability_bins_are_right_closed():
    # 0.6 sits on the edge between (0.5, 0.6] and (0.6, 0.7]: it belongs to the lower bin; 1.0 to the top bin.
    table = reliability_table([0.6, 1.0, 0.0], [1, 1, 0], bins=10)
    assert table[5]["count"] == 1 and table[6]["count"] == 0
    assert table[9]["count"] == 2


# ------------------------------------------------------------------------------------------------ Brier / NLL


def test_brier_hand_value():
    m = brier_score([0.8, 0.3], [1, 0], resamples=R)
    assert m.value == pytest.approx(0.065)
    assert m.higher_is_better is False and m.n == 2


def test_nll_hand_value():
    m = negative_log_likelihood([0.8, 0.3], [1, 0], resamples=R)
    assert m.value == pytest.approx(-(math.log(0.8) + math.log(0.7)) / 2)
    assert m.higher_is_better is False


def test_nll_constant_half_is_ln2_and_saturation_is_finite():
    assert negative_log_likelihood([0.5] * 4, [1, 0, 1, 1], resamples=R).value == pytest.approx(math.log(2))
    m = negative_log_likelihood([0.0, 1.0], [1, 0], eps=1e-12, resamples=R)
    assert m.value == pytest.approx(-math.log(1e-12), rel=1e-9)
    # just short of saturation: 1 - p = 1e-13 is floored at eps = 1e-12, so the loss is -ln(1e-12) = 27.631021
    # (adding eps to 1 - p instead would give -ln(1.1e-12) = 27.536)
    near = negative_log_likelihood([1.0 - 1e-13], [0], eps=1e-12, resamples=R)
    assert near.value == pytest.approx(27.631021115928547, rel=1e-9)


# ---------------------------------------------------------------------------------------------------- AUROC


def brute_force_auroc(u, err):
    pos = [a for a, e in zip(u, err, strict=True) if e]
    neg = [a for a, e in zip(u, err, strict=True) if not e]
    total = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in itertools.product(pos, neg))
    return total / (len(pos) * len(neg))


def test_auroc_perfect_reversed_and_uninformative():
    err = [True, True, False, False, False]
    assert uncertainty_auroc([0.9, 0.8, 0.1, 0.2, 0.3], err, resamples=R).value == 1.0
    assert uncertainty_auroc([0.0, 0.1, 0.5, 0.6, 0.7], err, resamples=R).value == 0.0
    flat = uncertainty_auroc([0.4] * 5, err, resamples=R)
    assert flat.value == 0.5
    assert flat.higher_is_better is True


def test_auroc_hand_case_with_tie():
    # errors u = [0.9, 0.5], correct u = [0.5, 0.1]: pairs 1 + 1 + 0.5 (tie) + 1 = 3.5 of 4.
    m = uncertainty_auroc([0.9, 0.5, 0.5, 0.1], [1, 1, 0, 0], resamples=R)
    assert m.value == pytest.approx(0.875)
    assert m.extra["n_errors"] == 2 and m.extra["n_correct"] == 2


def test_auroc_matches_brute_force_on_random_data_with_ties():
    rng = np.random.default_rng(5)
    u = rng.integers(0, 6, size=120).astype(float)  # many ties
    err = rng.uniform(size=120) < 0.3
    m = uncertainty_auroc(u, err, resamples=R)
    assert m.value == pytest.approx(brute_force_auroc(u, err), abs=1e-12)
    assert m.ci95[0] < m.value < m.ci95[1]
    assert m.extra["n_skipped_resamples"] == 0


def test_auroc_skips_single_class_resamples():
    # One error in 3 pairs: P(resample has no error) = (2/3)^3 ≈ 0.30, so some resamples must be skipped.
    m = uncertainty_auroc([0.9, 0.1, 0.2], [True, False, False], resamples=R, seed=0)
    assert m.value == 1.0
    assert 0 < m.extra["n_skipped_resamples"] < R
    assert m.ci95 == (1.0, 1.0)


def test_auroc_requires_both_classes():
    with pytest.raises(ValueError):
        uncertainty_auroc([0.1, 0.2], [False, False])
    with pytest.raises(ValueError):
        uncertainty_auroc([0.1, 0.2], [1, 2])


def test_stratified_auroc_compares_errors_only_with_correct_items_of_the_same_bin():
    # Given in shuffled order; sorted by strata the items are
    #   strata 1..3 (bin 0): u 0.9 (error), 0.1, 0.5 -> the error beats both: 2 of 2
    #   strata 4..6 (bin 1): u 0.6 (error), 0.2, 0.8 -> beats 0.2, loses to 0.8: 1 of 2
    # pooled: 3 / 4. The plain AUROC also compares across bins: 0.9 beats 4, 0.6 beats 3 -> 7 / 8.
    strata = [4, 1, 6, 3, 2, 5]
    u = [0.6, 0.9, 0.8, 0.5, 0.1, 0.2]
    err = [True, True, False, False, False, False]
    m = stratified_uncertainty_auroc(u, err, strata, bins=2, resamples=R)
    assert m.value == pytest.approx(0.75)
    assert uncertainty_auroc(u, err, resamples=R).value == pytest.approx(0.875)
    assert m.extra["bins"] == 2 and m.n == 6 and m.higher_is_better is True


def test_stratified_auroc_of_a_score_that_only_tracks_the_strata_is_uninformative():
    # u is a function of strata alone: within each bin it is constant, so at a fixed strata value it says nothing
    # (ties count 1/2). Unstratified, the same u is a perfect (inverted) detector when errors sit at small strata.
    strata = np.repeat([1.0, 2.0, 3.0], 4)
    u = 2.0 * strata
    err = np.tile([True, False, False, True], 3)
    assert stratified_uncertainty_auroc(u, err, strata, bins=3, resamples=R).value == pytest.approx(0.5)
    err_small = strata < 2
    assert uncertainty_auroc(u, err_small, resamples=R).value == 0.0


def _brute_force_stratified_auroc(u, err, strata, bins: int) -> float:
    n = len(u)
    order = sorted(range(n), key=lambda i: strata[i])  # stable, like the function's sort
    bin_of = {i: position * bins // n for position, i in enumerate(order)}
    wins = comparisons = 0.0
    for i in range(n):
        for j in range(n):
            if err[i] and not err[j] and bin_of[i] == bin_of[j]:
                wins += 1.0 if u[i] > u[j] else 0.5 if u[i] == u[j] else 0.0
                comparisons += 1
    return wins / comparisons if comparisons else math.nan


def test_stratified_auroc_matches_brute_force_on_random_data_with_ties():
    rng = np.random.default_rng(11)
    n, bins = 97, 4
    u = rng.integers(0, 5, size=n).astype(float)  # many ties in the score
    strata = rng.integers(0, 30, size=n).astype(float)  # and in the strata (stable order breaks them)
    err = rng.uniform(size=n) < 0.35
    m = stratified_uncertainty_auroc(u, err, strata, bins=bins, resamples=R)
    assert m.value == pytest.approx(_brute_force_stratified_auroc(u, err, strata, bins), abs=1e-12)
    assert m.ci95[0] <= m.value <= m.ci95[1]


def test_stratified_auroc_ci_with_prompt_groups_matches_brute_force_on_every_resample():
    """A cluster resample is shorter or longer than the data; its items keep the whole data's ranks. Keying the bins
    by the resample's length let a high rank spill into the next bin (28 of 200 resamples were wrong here)."""
    from alignpipe.evaluation.metrics import group_resamples

    rng = np.random.default_rng(0)
    groups = np.repeat(np.arange(20), rng.integers(1, 6, 20))[:60]  # prompts with 1-5 pairs each
    n, bins, resamples = groups.size, 5, 200
    u = rng.normal(size=n)
    err = rng.uniform(size=n) < 0.35
    strata = rng.uniform(size=n)
    rows = group_resamples(list(groups), resamples, seed=0)
    assert any(len(row) < n for row in rows)
    expected = np.array([_brute_force_stratified_auroc(u[row], err[row], strata[row], bins) for row in rows])
    m = stratified_uncertainty_auroc(u, err, strata, bins=bins, resamples=resamples, seed=0, groups=list(groups))
    finite = expected[np.isfinite(expected)]
    assert m.ci95 == pytest.approx(tuple(np.quantile(finite, [0.025, 0.975])), abs=1e-12)
    assert m.extra["n_skipped_resamples"] == resamples - finite.size


def test_stratified_auroc_needs_a_bin_with_both_classes():
    with pytest.raises(ValueError, match="bin"):
        stratified_uncertainty_auroc([0.1, 0.9, 0.2, 0.8], [True, True, False, False], [1, 2, 3, 4], bins=2)
    with pytest.raises(ValueError, match="shape"):
        stratified_uncertainty_auroc([0.1, 0.9], [True, False], [1, 2, 3])


# ------------------------------------------------------------------------------------------------- spearman


def brute_force_average_ranks(x):
    return [sum(1.0 for b in x if b < a) + (sum(1.0 for b in x if b == a) + 1) / 2 for a in x]


def brute_force_pearson(a, b):
    ma, mb = sum(a) / len(a), sum(b) / len(b)
    cov = sum((x - ma) * (y - mb) for x, y in zip(a, b, strict=True))
    va = sum((x - ma) ** 2 for x in a)
    vb = sum((y - mb) ** 2 for y in b)
    return cov / math.sqrt(va * vb)


def test_average_ranks_ties():
    np.testing.assert_array_equal(average_ranks([10, 20, 20, 30]), [1, 2.5, 2.5, 4])
    np.testing.assert_array_equal(average_ranks([3, 1, 3, 3]), [3, 1, 3, 3])
    rows = average_ranks(np.array([[1.0, 1.0, 2.0], [5.0, 4.0, 4.0]]))
    np.testing.assert_array_equal(rows, [[1.5, 1.5, 3], [3, 1.5, 1.5]])


def test_spearman_monotone_and_reversed():
    x = [1.0, 2.0, 5.0, 9.0, 10.0]
    assert spearman(x, [v**3 for v in x], resamples=R).value == pytest.approx(1.0)
    assert spearman(x, [-math.exp(v) for v in x], resamples=R).value == pytest.approx(-1.0)


def test_spearman_hand_case_with_ties():
    # ranks x = [1, 2.5, 2.5, 4], y = [1, 3, 2, 4] -> cov 4.5, var 4.5 and 5 -> rho = 3 / sqrt(10)
    x, y = [1, 2, 2, 3], [1, 3, 2, 4]
    m = spearman(x, y, resamples=R)
    assert m.value == pytest.approx(3 / math.sqrt(10), abs=1e-12)
    assert m.value == pytest.approx(
        brute_force_pearson(brute_force_average_ranks(x), brute_force_average_ranks(y)), abs=1e-12
    )
    assert m.n == 4 and m.higher_is_better is True


def test_spearman_matches_brute_force_on_random_data_with_ties():
    rng = np.random.default_rng(11)
    x = rng.integers(0, 8, size=60).astype(float)
    y = x + rng.integers(-3, 4, size=60)
    expected = brute_force_pearson(brute_force_average_ranks(list(x)), brute_force_average_ranks(list(y)))
    m = spearman(x, y, resamples=R)
    assert m.value == pytest.approx(expected, abs=1e-12)
    assert m.ci95[0] < m.value < m.ci95[1]
    assert spearman(x, y, higher_is_better=None, resamples=R).higher_is_better is None


def test_spearman_rejects_degenerate_inputs():
    with pytest.raises(ValueError):
        spearman([1.0], [2.0])
    with pytest.raises(ValueError):
        spearman([1.0, 1.0, 1.0], [1.0, 2.0, 3.0])


def test_spearman_skips_constant_resamples_instead_of_counting_them_as_zero():
    # A resample of 3 items is constant when all 3 draws hit one item: 3 of 27 outcomes, ~111 of 1000 (117 at seed 0).
    # Skipped, the remaining resamples all give rho = 1; counted as rho = 0 they would drag the CI's lower end down.
    s = spearman([1, 2, 3], [1, 2, 3], resamples=1000, seed=0)
    assert s.value == 1.0
    assert s.ci95 == (1.0, 1.0)
    assert s.extra["n_skipped_resamples"] == 117


def test_uncertainty_auroc_refuses_error_flags_other_than_0_and_1():
    with pytest.raises(ValueError, match="boolean or 0/1"):
        uncertainty_auroc([0.1, 0.2, 0.3], [0, 2, 1], resamples=R)
