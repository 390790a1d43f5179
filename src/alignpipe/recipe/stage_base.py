"""The fields every stage type shares, as the base classes the stage types inherit from: ``_StageBase`` (name,
type, inputs), ``_CheckpointedStage`` (trainer checkpoints), ``_OptimizerStage`` (a policy trained with an
optimizer), ``_TrainerStage`` (a transformers ``Trainer``'s schedule and batches) and ``_TrainingStage``
(``max_length``), with the constants they and the stage types share (learning-rate schedules, the stage-name pattern
and reserved names, the largest seed). Apart because every family of stage types, the ``Recipe`` model's cross-stage
checks and the error messages build on them."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, field_validator, model_validator

from alignpipe.recipe.errors import _problem
from alignpipe.recipe.specs import LoraSpec, _Spec

SchedulerType = Literal["linear", "cosine", "constant", "constant_with_warmup"]
STAGE_NAME_RE = re.compile(r"[a-z0-9][a-z0-9_-]*")  # no dots: overrides split `stages.<name>.<field>` on them
RESERVED_STAGE_NAMES = frozenset({"base"})  # how reports refer to the recipe's untrained model
MAX_SEED = 2**31 - 1  # numpy (which transformers seeds) takes seeds below 2**32; stages add offsets to theirs


class _StageBase(_Spec):
    name: str = Field(description="Stage name: a slug, unique in the recipe; outputs go to runs/<recipe>/<name>/.")
    type: str = Field(description="Stage type: one of STAGE_TYPES (each stage class narrows it to its own tag).")
    inputs: list[str] = Field(
        default_factory=list,
        validate_default=True,  # so "dpo needs exactly 1 input" also fires when inputs is left out
        description="Earlier stages this stage reads; [] = start from the recipe's model.",
    )

    @field_validator("name")
    @classmethod
    def _slug(cls, name: str) -> str:
        if not STAGE_NAME_RE.fullmatch(name):
            raise ValueError(f"expected a slug (lowercase letters, digits, '_' or '-', starting with a letter or "
                             f"digit), got {name!r}")
        if name in RESERVED_STAGE_NAMES:
            raise ValueError(f"{name!r} is reserved for the recipe's untrained model; pick another stage name")
        return name


class _CheckpointedStage(_StageBase):
    """Fields of every stage that saves resumable trainer checkpoints (under ``trainer/``, for ``--resume``)."""

    save_steps: int = Field(
        100, gt=0, description="Save a trainer checkpoint (for --resume) every N steps (tiny-model setting; TRL: 500)."
    )
    save_total_limit: int = Field(2, gt=0, description="Trainer checkpoints kept on disk (tiny-model setting).")


class _OptimizerStage(_CheckpointedStage):
    """Fields of every stage that trains a policy with an optimizer: the TRL-trainer stages and PPO's own loop."""

    learning_rate: float = Field(gt=0, description="Peak learning rate.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay (TRL default).")
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient clipping norm (TRL default).")
    lora: LoraSpec | None = Field(None, description="Train a LoRA adapter, not all weights; null = full fine-tuning.")

    @property
    def trains_full_weights(self) -> bool:
        """Whether the stage steps full weights, which need float32 masters (``models.loading.policy_dtype``)."""
        return self.lora is None


class _TrainerStage(_OptimizerStage):
    """Fields of stages trained by a transformers ``Trainer`` (through TRL); defaults are TRL's unless marked as a
    tiny-model setting. PPO's own loop has none of them: it has its own steps, batch sizes and constant rate."""

    num_train_epochs: float = Field(1.0, gt=0, description="Passes over the data (tiny-model setting; TRL's is 3).")
    max_steps: int = Field(-1, description="If > 0, stop after this many optimizer steps; -1 = use num_train_epochs "
                           "(TRL default).")
    per_device_train_batch_size: int = Field(
        8, gt=0, description="Batch size per device (TRL default); with global_batch_size set, the largest "
        "micro-batch a device takes.",
    )
    gradient_accumulation_steps: int = Field(
        1, gt=0, description="Micro-batches per optimizer step (TRL default); derived when global_batch_size is set.",
    )
    global_batch_size: int | None = Field(
        None, gt=0, description="Examples per optimizer step over all processes; per-device batch and gradient "
        "accumulation are derived from it and the world size, so the same recipe trains the same on 1 or N "
        "processes. null = per_device_train_batch_size x gradient_accumulation_steps x world size.",
    )
    lr_scheduler_type: SchedulerType = Field(
        "cosine", description="Learning-rate schedule (tiny-model setting; TRL's is linear)."
    )
    warmup_ratio: float = Field(0.0, ge=0, lt=1, description="Fraction of steps spent warming up (TRL default: none).")
    logging_steps: int = Field(10, gt=0, description="Log every N steps (TRL default).")
    bf16: bool | None = Field(None, description="bf16 mixed precision; null = on when the GPU supports it, off on CPU.")
    gradient_checkpointing: bool = Field(
        False, description="Trade compute for memory (tiny-model setting; TRL turns it on)."
    )

    @field_validator("max_steps")
    @classmethod
    def _max_steps(cls, value: int) -> int:
        if value != -1 and value <= 0:
            raise ValueError(f"expected -1 (train for num_train_epochs) or an integer > 0, got {value}")
        return value

    @model_validator(mode="after")
    def _global_batch_derives_accumulation(self) -> _TrainerStage:
        if self.global_batch_size is not None and self.gradient_accumulation_steps != 1:
            raise _problem((("gradient_accumulation_steps",), "is derived from global_batch_size and the world "
                            "size; leave it out (or drop global_batch_size)"))
        return self


class _TrainingStage(_TrainerStage):
    """A Trainer stage on offline-shaped sequences (prompt + response: SFT, DPO, the online rounds), which TRL
    truncates to ``max_length``."""

    max_length: int = Field(512, gt=0, description="Truncate sequences to N tokens (tiny-model setting; TRL: 1024).")
