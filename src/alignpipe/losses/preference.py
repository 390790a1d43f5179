"""Pairwise preference losses on the DPO logit: DPO, cDPO, OSP's soft-preference cross-entropy, IPO.

Pure functions of tensors, so the maths is tested on hand values (ALGORITHMS.md §4e, §5) independently of any
trainer, and the trainers (``alignpipe.trainers.soft_dpo``) only supply the four sequence log-probabilities.

Notation (ALGORITHMS.md §0): ``h = (logp_θ(y_w) − logp_ref(y_w)) − (logp_θ(y_l) − logp_ref(y_l))`` is the DPO logit
(the pairwise log-ratio margin); ``β h`` is the implicit reward margin and ``σ(β h)`` the model's implied
probability that ``y_w`` is preferred.

One loss serves three methods (§4a, §5), distinguished only by the target ``p`` = P(y_w ≻ y_l):

* ``p = 1``: DPO (Rafailov et al. 2023), ``−log σ(β h)``;
* ``p = 1 − ε``: cDPO / label smoothing (Mitchell 2023), ε the assumed label-flip rate;
* ``p ∈ [0, 1]`` per pair: OSP's soft-preference cross-entropy (SPCE) [I: reconstructed, see §4], the binary
  cross-entropy between ``p`` and ``σ(β h)``; its per-pair minimiser is ``β h = logit(p)``, so, unlike DPO, it
  does not push margins to infinity.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["dpo_logits", "ipo_loss", "margin_gap", "soft_preference_loss", "validate_preference"]


def dpo_logits(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
) -> torch.Tensor:
    """The DPO logit ``h = (π_c − ref_c) − (π_r − ref_r)`` per pair, from sequence log-probabilities.

    The operations are in TRL's order (chosen log-ratio minus rejected log-ratio), so ``h`` is bit-identical to
    the ``delta_score`` TRL's ``DPOTrainer`` builds from the same four tensors; the trainer relies on that.
    """
    chosen_logratios = policy_chosen_logps - ref_chosen_logps
    rejected_logratios = policy_rejected_logps - ref_rejected_logps
    return chosen_logratios - rejected_logratios


def validate_preference(target: torch.Tensor, name: str = "preference target") -> None:
    """Raise ``ValueError`` (with the offending range) unless every entry of ``target`` lies in [0, 1].

    NaN fails too: a probability target that is not a number is a data bug, not something to train on.
    """
    target = torch.as_tensor(target)
    if target.numel() == 0:
        return
    ok = (target >= 0) & (target <= 1)  # False for NaN
    if not bool(ok.all()):
        bad = target[~ok].detach().double().cpu()
        raise ValueError(
            f"{name} must be a probability in [0, 1]; got {bad.numel()} value(s) outside it, in "
            f"[{bad.min().item():.6g}, {bad.max().item():.6g}] (NaN counts as outside)"
        )


def soft_preference_loss(h: torch.Tensor, target: torch.Tensor | float, beta: float) -> torch.Tensor:
    """Per-pair soft-preference loss ``−[p·log σ(β h) + (1 − p)·log σ(−β h)]`` (no reduction).

    ``p = 1`` is DPO, ``p = 1 − ε`` is cDPO, a per-pair soft ``p`` is OSP's SPCE (module docstring). Both terms use
    ``F.logsigmoid``, which is finite for every finite ``β h`` (a naive ``log(sigmoid(z))`` underflows to ``−inf``
    for ``z ≲ −100`` in float32 and then ``0 · −inf = NaN``). With ``p = 1`` the second term is multiplied by an
    exact zero, so the result is bit-identical to ``−F.logsigmoid(β h)``, TRL's ``sigmoid`` loss.

    Gradient: ``dL/dh = β (σ(β h) − p)``, zero at ``β h = logit(p)``. Equivalent form (§4a):
    ``−log σ(β h) + (1 − p) β h``, i.e. DPO plus a linear margin penalty.

    Args:
        h: DPO logits (see :func:`dpo_logits`), any shape.
        target: ``p`` = probability that the chosen response is preferred; a float or a tensor broadcastable to
            ``h``. Must lie in [0, 1] (``ValueError`` naming the offending range otherwise).
        beta: the KL coefficient, > 0.
    """
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    if isinstance(target, torch.Tensor):
        p = target.to(h.device)
        if not p.is_floating_point():
            p = p.to(torch.promote_types(h.dtype, torch.float32))
    else:  # a Python/NumPy number or sequence: take h's precision (at least float32)
        p = torch.as_tensor(target, dtype=torch.promote_types(h.dtype, torch.float32), device=h.device)
    validate_preference(p)
    z = beta * h
    return -(p * F.logsigmoid(z) + (1 - p) * F.logsigmoid(-z))


def ipo_loss(h: torch.Tensor, tau: float) -> torch.Tensor:
    """Per-pair IPO loss ``(h − 1/(2τ))²`` (Azar et al. 2023; no reduction).

    It regresses the margin to the finite target ``1/(2τ)``, so deterministic preferences do not drive ``h`` to
    infinity. This is the paper's form on whatever ``h`` it is given; TRL's ``loss_type="ipo"`` feeds it
    per-token-averaged log-ratios instead of sums (ALGORITHMS.md §5: pick one and test it). Training uses TRL's.
    """
    if not tau > 0:
        raise ValueError(f"IPO tau must be > 0, got {tau}")
    return (h - 1 / (2 * tau)) ** 2


def margin_gap(h: torch.Tensor, target: torch.Tensor | float, beta: float, eps: float = 1e-6) -> torch.Tensor:
    """Per-pair ``|β h − logit(p)|``: how far each implicit reward margin is from the soft loss's minimiser.

    OSP's claim (§4d) is that with soft targets ``β h`` saturates near ``logit(p)`` instead of diverging; this is
    the quantity to watch. ``p`` is clipped to ``[eps, 1 − eps]`` so hard labels give a large but finite gap.
    """
    dtype = torch.promote_types(h.dtype, torch.float32)  # 1 − 1e-6 rounds to 1 in bf16/fp16
    p = torch.as_tensor(target, device=h.device).to(dtype).clamp(eps, 1 - eps)
    return (beta * h.to(dtype) - torch.logit(p)).abs()


def ids_label_update(labels: torch.Tensor, model_probabilities: torch.Tensor, rate: float) -> torch.Tensor:
    """Iterative Data Smoothing (Zhu, Jordan & Jiao 2024; ALGORITHMS.md §14): ``ŷ ← (1 − rate)·ŷ + rate·σ(Δr)``.

    Called once per epoch with the model's current pairwise probabilities. Moving the targets toward the model's
    own predictions keeps rarely compared pairs from being pushed to infinite margins (rate = 0 is plain MLE).
    """
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"IDS rate must be in [0, 1], got {rate}")
    validate_preference(labels, "IDS labels")
    validate_preference(model_probabilities, "IDS model probabilities")
    return (1.0 - rate) * labels + rate * model_probabilities
