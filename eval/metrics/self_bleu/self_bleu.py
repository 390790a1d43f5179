"""Self-BLEU-4 and distinct-2 among each prompt's samples, as a local Hugging Face ``evaluate`` metric.

A thin wrapper over ``alignpipe.evaluation.diversity.within_prompt_diversity`` (whitespace tokens). Load it by
path::

    evaluate.load("eval/metrics/self_bleu")
"""

from __future__ import annotations

import datasets
import evaluate

from alignpipe.evaluation.diversity import within_prompt_diversity

_DESCRIPTION = """\
Diversity WITHIN a prompt: each prediction is one prompt's list of 2+ samples. Self-BLEU-4
(Zhu et al. 2018, Texygen) scores each sample with BLEU-4 (NLTK's sentence_bleu with smoothing 1 and auto_reweigh,
so short samples are scored on the n-gram orders they have) against the prompt's other samples and averages; 1 means
every sample is the same text, lower is more diverse. distinct-n is unique / all n-grams among the prompt's samples
(prompts whose samples have no n-gram are left out and counted). All are averaged over prompts with a seeded
bootstrap CI over prompts. Tokens are whitespace-split (str.split()). Wraps
alignpipe.evaluation.diversity.within_prompt_diversity.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (list of list of str): one list of 2+ sampled responses per prompt.
    resamples (int, optional): bootstrap resamples for the CIs, default 1000.
    seed (int, optional): bootstrap seed, default 0.
Returns:
    self_bleu_4 (float): mean over prompts of the samples' mean BLEU-4 against each other (lower is more diverse).
    self_bleu_4_ci95_low, self_bleu_4_ci95_high (float): its percentile-bootstrap 95% CI over prompts.
    distinct_1_within, distinct_2_within (float or None): mean over prompts of distinct-n among that prompt's samples
        (higher is more diverse); None when no prompt's samples have n tokens.
    distinct_{1,2}_within_ci95_low / _high (float or None): their CIs.
    distinct_{1,2}_within_n_too_short (int): prompts left out for having no n-gram.
    samples_per_prompt (int): the fewest samples of a prompt; n (int): number of prompts.
    samples_per_prompt_max (int): the most samples of a prompt, only when prompts have different numbers.
"""

_CITATION = """\
@inproceedings{zhu2018texygen,
  title = {Texygen: A Benchmarking Platform for Text Generation Models},
  author = {Yaoming Zhu and Sidi Lu and Lei Zheng and Jiaxian Guo and Weinan Zhang and Jun Wang and Yong Yu},
  booktitle = {SIGIR},
  year = {2018}
}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class SelfBleu(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Sequence(datasets.Value("string"))}),
            reference_urls=["https://arxiv.org/abs/1802.01886"],
        )

    def _compute(self, predictions, resamples: int = 1000, seed: int = 0) -> dict:
        metrics = within_prompt_diversity([list(group) for group in predictions], resamples=resamples, seed=seed)
        out: dict = {}
        for name in ("self_bleu_4", "distinct_1_within", "distinct_2_within"):
            metric = metrics.get(name)  # distinct-n is absent when no prompt's samples have n tokens
            out[name] = None if metric is None else metric.value
            out[f"{name}_ci95_low"], out[f"{name}_ci95_high"] = (None, None) if metric is None else metric.ci95
            if name != "self_bleu_4":
                out[f"{name}_n_too_short"] = len(predictions) if metric is None else metric.extra["n_too_short"]
        extra = metrics["self_bleu_4"].extra
        out["samples_per_prompt"] = extra["samples_per_prompt"]
        if "samples_per_prompt_max" in extra:  # only when the prompts have different numbers of samples
            out["samples_per_prompt_max"] = extra["samples_per_prompt_max"]
        out["n"] = metrics["self_bleu_4"].n
        return out
