"""The stage types that optimise or rank by a reward plug-in, and the final evaluation: ``_RewardedStage``
(inputs [policy] or [policy, reward stage] and a ``reward:`` block), ``ppo`` (its own loop), ``bon``, the TRL
group-RL stages ``grpo`` and ``rloo`` (``_GroupRLStage``), and ``eval``, which samples checkpoints on held-out prompts.
Apart from the offline and online families because they read a reward plug-in or score with the gold reward rather
than train on pairs."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from alignpipe.pipeline.batching import too_few_prompts
from alignpipe.recipe.errors import _problem, did_you_mean
from alignpipe.recipe.specs import LoraSpec, RewardSpec
from alignpipe.recipe.stage_base import MAX_SEED, _OptimizerStage, _StageBase, _TrainerStage
from alignpipe.seeds import EVAL_SEED


class _RewardedStage(_StageBase):
    """A stage that optimises or ranks by a reward plug-in: inputs are [policy] or [policy, reward stage]."""

    reward: RewardSpec = Field(default_factory=RewardSpec, description="The reward to optimise (plug-in).")

    @field_validator("inputs")
    @classmethod
    def _policy_and_reward(cls, inputs: list[str]) -> list[str]:
        if len(inputs) not in (1, 2):
            raise ValueError(f"expected [<policy stage>] or [<policy stage>, <reward stage>], got {inputs}")
        return inputs

    @model_validator(mode="after")
    def _reward_input(self) -> _RewardedStage:
        if self.reward.source == "model" and len(self.inputs) != 2:
            raise _problem((("inputs",), "reward.source: model needs 2 inputs: [<policy stage>, <reward stage>]"))
        if self.reward.source != "model" and len(self.inputs) != 1:
            raise _problem((("inputs",), f"a second input is only read with reward.source: model (source is "
                                         f"{self.reward.source!r}); drop {self.inputs[1]!r}"))
        return self


class PPOStage(_RewardedStage, _OptimizerStage):
    """PPO with a critic (Ziegler 2019; ALGORITHMS.md §6), rewards optionally penalised by ensemble uncertainty.

    Its own loop, not a transformers Trainer: AdamW at a constant learning_rate, ``total_steps`` iterations of
    ``rollout_batch_size`` prompts and ``mini_batch_size`` updates, in the model's dtype. So it has none of the Trainer
    stages' schedule, batch, length or precision fields; ``replaced_keys`` says what to set instead of each.
    """

    replaced_keys: ClassVar[dict[str, str]] = {
        **dict.fromkeys(("lr_scheduler_type", "warmup_ratio"), "not read by a ppo stage, which trains at a constant "
                        "learning_rate (AdamW, no schedule or warmup); remove it"),
        **dict.fromkeys(("max_steps", "num_train_epochs"), "not read by a ppo stage, which runs total_steps "
                        "iterations (a rollout, then ppo_epochs passes over it); set total_steps instead"),
        **dict.fromkeys(("per_device_train_batch_size", "gradient_accumulation_steps", "global_batch_size"),
                        "not read by a ppo stage, which samples rollout_batch_size prompts per iteration and takes "
                        "one optimizer step per mini_batch_size responses (both counted over all processes); set "
                        "those instead"),
        "logging_steps": "not read by a ppo stage, which logs every iteration to metrics.jsonl and evaluates on "
                         "held-out prompts every eval_every iterations; remove it (or set eval_every)",
        "max_length": "not read by a ppo stage: prompts come whole from the recipe's task and max_new_tokens bounds "
                      "each response; remove it (or set max_new_tokens)",
        "bf16": "not read by a ppo stage, which computes in the dtype the policy is loaded in (no mixed precision); "
                "remove it and set model.dtype instead",
        "gradient_checkpointing": "not read by a ppo stage, which keeps one forward's activations at a time by "
                                  "backpropagating policy and critic separately; remove it",
    }

    type: Literal["ppo"] = Field("ppo", description="Stage type: proximal policy optimisation (own loop).")
    learning_rate: float = Field(
        1e-5, gt=0, description="Policy and critic learning rate, constant (trlx-style default)."
    )
    lora: LoraSpec | None = Field(
        default_factory=LoraSpec, description="Policy LoRA: the reference is the same base with adapters off (one "
        "copy of the base weights); null = full fine-tuning with a frozen reference copy (model.dtype auto or float32: "
        "full weights load in float32).",
    )
    critic: Literal["adapter", "model"] = Field(
        "adapter", description="adapter = a value head on its own LoRA adapter over the policy's base (needs lora); "
        "model = a separate copy of the start model with a value head (full weights: model.dtype auto or float32).",
    )
    total_steps: int = Field(100, gt=0, description="PPO iterations: rollout -> reward -> GAE -> ppo_epochs updates.")
    rollout_batch_size: int = Field(64, gt=0, description="Prompts sampled per iteration (one response each).")
    mini_batch_size: int = Field(16, gt=0, description="Responses per optimizer step in the PPO epochs.")
    ppo_epochs: int = Field(4, gt=0, description="Passes over each rollout batch (§6c: 4).")
    max_new_tokens: int = Field(24, gt=0, description="Generation budget (tiny-model setting).")
    temperature: float = Field(
        1.0, gt=0, description="Sampling temperature (§6b: 1, top-k 0, top-p 1). The ratio and the KL use the same "
        "tempered distribution, softmax(logits / T), so with T != 1 the KL is KL(pi_T || pi_ref,T).",
    )
    kl_coef: float = Field(
        0.05, ge=0, description="Per-token KL penalty coefficient beta_kl (with kl_target: its starting value, > 0)."
    )
    kl_target: float | None = Field(
        None, gt=0, description="Adaptive KL controller target (nats per sequence, §6a); null = fixed kl_coef.",
    )
    kl_horizon: int = Field(10000, gt=0, description="Adaptive KL controller horizon (§6c: 10000).")
    kl_estimator: Literal["k1", "k3", "abs", "mse"] = Field("k1", description="Per-token KL reward estimator.")
    kl_loss_coef: float = Field(
        0.0, ge=0, description="UP-RLHF's beta_1: KL as a separate squared-log-ratio loss (§3a); 0 = off.",
    )
    gamma: float = Field(1.0, gt=0, le=1, description="GAE discount (§6c: 1).")
    lam: float = Field(0.95, ge=0, le=1, description="GAE lambda (§6c: 0.95).")
    clip_range: float = Field(0.2, gt=0, description="Policy ratio clip epsilon (§6c: 0.2).")
    clip_range_value: float = Field(0.2, gt=0, description="Value clip epsilon (§6c: 0.2).")
    vf_coef: float = Field(0.5, ge=0, description="Value loss weight (§6c: 1; tiny-model setting 0.5).")
    reward_clip: float = Field(10.0, gt=0, description="Clip the sequence score to [-c, c] (§6c: 10), last: after "
                               "the missing-EOS penalty and the optional whitening (§6a).")
    whiten_rewards: bool = Field(
        False, description="Normalise sequence scores by a running mean/std before use (reward normalisation).",
    )
    missing_eos_penalty: float | None = Field(
        1.0, ge=0, description="Subtract this from the score of responses that never emit EOS; null = no penalty.",
    )
    eval_every: int = Field(10, gt=0, description="Evaluate gold and proxy reward and KL on held-out prompts every N "
                            "iterations (and at the end).")
    eval_prompts: int = Field(256, gt=0, description="Held-out prompts per evaluation.")

    @property
    def trains_full_weights(self) -> bool:
        """A full-fine-tuned policy or a full critic copy: weights the loop steps in the dtype they load in."""
        return self.lora is None or self.critic == "model"

    @model_validator(mode="after")
    def _critic_needs_lora(self) -> PPOStage:
        if self.critic == "adapter" and self.lora is None:
            raise _problem((("critic",), "critic: adapter puts the value head on a LoRA adapter over the policy's "
                                         "base; with full fine-tuning (lora: null) use critic: model"))
        if self.rollout_batch_size < 2:
            raise _problem((("rollout_batch_size",), "advantages are whitened over the rollout batch's response tokens "
                            "(§6a), which needs at least two; with one prompt, a response that ends at its first "
                            "token leaves one, and the run would stop there; set rollout_batch_size >= 2"))
        if self.rollout_batch_size % self.mini_batch_size:
            raise _problem((("mini_batch_size",), f"rollout_batch_size ({self.rollout_batch_size}) must be a "
                                                  f"multiple of mini_batch_size ({self.mini_batch_size})"))
        if self.kl_target is not None and self.kl_coef == 0:
            raise _problem((("kl_coef",), f"is the adaptive controller's starting value, which kl_target "
                            f"({self.kl_target:g}) only ever multiplies, so from 0 the KL penalty stays 0; set "
                            "kl_coef > 0 (e.g. 0.05), or kl_target: null for no KL penalty"))
        return self


def ppo_full_weight_problem(dtype: str) -> str:
    """Why a ppo stage that trains full weights (``lora: null`` or ``critic: model``) cannot load them in ``dtype``
    (bfloat16 or float16), and the fix."""
    return (f"lora: null and critic: model train full weights, which this ppo stage would load and step in {dtype} (it "
            "keeps no float32 master copy): an AdamW step of about learning_rate is below the rounding step of most "
            f"{dtype} weights, so they would barely move, silently; set model.dtype: auto or float32 (full weights "
            "then load in float32), or train LoRA adapters "
            "(a lora block and critic: adapter, whose adapters and value head stay in float32)")


class BoNStage(_RewardedStage):
    """Best-of-n over-optimisation curve (§15): N samples per prompt once, unbiased estimator for n = 1..N."""

    type: Literal["bon"] = Field("bon", description="Stage type: best-of-n evaluation.")
    n_samples: int = Field(32, ge=2, description="N responses sampled per prompt.")
    n_prompts: int = Field(128, gt=0, description="Held-out prompts.")
    max_new_tokens: int = Field(24, gt=0, description="Generation budget (tiny-model setting).")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature.")
    batch_size: int = Field(64, gt=0, description="Prompts per generation batch.")
    seed: int = Field(EVAL_SEED, ge=0, le=MAX_SEED, description="Sampling seed.")


class _GroupRLStage(_RewardedStage, _TrainerStage):
    """Critic-free policy gradient through TRL (GRPO, RLOO): a group of samples per prompt is its own baseline.

    ``per_device_train_batch_size`` counts completions (TRL's convention), so one optimizer step sees
    ``batch x accumulation / num_generations`` prompts. No ``max_length``: TRL 1.16's GRPO/RLOO configs truncate no
    prompts, and cutting a task prompt would change the task its reward scores; ``max_completion_length`` bounds
    what is generated.
    """

    replaced_keys: ClassVar[dict[str, str]] = {
        "max_length": "not read by grpo/rloo stages: prompts come whole from the recipe's task (TRL's GRPO and RLOO "
                      "trainers truncate none) and max_completion_length bounds each completion; remove it (or set "
                      "max_completion_length)",
    }

    learning_rate: float = Field(1e-6, gt=0, description="Peak learning rate (TRL GRPOConfig/RLOOConfig default).")
    lora: LoraSpec | None = Field(
        default_factory=LoraSpec, description="Policy LoRA: the KL reference is the same base with adapters off; "
        "null = full fine-tuning with a frozen reference copy.",
    )
    num_generations: int = Field(ge=2, description="Completions per prompt (the group each is compared with).")
    prompts: int = Field(1024, gt=0, description="Training prompts drawn from the recipe's task (tiny-model setting).")
    max_completion_length: int = Field(24, gt=0, description="Generation budget per completion (tiny-model setting; "
                                       "TRL: 512).")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature (TRL default: 1, top-k 0, top-p 1).")
    mask_truncated_completions: bool = Field(
        False, description="Leave completions cut at max_completion_length (no end-of-sequence token) out of the "
        "loss, as DAPO does (Yu et al. 2025; TRL's option, default off): their reward scores an unfinished answer as a "
        "finished one. They still count in their group's baseline (RLOO's without their KL penalty, which TRL folds "
        "into the reward over the tokens the mask keeps).",
    )
    missing_eos_penalty: float | None = Field(
        None, ge=0, description="Subtract this from the reward of completions cut at max_completion_length (no "
        "end-of-sequence token), as ppo does; null = none (TRL's GRPO/RLOO have no such penalty). With "
        "mask_truncated_completions they stay out of the loss, and the penalty lowers only their group's baseline.",
    )
    disable_dropout: bool = Field(
        True, description="Turn every dropout layer off, lora.dropout included (TRL's disable_dropout, which "
        "defaults to false in its GRPO/RLOO configs): with dropout on, completions are sampled from a randomly "
        "thinned policy and the loss's and KL's log-probs are computed under other dropout masks than the "
        "sampling's. ppo and the DPO-family stages train without dropout too.",
    )
    eval_prompts: int = Field(256, gt=0, description="Held-out prompts for the final gold/proxy evaluation.")

    @model_validator(mode="after")
    def _whole_groups(self) -> _GroupRLStage:
        if self.global_batch_size is not None:
            if self.global_batch_size % self.num_generations:
                raise _problem((("num_generations",), f"global_batch_size ({self.global_batch_size}) counts "
                                f"completions and must be a multiple of num_generations ({self.num_generations})"))
        else:
            completions = self.per_device_train_batch_size * self.gradient_accumulation_steps
            if completions % self.num_generations:
                raise _problem((("num_generations",), f"per_device_train_batch_size x gradient_accumulation_steps "
                                f"({completions}) counts completions and must be a multiple of num_generations "
                                f"({self.num_generations}), so every prompt's group is complete"))
        # One process needs the fewest prompts; the stage checks again with its launch's world size.
        if (problem := too_few_prompts(self, 1)) is not None:
            raise _problem((("prompts",), problem))
        return self


class GRPOStage(_GroupRLStage):
    """GRPO (Shao et al. 2024, DeepSeekMath) via TRL's GRPOTrainer: group-normalised advantages, KL loss term."""

    type: Literal["grpo"] = Field("grpo", description="Stage type: group relative policy optimization (TRL).")
    num_generations: int = Field(8, ge=2, description="Completions per prompt (the group; TRL default 8).")
    beta: float = Field(0.04, ge=0, description="KL-to-reference loss coefficient (DeepSeekMath: 0.04; TRL's "
                        "default 0 skips the reference).")
    loss_type: Literal["grpo", "dr_grpo", "dapo", "bnpo", "cispo", "sapo", "luspo", "vespo"] = Field(
        "dapo", description="How TRL's GRPOTrainer aggregates token losses (TRL default dapo: over every token of the "
        "batch); grpo = DeepSeekMath's per-sequence length normalisation, which favours short correct completions; "
        "luspo trains with one importance ratio per completion (GSPO's sequence level), as its paper does; cispo "
        "clips its importance weight at ScaleRL's ε_max = 5 (TRL's fallback, 0.2, cut every on-policy token).",
    )
    scale_rewards: Literal["group", "batch", "none"] = Field(
        "group", description="What each completion's reward minus its group's mean is divided by (TRL's "
        "scale_rewards): the group's std (TRL default), the batch's (PPO Lite), or nothing. Dr. GRPO is loss_type: "
        "dr_grpo with scale_rewards: none (its paper drops both the length and the std normalisation).",
    )


class RLOOStage(_GroupRLStage):
    """RLOO (Ahmadian et al. 2024) via TRL's RLOOTrainer: leave-one-out baseline, KL folded into the reward."""

    type: Literal["rloo"] = Field("rloo", description="Stage type: REINFORCE leave-one-out (TRL).")
    num_generations: int = Field(2, ge=2, description="Completions per prompt, k (RLOO paper: 2-4; TRL default 2).")
    beta: float = Field(0.05, ge=0, description="KL-to-reference penalty on the reward (TRL RLOOConfig default).")


class EvalStage(_StageBase):
    """Sample from checkpoints on held-out prompts and score them with the gold reward."""

    type: Literal["eval"] = Field("eval", description="Stage type: evaluation of earlier checkpoints.")
    reference: str | None = Field(
        None, description="Policy input that win rates and KL are measured against; null = the first policy input."
    )
    include_base: bool = Field(True, description="Also evaluate the recipe's untrained model (reported as 'base').")
    n_prompts: int = Field(256, gt=0, description="Held-out prompts to sample (tiny-model setting).")
    max_new_tokens: int = Field(24, gt=0, description="Generation budget; task answers are short (tiny-model setting).")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature; 1 = the policy's own distribution.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling (Holtzman et al. 2020); 1 = off.")
    batch_size: int = Field(64, gt=0, description="Prompts per generation batch (tiny-model setting).")
    bootstrap_resamples: int = Field(
        1000, ge=100, description="Bootstrap resamples for confidence intervals (Efron & Tibshirani 1993)."
    )
    seed: int = Field(EVAL_SEED, ge=0, le=MAX_SEED,
                      description="Sampling seed, separate from the recipe seed so evals stay comparable.")
    diversity_samples: int = Field(
        4, ge=0, description="Extra samples per prompt for within-prompt diversity (self_bleu_4, distinct_1/2_within); "
        "0 = off, else at least 2.",
    )
    diversity_prompts: int = Field(32, gt=0, description="How many of the held-out prompts get diversity_samples each.")
    proxy: str | None = Field(
        "auto", description="Reward input whose model scores every checkpoint's samples as the proxy reward "
        "(proxy_reward, its gain over the reference's and the proxy-gold gap; an ensemble adds its members' min and "
        "variance). auto = the only reward input trained on the built-in task, if there is exactly one; null = none.",
    )
    implicit_reward_pairs: int = Field(
        256, ge=0, description="Held-out synthetic pairs, ordered by the gold reward, on which every policy but the "
        "reference gets implicit_reward_accuracy: how often beta*log(pi/pi_ref) ranks the better response strictly "
        "higher (Rafailov et al. 2023; RewardBench scores DPO models this way); 0 = off.",
    )

    @field_validator("inputs")
    @classmethod
    def _at_least_one(cls, inputs: list[str]) -> list[str]:
        if not inputs:
            raise ValueError("an eval stage needs at least 1 input (the stages whose checkpoints to evaluate)")
        return inputs

    @field_validator("diversity_samples")
    @classmethod
    def _several_or_none(cls, samples: int) -> int:
        if samples == 1:
            raise ValueError("self-BLEU and distinct-n within a prompt compare its samples with each other: use 2 or "
                             "more, or 0 to leave them out")
        return samples

    @model_validator(mode="after")
    def _reference_is_input(self) -> EvalStage:
        for key, name in (("reference", self.reference), ("proxy", None if self.proxy == "auto" else self.proxy)):
            if name is not None and name not in self.inputs:
                msg = (f"{name!r} is not one of this stage's inputs{did_you_mean(name, self.inputs)}"
                       f" (inputs: {', '.join(self.inputs)})")
                raise _problem(((key,), msg))
        return self
