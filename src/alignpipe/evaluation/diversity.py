"""Diversity and degeneration metrics over generated text (EVALUATION.md §8): pure Python/numpy, no I/O, no models.

RLHF policies tend to collapse onto a few phrasings, and an over-optimised policy can fall into repetition loops.
Reward and win rate do not show either, so they are tracked separately:

* :func:`distinct_n` measures diversity **across** a set of responses: unique n-grams / total n-grams, pooled over
  the set. Li et al. (2016) divided by the number of tokens; the now-usual n-gram denominator keeps the value in
  [0, 1] for every n.
* :func:`repetition_rate` measures degeneration **within** one response: the fraction of its n-grams that repeat
  an earlier n-gram of the same response, ``1 − unique/total``. This is Welleck et al.'s (2019) seq-rep-n.
  :func:`mean_repetition_rate` averages it over responses.
* :func:`within_prompt_diversity` measures diversity **within one prompt's k samples**, which a policy can lose while
  its responses to different prompts still look varied: self-BLEU-4 (Zhu et al. 2018, Texygen: each sample's
  :func:`~alignpipe.evaluation.bleu.sentence_bleu` against the prompt's other samples; lower is more diverse) and
  distinct-1/2 over the prompt's samples, each averaged over prompts with a bootstrap CI over prompts.

Tokens are whitespace-split (``str.split()``: case-sensitive, punctuation stays attached) unless ``tokenizer`` is
given. It can be any ``str -> sequence of hashables``, e.g. a Hugging Face ``tokenizer.encode``. Values from
different tokenizers are not comparable.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence

from alignpipe.evaluation.bleu import sentence_bleu
from alignpipe.evaluation.metrics import MetricValue, as_positive_int, mean_with_ci

__all__ = [
    "Tokenizer",
    "distinct_n",
    "mean_repetition_rate",
    "ngrams",
    "repetition_rate",
    "self_bleu",
    "within_prompt_diversity",
]

Tokenizer = Callable[[str], Sequence[Hashable]]


def ngrams(tokens: Sequence[Hashable], n: int) -> list[tuple[Hashable, ...]]:
    """Contiguous n-grams of ``tokens`` as tuples, in order. There are none when ``len(tokens) < n``."""
    n = as_positive_int(n, "n")
    toks = tuple(tokens)
    return [toks[i : i + n] for i in range(len(toks) - n + 1)]


def distinct_n(responses: Sequence[str], n: int = 2, *, tokenizer: Tokenizer | None = None) -> MetricValue:
    """Distinct-n over a set of responses: ``|unique n-grams| / |n-grams|``, pooled over the set. Higher means
    more diverse. It is 0.0 when no response has ``n`` tokens (an empty set of n-grams shows no diversity).

    There is no CI. Distinct-n shrinks as the set grows, and resampling with replacement duplicates responses,
    so a bootstrap would be biased low. Compare values only between sets of similar size and length.
    ``extra``: ``n_ngrams``, ``n_unique_ngrams``. ``n`` is the number of responses.
    """
    seqs = _tokenize_all(responses, tokenizer)
    n = as_positive_int(n, "n")
    total = 0
    unique: set[tuple[Hashable, ...]] = set()
    for toks in seqs:
        grams = ngrams(toks, n)
        total += len(grams)
        unique.update(grams)
    value = len(unique) / total if total else 0.0
    return MetricValue(value, None, len(seqs), True, {"n_ngrams": total, "n_unique_ngrams": len(unique)})


def repetition_rate(response: str, n: int = 4, *, tokenizer: Tokenizer | None = None) -> float:
    """Fraction of the response's n-grams that repeat an earlier one: ``1 − |unique| / |n-grams|``, in [0, 1).

    0 means no repeated n-gram. Values near 1 mean a loop: "a b a b a b" has rate 1 − 2/5 = 0.6 for n = 2. A
    response shorter than ``n`` tokens has no n-grams and scores 0.0. Empty or truncated outputs are caught by
    the length metrics, not by this one.
    """
    if not isinstance(response, str):
        raise TypeError(f"response must be a str, got {type(response).__name__}")
    grams = ngrams(_tokenize(response, tokenizer), n)
    return 1.0 - len(set(grams)) / len(grams) if grams else 0.0


def mean_repetition_rate(
    responses: Sequence[str],
    n: int = 4,
    *,
    tokenizer: Tokenizer | None = None,
    resamples: int = 1000,
    seed: int = 0,
) -> MetricValue:
    """Mean per-response :func:`repetition_rate` (lower is better), with a bootstrap CI over responses.

    Pass one response per prompt, or average per prompt first, so that the CI is not too narrow. ``extra``:
    ``stderr`` (n > 1), and ``n_too_short``, the number of responses with fewer than ``n`` tokens. Those count
    as 0 repetition.
    """
    seqs = _tokenize_all(responses, tokenizer)
    n = as_positive_int(n, "n")
    rates = [(1.0 - len(set(g)) / len(g)) if (g := ngrams(toks, n)) else 0.0 for toks in seqs]
    m = mean_with_ci(rates, resamples=resamples, seed=seed, higher_is_better=False)
    too_short = sum(1 for toks in seqs if len(toks) < n)
    return MetricValue(m.value, m.ci95, m.n, False, {**m.extra, "n_too_short": too_short})


def self_bleu(samples: Sequence[str], max_n: int = 4, *, tokenizer: Tokenizer | None = None) -> float:
    """Mean BLEU-``max_n`` of each sample against all the others (Texygen's self-BLEU), in [0, 1]: 1 when every
    sample is the same text, near 0 when they share nothing. Needs 2+ samples.

    Short answers are common (a one-word answer, a three-item list), so a sample shorter than ``max_n`` tokens is
    scored on the n-gram orders it has (NLTK's ``auto_reweigh``): identical one-token samples score 1, not the 0.18
    that smoothed, absent 2- to 4-grams would leave. An empty sample counts as identical to another empty one (1)
    and shares nothing with a non-empty one (0).
    """
    seqs = _tokenize_all(samples, tokenizer)
    if len(seqs) < 2:
        raise ValueError(f"self-BLEU compares samples with each other: it needs at least 2, got {len(seqs)}")
    return sum(_bleu_against_the_rest(seqs, i, max_n) for i in range(len(seqs))) / len(seqs)


def within_prompt_diversity(
    groups: Sequence[Sequence[str]], *, tokenizer: Tokenizer | None = None, resamples: int = 1000, seed: int = 0,
) -> dict[str, MetricValue]:
    """``self_bleu_4``, ``distinct_1_within`` and ``distinct_2_within`` of each prompt's samples (``groups``: one
    list of 2+ samples per prompt), averaged over prompts with a bootstrap CI over prompts; ``n`` counts prompts.

    A prompt whose samples have no n-gram of size n (one-word answers for n = 2, or empty ones) says nothing about
    distinct-n: it is left out of that mean and counted in ``extra["n_too_short"]``; with no prompt left, the metric
    is left out. Distinct-n depends on how many samples are pooled, so compare values only at the same samples per
    prompt (``extra["samples_per_prompt"]``).
    """
    if isinstance(groups, str) or not len(groups):
        raise ValueError("groups must be a non-empty list with one list of samples per prompt")
    sizes = sorted({len(group) for group in groups})
    boot = {"resamples": resamples, "seed": seed}
    bleu = [self_bleu(group, 4, tokenizer=tokenizer) for group in groups]
    metrics = {"self_bleu_4": _with_samples(mean_with_ci(bleu, higher_is_better=False, **boot), sizes)}
    for n in (1, 2):
        per_prompt = [distinct_n(group, n, tokenizer=tokenizer) for group in groups]
        measured = [d.value for d in per_prompt if d.extra["n_ngrams"]]
        if measured:
            metrics[f"distinct_{n}_within"] = _with_samples(mean_with_ci(measured, higher_is_better=True, **boot),
                                                            sizes, n_too_short=len(per_prompt) - len(measured))
    return metrics


# ----------------------------------------------------------------------------------------------- helpers


def _bleu_against_the_rest(seqs: list[tuple[Hashable, ...]], i: int, max_n: int) -> float:
    others = seqs[:i] + seqs[i + 1 :]
    if not seqs[i]:
        return 1.0 if any(not other for other in others) else 0.0
    return sentence_bleu(seqs[i], others, max_n, auto_reweigh=True)


def _with_samples(metric: MetricValue, sizes: list[int], **more: int) -> MetricValue:
    """``metric`` with ``samples_per_prompt`` (and ``more``) in its extra: the fewest samples of a prompt, plus
    ``samples_per_prompt_max`` when the prompts have different numbers."""
    extra = {**metric.extra, **more, "samples_per_prompt": sizes[0]}
    if len(sizes) > 1:
        extra["samples_per_prompt_max"] = sizes[-1]
    return MetricValue(metric.value, metric.ci95, metric.n, metric.higher_is_better, extra)


def _tokenize(text: str, tokenizer: Tokenizer | None) -> tuple[Hashable, ...]:
    return tuple(text.split() if tokenizer is None else tokenizer(text))


def _tokenize_all(responses: Sequence[str], tokenizer: Tokenizer | None) -> list[tuple[Hashable, ...]]:
    if isinstance(responses, str):
        raise TypeError("responses must be a sequence of strings, not a single str")
    items = list(responses)
    if not items:
        raise ValueError("responses must be non-empty")
    bad = [type(r).__name__ for r in items if not isinstance(r, str)]
    if bad:
        raise TypeError(f"responses must all be str, got {len(bad)} of type {sorted(set(bad))}")
    return [_tokenize(r, tokenizer) for r in items]
