"""Length-controlled win rate (AlpacaEval 2 style) as a local Hugging Face ``evaluate`` metric.

A thin wrapper: the GLM fit, the bootstrap CI and the raw-vs-LC gap rule are
``alignpipe.evaluation.length_control.length_controlled_win_rate`` and ``lc_gap_warning``. Load it by path::

    evaluate.load("eval/metrics/lc_win_rate")
"""

from __future__ import annotations

import datasets
import evaluate

from alignpipe.evaluation.length_control import lc_gap_warning, length_controlled_win_rate

_DESCRIPTION = """\
Length-controlled win rate (Dubois et al. 2024): one logistic GLM per model,
logit P(model beats reference) = theta + phi * tanh(dlen / sd(dlen)) [+ psi * difficulty], dlen = model length -
reference length, and LC = mean sigmoid(theta [+ psi * difficulty]), i.e. the win rate with the length term switched
off. The CI is a seeded bootstrap over prompts that refits the GLM on each resample. The raw win rate is reported
next to it, with AlpacaEval's "extreme change" warning when LC moves too far from it. Wraps
alignpipe.evaluation.length_control.length_controlled_win_rate and lc_gap_warning.
"""

_KWARGS_DESCRIPTION = """
Args:
    preferences (list of float): one order-averaged preference per prompt, in [0, 1] (ties = 0.5).
    model_lengths (list of float): length of the model's response per prompt (tokens or characters).
    reference_lengths (list of float): length of the reference response per prompt (same unit).
    difficulty (list of float, optional): per-prompt difficulty covariate estimated beforehand (not from these
        preferences); a plain keyword argument, not an input column.
    resamples (int, optional): bootstrap resamples (each refits the GLM), default 1000.
    seed (int, optional): bootstrap seed, default 0.
    abs_diff, rel_diff (float, optional): thresholds of the gap warning, defaults 0.10 and 4.0.
Returns:
    lc_win_rate (float): length-controlled win rate (higher is better).
    ci95_low, ci95_high (float): percentile-bootstrap 95% CI over prompts (LC can sit just outside it).
    n (int): number of prompts.
    raw_win_rate (float): mean preference.
    stderr, prediction_sem, theta, phi, [psi], length_scale, length_collinearity (float), converged (0/1),
        n_unconverged_resamples (int): fit diagnostics from the alignpipe function.
    lc_gap_flagged (int): 1 when lc_gap_warning fired, else 0.
    lc_gap_warning (str or None): the warning text, None when the gap is within limits.
"""

_CITATION = """\
@article{dubois2024length,
  title = {Length-Controlled AlpacaEval: A Simple Way to Debias Automatic Evaluators},
  author = {Yann Dubois and Bal\\'azs Galambosi and Percy Liang and Tatsunori B. Hashimoto},
  journal = {arXiv preprint arXiv:2404.04475},
  year = {2024}
}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class LcWinRate(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "preferences": datasets.Value("float64"),
                    "model_lengths": datasets.Value("float64"),
                    "reference_lengths": datasets.Value("float64"),
                }
            ),
            reference_urls=["https://github.com/tatsu-lab/alpaca_eval", "https://arxiv.org/abs/2404.04475"],
        )

    def _compute(
        self,
        preferences,
        model_lengths,
        reference_lengths,
        difficulty=None,
        resamples: int = 1000,
        seed: int = 0,
        abs_diff: float = 0.10,
        rel_diff: float = 4.0,
    ) -> dict:
        m = length_controlled_win_rate(
            preferences, model_lengths, reference_lengths, difficulty, resamples=resamples, seed=seed
        )
        lo, hi = m.ci95
        warning = lc_gap_warning(m.extra["raw_win_rate"], m.value, abs_diff=abs_diff, rel_diff=rel_diff)
        return {
            "lc_win_rate": m.value,
            "ci95_low": lo,
            "ci95_high": hi,
            "n": m.n,
            **m.extra,
            "lc_gap_flagged": int(warning is not None),
            "lc_gap_warning": warning,
        }
