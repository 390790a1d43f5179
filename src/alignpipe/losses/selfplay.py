"""Self-play losses on per-response log-ratios against the previous iterate: SPPO and INPO.

Pure functions of tensors (tested on the hand values of ALGORITHMS.md §7e and §10e); the trainer
(``alignpipe.trainers.pair_loss``) only supplies sequence log-probabilities. SPIN (§8) and DNO (§9) need no loss of
their own: both are DPO's ``−log σ(β h)`` with the reference set to the previous iterate ``π_t``.

Notation (§0): ``ρ(y) = log π_θ(y|x) − log π_t(y|x)`` is a response's log-ratio against the previous iterate.
"""

from __future__ import annotations

import torch

__all__ = ["inpo_logits", "inpo_loss", "sppo_loss"]


def sppo_loss(
    chosen_logratios: torch.Tensor,
    rejected_logratios: torch.Tensor,
    chosen_win_rates: torch.Tensor,
    rejected_win_rates: torch.Tensor,
    eta: float,
) -> torch.Tensor:
    """Per-pair SPPO loss (Wu et al. 2024, official ``loss_type="sppo"``; ALGORITHMS.md §7a), no reduction::

        0.5 · [(ρ(y_w) − η(P̂_w − ½))² + (ρ(y_l) − η(P̂_l − ½))²]

    Unlike DPO it regresses each response's log-ratio separately onto its own win-rate target, so a response that
    wins half its games is left where ``π_t`` had it and margins cannot diverge. The official code's ``η = 1/β``.
    ``P̂`` is the win rate against ``π_t`` (:func:`alignpipe.data.selfplay.win_rates`).
    """
    if not eta > 0:
        raise ValueError(f"SPPO eta must be > 0, got {eta}")
    _check_win_rates(chosen_win_rates, rejected_win_rates)
    chosen_target = eta * (chosen_win_rates.to(chosen_logratios.dtype) - 0.5)
    rejected_target = eta * (rejected_win_rates.to(rejected_logratios.dtype) - 0.5)
    return 0.5 * ((chosen_logratios - chosen_target) ** 2 + (rejected_logratios - rejected_target) ** 2)


def inpo_logits(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    anchor_chosen_logps: torch.Tensor,
    anchor_rejected_logps: torch.Tensor,
    previous_chosen_logps: torch.Tensor,
    previous_rejected_logps: torch.Tensor,
    mix: float,
) -> torch.Tensor:
    """INPO's ``h_t`` (§10a) with ``mix = ητ`` ∈ [0, 1], the weight of the fixed reference ``π_ref``::

        h_t = log π_θ(y_w)/π_θ(y_l) − mix · log π_ref(y_w)/π_ref(y_l) − (1 − mix) · log π_t(y_w)/π_t(y_l)

    ``mix = 0`` is online IPO against the previous iterate; ``mix = 1`` against the fixed reference. [M/I]: the
    geometric mixture of references is the paper's; the parametrisation by ``mix`` is ours.
    """
    if not 0.0 <= mix <= 1.0:
        raise ValueError(f"INPO mix (eta * tau) must be in [0, 1], got {mix}")
    policy = policy_chosen_logps - policy_rejected_logps
    anchor = anchor_chosen_logps - anchor_rejected_logps
    previous = previous_chosen_logps - previous_rejected_logps
    return policy - mix * anchor - (1.0 - mix) * previous


def inpo_loss(h: torch.Tensor, eta: float) -> torch.Tensor:
    """Per-pair INPO loss ``(h_t − η/2)²`` (§10a; the target ``η/2`` is [M], derived in ALGORITHMS.md), no reduction.

    With ``π_θ = π_t = π_ref``, ``h_t = 0`` and the loss is ``η²/4`` (§10e).
    """
    if not eta > 0:
        raise ValueError(f"INPO eta must be > 0, got {eta}")
    return (h - eta / 2) ** 2


def _check_win_rates(*rates: torch.Tensor) -> None:
    for rate in rates:
        ok = (rate >= 0) & (rate <= 1)  # False for NaN
        if not bool(ok.all()):
            bad = rate[~ok].detach().double()
            raise ValueError(f"SPPO win rates must lie in [0, 1]; got {bad.numel()} outside, e.g. {bad[0].item():.6g}")
