"""Best-of-n and reward-overoptimisation maths (ALGORITHMS.md §15): pure NumPy, no models, no I/O.

TRL 1.16 has no PPO trainer (and no best-of-n evaluator), so these are written by hand for alignpipe's own PPO
loop and its overoptimisation plots: the gold reward as a function of ``d = sqrt(KL(π || π_init))`` for best-of-n
sampling and for PPO, and Gao, Schulman & Hilton's (2023) functional forms fitted to those points.

* :func:`unbiased_best_of_n` is Coste et al.'s estimator (``llm_optimization/src/bon/bon_sampling.py``): from ``N``
  scored samples of one prompt it gives the EXACT mean gold score of best-of-``n`` over all ``C(N, n)`` subsets,
  without resampling noise, for every ``n <= N`` from the same samples.
* :func:`kl_best_of_n` is the analytic KL of best-of-n to the base policy, ``log n − (n − 1)/n``, which gives
  best-of-n's ``d`` axis without sampling. It is exact only when no response can be drawn twice; for a policy that
  repeats responses (a peaked tiny model) it is an upper bound (Beirami et al. 2024), so ``d`` is overstated.
* :func:`fit_bon` / :func:`fit_rl` fit ``R_bon(d) = d(α − βd)`` and ``R_RL(d) = d(α − β log d)`` by least squares.
  Both are linear in ``(α, β)`` with no intercept (gold is measured relative to the initial policy, ``R(0) = 0``),
  so the closed-form linear fit is the exact least-squares solution.
* :func:`fit_measured` is the one rule for when measured points support such a fit (:data:`MIN_FIT_POINTS`); the PPO
  and best-of-n stages and the HTML report all go through it, so a stored fit and a drawn one never disagree.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import numpy as np

from alignpipe.evaluation.metrics import as_1d_finite

__all__ = [
    "MIN_FIT_POINTS",
    "OveroptimisationFit",
    "best_of_n_curve",
    "best_of_n_weights",
    "fit_bon",
    "fit_measured",
    "fit_rl",
    "gold_bon",
    "gold_rl",
    "kl_best_of_n",
    "n_for_kl_best_of_n",
    "peak_bon",
    "peak_rl",
    "unbiased_best_of_n",
]

ArrayLike = Sequence[float] | np.ndarray

MIN_FIT_POINTS = 3
"""Distinct ``d > 0`` a Gao fit needs. Both forms have two coefficients and pass through ``R(0) = 0``, so two points
are matched exactly whatever the curve's shape (the "fit" only restates them) and a point at ``d = 0`` adds nothing."""


class OveroptimisationFit(NamedTuple):
    """A fitted gold-reward curve: its coefficients and its maximum over ``d >= 0``.

    ``peak_d``/``peak_r`` are ``inf`` when the fitted curve has no maximum (``β <= 0`` with rising reward: no
    overoptimisation within the fit) and ``0`` when it never rises above ``R(0) = 0``.
    """

    alpha: float
    beta: float
    peak_d: float
    peak_r: float


# --------------------------------------------------------------------------------------------------------------------
# Unbiased best-of-n estimator
# --------------------------------------------------------------------------------------------------------------------

def best_of_n_weights(num_samples: int, n: int) -> np.ndarray:
    """``w_i = C(i − 1, n − 1) / C(N, n)`` for ``i = 1..N`` (0 for ``i < n``): P(the ``i``-th lowest is the best).

    Among the ``C(N, n)`` subsets of size ``n``, ``C(i − 1, n − 1)`` have sample ``i`` as their maximum. The
    binomials overflow float64 for ``N`` in the thousands, so the weights come from the ratio recurrence
    ``w_N = n/N``, ``w_{i−1} = w_i·(i − n)/(i − 1)``: every factor is in [0, 1], so nothing overflows and tiny
    weights underflow harmlessly to 0. They sum to 1 (hockey-stick identity).
    """
    if isinstance(num_samples, bool) or not isinstance(num_samples, (int, np.integer)) or num_samples < 1:
        raise ValueError(f"the number of samples N must be an int >= 1, got {num_samples!r}")
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or not 1 <= n <= num_samples:
        raise ValueError(f"best-of-n needs an int n in [1, N={num_samples}], got {n!r}")
    i = np.arange(num_samples, n, -1, dtype=np.float64)  # N, N − 1, ..., n + 1
    from_top = (n / num_samples) * np.concatenate([[1.0], np.cumprod((i - n) / (i - 1))])  # w_N, ..., w_n
    weights = np.zeros(num_samples, dtype=np.float64)
    weights[n - 1 :] = from_top[::-1]
    return weights


def _gold_in_proxy_order(proxy_scores: ArrayLike, gold_scores: ArrayLike) -> np.ndarray:
    """Gold scores sorted ascending by proxy, each replaced by the mean gold of its proxy-tie group."""
    proxy = as_1d_finite(proxy_scores, "proxy_scores")
    gold = as_1d_finite(gold_scores, "gold_scores")
    if proxy.shape != gold.shape:
        raise ValueError(f"proxy_scores and gold_scores differ in length: {proxy.size} vs {gold.size}")
    _, group, counts = np.unique(proxy, return_inverse=True, return_counts=True)  # group ids ascend with proxy
    group_mean_gold = np.bincount(group, weights=gold) / counts
    return np.repeat(group_mean_gold, counts)  # each group's mean, once per member, groups in ascending proxy order


def unbiased_best_of_n(proxy_scores: ArrayLike, gold_scores: ArrayLike, n: int) -> float:
    """Expected gold score of best-of-``n`` (pick the highest proxy score) from ``N >= n`` samples of one prompt.

    Sort ascending by proxy and return ``Σ_{i=n..N} C(i − 1, n − 1)/C(N, n)·gold_i`` (§15, Coste et al.): exactly
    the average over all ``C(N, n)`` subsets of the gold score of each subset's proxy-best sample.

    Ties in the proxy (exact float equality): a tied maximum is assumed to be broken uniformly at random, so each
    sample's gold is replaced by the mean gold of its tie group before weighting. By linearity that is the exact
    expectation over random tie-breaking, and unlike a sort-order tie-break (Coste et al.'s ``argsort``) it does not
    depend on the order the samples were given in, nor favour high gold.
    """
    gold_sorted = _gold_in_proxy_order(proxy_scores, gold_scores)
    return float(best_of_n_weights(gold_sorted.size, n) @ gold_sorted)


def _as_prompts(scores: ArrayLike | Sequence[ArrayLike], name: str) -> list[np.ndarray]:
    """One prompt (1-D) or several: a 2-D ``[P, N]`` array or a sequence of 1-D arrays (``N`` may differ)."""
    if isinstance(scores, np.ndarray):
        if scores.ndim == 1:
            return [scores]
        if scores.ndim == 2:
            return list(scores)
        raise ValueError(f"{name} must be 1-D (one prompt) or 2-D [prompts, samples], got shape {scores.shape}")
    if len(scores) > 0 and np.ndim(scores[0]) == 1:
        return [np.asarray(row, dtype=np.float64) for row in scores]
    return [np.asarray(scores, dtype=np.float64)]


def best_of_n_curve(
    proxy_scores: ArrayLike | Sequence[ArrayLike], gold_scores: ArrayLike | Sequence[ArrayLike], ns: Sequence[int]
) -> np.ndarray:
    """Unbiased best-of-n gold score for each ``n`` in ``ns``, for one prompt or averaged over prompts.

    ``proxy_scores``/``gold_scores``: one prompt's ``N`` samples (1-D), or several prompts as a ``[P, N]`` array or
    a list of 1-D arrays (``N`` may differ per prompt). Each prompt counts equally in the average. Every ``n`` must
    be ``<=`` every prompt's ``N``. Pair it with ``np.sqrt(kl_best_of_n(ns))`` for the ``d`` axis.
    """
    proxies = _as_prompts(proxy_scores, "proxy_scores")
    golds = _as_prompts(gold_scores, "gold_scores")
    if len(proxies) != len(golds):
        raise ValueError(f"got {len(proxies)} prompts of proxy scores but {len(golds)} of gold scores")
    if len(ns) == 0:
        raise ValueError("ns must name at least one n")
    curve = np.zeros(len(ns), dtype=np.float64)
    for prompt, (proxy, gold) in enumerate(zip(proxies, golds, strict=True)):
        try:
            gold_sorted = _gold_in_proxy_order(proxy, gold)
            curve += [best_of_n_weights(gold_sorted.size, n) @ gold_sorted for n in ns]
        except ValueError as err:
            raise ValueError(f"prompt {prompt}: {err}") from None
    return curve / len(proxies)


def kl_best_of_n(n: int | ArrayLike) -> float | np.ndarray:
    """Analytic ``KL(best-of-n || base) = log n − (n − 1)/n`` (§15; Stiennon 2020, Gao 2023).

    Exact only when every response has probability zero of being drawn twice (distinct proxy scores are not
    enough): for a policy with probabilities ``[.9, .05, .05]``, scored in that order from lowest, ``n = 2`` gives 0.193
    against an exact 0.037. In general it is an upper bound (Beirami et al. 2024).
    A scalar ``n`` gives a float, an array an array. ``n < 1`` raises ``ValueError``.
    """
    arr = np.asarray(n, dtype=np.float64)
    if not np.all(np.isfinite(arr)) or np.any(arr < 1):
        raise ValueError(f"best-of-n needs n >= 1, got {n!r}")
    kl = np.log(arr) - (arr - 1.0) / arr
    return float(kl) if kl.ndim == 0 else kl


def n_for_kl_best_of_n(kl: float) -> float:
    """The real ``n >= 1`` whose best-of-n KL is ``kl``: the inverse of :func:`kl_best_of_n`.

    Turns a fitted peak ``d*`` into the ``n`` to sample (``n_for_kl_best_of_n(d*²)``). ``KL_bon`` increases on
    ``n >= 1`` (derivative ``(n − 1)/n² >= 0``), so bisection in ``log n`` converges; ``inf`` maps to ``inf``.
    """
    if math.isnan(kl) or kl < 0:
        raise ValueError(f"best-of-n KL must be >= 0, got {kl!r}")
    if kl == 0 or math.isinf(kl):
        return 1.0 if kl == 0 else math.inf
    lo, hi = 0.0, 1.0  # bounds on log n
    while kl_best_of_n(math.exp(hi)) < kl:
        lo, hi = hi, 2 * hi
        if hi > 700:  # exp overflows float64: KL beyond ~700 nats has no representable n
            return math.inf
    for _ in range(100):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if kl_best_of_n(math.exp(mid)) < kl else (lo, mid)
    return math.exp(0.5 * (lo + hi))


# --------------------------------------------------------------------------------------------------------------------
# Gao et al. functional forms
# --------------------------------------------------------------------------------------------------------------------

def _check_coefficients(alpha: float, beta: float) -> None:
    if not (math.isfinite(alpha) and math.isfinite(beta)):
        raise ValueError(f"alpha and beta must be finite, got alpha={alpha}, beta={beta}")


def gold_bon(d: ArrayLike, alpha: float, beta: float) -> np.ndarray:
    """``R_bon(d) = d(α − βd)`` (§15a), ``d = sqrt(KL)``."""
    x = np.asarray(d, dtype=np.float64)
    return x * (alpha - beta * x)


def gold_rl(d: ArrayLike, alpha: float, beta: float) -> np.ndarray:
    """``R_RL(d) = d(α − β log d)`` (§15a), with its limit 0 at ``d = 0``."""
    x = np.asarray(d, dtype=np.float64)
    return x * alpha - beta * _x_log_x(x)


def peak_bon(alpha: float, beta: float) -> tuple[float, float]:
    """Maximum of ``R_bon`` over ``d >= 0``: ``(α/(2β), α²/(4β))`` for ``α, β > 0`` (§15a); else see
    :class:`OveroptimisationFit` (``inf`` if it rises forever, ``0`` if it never rises)."""
    _check_coefficients(alpha, beta)
    if beta > 0:
        return (alpha / (2 * beta), alpha**2 / (4 * beta)) if alpha > 0 else (0.0, 0.0)
    if beta == 0 and alpha <= 0:
        return 0.0, 0.0
    return math.inf, math.inf


def peak_rl(alpha: float, beta: float) -> tuple[float, float]:
    """Maximum of ``R_RL`` over ``d >= 0``: ``d* = exp(α/β − 1)``, ``R* = β d*`` for ``β > 0`` (§15a; there
    ``dR/dd = α − β(log d + 1) = 0``). ``β <= 0``: ``inf`` if it rises forever, ``0`` if it never rises."""
    _check_coefficients(alpha, beta)
    if beta > 0:
        try:
            d_star = math.exp(alpha / beta - 1.0)
        except OverflowError:
            return math.inf, math.inf
        return d_star, beta * d_star
    if beta == 0 and alpha <= 0:
        return 0.0, 0.0
    return math.inf, math.inf


def _x_log_x(x: np.ndarray) -> np.ndarray:
    return x * np.log(np.where(x > 0, x, 1.0))


def _fit_linear(d: ArrayLike, r: ArrayLike, second_feature: str) -> tuple[float, float]:
    """Least-squares ``(α, β)`` for ``R = α d − β f(d)`` with no intercept."""
    x = as_1d_finite(d, "d")
    y = as_1d_finite(r, "r")
    if x.shape != y.shape:
        raise ValueError(f"d and r differ in length: {x.size} vs {y.size}")
    if np.any(x < 0):
        raise ValueError(f"d = sqrt(KL) must be >= 0, got min {x.min()}")
    f = x**2 if second_feature == "square" else _x_log_x(x)
    design = np.column_stack([x, -f])
    coef, _, rank, _ = np.linalg.lstsq(design, y, rcond=None)
    if rank < 2:
        raise ValueError(
            "cannot fit alpha and beta: need at least 2 distinct d > 0 (and d != 1 for the RL form, where log d = 0 "
            f"makes the beta column vanish); got d = {np.unique(x).tolist()[:10]}"
        )
    return float(coef[0]), float(coef[1])


def fit_bon(d: ArrayLike, r: ArrayLike) -> OveroptimisationFit:
    """Least-squares fit of ``R_bon(d) = d(α − βd)`` to measured ``(d, gold)`` points, with the curve's peak.

    ``d = sqrt(KL)`` (use ``np.sqrt(kl_best_of_n(ns))``) and ``r`` the gold reward relative to the initial policy.
    """
    alpha, beta = _fit_linear(d, r, "square")
    return OveroptimisationFit(alpha, beta, *peak_bon(alpha, beta))


def fit_rl(d: ArrayLike, r: ArrayLike) -> OveroptimisationFit:
    """Least-squares fit of ``R_RL(d) = d(α − β log d)`` to measured ``(d, gold)`` points, with the curve's peak.

    A larger ``peak_d`` (e.g. from a bigger proxy RM or UP-RLHF's penalty, §15d) means overoptimisation sets in
    later. Points at ``d = 0`` constrain nothing (``R(0) = 0`` by construction) but are allowed.
    """
    alpha, beta = _fit_linear(d, r, "xlogx")
    return OveroptimisationFit(alpha, beta, *peak_rl(alpha, beta))


def fit_measured(fitter: Callable[[ArrayLike, ArrayLike], OveroptimisationFit], d: ArrayLike,
                 r: ArrayLike) -> tuple[OveroptimisationFit | None, str | None]:
    """``fitter`` (:func:`fit_bon` or :func:`fit_rl`) on the measured points with ``d > 0``, or ``None`` and why.

    None when fewer than :data:`MIN_FIT_POINTS` distinct ``d > 0`` were measured (a repeated ``d`` adds no shape
    either) or when the points cannot be fitted (non-finite values); the reason is one line for a report.
    """
    x = np.asarray(d, dtype=np.float64)
    y = np.asarray(r, dtype=np.float64)
    if x.shape != y.shape:
        raise ValueError(f"d and r differ in length: {x.size} vs {y.size}")
    positive = x > 0
    if (k := np.unique(x[positive]).size) < MIN_FIT_POINTS:
        return None, f"{k} points with distinct d > 0; the 2-coefficient fit needs {MIN_FIT_POINTS}"
    try:
        return fitter(x[positive], y[positive]), None
    except ValueError as error:
        return None, str(error)
