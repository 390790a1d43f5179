"""The ``ppo`` stage: PPO with a critic and uncertainty-penalised rewards (ALGORITHMS.md §6, UP-RLHF §3).

Written by hand because TRL 1.16 has no PPO trainer. Read top to bottom, one iteration is:

1. **rollout**: sample one response per prompt from the policy (pinned sampling: temperature, top-k 0, top-p 1);
2. **score**: the reward plug-in (``alignpipe.rewards.plugin``: a reward ensemble with its penalty mode, the gold
   reward, or a callable) -> clip to ±c, missing-EOS penalty, optional running normalisation;
3. **old quantities** (no grad): policy and reference per-token log-probs, critic values;
4. **advantages**: per-token KL rewards ``−β·KL_t`` plus the score on the last token, GAE(γ, λ), whitening;
5. **update**: ``ppo_epochs`` passes over shuffled minibatches of clipped policy loss + ``vf_coef`` × clipped value
   loss (+ UP-RLHF's squared-log-ratio KL loss with ``kl_loss_coef``);
6. **KL controller** update (adaptive, Ziegler et al., or fixed), metrics, held-out evaluation every ``eval_every``
   iterations (gold and proxy reward vs KL: the over-optimisation curve), a resumable state every ``save_steps``.

The maths is in ``alignpipe.losses.ppo`` (pure, hand-tested); the model layout in ``alignpipe.trainers.actor_critic``.

Data parallel under ``accelerate launch`` (``alignpipe.pipeline.distributed``): every rank holds a replica of the
actor-critic AND of the reward source (each scores its own rollouts; no reward server), takes its contiguous share
of each iteration's prompts and samples with its own seed. What must be global is reduced across ranks: the score
normalisation's running moments, the advantage whitening statistics, the KL fed to the controller, the gradients
(averaged before clipping, so replicas stay identical) and the logged statistics. ``rollout_batch_size`` and
``mini_batch_size`` are global and must divide by the world size. Held-out evaluation is computed by every rank (same
prompts, same seed) and written by rank 0. DeepSpeed does not wrap this loop (``--deepspeed`` runs it as DDP).
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from alignpipe.data.synthetic import evaluation_tasks, task_space
from alignpipe.evaluation.best_of_n import fit_measured, fit_rl
from alignpipe.evaluation.generation import GenerationSettings, generate, render_prompts
from alignpipe.evaluation.metrics import kl_k1, mean_with_ci, sequence_kl_k3
from alignpipe.io import atomic_write_json
from alignpipe.losses.ppo import (
    AdaptiveKLController,
    FixedKLController,
    clipped_policy_loss,
    clipped_value_loss,
    entropy_from_logits,
    explained_variance,
    gae,
    kl_penalty_rewards,
    masked_mean,
    masked_moments,
    masked_whiten,
    sequence_scores,
    squared_log_ratio_loss,
    token_rewards,
    whiten_from_moments,
)
from alignpipe.models.loading import load_tokenizer
from alignpipe.models.quantization import merge_dtype
from alignpipe.pipeline import distributed
from alignpipe.pipeline.rundir import publish_directory
from alignpipe.pipeline.stage import StageContext
from alignpipe.rewards.plugin import RewardSource, make_reward_source
from alignpipe.seeds import EVAL_SEED
from alignpipe.tasks import gold_reward, sample_tasks
from alignpipe.trainers.actor_critic import ActorCritic, RolloutTensors, response_logprobs
from alignpipe.trainers.common import append_metrics, load_policy, lora_config

log = logging.getLogger("alignpipe")


@dataclass
class RunningMoments:
    """Running mean and variance of sequence scores (Chan et al. parallel update), for reward normalisation."""

    count: float = 0.0
    mean: float = 0.0
    var: float = 1.0

    def update(self, x: torch.Tensor) -> None:
        if distributed.is_distributed():  # the moments of the whole rollout batch, over every rank's scores
            total, total_sq, n = distributed.all_reduce_sum(masked_moments(x, torch.ones_like(x))).tolist()
            mean = total / n
            self.combine(n, mean, max(total_sq / n - mean * mean, 0.0))
            return
        self.combine(x.numel(), float(x.mean()), float(x.var(correction=0)))

    def combine(self, n: float, mean: float, var: float) -> None:
        total = self.count + n
        delta = mean - self.mean
        self.var = (self.count * self.var + n * var + delta**2 * self.count * n / total) / total
        self.mean += delta * n / total
        self.count = total

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / math.sqrt(self.var + 1e-8)


@dataclass
class Rollout:
    batch: RolloutTensors
    logp: torch.Tensor
    ref_logp: torch.Tensor
    values: torch.Tensor
    advantages: torch.Tensor
    returns: torch.Tensor
    stats: dict[str, float]


def minibatch_backward(model: ActorCritic, batch: RolloutTensors, old_logp, ref_logp, old_values, advantages,
                       returns, settings, *, where: str = "") -> dict[str, float]:
    """Backpropagate one minibatch's PPO loss: the policy terms first, then the value term.

    Two backward passes instead of one: the policy forward's activations are freed before the critic's forward, so
    a PPO update holds one forward's activations at a time, as an SFT step does. The gradients are the same, since
    the policy and the critic train disjoint parameters. Non-finite losses raise before any optimizer step (and
    non-finite gradients in :func:`clipped_step`).
    ``settings`` carries ``clip_range``, ``clip_range_value``, ``vf_coef``, ``kl_loss_coef`` and the sampling
    ``temperature`` (a PPO stage config).
    """
    mask = batch.response_mask
    logp, logits = response_logprobs(model.policy_logits(batch), batch, settings.temperature)
    policy_loss, policy_stats = clipped_policy_loss(logp, old_logp, advantages, mask, settings.clip_range)
    loss = policy_loss
    if settings.kl_loss_coef:
        loss = loss + settings.kl_loss_coef * squared_log_ratio_loss(logp, ref_logp, mask)
    _require_finite(loss, "policy loss", where)
    loss.backward()
    entropy = entropy_from_logits(logits.detach(), mask)
    del logp, logits, loss

    values = model.values(batch)
    value_loss, value_stats = clipped_value_loss(values, old_values, returns, mask, settings.clip_range_value)
    _require_finite(value_loss, "value loss", where)
    (settings.vf_coef * value_loss).backward()
    stats = {"loss/policy": policy_loss, "loss/value": value_loss, "policy/clip_fraction": policy_stats["clip_fraction"],
             "policy/approx_kl": policy_stats["approx_kl"], "value/clip_fraction": value_stats["clip_fraction"],
             "policy/entropy": entropy}
    return {key: float(torch.as_tensor(value).detach()) for key, value in stats.items()}


def _require_finite(values: torch.Tensor, name: str, where: str, advice: str = "Check the reward source, lower "
                    "learning_rate, or clip rewards (reward_clip)", *, same_on_every_process: bool = False) -> None:
    """Stop on NaN/Inf losses, rewards, advantages or gradients before they reach an optimizer step (the last saved
    state stays the last good one). With several processes every one stops together: one that stopped alone would
    leave the others waiting in their next collective. ``same_on_every_process`` (numbers reduced over the processes
    already) spares the collective that agrees on it."""
    bad_here = not bool(torch.isfinite(values).all())
    bad_anywhere = bad_here
    if distributed.is_distributed() and not same_on_every_process:
        bad_anywhere = bool(distributed.all_reduce_sum(torch.tensor([float(bad_here)])).item() > 0)
    if not bad_anywhere:
        return
    found = f"({values[~torch.isfinite(values)].flatten()[:3].tolist()})" if bad_here else "on another process"
    raise FloatingPointError(f"PPO {name} is not finite {found} at {where}; stopping before the optimizer step (the "
                             f"last saved state under trainer/ is intact). {advice}")


def clipped_step(parameters, optimizer: torch.optim.Optimizer, max_grad_norm: float, where: str) -> None:
    """Clip the gradients' norm to ``max_grad_norm`` and step, unless the norm is not finite.

    Why check the gradients as well as the losses: a finite loss can still have a NaN gradient (a masked-out slot
    whose ``exp`` overflowed contributes 0 to the loss but 0 * inf to its backward pass), and one such step writes
    NaN into every weight. The losses are checked first, so a non-finite norm comes with finite losses."""
    parameters = list(parameters)
    norm = torch.nn.utils.clip_grad_norm_(parameters, max_grad_norm)
    _require_finite(norm, "gradient norm", where, "The losses were finite, so a number inside the model overflowed "
                    "in the backward pass: lower learning_rate, or load the model in float32 (model.dtype)",
                    same_on_every_process=True)  # the gradients were averaged over the processes
    optimizer.step()


class PPOLoop:
    """State and steps of one PPO stage (kept as an object so resume restores exactly this state)."""

    def __init__(self, ctx: StageContext):
        self.ctx, self.stage, self.recipe = ctx, ctx.stage, ctx.recipe
        torch.manual_seed(self.recipe.seed)
        self.device = ctx.device
        self.tokenizer = load_tokenizer(ctx.start_model)
        model = load_policy(ctx, ctx.start_model)
        self.model = ActorCritic(model, lora_config=lora_config(ctx), critic=self.stage.critic).to(self.device).eval()
        self.optimizer = torch.optim.AdamW(self.model.trainable_parameters(), lr=self.stage.learning_rate,
                                           betas=(0.9, 0.95), weight_decay=self.stage.weight_decay)
        reward_path = ctx.inputs[self.stage.inputs[1]] if len(self.stage.inputs) > 1 else None
        self.reward: RewardSource = make_reward_source(self.stage.reward, reward_path, dtype=self.recipe.model.dtype,
                                                       device=self.device)
        s = self.stage
        self.kl = (AdaptiveKLController(s.kl_coef, s.kl_target, s.kl_horizon) if s.kl_target
                   else FixedKLController(s.kl_coef))
        self.score_moments = RunningMoments()
        self.step = 0
        self.eval_prompts = [t.prompt for t in evaluation_tasks(self.recipe.data, s.eval_prompts, EVAL_SEED)]

    # --- 1-4: rollout --------------------------------------------------------------------------------------------

    def _prompts(self) -> list[str]:
        """This rank's share of the iteration's prompts (all of them in one process)."""
        seed = self.recipe.seed * 100_003 + self.step + 1
        prompts = [t.prompt for t in sample_tasks(self.stage.rollout_batch_size, seed, task_space(self.recipe.data))]
        return distributed.shard(prompts, what="rollout prompts (rollout_batch_size)")

    def _sample(self, prompts: list[str], seed: int):
        settings = GenerationSettings(max_new_tokens=self.stage.max_new_tokens, temperature=self.stage.temperature,
                                      top_p=1.0, batch_size=len(prompts), seed=seed)
        with self.model.generating() as policy:
            return generate(policy, self.tokenizer, prompts, settings, desc="rollout")

    def _tensors(self, generations) -> RolloutTensors:
        rendered = render_prompts(self.tokenizer, [g.prompt for g in generations])
        prompt_ids = [self.tokenizer(t, add_special_tokens=False)["input_ids"] for t in rendered]
        return RolloutTensors.build(prompt_ids, [list(g.response_ids) for g in generations],
                                    self.tokenizer.pad_token_id, device=self.device)

    def rollout(self) -> Rollout:
        s = self.stage
        seed = self.recipe.seed * 1_000_003 + self.step + distributed.rank() * 7_919_993  # own samples per rank
        generations = self._sample(self._prompts(), seed=seed)
        generations = [g for g in generations if g.response_ids] or generations  # an empty response has no token
        prompts, responses = [g.prompt for g in generations], [g.response for g in generations]
        scored = self.reward(prompts, responses)
        _require_finite(scored.reward, "reward", f"iteration {self.step}")
        truncated = torch.tensor([float(g.truncated) for g in generations])
        score = sequence_scores(scored.reward, truncated, clip=s.reward_clip, missing_eos_penalty=s.missing_eos_penalty,
                                normalise=self._whiten if s.whiten_rewards else None)

        batch = self._tensors(generations)
        with torch.no_grad():
            logp, _ = response_logprobs(self.model.policy_logits(batch), batch, s.temperature)
            ref_logp, _ = response_logprobs(self.model.reference_logits(batch), batch, s.temperature)
            values = self.model.values(batch)
        mask = batch.response_mask
        kl_rewards = kl_penalty_rewards(logp, ref_logp, mask, self.kl.value, kind=s.kl_estimator)
        rewards = token_rewards(score.to(self.device), kl_rewards, mask)
        advantages, returns = gae(rewards, values, mask, s.gamma, s.lam)
        if distributed.is_distributed():  # whiten with the statistics of the global rollout batch
            advantages = whiten_from_moments(advantages, mask,
                                             distributed.all_reduce_sum(masked_moments(advantages, mask)))
        else:
            advantages = masked_whiten(advantages, mask)
        _require_finite(advantages, "advantage", f"iteration {self.step}")
        kl_sequence = ((logp - ref_logp) * mask).sum(1)
        gold = torch.tensor([gold_reward(p, r) for p, r in zip(prompts, responses)])
        stats = {
            "reward/proxy": float(scored.proxy.mean()), "reward/penalised": float(scored.reward.mean()),
            "reward/penalty": float(scored.penalty.mean()), "reward/score": float(score.mean()),
            "reward/gold": float(gold.mean()), "kl": float(kl_sequence.mean()), "kl_coef": self.kl.value,
            "response_length": float(mask.sum(1).mean()), "no_eos_fraction": float(truncated.mean()),
        }
        if scored.std is not None:
            stats["reward/ensemble_std"] = float(scored.std.mean())
        return Rollout(batch, logp, ref_logp, values, advantages, returns, distributed.all_reduce_mean(stats))

    def _whiten(self, score: torch.Tensor) -> torch.Tensor:
        """Reward normalisation: fold this batch into the running moments, then standardise it with them."""
        self.score_moments.update(score)
        return self.score_moments.normalise(score)

    # --- 5: update -----------------------------------------------------------------------------------------------

    def update(self, rollout: Rollout) -> dict[str, float]:
        s = self.stage
        n = rollout.batch.input_ids.shape[0]
        mini_batch = s.mini_batch_size // distributed.world_size()  # this rank's share of each global minibatch
        order = torch.Generator().manual_seed(self.recipe.seed * 7919 + self.step)
        totals: dict[str, list[float]] = {}
        for _ in range(s.ppo_epochs):
            permutation = torch.randperm(n, generator=order)
            for start in range(0, n, mini_batch):
                index = permutation[start:start + mini_batch]
                batch = rollout.batch.select(index)
                self.optimizer.zero_grad(set_to_none=True)
                step_stats = minibatch_backward(
                    self.model, batch, rollout.logp[index], rollout.ref_logp[index], rollout.values[index],
                    rollout.advantages[index], rollout.returns[index], s, where=f"iteration {self.step}")
                distributed.average_gradients(self.model.trainable_parameters())
                clipped_step(self.model.trainable_parameters(), self.optimizer, s.max_grad_norm,
                             f"iteration {self.step}")
                for key, value in step_stats.items():
                    totals.setdefault(key, []).append(value)
        stats = {key: sum(v) / len(v) for key, v in totals.items()}
        stats["value/explained_variance"] = float(explained_variance(rollout.values, rollout.returns,
                                                                     rollout.batch.response_mask))
        stats["value/mean"] = float(masked_mean(rollout.values, rollout.batch.response_mask))
        return distributed.all_reduce_mean(stats)

    def iteration(self) -> dict:
        rollout = self.rollout()
        stats = {**rollout.stats, **self.update(rollout)}
        self.kl.update(rollout.stats["kl"], n_steps=self.stage.rollout_batch_size)  # the global batch's mean KL
        self.step += 1
        return {"step": self.step, **stats}

    # --- 6: evaluation, state ------------------------------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Held-out gold reward, the reward optimised (penalised, named by its penalty) beside the raw proxy, and KL
        to the reference: one point of the over-optimisation curve."""
        generations = self._sample(self.eval_prompts, seed=EVAL_SEED)
        prompts, responses = [g.prompt for g in generations], [g.response for g in generations]
        gold = [gold_reward(p, r) for p, r in zip(prompts, responses)]
        scored = self.reward(prompts, responses, update=False)
        kept = [g for g in generations if g.response_ids]
        batch = self._tensors(kept)
        logp, _ = response_logprobs(self.model.policy_logits(batch), batch, self.stage.temperature)
        ref_logp, _ = response_logprobs(self.model.reference_logits(batch), batch, self.stage.temperature)
        mask = batch.response_mask
        policy_logps, reference_logps = (logp * mask).sum(1).tolist(), (ref_logp * mask).sum(1).tolist()
        kl = float(kl_k1(policy_logps, reference_logps).mean())  # the harness's estimators (k3 summed per token)
        kl_k3 = float(sequence_kl_k3([row[m.bool()].tolist() for row, m in zip(logp, mask)],
                                     [row[m.bool()].tolist() for row, m in zip(ref_logp, mask)]).mean())
        gold_metric = mean_with_ci(gold, higher_is_better=True, resamples=1000, seed=0)
        return {
            "eval_step": self.step, "gold_reward": gold_metric.value, "gold_reward_ci95": list(gold_metric.ci95),
            "proxy_reward": float(scored.proxy.mean()), "penalised_reward": float(scored.reward.mean()),
            "reward_penalty": self.stage.reward.penalty, "reward_penalty_coef": self.stage.reward.penalty_coef,
            "kl": kl, "kl_k3": kl_k3, "sqrt_kl": math.sqrt(max(kl, 0.0)),
            "no_eos_fraction": sum(g.truncated for g in generations) / len(generations),
        }

    def save_state(self, directory: Path) -> None:
        """Everything exact resume needs, written into ``directory``: trainable weights, optimizer, KL controller,
        running statistics, step (``StageDir.save_trainer_checkpoint`` stages, publishes and records it)."""
        trainable = {f"p{i}": p.detach().contiguous() for i, p in enumerate(self.model.trainable_parameters())}
        save_file(trainable, directory / "trainable.safetensors")
        torch.save(self.optimizer.state_dict(), directory / "optimizer.pt")
        atomic_write_json(directory / "ppo_state.json", {
            "step": self.step, "kl": self.kl.state_dict(), "reward": self.reward.state_dict(),
            "score_moments": vars(self.score_moments),
        })
        atomic_write_json(directory / "trainer_state.json", {"global_step": self.step})

    def load_state(self, directory: Path) -> None:
        weights = load_file(directory / "trainable.safetensors")
        with torch.no_grad():
            for i, p in enumerate(self.model.trainable_parameters()):
                p.copy_(weights[f"p{i}"])
        # to the CPU first: load_state_dict moves each state to its parameter's device
        self.optimizer.load_state_dict(torch.load(directory / "optimizer.pt", map_location="cpu", weights_only=True))
        state = json.loads((directory / "ppo_state.json").read_text())
        self.step = state["step"]
        self.kl.load_state_dict(state["kl"])
        self.reward.load_state_dict(state["reward"])
        self.score_moments = RunningMoments(**state["score_moments"])


def _evaluations(metrics: Path, last_step: int) -> list[dict]:
    """Held-out evaluation records of this run (a resumed run's earlier ones included; re-done steps once)."""
    by_step = {}
    for line in metrics.read_text().splitlines():
        record = json.loads(line)
        if "eval_step" in record and record["eval_step"] <= last_step:
            by_step[record["eval_step"]] = record
    return [by_step[k] for k in sorted(by_step)]


def run(ctx: StageContext) -> dict:
    stage = ctx.stage
    main = distributed.is_main()
    loop = PPOLoop(ctx)
    if ctx.resume_from is not None:
        loop.load_state(ctx.resume_from)
        if main:  # the iterations after the restored state are about to be redone
            ctx.dir.keep_metrics(lambda r: r.get("step", r.get("eval_step", 0)) <= loop.step)
        log.info("[%s] resumed PPO at iteration %d", ctx.dir.name, loop.step)
    record_metrics = (lambda record: append_metrics(ctx.dir.metrics, record)) if main else (lambda record: None)
    if loop.step == 0:
        record_metrics(loop.evaluate())
    started = time.time()
    progress = tqdm(total=stage.total_steps, initial=loop.step, desc=f"[{ctx.dir.name}] PPO", disable=not main)
    while loop.step < stage.total_steps:
        record = loop.iteration()
        record_metrics(record)
        progress.update(1)
        progress.set_postfix(gold=f"{record['reward/gold']:.3f}", proxy=f"{record['reward/proxy']:.3f}",
                             kl=f"{record['kl']:.2f}")
        if loop.step % stage.eval_every == 0 or loop.step == stage.total_steps:
            evaluation = loop.evaluate()
            record_metrics(evaluation)
            log.info("[%s] iteration %d: held-out gold %.3f, proxy %.3f, KL %.2f", ctx.dir.name, loop.step,
                     evaluation["gold_reward"], evaluation["proxy_reward"], evaluation["kl"])
        if loop.step % stage.save_steps == 0 and loop.step < stage.total_steps:
            if main:
                ctx.dir.save_trainer_checkpoint(loop.step, loop.save_state, keep=stage.save_total_limit)
            distributed.barrier()
    progress.close()
    distributed.barrier()
    if not main:
        return {"iterations": loop.step}

    staging = ctx.dir.checkpoint.with_name("checkpoint.tmp")
    shutil.rmtree(staging, ignore_errors=True)
    quantization = ctx.recipe.model.quantization
    policy = loop.model.merged_policy(
        full_precision_base=ctx.start_model if quantization else None, dtype=merge_dtype(quantization),
        workdir=ctx.dir.root)
    policy.save_pretrained(staging, safe_serialization=True)
    loop.tokenizer.save_pretrained(staging)
    publish_directory(staging, ctx.dir.checkpoint)
    evaluations = _evaluations(ctx.dir.metrics, loop.step)
    peak = max(evaluations, key=lambda e: e["gold_reward"])
    return {"iterations": loop.step, "wall_time_s": round(time.time() - started, 1),
            "world_size": distributed.world_size(),
            "final": evaluations[-1], "peak_gold": {k: peak[k] for k in ("eval_step", "gold_reward", "kl")},
            "gao_rl_fit": _gao_fit(evaluations)}


def _gao_fit(evaluations: list[dict]) -> dict | None:
    """Gao et al.'s RL form ``R(d) = d(α − β log d)`` on gold gain over the first evaluation vs d = √KL (§15a), on
    the later evaluations; None unless they give ``MIN_FIT_POINTS`` distinct d > 0 (:func:`fit_measured`, the rule
    the report draws its fit by)."""
    later = evaluations[1:]
    fit, _ = fit_measured(fit_rl, [e["sqrt_kl"] for e in later],
                          [e["gold_reward"] - evaluations[0]["gold_reward"] for e in later])
    if fit is None:
        return None
    return {"alpha": fit.alpha, "beta": fit.beta, "peak_sqrt_kl": _finite(fit.peak_d), "peak_gain": _finite(fit.peak_r)}


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None
