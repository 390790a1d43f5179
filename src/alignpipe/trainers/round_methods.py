"""What one round of the online loop turns its samples into, for each iterative method (``osp``, ``online_dpo``,
``sppo``, ``spin``, ``dno``, ``inpo``): a :class:`RoundMethod` samples the current policy on the round's prompts, judges
and pairs the samples into training rows, and names the loss that trains on them.

The loop that runs the rounds (checkpoints, references, per-round evaluation, logging, resume) is
:mod:`alignpipe.trainers.iterative`; it imports this module, never the reverse.
"""

from __future__ import annotations

import hashlib
import logging
import random
from dataclasses import dataclass
from statistics import median
from typing import Any, Protocol

from alignpipe.data.pairing import (
    PreferencePair,
    ScoredSet,
    build_pairs,
    harden,
    to_trl_rows,
)
from alignpipe.data.selfplay import INPOPair, SelfPlayPair, inpo_draw, inpo_pair, large_margin_pair, sppo_pair
from alignpipe.data.synthetic import task_space
from alignpipe.data.truncation import RoundSamples
from alignpipe.evaluation.generation import GenerationSettings, generate
from alignpipe.pipeline.stage import StageContext
from alignpipe.rewards.judges import (
    GoldPairwiseJudge,
    SelfJudge,
    judge_against_anchors,
    pair_preferences,
    preference_matrices,
)
from alignpipe.rewards.loading import load_reward_scorer
from alignpipe.tasks import gold_reward, sample_tasks, sft_demonstrations
from alignpipe.trainers.common import load_policy
from alignpipe.trainers.selfplay_trainers import INPOTrainer, SPPOTrainer
from alignpipe.trainers.soft_dpo import SoftPreferenceDPOTrainer

log = logging.getLogger("alignpipe")


# §4b step 5 clips the strength p to [0.01, 0.99], not the anchor scores: they are clipped only so far that their
# logits stay finite. Clipped at 0.01, every score a confident judge puts above 0.99 was the same, and pairs of them
# ties (a gold judge at temperature 0.1 saturates past a gold gap of about 0.46).
ANCHOR_SCORE_CLIP = 1e-9


def anchored_pairs(sets: list[ScoredSet], method: str, min_gap: float):
    """Pairs of each set's samples with §4b step 5's strengths from their anchor scores (the online rounds')."""
    return build_pairs(sets, method=method, strength="probability", min_gap=min_gap, score_clip=ANCHOR_SCORE_CLIP)

@dataclass(frozen=True)
class RoundData:
    """One round's training rows (TRL preference rows, plus method columns) and what to log about them."""

    rows: list[dict]
    stats: dict[str, Any]


class RoundMethod(Protocol):
    """What distinguishes one iterative method from another: its round data and its loss."""

    def round_data(self, ctx: StageContext, round_index: int, model, tokenizer) -> RoundData: ...

    def trainer(self, ctx: StageContext, **kwargs) -> Any:
        """A TRL-style trainer for ``kwargs`` (model, ref_model, args, train_dataset, processing_class, ...)."""
        ...


@dataclass(frozen=True)
class PairingRule:
    """OSP / online DPO (§4b): samples ranked against an anchor, pairs from the ranking, soft or hard labels."""

    method: str  # "anchor" | "best_worst" | "all_pairs" (alignpipe.data.pairing)
    hard_labels: bool  # False = the judge's soft strengths; True = the same pairs with labels of 1

    def round_data(self, ctx: StageContext, round_index: int, model, tokenizer) -> RoundData:
        stage, recipe = ctx.stage, ctx.recipe
        samples = _sample(ctx, model, tokenizer, round_prompts(ctx, round_index), round_index)
        prompts, responses, short = samples.with_at_least(2)
        strengths = judge_samples(_make_judge(ctx, model, tokenizer), prompts, responses,
                                  rng=random.Random(f"anchor:{recipe.seed}:{round_index}"), reanchor=stage.reanchor)
        sets = [ScoredSet(p, tuple(rs), tuple(s)) for p, rs, s in zip(prompts, responses, strengths)]
        pairs, report = anchored_pairs(sets, self.method, stage.min_gap)
        if self.hard_labels:
            pairs = harden(pairs)
        paired = {p.prompt for p in pairs}
        pairs, cut_chosen = samples.without_cut_chosen(pairs)
        without_pair = (short + report.sets_skipped_too_few + report.sets_without_pairs
                        + len(paired) - len({p.prompt for p in pairs}))
        stats = {"judge": stage.judge, "judge_gold_agreement": gold_agreement(pairs),
                 **_sampling_stats(ctx, round_index, samples, short, without_pair, report.summary()),
                 **_cut_chosen_stats(samples, cut_chosen)}
        if pairs:
            stats["mean_strength"] = sum(p.strength for p in pairs) / len(pairs)
        return RoundData(to_trl_rows(pairs), stats)

    def trainer(self, ctx: StageContext, **kwargs):
        return SoftPreferenceDPOTrainer(**kwargs)


@dataclass(frozen=True)
class SelfPlayRule:
    """SPPO (§7), DNO (§9) and INPO (§10): K samples per prompt from ``π_t``.

    * ``sppo``: a full K×K preference matrix per prompt; best vs worst by win rate, trained with the SPPO squared
      loss on both win rates (logged: ``mean_chosen_win_rate``, ``mean_rejected_win_rate``);
    * ``dno``: the same pair, kept only when the win-rate gap is at least ``margin_threshold``; DPO loss;
    * ``inpo``: two random samples, and only they are judged, labelled by a draw from the judge's preference
      (logged: ``mean_chosen_preference``, the judge's mean P(chosen ≻ rejected)); INPO's squared loss with the
      stage's input policy as the fixed reference ``π_ref``.
    """

    kind: str  # "sppo" | "dno" | "inpo"

    def round_data(self, ctx: StageContext, round_index: int, model, tokenizer) -> RoundData:
        stage = ctx.stage
        samples = _sample(ctx, model, tokenizer, round_prompts(ctx, round_index), round_index)
        prompts, responses_per_prompt, short = samples.with_at_least(2)
        judge = _make_judge(ctx, model, tokenizer)
        if self.kind == "inpo":
            pairs = inpo_pairs(judge, prompts, responses_per_prompt,
                               random.Random(f"inpo:{ctx.recipe.seed}:{round_index}"))
        else:
            pairs = win_rate_pairs(judge, prompts, responses_per_prompt,
                                   stage.margin_threshold if self.kind == "dno" else None)
        pairs, cut_chosen = samples.without_cut_chosen(pairs)
        rows = [pair.to_row() for pair in pairs]
        if self.kind != "sppo":  # the DPO-form losses read no win-rate columns
            rows = [{k: row[k] for k in ("prompt", "chosen", "rejected")} for row in rows]
        stats = {"judge": stage.judge, "judge_gold_agreement": gold_agreement(pairs),
                 **_sampling_stats(ctx, round_index, samples, short, len(samples.prompts) - len(pairs),
                                   f"{len(pairs)} pairs"),
                 **_cut_chosen_stats(samples, cut_chosen)}
        if pairs:
            stats.update(self._label_stats(pairs))
        return RoundData(rows, stats)

    def _label_stats(self, pairs) -> dict:
        """The round's mean labels: win rates from the matrix (SPPO, DNO), or INPO's judged P(chosen ≻ rejected)."""
        n = len(pairs)
        if self.kind == "inpo":
            return {"mean_chosen_preference": sum(p.chosen_preference for p in pairs) / n}
        return {"mean_chosen_win_rate": sum(p.chosen_win_rate for p in pairs) / n,
                "mean_rejected_win_rate": sum(p.rejected_win_rate for p in pairs) / n}

    def trainer(self, ctx: StageContext, **kwargs):
        if self.kind == "sppo":
            return SPPOTrainer(**kwargs)
        if self.kind == "inpo":
            anchor = load_policy(ctx, ctx.start_model)  # as the policy loads: see iterative._train_round's reference
            return INPOTrainer(**kwargs, anchor_model=anchor, mix=ctx.stage.reference_mix)
        return SoftPreferenceDPOTrainer(**kwargs)  # no preference column: TRL's sigmoid DPO


@dataclass(frozen=True)
class SPINRule:
    """SPIN (§8): the SFT demonstration (chosen) against the policy's own generation (rejected), DPO loss vs ``π_t``."""

    def round_data(self, ctx: StageContext, round_index: int, model, tokenizer) -> RoundData:
        stage, recipe = ctx.stage, ctx.recipe
        demonstrations = sft_demonstrations(recipe.data.n_sft, recipe.seed, recipe.data.demo_noise,
                                            task_space(recipe.data))  # the SFT stage's own data
        rows = random.Random(f"spin:{recipe.seed}:{round_index}").sample(
            demonstrations, min(stage.prompts_per_round, len(demonstrations)))
        prompts = [row["messages"][0]["content"] for row in rows]
        targets = [row["messages"][1]["content"] for row in rows]
        samples = _sample(ctx, model, tokenizer, prompts, round_index, k=1)
        # [] where the generation was truncated and truncated_samples is drop; under reject it is the rejected side
        usable = samples.responses
        pairs = [PreferencePair(p, t, g[0], 1.0) for p, t, g in zip(prompts, targets, usable) if g and t != g[0]]
        generations = [group[0].response for group in samples.generations]
        short = sum(not g for g in usable)
        stats = {"judge": "demonstration", "judge_gold_agreement": gold_agreement(pairs),
                 "generation_gold_reward": sum(gold_reward(p, g) for p, g in zip(prompts, generations)) / len(prompts),
                 **_sampling_stats(ctx, round_index, samples, short, len(prompts) - len(pairs),
                                   f"{len(pairs)} generations differ from their demonstration")}
        return RoundData([{k: v for k, v in r.items() if k != "preference"} for r in to_trl_rows(pairs)], stats)

    def trainer(self, ctx: StageContext, **kwargs):
        return SoftPreferenceDPOTrainer(**kwargs)


def win_rate_pairs(judge, prompts: list[str], responses: list[list[str]],
                   margin_threshold: float | None) -> list[SelfPlayPair]:
    """SPPO's and DNO's pairs: each prompt's full K×K preference matrix, best vs worst by win rate; with a
    ``margin_threshold`` (DNO) only pairs whose win-rate gap reaches it."""
    pairs = []
    for prompt, group, matrix in zip(prompts, responses, preference_matrices(judge, prompts, responses)):
        if margin_threshold is None:
            pair = sppo_pair(prompt, group, matrix)
        else:
            pair = large_margin_pair(prompt, group, matrix, margin_threshold)
        if pair is not None:
            pairs.append(pair)
    return pairs


def inpo_pairs(judge, prompts: list[str], responses: list[list[str]], rng: random.Random) -> list[INPOPair]:
    """INPO's pairs (§10a): every prompt's two samples and label number are drawn first, then only the drawn pairs
    are judged, in one batch.

    The draws are the ones a full preference matrix would be sampled with (same order, same ``rng`` calls) and the
    judged probability is that matrix's entry, so the pairs are the same at 2 judge evaluations per prompt instead
    of K(K−1)."""
    draws = [(prompt, group, inpo_draw(group, rng)) for prompt, group in zip(prompts, responses)]
    drawn = [(prompt, group, draw) for prompt, group, draw in draws if draw is not None]
    preferences = pair_preferences(judge, [prompt for prompt, _, _ in drawn], [group for _, group, _ in drawn],
                                   [(draw.first, draw.second) for _, _, draw in drawn])
    return [inpo_pair(prompt, group, draw, p) for (prompt, group, draw), p in zip(drawn, preferences, strict=True)]


def round_seed(seed: int, round_index: int, purpose: str) -> int:
    """The seed of one round's ``purpose`` (``"trainer"``: its adapter's initialisation, dropout and batch order;
    ``"sampling"``: its on-policy samples), a 32-bit number hashed from the recipe's ``seed``.

    Why hashed: seeds made by arithmetic shared streams. Every round's trainer had the recipe's seed, and TRL seeds
    just before PEFT draws the adapter, so each round's LoRA started from the same A matrix; round r sampled its
    batch b with ``seed·100003 + r + b``, round r+1's batch b−1 seed (the same prompts there gave the same samples).
    SHA-256, not ``hash()`` (salted per process), so a rerun or a resumed round draws what the first attempt did.
    Not the stage's name: stages started from one policy (``osp`` and ``online_dpo`` in recipes/osp-vs-dpo.yaml) draw
    the same first samples and adapter, a paired comparison. 32 bits, numpy's limit (transformers' ``set_seed``);
    sampling adds the batch index (:func:`~alignpipe.evaluation.generation.generate`), so two rounds' batch seeds
    meet with a chance of about 2·batches/2³²."""
    digest = hashlib.sha256(f"alignpipe-round:{seed}:{round_index}:{purpose}".encode()).digest()
    return int.from_bytes(digest[:4], "big")


def round_prompts(ctx: StageContext, round_index: int) -> list[str]:
    """Fresh training prompts for one round (seeded by recipe seed and round; disjoint from held-out prompts)."""
    tasks = sample_tasks(ctx.stage.prompts_per_round, ctx.recipe.seed * 1000 + round_index + 1,
                         task_space(ctx.recipe.data))
    return [t.prompt for t in tasks]


def judge_samples(judge, prompts, samples, *, rng: random.Random, reanchor: bool) -> list[list[float]]:
    """OSP §4b: judge every sample against a random anchor, then (optionally) against the median-strength sample."""
    anchors = [rng.randrange(len(responses)) for responses in samples]
    strengths = judge_against_anchors(judge, prompts, samples, anchors)
    if reanchor:
        anchors = [min(range(len(s)), key=lambda i, s=s: abs(s[i] - median(s))) for s in strengths]
        strengths = judge_against_anchors(judge, prompts, samples, anchors)
    return strengths


def gold_agreement(pairs) -> float | None:
    """Fraction of pairs whose chosen response also has the higher gold reward (gold ties left out)."""
    agree = disagree = 0
    for pair in pairs:
        diff = gold_reward(pair.prompt, pair.chosen) - gold_reward(pair.prompt, pair.rejected)
        agree += diff > 0
        disagree += diff < 0
    return agree / (agree + disagree) if agree + disagree else None


def _make_judge(ctx: StageContext, model, tokenizer):
    stage = ctx.stage
    if stage.judge == "gold":
        return GoldPairwiseJudge(temperature=stage.judge_temperature)
    if stage.judge == "reward":
        return load_reward_scorer(ctx.inputs[stage.inputs[1]], dtype=ctx.recipe.model.dtype, device=ctx.device)
    return SelfJudge(model, tokenizer)


def _sample(ctx: StageContext, model, tokenizer, prompts: list[str], round_index: int,
            k: int | None = None) -> RoundSamples:
    """``k`` (default ``samples_per_prompt``) samples per prompt from the current policy, with what the stage's
    ``truncated_samples`` lets the round use of them."""
    stage = ctx.stage
    k = k or stage.samples_per_prompt
    settings = GenerationSettings(
        max_new_tokens=stage.max_new_tokens, temperature=stage.sampling_temperature, top_p=1.0,
        batch_size=64, seed=round_seed(ctx.recipe.seed, round_index, "sampling"),
    )
    generations = generate(model, tokenizer, [p for p in prompts for _ in range(k)], settings,
                           desc=f"round {round_index}: sampling", across_ranks=True)
    return RoundSamples(prompts, [generations[i * k:(i + 1) * k] for i in range(len(prompts))],
                        stage.truncated_samples)


def _cut_chosen_stats(samples: RoundSamples, cut_chosen: int) -> dict:
    """Under ``truncated_samples: reject``, how many judged pairs went because a truncated sample won them."""
    return {"pairs_dropped_cut_chosen": cut_chosen} if samples.truncated_samples == "reject" else {}


def _sampling_stats(ctx: StageContext, round_index: int, samples: RoundSamples, short: int, without_pair: int,
                    outcome: str) -> dict:
    """Log the round's sampling and pairing outcome; return the numbers its record keeps of them.

    ``short``: prompts left with too few usable samples for a pair (their truncated samples dropped);
    ``without_pair``: every prompt that gave no pair, those included."""
    log.info("[%s] round %d: %s; %d of %d prompts gave no pair (%d short of finished samples); %s", ctx.dir.name,
             round_index, samples.summary(), without_pair, len(samples.prompts), short, outcome)
    return {**samples.stats(), "prompts_short_of_samples": short, "prompts_without_pair": without_pair}
