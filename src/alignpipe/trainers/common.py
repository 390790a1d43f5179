"""What every TRL-backed training stage shares: trainer arguments, metric logging, LoRA, and publishing the result.

Why: the stage modules stay thin (data + model + TRL trainer); the CPU/GPU defaults and the run-directory contract
(``metrics.jsonl``, ``trainer/`` for ``--resume``, an atomically published ``checkpoint/``) are decided here once.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, PeftModel
from transformers import TrainerCallback

from alignpipe.io import atomic_write_json
from alignpipe.models.loading import (
    activation_checkpointing_argument,
    load_causal_lm,
    load_tokenizer,
    policy_dtype,
    resolve_bf16,
    resolve_dtype,
    resolve_model_location,
)
from alignpipe.models.quantization import (
    is_quantized,
    merge_adapters_in_full_precision,
    merge_dtype,
    prepare_for_kbit_training,
)
from alignpipe.pipeline import distributed
from alignpipe.pipeline.batching import repeated_per_epoch, stage_batch_split
from alignpipe.pipeline.rundir import StageDir, publish_directory
from alignpipe.pipeline.stage import StageContext
from alignpipe.recipe import _TrainingStage

log = logging.getLogger("alignpipe")

def start_gguf_file(ctx: StageContext) -> str | None:
    """The GGUF file inside ``ctx.start_model``: the recipe's ``model.gguf_file`` for a stage with no inputs (it starts
    from the recipe's model), None for one that starts from an earlier stage's published (safetensors) checkpoint."""
    return None if ctx.stage.inputs else ctx.recipe.model.gguf_file


def load_start_model(ctx: StageContext):
    """The policy a training stage starts from (its input checkpoint, or the recipe's model) and its tokenizer.

    With ``model.quantization`` the policy loads k-bit and frozen, ready for the stage's LoRA adapters (QLoRA).
    """
    gguf_file = start_gguf_file(ctx)
    tokenizer = load_tokenizer(ctx.start_model, gguf_file=gguf_file)
    return load_policy(ctx, ctx.start_model, gguf_file=gguf_file), tokenizer


def load_policy(ctx: StageContext, path: str, *, gguf_file: str | None = None, on_device: bool = False):
    """A policy to train from ``path``: k-bit, frozen and ready for LoRA under ``model.quantization`` (QLoRA), else
    in the recipe's dtype, full weights under ``auto`` in float32 (:func:`~alignpipe.models.loading.policy_dtype`).
    Every stage that trains a policy loads it here, so quantization and the masters' dtype apply to all of them.

    ``on_device`` puts it on this process's device at once, for a stage that samples from it before its trainer
    would move it (the online rounds); otherwise the trainer places it."""
    quantization = ctx.recipe.model.quantization
    dtype = policy_dtype(ctx.recipe.model.dtype, full_weights=quantization is None and ctx.stage.trains_full_weights)
    if dtype != resolve_dtype(ctx.recipe.model.dtype):
        log.info("[%s] full weights load in float32, not %s (model.dtype auto): nothing else would keep float32 "
                 "master weights", ctx.dir.name, resolve_dtype(ctx.recipe.model.dtype))
    model = load_causal_lm(path, dtype=dtype, gguf_file=gguf_file, quantization=quantization,
                           device=ctx.device if on_device else None)
    check_lora_spares_tied_embeddings(model, lora_config(ctx), ctx.dir.name)
    return prepare_for_kbit_training(model) if quantization is not None else model


def trainer_arguments(ctx: StageContext) -> dict[str, Any]:
    """Keyword arguments shared by TRL's ``SFTConfig``, ``DPOConfig``, ``GRPOConfig`` and ``RLOOConfig``, from the
    stage's typed config (``max_length`` only for stages that have one: GRPO/RLOO configs take none).

    TRL 1.16 defaults to bf16 and gradient checkpointing; both are wrong for a tiny model on a CPU, so precision
    follows the hardware (``bf16: null``) and checkpointing is opt-in. The per-device batch and accumulation come
    from the stage's ``global_batch_size`` and this launch's world size when it is set.

    ``trust_remote_code`` is the recipe's ``model.trust_remote_code``: a trainer that loads a model itself (DPO's
    and GRPO/RLOO's reference for full weights with no ``ref_model``, rebuilt from the policy's
    ``config._name_or_path``) reads it from its config, whose default (False) refused a custom-code policy.
    """
    stage = ctx.stage
    batch = stage_batch_split(stage, distributed.world_size())
    return dict(
        output_dir=str(ctx.dir.trainer),
        learning_rate=stage.learning_rate,
        num_train_epochs=stage.num_train_epochs,
        max_steps=stage.max_steps,
        per_device_train_batch_size=batch.per_device,
        gradient_accumulation_steps=batch.accumulation,
        lr_scheduler_type=stage.lr_scheduler_type,
        warmup_steps=stage.warmup_ratio,
        weight_decay=stage.weight_decay,
        max_grad_norm=stage.max_grad_norm,
        **({"max_length": stage.max_length} if isinstance(stage, _TrainingStage) else {}),
        logging_steps=stage.logging_steps,
        save_strategy="steps",
        save_steps=stage.save_steps,
        save_total_limit=None,  # CheckpointRecorder prunes, after recording the new checkpoint
        bf16=resolve_bf16(stage.bf16),
        **activation_checkpointing_argument(stage.gradient_checkpointing),
        use_cpu=not torch.cuda.is_available(),
        seed=ctx.recipe.seed,
        data_seed=ctx.recipe.seed,
        report_to=[],
        dataloader_num_workers=0,
        logging_nan_inf_filter=False,  # a NaN loss must reach MetricsLogger, not be replaced by the running mean
        # Passed unconditionally: TRL 1.16's SFTConfig, DPOConfig, GRPOConfig and RLOOConfig, the configs built from
        # these arguments, all have the field (a test checks it, so an upgrade that drops one fails there).
        trust_remote_code=ctx.recipe.model.trust_remote_code,
        **optimizer_arguments(ctx),
    )


def optimizer_arguments(ctx: StageContext) -> dict[str, Any]:
    """Trainer ``optim`` for the stage: bitsandbytes' 8-bit AdamW for a quantized recipe with ``optimizer_8bit``.

    QLoRA pairs k-bit weights with a low-memory optimiser; ``adamw_bnb_8bit`` also runs on CPU (checked with
    bitsandbytes 0.50). bitsandbytes keeps 32-bit state for tensors under 4096 values, so small adapters (the tiny
    model's) train with plain AdamW state. Empty otherwise, leaving transformers' default (torch AdamW). Merged into
    :func:`trainer_arguments`.
    """
    spec = ctx.recipe.model.quantization
    if spec is None or not spec.optimizer_8bit:
        return {}
    return {"optim": "adamw_bnb_8bit"}


def lora_config(ctx: StageContext) -> LoraConfig | None:
    spec = ctx.stage.lora
    if spec is None:
        return None
    return LoraConfig(
        r=spec.r, lora_alpha=spec.alpha, lora_dropout=spec.dropout, target_modules=spec.target_modules,
        task_type="CAUSAL_LM",
    )


def check_lora_spares_tied_embeddings(model, config: LoraConfig | None, stage: str) -> None:
    """Refuse LoRA on an input embedding or output head that share one matrix (tied embeddings: the tiny model,
    SmolLM2).

    Why: training adapts one end, but the published checkpoint merges the adapter into the shared matrix, so the
    other end changes too, which training never saw (an embedding adapter moved the tiny model's published logits
    by 8.3 against 0.65 for the trained change; PEFT only warns)."""
    if config is None:
        return
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    if head is None or embedding is None or head.weight is not embedding.weight:
        return
    from peft.tuners.tuners_utils import check_target_module_exists

    adapted = [name for name, module in model.named_modules()
               if (module is embedding or module is head) and check_target_module_exists(config, name)]
    if adapted:
        raise ValueError(f"stage {stage!r}: lora.target_modules adapts {adapted[0]}, which shares its matrix with "
                         "the model's other end (tied input embedding and output head); merged for publishing, the "
                         "adapter would change both, and training saw it on one. Leave the embeddings and the output "
                         "head out of lora.target_modules (the default all-linear does)")


def append_metrics(path: Path, record: dict) -> None:
    """One JSON line per record: an append-only log that survives a crash up to its last complete line."""
    with path.open("a") as handle:
        handle.write(json.dumps(record) + "\n")


GUARDED_LOGS = ("loss", "grad_norm")


class MetricsLogger(TrainerCallback):
    """Appends every trainer log (loss, learning rate, DPO rewards ...) to the stage's ``metrics.jsonl``, and stops
    the stage when the loss or gradient norm is NaN/Inf.

    Why here: every TRL-backed stage's logs pass through this callback, and a non-finite loss must stop the run
    before it is saved as a checkpoint (the last trainer checkpoint stays the last good one) instead of being
    averaged away (``trainer_arguments`` turns transformers' ``logging_nan_inf_filter`` off so it shows).
    """

    def __init__(self, path: Path, tag: dict | None = None):
        self.path = path
        self.tag = tag or {}  # fields added to every record (an iterative stage's round trainer: its name)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs:
            return
        bad = {k: logs[k] for k in GUARDED_LOGS if isinstance(logs.get(k), float) and not math.isfinite(logs[k])}
        if bad:
            raise FloatingPointError(
                f"non-finite training numbers at step {state.global_step} of {self.path.parent.name}: {bad}; stopping "
                "before the next checkpoint (the last one saved under trainer/ is intact). Lower the learning rate, "
                "check the data, or use fp32 (bf16: false)")
        if state.is_world_process_zero:
            append_metrics(self.path, {**self.tag, "step": state.global_step, "epoch": state.epoch, **logs})


class CheckpointRecorder(TrainerCallback):
    """Records each trainer checkpoint's hash in the stage manifest once the trainer has written all of it, then
    keeps the newest ``keep`` checkpoints (the stage's ``save_total_limit``).

    Must be the trainer's last callback (:func:`train` adds it last): other callbacks' ``on_save`` may still add files
    to the checkpoint (e.g. the reward source's state), and the hash must cover them. Until it is recorded, a
    checkpoint is not resumed from (``StageDir.latest_trainer_checkpoint``). The trainer itself must not rotate
    (``save_total_limit=None`` in its arguments): transformers deletes old checkpoints before ``on_save``, so an
    interrupt while the new one is hashed would leave nothing recorded to resume from.
    """

    def __init__(self, stage_dir: StageDir, keep: int):
        self.stage_dir, self.keep = stage_dir, keep

    def on_train_begin(self, args, state, control, **kwargs):
        if args.save_total_limit is not None:
            raise ValueError(f"the trainer of {self.stage_dir.name} rotates its own checkpoints (save_total_limit="
                             f"{args.save_total_limit}), before they are recorded; pass save_total_limit=None (its "
                             "CheckpointRecorder prunes to the stage's save_total_limit after recording)")

    def on_save(self, args, state, control, **kwargs):
        distributed.barrier()  # every rank's shards (DeepSpeed) are on disk before rank 0 hashes them
        checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if state.is_world_process_zero and checkpoint.is_dir():
            self.stage_dir.record_and_prune(checkpoint, self.keep)


TOKEN_COUNT = "alignpipe_token_count.json"  # beside each trainer checkpoint: TRL's running token count


class CheckpointSideState(TrainerCallback):
    """Saves a piece of state the trainer does not checkpoint itself as ``filename`` (JSON) in every checkpoint, so a
    resume can restore it with ``load_side_state``. ``state()`` returns None when there is nothing to save."""

    def __init__(self, filename: str, state: Callable[[], dict | None]):
        self.filename, self.state = filename, state

    def on_save(self, args, state, control, **kwargs):
        checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if state.is_world_process_zero and checkpoint.is_dir() and (saved := self.state()) is not None:
            atomic_write_json(checkpoint / self.filename, saved)


def load_side_state(checkpoint: Path | None, filename: str) -> dict | None:
    """What ``CheckpointSideState`` saved in ``checkpoint`` (None when not resuming or nothing was saved)."""
    path = checkpoint / filename if checkpoint is not None else None
    return json.loads(path.read_text()) if path is not None and path.exists() else None


def _token_count(trainer) -> dict | None:
    # TRL 1.16's SFT, DPO and reward trainers keep the logged ``num_tokens`` in ``_total_train_tokens``, outside the
    # trainer state: without saving it a resumed run would count from 0 and log different numbers.
    count = getattr(trainer, "_total_train_tokens", None)
    return {"total_train_tokens": count} if count is not None else None


FINAL_RECORD = "final_evaluation"  # marks the metrics record a stage appends once training is done


def train(trainer, ctx: StageContext, resume_from: Path | None) -> None:
    """``trainer.train``, from the verified checkpoint ``resume_from`` if given, with every new checkpoint's hash
    recorded. Metric records this trainer logged after the starting step (an interrupted attempt's) are dropped
    first: they are about to be redone, so the resumed log equals an uninterrupted one, but for the first record
    after a checkpoint between two logging steps (``save_steps`` not a multiple of ``logging_steps``), which
    transformers averages over the steps since the checkpoint only (it saves no partial sums). So is a record marked
    ``FINAL_RECORD``, whatever its step: the stage appends it again after this call, also when the attempt died
    after writing it but before the stage was complete.

    A checkpoint at the last step (killed after the final save, before publishing) is loaded without training:
    transformers 5.23 resumed from it trains one step past ``max_steps``.
    """
    if ctx.is_main_process and (note := _repeated_rows(trainer, ctx)) is not None:
        log.warning(note)
    trainer.add_callback(CheckpointSideState(TOKEN_COUNT, lambda: _token_count(trainer)))
    # last: the hash covers what the callbacks before it saved
    trainer.add_callback(CheckpointRecorder(ctx.dir, ctx.stage.save_total_limit))
    state = json.loads((resume_from / "trainer_state.json").read_text()) if resume_from else {}
    step = state.get("global_step", 0)
    if hasattr(trainer, "first_epoch"):  # a sampler that replays epochs (trainers.epoch_sampling) starts at this one
        trainer.first_epoch = int(state.get("epoch") or 0)  # whole epochs done: the fraction of the current is < 1
    finished = resume_from is not None and step >= state.get("max_steps", float("inf")) > 0
    if (tokens := load_side_state(resume_from, TOKEN_COUNT)) is not None:
        trainer._total_train_tokens = tokens["total_train_tokens"]
    if ctx.is_main_process:
        output = Path(trainer.args.output_dir)
        # ... and the end-of-training summary (``train_runtime`` ...), which a resumed trainer logs again
        ctx.dir.keep_metrics(lambda r: not r.get(FINAL_RECORD) and (not _logged_by(r, output) or (
            r.get("step", 0) <= step and (finished or "train_runtime" not in r))))
    if resume_from is not None and not finished and step % trainer.args.logging_steps:
        log.info("[%s] resuming at step %d, between two logging steps: the first loss logged after it averages "
                 "steps %d-%d only", ctx.dir.name, step, step + 1,
                 step + trainer.args.logging_steps - step % trainer.args.logging_steps)
    if finished:
        from transformers import TrainerState

        log.info("[%s] %s is the last step: publishing it without training", ctx.dir.name, resume_from.name)
        trainer._load_from_checkpoint(str(resume_from))
        trainer.state = TrainerState.load_from_json(str(resume_from / "trainer_state.json"))
        return
    trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)


def _repeated_rows(trainer, ctx: StageContext) -> str | None:
    """Why this launch trains on other examples than one process would (:func:`repeated_per_epoch`); None when it
    does not. GRPO/RLOO's sampler deals out whole generation batches (``too_few_prompts``) and is left out."""
    from alignpipe.recipe import GRPOStage, RLOOStage

    if isinstance(ctx.stage, GRPOStage | RLOOStage) or trainer.args.dataloader_drop_last:
        return None
    rows, per_device, world = len(trainer.train_dataset), trainer.args.per_device_train_batch_size, \
        distributed.world_size()
    if not (repeated := repeated_per_epoch(rows, per_device, world)):
        return None
    return (f"[{ctx.dir.name}] {rows} rows do not fill whole batches of {per_device} per device x {world} processes: "
            f"each epoch's last batch repeats {repeated} rows from its start (accelerate evens the processes' "
            f"batches), where one process would train a smaller last batch; a multiple of {per_device * world} rows "
            "trains as one process does")


def _logged_by(record: dict, output_dir: Path) -> bool:
    """Whether a metrics record came from the trainer writing to ``output_dir`` (iterative stages run one trainer
    per round, tagged with ``trainer``; single-trainer stages tag nothing)."""
    return record.get("trainer", output_dir.name) == output_dir.name


def publish_model(trainer, tokenizer, ctx: StageContext, destination: Path | None = None) -> Path:
    """Save the trained policy as a full ``save_pretrained`` checkpoint and move it into place atomically.

    ``destination`` defaults to the stage's ``checkpoint/``. LoRA adapters are merged, so every downstream stage
    (and ``from_pretrained``) loads the checkpoint the same way whether or not LoRA was used. A k-bit (QLoRA) run
    publishes full-precision weights too: its adapters are merged into an un-quantized reload of the start model.
    """
    destination = destination or ctx.dir.checkpoint
    trainer.accelerator.wait_for_everyone()
    gathered = zero3_state_dict(trainer)  # a collective: every rank joins before the others return
    if ctx.is_main_process:
        _save_and_publish(trainer, tokenizer, ctx, destination, gathered)
    # Every rank may load the checkpoint next (a round's evaluation, the next round's policy): none goes on before
    # rank 0 has published it, which a merge into a reloaded base makes slow.
    trainer.accelerator.wait_for_everyone()
    return destination


def _save_and_publish(trainer, tokenizer, ctx: StageContext, destination: Path,
                      gathered: dict[str, torch.Tensor] | None) -> None:
    """Rank 0's part of :func:`publish_model`."""
    model = trainer.accelerator.unwrap_model(trainer.model)
    staging = destination.with_name(destination.name + ".tmp")
    if gathered is not None:
        if isinstance(model, PeftModel):  # ZeRO-3's placeholders cannot be merged in place: merge into a reload
            model = _merge_into_reload(model, ctx, destination, dtype=resolve_dtype(ctx.recipe.model.dtype),
                                       state_dict=gathered)
            gathered = None
    elif is_quantized(model):
        if not isinstance(model, PeftModel):
            raise ValueError("a k-bit quantized policy without LoRA adapters has nothing trainable to publish; "
                             "give the stage a lora block (model.quantization needs one)")
        # Merging into the k-bit weights would round the update away: merge into a full-precision reload.
        model = _merge_into_reload(model, ctx, destination, dtype=merge_dtype(ctx.recipe.model.quantization))
    elif isinstance(model, PeftModel):
        model = model.merge_and_unload()
    model.save_pretrained(staging, safe_serialization=True, state_dict=gathered)
    tokenizer.save_pretrained(staging)
    publish_directory(staging, destination)


def _merge_into_reload(model: PeftModel, ctx: StageContext, destination: Path, *, dtype: torch.dtype,
                       state_dict: dict[str, torch.Tensor] | None = None):
    """``model``'s adapters merged into a fresh load of the base they were trained on: the stage's start model, or
    the base the adapter config records when that differs (e.g. an earlier round's checkpoint, never GGUF)."""
    base = resolve_model_location(ctx.start_model)
    gguf_file = start_gguf_file(ctx)
    recorded = model.peft_config[model.active_adapter].base_model_name_or_path
    if recorded and recorded != base:
        base, gguf_file = recorded, None
    return merge_adapters_in_full_precision(model, base, gguf_file=gguf_file, workdir=destination.parent,
                                            dtype=dtype, state_dict=state_dict)


def zero3_state_dict(trainer) -> dict[str, torch.Tensor] | None:
    """The full weights under DeepSpeed ZeRO-3, else None.

    Why: ZeRO-3 leaves each rank a slice of every weight and the module itself only empty placeholders, so a plain
    ``save_pretrained`` writes tensors of size 0 (the next stage then fails to load them). The consolidated 16-bit
    state dict (``stage3_gather_16bit_weights_on_model_save`` in ``ds_zero3.json``) is gathered by a collective that
    every rank must join; rank 0 receives it. A trainer that never started its engine (publishing a finished
    checkpoint on ``--resume``) holds whole weights: ``model_wrapped`` is then the model itself.
    """
    plugin = getattr(trainer.accelerator.state, "deepspeed_plugin", None)
    if plugin is None or plugin.zero_stage != 3 or trainer.model_wrapped is trainer.model:
        return None
    return trainer.accelerator.get_state_dict(trainer.model_wrapped)


def train_and_publish(trainer, tokenizer, ctx: StageContext) -> dict:
    """Train (resuming when the runner found a trainer checkpoint), publish the checkpoint, summarise the losses."""
    train(trainer, ctx, ctx.resume_from)
    publish_model(trainer, tokenizer, ctx)
    return training_summary(trainer)


def training_summary(trainer) -> dict[str, float | None]:
    """First and last logged training loss and the step count, for the manifest (None when nothing was logged)."""
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return {
        "global_step": trainer.state.global_step,
        "first_loss": losses[0] if losses else None,
        "final_loss": losses[-1] if losses else None,
    }
