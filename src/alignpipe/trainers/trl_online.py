"""What the ``grpo`` and ``rloo`` stages share: TRL's online trainers fed by alignpipe's task and reward plug-in.

Why so little: TRL 1.16's ``GRPOTrainer`` and ``RLOOTrainer`` already own sampling, group baselines, the KL term and
the loss, and take the same inputs (a conversational ``prompt`` dataset, reward functions, a PEFT config). A stage
only supplies the prompts, the reward (``alignpipe.rewards.plugin``: model ensemble with a penalty, gold or a
callable; less an optional missing-EOS penalty, which TRL's GRPO/RLOO lack), logging of the ensemble std beside
TRL's own metrics, a decoding free of the checkpoint's own options, the merged checkpoint, and the shared harness's
gold reward / win rate / KL at the end (the same numbers every other stage reports).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from datasets import Dataset
from transformers import GenerationConfig, PreTrainedModel, PreTrainedTokenizerBase

from alignpipe.data.synthetic import task_space
from alignpipe.data.truncation import cut_at_budget, penalise_unfinished
from alignpipe.evaluation.generation import decoding_with, end_token_ids
from alignpipe.pipeline import distributed
from alignpipe.pipeline.batching import generation_batch_prompts, too_few_prompts
from alignpipe.pipeline.stage import StageContext
from alignpipe.rewards.plugin import RewardSource, make_reward_source, trl_reward_function
from alignpipe.tasks import sample_tasks
from alignpipe.trainers.common import (
    FINAL_RECORD,
    CheckpointSideState,
    MetricsLogger,
    append_metrics,
    load_side_state,
    load_start_model,
    lora_config,
    publish_model,
    train,
    trainer_arguments,
    training_summary,
)
from alignpipe.trainers.epoch_sampling import resumable_epochs
from alignpipe.trainers.iterative import evaluate_against_start

log = logging.getLogger("alignpipe")

PROMPT_SEED_OFFSET = 1299709  # RL prompts are a stream of their own (SFT: seed, pairs: +7919, K-sets: +104729)
REWARD_STATE = "reward_source.json"  # beside each trainer checkpoint: UP-RLHF's running std mean, for --resume


def prompt_dataset(ctx: StageContext) -> Dataset:
    """``stage.prompts`` training prompts from the recipe's task, in TRL's conversational ``prompt`` format."""
    tasks = sample_tasks(ctx.stage.prompts, ctx.recipe.seed + PROMPT_SEED_OFFSET, task_space(ctx.recipe.data))
    return Dataset.from_list([{"prompt": [{"role": "user", "content": task.prompt}]} for task in tasks])


def check_prompts(stage, world_size: int) -> None:
    """Stop before any model loads when the stage's prompts cannot fill one generation batch on ``world_size``
    processes (the recipe check assumed one), and say how many each epoch leaves out when they are not a multiple
    of it: TRL's sampler draws whole batches only (:func:`~alignpipe.pipeline.batching.too_few_prompts`)."""
    if (problem := too_few_prompts(stage, world_size)) is not None:
        raise ValueError(f"stages.{stage.name}.prompts: {problem}")
    per_batch = generation_batch_prompts(stage, world_size)
    if left_out := stage.prompts % per_batch:
        log.info("[%s] %d of the %d prompts are left out of each epoch (another %d, shuffled, each time): TRL "
                 "samples whole generation batches of %d prompts; a multiple of %d uses them all", stage.name,
                 left_out, stage.prompts, left_out, per_batch, per_batch)


def token_ids_only(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> GenerationConfig:
    """A generation config holding nothing but the special token ids (the model's, else the tokenizer's): what the
    trainer's sampling may read from the model besides the options TRL sets.

    Why: TRL's GRPO/RLOO trainers pass their own sampling config (temperature, top-p/k, length), and transformers
    fills every option it leaves unset from ``model.generation_config``: a checkpoint's minimum length, banned n-grams
    or suppressed tokens would shape the training samples, off the policy the loss assumes and unlike the evaluation's
    samples, which ignore them too (:func:`~alignpipe.evaluation.generation.decoding_with`). The eos ids are every
    sampler's end ids (:func:`~alignpipe.evaluation.generation.end_token_ids`): TRL ends a completion at each id this
    config declares, and a chat template's end of turn that the model does not declare must end it too."""
    own = model.generation_config
    ids = {key: getattr(own, key) if getattr(own, key) is not None else getattr(tokenizer, key)
           for key in ("pad_token_id", "bos_token_id")}
    return GenerationConfig(eos_token_id=end_token_ids(model, tokenizer), **ids)


class OnlineReward:
    """The plug-in as a TRL reward function, less ``missing_eos_penalty`` for completions cut at the budget.

    Why a class: the end-of-sequence ids that decide a cut are the trainer's (``eos_token_ids``, read from the model
    once TRL has built it), and the ensemble std goes through TRL's ``log_metric`` hook, passed at each call; both
    arrive after the function is handed to TRL. The std and the share of completions penalised are averaged over
    processes and logged with ``reward``/``kl`` (and reach ``metrics.jsonl`` through the trainer)."""

    def __init__(self, source: RewardSource, missing_eos_penalty: float | None = None):
        self._log: Callable[[str, float], None] | None = None
        self._score = trl_reward_function(source, lambda std: self._log_metric("rewards/ensemble_std", std))
        self.__name__ = self._score.__name__  # TRL names the reward's metrics after it
        self.missing_eos_penalty = missing_eos_penalty
        self.end_ids: frozenset[int] | None = None  # end-of-sequence and padding ids: set by :meth:`use_ends_of`

    def use_ends_of(self, trainer: Any, tokenizer: PreTrainedTokenizerBase) -> None:
        """Take the ids that end a completion from ``trainer`` (TRL's GRPO/RLOO ``eos_token_ids``), plus padding."""
        self.end_ids = frozenset([*trainer.eos_token_ids, tokenizer.pad_token_id])

    def _log_metric(self, name: str, value: float) -> None:
        if self._log is not None:
            self._log(name, value)

    def __call__(self, prompts, completions, **kwargs) -> list[float]:
        if kwargs.get("log_metric") is not None:
            self._log = kwargs["log_metric"]
        rewards = self._score(prompts, completions, **kwargs)
        if self.missing_eos_penalty is None:
            return rewards
        if self.end_ids is None or kwargs.get("completion_ids") is None:
            raise RuntimeError("missing_eos_penalty needs the completions' token ids and the trainer's end ids "
                               "(OnlineReward.use_ends_of)")
        unfinished = cut_at_budget(kwargs["completion_ids"], self.end_ids)
        self._log_metric("rewards/missing_eos_penalised", sum(unfinished) / len(unfinished))
        return penalise_unfinished(rewards, unfinished, self.missing_eos_penalty)


def run_online(ctx: StageContext, trainer_class: type, config_class: type, **method_arguments: Any) -> dict:
    """Train the stage's policy with ``trainer_class`` (TRL), publish it merged, then evaluate it on held-out prompts.
    ``method_arguments`` are the method's own ``config_class`` settings (GRPO's ``loss_type``)."""
    stage, recipe = ctx.stage, ctx.recipe
    check_prompts(stage, distributed.world_size())
    model, tokenizer = load_start_model(ctx)
    reward_path = ctx.inputs[stage.inputs[1]] if len(stage.inputs) == 2 else None
    source = make_reward_source(stage.reward, reward_path, dtype=recipe.model.dtype, device=ctx.device)
    if (saved := load_side_state(ctx.resume_from, REWARD_STATE)) is not None:
        source.load_state_dict(saved)
    args = config_class(**trainer_arguments(ctx), num_generations=stage.num_generations, beta=stage.beta,
                        max_completion_length=stage.max_completion_length, temperature=stage.temperature,
                        mask_truncated_completions=stage.mask_truncated_completions,
                        disable_dropout=stage.disable_dropout, **method_arguments)
    # The checkpoint's own generation config comes back before publishing: the published one keeps its file.
    with decoding_with(model, token_ids_only(model, tokenizer)):
        reward = OnlineReward(source, stage.missing_eos_penalty)
        trainer = resumable_epochs(trainer_class)(
            model=model, reward_funcs=reward, args=args, train_dataset=prompt_dataset(ctx),
            processing_class=tokenizer, peft_config=lora_config(ctx),
            callbacks=[CheckpointSideState(REWARD_STATE, source.state_dict), MetricsLogger(ctx.dir.metrics)],
        )
        reward.use_ends_of(trainer, tokenizer)
        train(trainer, ctx, ctx.resume_from)
    publish_model(trainer, tokenizer, ctx)
    summary = training_summary(trainer)
    rewards = [entry["reward"] for entry in trainer.state.log_history if "reward" in entry]
    summary.update(first_reward=rewards[0] if rewards else None, final_reward=rewards[-1] if rewards else None)
    if not ctx.is_main_process:
        return summary
    evaluation = evaluate_policy(ctx, ctx.dir.checkpoint, source)
    append_metrics(ctx.dir.metrics, {"step": trainer.state.global_step, FINAL_RECORD: True, **evaluation})
    log.info("[%s] gold reward %.3f [%.3f, %.3f], proxy %.3f, KL to initial %.3f", ctx.dir.name,
             evaluation["gold_reward"], *evaluation["gold_reward_ci95"], evaluation["proxy_reward"],
             evaluation["kl_initial_k3"])
    return {**summary, **evaluation}


def evaluate_policy(ctx: StageContext, checkpoint: Path, source: RewardSource) -> dict:
    """The iterative stages' per-round evaluation (:func:`evaluate_against_start`), plus the proxy reward."""
    numbers, samples = evaluate_against_start(ctx, ctx.dir.name, str(checkpoint), ctx.stage.max_completion_length)
    generations = samples.generations
    scored = source([g.prompt for g in generations], [g.response for g in generations], update=False)
    return {
        **numbers,
        "proxy_reward": float(scored.proxy.mean()), "penalised_reward": float(scored.reward.mean()),
        "ensemble_std": float(scored.std.mean()) if scored.std is not None else None,
    }
