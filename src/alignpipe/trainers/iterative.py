"""The online preference loop shared by every iterative method: sample -> judge -> pair -> train -> evaluate.

Written by hand because TRL 1.16 has no loop that judges K on-policy samples with a pairwise (or self-) judge and
trains on soft strengths or win rates. A method (``osp``, ``online_dpo``, ``sppo``, ``spin``, ``dno``, ``inpo``) is
only a :class:`RoundMethod`: how one round's samples become training rows, and which loss trains on them. The loop,
its checkpoints, reference handling (``reference: previous`` makes each round's checkpoint the next reference, the
self-play methods' ``π_t``), per-round evaluation, logging and resume are shared, so methods are compared at equal
compute. So is what a round does with samples cut off at ``max_new_tokens`` (no end-of-sequence token): left out
before judging unless the stage says ``truncated_samples: keep`` (:mod:`alignpipe.data.truncation`), and counted in
every round's record.

Each round writes ``rounds/round-<r>/`` (``pairs.json``, ``checkpoint/``, ``manifest.json``) and one line to
``metrics.jsonl``; with ``--resume`` completed rounds are kept, and an interrupted round trains on its saved
``pairs.json`` from its last trainer checkpoint (no new sampling or judging). A round's trainer checkpoints
(``trainer/round-<r>/``) are deleted once it is complete, so ``save_total_limit`` holds for the whole stage.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from statistics import median
from typing import Any, Protocol

from datasets import Dataset
from transformers import TrainerCallback
from trl import DPOConfig

from alignpipe.data.pairing import (
    PreferencePair,
    ScoredSet,
    build_pairs,
    harden,
    to_trl_rows,
)
from alignpipe.data.selfplay import INPOPair, SelfPlayPair, inpo_draw, inpo_pair, large_margin_pair, sppo_pair
from alignpipe.data.synthetic import evaluation_tasks, task_space
from alignpipe.data.truncation import RoundSamples, no_pairs_advice
from alignpipe.evaluation.generation import GenerationSettings, generate
from alignpipe.evaluation.harness import Checkpoint, evaluate_checkpoints
from alignpipe.io import atomic_write_json
from alignpipe.models.loading import load_tokenizer
from alignpipe.pipeline import distributed
from alignpipe.pipeline.rundir import ROUND_DATA, StageDir, publish_directory, utc_now
from alignpipe.pipeline.stage import StageContext, verified_trainer_checkpoint
from alignpipe.rewards.judges import (
    GoldPairwiseJudge,
    SelfJudge,
    judge_against_anchors,
    pair_preferences,
    preference_matrices,
)
from alignpipe.rewards.loading import load_reward_scorer
from alignpipe.seeds import EVAL_SEED
from alignpipe.tasks import GoldJudge, gold_reward, sample_tasks, sft_demonstrations
from alignpipe.trainers.common import (
    MetricsLogger,
    append_metrics,
    load_policy,
    lora_config,
    publish_model,
    train,
    trainer_arguments,
)
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
        without_pair = short + report.sets_skipped_too_few + report.sets_without_pairs
        stats = {"judge": stage.judge, "judge_gold_agreement": gold_agreement(pairs),
                 **_sampling_stats(ctx, round_index, samples, short, without_pair, report.summary())}
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
        rows = [pair.to_row() for pair in pairs]
        if self.kind != "sppo":  # the DPO-form losses read no win-rate columns
            rows = [{k: row[k] for k in ("prompt", "chosen", "rejected")} for row in rows]
        stats = {"judge": stage.judge, "judge_gold_agreement": gold_agreement(pairs),
                 **_sampling_stats(ctx, round_index, samples, short, len(samples.prompts) - len(pairs),
                                   f"{len(pairs)} pairs")}
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
            anchor = load_policy(ctx, ctx.start_model)  # as the policy loads: see _train_round's reference
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
        usable = samples.responses  # [] where the generation was truncated and truncated_samples is drop
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
                           desc=f"round {round_index}: sampling")
    return RoundSamples(prompts, [generations[i * k:(i + 1) * k] for i in range(len(prompts))],
                        stage.truncated_samples)


def _sampling_stats(ctx: StageContext, round_index: int, samples: RoundSamples, short: int, without_pair: int,
                    outcome: str) -> dict:
    """Log the round's sampling and pairing outcome; return the numbers its record keeps of them.

    ``short``: prompts left with too few usable samples for a pair (their truncated samples dropped);
    ``without_pair``: every prompt that gave no pair, those included."""
    log.info("[%s] round %d: %s; %d of %d prompts gave no pair (%d short of finished samples); %s", ctx.dir.name,
             round_index, samples.summary(), without_pair, len(samples.prompts), short, outcome)
    return {**samples.stats(), "prompts_short_of_samples": short, "prompts_without_pair": without_pair}


class LogLastStep(TrainerCallback):
    """Logs the last optimizer step's window too (transformers logs every ``logging_steps`` only), so the logged
    windows cover all of a round's steps and :func:`round_training_numbers` leaves none out."""

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= state.max_steps:
            control.should_log = True


TRAINING_KEYS = ("loss", "rewards/margins", "rewards/accuracies", "soft/margin_gap", "sppo/chosen_logratio",
                 "sppo/rejected_logratio", "inpo/h")


def round_training_numbers(log_history: list[dict], keys: tuple[str, ...] = TRAINING_KEYS) -> dict:
    """A round's training numbers from its trainer's logged windows (``log_history``): ``steps``, each key's mean over
    the round's optimizer steps (``round_mean/<key>``), and its value in the last logged window (``last_logged/<key>``,
    the end of the round).

    Each logged value averages the steps since the previous log, so the round mean weighs it by their number; with
    :class:`LogLastStep` the windows cover every step (only each ``logging_steps``-th was logged: a round's last
    steps were left out, and a round shorter than ``logging_steps`` had no numbers). Not TRL's ``train_loss``: it
    averages the steps of one ``train()`` call only, so a resumed round would record its resumed part. After a resume
    between two logging steps the mean is as approximate as the first loss logged after it (``common.train``)."""
    windows = [entry for entry in log_history if "loss" in entry]
    steps = [entry["step"] for entry in windows]
    weights = [step - before for step, before in zip(steps, [0, *steps])]
    summary: dict[str, float] = {"steps": steps[-1]} if steps else {}
    for key in keys:
        logged = [(weight, entry[key]) for weight, entry in zip(weights, windows) if key in entry]
        if logged:
            summary[f"round_mean/{key}"] = math.fsum(w * v for w, v in logged) / sum(w for w, _ in logged)
            summary[f"last_logged/{key}"] = logged[-1][1]
    return summary


def _train_round(ctx: StageContext, method: RoundMethod, round_index: int, model, tokenizer, rows: list[dict],
                 reference_path: str | None) -> dict:
    stage = ctx.stage
    seed = round_seed(ctx.recipe.seed, round_index, "trainer")  # each round's adapter starts from its own draw
    arguments = {**trainer_arguments(ctx), "output_dir": str(ctx.dir.trainer / f"round-{round_index}"),
                 "seed": seed, "data_seed": seed}
    losses = ({"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, stage.nll_weight]} if stage.nll_weight
              else {"loss_type": ["sigmoid"]})
    args = DPOConfig(**arguments, beta=stage.beta, **losses)
    # Loaded as the policy is (k-bit under model.quantization, else in the policy's dtype): round 0's reference is the
    # policy with its adapters off, and every later one must compute what it would from the same weights. In full
    # precision under QLoRA the implicit reward moved by the quantization error from round 1 on, INPO's h was not 0
    # at pi_theta = pi_t = pi_ref (ALGORITHMS 10e), and a QLoRA run held a full-precision copy.
    ref_model = load_policy(ctx, reference_path) if reference_path else None
    trainer = method.trainer(
        ctx, model=model, ref_model=ref_model, args=args, train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer, peft_config=lora_config(ctx),
        callbacks=[MetricsLogger(ctx.dir.metrics, tag={"trainer": f"round-{round_index}"}), LogLastStep()],
    )
    resume_from = verified_trainer_checkpoint(ctx.dir, Path(arguments["output_dir"])) if ctx.resume else None
    if resume_from is not None:
        log.info("[%s] round %d: resuming its training from %s", ctx.dir.name, round_index, resume_from.name)
    train(trainer, ctx, resume_from)
    publish_model(trainer, tokenizer, ctx, ctx.dir.root / "rounds" / f"round-{round_index}" / "checkpoint")
    return round_training_numbers(trainer.state.log_history)


def evaluate_against_start(ctx: StageContext, name: str, checkpoint: str, max_new_tokens: int):
    """The shared harness on held-out prompts: a stage's checkpoint vs the stage's input policy.

    Returns the numbers every online stage records (gold reward, win rate vs the input with CIs, KL k3) and the
    checkpoint's judged samples (for extra scores such as a proxy reward).
    """
    prompts = [t.prompt for t in evaluation_tasks(ctx.recipe.data, ctx.stage.eval_prompts, EVAL_SEED)]
    settings = GenerationSettings(max_new_tokens=max_new_tokens, seed=EVAL_SEED)
    results, samples = evaluate_checkpoints(
        [Checkpoint(name, checkpoint)], Checkpoint("initial", ctx.start_model), prompts,
        GoldJudge(), settings, dtype=ctx.recipe.model.dtype, bootstrap_resamples=1000,
    )
    metrics = results[0].metrics
    numbers = {
        "gold_reward": metrics["gold_reward"].value, "gold_reward_ci95": list(metrics["gold_reward"].ci95),
        "win_rate_vs_initial": metrics["win_rate_vs_ref"].value,
        "win_rate_vs_initial_ci95": list(metrics["win_rate_vs_ref"].ci95),
        "kl_initial_k3": metrics["kl_ref_k3"].value,
    }
    return numbers, samples[0]


def _evaluate_round(ctx: StageContext, checkpoint: str, round_index: int) -> dict:
    """Per-round numbers from the shared harness: gold reward, win rate vs the stage's input policy, KL to it."""
    return evaluate_against_start(ctx, f"round-{round_index}", checkpoint, ctx.stage.max_new_tokens)[0]


def run_rounds(ctx: StageContext, method: RoundMethod) -> dict:
    """Run (or resume) every round and publish the last round's policy as the stage checkpoint."""
    stage = ctx.stage
    policy_path, reference_path = ctx.start_model, ctx.start_model
    history = []
    for r in range(stage.rounds):
        round_dir = StageDir(ctx.dir.root / "rounds" / f"round-{r}")
        done = round_dir.read_manifest()
        if done and done.get("status") == "complete" and round_dir.checkpoint.exists():
            log.info("[%s] round %d already complete; reusing it", ctx.dir.name, r)
            history.append(done["metrics"])
        else:
            if ctx.is_main_process:  # an interrupted attempt's summary of this round is about to be redone
                ctx.dir.keep_metrics(lambda record: record.get("round", -1) < r)
            history.append(_run_round(ctx, method, r, policy_path, reference_path))
            if ctx.is_main_process:
                round_dir.write_manifest({"status": "complete", "end_time": utc_now(), "metrics": history[-1]})
        if ctx.is_main_process:  # they only resume the round, and a complete round is never trained again
            ctx.dir.remove_trainer_checkpoints(ctx.dir.trainer / f"round-{r}")
        policy_path = str(round_dir.checkpoint)
        if stage.reference == "previous":
            reference_path = policy_path
    if ctx.is_main_process:
        final = StageDir(ctx.dir.root / "rounds" / f"round-{stage.rounds - 1}").checkpoint
        staging = ctx.dir.root / "checkpoint.tmp"
        shutil.rmtree(staging, ignore_errors=True)
        shutil.copytree(final, staging)
        publish_directory(staging, ctx.dir.checkpoint)
    return {"rounds": history, "final_gold_reward": history[-1]["gold_reward"],
            "final_win_rate_vs_initial": history[-1]["win_rate_vs_initial"]}


def _round_data(ctx: StageContext, method: RoundMethod, r: int, model, tokenizer) -> RoundData:
    """The round's generated and judged training rows, saved to ``rounds/round-<r>/pairs.json`` before training so a
    resumed round trains on exactly the same data without sampling and judging again.

    Every process samples and judges the same seeded round, but all of them train on rank 0's rows: sampling on
    different GPUs is not bitwise reproducible, and ranks with different pairs would run different numbers of steps
    and wait for each other forever."""
    saved = ctx.dir.root / "rounds" / f"round-{r}" / ROUND_DATA
    if ctx.resume and saved.exists():
        stored = json.loads(saved.read_text())
        log.info("[%s] round %d: reusing its %d generated pairs", ctx.dir.name, r, len(stored["rows"]))
        return RoundData(rows=stored["rows"], stats=stored["stats"])
    data = distributed.from_main(method.round_data(ctx, r, model, tokenizer))
    if ctx.is_main_process:
        atomic_write_json(saved, {"rows": data.rows, "stats": data.stats})
    return data


def _more_pairs(stage) -> tuple[list[str], str | None]:
    """The stage's settings that give a round more candidate pairs, and its pair filter when one is on (for
    :func:`~alignpipe.data.truncation.no_pairs_advice`): each stage type has its own (SPIN: no samples_per_prompt)."""
    settings = [name for name in ("prompts_per_round", "samples_per_prompt", "sampling_temperature")
                if hasattr(stage, name)]
    return settings, next((name for name in ("min_gap", "margin_threshold") if getattr(stage, name, 0) > 0), None)


def _run_round(ctx: StageContext, method: RoundMethod, r: int, policy_path: str, reference_path: str) -> dict:
    tokenizer = load_tokenizer(policy_path)
    model = load_policy(ctx, policy_path, on_device=True)  # it samples (and may judge) before training
    data = _round_data(ctx, method, r, model, tokenizer)
    if not data.rows:
        raise RuntimeError(f"round {r} of stage '{ctx.dir.name}' produced no training pairs ({data.stats}); "
                           + no_pairs_advice(data.stats, ctx.stage.max_new_tokens, *_more_pairs(ctx.stage)))
    # Round 0's policy is the initial policy, so TRL's own reference (adapters off / a frozen copy) is already right.
    explicit_reference = reference_path if reference_path != policy_path else None
    training = _train_round(ctx, method, r, model, tokenizer, data.rows, explicit_reference)
    del model
    checkpoint = str(ctx.dir.root / "rounds" / f"round-{r}" / "checkpoint")
    record = distributed.from_main({  # rank 0's evaluation is the round's record on every rank, written once
        "round": r, "pairs": len(data.rows), **data.stats,
        **{f"train/{k}": v for k, v in training.items()},
        **_evaluate_round(ctx, checkpoint, r),
    })
    if ctx.is_main_process:
        append_metrics(ctx.dir.metrics, record)
    log.info("[%s] round %d: gold reward %.3f [%.3f, %.3f], win rate vs initial %.3f [%.3f, %.3f]", ctx.dir.name, r,
             record["gold_reward"], *record["gold_reward_ci95"], record["win_rate_vs_initial"],
             *record["win_rate_vs_initial_ci95"])
    return record
