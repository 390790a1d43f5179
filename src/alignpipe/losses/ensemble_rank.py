"""The rank loss of one batch of a K-member reward ensemble: Bradley–Terry on the members' ``[B, K]`` rewards under
either objective (``mean``: on the ensemble-mean reward; ``members``: the mean of the K members' own losses), with
hard or soft labels, per-pair margins and weights, and each member's bootstrap multiplicities.

Why apart from the training loop (:mod:`alignpipe.rewards.ensemble_training`, whose docstring states the objectives):
these are pure functions of tensors, tested on hand values like the single-model losses in
:mod:`alignpipe.losses.reward`, which they reduce to.
"""

from __future__ import annotations

import torch
from torch import Tensor

from alignpipe.losses.preference import soft_preference_loss
from alignpipe.losses.reward import bradley_terry_loss, ensemble_bradley_terry_loss

__all__ = ["ensemble_rank_loss"]


def _soft_loss(
    chosen: Tensor, rejected: Tensor, target: Tensor, *, margin: Tensor | None, weight: Tensor | None
) -> Tensor:
    """Soft-label Bradley–Terry over ``[B]`` rewards, reduced like :func:`bradley_terry_loss`."""
    dtype = torch.promote_types(chosen.dtype, torch.float32)
    h = chosen.to(dtype) - rejected.to(dtype)
    if margin is not None:
        h = h - margin.to(dtype)
    losses = soft_preference_loss(h, target.to(dtype), beta=1.0)
    if weight is None:
        return losses.mean()
    weight = weight.to(dtype)
    total = weight.sum()
    if not float(total.detach()) > 0:
        raise ValueError("pair weights sum to 0; the weighted mean is undefined")
    return (weight * losses).sum() / total


def ensemble_rank_loss(
    chosen: Tensor,
    rejected: Tensor,
    objective: str,
    *,
    margin: Tensor | None,
    weight: Tensor | None,
    multiplicity: Tensor | None,
    target: Tensor | None = None,
) -> Tensor:
    """The rank loss of one batch (``chosen``/``rejected`` are ``[B, K]``); ``target`` = per-pair soft labels
    (``None``: hard labels through the original Bradley–Terry functions)."""
    if _weightless(weight):
        return chosen.sum() * 0.0  # keeps the graph; every pair of this batch has weight 0
    if target is not None:
        return _soft_bt_loss(chosen, rejected, objective, margin=margin, weight=weight, multiplicity=multiplicity,
                             target=target)
    if objective == "mean":
        if margin is None and weight is None:
            return ensemble_bradley_terry_loss(chosen, rejected)
        return bradley_terry_loss(chosen.float().mean(dim=1), rejected.float().mean(dim=1), margin=margin,
                                  weight=weight)
    return _member_average(chosen, rejected, weight, multiplicity,
                           lambda c, r, w: bradley_terry_loss(c, r, margin=margin, weight=w))


def _weightless(weight: Tensor | None) -> bool:
    """A batch whose pairs all have weight 0 (valid weights, shuffled together): it adds no rank-loss gradient."""
    return weight is not None and not float(weight.sum()) > 0


def _member_average(chosen: Tensor, rejected: Tensor, weight: Tensor | None, multiplicity: Tensor | None,
                    pair_loss) -> Tensor:
    """Mean over the K members of ``pair_loss(chosen_k, rejected_k, weight_k)``, where a member's weight includes its
    bootstrap multiplicity; a member whose weights sum to 0 in this batch (its resample holds none of the pairs, or
    they all have weight 0) adds nothing (still / K). With multiplicities, each member's weighted mean is rescaled
    from the sum of its weights to their sum without the copy counts (its expected value), so a pair's weight is
    its copy count times its weight without bootstrap, not its share of the batch's copies."""
    losses = []
    for k in range(chosen.shape[1]):
        w = weight
        if multiplicity is not None:
            w = multiplicity[:, k] if w is None else w * multiplicity[:, k]
        if _weightless(w):
            continue
        loss = pair_loss(chosen[:, k], rejected[:, k], w)
        if multiplicity is not None:
            loss = loss * (w.sum() / (chosen.shape[0] if weight is None else weight.sum()))
        losses.append(loss)
    if not losses:
        return chosen.sum() * 0.0  # keeps the graph; no member has weight in this batch
    return torch.stack(losses).sum() / chosen.shape[1]


def _soft_bt_loss(
    chosen: Tensor,
    rejected: Tensor,
    objective: str,
    *,
    margin: Tensor | None,
    weight: Tensor | None,
    multiplicity: Tensor | None,
    target: Tensor,
) -> Tensor:
    """:func:`ensemble_rank_loss` with soft labels: same structure, :func:`soft_preference_loss` in place of
    ``−log σ``."""
    if objective == "mean":
        dtype = torch.promote_types(chosen.dtype, torch.float32)
        return _soft_loss(chosen.to(dtype).mean(dim=1), rejected.to(dtype).mean(dim=1), target,
                          margin=margin, weight=weight)
    return _member_average(chosen, rejected, weight, multiplicity,
                           lambda c, r, w: _soft_loss(c, r, target, margin=margin, weight=w))
