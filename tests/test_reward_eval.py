"""reward_model_metrics on a fake scorer with hand-chosen member rewards."""

from __future__ import annotations

import pytest
import torch

from alignpipe.evaluation.reward_eval import policy_sample_metrics, reward_model_metrics
from alignpipe.rewards.penalties import EnsembleRewards


class FakeScorer:
    """Scores from a lookup table: response text -> per-member rewards."""

    def __init__(self, table):
        self.table = table

    def score(self, prompts, responses):
        return EnsembleRewards.from_members(torch.tensor([self.table[r] for r in responses], dtype=torch.float32))


def test_disagreement_is_the_share_of_members_voting_against_the_ensemble():
    table = {
        "c1": [2.0, 2.0, 2.0], "r1": [0.0, 0.0, 0.0],    # all agree, correct, large margin
        "c2": [1.0, -1.0, 1.0], "r2": [0.0, 0.0, 0.0],   # one of three dissents; correct
        "c3": [-1.0, 0.5, -1.0], "r3": [0.0, 0.0, 0.0],  # ensemble wrong (mean margin < 0); one dissent
        "c4": [-0.1, -0.1, -0.1], "r4": [0.0, 0.0, 0.0],  # ensemble wrong, all agree
    }
    pairs = [("p", f"c{i}", f"r{i}") for i in range(1, 5)]
    metrics = reward_model_metrics(FakeScorer(table), pairs, resamples=100)
    assert metrics["accuracy"].value == 0.5
    # disagreement = [0, 1/3, 1/3, 0]; errors = [F, F, T, T]. Error/correct pairs: (1/3 vs 0) 1, (1/3 vs 1/3) 0.5,
    # (0 vs 0) 0.5, (0 vs 1/3) 0 -> AUROC = 2/4 = 0.5
    assert metrics["uncertainty_auroc"].value == pytest.approx(0.5)
    # -|margin| = [-2, -1/3, -0.5, -0.1]: errors have -0.5, -0.1; correct -2, -1/3 -> (-0.5>-2) 1, (-0.5>-1/3) 0,
    # (-0.1>-2) 1, (-0.1>-1/3) 1 -> 3/4
    assert metrics["margin_auroc_baseline"].value == pytest.approx(0.75)
    assert "uncertainty_auroc_std" in metrics and metrics["member_std"].n == 4


def test_probability_std_is_the_spread_of_the_members_bradley_terry_probabilities():
    table = {
        "a": [2.0, 2.5, 2.0], "b": [1.0, -1.0, 1.0],    # correct; std of sigma(margin) 0.0204, 0.2179
        "c": [-1.0, 0.5, -1.0], "d": [-0.1, -0.3, -0.1],  # ensemble wrong; 0.1667, 0.0233
        "zero": [0.0, 0.0, 0.0],
    }
    pairs = [("p", x, "zero") for x in "abcd"]
    metrics = reward_model_metrics(FakeScorer(table), pairs, resamples=100)
    # errors c, d vs correct a, b: (0.1667 > 0.0204) 1, (0.1667 > 0.2179) 0, (0.0233 > 0.0204) 1, (0.0233 > 0.2179) 0
    assert metrics["uncertainty_auroc_probability_std"].value == pytest.approx(0.5)
    # margin std a 0.236, b 0.943, c 0.707, d 0.094: it ranks the confident a above the wrong d -> (c>a) only = 1/4
    assert metrics["uncertainty_auroc_std"].value == pytest.approx(0.25)


def test_brier_nll_and_unscaled_ece_score_the_bradley_terry_probability_of_each_pair_alone():
    """sigma(r_c - r_r) per pair, whatever the other pairs' margins (ECE alone uses the max-0.99 rescaling)."""
    import math

    table = {"a": [1.0], "b": [0.0], "c": [0.5], "far": [40.0], "zero": [0.0]}
    pairs = [("p", "a", "zero"), ("p", "zero", "c")]
    p1, p2 = 1 / (1 + math.exp(-1.0)), 1 / (1 + math.exp(0.5))
    metrics = reward_model_metrics(FakeScorer(table), pairs, resamples=50)
    assert metrics["brier"].value == pytest.approx(((1 - p1) ** 2 + (1 - p2) ** 2) / 2, rel=1e-6)
    assert metrics["nll"].value == pytest.approx(-(math.log(p1) + math.log(p2)) / 2, rel=1e-6)
    with_outlier = reward_model_metrics(FakeScorer(table), [*pairs, ("p", "far", "zero")], resamples=50)
    assert with_outlier["nll"].value == pytest.approx((-(math.log(p1) + math.log(p2))) / 3, rel=1e-5)
    # Unscaled ECE, 15 bins: confidences p1 = 0.731 (bin 10, right) and 1 - p2 = 0.622 (bin 9, the wrong side), so
    # (|1 - p1| + |0 - (1 - p2)|) / n. The margin-40 pair (confidence 1, right) only adds to n.
    gaps = (1 - p1) + (1 - p2)
    assert metrics["ece_unscaled"].value == pytest.approx(gaps / 2, rel=1e-6)
    assert with_outlier["ece_unscaled"].value == pytest.approx(gaps / 3, rel=1e-5)
    # Rescaled, the outlier squeezes both into one bin near 0.5, where their gaps cancel: the ECE falls to 0.018.
    scale = math.log(99) / 40
    q1, q2 = 1 / (1 + math.exp(-scale)), 1 / (1 + math.exp(-0.5 * scale))
    assert with_outlier["ece"].value == pytest.approx((abs((1 - q1) - q2) + 0.01) / 3, rel=1e-5)


def test_a_single_model_has_no_uncertainty_metrics():
    table = {"a": [1.0], "b": [0.0]}
    metrics = reward_model_metrics(FakeScorer(table), [("p", "a", "b"), ("p", "b", "a")], resamples=100)
    assert metrics["accuracy"].value == 0.5 and "uncertainty_auroc" not in metrics and "member_std" not in metrics


def test_std_auroc_at_fixed_margin_compares_pairs_of_similar_margin():
    # Two members, rejected = 0: pair i has mean margin ±a and member spread (std) s. Sorted by |mean margin| the 10
    # pairs form 5 bins of 2, each one error (mean < 0) and one correct pair. In the 3 smallest-margin bins the error
    # has the larger std (0.3 vs 0.1), in the 2 largest the smaller -> 3 of 5 within-bin comparisons = 0.6.
    spec = [(-0.10, 0.3), (0.11, 0.1), (-0.20, 0.3), (0.21, 0.1), (-0.30, 0.3), (0.31, 0.1),
            (-0.40, 0.1), (0.41, 0.3), (-0.50, 0.1), (0.51, 0.3)]
    table = {f"c{i}": [a - s, a + s] for i, (a, s) in enumerate(spec)} | {"zero": [0.0, 0.0]}
    pairs = [("p", f"c{i}", "zero") for i in range(len(spec))]
    metrics = reward_model_metrics(FakeScorer(table), pairs, resamples=100)
    assert metrics["accuracy"].value == 0.5
    assert metrics["uncertainty_auroc_std_at_fixed_margin"].value == pytest.approx(0.6)
    assert metrics["uncertainty_auroc_std_at_fixed_margin"].extra["bins"] == 5


def test_std_auroc_at_fixed_margin_is_left_out_when_no_bin_holds_both_outcomes():
    table = {"a": [2.0, 2.5], "b": [1.0, -0.5], "c": [-1.0, 0.5], "d": [-0.1, -0.3], "zero": [0.0, 0.0]}
    metrics = reward_model_metrics(FakeScorer(table), [("p", x, "zero") for x in "abcd"], resamples=100)
    assert "uncertainty_auroc_std" in metrics and "uncertainty_auroc_std_at_fixed_margin" not in metrics


def test_gold_metrics_separate_label_noise_from_the_models_own_mistakes():
    # Two members, rejected = "zero" (gold 0). Member margins and gold of each chosen response:
    #   c1 [1.0, 3.0] gold +1: label agrees with gold, ensemble right; margin std 1.0, no dissent
    #   c2 [0.4, 0.6] gold -1: label disagrees with gold, so the ensemble (margin +0.5) is wrong about gold; std 0.1
    #   c3 [-0.5, 0.1] gold +1: ensemble wrong (mean -0.2); std 0.3, one of two members dissents
    #   c4 [0.2, 0.2] gold 0: a gold tie, left out of every gold metric
    #   c5 [0.5, 1.5] gold +2: ensemble right; std 0.5
    table = {"c1": [1.0, 3.0], "c2": [0.4, 0.6], "c3": [-0.5, 0.1], "c4": [0.2, 0.2], "c5": [0.5, 1.5],
             "zero": [0.0, 0.0]}
    gold_of = {"c1": 1.0, "c2": -1.0, "c3": 1.0, "c4": 0.0, "c5": 2.0, "zero": 0.0}
    pairs = [("p", c, "zero") for c in ("c1", "c2", "c3", "c4", "c5")]
    metrics = reward_model_metrics(FakeScorer(table), pairs, gold=lambda prompt, response: gold_of[response],
                                   resamples=100)
    assert metrics["label_gold_agreement"].value == pytest.approx(0.75) and metrics["label_gold_agreement"].n == 4
    assert metrics["gold_accuracy"].value == pytest.approx(0.5)  # c1, c5 right; c2, c3 wrong
    # Gold errors c2, c3 have std 0.1, 0.3; the right pairs 1.0, 0.5: every error is below every right pair.
    assert metrics["uncertainty_auroc_std_gold"].value == pytest.approx(0.0)
    # Dissent: errors (0, 0.5) against right (0, 0): two ties (0.5 each) and two wins -> 3/4.
    assert metrics["uncertainty_auroc_gold"].value == pytest.approx(0.75)


def test_policy_sample_correlations_are_left_out_where_undefined():
    # Member rewards of four samples: means 1, 2, 3, 4 and stds 0.5, 0.5, 1.5, 1.5.
    table = {"a": [0.5, 1.5], "b": [1.5, 2.5], "c": [1.5, 4.5], "d": [2.5, 5.5]}
    prompts, responses = ["p"] * 4, list("abcd")
    graded = policy_sample_metrics(FakeScorer(table), prompts, responses, lambda p, r: "abcd".index(r),
                                   resamples=100)
    assert graded["policy_proxy_gold_spearman"].value == pytest.approx(1.0)
    # Every sample alike under gold (e.g. all ill-formed): proxy-vs-gold has no rank correlation, and the stage
    # keeps the one that is still defined instead of failing.
    flat = policy_sample_metrics(FakeScorer(table), prompts, responses, lambda p, r: 0.0, resamples=100)
    assert "policy_proxy_gold_spearman" not in flat
    # gap = |z(proxy)| = (1.342, 0.447, 0.447, 1.342): ranks 3.5, 1.5, 1.5, 3.5 against std ranks 1.5, 1.5, 3.5, 3.5
    assert flat["policy_std_vs_proxy_gold_gap_spearman"].value == pytest.approx(0.0)


def test_confidence_intervals_resample_prompts_not_the_pairs_within_them():
    """Five copies of each pair under its prompt carry no more evidence than one: the CIs stay as wide (resampling
    pairs one by one would narrow them by about sqrt(5))."""
    import random

    rng = random.Random(0)
    table, pairs = {"zero": [0.0, 0.0]}, []
    for i in range(60):
        margin = rng.uniform(-1.0, 2.0)
        table[f"c{i}"] = [margin, margin + rng.uniform(-0.5, 0.5)]
        pairs.append((f"prompt {i}", f"c{i}", "zero"))
    repeated = [pair for pair in pairs for _ in range(5)]
    once = reward_model_metrics(FakeScorer(table), pairs, resamples=400)
    five = reward_model_metrics(FakeScorer(table), repeated, resamples=400)
    for name in ("accuracy", "nll", "member_std", "uncertainty_auroc_std"):
        width_once = once[name].ci95[1] - once[name].ci95[0]
        width_five = five[name].ci95[1] - five[name].ci95[0]
        assert five[name].value == pytest.approx(once[name].value)
        assert 0.7 < width_five / width_once < 1.4, (name, width_once, width_five)


def test_calibration_is_measured_against_soft_labels_when_the_pairs_have_them():
    """A model whose sigma(r_c - r_r) equals each pair's label has Brier 0 and the labels' entropy as NLL; scored
    against 1 it looked worse than a five-times over-confident one."""
    import math

    labels = [0.9, 0.6, 0.75, 0.99]
    margins = [math.log(y / (1 - y)) for y in labels]
    pairs = [("p", f"c{i}", "zero") for i in range(len(labels))]

    def metrics(scale, outcomes):
        table = {"zero": [0.0], **{f"c{i}": [scale * m] for i, m in enumerate(margins)}}
        return reward_model_metrics(FakeScorer(table), pairs, resamples=100, outcomes=outcomes)

    exact, over = metrics(1.0, labels), metrics(5.0, labels)
    assert exact["brier"].value == pytest.approx(0.0, abs=1e-12)
    entropy = -sum(y * math.log(y) + (1 - y) * math.log(1 - y) for y in labels) / len(labels)
    assert exact["nll"].value == pytest.approx(entropy, rel=1e-6)
    assert over["brier"].value > exact["brier"].value and over["nll"].value > exact["nll"].value
    hard_exact, hard_over = metrics(1.0, None), metrics(5.0, None)  # what a soft source used to be scored against
    assert hard_over["brier"].value < hard_exact["brier"].value
    assert exact["accuracy"].value == 1.0  # accuracy stays the sign of the margin
    with pytest.raises(ValueError, match="3 outcomes for 4 pairs"):
        metrics(1.0, labels[:3])
