"""Pure metric maths for the evaluation harness (EVALUATION.md §8): no I/O, no models.

Every leaderboard number is a :class:`MetricValue`: a point estimate with its ``n``, a 95% CI and a declared
direction (lm-eval's ``higher_is_better``; ``None`` for diagnostics such as KL or length). CIs are percentile
bootstraps over the unit of independence the caller passes in (prompts, for win rate and rewards), seeded so
that the same inputs always give the same leaderboard.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

_RESERVED = frozenset({"value", "ci95", "n", "higher_is_better"})
_MAX_BOOTSTRAP_ELEMENTS = 1 << 22  # resampled values held at once (~32 MiB float64): bounds memory for big n
_TIE_ATOL = 1e-9  # |p - 0.5| below this is a tie; order averaging of float judge probabilities leaves round-off


@dataclass(frozen=True)
class MetricValue:
    """One reported number. ``extra`` carries metric-specific fields (``stderr``, ``n_wins``, ...)."""

    value: float
    ci95: tuple[float, float] | None
    n: int
    higher_is_better: bool | None
    extra: dict[str, float | int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # Coerce numpy scalars to Python types here so that to_dict() is always JSON-serialisable.
        object.__setattr__(self, "value", float(self.value))
        if not math.isfinite(self.value):  # a metric that cannot be computed raises or is left out; JSON has no NaN
            raise ValueError(f"a metric value must be finite, got {self.value}")
        if self.ci95 is not None:
            lo, hi = (float(b) for b in self.ci95)
            if not (math.isfinite(lo) and math.isfinite(hi)):
                raise ValueError(f"ci95 bounds must be finite, got [{lo}, {hi}]")
            if lo > hi:
                raise ValueError(f"ci95 lower bound {lo} exceeds upper bound {hi}")
            object.__setattr__(self, "ci95", (lo, hi))
        if int(self.n) < 0:
            raise ValueError(f"n must be >= 0, got {self.n}")
        object.__setattr__(self, "n", int(self.n))
        clash = _RESERVED & self.extra.keys()
        if clash:
            raise ValueError(f"extra keys {sorted(clash)} would overwrite MetricValue fields")
        object.__setattr__(self, "extra", {k: _py_scalar(v) for k, v in self.extra.items()})

    def to_dict(self) -> dict:
        """``{"value", "ci95": [lo, hi] | None, "n", "higher_is_better", **extra}`` (the §9 result entry)."""
        return {
            "value": self.value,
            "ci95": list(self.ci95) if self.ci95 is not None else None,
            "n": self.n,
            "higher_is_better": self.higher_is_better,
            **self.extra,
        }


def group_resamples(groups: Sequence, resamples: int, seed: int) -> list[np.ndarray] | None:
    """Index resamples that draw whole groups with replacement (a cluster bootstrap), or ``None`` when every group
    holds one item (then the i.i.d. bootstrap is the same thing, and callers keep their vectorised path).

    Why: items that share a unit (several preference pairs of one prompt) are not independent; resampling them one
    by one gives CIs that are too narrow. Rows differ in length (the drawn groups' sizes), so they come as a list.
    """
    labels = np.unique(np.asarray([str(g) for g in groups]), return_inverse=True)[1].reshape(-1)
    sizes = np.bincount(labels)
    if sizes.max(initial=1) <= 1:
        return None
    order = np.argsort(labels, kind="stable")  # each group's items, contiguous
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(resamples):
        drawn = rng.integers(0, sizes.size, size=sizes.size)
        lengths = sizes[drawn]
        offsets = np.arange(lengths.sum()) - np.repeat(np.cumsum(lengths) - lengths, lengths)
        rows.append(order[np.repeat(starts[drawn], lengths) + offsets])
    return rows


def bootstrap_statistics(n: int, resamples: int, seed: int, stat: Callable[[np.ndarray], np.ndarray],
                         groups: Sequence | None = None) -> np.ndarray:
    """``stat`` of ``resamples`` index resamples of ``n`` items. I.i.d. resamples come as rows of an int matrix,
    chunked to bound memory (``stat`` maps rows to one value each); with ``groups``, whole groups are resampled
    (:func:`group_resamples`), one row at a time since rows then differ in length."""
    if resamples < 1:
        raise ValueError(f"resamples must be >= 1, got {resamples}")
    if groups is not None:
        if len(groups) != n:
            raise ValueError(f"groups has {len(groups)} entries for {n} items")
        rows = group_resamples(groups, resamples, seed)
        if rows is not None:
            return np.array([stat(row[None, :])[0] for row in rows], dtype=np.float64)
    rng = np.random.default_rng(seed)
    chunk = max(1, _MAX_BOOTSTRAP_ELEMENTS // n)
    out = np.empty(resamples, dtype=np.float64)
    for start in range(0, resamples, chunk):
        stop = min(start + chunk, resamples)
        out[start:stop] = stat(rng.integers(0, n, size=(stop - start, n)))
    return out


def bootstrap_ci(
    values: Sequence[float],
    *,
    resamples: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
    statistic: Callable[..., np.ndarray] = np.mean,
    groups: Sequence | None = None,
) -> tuple[float, float]:
    """Percentile bootstrap ``(1 - alpha)`` CI of ``statistic`` over i.i.d. ``values``.

    Resamples indices with ``np.random.default_rng(seed)``, vectorised (``statistic`` must take ``axis=``, as
    numpy reductions do). Pass one value per independent unit: with several samples per prompt, average per
    prompt first, otherwise the CI is too narrow; or pass each value's unit as ``groups`` to resample whole units
    (:func:`group_resamples`).
    """
    x = as_1d_finite(values, "values")
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    stats = bootstrap_statistics(x.size, resamples, seed, lambda rows: statistic(x[rows], axis=1), groups)
    lo, hi = np.quantile(stats, [alpha / 2, 1 - alpha / 2])
    return float(lo), float(hi)


def mean_with_ci(
    values: Sequence[float], *, resamples: int = 1000, seed: int = 0, higher_is_better: bool | None,
    groups: Sequence | None = None,
) -> MetricValue:
    """Mean with bootstrap CI (over ``groups`` when given, see :func:`bootstrap_ci`) and the analytic i.i.d.
    standard error (``stderr``, omitted when n < 2), like lm-eval."""
    x = as_1d_finite(values, "values")
    extra = {"stderr": float(x.std(ddof=1) / np.sqrt(x.size))} if x.size > 1 else {}
    return MetricValue(
        value=float(x.mean()),
        ci95=bootstrap_ci(x, resamples=resamples, seed=seed, groups=groups),
        n=x.size,
        higher_is_better=higher_is_better,
        extra=extra,
    )


def order_averaged_preference(p_ab: float, p_ba: float) -> float:
    """Policy preference from judging both orders: ``0.5 * (p_ab + 1 - p_ba)``.

    ``p_ab`` = P(judge prefers the first-shown output) with the policy first; ``p_ba`` = the same with the
    reference first. An additive bias towards position A enters both terms and cancels; two hard verdicts that
    disagree (each order picks whatever was shown first) give 0.5, FastChat's "inconsistent = tie" rule.
    """
    for name, p in (("p_ab", p_ab), ("p_ba", p_ba)):
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"{name} must be a probability in [0, 1], got {p}")
    return 0.5 * (p_ab + 1.0 - p_ba)


def win_rate(preferences: Sequence[float], *, resamples: int = 1000, seed: int = 0) -> MetricValue:
    """Win rate vs the reference: mean per-prompt preference (1 = policy wins, 0 = loses, 0.5 = tie).

    Preferences should already be order-averaged (:func:`order_averaged_preference`). ``extra`` holds
    ``n_wins`` / ``n_losses`` / ``n_ties`` (ties within 1e-9 of 0.5) and ``stderr``; the CI bootstraps prompts.
    """
    p = as_1d_finite(preferences, "preferences")
    if p.min() < 0.0 or p.max() > 1.0:
        raise ValueError(f"preferences must lie in [0, 1], got range [{p.min()}, {p.max()}]")
    tie = np.abs(p - 0.5) <= _TIE_ATOL
    m = mean_with_ci(p, resamples=resamples, seed=seed, higher_is_better=True)
    counts = {
        "n_wins": int(np.sum(~tie & (p > 0.5))),
        "n_losses": int(np.sum(~tie & (p < 0.5))),
        "n_ties": int(tie.sum()),
    }
    return MetricValue(m.value, m.ci95, m.n, True, {**counts, **m.extra})


def kl_k1(logp_policy: Sequence[float], logp_ref: Sequence[float]) -> np.ndarray:
    """Per-sample ``log pi(y) - log pi_ref(y)`` for ``y ~ pi``: unbiased for KL(pi || pi_ref), but individual
    samples can be negative and the variance is high (Schulman, "Approximating KL divergence")."""
    lp, lr = _paired_logps(logp_policy, logp_ref)
    return lp - lr


def kl_k3(logp_policy: Sequence[float], logp_ref: Sequence[float]) -> np.ndarray:
    """Per-draw ``(r - 1) - log r`` with ``r = pi_ref(y) / pi(y)``, ``y ~ pi``: unbiased (E_pi[r] = 1) and
    non-negative (log r <= r - 1). Low-variance where ``r`` stays near 1, i.e. for one token's distribution; for a
    whole sequence use :func:`sequence_kl_k3`, which applies it per token.

    Computed from ``d = log r`` as ``expm1(d) - d``: never forms ``r`` from raw probabilities (which underflow) and
    keeps precision when ``pi_ref ~ pi``.
    """
    lp, lr = _paired_logps(logp_policy, logp_ref)
    d = lr - lp
    return np.maximum(np.expm1(d) - d, 0.0)  # the clamp only guards last-ulp round-off; the true value is >= 0


def sequence_kl_k3(token_logp_policy: Sequence[Sequence[float]],
                   token_logp_ref: Sequence[Sequence[float]]) -> np.ndarray:
    """Per-sequence KL estimate ``sum_t k3(y_t)`` from the per-token log-probs of sequences ``y ~ pi``.

    Why per token: by the chain rule, KL(pi || pi_ref) over sequences is the expected sum of the per-token KLs, and
    each token's k3 is unbiased for its own KL given the prefix, so the sum is unbiased for the sequence KL. k3 of the
    whole-sequence ratio is unbiased too, but once the sequence KL is a few nats its ratio is so heavy-tailed that a
    few hundred samples land about a nat low with a CI that mostly misses the truth (and one large log-ratio
    overflows it). Per token, k3 is the low-variance estimator only while each token's ratio stays near 1 (small
    per-token KL): there its spread is below k1's and its CI covers. Where single tokens' KL is large (a sharp policy
    against a flat reference, about half a nat per token and up) it is right-skewed again and lands low, which is why
    k1 stays on the leaderboard beside it as the estimate to trust. ``benchmarks/kl_estimators.py`` measures both
    regimes.
    """
    if len(token_logp_policy) != len(token_logp_ref):
        raise ValueError(f"token_logp_policy and token_logp_ref hold {len(token_logp_policy)} and "
                         f"{len(token_logp_ref)} sequences")
    totals = np.empty(len(token_logp_policy), dtype=np.float64)
    for i, (lp, lr) in enumerate(zip(token_logp_policy, token_logp_ref)):
        if len(lp) != len(lr):
            raise ValueError(f"sequence {i}: {len(lp)} policy and {len(lr)} reference token log-probs")
        totals[i] = kl_k3(lp, lr).sum() if len(lp) else 0.0
    return totals


def paired_delta(values: Sequence[float], reference_values: Sequence[float], *, resamples: int = 1000, seed: int = 0,
                 higher_is_better: bool | None, names: tuple[str, str] = ("values", "reference_values")) -> MetricValue:
    """Mean of ``values[i] − reference_values[i]`` (both measured on prompt ``i``), with a bootstrap CI over prompts:
    the paired bootstrap, much tighter than the difference of two unpaired means when prompts vary in difficulty."""
    own, ref = as_1d_finite(values, names[0]), as_1d_finite(reference_values, names[1])
    if own.shape != ref.shape:
        raise ValueError(f"{names[0]} and {names[1]} differ in shape: {own.shape} vs {ref.shape}")
    return mean_with_ci(own - ref, resamples=resamples, seed=seed, higher_is_better=higher_is_better)


def length_delta(lengths: Sequence[float], reference_lengths: Sequence[float], *, resamples: int = 1000,
                 seed: int = 0) -> MetricValue:
    """Mean paired length difference, response minus the reference's response to the same prompt (EVALUATION.md §8
    "mean Δlen vs reference"): how much longer a checkpoint answers than its reference, the length bias a raw win rate
    can reward. No direction; the CI bootstraps prompts."""
    return paired_delta(lengths, reference_lengths, resamples=resamples, seed=seed, higher_is_better=None,
                        names=("lengths", "reference_lengths"))


def reward_delta(rewards: Sequence[float], reference_rewards: Sequence[float], *, resamples: int = 1000,
                 seed: int = 0) -> MetricValue:
    """Mean paired reward gain over the reference's response to the same prompt: EVALUATION.md §8's gold reward
    "relative to the SFT policy's mean (R(0) = 0)" when the reference is the SFT policy, with a paired CI."""
    return paired_delta(rewards, reference_rewards, resamples=resamples, seed=seed, higher_is_better=True,
                        names=("rewards", "reference_rewards"))


def policy_entropy(logp_policy: Sequence[float], *, resamples: int = 1000, seed: int = 0) -> MetricValue:
    """Monte-Carlo entropy of the policy's responses in nats, ``mean(−log π(y | x))`` over samples ``y ~ π(· | x)``
    (the sequence entropy TRL logs as ``objective/entropy``), with a bootstrap CI over prompts.

    Unbiased only for draws from ``π`` itself (temperature 1, no top-p): other samples give a cross-entropy. It is the
    entropy of responses capped at the generation budget: a truncated sample counts only its first ``max_new_tokens``
    tokens, so with a high ``truncation_rate`` it is below the entropy of whole responses. A falling entropy is the
    policy collapsing onto fewer answers; its response length moves it too (more tokens, more nats), so read it beside
    ``len_tokens_mean``.
    """
    logp = as_1d_finite(logp_policy, "logp_policy")
    if (logp > 1e-6).any():
        raise ValueError(f"log-probabilities must be <= 0, got a maximum of {logp.max():.6g}")
    return mean_with_ci(-logp, resamples=resamples, seed=seed, higher_is_better=None)


def length_stats(
    lengths: Sequence[int], truncated: Sequence[bool], *, resamples: int = 1000, seed: int = 0
) -> dict[str, MetricValue]:
    """Response length diagnostics: ``len_tokens_mean`` (CI), ``len_tokens_median`` (CI), ``truncation_rate``
    (fraction that hit max_new_tokens without EOS; lower is better, it means broken or runaway outputs)."""
    lens = as_1d_finite(lengths, "lengths")
    trunc = np.asarray(truncated, dtype=bool)
    if trunc.shape != lens.shape:
        raise ValueError(f"lengths and truncated differ in shape: {lens.shape} vs {trunc.shape}")
    if lens.min() < 0:
        raise ValueError("lengths must be >= 0")
    return {
        "len_tokens_mean": mean_with_ci(lens, resamples=resamples, seed=seed, higher_is_better=None),
        "len_tokens_median": MetricValue(
            float(np.median(lens)),
            bootstrap_ci(lens, resamples=resamples, seed=seed, statistic=np.median),
            lens.size,
            None,
        ),
        "truncation_rate": mean_with_ci(
            trunc.astype(np.float64), resamples=resamples, seed=seed, higher_is_better=False
        ),
    }


def as_1d_finite(values: Sequence[float], name: str) -> np.ndarray:
    """``values`` as a non-empty 1-D float64 array with no NaN/inf; else a ValueError naming ``name``."""
    x = np.asarray(values, dtype=np.float64)
    if x.ndim != 1 or x.size == 0:
        raise ValueError(f"{name} must be a non-empty 1-D sequence, got shape {x.shape}")
    if not np.all(np.isfinite(x)):
        raise ValueError(f"{name} contains NaN or inf ({int(np.sum(~np.isfinite(x)))} of {x.size})")
    return x


def as_positive_int(value: int | float, name: str) -> int:
    """``value`` as an int, so a whole float (15.0, e.g. from a YAML file) works like the int and anything else (a
    bool, a fraction, a string) fails here with a ValueError naming ``name``, not later inside a slice or range."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)) \
            or int(value) != value or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def _paired_logps(logp_policy: Sequence[float], logp_ref: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    lp = np.asarray(logp_policy, dtype=np.float64)
    lr = np.asarray(logp_ref, dtype=np.float64)
    if lp.shape != lr.shape:
        raise ValueError(f"logp_policy and logp_ref differ in shape: {lp.shape} vs {lr.shape}")
    return lp, lr


def _py_scalar(v: float | int) -> float | int:
    return v.item() if isinstance(v, np.generic) else v
