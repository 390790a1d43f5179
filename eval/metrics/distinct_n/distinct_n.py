"""Distinct-1/2 and repetition rate as a local Hugging Face ``evaluate`` metric.

A thin wrapper over ``alignpipe.evaluation.diversity.distinct_n`` and ``mean_repetition_rate`` (whitespace
tokens). Load it by path::

    evaluate.load("eval/metrics/distinct_n")
"""

from __future__ import annotations

import datasets
import evaluate

from alignpipe.evaluation.diversity import distinct_n, mean_repetition_rate

_DESCRIPTION = """\
Diversity and degeneration of generated text. distinct-n = unique n-grams / all n-grams, pooled
over the set of predictions (diversity ACROSS responses; higher is more diverse; compare only sets of similar size
and length). Repetition rate = Welleck et al.'s seq-rep-n, the fraction of a response's n-grams that repeat an
earlier one, averaged over responses (degeneration WITHIN a response; lower is better), with a seeded bootstrap CI.
Tokens are whitespace-split (str.split()). Wraps alignpipe.evaluation.diversity.distinct_n and
mean_repetition_rate.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (list of str): generated responses, ideally one per prompt.
    repetition_n (int, optional): n-gram order of the repetition rate, default 4.
    resamples (int, optional): bootstrap resamples for the repetition-rate CI, default 1000.
    seed (int, optional): bootstrap seed, default 0.
Returns:
    distinct_1, distinct_2 (float): pooled distinct-n (0.0 when no response has n tokens).
    n_ngrams_1, n_unique_ngrams_1, n_ngrams_2, n_unique_ngrams_2 (int): the counts behind them.
    mean_repetition_rate (float): mean per-response seq-rep-n (lower is better).
    repetition_ci95_low, repetition_ci95_high (float): its percentile-bootstrap 95% CI over responses.
    repetition_n (int): the n used; n_too_short (int): responses with fewer than repetition_n tokens (count as 0).
    n (int): number of responses.
"""

_CITATION = """\
@inproceedings{li2016diversity,
  title = {A Diversity-Promoting Objective Function for Neural Conversation Models},
  author = {Jiwei Li and Michel Galley and Chris Brockett and Jianfeng Gao and Bill Dolan},
  booktitle = {NAACL},
  year = {2016}
}
@article{welleck2019neural,
  title = {Neural Text Generation with Unlikelihood Training},
  author = {Sean Welleck and Ilia Kulikov and Stephen Roller and Emily Dinan and Kyunghyun Cho and Jason Weston},
  journal = {arXiv preprint arXiv:1908.04319},
  year = {2019}
}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class DistinctN(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value("string")}),
            reference_urls=["https://arxiv.org/abs/1510.03055", "https://arxiv.org/abs/1908.04319"],
        )

    def _compute(self, predictions, repetition_n: int = 4, resamples: int = 1000, seed: int = 0) -> dict:
        d1 = distinct_n(predictions, 1)
        d2 = distinct_n(predictions, 2)
        rep = mean_repetition_rate(predictions, repetition_n, resamples=resamples, seed=seed)
        lo, hi = rep.ci95
        return {
            "distinct_1": d1.value,
            "distinct_2": d2.value,
            "n_ngrams_1": d1.extra["n_ngrams"],
            "n_unique_ngrams_1": d1.extra["n_unique_ngrams"],
            "n_ngrams_2": d2.extra["n_ngrams"],
            "n_unique_ngrams_2": d2.extra["n_unique_ngrams"],
            "mean_repetition_rate": rep.value,
            "repetition_ci95_low": lo,
            "repetition_ci95_high": hi,
            "repetition_n": int(repetition_n),
            "n_too_short": rep.extra["n_too_short"],
            "n": d1.n,
        }
