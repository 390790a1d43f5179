"""Numeric tests for alignpipe.evaluation.metrics: hand-computed values, limiting cases, exact expectations."""

import json
import math

import numpy as np
import pytest

from alignpipe.evaluation.metrics import (
    MetricValue,
    bootstrap_ci,
    kl_k1,
    kl_k3,
    length_delta,
    length_stats,
    mean_with_ci,
    order_averaged_preference,
    paired_delta,
    policy_entropy,
    reward_delta,
    sequence_kl_k3,
    win_rate,
)

# ----------------------------------------------------------------------------------------------- bootstrap_ci


def test_bootstrap_constant_sample_gives_degenerate_ci():
    assert bootstrap_ci([2.5] * 50) == (2.5, 2.5)


def test_bootstrap_matches_normal_approximation_on_bernoulli_sample():
    # 400 draws with 100 ones: p = 0.25, se = sqrt(0.25 * 0.75 / 400) = 0.0216506, 1.96 * se = 0.0424352
    # -> normal-approx 95% CI (0.2075648, 0.2924352).
    x = np.array([1.0] * 100 + [0.0] * 300)
    lo, hi = bootstrap_ci(x, resamples=2000, seed=0)
    assert lo == pytest.approx(0.2075648, abs=0.01)
    assert hi == pytest.approx(0.2924352, abs=0.01)
    assert lo <= x.mean() <= hi


def test_bootstrap_large_sample_chunked_path_matches_normal_approximation():
    # n = 10_000 forces the resamples into several chunks. Mean of U(0, 1): se = sqrt(1/12 / 1e4) = 0.0028868.
    x = np.random.default_rng(7).uniform(size=10_000)
    lo, hi = bootstrap_ci(x, resamples=1000, seed=3)
    se = math.sqrt(1 / 12 / 10_000)
    assert lo == pytest.approx(x.mean() - 1.96 * se, abs=0.001)
    assert hi == pytest.approx(x.mean() + 1.96 * se, abs=0.001)


def test_bootstrap_percentile_definition_on_enumerable_case():
    # Sample [0, 1]: the bootstrap mean is 0, 0.5, 1 with probability 1/4, 1/2, 1/4.
    # 95% CI -> (2.5% quantile, 97.5% quantile) = (0, 1); alpha = 0.6 -> (30%, 70%) quantiles, both 0.5.
    assert bootstrap_ci([0.0, 1.0], resamples=4000, seed=1) == (0.0, 1.0)
    assert bootstrap_ci([0.0, 1.0], resamples=4000, seed=1, alpha=0.6) == (0.5, 0.5)


def test_bootstrap_seeding_is_deterministic():
    x = np.random.default_rng(11).normal(size=200)  # continuous, so two seeds cannot land on the same grid point
    assert bootstrap_ci(x, seed=5) == bootstrap_ci(x, seed=5)
    assert bootstrap_ci(x, seed=5) != bootstrap_ci(x, seed=6)


def test_bootstrap_custom_statistic_and_alpha():
    x = np.random.default_rng(2).exponential(size=301)
    lo, hi = bootstrap_ci(x, statistic=np.median, seed=0)
    assert lo <= np.median(x) <= hi
    lo90, hi90 = bootstrap_ci(x, statistic=np.median, seed=0, alpha=0.1)
    assert lo <= lo90 and hi90 <= hi  # same resamples, inner quantiles


@pytest.mark.parametrize("bad", [[], [1.0, float("nan")], [[1.0, 2.0]]])
def test_bootstrap_rejects_empty_nonfinite_or_2d(bad):
    with pytest.raises(ValueError):
        bootstrap_ci(bad)


# ------------------------------------------------------------------------------------- MetricValue, mean_with_ci


def test_mean_with_ci_hand_case():
    m = mean_with_ci([1, 2, 3, 4], higher_is_better=True)
    # mean 2.5; sample sd = sqrt((2.25 + 0.25 + 0.25 + 2.25) / 3) = sqrt(5/3); stderr = sqrt(5/3) / 2 = 0.6454972
    assert m.value == 2.5 and m.n == 4 and m.higher_is_better is True
    assert m.extra["stderr"] == pytest.approx(0.6454972243679028, rel=1e-12)
    assert m.ci95[0] <= 2.5 <= m.ci95[1]


def test_mean_with_ci_single_value_has_no_stderr():
    m = mean_with_ci([3.0], higher_is_better=None)
    assert m.ci95 == (3.0, 3.0) and "stderr" not in m.extra


def test_metric_value_to_dict_is_plain_json():
    m = MetricValue(np.float32(0.5), (np.float64(0.25), 0.75), np.int64(10), True, {"n_wins": np.int64(3)})
    d = m.to_dict()
    assert d == {"value": 0.5, "ci95": [0.25, 0.75], "n": 10, "higher_is_better": True, "n_wins": 3}
    assert json.loads(json.dumps(d)) == d
    assert MetricValue(1.0, None, 1, None).to_dict()["ci95"] is None


def test_metric_value_rejects_bad_fields():
    with pytest.raises(ValueError, match="overwrite"):
        MetricValue(1.0, None, 1, True, {"value": 2.0})
    with pytest.raises(ValueError, match="lower bound"):
        MetricValue(1.0, (2.0, 1.0), 1, True)


# --------------------------------------------------------------------------------------------------- win rate


def test_win_rate_hand_case():
    m = win_rate([1, 1, 0, 0.5])
    assert m.value == 0.625  # (1 + 1 + 0 + 0.5) / 4
    assert (m.extra["n_wins"], m.extra["n_losses"], m.extra["n_ties"]) == (2, 1, 1)
    assert m.n == 4 and m.higher_is_better is True
    assert m.extra["stderr"] == pytest.approx(0.23935677693908453, rel=1e-12)  # sqrt(0.6875 / 3) / 2
    assert m.ci95[0] <= 0.625 <= m.ci95[1]


def test_win_rate_counts_continuous_preferences():
    m = win_rate([0.9, 0.6, 0.2, 0.5, 0.45])
    assert (m.extra["n_wins"], m.extra["n_losses"], m.extra["n_ties"]) == (2, 2, 1)


def test_order_averaging_round_off_still_counts_as_tie():
    # 0.5 * (0.9 + 1 - 0.9) is 0.49999999999999994 in floats: a symmetric judge must still give a tie.
    prefs = [order_averaged_preference(x, x) for x in (0.1, 0.3, 0.7, 0.9)]
    assert win_rate(prefs).extra["n_ties"] == 4


def test_win_rate_rejects_out_of_range():
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        win_rate([0.5, 1.2])


def test_order_averaging_cancels_position_bias():
    # A judge that answers "first shown" with probability 0.8 whatever the content knows nothing -> 0.5.
    assert order_averaged_preference(0.8, 0.8) == pytest.approx(0.5, abs=1e-15)
    # Additive bias +0.2 towards position A on a true preference of 0.7 for the policy:
    # policy first -> 0.7 + 0.2 = 0.9; reference first -> P(ref) + 0.2 = 0.3 + 0.2 = 0.5; 0.5 * (0.9 + 1 - 0.5) = 0.7.
    assert order_averaged_preference(0.9, 0.5) == pytest.approx(0.7, abs=1e-15)
    # Hard verdicts: consistent win -> 1; the two orders disagree -> tie (FastChat rule); consistent loss -> 0.
    assert order_averaged_preference(1.0, 0.0) == 1.0
    assert order_averaged_preference(1.0, 1.0) == 0.5
    assert order_averaged_preference(0.0, 1.0) == 0.0
    with pytest.raises(ValueError):
        order_averaged_preference(1.5, 0.0)


# ------------------------------------------------------------------------------------------------ KL estimators

P = np.array([0.5, 0.25, 0.25])
Q = np.array([0.25, 0.25, 0.5])
# KL(P || Q) = 0.5 ln(0.5/0.25) + 0.25 ln(0.25/0.25) + 0.25 ln(0.25/0.5) = 0.5 ln 2 + 0 - 0.25 ln 2 = 0.25 ln 2
KL_PQ = 0.17328679513998632

P4 = np.array([0.1, 0.2, 0.3, 0.4])
Q4 = P4[::-1].copy()
# KL = 0.1 ln(1/4) + 0.2 ln(2/3) + 0.3 ln(3/2) + 0.4 ln 4 = 0.3 ln 4 + 0.1 ln 1.5 = 0.6 ln 2 + 0.1 ln 1.5
KL_P4Q4 = 0.45643481914678363


def test_kl_reference_numbers():
    assert KL_PQ == pytest.approx(0.25 * math.log(2), rel=1e-15)
    assert KL_P4Q4 == pytest.approx(0.6 * math.log(2) + 0.1 * math.log(1.5), rel=1e-15)


@pytest.mark.parametrize(("p", "q", "kl"), [(P, Q, KL_PQ), (P4, Q4, KL_P4Q4)])
def test_kl_estimators_are_exactly_unbiased(p, q, kl):
    # E_{y~p}[k(y)] = sum_y p(y) k(y) over the whole support: both estimators must give KL(p || q) exactly.
    k1 = kl_k1(np.log(p), np.log(q))
    k3 = kl_k3(np.log(p), np.log(q))
    assert float(p @ k1) == pytest.approx(kl, abs=1e-12)
    assert float(p @ k3) == pytest.approx(kl, abs=1e-12)
    assert np.all(k3 >= 0)
    assert np.any(k1 < 0)  # k1 is unbiased but individual samples go negative


def test_kl_estimators_monte_carlo():
    y = np.random.default_rng(1234).choice(3, size=200_000, p=P)
    lp, lq = np.log(P)[y], np.log(Q)[y]
    k1, k3 = kl_k1(lp, lq), kl_k3(lp, lq)
    for k in (k1, k3):
        se = k.std(ddof=1) / math.sqrt(k.size)
        assert abs(k.mean() - KL_PQ) < 4 * se
    # Per-sample variances: k1 takes ln2, 0, -ln2 -> Var = 0.75 ln^2 2 - KL^2 = 0.330;
    # k3 takes ln2 - 0.5, 0, 1 - ln2 -> Var = 0.0122: k3 is the low-variance estimator here.
    assert k3.var() < 0.1 * k1.var()
    assert np.all(k3 >= 0)


def test_kl_estimators_vanish_when_distributions_match():
    lp = np.log(P4)
    assert np.array_equal(kl_k1(lp, lp), np.zeros(4))
    assert np.array_equal(kl_k3(lp, lp), np.zeros(4))


def test_kl_k3_is_numerically_stable():
    # Sequence log-probs are large and negative: exp() of either would underflow to 0/0.
    # d = log r = -1001 - (-1000) = -1 -> k3 = (e^-1 - 1) + 1 = e^-1.
    assert kl_k3([-1000.0], [-1001.0])[0] == pytest.approx(math.exp(-1), rel=1e-12)
    # Tiny d = 1e-10: k3 = e^d - 1 - d = d^2/2 + O(d^3) = 5e-21; (exp(d) - 1) - d gives 8.3e-18.
    assert kl_k3([-1e-10], [0.0])[0] == pytest.approx(5e-21, rel=1e-5, abs=0)
    # Same, from large log-probs (d is then 1.0000178e-10): the naive form cancels to exactly 0.
    assert kl_k3([-50.0], [-50.0 + 1e-10])[0] == pytest.approx(5.000178e-21, rel=1e-5, abs=0)
    assert kl_k3([0.0], [-800.0])[0] == pytest.approx(799.0, rel=1e-12)  # r underflows; k3 = r - 1 - log r


def test_sequence_kl_k3_sums_k3_over_each_sequences_tokens():
    # sequence 0: d = log r per token = (-1.5 - -1.0, -0.2 - -0.7) = (-0.5, 0.5); k3 = expm1(d) - d per token
    expected = (math.expm1(-0.5) + 0.5) + (math.expm1(0.5) - 0.5)
    got = sequence_kl_k3([[-1.0, -0.7], [], [-2.0]], [[-1.5, -0.2], [], [-2.0]])
    assert got.tolist() == pytest.approx([expected, 0.0, 0.0], rel=1e-14)
    with pytest.raises(ValueError, match="sequence 1: 1 policy and 2 reference"):
        sequence_kl_k3([[0.0], [0.0]], [[0.0], [0.0, 0.0]])
    with pytest.raises(ValueError, match="2 and 1 sequences"):
        sequence_kl_k3([[0.0], [0.0]], [[0.0]])


def test_sequence_kl_k3_per_token_is_unbiased_and_low_variance_where_the_whole_ratio_is_not():
    """24 independent tokens, each from P4 under the policy and Q4 under the reference: the sequence KL is exactly
    24 KL(P4 || Q4) = 10.95 nats. k3 summed per token is unbiased with half k1's spread; k3 of the whole-sequence
    ratio is dominated by rare huge ratios, so a few hundred samples' mean mostly lands well below the truth."""
    rng = np.random.default_rng(7)
    tokens, samples = 24, 4000
    true_kl = tokens * KL_P4Q4
    y = rng.choice(4, size=(samples, tokens), p=P4)
    lp, lq = np.log(P4)[y], np.log(Q4)[y]
    per_token_k3 = sequence_kl_k3(lp.tolist(), lq.tolist())
    k1 = kl_k1(lp.sum(1), lq.sum(1))
    whole_ratio_k3 = kl_k3(lp.sum(1), lq.sum(1))
    se = per_token_k3.std(ddof=1) / math.sqrt(samples)
    assert abs(per_token_k3.mean() - true_kl) < 4 * se
    assert per_token_k3.std() < 0.6 * k1.std()  # about half here
    # on batches of 256, as an evaluation samples them, the whole-ratio mean is mostly far below the truth
    batches = whole_ratio_k3[: 15 * 256].reshape(15, 256).mean(1)
    assert np.median(batches) < true_kl - 0.5
    assert abs(np.median(per_token_k3[: 15 * 256].reshape(15, 256).mean(1)) - true_kl) < 0.3


def test_kl_rejects_shape_mismatch():
    with pytest.raises(ValueError, match="shape"):
        kl_k1([0.0, 1.0], [0.0])
    with pytest.raises(ValueError, match="shape"):
        kl_k3([0.0, 1.0], [0.0])


# ------------------------------------------------------------------------------------------------------ length


def test_length_delta_is_the_mean_paired_difference():
    m = length_delta([3, 10, 5, 6], [5, 4, 5, 2], resamples=200, seed=0)
    assert m.value == pytest.approx((-2 + 6 + 0 + 4) / 4) and m.n == 4 and m.higher_is_better is None
    assert m.ci95[0] <= m.value <= m.ci95[1]
    with pytest.raises(ValueError, match="differ in shape"):
        length_delta([1, 2], [1])


def test_length_stats_hand_case():
    s = length_stats([10, 20, 30, 40], [False, False, True, False])
    assert set(s) == {"len_tokens_mean", "len_tokens_median", "truncation_rate"}
    assert s["len_tokens_mean"].value == 25.0 and s["len_tokens_mean"].n == 4
    assert s["len_tokens_median"].value == 25.0
    assert s["truncation_rate"].value == 0.25
    assert s["len_tokens_mean"].higher_is_better is None
    assert s["truncation_rate"].higher_is_better is False


def test_length_stats_rejects_mismatch():
    with pytest.raises(ValueError, match="shape"):
        length_stats([1, 2], [True])


def test_group_resamples_draw_whole_groups_and_fall_back_for_singletons():
    from alignpipe.evaluation.metrics import group_resamples

    groups = ["a", "a", "a", "b", "c", "c"]
    rows = group_resamples(groups, resamples=50, seed=0)
    size = {"a": 3, "b": 1, "c": 2}
    for row in rows:
        counts = {g: sum(groups[i] == g for i in row) for g in size}
        assert all(counts[g] % size[g] == 0 for g in size)  # a group is in a row whole, or not at all
        assert sum(counts[g] // size[g] for g in size) == 3  # as many draws as there are groups
    assert group_resamples(["x", "y", "z"], resamples=5, seed=0) is None


# ----------------------------------------------------------------------------------------------- paired deltas, entropy


def test_reward_delta_is_the_paired_gain_with_a_ci_tighter_than_unpaired_means():
    rng = np.random.default_rng(0)
    difficulty = rng.normal(0, 3, 400)  # prompts differ far more than the two policies do
    reference = difficulty + rng.normal(0, 0.3, 400)
    policy = difficulty + 0.2 + rng.normal(0, 0.3, 400)
    delta = reward_delta(policy, reference, resamples=500, seed=0)
    assert delta.value == pytest.approx(float(np.mean(policy - reference)))
    assert delta.higher_is_better is True and delta.n == 400
    lo, hi = delta.ci95
    assert lo > 0  # the gain is resolved ...
    own, ref = mean_with_ci(policy, resamples=500, higher_is_better=True), mean_with_ci(reference, resamples=500,
                                                                                          higher_is_better=True)
    assert own.ci95[0] < ref.ci95[1]  # ... where the two unpaired CIs overlap
    assert reward_delta(reference, reference, resamples=100).ci95 == (0.0, 0.0)  # the reference itself: R = 0
    with pytest.raises(ValueError, match="rewards and reference_rewards differ in shape"):
        reward_delta([1.0, 2.0], [1.0], resamples=100)


def test_paired_delta_names_its_inputs_in_errors():
    with pytest.raises(ValueError, match="ours and theirs differ"):
        paired_delta([1.0], [1.0, 2.0], higher_is_better=None, names=("ours", "theirs"))


def test_policy_entropy_is_the_mean_negative_log_probability():
    logp = [-1.0, -3.0, -2.0, -6.0]
    entropy = policy_entropy(logp, resamples=200)
    assert entropy.value == pytest.approx(3.0) and entropy.n == 4 and entropy.higher_is_better is None
    assert entropy.ci95[0] <= 3.0 <= entropy.ci95[1]
    with pytest.raises(ValueError, match="must be <= 0"):
        policy_entropy([-1.0, 0.5])


def test_policy_entropy_estimates_a_known_entropy():
    """Samples of a categorical distribution scored under it: the estimate's CI covers the exact entropy."""
    rng = np.random.default_rng(1)
    p = np.array([0.5, 0.25, 0.125, 0.125])
    exact = float(-(p * np.log(p)).sum())
    draws = rng.choice(4, size=4000, p=p)
    entropy = policy_entropy(np.log(p[draws]), resamples=1000, seed=0)
    assert entropy.ci95[0] <= exact <= entropy.ci95[1]


# ----------------------------------------------------------------------------------------------- pinned edge cases


def test_a_groups_list_of_another_length_is_refused():
    with pytest.raises(ValueError, match="groups has 2 entries for 3 items"):
        bootstrap_ci([1.0, 2.0, 3.0], groups=["a", "a"])


def test_length_median_ci_is_a_ci_of_the_median_not_of_the_mean():
    # Median of [10]*9 + [1000] is 10. A resample's median leaves 10 only if >= 5 of its 10 draws are 1000:
    # P(Bin(10, 0.1) >= 5) ~= 0.0016 < 2.5%, so both CI ends are 10 (a mean CI would reach ~307).
    stats = length_stats([10] * 9 + [1000], [False] * 10)
    assert stats["len_tokens_median"].value == 10.0
    assert stats["len_tokens_median"].ci95 == (10.0, 10.0)


def test_two_groups_of_two_are_resampled_whole():
    from alignpipe.evaluation.metrics import group_resamples

    groups = ["a", "a", "b", "b"]
    rows = group_resamples(groups, resamples=3, seed=0)
    assert rows is not None  # groups of 2 are groups: no fallback to the i.i.d. bootstrap
    # seed 0 draws groups b,b / b,a / a,a
    assert [row.tolist() for row in rows] == [[2, 3, 2, 3], [2, 3, 0, 1], [0, 1, 0, 1]]
    for row in rows:
        assert all(row[i] // 2 == row[i + 1] // 2 and row[i] % 2 == 0 for i in range(0, 4, 2))  # whole groups
