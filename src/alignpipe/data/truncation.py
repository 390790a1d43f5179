"""Which of an online round's samples it may judge and train on: finished replies only, or truncated ones too.

Why this module exists: a sample that hit ``max_new_tokens`` without an end-of-sequence token is not a reply the
policy finished. Turned into a TRL preference row it gets the chat template's end token after it, so the policy would
be trained to prefer (or avoid) a reply that *ends* where the budget cut it, one it never produced. TRL's
OnlineDPOTrainer lowers such samples' scores (``missing_eos_penalty``), but the online stages' judges are pairwise
(gold, self-judge, reward model), so a score penalty does not fit them all; instead ``truncated_samples: drop``
leaves truncated samples out before judging (no judge calls spent on them), ``keep`` trains on them as they are, and
``reject`` judges them with the rest but keeps only the pairs in which they lose: the pairwise counterpart of the
penalty. Why ``reject``: under ``drop``, once a policy starts running past the budget nothing in its pairs pushes
against it (recipes/osp-vs-dpo.yaml's osp collapsed so, where ``keep`` did not); as the rejected side, the end token
appended after the cut only tells the policy not to stop there, which it did not.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol, get_args

TruncatedSamples = Literal["drop", "keep", "reject"]
TRUNCATED_SAMPLES: tuple[str, ...] = get_args(TruncatedSamples)


def trains_truncated(policy: TruncatedSamples) -> bool:
    """Whether a round under ``policy`` turns truncated samples into training rows (``keep``; ``reject``'s rejected
    side), each with the chat template's end of turn appended: what the round samples and what preflight counts
    against the model's positions."""
    return policy != "drop"


class Sample(Protocol):
    """What a round reads of a sample (:class:`alignpipe.evaluation.generation.Generation` is one)."""

    response: str
    truncated: bool  # no end-of-sequence token within max_new_tokens


@dataclass(frozen=True)
class RoundSamples:
    """One round's prompts, every sample drawn for each, and what ``truncated_samples`` lets the round use."""

    prompts: Sequence[str]
    generations: Sequence[Sequence[Sample]]  # generations[n]: prompt n's samples, truncated ones included
    truncated_samples: TruncatedSamples

    def __post_init__(self) -> None:
        if self.truncated_samples not in TRUNCATED_SAMPLES:
            raise ValueError(f"truncated_samples must be one of {TRUNCATED_SAMPLES}, got {self.truncated_samples!r}")
        if len(self.prompts) != len(self.generations):
            raise ValueError(f"{len(self.prompts)} prompts but {len(self.generations)} sample groups")

    @property
    def responses(self) -> list[list[str]]:
        """Each prompt's usable responses: the finished ones under ``drop``, all of them under ``keep`` and
        ``reject`` (whose pairs :meth:`without_cut_chosen` filters after judging)."""
        drop = not trains_truncated(self.truncated_samples)
        return [[g.response for g in group if not (drop and g.truncated)] for group in self.generations]

    @property
    def sampled(self) -> int:
        return sum(len(group) for group in self.generations)

    @property
    def truncated(self) -> int:
        return sum(g.truncated for group in self.generations for g in group)

    def with_at_least(self, minimum: int) -> tuple[list[str], list[list[str]], int]:
        """The prompts that kept at least ``minimum`` usable responses, their responses, and how many prompts fell
        short (a pair needs two responses; under ``keep`` no prompt falls short of what it sampled)."""
        kept = [(p, rs) for p, rs in zip(self.prompts, self.responses, strict=True) if len(rs) >= minimum]
        return [p for p, _ in kept], [rs for _, rs in kept], len(self.prompts) - len(kept)

    def without_cut_chosen(self, pairs: Sequence[Any]) -> tuple[list[Any], int]:
        """Under ``reject``, ``pairs`` (anything with ``prompt`` and ``chosen``) less those whose chosen reply is a
        truncated sample of its prompt, and how many went; the pairs unchanged otherwise. A text that is also one of
        the prompt's finished samples counts as finished."""
        if self.truncated_samples != "reject":
            return list(pairs), 0
        finished: dict[str, set[str]] = {}
        cut: dict[str, set[str]] = {}
        for prompt, group in zip(self.prompts, self.generations, strict=True):
            for g in group:
                (cut if g.truncated else finished).setdefault(prompt, set()).add(g.response)
        kept = [p for p in pairs
                if p.chosen not in cut.get(p.prompt, set()) or p.chosen in finished.get(p.prompt, set())]
        return kept, len(pairs) - len(kept)

    def stats(self) -> dict:
        """The round's sampling numbers, for ``metrics.jsonl`` and the "no training pairs" error."""
        return {"samples": self.sampled, "truncated_samples": self.truncated,
                "truncated_fraction": self.truncated / self.sampled if self.sampled else 0.0,
                "truncated_samples_policy": self.truncated_samples}

    def summary(self) -> str:
        action = {"drop": "dropped before judging", "keep": "kept as finished replies",
                  "reject": "judged, and trained on only as the rejected reply"}[self.truncated_samples]
        share = 100 * self.truncated / self.sampled if self.sampled else 0.0
        return (f"{self.truncated} of {self.sampled} samples hit max_new_tokens without an end token ({share:.1f}%, "
                f"{action})")


def no_pairs_advice(stats: dict, max_new_tokens: int, settings: Sequence[str], pair_filter: str | None = None) -> str:
    """How to get training pairs from a round that produced none, naming truncation when it is what left prompts
    without enough samples (``stats`` is a round's record: :meth:`RoundSamples.stats` plus
    ``prompts_short_of_samples``), else the stage's own ``settings`` that give more candidates and the
    ``pair_filter`` it applies, if any: the stage types differ (SPIN has no ``samples_per_prompt``, only OSP-style
    stages a ``min_gap`` and DNO a ``margin_threshold``), and advice naming a setting the stage lacks is an error."""
    if stats.get("truncated_samples_policy") == "drop" and stats.get("prompts_short_of_samples"):
        return (f"{stats['truncated_samples']} of {stats['samples']} samples hit max_new_tokens={max_new_tokens} "
                f"without an end-of-sequence token and were dropped (truncated_samples: drop), which left "
                f"{stats['prompts_short_of_samples']} prompts without enough finished samples for a pair; raise "
                "max_new_tokens, or set truncated_samples: keep to train on cut-off replies as they are")
    advice = f"raise {', '.join(settings[:-1])} or {settings[-1]}" if len(settings) > 1 else f"raise {settings[0]}"
    return advice + (f", or lower {pair_filter}" if pair_filter else "")


def cut_at_budget(completion_ids: Sequence[Sequence[int]], end_ids: Collection[int]) -> list[bool]:
    """Which of TRL's GRPO/RLOO completions hit ``max_completion_length`` without ending: the last token is neither an
    end-of-sequence token nor padding.

    TRL's own rule (its ``completions/clipped_ratio`` and ``mask_truncated_completions``), so a penalty falls on
    exactly the completions TRL counts as clipped. TRL cuts each completion after its first end token, so only the
    last one can end it."""
    return [len(ids) > 0 and ids[-1] not in end_ids for ids in completion_ids]


def penalise_unfinished(rewards: Sequence[float], unfinished: Sequence[bool], penalty: float) -> list[float]:
    """``rewards`` less ``penalty`` where the completion never ended (``missing_eos_penalty``, as in PPO's §6a score
    and TRL's OnlineDPOTrainer): a reward model scores a cut-off answer as if it were whole, so without it a group
    baseline can favour answers that run past the budget."""
    if len(rewards) != len(unfinished):
        raise ValueError(f"{len(rewards)} rewards but {len(unfinished)} completions")
    return [reward - penalty if cut else reward for reward, cut in zip(rewards, unfinished, strict=True)]
