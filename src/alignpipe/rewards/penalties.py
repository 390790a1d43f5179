"""Penalised (conservative) rewards from a reward-model ensemble: the reward PPO / best-of-n optimise.

Pure aggregation of per-member rewards, so the maths is tested on hand values (ALGORITHMS.md §3e, §16) apart
from any model. Rows are samples, columns are ensemble members: ``per_member`` is ``[N samples, K members]``
(note ALGORITHMS.md writes N for the number of members).

Modes (:data:`PenaltyMode`):

* ``"mean"``: ``r̄``, the ensemble mean (no penalty; UP-RLHF with ``β_2 = 0``, Coste et al.'s "mean").
* ``"mean_minus_std"``: UP-RLHF (Zhai et al. 2024, §3a eqs. 13–16), ``r̃ = r̄ − coef·(u − ū)`` with ``u`` the
  population std across members and ``ū`` a running mean of ``u`` (:class:`RunningMean`). Re-centring by ``ū``
  makes the penalty a bonus for samples the ensemble is more sure of than usual, so the reward's overall level is
  not dragged down by the members' typical disagreement.
* ``"min"``: WCO, worst-case optimisation (Coste et al. 2024, §16), the minimum over members.
* ``"mean_minus_var"``: UWO, uncertainty-weighted optimisation (§16), ``r̄ − coef·var`` with the variance across
  members (variance, not std, and not re-centred).

Variance convention for UWO: population (``unbiased_var=False``, the default) matches Coste et al.'s best-of-n
code (``np.var``, ddof 0), EVALUATION.md §7 and UP-RLHF's population std; their PPO reward function uses
``torch.var`` (unbiased, ddof 1), which is the value ALGORITHMS.md §16's hand example quotes
(``[1.0, 1.2, 0.8]`` → 0.96 with λ = 1; population gives 0.97333). Library callers pass ``unbiased_var=True`` to
reproduce the PPO code exactly; recipes (the reward plug-in) use the population variance, so a recipe matches that
code's λ with ``penalty_coef = λ·K/(K−1)``.

Running-mean order for ``"mean_minus_std"`` (tested): ``ū`` is the mean of the uncertainties of all samples seen
in *earlier* calls (:meth:`RunningMean.centre`), and the caller folds this batch's ``u`` in *after* the rewards are
computed (:class:`alignpipe.rewards.plugin.ModelRewardSource` does both). So a sample's reward does not depend on
the other samples in its own batch (or on the batch size), and §3e's hand cases hold literally with ``ū`` the value
stored before the call. The one exception is the very first call (nothing seen yet, ``count == 0``): there ``ū`` is
this batch's own mean ``u`` rather than the arbitrary initial 0, which would apply the full uncentred penalty
``−coef·u`` to the first batch only and shift its rewards against all later ones. :func:`penalised_rewards` itself
is pure: it takes ``ū`` as a number and changes no state.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, get_args

import torch
from torch import Tensor

__all__ = ["PENALTY_MODES", "EnsembleRewards", "PenaltyMode", "RunningMean", "penalised_rewards"]

PenaltyMode = Literal["mean", "mean_minus_std", "min", "mean_minus_var"]
PENALTY_MODES: tuple[str, ...] = get_args(PenaltyMode)


@dataclass
class RunningMean:
    """Incremental mean of every value seen so far (UP-RLHF's ``ū``), not an exponential moving average.

    An EMA would forget early samples and make ``ū`` depend on the batch size and decay rate; the paper's ``ū`` is
    the mean "over all samples seen so far", so every value gets equal weight: after 0.1 then 0.3 it is 0.2.
    Accumulated in float64 Python floats, so long PPO runs do not drift. ``state_dict``/``from_state_dict`` let
    a resumed PPO run continue the same mean.
    """

    count: int = 0
    mean: float = 0.0

    def __post_init__(self) -> None:
        if isinstance(self.count, bool) or not isinstance(self.count, int) or self.count < 0:
            raise ValueError(f"RunningMean.count must be an int >= 0, got {self.count!r}")
        self.mean = float(self.mean)
        if not math.isfinite(self.mean):
            raise ValueError(f"RunningMean.mean must be finite, got {self.mean!r}")

    @classmethod
    def of(cls, values: Sequence[float] | Tensor) -> RunningMean:
        """Count and mean of ``values`` (on the CPU, float64). Non-finite values raise ``ValueError``: one NaN would
        poison the mean, and every later reward, for the rest of the run."""
        if isinstance(values, Tensor):
            flat = values.detach().to(device="cpu", dtype=torch.float64).reshape(-1)
        else:
            flat = torch.as_tensor(list(values), dtype=torch.float64).reshape(-1)
        if not bool(torch.isfinite(flat).all()):
            raise ValueError("RunningMean got non-finite values")
        return cls(count=flat.numel(), mean=float(flat.mean()) if flat.numel() else 0.0)

    def update(self, values: Sequence[float] | Tensor) -> float:
        """Fold ``values`` into the mean (each value counts once) and return the new mean.

        Batched updates equal one-at-a-time updates: ``mean += (batch_mean − mean) · n / (count + n)``.
        An empty batch leaves the state unchanged; non-finite values raise ``ValueError`` (:meth:`of`).
        """
        return self.merge(RunningMean.of(values))

    def centre(self, batch: RunningMean) -> float:
        """UP-RLHF's ``ū`` for a batch whose uncertainties ``batch`` summarises: the mean of every earlier value, or,
        before any (``count == 0``), the batch's own mean (see the module docstring). Changes nothing."""
        return self.mean if self.count > 0 else batch.mean

    def merge(self, other: RunningMean) -> float:
        """Fold in the values ``other`` summarises (its count and mean) and return the new mean.

        Why: a data-parallel step sees one batch split over ranks; merging the all-reduced batch moments keeps one
        ``ū`` on every rank, equal to the mean a single process would hold.
        """
        if other.count == 0:
            return self.mean
        total = self.count + other.count
        self.mean += (other.mean - self.mean) * (other.count / total)
        self.count = total
        return self.mean

    def state_dict(self) -> dict[str, Any]:
        """Plain ``{"count": int, "mean": float}``, JSON- and ``torch.save``-friendly."""
        return {"count": self.count, "mean": self.mean}

    @classmethod
    def from_state_dict(cls, d: dict[str, Any]) -> RunningMean:
        """Inverse of :meth:`state_dict`; raises ``ValueError`` on missing keys or invalid values."""
        missing = {"count", "mean"} - set(d)
        if missing:
            raise ValueError(f"RunningMean state dict is missing {sorted(missing)}; got keys {sorted(d)}")
        return cls(count=d["count"], mean=d["mean"])


@dataclass(frozen=True)
class EnsembleRewards:
    """Per-member rewards of a batch and the two statistics every mode needs.

    ``per_member`` is ``[N samples, K members]``; ``mean`` and ``std`` are ``[N]``. ``std`` is the POPULATION std
    (``unbiased=False``), UP-RLHF eq. 13's ``u = sqrt((1/K) Σ_k (r_k − r̄)²)``: it is 0 for one member (``K = 1``
    gives ``u ≡ 0``) where the unbiased one would be NaN. Build it with :meth:`from_members`.
    """

    per_member: Tensor
    mean: Tensor
    std: Tensor

    def __post_init__(self) -> None:
        if self.per_member.ndim != 2:
            raise ValueError(
                f"per_member must be [N samples, K members], got shape {tuple(self.per_member.shape)}"
            )
        n = self.per_member.shape[0]
        for name in ("mean", "std"):
            t = getattr(self, name)
            if t.shape != (n,):
                raise ValueError(f"{name} must have shape ({n},) to match per_member, got {tuple(t.shape)}")

    @classmethod
    def from_members(cls, per_member: Tensor) -> EnsembleRewards:
        """Compute the ensemble mean and population std from ``[N, K]`` per-member rewards.

        Raises ``ValueError`` unless ``per_member`` is a floating-point ``[N, K]`` matrix with ``N, K >= 1`` and
        finite entries (a NaN reward from one member would silently become the batch's reward under ``"min"``).
        """
        if per_member.ndim != 2 or per_member.shape[0] == 0 or per_member.shape[1] == 0:
            raise ValueError(
                f"per_member rewards must be a non-empty [N samples, K members] matrix, got shape "
                f"{tuple(per_member.shape)}"
            )
        if not per_member.is_floating_point():
            raise ValueError(f"per_member rewards must be floating point, got {per_member.dtype}")
        if not bool(torch.isfinite(per_member).all()):
            raise ValueError("per_member rewards contain NaN or inf")
        return cls(
            per_member=per_member,
            mean=per_member.mean(dim=1),
            std=per_member.std(dim=1, correction=0),
        )


def penalised_rewards(
    rewards: EnsembleRewards,
    mode: PenaltyMode,
    *,
    coef: float = 0.0,
    u_bar: float | None = None,
    unbiased_var: bool = False,
) -> Tensor:
    """The ``[N]`` rewards to optimise under ``mode`` (see the module docstring for each mode and its source).

    Args:
        rewards: per-member rewards and their statistics (:meth:`EnsembleRewards.from_members`).
        mode: ``"mean"``, ``"mean_minus_std"`` (UP-RLHF), ``"min"`` (WCO) or ``"mean_minus_var"`` (UWO).
        coef: the penalty weight (UP-RLHF's ``β_2``, UWO's ``λ``), finite and ``>= 0``; unused by ``"mean"`` and
            ``"min"``.
        u_bar: required by ``"mean_minus_std"``: UP-RLHF's ``ū``, the running mean of earlier samples' ``u``
            (:meth:`RunningMean.centre`; the caller folds this batch in afterwards). Ignored by the other modes.
        unbiased_var: ``"mean_minus_var"`` only: use the unbiased (ddof 1) variance of Coste et al.'s PPO code
            instead of the population variance of their best-of-n code; needs ``K >= 2`` members.
    """
    if not (math.isfinite(coef) and coef >= 0):
        raise ValueError(f"penalty coef must be finite and >= 0, got {coef}")
    if mode == "mean":
        return rewards.mean
    if mode == "mean_minus_std":
        if u_bar is None or not math.isfinite(u_bar):
            raise ValueError(f"mode 'mean_minus_std' needs a finite u_bar (RunningMean.centre), got {u_bar!r}")
        return rewards.mean - coef * (rewards.std - u_bar)
    if mode == "min":
        return rewards.per_member.min(dim=1).values
    if mode == "mean_minus_var":
        if unbiased_var and rewards.per_member.shape[1] < 2:
            raise ValueError("the unbiased variance needs at least 2 ensemble members, got 1")
        var = rewards.per_member.var(dim=1, correction=1 if unbiased_var else 0)
        return rewards.mean - coef * var
    raise ValueError(f"unknown penalty mode {mode!r}; expected one of {list(PENALTY_MODES)}")
