"""The online preference loop shared by every iterative method: sample -> judge -> pair -> train -> evaluate.

Written by hand because TRL 1.16 has no loop that judges K on-policy samples with a pairwise (or self-) judge and
trains on soft strengths. A method is only a ``PairingRule`` (how ranked samples become pairs, soft or hard labels);
the loop, its checkpoints, logging and resume are shared, so methods are compared at equal compute.

Each round writes ``rounds/round-<r>/`` (``checkpoint/``, ``manifest.json``) and one line to ``metrics.jsonl``; with
``--resume`` completed rounds are kept and an interrupted round starts over.
"""

from __future__ import annotations

import logging
import random
import shutil
from dataclasses import dataclass
from statistics import median

from datasets import Dataset
from trl import DPOConfig

from alignpipe.data.pairing import (
    PreferencePair,
    ScoredSet,
    build_pairs,
    harden,
    to_trl_rows,
)
from alignpipe.data.synthetic import evaluation_tasks, task_space
from alignpipe.evaluation.generation import GenerationSettings, generate
from alignpipe.evaluation.harness import Checkpoint, evaluate_checkpoints
from alignpipe.models.loading import load_causal_lm, load_tokenizer
from alignpipe.pipeline.rundir import StageDir, publish_directory, utc_now
from alignpipe.pipeline.stage import StageContext
from alignpipe.rewards.judges import GoldPairwiseJudge, SelfJudge, judge_against_anchors
from alignpipe.tasks import GoldJudge, gold_reward, sample_tasks
from alignpipe.trainers.common import (
    MetricsLogger,
    append_metrics,
    lora_config,
    publish_model,
    trainer_arguments,
)
from alignpipe.trainers.soft_dpo import SoftPreferenceDPOTrainer

log = logging.getLogger("alignpipe")

EVAL_SEED = 1234  # the eval stage's default seed: per-round numbers use the same held-out prompts


@dataclass(frozen=True)
class PairingRule:
    """What distinguishes one iterative method from another."""

    method: str  # "anchor" | "best_worst" | "all_pairs" (alignpipe.data.pairing)
    hard_labels: bool  # False = the judge's soft strengths; True = the same pairs with labels of 1


def judge_samples(judge, prompts, samples, *, rng: random.Random, reanchor: bool) -> list[list[float]]:
    """OSP §4b: judge every sample against a random anchor, then (optionally) against the median-strength sample."""
    anchors = [rng.randrange(len(responses)) for responses in samples]
    strengths = judge_against_anchors(judge, prompts, samples, anchors)
    if reanchor:
        anchors = [min(range(len(s)), key=lambda i, s=s: abs(s[i] - median(s))) for s in strengths]
        strengths = judge_against_anchors(judge, prompts, samples, anchors)
    return strengths


def gold_agreement(pairs: list[PreferencePair]) -> float | None:
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
    return SelfJudge(model, tokenizer)


def _sample(ctx: StageContext, model, tokenizer, prompts: list[str], round_index: int) -> list[list[str]]:
    stage, k = ctx.stage, ctx.stage.samples_per_prompt
    settings = GenerationSettings(
        max_new_tokens=stage.max_new_tokens, temperature=stage.sampling_temperature, top_p=1.0,
        batch_size=64, seed=ctx.recipe.seed * 100_003 + round_index,
    )
    generations = generate(model, tokenizer, [p for p in prompts for _ in range(k)], settings,
                           desc=f"round {round_index}: sampling")
    return [[g.response for g in generations[i * k:(i + 1) * k]] for i in range(len(prompts))]


def _train_round(ctx: StageContext, round_index: int, model, tokenizer, pairs, reference_path: str | None) -> dict:
    stage = ctx.stage
    arguments = {**trainer_arguments(ctx), "output_dir": str(ctx.dir.trainer / f"round-{round_index}")}
    losses = ({"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, stage.nll_weight]} if stage.nll_weight
              else {"loss_type": ["sigmoid"]})
    args = DPOConfig(**arguments, beta=stage.beta, **losses)
    ref_model = load_causal_lm(reference_path, dtype=ctx.recipe.model.dtype) if reference_path else None
    trainer = SoftPreferenceDPOTrainer(
        model=model, ref_model=ref_model, args=args, train_dataset=Dataset.from_list(to_trl_rows(pairs)),
        processing_class=tokenizer, peft_config=lora_config(ctx), callbacks=[MetricsLogger(ctx.dir.metrics)],
    )
    trainer.train()
    publish_model(trainer, tokenizer, ctx, ctx.dir.root / "rounds" / f"round-{round_index}" / "checkpoint")
    logs = [e for e in trainer.state.log_history if "loss" in e]
    last = logs[-1] if logs else {}
    return {key: last[key] for key in ("loss", "rewards/margins", "rewards/accuracies", "soft/margin_gap") if key in last}


def _evaluate_round(ctx: StageContext, checkpoint: str, round_index: int) -> dict:
    prompts = [t.prompt for t in evaluation_tasks(ctx.recipe.data, ctx.stage.eval_prompts, EVAL_SEED)]
    settings = GenerationSettings(max_new_tokens=ctx.stage.max_new_tokens, seed=EVAL_SEED)
    results, _ = evaluate_checkpoints(
        [Checkpoint(f"round-{round_index}", checkpoint)], Checkpoint("initial", ctx.start_model), prompts,
        GoldJudge(), settings, dtype=ctx.recipe.model.dtype, bootstrap_resamples=1000,
    )
    metrics = results[0].metrics
    return {
        "gold_reward": metrics["gold_reward"].value, "gold_reward_ci95": list(metrics["gold_reward"].ci95),
        "win_rate_vs_initial": metrics["win_rate_vs_ref"].value, "kl_initial_k3": metrics["kl_ref_k3"].value,
    }


def run_rounds(ctx: StageContext, rule: PairingRule) -> dict:
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
            history.append(_run_round(ctx, rule, r, policy_path, reference_path))
            round_dir.write_manifest({"status": "complete", "end_time": utc_now(), "metrics": history[-1]})
        policy_path = str(round_dir.checkpoint)
        if stage.reference == "previous":
            reference_path = policy_path
    if ctx.is_main_process:
        final = StageDir(ctx.dir.root / "rounds" / f"round-{stage.rounds - 1}").checkpoint
        staging = ctx.dir.root / "checkpoint.tmp"
        shutil.rmtree(staging, ignore_errors=True)
        shutil.copytree(final, staging)
        publish_directory(staging, ctx.dir.checkpoint)
    return {"rounds": history, "final_gold_reward": history[-1]["gold_reward"]}


def _run_round(ctx: StageContext, rule: PairingRule, r: int, policy_path: str, reference_path: str) -> dict:
    stage, recipe = ctx.stage, ctx.recipe
    tokenizer = load_tokenizer(policy_path)
    model = load_causal_lm(policy_path, dtype=recipe.model.dtype)
    prompts = [t.prompt for t in sample_tasks(stage.prompts_per_round, recipe.seed * 1000 + r + 1,
                                              task_space(recipe.data))]
    samples = _sample(ctx, model, tokenizer, prompts, r)
    strengths = judge_samples(_make_judge(ctx, model, tokenizer), prompts, samples,
                              rng=random.Random(f"anchor:{recipe.seed}:{r}"), reanchor=stage.reanchor)
    sets = [ScoredSet(p, tuple(rs), tuple(s)) for p, rs, s in zip(prompts, samples, strengths)]
    pairs, report = build_pairs(sets, method=rule.method, strength="probability", min_gap=stage.min_gap)
    if rule.hard_labels:
        pairs = harden(pairs)
    log.info("[%s] round %d: %s", ctx.dir.name, r, report.summary())
    if not pairs:
        raise RuntimeError(f"round {r} of stage '{ctx.dir.name}' produced no preference pairs ({report.summary()}); "
                           "raise samples_per_prompt or sampling_temperature, or lower min_gap")
    # Round 0's policy is the initial policy, so TRL's own reference (adapters off / a frozen copy) is already right.
    explicit_reference = reference_path if reference_path != policy_path else None
    training = _train_round(ctx, r, model, tokenizer, pairs, explicit_reference)
    del model
    checkpoint = str(ctx.dir.root / "rounds" / f"round-{r}" / "checkpoint")
    record = {
        "round": r, "pairs": len(pairs), "judge": stage.judge,
        "judge_gold_agreement": gold_agreement(pairs),
        "mean_strength": sum(p.strength for p in pairs) / len(pairs),
        **{f"train/{k}": v for k, v in training.items()},
        **_evaluate_round(ctx, checkpoint, r),
    }
    append_metrics(ctx.dir.metrics, record)
    log.info("[%s] round %d: gold reward %.3f [%.3f, %.3f], judge/gold agreement %s", ctx.dir.name, r,
             record["gold_reward"], *record["gold_reward_ci95"], record["judge_gold_agreement"])
    return record
