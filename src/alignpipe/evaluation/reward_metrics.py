"""Pure metric maths for reward models (EVALUATION.md §3, §8; ALGORITHMS.md §3c): no I/O, no models.

Inputs are per-pair scores or probabilities; outputs are :class:`~alignpipe.evaluation.metrics.MetricValue`
(``higher_is_better``, ``n``, a seeded percentile-bootstrap 95% CI over pairs where one makes sense).

Calibration convention (used by :func:`expected_calibration_error` and :func:`reliability_table`)
-------------------------------------------------------------------------------------------------
``probabilities[i]`` is the model's P(outcome_i = 1), e.g. the Bradley–Terry P(chosen preferred) =
σ(r_c − r_r) from :func:`bt_probabilities`, and ``outcomes[i]`` the observed event (1 = the labelled chosen
response really is preferred). Calibration is measured on the model's **predicted side** (Guo et al. 2017
top-label ECE of the two-class distribution ``(p, 1 − p)``):

* confidence ``c = max(p, 1 − p)``, in [0.5, 1];
* correctness = the outcome of the predicted side: ``y`` if ``p > 0.5``, ``1 − y`` if ``p < 0.5``, and ``0.5``
  when ``p == 0.5`` exactly (an indifferent prediction is right half the time whichever side one names);
* equal-width bins over [0, 1], bin ``m`` = ``(m/M, (m+1)/M]`` (the first bin also holds 0), so only the bins
  covering [0.5, 1] can be filled;
* ``ECE = Σ_m (n_m / n) · |accuracy_m − confidence_m|``.

The other common binary convention, ``p`` against the empirical frequency of ``outcome = 1``, degenerates for
preference data scored in (chosen, rejected) order: every outcome is 1, so it only measures how far ``p`` is
from 1 and rewards blind overconfidence. The predicted-side convention is invariant to swapping the pair order
(``p → 1 − p``, ``y → 1 − y``). Outcomes may be soft labels in [0, 1] (e.g. annotator agreement); correctness
is then the expected correctness. Note that for ``p == 0.5`` (tied rewards) :func:`pairwise_accuracy` counts
the pair as wrong (RewardBench's strict ``>``) while calibration gives it half credit.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np

from alignpipe.evaluation.metrics import (
    MetricValue,
    as_1d_finite,
    as_positive_int,
    bootstrap_ci,
    bootstrap_statistics,
    mean_with_ci,
)

__all__ = [
    "average_ranks",
    "brier_score",
    "bt_probabilities",
    "expected_calibration_error",
    "max099_scale",
    "negative_log_likelihood",
    "pairwise_accuracy",
    "reliability_table",
    "spearman",
    "stratified_uncertainty_auroc",
    "uncertainty_auroc",
]

_MAX099_LOGIT = float(np.log(99.0))  # logit(0.99): σ(ln 99) = 99 / 100


# ------------------------------------------------------------------------------------------------- accuracy


def pairwise_accuracy(
    chosen: Sequence[float], rejected: Sequence[float], *, resamples: int = 1000, seed: int = 0,
    groups: Sequence | None = None,
) -> MetricValue:
    """Preference accuracy, RewardBench style: a pair is right iff ``r_chosen > r_rejected`` (strict, so ties
    count as wrong). CI: percentile bootstrap over pairs, or over ``groups`` (every metric here takes them: pass
    each pair's prompt when prompts hold several pairs). ``extra``: ``n_correct``, ``n_ties``, ``stderr``."""
    c, r = _paired(chosen, rejected, "chosen", "rejected")
    correct = (c > r).astype(np.float64)
    m = mean_with_ci(correct, resamples=resamples, seed=seed, higher_is_better=True, groups=groups)
    extra = {"n_correct": int(correct.sum()), "n_ties": int(np.sum(c == r)), **m.extra}
    return MetricValue(m.value, m.ci95, m.n, True, extra)


# ------------------------------------------------------------------------------------------ probabilities


def max099_scale(chosen: Sequence[float], rejected: Sequence[float]) -> float:
    """UP-RLHF's ECE rescaling (ALGORITHMS.md §3c): the factor ``s`` with ``σ(s · max|r_c − r_r|) = 0.99``,
    i.e. ``ln(99) / max|d|``. Compute it on the whole test set and report it next to the ECE. Returns 1.0 when
    every difference is 0 (any scale then gives p = 0.5)."""
    c, r = _paired(chosen, rejected, "chosen", "rejected")
    dmax = float(np.max(np.abs(c - r)))
    return _MAX099_LOGIT / dmax if dmax > 0.0 else 1.0


def bt_probabilities(
    chosen: Sequence[float],
    rejected: Sequence[float],
    *,
    scale: float | Literal["max099"] = 1.0,
) -> np.ndarray:
    """Bradley–Terry ``P(chosen preferred) = σ(scale · (r_c − r_r))``, computed stably (no overflow).

    ``scale="max099"`` uses :func:`max099_scale`: the largest ``|r_c − r_r|`` in this set maps to confidence
    0.99 (p = 0.99 if it favours chosen, 0.01 otherwise). A numeric ``scale`` must be finite and > 0.
    """
    c, r = _paired(chosen, rejected, "chosen", "rejected")
    if isinstance(scale, str):
        if scale != "max099":
            raise ValueError(f"scale must be a positive float or 'max099', got {scale!r}")
        s = max099_scale(c, r)
    else:
        s = float(scale)
        if not (np.isfinite(s) and s > 0.0):
            raise ValueError(f"scale must be finite and > 0, got {scale}")
    return _sigmoid(s * (c - r))


# -------------------------------------------------------------------------------------------- calibration


def expected_calibration_error(
    probabilities: Sequence[float],
    outcomes: Sequence[float],
    *,
    bins: int = 15,
    resamples: int = 1000,
    seed: int = 0,
    groups: Sequence | None = None,
) -> MetricValue:
    """Top-label ECE of binary predictions (module docstring: confidence ``max(p, 1 − p)`` vs accuracy of the
    predicted side), ``bins`` equal-width bins on [0, 1]; lower is better. CI: bootstrap over pairs.

    ``extra``: ``bins``, ``mce`` (largest bin gap), ``mean_confidence``, ``accuracy`` (of the predicted side;
    ties at p = 0.5 count 0.5), ``overconfidence`` (``mean_confidence − accuracy``; > 0 = overconfident).

    ECE is biased upwards in small samples (bin noise adds to |gap|), and resampling adds more noise, so for a
    well-calibrated model the bootstrap interval can sit above the point estimate; read it as a spread.
    """
    p, y = _probs_outcomes(probabilities, outcomes)
    bins = as_positive_int(bins, "bins")
    conf, corr, idx = _confidence_correctness_bins(p, y, bins)
    n = p.size

    def stat(sample: np.ndarray, axis: int = 1) -> np.ndarray:
        rows = np.asarray(sample, dtype=np.int64)
        if rows.ndim == 1:
            rows = rows[None, :]
        return _ece_rows(conf[rows], corr[rows], idx[rows], bins)

    value = float(_ece_rows(conf[None, :], corr[None, :], idx[None, :], bins)[0])
    ci = bootstrap_ci(np.arange(n, dtype=np.float64), resamples=resamples, seed=seed, statistic=stat, groups=groups)
    table = reliability_table(p, y, bins=bins)
    gaps = [abs(b["accuracy"] - b["mean_confidence"]) for b in table if b["count"] > 0]
    extra = {
        "bins": int(bins),
        "mce": float(max(gaps)),
        "mean_confidence": float(conf.mean()),
        "accuracy": float(corr.mean()),
        "overconfidence": float(conf.mean() - corr.mean()),
    }
    return MetricValue(value, ci, n, False, extra)


def reliability_table(
    probabilities: Sequence[float], outcomes: Sequence[float], *, bins: int = 15
) -> list[dict]:
    """Per-bin rows for a reliability diagram, same convention and binning as the ECE.

    One dict per bin (all ``bins`` of them, in order): ``lo``, ``hi``, ``count``, ``mean_confidence`` and
    ``accuracy`` (``None`` for an empty bin). ``Σ count/n · |accuracy − mean_confidence|`` is the ECE.
    """
    p, y = _probs_outcomes(probabilities, outcomes)
    bins = as_positive_int(bins, "bins")
    conf, corr, idx = _confidence_correctness_bins(p, y, bins)
    edges = np.linspace(0.0, 1.0, bins + 1)
    counts = np.bincount(idx, minlength=bins)
    sum_conf = np.bincount(idx, weights=conf, minlength=bins)
    sum_corr = np.bincount(idx, weights=corr, minlength=bins)
    table = []
    for m in range(bins):
        k = int(counts[m])
        table.append(
            {
                "lo": float(edges[m]),
                "hi": float(edges[m + 1]),
                "count": k,
                "mean_confidence": float(sum_conf[m] / k) if k else None,
                "accuracy": float(sum_corr[m] / k) if k else None,
            }
        )
    return table


def brier_score(
    probabilities: Sequence[float], outcomes: Sequence[float], *, resamples: int = 1000, seed: int = 0,
    groups: Sequence | None = None,
) -> MetricValue:
    """Mean ``(p − y)²``; lower is better (0 = perfect, 0.25 = constant 0.5). CI: bootstrap over pairs.
    Symmetric in the pair order, so no confidence convention is needed."""
    p, y = _probs_outcomes(probabilities, outcomes)
    m = mean_with_ci((p - y) ** 2, resamples=resamples, seed=seed, higher_is_better=False, groups=groups)
    return MetricValue(m.value, m.ci95, m.n, False, m.extra)


def negative_log_likelihood(
    probabilities: Sequence[float],
    outcomes: Sequence[float],
    eps: float = 1e-12,
    *,
    resamples: int = 1000,
    seed: int = 0,
    groups: Sequence | None = None,
) -> MetricValue:
    """Mean ``−[y ln p + (1 − y) ln(1 − p)]`` (nats), ``p`` and ``1 − p`` floored at ``eps`` so that a saturated
    sigmoid gives a large finite loss instead of inf; lower is better (ln 2 = constant 0.5). CI: bootstrap."""
    if not 0.0 < eps < 0.5:
        raise ValueError(f"eps must be in (0, 0.5), got {eps}")
    p, y = _probs_outcomes(probabilities, outcomes)
    # Floor p and 1 - p separately: clipping p to 1 - eps first would round (1 - eps) and skew the floor.
    losses = -(y * np.log(np.maximum(p, eps)) + (1.0 - y) * np.log(np.maximum(1.0 - p, eps)))
    m = mean_with_ci(losses, resamples=resamples, seed=seed, higher_is_better=False, groups=groups)
    return MetricValue(m.value, m.ci95, m.n, False, m.extra)


# --------------------------------------------------------------------------------------------- uncertainty


def uncertainty_auroc(
    uncertainty: Sequence[float], is_error: Sequence[bool], *, resamples: int = 1000, seed: int = 0,
    groups: Sequence | None = None,
) -> MetricValue:
    """AUROC of ``uncertainty`` as a detector of errors: ``P(u_error > u_correct) + 0.5 · P(u_error ==
    u_correct)`` (Mann–Whitney U from average ranks). 1 = every error is more uncertain than every correct
    pair, 0.5 = uninformative, 0 = inverted; higher is better.

    Needs at least one error and one correct pair (``ValueError`` otherwise). CI: bootstrap over pairs; a
    resample that happens to hold a single class has no AUROC and is skipped (``extra["n_skipped_resamples"]``;
    ``ci95`` is ``None`` if all are). ``extra`` also holds ``n_errors`` and ``n_correct``.
    """
    u = as_1d_finite(uncertainty, "uncertainty")
    err = _as_bool(is_error, "is_error", u.shape)
    n_err = int(err.sum())
    if n_err == 0 or n_err == u.size:
        raise ValueError(
            f"AUROC needs both errors and correct pairs, got {n_err} errors out of {u.size}"
        )
    value = float(_auroc_rows(u[None, :], err[None, :])[0])
    stats = bootstrap_statistics(u.size, resamples, seed, lambda rows: _auroc_rows(u[rows], err[rows]), groups)
    return _auroc_value(value, stats, err)


def stratified_uncertainty_auroc(
    uncertainty: Sequence[float],
    is_error: Sequence[bool],
    strata: Sequence[float],
    *,
    bins: int = 5,
    resamples: int = 1000,
    seed: int = 0,
    groups: Sequence | None = None,
) -> MetricValue:
    """AUROC of ``uncertainty`` as an error detector *at a fixed value of* ``strata``: the items are split into
    ``bins`` equal-count bins by ``strata`` and only (error, correct) pairs from the same bin are compared
    (pooled Mann–Whitney U: ``Σ_b U_b / Σ_b n_err,b · n_correct,b``).

    Why: an ensemble's margin std grows with ``|margin|``, and ``|margin|`` alone predicts errors, so the plain
    AUROC mixes the two. With ``strata = |margin|`` this asks whether disagreement knows anything about errors
    that the margin does not; 0.5 = nothing. Bins are cut at positions of the stable sort of ``strata`` (items
    tied across a cut fall on either side by input order). ``ValueError`` when no bin holds both classes; a
    bootstrap resample with none is skipped, as in :func:`uncertainty_auroc`. ``extra["bins"]`` = ``bins``.
    """
    u = as_1d_finite(uncertainty, "uncertainty")
    err = _as_bool(is_error, "is_error", u.shape)
    s = as_1d_finite(strata, "strata")
    if s.shape != u.shape:
        raise ValueError(f"strata has shape {s.shape}, uncertainty {u.shape}")
    bins = as_positive_int(bins, "bins")
    u_rank = np.unique(u, return_inverse=True)[1].reshape(-1)  # integer ranks: ties stay ties
    value = float(_stratified_auroc_rows(u_rank[None, :], err[None, :], s[None, :], bins)[0])
    if np.isnan(value):
        raise ValueError(f"no {bins}-quantile bin of the strata holds both an error and a correct item")
    stats = bootstrap_statistics(u.size, resamples, seed,
                            lambda rows: _stratified_auroc_rows(u_rank[rows], err[rows], s[rows], bins), groups)
    return _auroc_value(value, stats, err, bins=bins)


def _auroc_value(value: float, stats: np.ndarray, err: np.ndarray, **extra) -> MetricValue:
    """An AUROC with its bootstrap CI (resamples holding one class are skipped) and the class counts."""
    ci, skipped = _percentile_ci(stats)
    n_err = int(err.sum())
    return MetricValue(value, ci, err.size, True, {"n_errors": n_err, "n_correct": err.size - n_err,
                                                   "n_skipped_resamples": skipped, **extra})


def _stratified_auroc_rows(u_rank: np.ndarray, err: np.ndarray, strata: np.ndarray, bins: int) -> np.ndarray:
    """Row-wise pooled within-bin AUROC (NaN where no bin holds both classes). One sort per row: the key
    ``bin · span + u_rank`` orders the bins one after another, so an item's rank within its bin is its overall rank
    minus the bin's first position (bins hold fixed positions of the strata order). ``span`` exceeds every rank:
    a grouped resample's rows are fewer than the data's, whose ranks they keep, so ``n`` would not do."""
    rows, n = u_rank.shape
    span = int(u_rank.max()) + 1 if u_rank.size else 1
    position = np.empty((rows, n), dtype=np.int64)
    np.put_along_axis(position, np.argsort(strata, axis=1, kind="stable"),
                      np.broadcast_to(np.arange(n), (rows, n)), axis=1)
    bin_of = position * bins // n
    first_position = (np.arange(bins) * n + bins - 1) // bins
    within_rank = average_ranks(bin_of * span + u_rank) - first_position[bin_of]
    u_sum = np.zeros(rows)
    pairs = np.zeros(rows)
    for b in range(bins):
        in_bin = bin_of == b
        positive = err & in_bin
        n_pos = positive.sum(axis=1).astype(np.float64)
        n_neg = in_bin.sum(axis=1) - n_pos
        both = (n_pos > 0) & (n_neg > 0)
        u_sum += np.where(both, np.where(positive, within_rank, 0.0).sum(axis=1) - n_pos * (n_pos + 1.0) / 2.0, 0.0)
        pairs += np.where(both, n_pos * n_neg, 0.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(pairs > 0, u_sum / pairs, np.nan)


# ------------------------------------------------------------------------------------------- correlation


def spearman(
    x: Sequence[float],
    y: Sequence[float],
    *,
    resamples: int = 1000,
    seed: int = 0,
    higher_is_better: bool | None = True,
) -> MetricValue:
    """Spearman's rho: Pearson correlation of the average ranks (ties share the mean of their ranks), numpy
    only. ``higher_is_better`` defaults to True (agreement, e.g. proxy vs gold); pass ``None`` for a
    diagnostic. Needs n >= 2 and non-constant inputs (``ValueError`` otherwise). CI: bootstrap over pairs;
    resamples where either side comes out constant are skipped (``extra["n_skipped_resamples"]``)."""
    a, b = _paired(x, y, "x", "y")
    if a.size < 2:
        raise ValueError(f"spearman needs at least 2 pairs, got {a.size}")
    if np.all(a == a[0]) or np.all(b == b[0]):
        raise ValueError("spearman is undefined when x or y is constant")
    value = float(_spearman_rows(a[None, :], b[None, :])[0])
    stats = bootstrap_statistics(a.size, resamples, seed, lambda rows: _spearman_rows(a[rows], b[rows]))
    ci, skipped = _percentile_ci(stats)
    return MetricValue(value, ci, a.size, higher_is_better, {"n_skipped_resamples": skipped})


def average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks along the last axis, ties given the mean of the ranks they span (scipy's ``rankdata``
    ``method="average"``): ``[10, 20, 20, 30] -> [1, 2.5, 2.5, 4]``. Works row-wise on 2-D input."""
    v = np.asarray(values, dtype=np.float64)
    squeeze = v.ndim == 1
    v = np.atleast_2d(v)
    if v.ndim != 2:
        raise ValueError(f"average_ranks takes 1-D or 2-D input, got shape {v.shape}")
    rows, n = v.shape
    order = np.argsort(v, axis=1, kind="stable")
    s = np.take_along_axis(v, order, axis=1)
    pos = np.broadcast_to(np.arange(n), (rows, n))
    new_group = np.ones((rows, n), dtype=bool)
    new_group[:, 1:] = s[:, 1:] != s[:, :-1]
    end_group = np.ones((rows, n), dtype=bool)
    end_group[:, :-1] = new_group[:, 1:]
    first = np.maximum.accumulate(np.where(new_group, pos, 0), axis=1)
    last = np.minimum.accumulate(np.where(end_group, pos, n - 1)[:, ::-1], axis=1)[:, ::-1]
    ranks = np.empty_like(s)
    np.put_along_axis(ranks, order, (first + last) / 2.0 + 1.0, axis=1)
    return ranks[0] if squeeze else ranks


# ----------------------------------------------------------------------------------------------- helpers


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return np.exp(-np.logaddexp(0.0, -z))


def _paired(a: Sequence[float], b: Sequence[float], na: str, nb: str) -> tuple[np.ndarray, np.ndarray]:
    x = as_1d_finite(a, na)
    y = as_1d_finite(b, nb)
    if x.shape != y.shape:
        raise ValueError(f"{na} and {nb} differ in shape: {x.shape} vs {y.shape}")
    return x, y


def _probs_outcomes(probabilities: Sequence[float], outcomes: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    p, y = _paired(probabilities, outcomes, "probabilities", "outcomes")
    if p.min() < 0.0 or p.max() > 1.0:
        raise ValueError(f"probabilities must lie in [0, 1], got range [{p.min()}, {p.max()}]")
    if y.min() < 0.0 or y.max() > 1.0:
        raise ValueError(f"outcomes must lie in [0, 1], got range [{y.min()}, {y.max()}]")
    return p, y


def _as_bool(values: Sequence[bool], name: str, shape: tuple[int, ...]) -> np.ndarray:
    x = np.asarray(values)
    if x.shape != shape:
        raise ValueError(f"{name} has shape {x.shape}, expected {shape}")
    if x.dtype != bool:
        if not np.all((x == 0) | (x == 1)):
            raise ValueError(f"{name} must be boolean or 0/1")
        x = x.astype(bool)
    return x


def _confidence_correctness_bins(
    p: np.ndarray, y: np.ndarray, bins: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    conf = np.maximum(p, 1.0 - p)
    corr = np.where(p > 0.5, y, np.where(p < 0.5, 1.0 - y, 0.5))
    edges = np.linspace(0.0, 1.0, bins + 1)
    idx = np.clip(np.searchsorted(edges, conf, side="left") - 1, 0, bins - 1)  # (lo, hi]; 0 joins bin 0
    return conf, corr, idx


def _ece_rows(conf: np.ndarray, corr: np.ndarray, idx: np.ndarray, bins: int) -> np.ndarray:
    # Σ_m (n_m/n)|acc_m − conf_m| = Σ_m |Σ_{i∈m} (corr_i − conf_i)| / n, so empty bins need no special case.
    rows, n = conf.shape
    key = (np.arange(rows)[:, None] * bins + idx).ravel()
    gap = np.bincount(key, weights=(corr - conf).ravel(), minlength=rows * bins).reshape(rows, bins)
    return np.abs(gap).sum(axis=1) / n


def _auroc_rows(u: np.ndarray, err: np.ndarray) -> np.ndarray:
    ranks = average_ranks(u)
    n_pos = err.sum(axis=1).astype(np.float64)
    n_neg = err.shape[1] - n_pos
    u_stat = np.where(err, ranks, 0.0).sum(axis=1) - n_pos * (n_pos + 1.0) / 2.0
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where((n_pos > 0) & (n_neg > 0), u_stat / (n_pos * n_neg), np.nan)


def _spearman_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    ra = average_ranks(a)
    rb = average_ranks(b)
    ra -= ra.mean(axis=1, keepdims=True)
    rb -= rb.mean(axis=1, keepdims=True)
    den = np.sqrt((ra * ra).sum(axis=1) * (rb * rb).sum(axis=1))
    with np.errstate(divide="ignore", invalid="ignore"):
        rho = np.where(den > 0, (ra * rb).sum(axis=1) / den, np.nan)
    return np.clip(rho, -1.0, 1.0)


def _percentile_ci(stats: np.ndarray, alpha: float = 0.05) -> tuple[tuple[float, float] | None, int]:
    ok = stats[np.isfinite(stats)]
    skipped = int(stats.size - ok.size)
    if ok.size == 0:
        return None, skipped
    lo, hi = np.quantile(ok, [alpha / 2, 1 - alpha / 2])
    return (float(lo), float(hi)), skipped

