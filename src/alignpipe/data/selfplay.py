"""Pair construction for the self-play methods: SPPO win rates, DNO's large-margin pairs, INPO's sampled labels.

SPPO and DNO are pure functions of a K×K preference matrix ``P[i][j] = P(y_i ≻ y_j | x)`` (diagonal ½), so every
rule is tested by hand (ALGORITHMS.md §7e, §9e). The matrix comes from any pairwise judge
(:func:`alignpipe.rewards.judges.preference_matrices`) or, for a pointwise scorer, from
:func:`preference_matrix_from_scores` (Bradley–Terry, as SPPO's PairRM scores are used in ``compute_prob.py``).
INPO needs no win rates, only the preference between its two drawn samples: :func:`inpo_draw` picks them (and the
label's uniform number) before any judging, so a round judges one pair per prompt, not K(K−1)/2.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

from alignpipe.data.pairing import strength_from_rewards

__all__ = [
    "INPODraw",
    "INPOPair",
    "SelfPlayPair",
    "inpo_draw",
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
        return {**_conversational_row(self.prompt, self.chosen, self.rejected),
                "chosen_win_rate": self.chosen_win_rate, "rejected_win_rate": self.rejected_win_rate}


def _conversational_row(prompt: str, chosen: str, rejected: str) -> dict:
    return {
        "prompt": [{"role": "user", "content": prompt}],
        "chosen": [{"role": "assistant", "content": chosen}],
        "rejected": [{"role": "assistant", "content": rejected}],
    }


def preference_matrix_from_scores(scores: Sequence[float], temperature: float = 1.0) -> list[list[float]]:
    """``P_ij = σ((s_i − s_j)/T)``, diagonal exactly ½ (SPPO ``compute_prob.py``, §7b)."""
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    bad = [s for s in scores if not math.isfinite(s)]
    if bad:
        raise ValueError(f"scores must be finite, got {bad[0]!r}")
    return [[0.5 if i == j else strength_from_rewards(si, sj, temperature) for j, sj in enumerate(scores)]
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

    ``None`` when every response has the same win rate, or the best and the worst are the same text (nothing to
    prefer). Copies of one text need not tie: a judge with a position bias (``P(a ≻ a) ≠ ½``) rates them apart by
    float rounding, which made K identical samples a pair of one response with itself (OSP, SPIN and INPO skip them).
    """
    rates = win_rates(matrix)
    best, worst = _extremes(rates)
    if rates[best] == rates[worst] or responses[best] == responses[worst]:
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


@dataclass(frozen=True)
class INPODraw:
    """One prompt's INPO draw: two distinct samples (indices) and the uniform number that will label them."""

    first: int
    second: int
    uniform: float  # the first sample is chosen when uniform < P(first ≻ second)


@dataclass(frozen=True)
class INPOPair:
    """An INPO training pair with the judge's ``P(chosen ≻ rejected)``: a Bernoulli label, so it may be below ½."""

    prompt: str
    chosen: str
    rejected: str
    chosen_preference: float

    def to_row(self) -> dict:
        """A TRL preference row (conversational); INPO's loss reads no extra column."""
        return _conversational_row(self.prompt, self.chosen, self.rejected)


def inpo_draw(responses: Sequence[str], rng: random.Random) -> INPODraw | None:
    """INPO (§10a): two distinct samples and the number that labels them, drawn before the pair is judged.

    ``None`` when the two responses are the same text (the pair carries no preference; no label is drawn).
    """
    if len(responses) < 2:
        raise ValueError(f"INPO needs at least 2 responses per prompt, got {len(responses)}")
    i, j = rng.sample(range(len(responses)), 2)
    if responses[i] == responses[j]:
        return None
    return INPODraw(i, j, rng.random())


def inpo_pair(prompt: str, responses: Sequence[str], draw: INPODraw, preference: float) -> INPOPair:
    """Label a draw by ``preference = P(responses[draw.first] ≻ responses[draw.second])`` (§10a): the first sample
    is chosen with that probability, not by a win-rate estimate."""
    if not 0.0 <= preference <= 1.0:
        raise ValueError(f"INPO preference must be a probability in [0, 1], got {preference}")
    first, second = responses[draw.first], responses[draw.second]
    if draw.uniform < preference:
        return INPOPair(prompt, first, second, preference)
    return INPOPair(prompt, second, first, 1.0 - preference)
