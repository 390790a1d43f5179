"""Win rate vs a reference as a local Hugging Face ``evaluate`` metric.

A thin wrapper: the maths (mean preference, tie counting, seeded bootstrap CI over prompts) is
``alignpipe.evaluation.metrics.win_rate``. Load it by path, never by bare name (the Hub is not used)::

    evaluate.load("eval/metrics/win_rate")
"""

from __future__ import annotations

import datasets
import evaluate

from alignpipe.evaluation.metrics import win_rate

_DESCRIPTION = """\
Win rate of a policy against a fixed reference: the mean per-prompt preference, where 1 means
the policy's output won, 0 that it lost and 0.5 a tie (e.g. the two judging orders disagreed). Preferences should
already be order-averaged. The 95% CI is a seeded percentile bootstrap over prompts, so pass one preference per
prompt. Wraps alignpipe.evaluation.metrics.win_rate.
"""

_KWARGS_DESCRIPTION = """
Args:
    preferences (list of float): one order-averaged preference per prompt, in [0, 1] (ties = 0.5).
    resamples (int, optional): bootstrap resamples for the CI, default 1000.
    seed (int, optional): bootstrap seed, default 0.
Returns:
    win_rate (float): mean preference (higher is better).
    ci95_low, ci95_high (float): percentile-bootstrap 95% CI over prompts.
    stderr (float): standard error of the mean (only when n > 1).
    n (int): number of prompts.
    n_wins, n_losses, n_ties (int): preferences above, below and equal to 0.5 (ties within 1e-9 of 0.5).
Examples:
    >>> wr = evaluate.load("eval/metrics/win_rate")
    >>> wr.compute(preferences=[1, 0, 0.5, 1])["win_rate"]
    0.625
"""

_CITATION = """\
@misc{alpaca_eval,
  author = {Xuechen Li and Tianyi Zhang and Yann Dubois and Rohan Taori and Ishaan Gulrajani and Carlos Guestrin
            and Percy Liang and Tatsunori B. Hashimoto},
  title = {AlpacaEval: An Automatic Evaluator of Instruction-following Models},
  year = {2023},
  howpublished = {\\url{https://github.com/tatsu-lab/alpaca_eval}}
}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class WinRate(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"preferences": datasets.Value("float64")}),
            reference_urls=["https://github.com/tatsu-lab/alpaca_eval"],
        )

    def _compute(self, preferences, resamples: int = 1000, seed: int = 0) -> dict:
        m = win_rate(preferences, resamples=resamples, seed=seed)
        lo, hi = m.ci95
        return {"win_rate": m.value, "ci95_low": lo, "ci95_high": hi, "n": m.n, **m.extra}
