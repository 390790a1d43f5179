"""The online preference loop shared by every iterative method: sample -> judge -> pair -> train -> evaluate.

Written by hand because TRL 1.16 has no loop that judges K on-policy samples with a pairwise (or self-) judge and
trains on soft strengths or win rates. A method (``osp``, ``online_dpo``, ``sppo``, ``spin``, ``dno``, ``inpo``) is
only a :class:`~alignpipe.trainers.round_methods.RoundMethod` (:mod:`alignpipe.trainers.round_methods`): how one
round's samples become training rows, and which loss trains on them. The loop, its checkpoints, reference handling
(``reference: previous`` makes each round's checkpoint the next reference, the self-play methods' ``π_t``), per-round
evaluation, logging and resume are shared, so methods are compared at equal compute. So is what a round does with
samples cut off at ``max_new_tokens`` (no end-of-sequence token): left out before judging unless the stage says
``truncated_samples: keep`` (:mod:`alignpipe.data.truncation`), and counted in every round's record.

Each round writes ``rounds/round-<r>/`` (``pairs.json``, ``checkpoint/``, ``manifest.json``) and one line to
``metrics.jsonl``; with ``--resume`` completed rounds are kept, and an interrupted round trains on its saved
``pairs.json`` from its last trainer checkpoint (no new sampling or judging). A round's trainer checkpoints
(``trainer/round-<r>/``) are deleted once it is complete, so ``save_total_limit`` holds for the whole stage.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
from pathlib import Path

from datasets import Dataset
from transformers import TrainerCallback
from trl import DPOConfig

from alignpipe.data.synthetic import evaluation_tasks
from alignpipe.data.truncation import no_pairs_advice
from alignpipe.evaluation.generation import GenerationSettings
from alignpipe.evaluation.harness import Checkpoint, evaluate_checkpoints
from alignpipe.io import atomic_write_json
from alignpipe.models.loading import load_tokenizer
from alignpipe.pipeline import distributed
from alignpipe.pipeline.rundir import ROUND_DATA, StageDir, publish_directory, utc_now
from alignpipe.pipeline.stage import StageContext, verified_trainer_checkpoint
from alignpipe.seeds import EVAL_SEED
from alignpipe.tasks import GoldJudge
from alignpipe.trainers.common import (
    MetricsLogger,
    append_metrics,
    load_policy,
    lora_config,
    publish_model,
    train,
    trainer_arguments,
)
from alignpipe.trainers.round_methods import RoundData, RoundMethod, round_seed

log = logging.getLogger("alignpipe")


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

    The processes split the round's sampling (each its share of the seeded batches, gathered on every rank) and each
    judges all of it, but all of them train on rank 0's rows: judging on different GPUs is not bitwise
    reproducible, and ranks with different pairs would run different numbers of steps and wait for each other
    forever."""
    saved = ctx.dir.root / "rounds" / f"round-{r}" / ROUND_DATA
    # one answer for every rank: ranks that disagreed would split between sampling (a collective) and reading the file
    if distributed.from_main(ctx.resume and saved.exists()):
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
