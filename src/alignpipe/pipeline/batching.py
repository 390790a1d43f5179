"""Global batch size -> per-device batch and gradient accumulation for a given world size (pure arithmetic).

Why: a recipe should train the same on 1 process or 16. It states the examples per optimizer step over all
processes; the launcher's world size decides how that is split, and a split that cannot be exact is an error
before any model loads rather than a silently different optimisation.
"""

from __future__ import annotations

from dataclasses import dataclass


class BatchSizeError(ValueError):
    """A global batch size that cannot be split exactly over the processes."""


@dataclass(frozen=True)
class BatchSplit:
    global_batch_size: int
    world_size: int
    per_device: int
    accumulation: int

    def describe(self) -> str:
        return (f"global batch {self.global_batch_size} = {self.per_device} per device x {self.accumulation} "
                f"accumulation x {self.world_size} process{'es' if self.world_size > 1 else ''}")


def split_global_batch(global_batch_size: int, world_size: int, max_per_device: int, *, where: str = "") -> BatchSplit:
    """The largest per-device micro-batch <= ``max_per_device`` that divides this rank's share, and the accumulation
    that makes up the rest, so ``per_device x accumulation x world_size == global_batch_size`` exactly.

    >>> split_global_batch(64, 2, 8)
    BatchSplit(global_batch_size=64, world_size=2, per_device=8, accumulation=4)
    """
    prefix = f"{where}: " if where else ""
    if global_batch_size <= 0 or world_size <= 0 or max_per_device <= 0:
        raise BatchSizeError(f"{prefix}sizes must be positive (global_batch_size={global_batch_size}, "
                             f"world size={world_size}, per_device_train_batch_size={max_per_device})")
    if global_batch_size % world_size:
        lower = global_batch_size - global_batch_size % world_size
        choices = ", ".join(str(n) for n in (lower, lower + world_size) if n > 0)
        raise BatchSizeError(f"{prefix}global_batch_size {global_batch_size} does not split over {world_size} "
                             f"processes; use a multiple of {world_size} (e.g. {choices}) or change the process count")
    per_rank = global_batch_size // world_size
    per_device = max(d for d in range(1, min(per_rank, max_per_device) + 1) if per_rank % d == 0)
    return BatchSplit(global_batch_size, world_size, per_device, per_rank // per_device)


def effective_batch(per_device: int, accumulation: int, world_size: int) -> int:
    """Examples per optimizer step when the recipe gives per-device sizes instead of a global batch."""
    return per_device * accumulation * world_size


def stage_batch_split(stage, world_size: int) -> BatchSplit:
    """The per-device batch and accumulation a training stage runs with on ``world_size`` processes.

    ``stage`` is a training stage config (``per_device_train_batch_size``, ``gradient_accumulation_steps``,
    ``global_batch_size``); without a global batch its per-device sizes are used as given.
    """
    if stage.global_batch_size is None:
        per_device, accumulation = stage.per_device_train_batch_size, stage.gradient_accumulation_steps
        return BatchSplit(effective_batch(per_device, accumulation, world_size), world_size, per_device, accumulation)
    return split_global_batch(stage.global_batch_size, world_size, stage.per_device_train_batch_size,
                              where=f"stages.{stage.name}")


def repeated_per_epoch(rows: int, per_device: int, world_size: int) -> int:
    """Rows accelerate repeats in each epoch of ``rows`` on ``world_size`` processes (``even_batches``, transformers'
    default): the last batches are topped up from the epoch's start so that every process gets a full one, where one
    process trains a smaller last batch. So a run on several processes trains on other examples there."""
    return 0 if world_size == 1 else -rows % (per_device * world_size)


def generation_batch_prompts(stage, world_size: int) -> int:
    """Prompts in one generation batch of a grpo/rloo stage on ``world_size`` processes: TRL samples
    ``num_generations`` completions of each, as many completions as one optimizer step takes over all processes."""
    return stage_batch_split(stage, world_size).global_batch_size // stage.num_generations


def too_few_prompts(stage, world_size: int) -> str | None:
    """Why a grpo/rloo stage's ``prompts`` cannot fill one generation batch on ``world_size`` processes, with the
    fix; None when they can.

    Why: TRL's sampler (``RepeatSampler``) drops a generation batch it cannot fill, so with fewer prompts than one
    batch the dataloader is empty: transformers then stops on an unrelated error (``max_steps: -1``), or the stage
    trains 0 steps and publishes its untrained input as complete (``max_steps > 0``).
    """
    needed = generation_batch_prompts(stage, world_size)
    if stage.prompts >= needed:
        return None
    split = stage_batch_split(stage, world_size)
    return (f"{stage.prompts} cannot fill one generation batch of {needed} prompts ({split.describe()}, counted in "
            f"completions, {stage.num_generations} per prompt): TRL drops a batch it cannot fill, so the stage would "
            f"train on nothing; set prompts to at least {needed} (a multiple of {needed} uses every prompt in every "
            "epoch), or lower the batch")
