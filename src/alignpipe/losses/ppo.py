"""PPO maths for language models: KL-shaped token rewards, GAE, clipped policy/value losses, KL controllers.

TRL 1.16 has no PPO trainer, so these are written by hand for alignpipe's own PPO loop (ALGORITHMS.md §6, the
Ziegler 2019 / Stiennon 2020 / trlx form). They are pure functions of tensors, so the maths is tested on §6e's
hand values apart from any model; the loop only supplies per-token log-probabilities, values and a mask.

Shapes and masks: per-token tensors are ``[B sequences, T response tokens]`` (prompt excluded, §0), with a
``mask`` of the same shape that is 1 (or ``True``) on real response tokens and 0 on padding. Right padding is the
expected layout; :func:`gae` accepts any mask whose ones form ONE contiguous run per row (so leading padding is
fine too) and raises ``ValueError`` on holes, because a hole would silently be treated as a zero-value step.
Masked positions of every per-token output are 0.

UP-RLHF (§3a, eqs. 14–16) takes the KL out of the reward and adds it as a separate loss,
:func:`squared_log_ratio_loss`; with that variant pass ``kl_coef=0`` (or skip :func:`kl_penalty_rewards`) and
put the penalised ensemble reward (``alignpipe.rewards.penalties``) in :func:`token_rewards`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from numbers import Integral
from typing import Any, Literal, get_args

import torch
from torch import Tensor

__all__ = [
    "KL_PENALTY_KINDS",
    "AdaptiveKLController",
    "FixedKLController",
    "KLPenaltyKind",
    "clipped_policy_loss",
    "clipped_value_loss",
    "entropy_from_logits",
    "explained_variance",
    "gae",
    "kl_penalty_rewards",
    "masked_mean",
    "masked_var",
    "masked_whiten",
    "sequence_scores",
    "squared_log_ratio_loss",
    "token_rewards",
]

KLPenaltyKind = Literal["k1", "k3", "abs", "mse"]
KL_PENALTY_KINDS: tuple[str, ...] = get_args(KLPenaltyKind)


# --------------------------------------------------------------------------------------------------------------------
# Masked reductions
# --------------------------------------------------------------------------------------------------------------------

def _mask_as(mask: Tensor, x: Tensor, name: str = "mask") -> Tensor:
    """``mask`` as ``x``'s dtype and device, after checking the shapes agree (broadcasting would hide bugs)."""
    if mask.shape != x.shape:
        raise ValueError(f"{name} shape {tuple(mask.shape)} does not match the values' shape {tuple(x.shape)}")
    return mask.to(dtype=x.dtype, device=x.device)


def _masked(x: Tensor, m: Tensor) -> Tensor:
    """``x * m``, but 0 wherever ``m`` is 0 even when ``x`` is inf or NaN there (inf * 0 is NaN): a value in a padding
    slot (a huge k3 estimate, an overflowed value head) must not reach a real token through a sum or GAE's pass."""
    return torch.where(m != 0, x * m, torch.zeros((), dtype=x.dtype, device=x.device))


def _check_same_shape(**tensors: Tensor) -> None:
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    if len(set(shapes.values())) > 1:
        raise ValueError(f"shapes must match, got {shapes}")


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of ``x`` over the positions where ``mask`` is 1: over all of them, or along ``dim``.

    Every token counts once (a long response weighs more than a short one), as in trl/trlx. An empty mask (or an
    empty row, with ``dim``) raises ``ValueError`` instead of returning NaN, which would poison the loss.
    """
    m = _mask_as(mask, x)
    count = m.sum() if dim is None else m.sum(dim)
    if bool((count == 0).any()):
        where = "" if dim is None else f" along dim {dim} (some rows are all padding)"
        raise ValueError(f"masked_mean over an empty mask{where}")
    total = _masked(x, m).sum() if dim is None else _masked(x, m).sum(dim)
    return total / count


def masked_var(x: Tensor, mask: Tensor, unbiased: bool = True) -> Tensor:
    """Variance of ``x`` over the positions where ``mask`` is 1.

    ``unbiased=True`` (Bessel's correction, needs at least 2 positions) is what trl's and trlx's ``whiten`` use,
    so whitened advantages match theirs; ``False`` gives the population variance.
    """
    m = _mask_as(mask, x)
    mean = masked_mean(x, m)
    var = masked_mean((x - mean) ** 2, m)
    if unbiased:
        n = m.sum()
        if bool(n < 2):
            raise ValueError(f"the unbiased masked variance needs at least 2 unmasked positions, got {int(n.item())}")
        var = var * (n / (n - 1))
    return var


def masked_whiten(
    x: Tensor, mask: Tensor, shift_mean: bool = True, unbiased: bool = True, eps: float = 1e-8
) -> Tensor:
    """``(x − mean) / sqrt(var + eps)`` over the unmasked positions; masked positions are set to 0.

    Used for the per-batch advantage whitening of §6a (and optionally for the sequence scores). With
    ``shift_mean=False`` the mean is added back, so only the scale is normalised: trl does that for rewards, whose
    sign carries meaning. ``eps`` keeps a constant batch finite (it whitens to 0).
    """
    m = _mask_as(mask, x)
    mean = masked_mean(x, m)
    var = masked_var(x, m, unbiased=unbiased)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return _masked(out, m)


# --------------------------------------------------------------------------------------------------------------------
# Rewards and advantages
# --------------------------------------------------------------------------------------------------------------------

def kl_penalty_rewards(
    logp_old: Tensor, logp_ref: Tensor, mask: Tensor, kl_coef: float, kind: KLPenaltyKind = "k1"
) -> Tensor:
    """Per-token KL reward ``−β·k(l_t)``, ``l_t = log π_old(a_t|s_t) − log π_ref(a_t|s_t)`` (§6a), masked.

    ``π_old`` is the policy that sampled the rollout, so each ``k`` is an estimator of the per-token
    ``KL(π_old || π_ref)`` under those samples (Schulman's k1/k2/k3):

    * ``"k1"``: ``l``, the §6a reward; unbiased, but negative for single tokens, so it can pay the policy for
      tokens the reference prefers. Summed over a sequence it is the sequence-level log-ratio of §0.
    * ``"k3"``: ``(e^{−l} − 1) + l``, unbiased and ``>= 0`` per token (lower variance than k1 near ``π_ref``).
    * ``"abs"``: ``|l|``; ``"mse"``: ``½ l²`` (k2): both ``>= 0`` and biased (trl's names).

    All are 0 when ``π_old = π_ref``. ``kl_coef`` is ``β``, finite and ``>= 0``.
    """
    if not (math.isfinite(kl_coef) and kl_coef >= 0):
        raise ValueError(f"kl_coef must be finite and >= 0, got {kl_coef}")
    _check_same_shape(logp_old=logp_old, logp_ref=logp_ref, mask=mask)
    log_ratio = logp_old - logp_ref
    if kind == "k1":
        k = log_ratio
    elif kind == "k3":
        k = torch.expm1(-log_ratio) + log_ratio
    elif kind == "abs":
        k = log_ratio.abs()
    elif kind == "mse":
        k = 0.5 * log_ratio**2
    else:
        raise ValueError(f"unknown KL penalty kind {kind!r}; expected one of {list(KL_PENALTY_KINDS)}")
    return _masked(-kl_coef * k, _mask_as(mask, k))


def sequence_scores(reward: Tensor, truncated: Tensor, *, clip: float, missing_eos_penalty: float | None = None,
                    normalise: Callable[[Tensor], Tensor] | None = None) -> Tensor:
    """The score added at each response's last token (§6a): the reward, less ``missing_eos_penalty`` where the
    response never emitted EOS (``truncated`` = 1), optionally normalised, then clipped to ``[−clip, clip]``.

    Normalised before it is clipped, as §6a ("clip(R) ... R optionally whitened") and trlx do, so the clip bounds
    every score that reaches the advantages, penalty included.
    """
    score = reward
    if missing_eos_penalty is not None:
        score = score - missing_eos_penalty * truncated.to(score.dtype)
    if normalise is not None:
        score = normalise(score)
    return score.clamp(-clip, clip)


def token_rewards(scores: Tensor, kl_rewards: Tensor, mask: Tensor) -> Tensor:
    """``[B, T]`` rewards: the KL rewards plus each sequence's score on its LAST unmasked token (§6a).

    ``scores`` (``[B]``) is the reward-model (or UP-RLHF penalised) score, already clipped to ``±c`` and/or
    whitened by the caller; it is paid once, at the end, because only the full response is scored. A row with no
    unmasked token raises ``ValueError``: its score would have nowhere to go and silently vanish.
    """
    if kl_rewards.ndim != 2:
        raise ValueError(f"kl_rewards must be [B, T], got shape {tuple(kl_rewards.shape)}")
    if scores.shape != kl_rewards.shape[:1]:
        raise ValueError(f"scores must have shape ({kl_rewards.shape[0]},), got {tuple(scores.shape)}")
    m = _mask_as(mask, kl_rewards)
    has_tokens = m.sum(1) > 0
    if not bool(has_tokens.all()):
        rows = torch.nonzero(~has_tokens).flatten().tolist()
        raise ValueError(f"rows {rows} have no unmasked token to put their score on")
    positions = torch.arange(kl_rewards.shape[1], device=kl_rewards.device)
    last = (positions * (m > 0)).amax(1)  # index of each row's last unmasked token
    onehot = (positions == last[:, None]).to(kl_rewards.dtype)
    return _masked(kl_rewards + onehot * scores.to(kl_rewards.dtype)[:, None], m)


def _check_contiguous(mask: Tensor) -> None:
    """Raise unless each row's ones form at most one contiguous run (right or left padding, no holes)."""
    if bool(((mask != 0) & (mask != 1)).any()):
        raise ValueError("mask must be 0/1 (or bool)")
    m = mask.to(torch.int8)
    runs = m[:, :1].long() + (m[:, 1:] > m[:, :-1]).long().sum(1, keepdim=True)
    if bool((runs > 1).any()):
        rows = torch.nonzero(runs.flatten() > 1).flatten().tolist()
        raise ValueError(f"mask rows {rows} have holes; GAE needs one contiguous run of response tokens per row")


def gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation (§6a): ``(advantages, returns)``, both ``[B, T]``, 0 where masked.

    ``δ_t = r_t + γ V(s_{t+1}) − V(s_t)``, ``A_t = Σ_l (γλ)^l δ_{t+l}``, with ``V = 0`` after each row's last
    unmasked token (the episode ends there; padding values are ignored), and returns ``G_t = A_t + V(s_t)`` are the
    value targets. Inputs are detached: advantages and returns are targets, never differentiated through.
    Advantages are NOT whitened here; call :func:`masked_whiten` on them per batch (§6a).
    """
    if rewards.ndim != 2:
        raise ValueError(f"rewards must be [B, T], got shape {tuple(rewards.shape)}")
    _check_same_shape(rewards=rewards, values=values, mask=mask)
    if not 0.0 <= gamma <= 1.0:
        raise ValueError(f"gamma must be in [0, 1], got {gamma}")
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"lam must be in [0, 1], got {lam}")
    _check_contiguous(mask)
    values = values.detach()
    m = _mask_as(mask, values)
    v = _masked(values, m)
    r = _masked(rewards.detach().to(values.dtype), m)
    steps = r.shape[1]
    last = torch.zeros_like(v[:, 0])
    reversed_advantages = []
    for t in reversed(range(steps)):
        next_v = v[:, t + 1] if t + 1 < steps else torch.zeros_like(last)
        delta = r[:, t] + gamma * next_v - v[:, t]
        last = delta + gamma * lam * last
        reversed_advantages.append(last)
    advantages = _masked(torch.stack(reversed_advantages[::-1], dim=1), m)
    return advantages, _masked(advantages + v, m)


# --------------------------------------------------------------------------------------------------------------------
# Losses
# --------------------------------------------------------------------------------------------------------------------

def clipped_policy_loss(
    logp: Tensor, logp_old: Tensor, advantages: Tensor, mask: Tensor, clip_eps: float
) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO's clipped surrogate ``−E_t min(ρ_t A_t, clip(ρ_t, 1 − ε, 1 + ε) A_t)``, ``ρ_t = π_θ/π_old`` (§6a).

    The ``min`` makes the objective pessimistic: once the ratio has moved past ``1 ± ε`` in the direction the
    advantage favours, the clipped term is taken and its gradient is 0, so one batch cannot move the policy far.
    ``logp_old`` and ``advantages`` are constants (detached). Token-level mean over the mask (trl/trlx).

    Returns ``(loss, stats)``; ``stats`` (detached scalars): ``clip_fraction``, the share of tokens where the
    clipped term was taken; ``approx_kl``, the k3 estimate ``E[(ρ − 1) − log ρ]`` of ``KL(π_old || π_θ)`` (>= 0,
    the usual early-stopping signal); ``ratio_mean``.
    """
    if not clip_eps > 0:
        raise ValueError(f"clip_eps must be > 0, got {clip_eps}")
    _check_same_shape(logp=logp, logp_old=logp_old, advantages=advantages, mask=mask)
    # 0 in padding before exp: a padding slot's overflow would add 0 to the loss but 0 * inf = NaN to its gradient
    log_ratio = _masked(logp - logp_old.detach(), _mask_as(mask, logp))
    ratio = torch.exp(log_ratio)
    adv = advantages.detach()
    unclipped = -adv * ratio
    clipped = -adv * torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        stats = {
            "clip_fraction": masked_mean((clipped > unclipped).to(ratio.dtype), mask),
            "approx_kl": masked_mean(torch.expm1(log_ratio) - log_ratio, mask),
            "ratio_mean": masked_mean(ratio, mask),
        }
    return loss, stats


def clipped_value_loss(
    values: Tensor, values_old: Tensor, returns: Tensor, mask: Tensor, clip_eps_value: float
) -> tuple[Tensor, dict[str, Tensor]]:
    """``0.5·E_t max((V − G)², (clip(V, V_old − ε_v, V_old + ε_v) − G)²)`` (§6a), token-level masked mean.

    The clipped branch stops the value head jumping far from its rollout-time prediction in one batch; taking the
    ``max`` (not the clipped term alone) means clipping can only slow learning, never reward a bad move.
    ``values_old`` and ``returns`` are constants (detached). Returns ``(loss, stats)``; ``stats["clip_fraction"]``
    is the share of tokens where the clipped branch was the larger.
    """
    if not clip_eps_value > 0:
        raise ValueError(f"clip_eps_value must be > 0, got {clip_eps_value}")
    _check_same_shape(values=values, values_old=values_old, returns=returns, mask=mask)
    m = _mask_as(mask, values)  # padding zeroed first: its square's gradient would be 0 * inf there
    values, old, target = _masked(values, m), _masked(values_old.detach(), m), _masked(returns.detach(), m)
    values_clipped = old + torch.clamp(values - old, -clip_eps_value, clip_eps_value)
    unclipped = (values - target) ** 2
    clipped = (values_clipped - target) ** 2
    loss = 0.5 * masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        stats = {"clip_fraction": masked_mean((clipped > unclipped).to(values.dtype), mask)}
    return loss, stats


def squared_log_ratio_loss(
    logp: Tensor, logp_ref: Tensor, mask: Tensor, level: Literal["sequence", "token"] = "sequence"
) -> Tensor:
    """UP-RLHF's separate KL loss (§3a eq. 15, as a loss to minimise): ``E[(log π_θ(y|x) − log π_SFT(y|x))²]``.

    It is a direct, differentiable penalty (gradient ``2Δ ∇log π_θ``, §3e), always ``>= 0`` and 0 with a zero
    gradient at ``π_θ = π_SFT``; multiply by ``β_1`` in the caller. As in §3a there is no ``½`` (Schulman's k2
    has one; ``β_1`` absorbs it).

    ``level="sequence"`` (default, §3a's equation): ``Δ`` is the sequence log-ratio ``Σ_t (log π_θ − log π_SFT)``
    over unmasked tokens, averaged over the ``B`` sequences. ``level="token"``: the masked mean of per-token
    ``Δ_t²``, whose scale does not grow with response length (§3a says the paper does not state which its code
    uses). ``logp_ref`` is frozen (detached).
    """
    _check_same_shape(logp=logp, logp_ref=logp_ref, mask=mask)
    delta = _masked(logp - logp_ref.detach(), _mask_as(mask, logp))
    if level == "sequence":
        if delta.ndim == 0:
            raise ValueError("squared_log_ratio_loss needs per-token [B, T] (or [T]) log-probabilities")
        return (delta.sum(-1) ** 2).mean()
    if level == "token":
        return masked_mean(delta**2, mask)
    raise ValueError(f"unknown level {level!r}; expected 'sequence' or 'token'")


# --------------------------------------------------------------------------------------------------------------------
# Diagnostics
# --------------------------------------------------------------------------------------------------------------------

def entropy_from_logits(logits: Tensor, mask: Tensor) -> Tensor:
    """Mean per-token entropy ``H = −Σ_a π(a) log π(a)`` over unmasked positions; ``logits`` is ``[..., V]``.

    Computed from ``log_softmax`` in at least float32 (bf16 logits lose the small-probability tail), with
    ``0·log 0 = 0`` so ``−inf`` logits (banned tokens) do not produce NaN. A collapsing entropy is the usual sign
    of PPO mode collapse; §6a uses no entropy bonus, so this is logged, not optimised.
    """
    if logits.shape[:-1] != mask.shape:
        raise ValueError(
            f"logits must be mask's shape plus a vocab dim, got {tuple(logits.shape)} and {tuple(mask.shape)}"
        )
    z = logits.to(torch.promote_types(logits.dtype, torch.float32))
    logp = torch.log_softmax(z, dim=-1)
    p = logp.exp()
    plogp = torch.where(p > 0, p * logp, torch.zeros_like(p))
    return masked_mean(-plogp.sum(-1), mask)


def explained_variance(values: Tensor, returns: Tensor, mask: Tensor) -> Tensor:
    """``1 − Var[G − V] / Var[G]`` over unmasked tokens (detached): 1 is a perfect value head, 0 no better than
    predicting the mean return, < 0 worse. NaN when the returns are constant (the ratio is undefined)."""
    _check_same_shape(values=values, returns=returns, mask=mask)
    with torch.no_grad():
        var_returns = masked_var(returns, mask, unbiased=False)
        var_residual = masked_var(returns - values, mask, unbiased=False)
        if bool(var_returns == 0):
            return torch.full_like(var_returns, float("nan"))
        return 1.0 - var_residual / var_returns


# --------------------------------------------------------------------------------------------------------------------
# KL coefficient controllers
# --------------------------------------------------------------------------------------------------------------------

def _check_coef(value: float, name: str) -> float:
    value = float(value)
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"{name} must be finite and >= 0, got {value}")
    return value


class AdaptiveKLController:
    """Ziegler et al.'s adaptive KL coefficient in the trl/trlx form (§6a).

    ``e = clip(KL/target − 1, −0.2, 0.2)``, ``β ← β·(1 + e·n_steps/horizon)``: a proportional controller that
    nudges ``β`` up when the policy's KL to the reference overshoots ``target`` and down when it undershoots, by at
    most 20% per ``horizon`` samples. ``current_kl`` is the mean SEQUENCE-level KL (summed over tokens) of the
    batch and ``n_steps`` the number of samples (rollouts) it came from. Coste et al.'s trlx config (§6c):
    ``init_kl_coef=0.1, target=6, horizon=10000``.
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: float) -> None:
        self.value = _check_coef(init_kl_coef, "init_kl_coef")
        if not (math.isfinite(target) and target > 0):
            raise ValueError(f"KL target must be finite and > 0, got {target}")
        if not (math.isfinite(horizon) and horizon > 0):
            raise ValueError(f"KL horizon must be finite and > 0, got {horizon}")
        self.target = float(target)
        self.horizon = float(horizon)

    def update(self, current_kl: float, n_steps: int) -> float:
        """Apply one controller step and return the new ``β``. Non-finite KL raises (``β`` would become NaN)."""
        current_kl = float(current_kl)
        if not math.isfinite(current_kl):
            raise ValueError(f"current_kl must be finite, got {current_kl}")
        if isinstance(n_steps, bool) or not isinstance(n_steps, Integral) or n_steps < 0:
            raise ValueError(f"n_steps must be an int >= 0, got {n_steps!r}")
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon
        return self.value

    def state_dict(self) -> dict[str, Any]:
        """``{"type": "adaptive", "value", "target", "horizon"}``: plain floats, JSON- and ``torch.save``-friendly."""
        return {"type": "adaptive", "value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore ``β`` from :meth:`state_dict` for a resumed run.

        Raises ``ValueError`` on a fixed controller's state, missing keys, or a different ``target``/``horizon``
        (resuming under another schedule would silently change the controller; construct it with the
        checkpoint's values if that is intended).
        """
        _check_state(state, "adaptive", {"value", "target", "horizon"})
        for key in ("target", "horizon"):
            if float(state[key]) != getattr(self, key):
                raise ValueError(
                    f"checkpoint KL controller has {key}={state[key]}, this one {getattr(self, key)}"
                )
        self.value = _check_coef(state["value"], "checkpoint KL coefficient")

    def __repr__(self) -> str:
        return f"AdaptiveKLController(value={self.value}, target={self.target}, horizon={self.horizon})"


class FixedKLController:
    """A constant KL coefficient (Gao et al. §15 study several fixed values); same interface as the adaptive one."""

    def __init__(self, kl_coef: float) -> None:
        self.value = _check_coef(kl_coef, "kl_coef")

    def update(self, current_kl: float, n_steps: int) -> float:
        """No-op (arguments accepted for interface parity); returns ``β``."""
        return self.value

    def state_dict(self) -> dict[str, Any]:
        """``{"type": "fixed", "value"}``."""
        return {"type": "fixed", "value": self.value}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore ``β``; raises ``ValueError`` on an adaptive controller's state or a missing value."""
        _check_state(state, "fixed", {"value"})
        self.value = _check_coef(state["value"], "checkpoint KL coefficient")

    def __repr__(self) -> str:
        return f"FixedKLController(value={self.value})"


def _check_state(state: dict[str, Any], kind: str, keys: set[str]) -> None:
    if state.get("type") != kind:
        raise ValueError(f"expected a {kind!r} KL controller state, got type {state.get('type')!r}")
    missing = keys - set(state)
    if missing:
        raise ValueError(f"KL controller state is missing {sorted(missing)}; got keys {sorted(state)}")


def masked_moments(x: Tensor, mask: Tensor) -> Tensor:
    """``[Σ x, Σ x², n]`` over the unmasked positions: additive, so ranks can sum them before whitening.

    Summed in float64: the variance comes out as ``Σx²/n − mean²``, which in float32 cancels away for data whose mean
    is large beside its spread (a reward model's arbitrary offset; at mean 100, std 0.01 the whitened values were off
    by 2), where one process's two-pass ``masked_whiten`` is exact."""
    x, m = x.to(torch.float64), _mask_as(mask, x).to(torch.float64)  # float64 before summing: see below
    x = _masked(x, m)
    return torch.stack([x.sum(), (x * x).sum(), m.sum()])


def whiten_from_moments(x: Tensor, mask: Tensor, moments: Tensor, shift_mean: bool = True, unbiased: bool = True,
                        eps: float = 1e-8) -> Tensor:
    """:func:`masked_whiten` with the mean and variance of a larger batch (``moments`` from :func:`masked_moments`,
    summed over data-parallel ranks), so every rank whitens with the statistics of the global rollout batch."""
    total, total_sq, n = moments.tolist()
    if n < (2 if unbiased else 1):
        raise ValueError(f"whitening needs at least {2 if unbiased else 1} unmasked positions, got {int(n)}")
    mean = total / n
    var = max(total_sq / n - mean * mean, 0.0)
    if unbiased:
        var *= n / (n - 1)
    m = _mask_as(mask, x)
    out = (x - mean) / math.sqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return _masked(out, m)
