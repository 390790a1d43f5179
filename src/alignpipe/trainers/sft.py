"""The ``sft`` stage: supervised fine-tuning with TRL's ``SFTTrainer`` (full or LoRA), assistant-only loss.

    alignpipe run recipes/quickstart.yaml            # runs this stage as pipelines/sft.py
    accelerate launch pipelines/sft.py --stage-dir runs/quickstart/sft
"""

from __future__ import annotations

import logging

from trl import SFTConfig, SFTTrainer

from alignpipe.data.synthetic import sft_dataset
from alignpipe.pipeline.stage import StageContext
from alignpipe.trainers.common import (
    MetricsLogger,
    load_start_model,
    lora_config,
    train_and_publish,
    trainer_arguments,
)

log = logging.getLogger("alignpipe")


def run(ctx: StageContext) -> dict:
    stage, recipe = ctx.stage, ctx.recipe
    model, tokenizer = load_start_model(ctx)
    dataset = sft_dataset(recipe.data, recipe.seed)
    args = SFTConfig(**trainer_arguments(ctx), assistant_only_loss=stage.assistant_only_loss)
    trainer = SFTTrainer(
        model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
        peft_config=lora_config(ctx), callbacks=[MetricsLogger(ctx.dir.metrics)],
    )
    summary = train_and_publish(trainer, tokenizer, ctx)
    log.info("[%s] SFT loss %s -> %s over %d steps", ctx.dir.name, summary["first_loss"],
             summary["final_loss"], summary["global_step"])
    return summary
