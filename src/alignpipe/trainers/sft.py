"""The ``sft`` stage: supervised fine-tuning with TRL's ``SFTTrainer`` (full or LoRA), assistant-only loss.

The demonstrations come from the stage's ``dataset`` block: the synthetic task (default), a dataset in TRL's SFT
formats, or the chosen side of HH-RLHF / UltraFeedback, always as TRL conversational ``messages`` rows.

    alignpipe run recipes/quickstart.yaml            # runs this stage as pipelines/sft.py
    accelerate launch pipelines/sft.py --stage-dir runs/quickstart/sft
"""

from __future__ import annotations

import logging

from datasets import Dataset
from trl import SFTConfig, SFTTrainer

from alignpipe.data.errors import LoadReport
from alignpipe.data.length_report import measure_truncation, truncation_warning
from alignpipe.data.preference import sft_conversations_for
from alignpipe.data.synthetic import sft_dataset
from alignpipe.evaluation.harness import position_limit
from alignpipe.pipeline.stage import StageContext
from alignpipe.recipe import DataSpec, SFTDataSpec
from alignpipe.trainers.common import (
    MetricsLogger,
    load_start_model,
    lora_config,
    train_and_publish,
    trainer_arguments,
)

log = logging.getLogger("alignpipe")


def sft_dataset_for(spec: SFTDataSpec, data: DataSpec, seed: int, *, report: LoadReport | None = None) -> Dataset:
    """A TRL conversational SFT ``Dataset`` (one ``messages`` column of ``{"role", "content"}`` turns).

    Real sources go through their adapter in :mod:`alignpipe.data.sft_sources`, which raises (naming the file, row and
    column, and the fix) on a missing column, an empty dataset or a conversation without an assistant turn, and
    fills ``report`` (when given) with the rows it read and skipped.
    """
    if spec.source == "synthetic":
        return sft_dataset(data, seed)
    conversations = sft_conversations_for(spec, seed, report=report)
    log.info("sft data %s (%s, split %s): %d conversations", spec.path, spec.source, spec.split, len(conversations))
    return Dataset.from_list([{"messages": turns} for turns in conversations])


def run(ctx: StageContext) -> dict:
    stage, recipe = ctx.stage, ctx.recipe
    dataset = sft_dataset_for(stage.dataset, recipe.data, recipe.seed)  # before the model: data errors come first
    model, tokenizer = load_start_model(ctx)
    args = SFTConfig(**trainer_arguments(ctx), assistant_only_loss=stage.assistant_only_loss)
    trainer = SFTTrainer(
        model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
        peft_config=lora_config(ctx), callbacks=[MetricsLogger(ctx.dir.metrics)],
    )
    truncation = _measure_truncation(ctx, dataset, trainer) if ctx.is_main_process else None
    summary = train_and_publish(trainer, tokenizer, ctx)
    log.info("[%s] SFT loss %s -> %s over %d steps", ctx.dir.name, summary["first_loss"],
             summary["final_loss"], summary["global_step"])
    return {**summary, "truncation": truncation}


def _measure_truncation(ctx: StageContext, dataset: Dataset, trainer: SFTTrainer) -> dict:
    """What ``max_length`` cuts from the demonstrations, with the tokenizer and chat template the trainer uses; logged
    as a warning when replies lose tokens, and kept in the manifest's summary with the number TRL dropped."""
    counts = measure_truncation(dataset, trainer.processing_class, ctx.stage.max_length,
                                chat_template=trainer.chat_template, seed=ctx.recipe.seed)
    record = {**counts.as_dict(), "dropped_by_trl": len(dataset) - len(trainer.train_dataset)}
    log.info("[%s] max_length %d: %s", ctx.dir.name, ctx.stage.max_length, record)
    if warning := truncation_warning(counts, f"stages.{ctx.stage.name}.max_length",
                                     assistant_only_loss=ctx.stage.assistant_only_loss,
                                     dropped_by_trl=record["dropped_by_trl"],
                                     positions=position_limit(trainer.model.config)):
        log.warning("[%s] %s", ctx.dir.name, warning)
    return record
