"""The ``dpo`` stage: Direct Preference Optimisation with TRL's ``DPOTrainer``.

Runs through ``SoftPreferenceDPOTrainer`` (stock TRL unless asked otherwise) so that ``label_smoothing`` gives
conservative DPO with the sigmoid loss, which TRL 1.16's own sigmoid loss ignores.

The reference is the stage's input checkpoint: a frozen copy for full fine-tuning, or the same weights with the
LoRA adapters disabled (TRL's behaviour when a ``peft_config`` is given), so LoRA runs hold one copy of the base.

Before training the stage counts what ``max_length`` cuts from the pairs (:mod:`alignpipe.data.length_report`): TRL
drops every pair whose prompt fills it and cuts the others' replies silently, so the counts are logged, with a
warning naming the length that keeps every pair whole, and kept in the manifest's ``summary.truncation``.

    alignpipe run recipes/quickstart.yaml stages.dpo.beta=0.2
    accelerate launch pipelines/dpo.py --stage-dir runs/quickstart/dpo
"""

from __future__ import annotations

import logging

from datasets import Dataset
from transformers import PreTrainedTokenizerBase
from trl import DPOConfig

from alignpipe.data.length_report import PairTruncationCounts, measure_pair_truncation, pair_truncation_warning
from alignpipe.data.preference import check_soft_targets, preference_pairs_for
from alignpipe.evaluation.harness import position_limit
from alignpipe.pipeline.stage import StageContext
from alignpipe.trainers.common import (
    MetricsLogger,
    load_start_model,
    lora_config,
    train_and_publish,
    trainer_arguments,
)
from alignpipe.trainers.soft_dpo import SoftPreferenceDPOTrainer

log = logging.getLogger("alignpipe")


def run(ctx: StageContext) -> dict:
    stage, recipe = ctx.stage, ctx.recipe
    model, tokenizer = load_start_model(ctx)
    dataset = preference_pairs_for(stage.dataset, recipe.data, recipe.seed)
    check_soft_targets(stage, dataset)  # preflight checked local files; a hub dataset is first read here
    positions = position_limit(model.config)
    counts = _measure_truncation(ctx, dataset, tokenizer, positions) if ctx.is_main_process else None
    args = DPOConfig(
        **trainer_arguments(ctx),
        beta=stage.beta,
        loss_type=list(stage.loss_type),
        loss_weights=stage.loss_weights,
        label_smoothing=stage.label_smoothing,
        precompute_ref_log_probs=stage.precompute_ref_log_probs,
    )
    trainer = SoftPreferenceDPOTrainer(
        model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
        peft_config=lora_config(ctx), callbacks=[MetricsLogger(ctx.dir.metrics)],
    )
    truncation = {**counts.as_dict(), "dropped_by_trl": len(dataset) - len(trainer.train_dataset)} if counts else None
    if truncation and counts.sampled_from and truncation["dropped_by_trl"]:
        _warn_with_trls_count(ctx, counts, truncation["dropped_by_trl"], positions)
    summary = train_and_publish(trainer, tokenizer, ctx)
    rewards = [e for e in trainer.state.log_history if "rewards/accuracies" in e]
    if rewards:
        summary["final_reward_accuracy"] = rewards[-1]["rewards/accuracies"]
        summary["final_reward_margin"] = rewards[-1]["rewards/margins"]
    log.info("[%s] DPO loss %s -> %s over %d steps", ctx.dir.name, summary["first_loss"],
             summary["final_loss"], summary["global_step"])
    return {**summary, "truncation": truncation}


def _measure_truncation(ctx: StageContext, dataset: Dataset, tokenizer: PreTrainedTokenizerBase,
                        positions: int | None = None) -> PairTruncationCounts:
    """What ``max_length`` cuts from the pairs, tokenized as TRL's DPOTrainer will (the same tokenizer and its chat
    template); logged, as a warning when pairs are dropped or replies lose their end, before the trainer is built
    (its reference pass, with ``precompute_ref_log_probs``, would come first)."""
    counts = measure_pair_truncation(dataset, tokenizer, ctx.stage.max_length, seed=ctx.recipe.seed)
    log.info("[%s] max_length %d: %s", ctx.dir.name, ctx.stage.max_length, counts.as_dict())
    if warning := pair_truncation_warning(counts, f"stages.{ctx.stage.name}.max_length", positions=positions):
        log.warning("[%s] %s", ctx.dir.name, warning)
    return counts


def _warn_with_trls_count(ctx: StageContext, counts: PairTruncationCounts, dropped_by_trl: int,
                          positions: int | None = None) -> None:
    """A sample's counts, warned about before the trainer was built, miss what TRL dropped from the rest: say TRL's
    count once, in the full warning if the sample showed nothing to warn about, else beside the sample's warning."""
    if not counts.cuts_a_reply:
        knob = f"stages.{ctx.stage.name}.max_length"
        log.warning("[%s] %s", ctx.dir.name, pair_truncation_warning(counts, knob, dropped_by_trl=dropped_by_trl,
                                                                     positions=positions))
    else:
        log.warning("[%s] TRL dropped %d of all %d pairs whose prompt fills max_length %d (the counts above are of a "
                    "sample of %d)", ctx.dir.name, dropped_by_trl, counts.sampled_from, counts.max_length,
                    counts.pairs)
