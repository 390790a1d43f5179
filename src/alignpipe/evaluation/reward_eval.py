"""Held-out evaluation of a reward model or ensemble: accuracy, calibration and the quality of its uncertainty.

Shared by the ``reward`` stage (and, later, the leaderboard's reward table) so every reward model is measured the
same way. Pure apart from calling ``scorer.score``.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from alignpipe.evaluation.metrics import MetricValue, mean_with_ci
from alignpipe.evaluation.reward_metrics import (
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


def reward_model_metrics(
    scorer,
    pairs: Sequence[tuple[str, str, str]],
    *,
    gold: Callable[[str, str], float] | None = None,
    off_distribution: Sequence[tuple[str, str]] = (),
    resamples: int = 1000,
    seed: int = 0,
    tables: dict | None = None,
    outcomes: Sequence[float] | None = None,
) -> dict[str, MetricValue]:
    """Metrics of ``scorer`` (anything whose ``score`` returns ``EnsembleRewards``) on held-out (prompt, chosen,
    rejected) pairs. ECE uses UP-RLHF's protocol: reward differences rescaled so the largest maps to 0.99;
    ``ece_unscaled`` bins the model's own Bradley-Terry probability ``σ(r_c − r_r)`` instead, which Brier and NLL
    score too (EVALUATION.md §8): rescaled, each pair's loss would depend on the set's single largest margin.

    ``outcomes``: each pair's probability that its chosen reply is the better, the soft label a scored source gave
    it (AlpacaEval's strengths), which calibration (ECE, Brier, NLL) is measured against; None = 1 for every pair.
    Scored against 1, a model that had learnt the labels exactly looked miscalibrated (ECE floored at 1 − the mean
    label) and an over-confident one scored a better Brier and NLL. Accuracy stays the hard sign (strict >).

    ``gold`` (the embedded task) adds accuracy against the true ordering; ``off_distribution`` (prompt, response)
    samples add the ratio of member disagreement there to disagreement on the held-out responses.
    """
    prompts = [p for p, _, _ in pairs]
    chosen = scorer.score(prompts, [c for _, c, _ in pairs])
    rejected = scorer.score(prompts, [r for _, _, r in pairs])
    c_mean, r_mean = chosen.mean.numpy(), rejected.mean.numpy()
    probabilities = bt_probabilities(c_mean, r_mean, scale="max099")
    bradley_terry = bt_probabilities(c_mean, r_mean)
    outcomes = np.ones(len(pairs)) if outcomes is None else np.asarray(outcomes, dtype=float)
    if outcomes.shape != (len(pairs),):
        raise ValueError(f"{outcomes.size} outcomes for {len(pairs)} pairs")
    # The prompt is the unit of independence (the held-out split is by prompt, and a scored source gives several
    # pairs per prompt): every CI resamples whole prompts.
    boot = {"resamples": resamples, "seed": seed, "groups": prompts}
    metrics = {
        "accuracy": pairwise_accuracy(c_mean, r_mean, **boot),
        "ece": expected_calibration_error(probabilities, outcomes, **boot),
        # The model's own probabilities, unscaled: the rescaled ECE moves with the set's single largest margin
        # (one outlier pair squeezes every other confidence towards 0.5); this one does not.
        "ece_unscaled": expected_calibration_error(bradley_terry, outcomes, **boot),
        "brier": brier_score(bradley_terry, outcomes, **boot),
        "nll": negative_log_likelihood(bradley_terry, outcomes, **boot),
    }
    if tables is not None:  # per-bin rows for the report's reliability diagram (same binning as the ECE)
        tables["reliability"] = reliability_table(probabilities, outcomes)
    metrics["calibration_scale"] = MetricValue(max099_scale(c_mean, r_mean), None, len(pairs), None)
    members = chosen.per_member.shape[1]
    if members > 1:
        member_margins = (chosen.per_member - rejected.per_member).numpy()
        mean_margin = member_margins.mean(axis=1)
        # Pairwise uncertainty = the share of members voting against the ensemble's preference. The std of member
        # margins is reported too, but it grows with |margin| (members agree on the sign and differ in size), so it
        # flags confident pairs. The std of the members' Bradley-Terry probabilities sigma(margin_k) (a deep
        # ensemble's predictive spread) saturates for confident pairs instead. -|margin| is the ensemble-free
        # baseline an uncertainty should beat; the std's AUROC within bins of equal |margin| says whether the
        # members know anything about errors that the margin does not (0.5 = nothing).
        disagreement = (np.sign(member_margins) != np.sign(mean_margin)[:, None]).mean(axis=1)
        margin_std = member_margins.std(axis=1)
        probability_std = (1.0 / (1.0 + np.exp(-member_margins))).std(axis=1)
        errors = c_mean <= r_mean
        if 0 < errors.sum() < len(errors):
            for name, score in (("uncertainty_auroc", disagreement), ("uncertainty_auroc_std", margin_std),
                                ("uncertainty_auroc_probability_std", probability_std),
                                ("margin_auroc_baseline", -np.abs(mean_margin))):
                metrics[name] = uncertainty_auroc(score, errors, **boot)
            try:
                metrics["uncertainty_auroc_std_at_fixed_margin"] = stratified_uncertainty_auroc(
                    margin_std, errors, np.abs(mean_margin), **boot)
            except ValueError:  # no |margin| bin holds both an error and a correct pair (tiny sets)
                pass
        # One value per pair (the mean of its two responses' std, which share a prompt), resampled by prompt.
        in_distribution_std = (chosen.std.numpy() + rejected.std.numpy()) / 2
        metrics["member_std"] = mean_with_ci(in_distribution_std, higher_is_better=None, **boot)
        if off_distribution:
            ood = scorer.score([p for p, _ in off_distribution], [r for _, r in off_distribution]).std.numpy()
            metrics["member_std_off_distribution"] = mean_with_ci(ood, resamples=resamples, seed=seed,
                                                                  higher_is_better=None)
            metrics["off_distribution_std_ratio"] = MetricValue(
                float(ood.mean() / max(in_distribution_std.mean(), 1e-12)), None, len(ood), None)
    if gold is not None:
        gold_diff = np.array([gold(p, c) - gold(p, r) for p, c, r in pairs])
        decided = gold_diff != 0
        if decided.any():
            gold_boot = {**boot, "groups": [p for p, keep in zip(prompts, decided) if keep]}
            truth_c = np.where(gold_diff[decided] > 0, c_mean[decided], r_mean[decided])
            truth_r = np.where(gold_diff[decided] > 0, r_mean[decided], c_mean[decided])
            metrics["gold_accuracy"] = pairwise_accuracy(truth_c, truth_r, **gold_boot)
            # How often the (Bradley-Terry-sampled) labels follow gold: the ceiling of `accuracy`, and the share of
            # the model's label errors that are label noise rather than its own mistakes.
            metrics["label_gold_agreement"] = mean_with_ci((gold_diff[decided] > 0).astype(float),
                                                           higher_is_better=None, **gold_boot)
            # Errors against the true ordering, not the (Bradley-Terry-sampled, partly noisy) labels: label noise
            # is invisible to any reward model, so only these errors are ones its uncertainty could flag.
            gold_errors = truth_c <= truth_r
            if members > 1 and 0 < gold_errors.sum() < len(gold_errors):
                metrics["uncertainty_auroc_gold"] = uncertainty_auroc(disagreement[decided], gold_errors,
                                                                      **gold_boot)
                metrics["uncertainty_auroc_std_gold"] = uncertainty_auroc(margin_std[decided], gold_errors,
                                                                          **gold_boot)
    return metrics


def policy_sample_metrics(scorer, prompts: Sequence[str], responses: Sequence[str],
                          gold: Callable[[str, str], float], *, resamples: int = 1000,
                          seed: int = 0) -> dict[str, MetricValue]:
    """On fresh policy samples: does member disagreement track where the proxy is wrong about gold?

    Rank correlation of the ensemble std with |z(proxy) − z(gold)| (both standardised, since their scales differ).
    """
    rewards = scorer.score(prompts, responses)
    proxy = rewards.mean.numpy()
    truth = np.array([gold(p, r) for p, r in zip(prompts, responses)])
    gap = np.abs(_standardise(proxy) - _standardise(truth))
    candidates = {"policy_proxy_gold_spearman": (proxy, truth)}
    if rewards.per_member.shape[1] > 1:  # one model has no disagreement to correlate
        candidates["policy_std_vs_proxy_gold_gap_spearman"] = (rewards.std.numpy(), gap)
    # A policy whose samples all score alike (e.g. all ill-formed: gold is constant) leaves a rank correlation
    # undefined; the metric is left out rather than failing the stage after its checkpoint is saved.
    return {name: spearman(x, y, resamples=resamples, seed=seed) for name, (x, y) in candidates.items()
            if np.ptp(x) > 0 and np.ptp(y) > 0}


def _standardise(values: np.ndarray) -> np.ndarray:
    spread = values.std()
    return (values - values.mean()) / (spread if spread > 0 else 1.0)
