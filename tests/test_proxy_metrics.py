"""Proxy reward, its gain over the reference and the proxy-gold gap (EVALUATION.md §8), on hand-computed batches."""

from __future__ import annotations

import functools
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from alignpipe.evaluation.proxy import gold_agreement, proxy_metrics

MEMBERS = [[1.0, 3.0], [0.0, 2.0], [4.0, 4.0]]  # three responses, two members
REFERENCE = [[0.0, 0.0], [1.0, 1.0], [2.0, 2.0]]
GOLD, REFERENCE_GOLD = [0.5, 0.0, 1.0], [0.0, 0.5, 0.5]


def test_proxy_metrics_hand_computed():
    m = proxy_metrics(MEMBERS, REFERENCE, GOLD, REFERENCE_GOLD, resamples=200)
    assert m["proxy_reward"].value == pytest.approx((2 + 1 + 4) / 3)  # member means 2, 1, 4
    assert m["proxy_reward_min"].value == pytest.approx((1 + 0 + 4) / 3)
    assert m["proxy_member_var"].value == pytest.approx((1 + 1 + 0) / 3)  # population variance over members
    # proxy gains 2, 0, 2 in units of sd(0, 1, 2) = sqrt(2/3); gold gains 0.5, -0.5, 0.5 in units of
    # sd(0, 0.5, 0.5) = sqrt(1/18)
    assert m["proxy_reward_delta_vs_ref"].value == pytest.approx(4 / 3)
    proxy_z = [g / (2 / 3) ** 0.5 for g in (2, 0, 2)]
    gold_z = [g / (1 / 18) ** 0.5 for g in (0.5, -0.5, 0.5)]
    gaps = [p - g for p, g in zip(proxy_z, gold_z)]
    assert m["proxy_gold_gap"].value == pytest.approx(sum(gaps) / 3)
    assert m["proxy_gold_gap"].extra["proxy_sd_ref"] == pytest.approx((2 / 3) ** 0.5)
    assert m["proxy_gold_gap"].higher_is_better is False and m["proxy_gold_gap"].n == 3
    lo, hi = m["proxy_gold_gap"].ci95
    assert min(gaps) <= lo <= hi <= max(gaps)


def test_gold_agreement_hand_computed():
    """The batch above: proxy gains 2, 0, 2 and gold gains 0.5, -0.5, 0.5 agree on responses 1 and 3; on response 2
    the proxy ties, which counts as wrong (RewardBench's strict >)."""
    m = proxy_metrics(MEMBERS, REFERENCE, GOLD, REFERENCE_GOLD, resamples=200)
    agreement = m["proxy_gold_agreement"]
    assert agreement.value == pytest.approx(2 / 3) and agreement.n == 3 and agreement.higher_is_better is True
    assert agreement.extra["n_gold_ties"] == 0
    assert 0 <= agreement.ci95[0] <= agreement.ci95[1] <= 1
    # gold ties are left out and counted; a proxy that inverts every gain scores 0; gold tied everywhere: no metric
    mixed = gold_agreement([1.0, -2.0, 3.0, 0.5, -1.0], [2.0, 0.0, 1.0, -1.0, -3.0], resamples=100)
    assert mixed.value == pytest.approx(3 / 4) and mixed.n == 4 and mixed.extra["n_gold_ties"] == 1
    assert gold_agreement([-1.0, 2.0], [1.0, -2.0], resamples=100).value == 0.0
    assert gold_agreement([1.0, 2.0], [0.0, 0.0], resamples=100) is None
    with pytest.raises(ValueError, match="must pair up"):
        gold_agreement([1.0], [1.0, 2.0])


@pytest.mark.parametrize("scale", [0.3, 1.0, 3.0])
def test_the_gap_does_not_depend_on_the_proxys_scale(scale):
    """A proxy that is gold times any scale agrees with gold: a policy that truly gains shows no gap."""
    rng = np.random.default_rng(0)
    reference_gold = rng.normal(0, 1, 300)
    gold = reference_gold + 0.5
    m = proxy_metrics(scale * gold[:, None], scale * reference_gold[:, None], gold, reference_gold, resamples=100)
    assert m["proxy_gold_gap"].value == pytest.approx(0.0, abs=1e-12)
    assert m["proxy_reward_delta_vs_ref"].value == pytest.approx(0.5 * scale)  # the raw gain keeps proxy units


def test_no_gap_when_a_reward_is_constant_over_the_reference():
    m = proxy_metrics([[1.0], [2.0]], [[0.0], [0.0]], [1.0, 0.0], [0.0, 1.0], resamples=100)
    assert "proxy_gold_gap" not in m and m["proxy_reward_delta_vs_ref"].value == 1.5


def test_a_single_reward_model_has_no_member_statistics_and_no_reference_no_gains():
    m = proxy_metrics([[1.0], [2.0]], None, [0.0, 0.0], None, resamples=100)
    assert set(m) == {"proxy_reward"} and m["proxy_reward"].value == 1.5


def test_over_optimisation_shows_as_a_positive_gap():
    """A policy that raises the proxy while gold falls: the gap is the proxy gain plus the gold loss (in spreads)."""
    rng = np.random.default_rng(0)
    reference = rng.normal(0, 1, (500, 3))
    members = reference + 1.0 + rng.normal(0, 0.1, (500, 3))
    reference_gold = rng.normal(0, 1, 500)
    gold = reference_gold - 0.3
    m = proxy_metrics(members, reference, gold, reference_gold, resamples=300)
    expected = 1.0 / reference.mean(axis=1).std() + 0.3 / reference_gold.std()  # both gains in reference spreads
    assert m["proxy_gold_gap"].value == pytest.approx(expected, rel=0.02)
    assert m["proxy_gold_gap"].ci95[0] > 0.9 * expected


def test_bad_shapes_are_named():
    with pytest.raises(ValueError, match=r"members must be \[samples, members\]"):
        proxy_metrics([1.0, 2.0], None, [0.0, 0.0], None)
    with pytest.raises(ValueError, match="members and reference_members differ in shape"):
        proxy_metrics(MEMBERS, REFERENCE[:2], GOLD, REFERENCE_GOLD)
    with pytest.raises(ValueError, match="one value per response"):
        proxy_metrics(MEMBERS, REFERENCE, GOLD[:2], REFERENCE_GOLD)
    with pytest.raises(ValueError, match="non-finite"):
        proxy_metrics([[float("nan")]], None, [0.0], None)


# ----------------------------------------------------------------------------------------------- the scorer


@functools.cache
def _tokenizer():
    from alignpipe.models.tiny import train_tokenizer
    from alignpipe.tasks import tokenizer_corpus

    return train_tokenizer(tokenizer_corpus(n=200), vocab_size=120)


class _FakeScorer:
    """A reward scorer's interface: score(), max_length, and encode_features() encoding as it scores (here, like a
    plain-text single model: prompt, response and EOS as one string, no chat template)."""

    def __init__(self, max_length: int = 10_000):
        self.calls, self.tokenizer, self.max_length = 0, _tokenizer(), max_length

    def encode_features(self, prompts, responses, *, max_length=None):
        limit = self.max_length if max_length is None else max_length
        return [{"input_ids": self.tokenizer(p + r + self.tokenizer.eos_token)["input_ids"][-limit:]}
                for p, r in zip(prompts, responses)]

    def score(self, prompts, responses):
        self.calls += 1
        return SimpleNamespace(per_member=torch.tensor([[float(len(r)), 1.0] for r in responses]))


def test_proxy_scorer_loads_on_first_use_and_serves_cached_scores_without_loading(tmp_path, monkeypatch):
    import alignpipe.rewards.loading as loading
    from alignpipe.evaluation.cache import EvalCache
    from alignpipe.evaluation.proxy_scorer import ProxyScorer

    loads, fake = [], _FakeScorer()
    monkeypatch.setattr(loading, "load_reward_scorer", lambda path, **kw: loads.append((path, kw)) or fake)
    cache = EvalCache(tmp_path / "cache")
    scorer = ProxyScorer("rm/checkpoint", "ab" * 32, dtype="float32", device="cpu", cache=cache)
    assert loads == []  # nothing loaded until something needs scoring
    assert scorer(["p", "q"], ["abc", ""]) == [[3.0, 1.0], [0.0, 1.0]]
    assert loads == [("rm/checkpoint", {"dtype": "float32", "device": "cpu"})] and fake.calls == 1
    again = ProxyScorer("rm/checkpoint", "ab" * 32, dtype="float32", device="cpu", cache=cache)
    assert again(["p", "q"], ["abc", ""]) == [[3.0, 1.0], [0.0, 1.0]]
    assert len(loads) == 1 and fake.calls == 1  # a fresh scorer answers from the cache without loading
    other_weights = ProxyScorer("rm/checkpoint", "cd" * 32, dtype="float32", device="cpu", cache=cache)
    other_weights(["p", "q"], ["abc", ""])
    assert fake.calls == 2  # another model's scores are its own
    uncached = ProxyScorer("rm/checkpoint", None, cache=cache)  # no weights hash: nothing to key a cache on
    uncached(["p"], ["x"])
    uncached(["p"], ["x"])
    assert fake.calls == 4


def test_proxy_scorer_says_when_the_reward_models_max_length_cut_a_conversation(tmp_path, monkeypatch, caplog):
    import alignpipe.rewards.loading as loading
    from alignpipe.evaluation.proxy_scorer import ProxyScorer

    fake = _FakeScorer(max_length=12)
    monkeypatch.setattr(loading, "load_reward_scorer", lambda path, **kw: fake)
    prompts, responses = ["sum: 1 2", "sum: 1 2"], ["3", " ".join(["9"] * 40)]
    assert len(fake.encode_features(prompts[:1], responses[:1], max_length=10**6)[0]["input_ids"]) <= 12
    with caplog.at_level("WARNING", logger="alignpipe"):
        ProxyScorer("rm", None)(prompts, responses)  # counted as the scorer encodes, not through a chat template
    assert "1 of 2 responses with their prompts are longer than the reward model's max_length 12" in caplog.text
