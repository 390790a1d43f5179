"""The reward-vs-KL Pareto frontier of a leaderboard's checkpoints (EVALUATION.md §10, plot 2): pure, no I/O.

A checkpoint is on the frontier when no other one reaches at least its reward at no more KL to the reference, being
strictly better on one of the two: the frontier is what the runs buy in reward for each nat spent. Exact ties (same
KL, same reward) dominate neither way, so both stay on it.

KL is the leaderboard's Monte-Carlo ``kl_ref_k1``. It is unbiased but noisy, so a policy close to the reference can
come out slightly below zero, which true KL never is. Such an estimate is read as 0, both for the frontier and for the
``√KL`` axis, so that what is ranked is what is drawn; tables keep the estimate as measured.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

from alignpipe.evaluation.leaderboard import metric_value

__all__ = ["KL_METRIC", "REWARD_METRICS", "ZOOM_FACTOR", "GoldKL", "KLPoint", "gold_vs_kl", "pareto_front", "row_runs",
           "zoomed"]

ZOOM_FACTOR = 3.0  # a point beyond this many times the median √KL squeezes the others into a corner of the plot

KL_METRIC = "kl_ref_k1"
REWARD_METRICS = ("gold_reward", "judge_reward")  # the synthetic suite's gold judge, else a suite's reward-model judge


@dataclass(frozen=True)
class KLPoint:
    """One checkpoint: its KL estimate as measured (may be < 0), its reward and that reward's 95% CI."""

    name: str
    kl: float
    reward: float
    reward_ci: tuple[float, float] | None = None
    run: str | None = None  # the source run of a merged leaderboard's row

    @property
    def d(self) -> float:
        """``√KL`` for the axis, a negative estimate read as 0 (see the module docstring)."""
        return math.sqrt(max(self.kl, 0.0))


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the ``(kl, reward)`` points on the frontier, by increasing KL (then decreasing reward).

    Point ``p`` is dominated when some ``q`` has ``kl_q <= kl_p`` and ``reward_q >= reward_p`` with one strict; KL
    below 0 counts as 0. O(n²): a leaderboard holds tens of checkpoints, and the definition stays visible.
    """
    clipped = [(max(float(kl), 0.0), float(reward)) for kl, reward in points]
    if not all(math.isfinite(kl) and math.isfinite(reward) for kl, reward in clipped):
        raise ValueError(f"non-finite KL or reward among {list(points)}")

    def dominates(q: tuple[float, float], p: tuple[float, float]) -> bool:
        return q[0] <= p[0] and q[1] >= p[1] and (q[0] < p[0] or q[1] > p[1])

    front = [i for i, p in enumerate(clipped) if not any(dominates(q, p) for q in clipped)]
    return sorted(front, key=lambda i: (clipped[i][0], -clipped[i][1], i))


@dataclass(frozen=True)
class GoldKL:
    """A leaderboard shaped for the plot: the reward drawn, the points, the frontier and the rows left out."""

    reward_metric: str | None  # None: no row carries any of REWARD_METRICS
    points: list[KLPoint]
    front: list[int]  # indices into points, by increasing KL
    skipped: list[str]  # rows lacking the reward or kl_ref_k1 (or with a non-finite value)

    def note(self) -> str | None:
        """One line naming the rows left out, for the caller to show or log (None when none is)."""
        if not self.skipped:
            return None
        what = f"{self.reward_metric} and {KL_METRIC}" if self.reward_metric else " or ".join(REWARD_METRICS)
        return f"Not placed (no value of {what}): {', '.join(self.skipped)}."


def row_runs(board: dict) -> list[str]:
    """A merged leaderboard's run labels (``config.sources``), which prefix its row names as ``<run>/``."""
    sources = board.get("config", {}).get("sources")
    return [s["label"] for s in sources if isinstance(s, dict) and s.get("label")] if isinstance(sources, list) else []


def _run_of(name: str, labels: Sequence[str]) -> str | None:
    """The longest label that prefixes ``name`` (labels and checkpoint names may both contain "/")."""
    return max((label for label in labels if name.startswith(f"{label}/")), key=len, default=None)


def gold_vs_kl(board: dict) -> GoldKL:
    """A leaderboard's checkpoints as :class:`KLPoint` (``gold_reward``, else ``judge_reward``: one reward for the
    whole board, as the two have different scales) with the frontier and the rows lacking either number."""
    rows = board["checkpoints"]
    reward = next((m for m in REWARD_METRICS if any(metric_value(r["results"], m) is not None for r in rows)), None)
    labels = row_runs(board)
    points, skipped = [], []
    for row in rows:
        res = row["results"]
        value = metric_value(res, reward) if reward else None
        kl = metric_value(res, KL_METRIC)
        if value is None or kl is None:
            skipped.append(row["name"])
            continue
        ci = res[reward].get("ci95")
        finite_ci = ci is not None and len(ci) == 2 and all(b is not None and math.isfinite(b) for b in ci)
        points.append(KLPoint(row["name"], kl, value, (float(ci[0]), float(ci[1])) if finite_ci else None,
                              _run_of(row["name"], labels)))
    return GoldKL(reward, points, pareto_front([(p.kl, p.reward) for p in points]), skipped)


def zoomed(points: Sequence[KLPoint], factor: float = ZOOM_FACTOR) -> list[KLPoint] | None:
    """The points within ``factor`` × the median ``√KL``, when some lie beyond it and at least two are within: an
    untrained model at KL 100 beside policies at KL < 1 leaves the policies in one corner, so the plot adds a panel
    of just them. None when no panel is needed."""
    median = statistics.median(p.d for p in points) if points else 0.0
    if median <= 0:
        return None
    near = [p for p in points if p.d <= factor * median]
    return near if 2 <= len(near) < len(points) else None
