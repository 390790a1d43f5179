"""The shared evaluation harness: sample every checkpoint on the same held-out prompts, judge, and measure.

Used by the ``eval`` stage and by ``alignpipe eval``, so every number on a leaderboard is computed the same way:
gold reward (95 % bootstrap CI), win rate against the reference checkpoint under the pairwise gold judge (both
orders, ties 0.5), Monte-Carlo sequence KL to the reference (k1 and k3), response length and truncation rate.
"""

from __future__ import annotations

import gc
import logging
from dataclasses import dataclass
from typing import Protocol

from alignpipe.evaluation.generation import (
    Generation,
    GenerationSettings,
    generate,
    sequence_logprobs,
)
from alignpipe.evaluation.leaderboard import CheckpointResult
from alignpipe.evaluation.metrics import (
    kl_k1,
    kl_k3,
    length_stats,
    mean_with_ci,
    order_averaged_preference,
    win_rate,
)
from alignpipe.models.loading import load_causal_lm, load_tokenizer

log = logging.getLogger("alignpipe")


class Judge(Protocol):
    judge_id: str

    def score(self, prompts: list[str], responses: list[str]) -> list[float]: ...

    def pairwise_probability(self, prompt: str, response_a: str, response_b: str) -> float: ...


@dataclass(frozen=True)
class Checkpoint:
    name: str
    path: str  # local checkpoint directory or hub id
    weights_sha256: str | None = None


@dataclass(frozen=True)
class CheckpointSamples:
    checkpoint: Checkpoint
    generations: list[Generation]
    rewards: list[float]
    logp_policy: list[float]
    logp_reference: list[float]
    preferences: list[float]  # per prompt, vs the reference's response, averaged over both orders


def evaluate_checkpoints(
    checkpoints: list[Checkpoint],
    reference: Checkpoint,
    prompts: list[str],
    judge: Judge,
    settings: GenerationSettings,
    *,
    dtype: str = "auto",
    bootstrap_resamples: int = 1000,
) -> tuple[list[CheckpointResult], list[CheckpointSamples]]:
    """Evaluate ``checkpoints`` against ``reference``; the reference's own samples are the win-rate baseline.

    Models are loaded one at a time (plus the reference, which stays loaded to score every checkpoint's samples).
    """
    ref_tokenizer = load_tokenizer(reference.path)
    ref_model = load_causal_lm(reference.path, dtype=dtype)
    ref_generations = generate(ref_model, ref_tokenizer, prompts, settings, desc=f"sampling {reference.name}")
    results, all_samples = [], []
    for checkpoint in checkpoints:
        if checkpoint.path == reference.path:
            model, tokenizer, generations = ref_model, ref_tokenizer, ref_generations
        else:
            tokenizer = load_tokenizer(checkpoint.path)
            model = load_causal_lm(checkpoint.path, dtype=dtype)
            generations = generate(model, tokenizer, prompts, settings, desc=f"sampling {checkpoint.name}")
        logp_policy = sequence_logprobs(model, tokenizer, generations, batch_size=settings.batch_size)
        logp_reference = sequence_logprobs(ref_model, ref_tokenizer, generations, batch_size=settings.batch_size)
        if model is not ref_model:
            del model
            gc.collect()
        samples = _judge(checkpoint, generations, ref_generations, judge, logp_policy, logp_reference)
        results.append(CheckpointResult(
            name=checkpoint.name, path=checkpoint.path, weights_sha256=checkpoint.weights_sha256,
            metrics=checkpoint_metrics(samples, bootstrap_resamples=bootstrap_resamples, seed=settings.seed),
        ))
        all_samples.append(samples)
        log.info("[eval] %s: gold reward %.3f", checkpoint.name, results[-1].metrics["gold_reward"].value)
    return results, all_samples


def _judge(checkpoint, generations, ref_generations, judge, logp_policy, logp_reference) -> CheckpointSamples:
    prompts = [g.prompt for g in generations]
    rewards = judge.score(prompts, [g.response for g in generations])
    preferences = [
        order_averaged_preference(
            judge.pairwise_probability(g.prompt, g.response, r.response),
            judge.pairwise_probability(g.prompt, r.response, g.response),
        )
        for g, r in zip(generations, ref_generations, strict=True)
    ]
    return CheckpointSamples(checkpoint, generations, rewards, logp_policy, logp_reference, preferences)


def checkpoint_metrics(samples: CheckpointSamples, *, bootstrap_resamples: int, seed: int) -> dict:
    """Leaderboard metrics of one checkpoint from its judged samples (pure: no model, no I/O)."""
    metrics = {
        "gold_reward": mean_with_ci(samples.rewards, resamples=bootstrap_resamples, seed=seed, higher_is_better=True),
        "win_rate_vs_ref": win_rate(samples.preferences, resamples=bootstrap_resamples, seed=seed),
        "kl_ref_k1": mean_with_ci(kl_k1(samples.logp_policy, samples.logp_reference), resamples=bootstrap_resamples,
                                  seed=seed, higher_is_better=None),
        "kl_ref_k3": mean_with_ci(kl_k3(samples.logp_policy, samples.logp_reference), resamples=bootstrap_resamples,
                                  seed=seed, higher_is_better=None),
    }
    metrics.update(length_stats([len(g.response_ids) for g in samples.generations],
                                [g.truncated for g in samples.generations], resamples=bootstrap_resamples, seed=seed))
    return metrics


def sample_rows(samples: CheckpointSamples) -> list[dict]:
    """Per-sample records (JSONL) so every leaderboard number can be traced to its generations and judgments."""
    return [
        {
            "prompt": g.prompt, "response": g.response, "n_tokens": len(g.response_ids), "truncated": g.truncated,
            "gold_reward": reward, "preference_vs_ref": pref, "logp_policy": lp, "logp_reference": lr,
        }
        for g, reward, pref, lp, lr in zip(samples.generations, samples.rewards, samples.preferences,
                                           samples.logp_policy, samples.logp_reference, strict=True)
    ]
