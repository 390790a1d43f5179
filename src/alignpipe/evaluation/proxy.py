"""Proxy-reward metrics of a checkpoint's samples (EVALUATION.md §8 "Proxy reward" and "Proxy–gold gap"): pure.

The proxy is the learned reward model a policy was (or could be) optimised against; the gold judge is the truth.
Over-optimisation shows as the proxy gaining more than gold does, so both gains are measured against the reference
checkpoint's responses to the same prompts, and the gap is taken prompt by prompt::

    proxy_gold_gap = mean_i [(proxy_i − proxy_ref_i) − (gold_i − gold_ref_i)]

with a paired bootstrap CI over prompts. The two rewards have their own scales (a Bradley–Terry model's scores are
fixed only up to a shift and a scale), so the gap is read as a trend across checkpoints of one run, not as an
absolute number. An ensemble also reports the mean member minimum (WCO's reward) and the mean member variance (UWO's
penalty), population variance as everywhere in :mod:`alignpipe.rewards.penalties`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from alignpipe.evaluation.metrics import MetricValue, mean_with_ci, paired_delta

__all__ = ["proxy_metrics"]


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
    given the reference's scores of its own responses to the same prompts, ``proxy_reward_delta_vs_ref`` and
    ``proxy_gold_gap`` (lower is better: gold keeps up with the proxy).

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
    proxy_gain = mean - ref.mean(axis=1)
    gold_gain = np.asarray(gold, dtype=np.float64) - np.asarray(reference_gold, dtype=np.float64)
    metrics["proxy_reward_delta_vs_ref"] = mean_with_ci(proxy_gain, higher_is_better=None, **boot)
    metrics["proxy_gold_gap"] = paired_delta(proxy_gain, gold_gain, higher_is_better=False,
                                             names=("proxy gains", "gold gains"), **boot)
    return metrics
