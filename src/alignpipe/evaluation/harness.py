"""The shared evaluation harness: sample every checkpoint on the same held-out prompts, judge, and measure.

Used by the ``eval`` stage, ``alignpipe eval`` and the training-time evaluations of the iterative and online stages,
so every number on a leaderboard is computed the same way: gold reward (95 % bootstrap CI), win rate against the
reference checkpoint under the pairwise judge (both orders, ties 0.5) and its length-controlled version (from two
prompts up), the gold reward's gain over the reference's on the same prompts (R(reference) = 0), Monte-Carlo sequence KL
to the reference (k1, and k3 summed per token), the policy's entropy, response length, truncation rate, distinct-1/2
and repetition across prompts, and (with :class:`DiversitySampling`) self-BLEU-4 and distinct-2 among k samples of
one prompt. Given held-out preference ``pairs``, each checkpoint other than the reference also gets its implicit-reward
accuracy (:mod:`alignpipe.evaluation.implicit_reward`).

With an :class:`alignpipe.evaluation.cache.EvalCache`, generations and log-probabilities are looked up by content
hash first; a checkpoint whose samples and log-probs are all cached is not even loaded.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from alignpipe.evaluation.cache import EvalCache, content_key
from alignpipe.evaluation.diversity import distinct_n, mean_repetition_rate, within_prompt_diversity
from alignpipe.evaluation.generation import (
    Generation,
    GenerationSettings,
    generate,
    render_prompts,
    token_logprobs,
)
from alignpipe.evaluation.implicit_reward import implicit_margins, implicit_reward_accuracy
from alignpipe.evaluation.leaderboard import CheckpointResult
from alignpipe.evaluation.length_control import MIN_PROMPTS, length_controlled_win_rate
from alignpipe.evaluation.metrics import (
    MetricValue,
    kl_k1,
    length_delta,
    length_stats,
    mean_with_ci,
    order_averaged_preference,
    policy_entropy,
    reward_delta,
    sequence_kl_k3,
    win_rate,
)
from alignpipe.evaluation.proxy import proxy_metrics
from alignpipe.io import atomic_write_text
from alignpipe.models.loading import (
    load_causal_lm,
    load_tokenizer,
    process_device,
    remote_code_kwargs,
    resolve_dtype,
    resolve_model_location,
)
from alignpipe.tasks import TaskSpace, heldout_gold_pairs

log = logging.getLogger("alignpipe")


Proxy = Callable[[list[str], list[str]], list[list[float]]]  # (prompts, responses) -> [N, K] member rewards
Pair = tuple[str, str, str]  # (prompt, chosen, rejected): chosen is the preferred response


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
class DiversitySampling:
    """Extra samples for within-prompt diversity: ``samples_per_prompt`` responses to each of ``prompts`` held-out
    prompts spread evenly over the list, drawn apart from the main samples (their own seeds). A policy can answer
    every prompt the same way each time while its answers to different prompts still differ; only several samples of
    one prompt show it."""

    samples_per_prompt: int = 4
    prompts: int = 32

    def __post_init__(self) -> None:
        if self.samples_per_prompt < 2 or self.prompts < 1:
            raise ValueError(f"diversity sampling needs 2+ samples per prompt on 1+ prompts, got "
                             f"{self.samples_per_prompt} samples on {self.prompts} prompts")

    @classmethod
    def planned(cls, samples_per_prompt: int, prompts: int, n_prompts: int) -> DiversitySampling | None:
        """The plan a config states (``samples_per_prompt`` 0 = off) for a set of ``n_prompts`` prompts."""
        return cls(samples_per_prompt, min(prompts, n_prompts)) if samples_per_prompt else None

    def chosen(self, prompts: list[str]) -> list[str]:
        """``self.prompts`` of ``prompts`` (all, if fewer), evenly spaced over the whole list, whether or not its length
        is a multiple of theirs: data files are often ordered by source or topic (the AlpacaEval set is), so the
        first ones would all be of one kind."""
        k = min(self.prompts, len(prompts))
        return [prompts[(i * len(prompts)) // k] for i in range(k)]

    def prompts_for(self, prompts: list[str]) -> list[str]:
        """Each :meth:`chosen` prompt ``samples_per_prompt`` times in a row (one generation call)."""
        return [p for p in self.chosen(prompts) for _ in range(self.samples_per_prompt)]

    def groups(self, generations: list[Generation]) -> list[list[str]]:
        """The responses of :meth:`prompts_for`'s generations, one list per prompt."""
        k = self.samples_per_prompt
        return [[g.response for g in generations[i : i + k]] for i in range(0, len(generations), k)]


GOLD_REWARD = "gold_reward"  # the task's gold judge's reward (the embedded task's exact reward)
JUDGE_REWARD = "judge_reward"  # a learned reward model's score: a proxy, never called gold
DIVERSITY_SEED_OFFSET = 1_000_003  # the diversity samples' batches are seeded apart from the main samples' ones


@dataclass(frozen=True)
class CheckpointSamples:
    checkpoint: Checkpoint
    generations: list[Generation]
    rewards: list[float]
    token_logp_policy: list[list[float]]  # per response token, under the checkpoint
    token_logp_reference: list[list[float]] | None  # the same tokens under the reference (None: another tokenizer)
    preferences: list[float]  # per prompt, vs the reference's response, averaged over both orders
    reference_lengths: list[int] | None = None  # the reference's response lengths (tokens), for the LC win rate
    reference_rewards: list[float] | None = None  # the judge's rewards of the reference's responses, prompt by prompt
    diversity_groups: list[list[str]] | None = None  # several responses per prompt (DiversitySampling)
    diversity_prompts: list[str] | None = None  # the prompts of diversity_groups, in order
    sampled_from_policy: bool = True  # temperature 1, no top-p: the samples are draws from the policy itself
    proxy_members: list[list[float]] | None = None  # [N, K] proxy reward model (members) scores of the responses
    reference_proxy_members: list[list[float]] | None = None  # the same for the reference's responses
    implicit_pairs: list[Pair] | None = None  # held-out preference pairs, scored when this is not the reference
    implicit_margins: list[float] | None = None  # their implicit reward margins (nats, β left out)
    reward_name: str = GOLD_REWARD  # what ``rewards`` are called in metrics and sample rows (JUDGE_REWARD: a model's)

    @property
    def logp_policy(self) -> list[float]:
        """``log pi(y | x)`` of each response."""
        return [math.fsum(tokens) for tokens in self.token_logp_policy]

    @property
    def logp_reference(self) -> list[float] | None:
        """``log pi_ref(y | x)`` of each response; None where the reference has another tokenizer."""
        if self.token_logp_reference is None:
            return None
        return [math.fsum(tokens) for tokens in self.token_logp_reference]


class LazyModel:
    """A checkpoint's model and tokenizer, loaded on first use (a fully cached checkpoint is never loaded) onto
    ``device``: by default this process's device, so a GPU machine samples and scores on its GPU."""

    def __init__(self, checkpoint: Checkpoint, dtype: str, device: str | torch.device | None = None):
        self.checkpoint, self.dtype, self.device = checkpoint, dtype, device
        self._loaded = None
        self._tokenizer = None  # read once: a GGUF model's tokenizer takes seconds to build

    def get(self):
        if self._loaded is None:
            device = self.device if self.device is not None else process_device()
            self._loaded = (load_causal_lm(self.checkpoint.path, dtype=self.dtype, device=device), self.tokenizer())
        return self._loaded

    @property
    def loaded_dtype(self) -> str:
        """The dtype the weights load in, ``auto`` resolved for this machine (what cached results depend on)."""
        return str(resolve_dtype(self.dtype)).removeprefix("torch.")

    def tokenizer(self):
        """The tokenizer alone (cheap; e.g. to fit prompts to a length) without loading the weights."""
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.checkpoint.path)
        return self._tokenizer

    def max_positions(self) -> int | None:
        """The longest sequence the model's positions cover (:func:`position_limit` of its config), read without
        loading the weights; None where the config states none."""
        if self._loaded is not None:
            config = self._loaded[0].config
        else:
            from transformers import AutoConfig

            config = AutoConfig.from_pretrained(resolve_model_location(self.checkpoint.path), **remote_code_kwargs())
        return position_limit(config)

    def release(self) -> None:
        self._loaded = None
        gc.collect()


def cached_generations(model: LazyModel, prompts: list[str], settings: GenerationSettings, cache: EvalCache | None):
    weights = model.checkpoint.weights_sha256
    key = EvalCache.generation_key(weights, prompts, settings, dtype=model.loaded_dtype) if cache and weights else None
    cached = cache.get_generations(key) if key else None
    if cached is not None:
        return cached
    policy, tokenizer = model.get()
    generations = generate(policy, tokenizer, prompts, settings, desc=f"sampling {model.checkpoint.name}")
    if key:
        cache.put_generations(key, generations)
    return generations


def cached_logprobs(model: LazyModel, generations: list[Generation], batch_size: int,
                    cache: EvalCache | None) -> list[list[float]]:
    """Per-token log-probs of ``generations`` under ``model`` (from the cache when it has them)."""
    weights = model.checkpoint.weights_sha256
    key = EvalCache.token_logprob_key(weights, generations, dtype=model.loaded_dtype) if cache and weights else None
    cached = cache.get_token_logprobs(key) if key else None
    if cached is not None:
        return cached
    scorer, tokenizer = model.get()
    values = token_logprobs(scorer, tokenizer, generations, batch_size=batch_size)
    if key:
        cache.put_token_logprobs(key, values)
    return values


def position_limit(config) -> int | None:
    """The longest sequence a model config says its positions cover: ``max_position_embeddings`` (``n_positions``
    where a config names it so, through transformers' attribute map), times a RoPE scaling factor where one is set
    (of the pre-training length, where the config states it: llama3 and yarn scaling state both);
    None where there is no such bound: none stated, ALiBi (``alibi``), or a recurrent model (RWKV's is a training
    context, not a table)."""
    if getattr(config, "alibi", False) or getattr(config, "model_type", None) == "rwkv":
        return None
    limit = getattr(config, "max_position_embeddings", None)
    if not isinstance(limit, int) or limit <= 0:
        return None
    scaling = getattr(config, "rope_scaling", None) or {}
    factor = scaling.get("factor") if isinstance(scaling, dict) and scaling.get("rope_type", scaling.get("type")) \
        not in (None, "default") else None
    if not isinstance(factor, (int, float)) or factor <= 1:
        return limit
    # llama3/yarn configs state the extended length already and the pre-training one beside it
    original = scaling.get("original_max_position_embeddings")
    return max(limit, int(original * factor)) if isinstance(original, int) else int(limit * factor)


def evaluate_checkpoints(
    checkpoints: list[Checkpoint],
    reference: Checkpoint,
    prompts: list[str],
    judge: Judge,
    settings: GenerationSettings,
    *,
    dtype: str = "auto",
    bootstrap_resamples: int = 1000,
    cache: EvalCache | None = None,
    diversity: DiversitySampling | None = None,
    proxy: Proxy | None = None,
    pairs: list[Pair] | None = None,
    reward_name: str = GOLD_REWARD,
) -> tuple[list[CheckpointResult], list[CheckpointSamples]]:
    """Evaluate ``checkpoints`` against ``reference``; the reference's own samples are the win-rate baseline.
    The judge's rewards are ``reward_name`` (and ``<reward_name>_delta_vs_ref``): ``gold_reward`` for the task's
    gold judge, :data:`JUDGE_REWARD` for a learned reward model's, which is no gold.

    ``proxy``, a learned reward model's per-member scores, adds the proxy reward and the proxy-gold gap
    (:mod:`alignpipe.evaluation.proxy`). ``pairs``, held-out (prompt, chosen, rejected) triples, adds
    ``implicit_reward_accuracy`` to every checkpoint but the reference itself, whose margins are all 0.

    Models are loaded one at a time (plus the reference, which stays loaded to score every checkpoint's samples),
    and only when the cache cannot answer (checkpoints need ``weights_sha256`` to be cached); the proxy scores
    everything after they are released.
    """
    ref_model = LazyModel(reference, dtype)
    models = {c.path: ref_model if c.path == reference.path else LazyModel(c, dtype) for c in checkpoints}
    foreign = other_tokenizers(list(models.values()), ref_model)
    check_sampling_positions([ref_model, *models.values()], prompts, settings.max_new_tokens)
    # pairs as each checkpoint's tokens, checked before anything is sampled (a pair too long for a model), and then
    # scored as they are
    scored_pairs = scorable_pairs([m for m in models.values() if m.checkpoint.path not in foreign], ref_model,
                                  pairs) if pairs else {}
    ref_generations = cached_generations(ref_model, prompts, settings, cache)
    ref_rewards = judge.score(prompts, [g.response for g in ref_generations])
    from_policy = settings.temperature == 1.0 and settings.top_p == 1.0
    judged = []
    reference_pair_scores: dict = {}  # scored pair tokens -> their log-probs under the reference, shared by checkpoints
    for checkpoint in checkpoints:
        same = checkpoint.path == reference.path
        model = models[checkpoint.path]
        generations = ref_generations if same else cached_generations(model, prompts, settings, cache)
        token_logp_policy = cached_logprobs(model, generations, settings.batch_size, cache)
        scorable = checkpoint.path not in foreign
        token_logp_reference = cached_logprobs(ref_model, generations, settings.batch_size, cache) \
            if scorable else None
        groups = diversity_groups(model, prompts, settings, diversity, cache) if diversity else None
        is_reference = same or (checkpoint.weights_sha256 is not None
                                and checkpoint.weights_sha256 == reference.weights_sha256)  # margins all 0
        margins = (pair_margins(model, ref_model, scored_pairs[checkpoint.path], settings.batch_size, cache,
                                reference_pair_scores) if pairs and scorable and not is_reference else None)
        if not same:
            model.release()
        judged.append(dataclasses.replace(
            _judge(checkpoint, generations, ref_generations, judge, token_logp_policy, token_logp_reference),
            reference_rewards=ref_rewards, diversity_groups=groups, sampled_from_policy=from_policy,
            diversity_prompts=diversity.chosen(prompts) if diversity else None,
            implicit_pairs=list(pairs) if margins is not None else None, implicit_margins=margins,
            reward_name=reward_name))
    ref_model.release()
    if proxy:  # scored once every policy is released: the reward model is never resident beside two policies
        ref_proxy = proxy(prompts, [g.response for g in ref_generations])
        judged = [dataclasses.replace(
            s, reference_proxy_members=ref_proxy,
            proxy_members=ref_proxy if s.generations is ref_generations else proxy(prompts, [g.response for g in
                                                                                          s.generations]))
            for s in judged]
    results = []
    for samples in judged:
        results.append(CheckpointResult(
            name=samples.checkpoint.name, path=samples.checkpoint.path,
            weights_sha256=samples.checkpoint.weights_sha256,
            metrics=checkpoint_metrics(samples, bootstrap_resamples=bootstrap_resamples, seed=settings.seed),
        ))
        log.info("[eval] %s: %s %.3f", samples.checkpoint.name, reward_name.replace("_", " "),
                 results[-1].metrics[reward_name].value)
    return results, judged


def check_sampling_positions(models: list[LazyModel], prompts: list[str], max_new_tokens: int) -> None:
    """Refuse, before anything is sampled, a model whose positions cannot hold the longest of ``prompts`` (rendered
    in its chat template, its own tokens) and ``max_new_tokens`` more: past its ``max_position_embeddings`` a model
    with rotary positions samples at positions it never learned, silently, and one with learned positions fails.
    The same policy as the implicit-reward pairs' (:func:`checked_pair_generations`). Reads tokenizers and configs
    only, never weights."""
    for model in dict.fromkeys(models):
        if not prompts or (limit := model.max_positions()) is None:
            continue
        tokenizer = model.tokenizer()
        longest = max(len(tokenizer(text, add_special_tokens=False)["input_ids"])
                      for text in render_prompts(tokenizer, prompts))
        if longest + max_new_tokens > limit:
            raise ValueError(
                f"checkpoint {model.checkpoint.name!r} ({model.checkpoint.path}) has {limit} positions "
                f"(max_position_embeddings), fewer than its longest rendered prompt ({longest} tokens) and "
                f"max_new_tokens ({max_new_tokens}) need ({longest + max_new_tokens}): its samples would run past "
                f"them; lower max_new_tokens to {max(limit - longest, 0)} or less (alignpipe eval --max-new-tokens, a "
                "suite's generation.max_new_tokens, an eval stage's max_new_tokens) or cut the prompts (a suite's "
                "generation.max_prompt_tokens)")


def diversity_groups(model: LazyModel, prompts: list[str], settings: GenerationSettings, diversity: DiversitySampling,
                     cache: EvalCache | None) -> list[list[str]]:
    """``diversity.samples_per_prompt`` responses of ``model`` to each of the prompts :meth:`DiversitySampling.chosen`
    picks."""
    seeded = dataclasses.replace(settings, seed=settings.seed + DIVERSITY_SEED_OFFSET)
    return diversity.groups(cached_generations(model, diversity.prompts_for(prompts), seeded, cache))


def conversation_ids(tokenizer, prompt: str, response: str) -> list[int]:
    """The tokens of ``prompt`` and ``response`` as one conversation in the chat template, as DPO trains on it."""
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt},
                                          {"role": "assistant", "content": response}], tokenize=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def pair_generations(tokenizer, pairs: list[Pair], *, max_length: int | None = None,
                     whose: str = "the model") -> list[Generation]:
    """The chosen responses of ``pairs``, then their rejected ones, as the tokens a DPO trainer scores (TRL 1.16's
    ``DPOTrainer`` tokenization): the chat template renders prompt and reply as one conversation, and a reply's tokens
    are what follows the pair's prompt length, the shorter of the rendered prompt's common prefixes with its two
    conversations. So the end-of-turn tokens are the template's own (ChatML's ``<|im_end|>`` and newline, not the
    tokenizer's EOS), and a reply is tokenized in context.

    As a rule that length is the whole rendered prompt, which :func:`token_logprobs` puts before the reply. Where the
    template renders the prompt alone differently (a marker added only with the generation prompt) or tokens merge
    across the prompt's end, TRL trains on the shared prefix followed by each conversation's tail; the generations
    then carry that prefix as ``context_ids``, so they are scored on the sequences DPO training saw, and the log says
    so, as TRL's does.

    Either way a scored sequence is its whole conversation's tokens. With ``max_length`` (``whose`` positions, for
    the message), one longer than that is a ``ValueError``: past its ``max_position_embeddings`` a model with
    rotary positions scores tokens at positions it never learned, silently, and one with learned positions fails."""
    from trl.data_utils import common_prefix_length  # here: importing TRL costs every harness user a second

    unique = list(dict.fromkeys(p for p, _, _ in pairs))
    prompt_ids = {prompt: tokenizer(text, add_special_tokens=False)["input_ids"]
                  for prompt, text in zip(unique, render_prompts(tokenizer, unique), strict=True)}

    chosen, rejected, mismatched = [], [], []
    for index, (prompt, chosen_text, rejected_text) in enumerate(pairs):
        rendered = prompt_ids[prompt]
        chosen_ids, rejected_ids = (conversation_ids(tokenizer, prompt, chosen_text),
                                    conversation_ids(tokenizer, prompt, rejected_text))
        if max_length is not None and (longest := max(len(chosen_ids), len(rejected_ids))) > max_length:
            raise ValueError(
                f"implicit-reward pair {index} (prompt {prompt[:60]!r}): prompt and reply are {longest} tokens, more "
                f"than the {max_length} positions of {whose} (max_position_embeddings); cut the pairs' prompts (a "
                "suite's generation.max_prompt_tokens cuts them) or leave the pairs out (a suite's implicit_reward "
                "block, an eval stage's implicit_reward_pairs: 0)")
        shared = min(common_prefix_length(rendered, chosen_ids), common_prefix_length(rendered, rejected_ids))
        context = None
        if shared < len(rendered):
            context = tuple(rendered[:shared])
            mismatched.append(prompt)
        chosen.append(Generation(prompt, chosen_text, tuple(chosen_ids[shared:]), False, context))
        rejected.append(Generation(prompt, rejected_text, tuple(rejected_ids[shared:]), False, context))
    if mismatched:
        log.warning("[eval] %d of %d pairs have a rendered prompt that is not a prefix of their conversations (the "
                    "chat template renders the prompt alone differently, or tokens merge across the prompt's end; "
                    "e.g. %r): as in DPO training, their replies are scored after the tokens prompt and conversations "
                    "share, not after the prompt a generation sees", len(mismatched), len(pairs),
                    mismatched[0][:60])
    return chosen + rejected


def other_tokenizers(models: list[LazyModel], ref_model: LazyModel) -> set[str]:
    """Checkpoint paths of the ``models`` whose tokenizer is not the reference's, read from tokenizers alone, each
    named in a warning. Their KL to the reference and implicit reward are left out: both need the reference's
    log-probs of the policy's tokens, and token ids of another vocabulary would give numbers without meaning (or an
    index past the reference's embeddings). Their judged metrics (reward, win rate, lengths) stand: the judge reads
    text."""
    vocabulary = None
    foreign = set()
    for model in models:
        checkpoint = model.checkpoint
        if model is ref_model or checkpoint.path in foreign:
            continue
        vocabulary = ref_model.tokenizer().get_vocab() if vocabulary is None else vocabulary
        if model.tokenizer().get_vocab() != vocabulary:
            foreign.add(checkpoint.path)
            log.warning("[eval] checkpoint %r has another tokenizer than the reference %r: no KL to it and no implicit "
                        "reward (the reference cannot score token ids of another vocabulary); its reward, win rate "
                        "and lengths are measured; evaluate it against a reference with its tokenizer for the rest",
                        checkpoint.name, ref_model.checkpoint.name)
    return foreign


def scorable_pairs(models: list[LazyModel], ref_model: LazyModel, pairs: list[Pair]) -> dict[str, list[Generation]]:
    """``pairs`` as each checkpoint's scored tokens (:func:`pair_generations`, by checkpoint path), from tokenizers
    and configs alone, refusing what would otherwise fail after every checkpoint was sampled: a pair longer than a
    model's positions. The checkpoints share the reference's tokenizer (:func:`other_tokenizers`)."""
    scored = {ref_model.checkpoint.path: checked_pair_generations(ref_model, pairs)}
    for model in models:
        if model.checkpoint.path not in scored:
            scored[model.checkpoint.path] = checked_pair_generations(model, pairs, ref_model)
    return scored


def checked_pair_generations(model: LazyModel, pairs: list[Pair], *scorers: LazyModel) -> list[Generation]:
    """:func:`pair_generations` in ``model``'s tokenizer, refused where a sequence is longer than the positions of
    ``model`` or of the ``scorers`` that score the same tokens (the fewest of them, named in the error)."""
    limits = sorted((limit, m.checkpoint.name) for m in (model, *scorers) if (limit := m.max_positions()) is not None)
    limit, whose = limits[0] if limits else (None, "")
    return pair_generations(model.tokenizer(), pairs, max_length=limit, whose=whose)


def pair_margins(model: LazyModel, ref_model: LazyModel, scored: list[Generation], batch_size: int,
                 cache: EvalCache | None, reference_scores: dict) -> list[float]:
    """Implicit reward margins of ``model`` against ``ref_model`` on pairs as ``model``'s scored tokens (chosen
    replies, then rejected: :func:`scorable_pairs`), from the cached per-token log-prob path; ``reference_scores``
    keeps the reference's log-probs of each token list it scored (checkpoints that share a tokenizer score the same
    tokens, which the reference then scores once even without a cache)."""
    key = tuple(scored)
    if key not in reference_scores:
        reference_scores[key] = [math.fsum(t) for t in cached_logprobs(ref_model, scored, batch_size, cache)]
    policy = [math.fsum(t) for t in cached_logprobs(model, scored, batch_size, cache)]
    reference = reference_scores[key]
    n = len(scored) // 2
    return implicit_margins(policy[:n], reference[:n], policy[n:], reference[n:]).tolist()


def _judge(checkpoint, generations, ref_generations, judge, token_logp_policy, token_logp_reference,
           ) -> CheckpointSamples:
    prompts = [g.prompt for g in generations]
    rewards = judge.score(prompts, [g.response for g in generations])
    if hasattr(judge, "preferences"):  # batched, position-free (Bradley-Terry on scores): each response scored once
        preferences = judge.preferences(prompts, [g.response for g in generations],
                                        [r.response for r in ref_generations])
    else:
        preferences = [
            order_averaged_preference(
                judge.pairwise_probability(g.prompt, g.response, r.response),
                judge.pairwise_probability(g.prompt, r.response, g.response),
            )
            for g, r in zip(generations, ref_generations, strict=True)
        ]
    return CheckpointSamples(checkpoint, generations, rewards, token_logp_policy, token_logp_reference, preferences,
                             [len(r.response_ids) for r in ref_generations])


def checkpoint_metrics(samples: CheckpointSamples, *, bootstrap_resamples: int, seed: int) -> dict:
    """Leaderboard metrics of one checkpoint from its judged samples (pure: no model, no I/O)."""
    metrics = {
        samples.reward_name: mean_with_ci(samples.rewards, resamples=bootstrap_resamples, seed=seed,
                                          higher_is_better=True),
        **({f"{samples.reward_name}_delta_vs_ref": reward_delta(samples.rewards, samples.reference_rewards,
                                                                resamples=bootstrap_resamples, seed=seed)}
           if samples.reference_rewards is not None else {}),
        "win_rate_vs_ref": win_rate(samples.preferences, resamples=bootstrap_resamples, seed=seed),
    }
    if samples.token_logp_reference is not None:  # None: another tokenizer than the reference's
        metrics["kl_ref_k1"] = mean_with_ci(kl_k1(samples.logp_policy, samples.logp_reference),
                                            resamples=bootstrap_resamples, seed=seed, higher_is_better=None)
        metrics["kl_ref_k3"] = mean_with_ci(sequence_kl_k3(samples.token_logp_policy, samples.token_logp_reference),
                                            resamples=bootstrap_resamples, seed=seed, higher_is_better=None)
    if samples.sampled_from_policy:  # tempered or top-p samples would give a cross-entropy, not the policy's entropy
        metrics["policy_entropy"] = policy_entropy(samples.logp_policy, resamples=bootstrap_resamples, seed=seed)
    lengths = [len(g.response_ids) for g in samples.generations]
    metrics.update(length_stats(lengths, [g.truncated for g in samples.generations], resamples=bootstrap_resamples,
                                seed=seed))
    if samples.reference_lengths is not None:
        metrics["len_tokens_delta_vs_ref"] = length_delta(lengths, samples.reference_lengths,
                                                          resamples=bootstrap_resamples, seed=seed)
        metrics.update(lc_win_rate_metric(samples.preferences, lengths, samples.reference_lengths,
                                          resamples=bootstrap_resamples, seed=seed))
    responses = [g.response for g in samples.generations]
    metrics["distinct_1"] = distinct_n(responses, 1)
    metrics["distinct_2"] = distinct_n(responses, 2)
    metrics["repetition_4"] = mean_repetition_rate(responses, 4, resamples=bootstrap_resamples, seed=seed)
    if samples.diversity_groups:
        metrics.update(within_prompt_diversity(samples.diversity_groups, resamples=bootstrap_resamples, seed=seed))
    if samples.proxy_members is not None:
        metrics.update(proxy_metrics(samples.proxy_members, samples.reference_proxy_members, samples.rewards,
                                     samples.reference_rewards, resamples=bootstrap_resamples, seed=seed))
    if samples.implicit_margins is not None:  # pairs that share a prompt are resampled together
        metrics["implicit_reward_accuracy"] = implicit_reward_accuracy(
            samples.implicit_margins, resamples=bootstrap_resamples, seed=seed,
            groups=[prompt for prompt, _, _ in samples.implicit_pairs])
    return metrics


IMPLICIT_PAIR_SEED = 4242  # the synthetic pairs' seed: held-out prompts apart from the eval prompts (EVAL_SEED)


def synthetic_implicit_pairs(n: int, space: TaskSpace, seed: int = IMPLICIT_PAIR_SEED) -> list[Pair]:
    """The embedded task's pairs for ``implicit_reward_accuracy``: ``n`` gold-ordered pairs on prompts of the task's
    held-out split (:func:`~alignpipe.tasks.heldout_gold_pairs`). One place for the eval stage, the suites and
    preflight, so preflight checks the very pairs the stage scores. ``ValueError`` when ``space`` holds too few
    held-out prompts."""
    return heldout_gold_pairs(n, seed, space)


def implicit_pairs_record(pairs: list[Pair], source: str, labels: str, **split) -> dict:
    """What a leaderboard's ``config.implicit_reward_pairs`` records of the pairs ``implicit_reward_accuracy`` was
    measured on: their source, held-out split (``split``: its seed or fraction), who ordered them, their number and
    a hash of the pairs as scored, which a merge compares (boards without the metric do not record them)."""
    return {"source": source, "split": "heldout", **split, "labels": labels, "n": len(pairs),
            "sha256": content_key(pairs)[:16]}


KL_K3_ESTIMATOR = "summed per token"  # kl_ref_k3 before it was summed per token recorded none: merges keep them apart


def kl_estimator_record(results: list[CheckpointResult]) -> dict[str, str]:
    """``{"kl_k3": ...}`` for a leaderboard's config when its rows carry ``kl_ref_k3``: a merge then refuses to rank
    them beside rows whose k3 was computed another way (k3 of the whole-sequence ratio, recorded as nothing)."""
    return {"kl_k3": KL_K3_ESTIMATOR} if any("kl_ref_k3" in r.metrics for r in results) else {}


def lc_win_rate_metric(preferences: list[float], lengths: list[int], reference_lengths: list[int], *,
                       resamples: int, seed: int) -> dict[str, MetricValue]:
    """``{"lc_win_rate_vs_ref": ...}``, or nothing when there are too few prompts for the length GLM: a one-prompt
    evaluation keeps its other metrics rather than failing after every checkpoint was sampled and judged."""
    if len(preferences) < MIN_PROMPTS:
        log.info("[eval] no length-controlled win rate: its length GLM needs at least %d prompts, got %d",
                 MIN_PROMPTS, len(preferences))
        return {}
    return {"lc_win_rate_vs_ref": length_controlled_win_rate(preferences, lengths, reference_lengths,
                                                             resamples=resamples, seed=seed)}


SAMPLE_SUFFIXES = ("", ".diversity", ".implicit")  # the per-sample files' name suffixes (sample_files' keys)


def sample_files(samples: CheckpointSamples) -> dict[str, list[dict]]:
    """A checkpoint's per-sample records by file-name suffix: ``""`` (its samples and their judgments),
    ``".diversity"`` and ``".implicit"`` (where they were drawn)."""
    files = {"": sample_rows(samples)}
    if samples.diversity_groups:
        files[".diversity"] = diversity_rows(samples)
    if samples.implicit_margins is not None:
        files[".implicit"] = implicit_rows(samples)
    return files


def write_sample_files(directory: Path, name: str, files: dict[str, list[dict]]) -> str:
    """Write :func:`sample_files`' records as ``<directory>/<name><suffix>.jsonl`` (JSON lines, each atomically);
    returns the main file's name, which a leaderboard row records."""
    for suffix, rows in files.items():
        atomic_write_text(Path(directory) / f"{name}{suffix}.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    return f"{name}.jsonl"


def sample_rows(samples: CheckpointSamples) -> list[dict]:
    """Per-sample records (JSONL) so every leaderboard number can be traced to its generations and judgments."""
    rows = [
        {
            "prompt": g.prompt, "response": g.response, "n_tokens": len(g.response_ids), "truncated": g.truncated,
            samples.reward_name: reward, "preference_vs_ref": pref, "logp_policy": lp, "logp_reference": lr,
        }
        for g, reward, pref, lp, lr in zip(samples.generations, samples.rewards, samples.preferences,
                                           samples.logp_policy,
                                           samples.logp_reference or [None] * len(samples.generations), strict=True)
    ]
    for row, members in zip(rows, samples.proxy_members or [], strict=False):
        row["proxy_members"] = members
    return rows


def diversity_rows(samples: CheckpointSamples) -> list[dict]:
    """Per-prompt records of the diversity samples (JSONL): the prompt and its several responses."""
    return [{"prompt": prompt, "responses": group}
            for prompt, group in zip(samples.diversity_prompts or [], samples.diversity_groups or [], strict=True)]


def implicit_rows(samples: CheckpointSamples) -> list[dict]:
    """Per-pair records (JSONL) of the implicit-reward accuracy: each pair and its margin (nats, β left out)."""
    return [{"prompt": p, "chosen": c, "rejected": r, "margin": m}
            for (p, c, r), m in zip(samples.implicit_pairs or [], samples.implicit_margins or [], strict=True)]
