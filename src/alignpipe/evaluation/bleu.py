"""Sentence BLEU (Papineni et al. 2002) with Chen & Cherry's (2014) smoothing 1: the BLEU that self-BLEU uses.

Self-BLEU (Zhu et al. 2018, Texygen) scores each of a prompt's samples against the others with NLTK's
``sentence_bleu(..., smoothing_function=SmoothingFunction().method1)``. It is written here as a pure function so
that the harness does not depend on NLTK; ``tests/test_bleu.py`` checks it against NLTK on the same inputs.

* clipped (modified) n-gram precision ``p_n``: each hypothesis n-gram counts at most as often as it appears in the
  one reference that has the most of it; the denominator is the hypothesis' n-gram count (at least 1);
* smoothing 1: a ``p_n`` with no match becomes ``epsilon / denominator`` so one missing 4-gram does not zero the
  score; a hypothesis with no matching unigram still scores 0;
* brevity penalty against the reference length closest to the hypothesis' (the shorter one on a tie):
  ``exp(1 − r/c)`` when ``c <= r``, 1 when longer; an empty hypothesis scores 0.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Hashable, Sequence

from alignpipe.evaluation.metrics import as_positive_int

__all__ = ["brevity_penalty", "clipped_precision", "sentence_bleu"]

Tokens = Sequence[Hashable]


def _ngram_counts(tokens: Tokens, n: int) -> Counter:
    toks = tuple(tokens)
    return Counter(toks[i : i + n] for i in range(len(toks) - n + 1))


def clipped_precision(hypothesis: Tokens, references: Sequence[Tokens], n: int) -> tuple[int, int]:
    """``(matches, total)`` of BLEU's modified n-gram precision; ``total`` is at least 1."""
    counts = _ngram_counts(hypothesis, n)
    best: Counter = Counter()
    for reference in references:
        best |= _ngram_counts(reference, n)  # element-wise max over references
    matches = sum(min(count, best[gram]) for gram, count in counts.items())
    return matches, max(1, sum(counts.values()))


def brevity_penalty(hypothesis_length: int, reference_lengths: Sequence[int]) -> float:
    """BLEU's brevity penalty against the closest reference length (ties go to the shorter reference)."""
    if hypothesis_length == 0:
        return 0.0
    closest = min(reference_lengths, key=lambda length: (abs(length - hypothesis_length), length))
    return 1.0 if hypothesis_length > closest else math.exp(1.0 - closest / hypothesis_length)


def sentence_bleu(hypothesis: Tokens, references: Sequence[Tokens], max_n: int = 4, epsilon: float = 0.1, *,
                  auto_reweigh: bool = False) -> float:
    """BLEU-``max_n`` of one tokenised hypothesis against tokenised references, uniform weights, smoothing 1.

    In [0, 1]; 1 when the hypothesis equals a reference of at least ``max_n`` tokens. ``auto_reweigh`` (NLTK's
    option of that name) averages only the first ``len(hypothesis)`` precisions of a hypothesis shorter than
    ``max_n``, so a short hypothesis equal to a reference also scores 1 rather than being held down by the smoothed
    precisions of n-grams it is too short to have.
    """
    max_n = as_positive_int(max_n, "max_n")
    if not references:
        raise ValueError("sentence_bleu needs at least one reference")
    if not epsilon > 0:
        raise ValueError(f"epsilon must be > 0, got {epsilon}")
    precisions = [clipped_precision(hypothesis, references, n) for n in range(1, max_n + 1)]
    if precisions[0][0] == 0:  # nothing in common (or an empty hypothesis): smoothing does not rescue it
        return 0.0
    if auto_reweigh and len(hypothesis) < max_n:
        precisions = precisions[: len(hypothesis)]
    log_precision = math.fsum(math.log((matches or epsilon) / total) for matches, total in precisions)
    return brevity_penalty(len(hypothesis), [len(r) for r in references]) * math.exp(log_precision / len(precisions))
