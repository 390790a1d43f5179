"""Pair construction for the self-play methods: SPPO win rates, DNO's large-margin pairs, INPO's sampled labels.

Pure functions of a K×K preference matrix ``P[i][j] = P(y_i ≻ y_j | x)`` (diagonal ½), so every rule is tested by
hand (ALGORITHMS.md §7e, §9e). The matrix comes from any pairwise judge
(:func:`alignpipe.rewards.judges.preference_matrices`) or, for a pointwise scorer, from
:func:`preference_matrix_from_scores` (Bradley–Terry, as SPPO's PairRM scores are used in ``compute_prob.py``).
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = [
    "SelfPlayPair",
    "inpo_pair",
    "large_margin_pair",
    "passes_margin",
    "preference_matrix_from_scores",
    "sppo_pair",
    "win_rates",
]

Matrix = Sequence[Sequence[float]]


@dataclass(frozen=True)
class SelfPlayPair:
    """One training pair with the win rates (against ``π_t``) of both responses; SPPO's targets, DNO's margin."""

    prompt: str
    chosen: str
    rejected: str
    chosen_win_rate: float
    rejected_win_rate: float

    def to_row(self) -> dict:
        """A TRL preference row (conversational) carrying the win rates as extra float columns."""
        return {
            "prompt": [{"role": "user", "content": self.prompt}],
            "chosen": [{"role": "assistant", "content": self.chosen}],
            "rejected": [{"role": "assistant", "content": self.rejected}],
            "chosen_win_rate": self.chosen_win_rate,
            "rejected_win_rate": self.rejected_win_rate,
        }


def preference_matrix_from_scores(scores: Sequence[float], temperature: float = 1.0) -> list[list[float]]:
    """``P_ij = σ((s_i − s_j)/T)``, diagonal exactly ½ (SPPO ``compute_prob.py``, §7b)."""
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    bad = [s for s in scores if not math.isfinite(s)]
    if bad:
        raise ValueError(f"scores must be finite, got {bad[0]!r}")
    return [[0.5 if i == j else 1 / (1 + math.exp(-(si - sj) / temperature)) for j, sj in enumerate(scores)]
            for i, si in enumerate(scores)]


def win_rates(matrix: Matrix) -> list[float]:
    """``P̂_i = (1/K) Σ_j P_ij`` with the self-comparison included (§7b); they sum to K/2 for a constant-sum P."""
    k = len(matrix)
    if k < 2 or any(len(row) != k for row in matrix):
        raise ValueError(f"expected a square K×K preference matrix with K >= 2, got {[len(r) for r in matrix]}")
    return [sum(row) / k for row in matrix]


def _extremes(rates: Sequence[float]) -> tuple[int, int]:
    """(argmax, argmin) of the win rates; ties go to the lowest index, so the choice is deterministic."""
    best = max(range(len(rates)), key=lambda i: (rates[i], -i))
    worst = min(range(len(rates)), key=lambda i: (rates[i], i))
    return best, worst


def sppo_pair(prompt: str, responses: Sequence[str], matrix: Matrix) -> SelfPlayPair | None:
    """SPPO (§7b): chosen = highest win rate, rejected = lowest, each with its own ``P̂``.

    ``None`` when every response has the same win rate (nothing to prefer: the pair would be one response twice).
    """
    rates = win_rates(matrix)
    best, worst = _extremes(rates)
    if rates[best] == rates[worst]:
        return None
    return SelfPlayPair(prompt, responses[best], responses[worst], rates[best], rates[worst])


def large_margin_pair(prompt: str, responses: Sequence[str], matrix: Matrix, threshold: float) -> SelfPlayPair | None:
    """DNO (§9a): the best-vs-worst pair, kept only when its win-rate gap is at least ``threshold`` (else ``None``).

    The filter is what makes DNO's DPO-form loss track the Nash target: small gaps are mostly judge noise.
    """
    if not 0.0 <= threshold < 1.0:
        raise ValueError(f"DNO margin threshold must be in [0, 1), got {threshold}")
    pair = sppo_pair(prompt, responses, matrix)
    if pair is None or not passes_margin(pair.chosen_win_rate, pair.rejected_win_rate, threshold):
        return None
    return pair


def passes_margin(chosen_score: float, rejected_score: float, threshold: float) -> bool:
    """The margin filter on two judge scores in [0, 1]: keep when ``chosen − rejected >= threshold`` (§9e).

    Inclusive up to float rounding (1e-12), so a gap that is the threshold on paper (0.6 − 0.4 vs 0.2) is kept.
    """
    return chosen_score - rejected_score >= threshold - 1e-12


def inpo_pair(prompt: str, responses: Sequence[str], matrix: Matrix, rng: random.Random) -> SelfPlayPair | None:
    """INPO (§10a): two distinct samples, labelled by a draw from ``P(y ≻ y')``, not by a win-rate estimate.

    ``None`` when the two responses are the same text (the pair carries no preference).
    """
    if len(responses) < 2:
        raise ValueError(f"INPO needs at least 2 responses per prompt, got {len(responses)}")
    i, j = rng.sample(range(len(responses)), 2)
    if responses[i] == responses[j]:
        return None
    if rng.random() >= matrix[i][j]:
        i, j = j, i
    rates = win_rates(matrix)
    return SelfPlayPair(prompt, responses[i], responses[j], rates[i], rates[j])
