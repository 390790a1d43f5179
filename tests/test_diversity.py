"""Hand-computed tests for alignpipe.evaluation.diversity (distinct-n, per-response repetition rate)."""

import json

import pytest

from alignpipe.evaluation.bleu import sentence_bleu
from alignpipe.evaluation.diversity import (
    distinct_n,
    mean_repetition_rate,
    ngrams,
    repetition_rate,
    self_bleu,
    within_prompt_diversity,
)

SET = ["the cat sat", "the cat ran", "a dog sat"]


def test_ngrams():
    assert ngrams(["a", "b", "c"], 2) == [("a", "b"), ("b", "c")]
    assert ngrams(["a", "b"], 3) == []
    assert ngrams([], 1) == []


# ----------------------------------------------------------------------------------------------- distinct-n


@pytest.mark.parametrize(
    ("n", "unique", "total"),
    [
        (1, 6, 9),  # the cat sat | the cat ran | a dog sat -> {the, cat, sat, ran, a, dog}
        (2, 5, 6),  # (the cat) appears twice; (cat sat) (cat ran) (a dog) (dog sat) once
        (3, 3, 3),
    ],
)
def test_distinct_n_hand_values(n, unique, total):
    m = distinct_n(SET, n)
    assert m.value == pytest.approx(unique / total)
    assert (m.extra["n_unique_ngrams"], m.extra["n_ngrams"]) == (unique, total)
    assert m.n == 3 and m.higher_is_better is True and m.ci95 is None
    json.dumps(m.to_dict())


def test_distinct_n_pools_over_the_set():
    # Each response alone is 1/2 distinct; pooled, 4 unigrams hold one type.
    assert distinct_n(["a a", "a a"], 1).value == pytest.approx(0.25)
    # Different responses with no shared n-gram are fully distinct.
    assert distinct_n(["a b", "c d"], 1).value == 1.0


def test_distinct_n_default_is_bigrams_and_no_ngrams_gives_zero():
    assert distinct_n(SET).value == pytest.approx(5 / 6)
    m = distinct_n(["one", "", "two"], 2)
    assert m.value == 0.0 and m.extra["n_ngrams"] == 0


def test_whitespace_tokens_are_case_sensitive_and_collapse_runs():
    assert distinct_n(["The the"], 1).value == 1.0
    assert distinct_n(["a  b\n\ta "], 1).value == pytest.approx(2 / 3)  # tokens: a, b, a


def test_custom_tokenizer():
    # Characters as tokens: "abab" -> bigrams ab, ba, ab.
    assert distinct_n(["abab"], 2, tokenizer=list).value == pytest.approx(2 / 3)
    # Integer ids (e.g. tokenizer.encode): word lengths 2, 2, 2 -> one unique unigram out of three.
    m = distinct_n(["aa bb cc"], 1, tokenizer=lambda s: [len(w) for w in s.split()])
    assert m.value == pytest.approx(1 / 3)


# ------------------------------------------------------------------------------------------ repetition rate


@pytest.mark.parametrize(
    ("text", "n", "expected"),
    [
        ("a b a b a b", 2, 1 - 2 / 5),  # ab ba ab ba ab
        ("a b a b a b", 1, 1 - 2 / 6),
        ("a b a b a b", 3, 1 - 2 / 4),  # aba bab aba bab
        ("the  cat\nthe\tcat", 2, 1 - 2 / 3),  # whitespace runs collapse: the cat the cat
        ("no repeats here at all", 2, 0.0),
        ("one two three", 4, 0.0),  # shorter than n: no n-grams
        ("", 1, 0.0),
    ],
)
def test_repetition_rate_hand_values(text, n, expected):
    assert repetition_rate(text, n) == pytest.approx(expected)


def test_repetition_rate_default_n_is_4_and_tokenizer_is_used():
    loop = "I am sorry . " * 5  # 20 tokens, 17 four-grams, 4 unique
    assert repetition_rate(loop) == pytest.approx(1 - 4 / 17)
    assert repetition_rate("abcabc", 3, tokenizer=list) == pytest.approx(1 - 3 / 4)


def test_mean_repetition_rate():
    m = mean_repetition_rate(["a b a b a b", "x y z", "hi"], 2, resamples=200)
    assert m.value == pytest.approx((0.6 + 0.0 + 0.0) / 3)
    assert m.extra["n_too_short"] == 1
    assert m.n == 3 and m.higher_is_better is False
    assert m.ci95[0] <= m.value <= m.ci95[1]
    assert 0.0 <= m.ci95[0] and m.ci95[1] <= 0.6
    assert mean_repetition_rate(["a b a b a b", "x y z", "hi"], 2, resamples=200) == m
    json.dumps(m.to_dict())


# ------------------------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize("n", [0, -1, 1.5, True, "2"])
def test_bad_n(n):
    with pytest.raises(ValueError, match="n must be a positive integer"):
        distinct_n(SET, n)
    with pytest.raises(ValueError, match="n must be a positive integer"):
        repetition_rate("a b", n)


def test_a_whole_float_n_is_the_same_as_the_int():
    """An n read from YAML may arrive as 2.0: every n-gram metric takes it as the int (as the binned reward metrics
    take a whole float bin count), instead of accepting it and failing inside the slicing."""
    assert ngrams(["a", "b", "c"], 2.0) == ngrams(["a", "b", "c"], 2)
    assert distinct_n(SET, 2.0) == distinct_n(SET, 2)
    assert repetition_rate("a b a b a b", 2.0) == repetition_rate("a b a b a b", 2)
    assert mean_repetition_rate(SET, 2.0, resamples=50) == mean_repetition_rate(SET, 2, resamples=50)


def test_bad_responses():
    with pytest.raises(TypeError, match="single str"):
        distinct_n("the cat sat", 1)
    with pytest.raises(ValueError, match="non-empty"):
        distinct_n([], 1)
    with pytest.raises(TypeError, match="must all be str"):
        mean_repetition_rate(["ok", None], 1)
    with pytest.raises(TypeError, match="must be a str"):
        repetition_rate(["a", "b"], 1)


# ----------------------------------------------------------------------------------------------- within a prompt


def test_self_bleu_scores_each_sample_against_the_others():
    samples = ["the cat sat on the mat", "the cat is on the mat", "a dog ran"]
    toks = [s.split() for s in samples]
    expected = (sentence_bleu(toks[0], [toks[1], toks[2]]) + sentence_bleu(toks[1], [toks[0], toks[2]])
                + sentence_bleu(toks[2], [toks[0], toks[1]])) / 3
    assert self_bleu(samples) == pytest.approx(expected)
    assert self_bleu(["a b c d e", "a b c d e"]) == 1.0  # a collapsed policy
    assert self_bleu(["a b c d", "e f g h"]) == 0.0  # nothing shared
    with pytest.raises(ValueError, match="at least 2"):
        self_bleu(["only one"])


def test_self_bleu_of_short_and_empty_samples():
    """One-word answers are scored on unigrams: identical ones are a collapse (1), not the 0.18 that smoothed 2- to
    4-grams would give; empty answers are identical to each other and share nothing with any other answer."""
    assert self_bleu(["42", "42", "42"]) == 1.0
    assert self_bleu(["a b c", "a b c"]) == 1.0
    assert self_bleu(["42", "17"]) == 0.0
    assert self_bleu(["", ""]) == 1.0
    assert self_bleu(["", "42"]) == 0.0
    assert self_bleu(["", "", "42"]) == pytest.approx(2 / 3)  # each empty one has an empty twin; "42" has none
    # "a b" against "a c": p1 = 1/2, p2 = 0 -> 0.1/1 (smoothing 1), weights 1/2 each; equal lengths
    assert self_bleu(["a b", "a c"]) == pytest.approx((0.5 * 0.1) ** 0.5)


def test_within_prompt_diversity_averages_over_prompts_and_tells_collapse_from_variety():
    collapsed = [["a b c", "a b c"], ["d e f", "d e f"]]
    varied = [["a b c", "x y z"], ["d e f", "u v w"]]
    low = within_prompt_diversity(collapsed, resamples=200)
    high = within_prompt_diversity(varied, resamples=200)
    # two identical 3-token samples: 4 bigrams, 2 unique, 6 unigrams, 3 unique; self-BLEU of a copy: 1
    assert low["distinct_2_within"].value == 0.5 and high["distinct_2_within"].value == 1.0
    assert low["distinct_1_within"].value == 0.5 and high["distinct_1_within"].value == 1.0
    assert low["self_bleu_4"].value == 1.0 and high["self_bleu_4"].value == 0.0
    assert low["self_bleu_4"].higher_is_better is False and low["distinct_2_within"].higher_is_better is True
    assert low["self_bleu_4"].n == 2 and low["self_bleu_4"].extra["samples_per_prompt"] == 2
    assert "samples_per_prompt_max" not in low["self_bleu_4"].extra
    mixed = within_prompt_diversity([["a b", "a b"], ["a b", "c d", "e f"]], resamples=200)
    assert mixed["distinct_2_within"].value == pytest.approx((0.5 + 1.0) / 2)  # the mean over prompts, not pooled
    assert mixed["distinct_2_within"].extra["samples_per_prompt"] == 2
    assert mixed["distinct_2_within"].extra["samples_per_prompt_max"] == 3
    lo, hi = mixed["distinct_2_within"].ci95
    assert lo == 0.5 and hi == 1.0  # a bootstrap over the two prompts


def test_within_prompt_self_bleu_is_bleu_4():
    group = ["a b c d e", "a b c x e"]  # unigrams and bigrams mostly shared, no 4-gram: BLEU-4 far below BLEU-2
    value = within_prompt_diversity([group], resamples=10)["self_bleu_4"].value
    assert value == pytest.approx(self_bleu(group, 4)) and value < self_bleu(group, 2) - 0.1


def test_only_responses_shorter_than_n_count_as_too_short():
    assert mean_repetition_rate(["a b c d", "a b c", "a a a a a"], n=4, resamples=10).extra["n_too_short"] == 1


def test_within_prompt_diversity_leaves_out_prompts_too_short_for_distinct_n():
    """One-word answers have no bigram: such a prompt says nothing about distinct-2 (it would read 0, "collapsed",
    however varied the words are), so it is left out of that mean and counted."""
    m = within_prompt_diversity([["42", "17"], ["a b", "c d"], ["", ""]], resamples=100)
    assert m["distinct_2_within"].value == 1.0 and m["distinct_2_within"].n == 1
    assert m["distinct_2_within"].extra["n_too_short"] == 2
    assert m["distinct_1_within"].value == 1.0 and m["distinct_1_within"].extra["n_too_short"] == 1  # the empty one
    assert m["self_bleu_4"].n == 3
    assert "distinct_2_within" not in within_prompt_diversity([["42", "42"]], resamples=100)


def test_within_prompt_diversity_rejects_bad_groups():
    with pytest.raises(ValueError, match="one list of samples per prompt"):
        within_prompt_diversity([])
    with pytest.raises(ValueError, match="at least 2"):
        within_prompt_diversity([["a b", "c d"], ["alone"]])


@pytest.mark.parametrize("n, k, expected", [
    (80, 32, None),  # fewer than 2k prompts: still spread over the whole list, not its first 63
    (512, 32, list(range(0, 512, 16))),  # a multiple of k: every (n/k)-th, as before
    (10, 32, list(range(10))),  # fewer prompts than asked: each once
])
def test_diversity_prompts_are_spread_over_the_whole_set(n, k, expected):
    """Files are ordered by source: the diversity prompts must reach the end of the list, whatever its length."""
    from alignpipe.evaluation.harness import DiversitySampling

    prompts = [f"p{i}" for i in range(n)]
    chosen = [int(p[1:]) for p in DiversitySampling(4, k).chosen(prompts)]
    assert len(chosen) == min(n, k) and len(set(chosen)) == len(chosen) and chosen == sorted(chosen)
    if expected is not None:
        assert chosen == expected
    gaps = [b - a for a, b in zip(chosen, chosen[1:])]
    assert max(gaps) - min(gaps) <= 1 and n - 1 - chosen[-1] < max(gaps)  # even, and the last part is reached
