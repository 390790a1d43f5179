"""Checks of a recipe against the launch it will run under, made before any stage runs: the batch split every stage
trains with on the launch's processes (and a plan the run logs and records), ``--in-process`` with one process
only, no k-bit recipe under ZeRO-3, no full weights stepped in half precision without DeepSpeed's float32 masters.

Why apart from the runner: they read the recipe and the topology alone (no run directory, no processes), so the
runner, the dry run and the tests call them without a run.
"""

from __future__ import annotations

from alignpipe.pipeline.batching import BatchSplit, effective_batch, stage_batch_split, too_few_prompts
from alignpipe.pipeline.launch import LaunchOptions, Topology, resolve_topology, stage_topology
from alignpipe.recipe import GRPOStage, PPOStage, Recipe, RewardStage, RLOOStage, _OptimizerStage, _TrainerStage

__all__ = ["check_full_weight_precision", "check_in_process", "check_quantization_under_deepspeed",
           "default_topology", "launch_batch_split", "plan_batches"]


def default_topology() -> Topology:
    """One process on this machine: a GPU if there is one, else the CPU."""
    import torch

    visible = torch.cuda.device_count()
    return resolve_topology(LaunchOptions(gpus=1 if visible else None), visible_gpus=visible)


def check_in_process(in_process: bool, topology: Topology) -> None:
    """Refuse ``--in-process`` with more than one process: it runs each stage in this one process, so the batch split
    planned, logged and recorded for the topology's processes would not be the one trained."""
    if in_process and topology.world_size > 1:
        per_node = topology.processes_per_node
        asked = [f"--processes {per_node}" if topology.device == "cpu" else
                 f"{per_node} GPUs per node (--gpus, default: every visible one)"] + (
            [f"--nodes {topology.nodes}"] if topology.nodes > 1 else [])
        raise ValueError(f"--in-process runs every stage inside this one process, but this launch has "
                         f"{topology.world_size} processes ({', '.join(asked)}); drop --in-process, or launch one "
                         "process (--processes 1 on the CPU, --gpus 1 on GPUs, one node)")


def check_quantization_under_deepspeed(recipe: Recipe, topology: Topology) -> None:
    """Refuse a k-bit (QLoRA) recipe whose stages would run under DeepSpeed ZeRO-3, before anything runs.

    Why: sharding 4-bit weights needs ``bnb_4bit_quant_storage`` set to the compute dtype and no per-process
    ``device_map`` (PEFT's "QLoRA and DeepSpeed with ZeRO3" setup), while the loader pins each process's whole 4-bit
    copy to its GPU; under ZeRO-3 transformers refuses that load as soon as the trainer's arguments exist (an online
    stage's second round), or DeepSpeed cannot shard the weights. ZeRO-2 shards only the adapters' gradients and
    optimizer states, which is what a 4-bit base needs anyway.
    """
    if recipe.model.quantization is None:
        return
    for stage in recipe.stages:
        if stage_topology(topology, stage.type).deepspeed == "zero3":
            raise ValueError(f"stages.{stage.name}: model.quantization (QLoRA) cannot run under --deepspeed zero3, "
                             "which cannot shard this project's 4-bit weights; use --deepspeed zero2 (the 4-bit base "
                             "is small: only the LoRA gradients and optimizer states need sharding) or no --deepspeed")


def check_full_weight_precision(recipe: Recipe, topology: Topology) -> None:
    """Refuse, before anything runs, a stage that would step full weights loaded in an explicit bfloat16 or float16
    without DeepSpeed (whose optimizer keeps float32 master copies): neither transformers' ``Trainer`` nor the PPO
    loop keeps one, so most AdamW steps of about the learning rate would round away, silently. ``auto`` loads such
    weights in float32 (``models.loading.policy_dtype``). PPO is refused when the recipe loads, whatever the launch
    (it never runs under DeepSpeed)."""
    dtype = recipe.model.dtype
    if dtype not in ("bfloat16", "float16") or recipe.model.quantization is not None:
        return
    for stage in recipe.stages:
        if (isinstance(stage, _OptimizerStage) and not isinstance(stage, PPOStage) and stage.trains_full_weights
                and stage_topology(topology, stage.type).deepspeed is None):
            raise ValueError(
                f"stages.{stage.name}: trains full weights (lora: null) that model.dtype {dtype} would load and step "
                f"in {dtype}, with no float32 master copy: an AdamW step of about learning_rate is below the rounding "
                f"step of most {dtype} weights, so they would barely move, silently. Set model.dtype: auto (full "
                f"weights load in float32, the trainer computes in bf16 where supported), train a lora block, or "
                "run under --deepspeed (its optimizer keeps float32 masters)")


def launch_batch_split(stage, world_size: int) -> BatchSplit | None:
    """The batch split ``stage`` trains with on ``world_size`` processes; None where that does not depend on the
    process count (PPO's rollouts, the reward ensemble, stages that do not train)."""
    if isinstance(stage, _TrainerStage):
        return stage_batch_split(stage, world_size)
    if isinstance(stage, RewardStage) and stage.implementation == "trl":  # TRL's batch is per process
        per_device = stage.per_device_train_batch_size
        return BatchSplit(effective_batch(per_device, 1, world_size), world_size, per_device, 1)
    return None


def plan_batches(recipe: Recipe, world_size: int) -> dict[str, str]:
    """Check every stage's batch sizes against the world size before anything runs; a description per stage.

    Raises a ``ValueError`` naming the stage, the field and a fix when a batch does not split over the processes, or
    when a grpo/rloo stage's prompts cannot fill one generation batch on them.
    """
    plan = {}
    for stage in recipe.stages:
        if isinstance(stage, PPOStage):
            for field in ("rollout_batch_size", "mini_batch_size"):
                value = getattr(stage, field)
                if value % world_size:
                    raise ValueError(f"stages.{stage.name}.{field}: {value} does not split over {world_size} "
                                     f"processes; use a multiple of {world_size} or change the process count")
            plan[stage.name] = (f"{stage.rollout_batch_size} prompts per rollout, minibatches of "
                                f"{stage.mini_batch_size}, over {world_size} process(es)")
        elif (split := launch_batch_split(stage, world_size)) is not None:
            if isinstance(stage, GRPOStage | RLOOStage) and (problem := too_few_prompts(stage, world_size)):
                raise ValueError(f"stages.{stage.name}.prompts: {problem}")
            plan[stage.name] = split.describe() + (" (a trl reward stage's per_device_train_batch_size is per "
                                                   "process)" if isinstance(stage, RewardStage) else "")
    return plan
