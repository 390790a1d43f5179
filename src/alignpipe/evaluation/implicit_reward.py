"""A policy's implicit-reward accuracy on held-out preference pairs (EVALUATION.md §8 "RM accuracy ... for DPO").

A DPO-family policy ``π`` trained against ``π_ref`` defines the reward ``r(x, y) = β log π(y|x) / π_ref(y|x)``
(Rafailov et al. 2023); RewardBench scores DPO models this way, with their reference model. Whether the policy learned
the preference ordering is then whether ``r(x, chosen) > r(x, rejected)`` on pairs it never trained on. ``β > 0``
scales every margin alike, so the sign, and with it the accuracy, needs only the log-ratios: margins here are in nats,
``β`` left out (TRL's ``rewards/margins`` is ``β`` times them). Pure: no models, no I/O.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from alignpipe.evaluation.metrics import MetricValue, as_1d_finite, mean_with_ci


def implicit_margins(logp_chosen: Sequence[float], ref_logp_chosen: Sequence[float], logp_rejected: Sequence[float],
                     ref_logp_rejected: Sequence[float]) -> np.ndarray:
    """Per pair ``m = [log π(c) − log π_ref(c)] − [log π(r) − log π_ref(r)]`` (sequence log-probs of chosen ``c`` and
    rejected ``r`` under the policy and the reference): the DPO logit, the implicit reward margin over ``β``."""
    named = {"logp_chosen": logp_chosen, "ref_logp_chosen": ref_logp_chosen, "logp_rejected": logp_rejected,
             "ref_logp_rejected": ref_logp_rejected}
    arrays = [as_1d_finite(values, name) for name, values in named.items()]
    if len({a.shape for a in arrays}) > 1:
        raise ValueError(f"log-prob sequences differ in length: {[a.size for a in arrays]}")
    lp_c, lr_c, lp_r, lr_r = arrays
    return (lp_c - lr_c) - (lp_r - lr_r)


def implicit_reward_accuracy(margins: Sequence[float], *, resamples: int = 1000, seed: int = 0,
                             groups: Sequence | None = None) -> MetricValue:
    """Fraction of pairs whose implicit reward ranks chosen strictly above rejected (``m > 0``: RewardBench's strict
    ``>``, so a tie counts as wrong), with a bootstrap CI over pairs (over ``groups``, e.g. the pairs' prompts, when
    several pairs share one). ``extra``: ``n_ties`` (``m == 0`` exactly: a policy that never moved off its reference
    ties everywhere and scores 0, not 0.5) and ``mean_margin`` (nats, ``β`` left out)."""
    m = as_1d_finite(margins, "margins")
    outcome = mean_with_ci((m > 0).astype(np.float64), resamples=resamples, seed=seed, higher_is_better=True,
                           groups=groups)
    return MetricValue(outcome.value, outcome.ci95, outcome.n, True,
                       {"n_ties": int(np.sum(m == 0)), "mean_margin": float(m.mean()), **outcome.extra})
