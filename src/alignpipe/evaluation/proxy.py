"""Proxy-reward metrics of a checkpoint's samples (EVALUATION.md §8 "Proxy reward" and "Proxy–gold gap"): pure.

The proxy is the learned reward model a policy was (or could be) optimised against; the gold judge is the truth.
Over-optimisation shows as the proxy gaining more than gold does, so both gains are measured against the reference
checkpoint's responses to the same prompts and the gap is taken prompt by prompt.

The two rewards have unrelated scales (a Bradley–Terry model's scores are fixed only up to a shift and a scale), so
raw gains cannot be subtracted: a proxy that is exactly 3 × gold would show a policy that truly gains as "over-
optimising". Each gain is therefore put in units of its reward's spread over the reference's responses::

    proxy_gold_gap = mean_i [(proxy_i − proxy_ref_i) / sd(proxy_ref) − (gold_i − gold_ref_i) / sd(gold_ref)]

with a paired bootstrap CI over prompts: 0 when the proxy and gold agree up to scale, positive when the proxy rates
the checkpoint's gain above what gold confirms. It is left out when either reward is constant over the reference's
responses. An ensemble also reports the mean member minimum (WCO's reward) and the mean member variance (UWO's
penalty), population variance as everywhere in :mod:`alignpipe.rewards.penalties`.

``proxy_gold_agreement`` is the proxy's accuracy as a judge of this policy against the reference (EVALUATION.md §8,
"agreement with the gold RM on fresh policy samples"): on the prompts where gold prefers one of the two responses,
the fraction where the proxy's mean prefers the same one, strictly (a proxy tie counts as wrong, as RewardBench's
``>`` does). It is what a held-out accuracy on the demonstrator's pairs cannot show: whether the proxy still ranks
the policy's own, shifted samples as gold does.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from alignpipe.evaluation.metrics import MetricValue, as_1d_finite, mean_with_ci, paired_delta

__all__ = ["gold_agreement", "proxy_metrics"]


def _members(values: Sequence[Sequence[float]], name: str) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 2 or array.shape[1] < 1 or array.shape[0] < 1:
        raise ValueError(f"{name} must be [samples, members] with at least one of each, got shape {array.shape}")
    if not np.isfinite(array).all():
        raise ValueError(f"{name} has non-finite rewards")
    return array


def proxy_metrics(
    members: Sequence[Sequence[float]], reference_members: Sequence[Sequence[float]] | None,
    gold: Sequence[float], reference_gold: Sequence[float] | None, *, resamples: int = 1000, seed: int = 0,
) -> dict[str, MetricValue]:
    """``proxy_reward`` (the members' mean), with an ensemble's ``proxy_reward_min`` and ``proxy_member_var``, and,
    given the reference's scores of its own responses to the same prompts, ``proxy_reward_delta_vs_ref`` (proxy
    units) and ``proxy_gold_gap`` (in reference spreads, see the module docstring; lower is better: gold keeps up).

    ``members``: ``[N, K]`` proxy rewards of the checkpoint's N responses; ``gold``: their N gold rewards.
    """
    own = _members(members, "members")
    boot = {"resamples": resamples, "seed": seed}
    mean = own.mean(axis=1)
    metrics = {"proxy_reward": mean_with_ci(mean, higher_is_better=None, **boot)}
    if own.shape[1] > 1:
        metrics["proxy_reward_min"] = mean_with_ci(own.min(axis=1), higher_is_better=None, **boot)
        metrics["proxy_member_var"] = mean_with_ci(own.var(axis=1), higher_is_better=None, **boot)
    if reference_members is None or reference_gold is None:
        return metrics
    ref = _members(reference_members, "reference_members")
    if ref.shape != own.shape:
        raise ValueError(f"members and reference_members differ in shape: {own.shape} vs {ref.shape}")
    ref_mean = ref.mean(axis=1)
    gold, reference_gold = (as_1d_finite(v, name) for v, name in ((gold, "gold"), (reference_gold, "reference_gold")))
    if not gold.shape == reference_gold.shape == mean.shape:
        raise ValueError(f"gold ({gold.size}), reference_gold ({reference_gold.size}) and members ({mean.size}) must "
                         "hold one value per response")
    metrics["proxy_reward_delta_vs_ref"] = mean_with_ci(mean - ref_mean, higher_is_better=None, **boot)
    if agreement := gold_agreement(mean - ref_mean, gold - reference_gold, **boot):
        metrics["proxy_gold_agreement"] = agreement
    proxy_spread, gold_spread = ref_mean.std(), reference_gold.std()
    if proxy_spread > 0 and gold_spread > 0:
        gap = paired_delta((mean - ref_mean) / proxy_spread, (gold - reference_gold) / gold_spread,
                           higher_is_better=False, names=("proxy gains", "gold gains"), **boot)
        metrics["proxy_gold_gap"] = MetricValue(gap.value, gap.ci95, gap.n, False,
                                                {**gap.extra, "proxy_sd_ref": float(proxy_spread),
                                                 "gold_sd_ref": float(gold_spread)})
    return metrics


def gold_agreement(proxy_gains: Sequence[float], gold_gains: Sequence[float], *, resamples: int = 1000,
                   seed: int = 0) -> MetricValue | None:
    """Fraction of responses whose gold gain over the reference's response is non-zero where the proxy's gain has
    the same sign (0 counts as wrong), with a bootstrap CI over them; None when gold ties everywhere (the reference
    itself). ``extra``: ``n_gold_ties``, the responses left out."""
    proxy, gold = as_1d_finite(proxy_gains, "proxy_gains"), as_1d_finite(gold_gains, "gold_gains")
    if proxy.shape != gold.shape:
        raise ValueError(f"proxy_gains ({proxy.size}) and gold_gains ({gold.size}) must pair up")
    decided = gold != 0
    if not decided.any():
        return None
    agrees = (np.sign(proxy[decided]) == np.sign(gold[decided])).astype(np.float64)
    outcome = mean_with_ci(agrees, resamples=resamples, seed=seed, higher_is_better=True)
    return MetricValue(outcome.value, outcome.ci95, outcome.n, True,
                       {**outcome.extra, "n_gold_ties": int((~decided).sum())})
