"""Sentence BLEU (smoothing 1) against hand-computed values and NLTK, the reference implementation self-BLEU uses."""

from __future__ import annotations

import math
import random
import warnings

import pytest

from alignpipe.evaluation.bleu import brevity_penalty, clipped_precision, sentence_bleu


def test_clipped_precision_counts_each_ngram_at_most_as_often_as_the_best_reference():
    # Papineni et al.'s example: "the" seven times, at most twice in one reference
    hypothesis = "the the the the the the the".split()
    references = ["the cat is on the mat".split(), "there is a cat on the mat".split()]
    assert clipped_precision(hypothesis, references, 1) == (2, 7)
    assert clipped_precision("a".split(), ["a b".split()], 2) == (0, 1)  # no bigram: the denominator stays 1


def test_brevity_penalty_uses_the_closest_reference_length_and_the_shorter_on_a_tie():
    assert brevity_penalty(4, [6, 9]) == pytest.approx(math.exp(1 - 6 / 4))  # 6 is closest
    assert brevity_penalty(4, [2, 6]) == 1.0  # 2 and 6 tie at distance 2: the shorter (2), and 4 > 2
    assert brevity_penalty(4, [4, 9]) == 1.0  # as long as the closest: exp(0)
    assert brevity_penalty(3, [9]) == pytest.approx(math.exp(1 - 3))
    assert brevity_penalty(0, [3]) == 0.0


def test_sentence_bleu_hand_computed():
    hypothesis, reference = "the cat sat on the mat".split(), "the cat is on the mat".split()
    # p1 = 5/6, p2 = 3/5, p3 = 1/4, p4 = 0/3 -> 0.1/3 (smoothing 1); equal lengths: no brevity penalty
    assert sentence_bleu(hypothesis, [reference]) == pytest.approx((5 / 6 * 3 / 5 * 1 / 4 * 0.1 / 3) ** 0.25)
    # a 2-token prefix: p1 = p2 = 1, p3 = p4 = 0.1/1; brevity penalty exp(1 - 6/2)
    assert sentence_bleu("the cat".split(), [reference]) == pytest.approx(0.1 ** 0.5 * math.exp(-2))
    assert sentence_bleu(reference, [hypothesis, reference]) == 1.0
    assert sentence_bleu("dog".split(), [reference]) == 0.0  # no unigram in common
    assert sentence_bleu([], [reference]) == 0.0
    # auto_reweigh: a 2-token hypothesis averages p1 and p2 only, so an exact short copy scores 1
    assert sentence_bleu("the cat".split(), ["the cat".split()], auto_reweigh=True) == 1.0
    assert sentence_bleu("the cat".split(), ["the cat".split()]) == pytest.approx(0.1 ** 0.5)


def test_sentence_bleu_rejects_bad_arguments():
    with pytest.raises(ValueError, match="at least one reference"):
        sentence_bleu(["a"], [])
    with pytest.raises(ValueError, match="epsilon"):
        sentence_bleu(["a"], [["a"]], epsilon=0)
    with pytest.raises(ValueError, match="max_n"):
        sentence_bleu(["a"], [["a"]], max_n=0)


def test_sentence_bleu_matches_nltk_on_random_sentences():
    nltk_bleu = pytest.importorskip("nltk.translate.bleu_score", reason="nltk is the reference implementation "
                                    "(installed by the dev extra)")
    smoothing = nltk_bleu.SmoothingFunction().method1
    rng = random.Random(0)
    for _ in range(3000):
        vocabulary = rng.randint(1, 6)  # small vocabularies: many partial matches, repeats and clipping
        hypothesis = [rng.randrange(vocabulary) for _ in range(rng.randint(0, 9))]
        references = [[rng.randrange(vocabulary) for _ in range(rng.randint(0, 9))] for _ in range(rng.randint(1, 4))]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # NLTK warns about short sentences
            expected = nltk_bleu.sentence_bleu(references, hypothesis, smoothing_function=smoothing)
            reweighed = nltk_bleu.sentence_bleu(references, hypothesis, smoothing_function=smoothing,
                                                auto_reweigh=True)
        assert sentence_bleu(hypothesis, references) == pytest.approx(expected, abs=1e-12), (hypothesis, references)
        assert sentence_bleu(hypothesis, references, auto_reweigh=True) == pytest.approx(reweighed, abs=1e-12)
