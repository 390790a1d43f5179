"""Proxy reward, its gain over the reference and the proxy-gold gap (EVALUATION.md §8), on hand-computed batches."""

from __future__ import annotations

import numpy as np
import pytest

from alignpipe.evaluation.proxy import proxy_metrics

MEMBERS = [[1.0, 3.0], [0.0, 2.0], [4.0, 4.0]]  # three responses, two members
REFERENCE = [[0.0, 0.0], [1.0, 1.0], [2.0, 2.0]]
GOLD, REFERENCE_GOLD = [0.5, 0.0, 1.0], [0.0, 0.5, 0.5]


def test_proxy_metrics_hand_computed():
    m = proxy_metrics(MEMBERS, REFERENCE, GOLD, REFERENCE_GOLD, resamples=200)
    assert m["proxy_reward"].value == pytest.approx((2 + 1 + 4) / 3)  # member means 2, 1, 4
    assert m["proxy_reward_min"].value == pytest.approx((1 + 0 + 4) / 3)
    assert m["proxy_member_var"].value == pytest.approx((1 + 1 + 0) / 3)  # population variance over members
    # proxy gains 2, 0, 2; gold gains 0.5, -0.5, 0.5; gaps 1.5, 0.5, 1.5
    assert m["proxy_reward_delta_vs_ref"].value == pytest.approx(4 / 3)
    assert m["proxy_gold_gap"].value == pytest.approx(3.5 / 3)
    assert m["proxy_gold_gap"].higher_is_better is False and m["proxy_gold_gap"].n == 3
    lo, hi = m["proxy_gold_gap"].ci95
    assert 0.5 <= lo <= hi <= 1.5


def test_a_single_reward_model_has_no_member_statistics_and_no_reference_no_gains():
    m = proxy_metrics([[1.0], [2.0]], None, [0.0, 0.0], None, resamples=100)
    assert set(m) == {"proxy_reward"} and m["proxy_reward"].value == 1.5


def test_over_optimisation_shows_as_a_positive_gap():
    """A policy that raises the proxy while gold falls: the gap is the proxy gain plus the gold loss."""
    rng = np.random.default_rng(0)
    reference = rng.normal(0, 1, (500, 3))
    members = reference + 1.0 + rng.normal(0, 0.1, (500, 3))
    reference_gold = rng.normal(0, 1, 500)
    gold = reference_gold - 0.3
    m = proxy_metrics(members, reference, gold, reference_gold, resamples=300)
    assert m["proxy_gold_gap"].value == pytest.approx(1.3, abs=0.02)
    assert m["proxy_gold_gap"].ci95[0] > 1.2


def test_bad_shapes_are_named():
    with pytest.raises(ValueError, match=r"members must be \[samples, members\]"):
        proxy_metrics([1.0, 2.0], None, [0.0, 0.0], None)
    with pytest.raises(ValueError, match="members and reference_members differ in shape"):
        proxy_metrics(MEMBERS, REFERENCE[:2], GOLD, REFERENCE_GOLD)
    with pytest.raises(ValueError, match="non-finite"):
        proxy_metrics([[float("nan")]], None, [0.0], None)
