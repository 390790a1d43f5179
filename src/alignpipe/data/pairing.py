"""From K scored responses per prompt to preference pairs with strengths.

Why this module exists: several methods (OSP ranked pairing, soft-label DPO/cDPO, DNO's margin filter, reward-model
training on UltraFeedback-shaped data) start from the same thing: a prompt, K candidate responses and one score per
response. They differ only in *which* pairs they form and *how strongly* each pair is labelled. Keeping that step
pure (no I/O, no model) makes it testable by hand (ALGORITHMS.md §4b/§4e) and lets every stage share one
implementation.

Conventions
-----------
* Pairs are always oriented (better, worse), so a strength is ``P(chosen > rejected)`` in ``[0.5, 1]``;
  ``1.0`` is a hard label. The other orientation is ``1 - strength`` (the SPCE/cDPO loss is symmetric under
  swapping the pair and replacing ``p`` by ``1 - p``, §4e), so nothing is lost.
* Soft strengths are clipped to ``[clip, 1 - clip]`` so a soft pair never silently becomes a hard label.
* Bad input does not crash a whole dataset build: it is dropped and counted in a :class:`PairingReport`, whose
  :meth:`PairingReport.summary` goes to the logs. Programming errors (mismatched lengths, unknown method names,
  impossible parameters) raise ``ValueError`` instead, because silently skipping those would hide a bug.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal, get_args

PairingMethod = Literal["anchor", "best_worst", "all_pairs"]
StrengthMode = Literal["probability", "reward", "hard"]
PAIRING_METHODS: tuple[str, ...] = get_args(PairingMethod)
STRENGTH_MODES: tuple[str, ...] = get_args(StrengthMode)


def _short(prompt: str, n: int = 60) -> str:
    """The first ``n`` characters of a prompt, for error messages that must say which set is wrong."""
    return repr(prompt[:n] + ("…" if len(prompt) > n else ""))


@dataclass(frozen=True)
class ScoredSet:
    """One prompt with K candidate responses and one score per response.

    Lists are accepted and stored as tuples (the dataclass is frozen and hashable). Scores may be NaN/inf here:
    :func:`build_pairs` drops and counts those responses rather than failing a whole dataset for one bad score.
    """

    prompt: str
    responses: tuple[str, ...]
    scores: tuple[float, ...]

    def __post_init__(self) -> None:
        if not isinstance(self.prompt, str):
            raise TypeError(f"ScoredSet prompt must be a str, got {type(self.prompt).__name__}")
        if isinstance(self.responses, str):
            raise TypeError(f"ScoredSet {_short(self.prompt)}: responses must be a sequence of strings, got one str")
        responses = tuple(self.responses)
        if not all(isinstance(r, str) for r in responses):
            raise TypeError(f"ScoredSet {_short(self.prompt)}: every response must be a str")
        try:
            scores = tuple(float(s) for s in self.scores)
        except (TypeError, ValueError) as err:
            raise ValueError(f"ScoredSet {_short(self.prompt)}: every score must be a number ({err})") from None
        if len(responses) != len(scores):
            raise ValueError(
                f"ScoredSet {_short(self.prompt)}: {len(responses)} responses but {len(scores)} scores; "
                "expected one score per response"
            )
        object.__setattr__(self, "responses", responses)
        object.__setattr__(self, "scores", scores)


@dataclass(frozen=True)
class PreferencePair:
    """A prompt, a chosen and a rejected response, and ``strength = P(chosen > rejected)`` in ``[0.5, 1]``."""

    prompt: str
    chosen: str
    rejected: str
    strength: float = 1.0

    def __post_init__(self) -> None:
        if not (0.5 <= self.strength <= 1.0):  # also rejects NaN
            raise ValueError(
                f"PreferencePair {_short(self.prompt)}: strength {self.strength} is outside [0.5, 1]; "
                "orient the pair so the chosen response is the preferred one"
            )


@dataclass
class PairingReport:
    """What :func:`build_pairs` did with its input, so dropped data is visible in the logs instead of silent."""

    sets_in: int = 0
    sets_skipped_too_few: int = 0  # fewer than 2 responses with finite scores
    responses_dropped_nonfinite: int = 0  # NaN/inf scores
    pairs_dropped_ties: int = 0  # strength 0.5 (equal scores), within min_gap of 0.5, or below min_score_gap
    pairs_dropped_identical: int = 0  # chosen text == rejected text: no learning signal
    pairs_out: int = 0
    sets_without_pairs: int = 0  # usable sets (>= 2 responses) that still yielded no pair, e.g. all scores equal

    def summary(self) -> str:
        return (
            f"pairing: {self.sets_in} sets -> {self.pairs_out} pairs; "
            f"skipped {self.sets_skipped_too_few} sets with <2 usable responses, "
            f"{self.sets_without_pairs} sets gave no pair; dropped {self.responses_dropped_nonfinite} non-finite "
            f"scores, {self.pairs_dropped_ties} tied pairs, {self.pairs_dropped_identical} identical-text pairs"
        )


# ---------------------------------------------------------------------------------------------------------------------
# Strengths
# ---------------------------------------------------------------------------------------------------------------------


def _sigmoid(z: float) -> float:
    """Numerically stable logistic: ``exp`` is only ever taken of a non-positive number."""
    if z >= 0:
        return 1.0 / (1.0 + math.exp(-z))
    e = math.exp(z)
    return e / (1.0 + e)


def _logit(s: float) -> float:
    return math.log(s) - math.log1p(-s)


def _check_clip(clip: float, name: str = "clip") -> None:
    if not (0.0 < clip < 0.5):
        raise ValueError(f"{name} must be in (0, 0.5), got {clip}")


def _check_finite(**values: float) -> None:
    for name, value in values.items():
        if not math.isfinite(value):
            raise ValueError(f"{name} must be finite, got {value}")


def strength_from_probabilities(
    s_i: float, s_j: float, clip: float = 0.01, *, score_clip: float | None = None
) -> float:
    """Bradley–Terry-consistent strength from two "beats a common anchor" probabilities (§4b step 5).

    If ``s_i = P(y_i > a)`` and ``s_j = P(y_j > a)`` for a shared anchor ``a`` and the judge is Bradley–Terry, then
    ``P(y_i > y_j) = sigmoid(logit s_i - logit s_j)``. The scores are clipped to ``[score_clip, 1 - score_clip]``
    first (``score_clip`` defaults to ``clip``; a 0 or 1 would give an infinite logit) and the result is clipped to
    ``[clip, 1 - clip]``. Why two clips: judges that report tiny probabilities (AlpacaEval's are mostly below 1e-3)
    all collapse to the same clipped score with ``score_clip = 0.01``; a smaller ``score_clip`` keeps their order
    while the result clip still keeps the label soft.
    """
    _check_finite(s_i=s_i, s_j=s_j)
    _check_clip(clip)
    score_clip = clip if score_clip is None else score_clip
    _check_clip(score_clip, "score_clip")
    for name, s in (("s_i", s_i), ("s_j", s_j)):
        if not (0.0 <= s <= 1.0):
            raise ValueError(f"{name} = {s} is not a probability in [0, 1]; use strength_from_rewards for rewards")
    lo, hi = score_clip, 1.0 - score_clip
    p = _sigmoid(_logit(min(max(s_i, lo), hi)) - _logit(min(max(s_j, lo), hi)))
    return min(max(p, clip), 1.0 - clip)


def strength_from_rewards(r_i: float, r_j: float, temperature: float) -> float:
    """Bradley–Terry strength ``sigmoid((r_i - r_j) / T)`` from two rewards; never overflows, even at huge gaps.

    The temperature sets how many reward units make a confident preference (the RM's own scale is ``T = 1``).
    """
    _check_finite(r_i=r_i, r_j=r_j)
    if not (temperature > 0 and math.isfinite(temperature)):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature}")
    diff = r_i - r_j  # may overflow to +-inf for finite inputs near the float limit; _sigmoid handles that
    return _sigmoid(diff / temperature)


# ---------------------------------------------------------------------------------------------------------------------
# Pairing
# ---------------------------------------------------------------------------------------------------------------------


def merge_repeated_responses(responses: Sequence[str], scores: Sequence[float]) -> tuple[list[str], list[float], int]:
    """Each distinct response text once, in order of first appearance, scored with the mean of its finite scores
    (NaN when it has none), and how many repeats were merged away.

    Why: two models can write the same text (AlpacaEval has 30 instructions where they did), and a set holding it
    twice pairs it twice: ``all_pairs`` repeats its pairs (226 of AlpacaEval's 20,827) and, when its two scores lie
    on either side of another response's, puts it on both sides of that response; ``anchor`` may pair it with itself
    and lose the pair. Why the mean and not the max: the repeats are one text, and their scores are the judge's
    separate estimates of one quantity (AlpacaEval's: P(the text beats the reference)). Their mean is the better
    estimate; the max picks the luckier draw, so a text would rank higher for having been written twice. Where the
    repeats' scores lie on either side of another response's, the mean may tie with it: the judge gave no consistent
    order, and the tie is dropped as any tie is.
    """
    if len(responses) != len(scores):
        raise ValueError(f"merge_repeated_responses: {len(responses)} responses but {len(scores)} scores")
    grouped: dict[str, list[float]] = {}
    for response, score in zip(responses, scores):
        grouped.setdefault(response, []).append(float(score))
    merged = [_mean_finite(group) for group in grouped.values()]
    return list(grouped), merged, len(responses) - len(grouped)


def _mean_finite(scores: list[float]) -> float:
    finite = [s for s in scores if math.isfinite(s)]
    return math.fsum(finite) / len(finite) if finite else math.nan


def _check_method(method: str) -> None:
    if method not in PAIRING_METHODS:
        raise ValueError(f"unknown pairing method {method!r}; expected one of {PAIRING_METHODS}")


def rank_pairs(scores: Sequence[float], method: PairingMethod) -> list[tuple[int, int]]:
    """Index pairs ``(better, worse)`` into ``scores``; ties are broken by original index (earlier = better).

    * ``anchor`` (OSP §4b step 4): sort by score descending and pair rank 1 with rank K, 2 with K−1, …
      (⌊K/2⌋ disjoint pairs; with odd K the median is left out). Disjoint pairs spread the training signal over
      the whole ranking while pairing the most distinguishable responses together.
    * ``best_worst``: the top- and bottom-ranked response, one pair (SPPO/DNO-style chosen/rejected).
    * ``all_pairs``: every unordered pair once, better first (K(K−1)/2 pairs), e.g. for reward-model training.

    Tied scores are still returned (as pairs); :func:`build_pairs` decides what counts as a tie. Fewer than two
    scores give no pairs.
    """
    _check_method(method)
    scores = [float(s) for s in scores]
    for i, s in enumerate(scores):
        if not math.isfinite(s):
            raise ValueError(f"rank_pairs: score {i} is {s}; drop non-finite scores first (build_pairs does)")
    k = len(scores)
    if k < 2:
        return []
    order = sorted(range(k), key=lambda i: -scores[i])  # stable: equal scores keep index order
    if method == "anchor":
        return [(order[r], order[k - 1 - r]) for r in range(k // 2)]
    if method == "best_worst":
        return [(order[0], order[-1])]
    rank = {index: r for r, index in enumerate(order)}
    return [(i, j) if rank[i] < rank[j] else (j, i) for i in range(k) for j in range(i + 1, k)]


def build_pairs(
    sets: Iterable[ScoredSet],
    *,
    method: PairingMethod,
    strength: StrengthMode,
    temperature: float = 1.0,
    min_gap: float = 0.0,
    clip: float = 0.01,
    score_clip: float | None = None,
    min_score_gap: float = 0.0,
) -> tuple[list[PreferencePair], PairingReport]:
    """Turn scored response sets into oriented preference pairs with strengths, and report what was dropped.

    ``strength`` says what the scores *are*:

    * ``"probability"``: each score is a probability against a shared anchor/reference (OSP's ``s_i``, AlpacaEval's
      "beats the reference"), so strength = :func:`strength_from_probabilities` (``clip``, ``score_clip``).
    * ``"reward"``: scores are rewards, strength = :func:`strength_from_rewards` with ``temperature``, then clipped
      to ``[clip, 1 - clip]`` like every soft strength.
    * ``"hard"``: strength 1.0 (plain DPO labels).

    Pairs are dropped (and counted) when

    * chosen and rejected texts are identical (checked first: no signal whatever the scores say);
    * they are ties: equal scores, a strength of exactly 0.5 (e.g. two scores equal after clipping), a soft
      strength with ``|p - 0.5| < min_gap`` (OSP §4b step 6), or ``|s_i - s_j| < min_score_gap`` on the raw scores
      (DNO's large-margin filter).

    A text repeated within a set stays one response per copy: an online round's K samples are the policy's draws,
    and §4b pairs them as drawn (a text the policy writes twice is twice as likely). Responses from different sources
    that happen to share a text (AlpacaEval's models) are merged by the loaders first
    (:func:`merge_repeated_responses`).

    ``min_gap`` is a threshold on soft strengths, so with ``strength="hard"`` (every strength 1.0) it cannot apply:
    hard ties are equal scores only, and a ``min_gap > 0`` is ignored with a ``UserWarning``. For hard labels on
    *the same pairs* as a soft run (the §4d ablation, or online DPO filtered like OSP), build the soft pairs with
    ``min_gap`` and apply :func:`harden`; or filter on raw scores with ``min_score_gap``.

    Sets with non-finite scores lose those responses; sets left with fewer than 2 responses are skipped.
    """
    _check_method(method)
    if strength not in STRENGTH_MODES:
        raise ValueError(f"unknown strength mode {strength!r}; expected one of {STRENGTH_MODES}")
    if not (temperature > 0 and math.isfinite(temperature)):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature}")
    _check_clip(clip)
    if score_clip is not None:
        _check_clip(score_clip, "score_clip")
    if not (0.0 <= min_gap < 0.5):
        raise ValueError(f"min_gap must be in [0, 0.5), got {min_gap}")
    if strength == "hard" and min_gap > 0:
        warnings.warn(
            f"min_gap={min_gap} is ignored with strength='hard' (every strength is 1.0, ties are equal scores only); "
            "to drop near-ties and still train on hard labels, build soft pairs with min_gap and harden() them, "
            "or filter raw scores with min_score_gap",
            UserWarning,
            stacklevel=2,
        )
        min_gap = 0.0
    if not (min_score_gap >= 0 and math.isfinite(min_score_gap)):
        raise ValueError(f"min_score_gap must be a finite number >= 0, got {min_score_gap}")

    report = PairingReport()
    pairs: list[PreferencePair] = []
    for index, scored in enumerate(sets):
        report.sets_in += 1
        if not isinstance(scored, ScoredSet):
            raise TypeError(f"set {index}: expected a ScoredSet, got {type(scored).__name__}")
        if len(scored.responses) != len(scored.scores):  # only reachable by bypassing ScoredSet's own check
            raise ValueError(
                f"set {index} {_short(scored.prompt)}: {len(scored.responses)} responses but "
                f"{len(scored.scores)} scores"
            )
        kept = [(r, s) for r, s in zip(scored.responses, scored.scores) if math.isfinite(s)]
        report.responses_dropped_nonfinite += len(scored.scores) - len(kept)
        if len(kept) < 2:
            report.sets_skipped_too_few += 1
            continue
        responses = [r for r, _ in kept]
        scores = [s for _, s in kept]
        if strength == "probability" and not all(0.0 <= s <= 1.0 for s in scores):
            bad = next(s for s in scores if not 0.0 <= s <= 1.0)
            raise ValueError(
                f"set {index} {_short(scored.prompt)}: score {bad} is not a probability in [0, 1]; "
                "strength='probability' needs probabilities (use strength='reward' for unbounded scores)"
            )
        before = report.pairs_out
        for better, worse in rank_pairs(scores, method):
            s_b, s_w = scores[better], scores[worse]
            if responses[better] == responses[worse]:
                report.pairs_dropped_identical += 1
                continue
            if s_b == s_w or (s_b - s_w) < min_score_gap:
                report.pairs_dropped_ties += 1
                continue
            if strength == "probability":
                p = strength_from_probabilities(s_b, s_w, clip, score_clip=score_clip)
            elif strength == "reward":
                p = min(max(strength_from_rewards(s_b, s_w, temperature), clip), 1.0 - clip)
            else:
                p = 1.0
            if p == 0.5 or abs(p - 0.5) < min_gap:
                report.pairs_dropped_ties += 1
                continue
            pairs.append(PreferencePair(scored.prompt, responses[better], responses[worse], p))
            report.pairs_out += 1
        if report.pairs_out == before:
            report.sets_without_pairs += 1
    return pairs, report


def harden(pairs: Sequence[PreferencePair]) -> list[PreferencePair]:
    """The same pairs with hard labels (strength 1.0): the "p → 1, i.e. DPO on the same pairs" ablation of §4d."""
    return [PreferencePair(p.prompt, p.chosen, p.rejected, 1.0) for p in pairs]


def anchor_strengths(
    prompt: str, responses: Sequence[str], anchor_index: int, win_probs: Sequence[float | None]
) -> ScoredSet:
    """Package OSP judge output as a :class:`ScoredSet` with the anchor scored 0.5 (§4b steps 1–3).

    ``win_probs[i] = P(responses[i] > responses[anchor_index])`` for every ``i`` but the anchor; the anchor's own
    entry must be ``None`` or 0.5 (it is set to 0.5: a response ties with itself). Then
    ``build_pairs([...], method="anchor", strength="probability")`` is exactly §4b steps 4–6 and the §4e hand case.
    """
    if len(responses) != len(win_probs):
        raise ValueError(
            f"anchor_strengths {_short(prompt)}: {len(responses)} responses but {len(win_probs)} win probabilities"
        )
    if not (0 <= anchor_index < len(responses)):
        raise ValueError(f"anchor_strengths {_short(prompt)}: anchor_index {anchor_index} out of range")
    own = win_probs[anchor_index]
    if own is not None and own != 0.5:
        raise ValueError(
            f"anchor_strengths {_short(prompt)}: the anchor's own win probability must be None or 0.5, got {own}"
        )
    scores = [0.5 if i == anchor_index else p for i, p in enumerate(win_probs)]
    if any(s is None for s in scores):
        raise ValueError(f"anchor_strengths {_short(prompt)}: only the anchor's win probability may be None")
    return ScoredSet(prompt, tuple(responses), tuple(float(s) for s in scores))  # type: ignore[arg-type]


def to_trl_rows(pairs: Sequence[PreferencePair]) -> list[dict]:
    """TRL conversational preference rows plus a ``"preference"`` column holding the strength.

    The prompt becomes one user message, whatever it contains: for HH-RLHF it is the whole raw multi-turn dialogue
    (``"\\n\\nHuman: …\\n\\nAssistant:"``), see :func:`alignpipe.data.hh_rlhf.load_hh_rlhf_pairs`.
    """
    return [
        {
            "prompt": [{"role": "user", "content": p.prompt}],
            "chosen": [{"role": "assistant", "content": p.chosen}],
            "rejected": [{"role": "assistant", "content": p.rejected}],
            "preference": p.strength,
        }
        for p in pairs
    ]


TRANSCRIPT_SPEAKERS = {"user": "Human", "assistant": "Assistant", "system": "System"}


def plain_text(field) -> str:
    """A TRL prompt or reply as the one string a reward model or judge scores.

    A string stays as it is and a single message becomes its text. Several messages (a system prompt, earlier
    turns) become a transcript in HH-RLHF's raw form (``"\\n\\nHuman: …\\n\\nAssistant: …"``), ending with
    ``"\\n\\nAssistant:"`` when the last turn is the user's, so no turn is lost: keeping only the last message
    would make rows that differ in their earlier turns the same pair, often with opposite labels.
    """
    if isinstance(field, str):
        return field
    if len(field) == 1:
        return field[0]["content"]
    turns = "".join(f"\n\n{TRANSCRIPT_SPEAKERS.get(m['role'], m['role'].title())}: {m['content']}" for m in field)
    return turns + ("\n\nAssistant:" if field[-1]["role"] == "user" else "")
