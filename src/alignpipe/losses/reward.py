"""Reward-model training losses: Bradley–Terry (single RM and ensemble mean) and UP-RLHF's diversity regulariser.

Pure functions of tensors, so the maths is tested on hand values (ALGORITHMS.md §3e) independently of any trainer;
a reward trainer only supplies per-pair scalar rewards and, for the regulariser, the LoRA down-projections.

UP-RLHF (Zhai et al. 2024, ALGORITHMS.md §3a, eq. 12), written as a loss to MINIMISE:

``L_RM = −E log σ(r̄(y_w) − r̄(y_l)) − λ · (1/M) Σ_m ||A^(m)||_* / ||A^(m)||_F``

* the rank loss uses the ensemble-MEAN reward ``r̄`` (:func:`ensemble_bradley_terry_loss`), not the average of N
  per-member losses: the members are trained jointly as one predictor;
* ``A^(m)`` stacks the down-projections ``A_n`` (``r × d``) of all N members of adapted matrix m along the rank
  dimension (:func:`stack_lora_down_projections`); B is never used. Identical members make ``A^(m)`` rank ``≤ r``,
  diverse members raise the rank toward ``min(N r, d)``; the nuclear norm is the convex surrogate of rank, and
  dividing by the Frobenius norm stops the regulariser from "winning" by inflating the weights.

Choices (tested in ``tests/test_reward_maths.py``):

* ``form="ratio"`` (the default, eq. 12 as printed): the Frobenius denominator is NOT detached, so the term is the
  exact gradient of the scale-invariant ratio (the gradient is orthogonal to ``A``: it reshapes, never rescales).
  Measured consequence: PEFT's random Kaiming-uniform A's are already nearly orthogonal, so the stacked ratio starts
  within 1% of its maximum ``sqrt(N r)`` and the term has almost nothing left to push;
* ``form="nnm"``: the nuclear-norm maximisation of the third-party reimplementation quoted in §3a, which cites the
  authors' code: ``||A||_* / sg(||A||_F) · sqrt(max(shape))`` with the denominator detached (``sg``). Its gradient
  ``U Vᵀ · sqrt(max(shape)) / ||A||_F`` raises every singular value, so it also grows the A's (and with them the
  members' LoRA updates) instead of saturating;
* an all-zero ``A^(m)`` raises ``ValueError``: the ratio is 0/0 there and the gradient is undefined, and PEFT
  initialises A with Kaiming-uniform (it is B that starts at zero), so an all-zero A means the wrong matrices were
  passed (e.g. the B's) and silently returning 1.0 would hide that.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import Tensor

DiversityForm = Literal["ratio", "nnm"]

__all__ = [
    "DiversityForm",
    "bradley_terry_loss",
    "diversity_loss",
    "ensemble_bradley_terry_loss",
    "nuclear_frobenius_ratio",
    "stack_lora_down_projections",
]


def _working_dtype(t: Tensor) -> torch.dtype:
    """At least float32: reward heads often run in bf16, whose logsigmoid / SVD are imprecise or unsupported."""
    return torch.promote_types(t.dtype, torch.float32)


def bradley_terry_loss(
    chosen_rewards: Tensor,
    rejected_rewards: Tensor,
    *,
    margin: Tensor | None = None,
    weight: Tensor | None = None,
) -> Tensor:
    """Bradley–Terry reward-model loss, the mean over pairs of ``−log σ(r_c − r_r − margin)``.

    ``margin`` (optional) is Llama-2's / TRL ``RewardTrainer``'s per-pair margin column: the chosen reward must
    beat the rejected one by at least about ``margin`` before the loss becomes small, so clearly separated pairs
    are pushed further apart than near-ties. ``weight`` (optional) weights pairs; it is normalised by its sum, so
    the loss stays a (weighted) mean and its scale does not depend on the weights' units. ``F.logsigmoid`` keeps
    the loss finite for every finite input (a naive ``log(sigmoid(z))`` gives ``inf`` once ``z ≲ −100`` in
    float32). Computed in at least float32.

    Gradient: ``∂L/∂r_c = −σ(−Δ)/N`` and ``∂L/∂r_r = +σ(−Δ)/N`` with ``Δ = r_c − r_r − margin``.

    Args:
        chosen_rewards: rewards of the preferred responses, any non-empty shape (usually ``[N]``).
        rejected_rewards: same shape as ``chosen_rewards``.
        margin: broadcastable to the rewards' shape (a scalar tensor is fine); must not enlarge it.
        weight: same shape as the rewards, finite, ``>= 0``, with a positive sum.
    """
    if chosen_rewards.shape != rejected_rewards.shape:
        raise ValueError(
            f"chosen and rejected rewards must have the same shape, got {tuple(chosen_rewards.shape)} and "
            f"{tuple(rejected_rewards.shape)}"
        )
    if chosen_rewards.numel() == 0:
        raise ValueError("Bradley-Terry loss of an empty batch is undefined (got 0 pairs)")
    dtype = _working_dtype(chosen_rewards)
    delta = chosen_rewards.to(dtype) - rejected_rewards.to(dtype)
    if margin is not None:
        margin = torch.as_tensor(margin, device=delta.device)
        try:
            broadcast = torch.broadcast_shapes(margin.shape, delta.shape)
        except RuntimeError:
            broadcast = None
        if broadcast != delta.shape:
            raise ValueError(
                f"margin of shape {tuple(margin.shape)} does not broadcast to the rewards' shape {tuple(delta.shape)}"
            )
        delta = delta - margin.to(dtype)
    losses = -F.logsigmoid(delta)
    if weight is None:
        return losses.mean()
    weight = torch.as_tensor(weight, device=delta.device)
    if weight.shape != delta.shape:
        raise ValueError(
            f"weight must have the rewards' shape {tuple(delta.shape)} (one weight per pair), got {tuple(weight.shape)}"
        )
    weight = weight.to(dtype)
    ok = torch.isfinite(weight) & (weight >= 0)
    if not bool(ok.all()):
        raise ValueError("pair weights must be finite and >= 0")
    total = weight.sum()
    if not float(total.detach()) > 0:
        raise ValueError("pair weights sum to 0; the weighted mean is undefined")
    return (weight * losses).sum() / total


def ensemble_bradley_terry_loss(chosen_rewards: Tensor, rejected_rewards: Tensor) -> Tensor:
    """UP-RLHF eq. 12's rank loss: Bradley–Terry on the ensemble-MEAN reward, ``−mean log σ(r̄_c − r̄_r)``.

    Inputs are ``[N, K]`` (pairs × members). The members are averaged *before* the sigmoid, which is not the same
    as averaging K per-member losses: the ensemble is trained as one predictor whose output is ``r̄``, and a
    member can be individually wrong on a pair as long as the mean ranks it correctly. The diversity term
    (:func:`diversity_loss`) is what keeps the members apart.
    """
    if chosen_rewards.shape != rejected_rewards.shape:
        raise ValueError(
            f"chosen and rejected ensemble rewards must have the same shape, got {tuple(chosen_rewards.shape)} and "
            f"{tuple(rejected_rewards.shape)}"
        )
    if chosen_rewards.ndim != 2 or chosen_rewards.shape[0] == 0 or chosen_rewards.shape[1] == 0:
        raise ValueError(
            f"ensemble rewards must be a non-empty [N pairs, K members] matrix, got shape {tuple(chosen_rewards.shape)}"
        )
    dtype = _working_dtype(chosen_rewards)
    return bradley_terry_loss(chosen_rewards.to(dtype).mean(dim=1), rejected_rewards.to(dtype).mean(dim=1))


def nuclear_frobenius_ratio(matrix: Tensor) -> Tensor:
    """``||A||_* / ||A||_F``, the scale-free rank surrogate of UP-RLHF's diversity term (a 0-dim tensor).

    With singular values ``s``: ``Σ s_i / sqrt(Σ s_i²)``, so ``1 <= ratio <= sqrt(rank A)`` (Cauchy–Schwarz), with
    1 for rank one and ``sqrt(rank)`` when all nonzero singular values are equal; ``ratio(cA) = ratio(A)`` for
    ``c != 0``. Computed in at least float32 (SVD in bf16/fp16 is unsupported), via ``torch.linalg.svdvals``,
    whose backward needs only ``U Vᵀ`` and so stays finite with repeated or zero singular values.

    Raises ``ValueError`` for a non-2-D or empty matrix, a non-finite one, or an all-zero one (0/0: see the module
    docstring for why that is an error rather than 1.0).
    """
    nuclear, frobenius = _nuclear_and_frobenius(matrix)
    return nuclear / frobenius


def nuclear_norm_maximisation_term(matrix: Tensor) -> Tensor:
    """``||A||_* / sg(||A||_F) · sqrt(max(shape))``, the ``form="nnm"`` term: the same value as the ratio times
    ``sqrt(max(shape))``, but with the denominator a constant, so its gradient grows ``A`` (see the module docstring).
    Same input checks as :func:`nuclear_frobenius_ratio`."""
    nuclear, frobenius = _nuclear_and_frobenius(matrix)
    return nuclear / frobenius.detach() * math.sqrt(max(matrix.shape))


def _nuclear_and_frobenius(matrix: Tensor) -> tuple[Tensor, Tensor]:
    """``(||A||_*, ||A||_F)`` in the working dtype (one SVD), after the input checks both diversity terms share."""
    if matrix.ndim != 2 or matrix.numel() == 0:
        raise ValueError(f"expected a non-empty 2-D matrix, got shape {tuple(matrix.shape)}")
    a = matrix.to(_working_dtype(matrix))
    frobenius = torch.linalg.matrix_norm(a, ord="fro")
    fro_value = float(frobenius.detach())
    if not math.isfinite(fro_value):
        raise ValueError("matrix has non-finite entries; the nuclear/Frobenius ratio is undefined")
    if fro_value == 0.0:
        raise ValueError(
            "matrix is all zeros, so ||A||_*/||A||_F is 0/0; LoRA A matrices start non-zero (PEFT zero-initialises B, "
            "not A), so check that the down-projections were passed"
        )
    return torch.linalg.svdvals(a).sum(), frobenius


def stack_lora_down_projections(member_matrices: Sequence[Tensor]) -> Tensor:
    """``A^(m) = concat_rows(A_1^(m), ..., A_N^(m)) ∈ R^{N r × d}`` for one adapted weight matrix m.

    Each member's LoRA down-projection ``A_n`` (PEFT's ``lora_A.weight``) is ``r × d``; stacking along the rank
    dimension makes the row space of the result the union of the members' row spaces, which is what the nuclear
    norm measures. All members must have the same shape: a mismatch means matrices of different layers/modules (or
    a B matrix, ``d_out × r``) were grouped together.
    """
    members = list(member_matrices)
    if not members:
        raise ValueError("need at least one member's LoRA A matrix to stack, got none")
    first = members[0]
    for n, a in enumerate(members):
        if a.ndim != 2:
            raise ValueError(f"member {n}'s LoRA A must be a 2-D r × d matrix, got shape {tuple(a.shape)}")
        if a.shape != first.shape:
            raise ValueError(
                f"all members' LoRA A matrices must share one r × d shape; member 0 is {tuple(first.shape)}, "
                f"member {n} is {tuple(a.shape)}"
            )
        if not a.is_floating_point():
            raise ValueError(f"member {n}'s LoRA A must be floating point, got {a.dtype}")
    return torch.cat([a.to(first.device) for a in members], dim=0)


def diversity_loss(per_matrix_members: Sequence[Sequence[Tensor]], weight: float,
                   form: DiversityForm = "ratio") -> Tensor:
    """UP-RLHF's diversity term as a loss to minimise: ``−λ · (1/M) Σ_m ||A^(m)||_* / ||A^(m)||_F`` (``form="ratio"``),
    or with :func:`nuclear_norm_maximisation_term` in place of the ratio (``form="nnm"``).

    Minimising it maximises the mean nuclear/Frobenius ratio, i.e. spreads the members' down-projections over
    more directions. Only the A matrices enter (the caller passes ``per_matrix_members[m][n] = A_n^(m)``), so B
    gets no gradient from this term.

    ``weight = 0`` (a plain LoRA ensemble) returns an exact constant ``0`` (no grad, on the first matrix's device)
    without running any SVD: nothing can turn into NaN, and ``bt_loss + diversity_loss(...)`` backpropagates as
    ``bt_loss`` alone. The shapes are still checked, so a mis-built grouping fails even at ``λ = 0``.

    Args:
        per_matrix_members: M groups (one per adapted weight matrix), each with the N members' ``r × d`` A.
        weight: ``λ >= 0``.
        form: ``"ratio"`` or ``"nnm"``.
    """
    if not (math.isfinite(weight) and weight >= 0):
        raise ValueError(f"diversity weight (lambda) must be finite and >= 0, got {weight}")
    if form not in get_args(DiversityForm):
        raise ValueError(f"diversity form must be one of {get_args(DiversityForm)}, got {form!r}")
    groups = [list(g) for g in per_matrix_members]
    if not groups:
        raise ValueError("need at least one adapted weight matrix (M >= 1), got none")
    if weight == 0:
        for g in groups:
            _check_group(g)
        first = groups[0][0]
        return torch.zeros((), dtype=_working_dtype(first), device=first.device)
    term = nuclear_frobenius_ratio if form == "ratio" else nuclear_norm_maximisation_term
    ratios = [term(stack_lora_down_projections(g)) for g in groups]
    device = ratios[0].device
    return -weight * torch.stack([r.to(device) for r in ratios]).mean()


def _check_group(members: list[Tensor]) -> None:
    """The shape checks of :func:`stack_lora_down_projections` without allocating the stacked matrix."""
    if not members:
        raise ValueError("need at least one member's LoRA A matrix to stack, got none")
    first = members[0]
    for n, a in enumerate(members):
        if a.ndim != 2 or a.shape != first.shape:
            raise ValueError(
                f"all members' LoRA A matrices must share one 2-D r × d shape; member 0 is {tuple(first.shape)}, "
                f"member {n} is {tuple(a.shape)}"
            )
