"""Pinned, batched sampling and sequence log-probabilities: the only way the harness touches a model.

Why pinned: every checkpoint is sampled with the same settings and seeds, so leaderboard differences come from the
weights, not the decoding. With ``temperature == 1`` and ``top_p == 1`` the samples come from the model's own
distribution, which is what makes the Monte-Carlo KL estimators unbiased. Nothing else decodes: a checkpoint's own
``generation_config.json`` (repetition penalty, banned n-grams, a minimum length, ...) is ignored.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm
from transformers import GenerationConfig, PreTrainedModel, PreTrainedTokenizerBase

from alignpipe.models.chat_templates import reply_end_ids
from alignpipe.pipeline import distributed
from alignpipe.seeds import EVAL_SEED


@dataclass(frozen=True)
class GenerationSettings:
    max_new_tokens: int = 24
    temperature: float = 1.0
    top_p: float = 1.0
    batch_size: int = 64
    seed: int = EVAL_SEED


@dataclass(frozen=True)
class Generation:
    prompt: str
    response: str
    response_ids: tuple[int, ...]  # generated tokens up to and including the end token (if one was produced)
    truncated: bool  # no end token (:func:`end_token_ids`) within max_new_tokens
    # The tokens the response follows, when not the rendered prompt's own: a preference pair's response scored as a
    # DPO trainer does where the chat template renders the prompt alone differently (harness.pair_generations).
    context_ids: tuple[int, ...] | None = None


def render_prompts(tokenizer: PreTrainedTokenizerBase, prompts: list[str]) -> list[str]:
    """Single-turn user prompts in the model's chat template, ready for the assistant's reply."""
    return [
        tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
        for p in prompts
    ]


def _encode(tokenizer: PreTrainedTokenizerBase, texts: list[str], device) -> dict[str, torch.Tensor]:
    tokenizer.padding_side = "left"
    return tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)


def end_token_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The ids that end a reply: the tokenizer's EOS, every end id the model's generation config declares (TRL's
    GRPO/RLOO rule, ``GRPOTrainer.eos_token_ids``), and the token the chat template ends an assistant turn with
    when it is a special token (:func:`alignpipe.models.chat_templates.reply_end_ids`).

    Why all three: a chat model may end its turn with a token that is not its tokenizer's EOS: an end-of-turn token
    listed in ``generation_config.json``, or, for a base model given a chat template (``chat_template: chatml``), the
    template's own end of turn, which SFT teaches and nothing else declares. Stopping at the EOS alone would sample
    past the turn's end into turns the model makes up, and mark every reply truncated. Every sampler in the pipeline
    ends a reply at these tokens (GRPO/RLOO through ``trainers.trl_online.token_ids_only``).
    """
    owner = model.get_base_model() if hasattr(model, "get_base_model") else model
    declared = owner.generation_config.eos_token_id
    declared = [] if declared is None else [declared] if isinstance(declared, int) else list(declared)
    return list(dict.fromkeys([*reply_end_ids(tokenizer), *declared]))


def decoding_config(settings: GenerationSettings, tokenizer: PreTrainedTokenizerBase,
                    end_ids: list[int]) -> GenerationConfig:
    """The whole decoding of a pinned sample: plain sampling with ``settings`` (no top-k), stopping at any of
    ``end_ids`` (:func:`end_token_ids`). Every other option keeps transformers' neutral default (see
    :func:`decoding_with`)."""
    return GenerationConfig(
        do_sample=True, temperature=settings.temperature, top_p=settings.top_p, top_k=0,
        max_new_tokens=settings.max_new_tokens, eos_token_id=end_ids, pad_token_id=tokenizer.pad_token_id,
    )


@contextmanager
def decoding_with(model: PreTrainedModel, config: GenerationConfig) -> Iterator[None]:
    """Make ``config`` the model's only decoding source while sampling, and restore the model's own afterwards.

    Why: ``model.generate`` fills each option a passed config leaves unset from ``model.generation_config`` (the
    checkpoint's file), so passing ``config`` alone would still let a checkpoint's repetition penalty or minimum
    length through. A PEFT wrapper decodes with the generation config of the model it wraps. Also used around the
    GRPO/RLOO trainers, whose sampling TRL configures the same way (``trainers/trl_online.py``).
    """
    owner = model.get_base_model() if hasattr(model, "get_base_model") else model
    own = owner.generation_config
    owner.generation_config = config
    try:
        yield
    finally:
        owner.generation_config = own


@torch.no_grad()
def generate(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: list[str], settings: GenerationSettings,
    *, desc: str = "generating", across_ranks: bool = False,
) -> list[Generation]:
    """Sample one response per prompt. Batch ``i`` is seeded with ``seed + i``, so results are reproducible.

    ``across_ranks``: every data-parallel rank calls this with the same prompts, samples its share of the batches
    (batch ``i`` on rank ``i`` mod the world size) and returns all of them, gathered. Because each batch keeps its
    seed, the samples are one process's (bit for bit where the ranks' devices compute alike), and each rank samples
    only its share. Without it a process samples every prompt it is given (PPO gives each rank its own rollouts).

    Each process samples on its own whole model (the loaders never partition one, see
    :func:`~alignpipe.models.whole_weights.zero3_partitioning_off`), so ``synced_gpus`` is off: transformers turns it
    on under ZeRO-3 with several processes, and every token step then waits in a collective for the other ranks: a
    GRPO or RLOO stage's evaluation, which samples on rank 0 alone, hung there.
    """
    model.eval()
    end_ids = end_token_ids(model, tokenizer)
    config = decoding_config(settings, tokenizer, end_ids)
    rendered = render_prompts(tokenizer, prompts)
    starts = range(0, len(prompts), settings.batch_size)
    world, rank = (distributed.world_size(), distributed.rank()) if across_ranks else (1, 0)
    batches: dict[int, list[Generation]] = {}
    for batch_index in tqdm(range(rank, len(starts), world), desc=desc, leave=False):
        start = starts[batch_index]
        batch = _encode(tokenizer, rendered[start:start + settings.batch_size], model.device)
        torch.manual_seed(settings.seed + batch_index)
        with decoding_with(model, config):
            sequences = model.generate(**batch, generation_config=config, synced_gpus=False)
        new_tokens = sequences[:, batch["input_ids"].shape[1]:].tolist()
        batches[batch_index] = [_ended(tokenizer, prompt, tokens, end_ids) for prompt, tokens in
                                zip(prompts[start:start + settings.batch_size], new_tokens)]
    if across_ranks:
        batches = {i: part for share in distributed.all_gather_objects(batches) for i, part in share.items()}
    return [generation for i in sorted(batches) for generation in batches[i]]


def _ended(tokenizer: PreTrainedTokenizerBase, prompt: str, tokens: list[int], end_ids: list[int]) -> Generation:
    """A sampled continuation cut after its first end token (kept in the ids), or whole and truncated."""
    end = next((i for i, token in enumerate(tokens) if token in end_ids), None)
    truncated = end is None
    kept = tokens if truncated else tokens[: end + 1]
    # the text leaves the end token out: an end id the model declares need not be flagged special, and decoding
    # would keep its text in the reply
    text = tokenizer.decode(kept if truncated else kept[:-1], skip_special_tokens=True).strip()
    return Generation(prompt, text, tuple(kept), truncated)


def sequence_logprobs(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, generations: list[Generation], *, batch_size: int = 64,
) -> list[float]:
    """``log pi(y | x)`` summed over the response tokens (EOS included, prompt excluded) for each generation."""
    return [math.fsum(tokens) for tokens in token_logprobs(model, tokenizer, generations, batch_size=batch_size)]


@torch.no_grad()
def token_logprobs(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, generations: list[Generation], *, batch_size: int = 64,
) -> list[list[float]]:
    """``log pi(y_t | x, y_<t)`` of each response token (EOS included, prompt excluded) for each generation; ``x`` is
    the rendered prompt's tokens, or a generation's ``context_ids`` when it has them (when they are empty, the first
    response token is left out: nothing comes before it).

    Per token, not only summed: the k3 KL estimator is low-variance only per token (see
    :func:`alignpipe.evaluation.metrics.sequence_kl_k3`). Batches hold sequences of similar length (scored in length
    order, returned in the given one): a batch is as wide as its longest sequence, and preference pairs of real
    dialogues range from a few dozen tokens to several hundred, so batches in the given order would be mostly padding.
    """
    model.eval()
    rendered = render_prompts(tokenizer, [g.prompt for g in generations])
    prompt_ids = [list(g.context_ids) if g.context_ids is not None else tokenizer(t, add_special_tokens=False)[
        "input_ids"] for t, g in zip(rendered, generations)]
    rows = [p + list(g.response_ids) for p, g in zip(prompt_ids, generations)]
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
    rows_out: list[list[float]] = [[] for _ in generations]
    pad = tokenizer.pad_token_id
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        width = max(len(rows[i]) for i in chunk)
        if width == 0:  # nothing before and nothing after: no token to score (the rows keep their [])
            continue
        input_ids = torch.tensor([[pad] * (width - len(rows[i])) + rows[i] for i in chunk], device=model.device)
        attention = torch.tensor([[0] * (width - len(rows[i])) + [1] * len(rows[i]) for i in chunk],
                                 device=model.device)
        positions = (attention.cumsum(-1) - 1).clamp(min=0)
        logits = model(input_ids=input_ids, attention_mask=attention, position_ids=positions).logits.float()
        logprobs = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, input_ids[:, 1:, None]).squeeze(-1)
        for row, i in enumerate(chunk):
            n = len(generations[i].response_ids)
            # a response with no context before it (a pair whose prompt shares no token with its conversation): its
            # first token has nothing to be predicted from and is not scored, as in TRL's DPO loss
            first = width - n if prompt_ids[i] else width - n + 1
            rows_out[i] = logprobs[row, first - 1:].tolist() if first < width else []
    return rows_out
