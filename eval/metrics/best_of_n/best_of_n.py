"""Unbiased best-of-n gold-reward curve as a local Hugging Face ``evaluate`` metric.

A thin wrapper over ``alignpipe.evaluation.best_of_n.best_of_n_curve`` and ``kl_best_of_n``. Load it by path::

    evaluate.load("eval/metrics/best_of_n")
"""

from __future__ import annotations

import datasets
import evaluate

from alignpipe.evaluation.best_of_n import best_of_n_curve, kl_best_of_n

_DESCRIPTION = """\
Best-of-n sampling against a proxy reward model, scored by a gold reward (Gao et al. 2023).
Each input row is one prompt: the proxy and gold scores of its N samples (N may differ per prompt). For every n
in `ns` the metric reports the EXACT expected gold score of best-of-n (the proxy-best of n samples), averaged
over all C(N, n) subsets with Coste et al.'s unbiased estimator (proxy ties broken uniformly at random) and then
over prompts, plus the analytic KL of best-of-n to the base policy, log n - (n - 1)/n (the d = sqrt(KL) axis of
Gao et al.'s overoptimisation plots). Wraps alignpipe.evaluation.best_of_n.best_of_n_curve and kl_best_of_n.
"""

_KWARGS_DESCRIPTION = """
Args:
    proxy_scores (list of list of float): per prompt, the proxy-RM score of each sample.
    gold_scores (list of list of float): per prompt, the gold score of the same samples, in the same order.
    ns (list of int): the n values of the curve, passed to best_of_n_curve as given (it refuses a non-int n,
        2.0 included); each must be <= every prompt's number of samples.
Returns:
    curve_n{n} (float): mean gold score of best-of-n, for each n in ns.
    kl_bon_n{n} (float): analytic KL(best-of-n || base) = log n - (n - 1)/n, for each n in ns.
    n_prompts (int): number of prompts.
Examples:
    >>> bon = evaluate.load("eval/metrics/best_of_n")
    >>> bon.compute(proxy_scores=[[1, 2, 3]], gold_scores=[[1, 2, 3]], ns=[2])["curve_n2"]  # 8/3
"""

_CITATION = """\
@inproceedings{gao2023scaling,
  title = {Scaling Laws for Reward Model Overoptimization},
  author = {Leo Gao and John Schulman and Jacob Hilton},
  booktitle = {ICML},
  year = {2023}
}
@inproceedings{coste2024reward,
  title = {Reward Model Ensembles Help Mitigate Overoptimization},
  author = {Thomas Coste and Usman Anwar and Robert Kirk and David Krueger},
  booktitle = {ICLR},
  year = {2024}
}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class BestOfN(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "proxy_scores": datasets.Sequence(datasets.Value("float64")),
                    "gold_scores": datasets.Sequence(datasets.Value("float64")),
                }
            ),
            reference_urls=["https://arxiv.org/abs/2210.10760", "https://arxiv.org/abs/2310.02743"],
        )

    def _compute(self, proxy_scores, gold_scores, ns=None) -> dict:
        if ns is None:
            raise ValueError("best_of_n needs ns=[...], the n values of the curve")
        curve = best_of_n_curve(list(proxy_scores), list(gold_scores), ns)
        out: dict = {}
        for n, gold in zip(ns, curve, strict=True):
            out[f"curve_n{n}"] = float(gold)
            out[f"kl_bon_n{n}"] = kl_best_of_n(n)
        out["n_prompts"] = len(proxy_scores)
        return out
