"""Reward-model calibration (accuracy, ECE, Brier, NLL) as a local Hugging Face ``evaluate`` metric.

A thin wrapper over ``alignpipe.evaluation.reward_metrics`` (``expected_calibration_error``, ``brier_score``,
``negative_log_likelihood``). Load it by path::

    evaluate.load("eval/metrics/reward_calibration")
"""

from __future__ import annotations

import datasets
import evaluate

from alignpipe.evaluation.reward_metrics import (
    brier_score,
    expected_calibration_error,
    negative_log_likelihood,
)

_DESCRIPTION = """\
Calibration of a reward model's pairwise probabilities: probabilities[i] = P(chosen preferred)
(Bradley-Terry sigmoid(r_chosen - r_rejected), see alignpipe.evaluation.reward_metrics.bt_probabilities) and
references[i] the observed outcome (1 = the labelled chosen response is preferred; soft labels in [0, 1] allowed).
ECE is top-label (predicted-side) ECE over equal-width bins (default 15); Brier = mean (p - y)^2; NLL = mean
binary cross-entropy in nats. Accuracy is that of the predicted side as used by the ECE: p > 0.5 predicts chosen,
p < 0.5 rejected, and p == 0.5 gets half credit. RewardBench's strict accuracy on raw scores (a tie counts as
wrong) is alignpipe.evaluation.reward_metrics.pairwise_accuracy instead. All three calibration numbers are lower
is better and carry seeded bootstrap CIs over pairs.
"""

_KWARGS_DESCRIPTION = """
Args:
    probabilities (list of float): P(chosen preferred) per pair, in [0, 1].
    references (list of float): outcome per pair, 0/1 (or soft labels in [0, 1]).
    bins (int, optional): ECE bins, default 15.
    resamples (int, optional): bootstrap resamples, default 1000.
    seed (int, optional): bootstrap seed, default 0.
Returns:
    accuracy (float): predicted-side accuracy (ties at p = 0.5 count 0.5).
    ece, ece_ci95_low, ece_ci95_high (float); mce, mean_confidence, overconfidence (float); bins (int).
    brier, brier_ci95_low, brier_ci95_high (float).
    nll, nll_ci95_low, nll_ci95_high (float).
    n (int): number of pairs.
"""

_CITATION = """\
@inproceedings{guo2017calibration,
  title = {On Calibration of Modern Neural Networks},
  author = {Chuan Guo and Geoff Pleiss and Yu Sun and Kilian Q. Weinberger},
  booktitle = {ICML},
  year = {2017}
}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class RewardCalibration(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"probabilities": datasets.Value("float64"), "references": datasets.Value("float64")}
            ),
            reference_urls=["https://arxiv.org/abs/1706.04599"],
        )

    def _compute(self, probabilities, references, bins: int = 15, resamples: int = 1000, seed: int = 0) -> dict:
        ece = expected_calibration_error(probabilities, references, bins=bins, resamples=resamples, seed=seed)
        brier = brier_score(probabilities, references, resamples=resamples, seed=seed)
        nll = negative_log_likelihood(probabilities, references, resamples=resamples, seed=seed)
        out = {"accuracy": ece.extra["accuracy"], "n": ece.n}
        for name, m in (("ece", ece), ("brier", brier), ("nll", nll)):
            lo, hi = m.ci95
            out.update({name: m.value, f"{name}_ci95_low": lo, f"{name}_ci95_high": hi})
        out.update({k: ece.extra[k] for k in ("mce", "mean_confidence", "overconfidence", "bins")})
        return out
