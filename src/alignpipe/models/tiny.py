"""The tiny model factory: a random-init Llama-style model and a tokenizer trained locally with `tokenizers`.

Why: the embedded default must run with no hub access, yet go through the exact code paths a real model does
(``save_pretrained`` / ``AutoTokenizer`` / ``AutoModelForCausalLM`` and TRL's chat-template handling). The chat
template carries ``{% generation %}`` markers so TRL's assistant-only loss works.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

UNK, PAD, EOS = "<unk>", "<pad>", "<|end|>"
USER, ASSISTANT, SYSTEM = "<|user|>", "<|assistant|>", "<|system|>"
SPECIAL_TOKENS = [UNK, PAD, EOS, USER, ASSISTANT, SYSTEM]

# A message ends with EOS; the assistant's reply and its EOS sit inside generation markers, so the model learns to stop.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}" + SYSTEM + "{{ message['content'] }}" + EOS +
    "{%- elif message['role'] == 'user' -%}" + USER + "{{ message['content'] }}" + EOS +
    "{%- elif message['role'] == 'assistant' -%}" + ASSISTANT +
    "{% generation %}{{ message['content'] }}" + EOS + "{% endgeneration %}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}" + ASSISTANT + "{%- endif -%}"
)


def train_tokenizer(corpus: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """A byte-pair tokenizer trained on ``corpus``, wrapped for transformers, with the chat template set."""
    core = Tokenizer(models.BPE(unk_token=UNK))
    core.pre_tokenizer = pre_tokenizers.Metaspace()
    core.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False)
    core.train_from_iterator(list(corpus), trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, unk_token=UNK, pad_token=PAD, eos_token=EOS,
        additional_special_tokens=[USER, ASSISTANT, SYSTEM],
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.padding_side = "left"  # decoder-only generation pads on the left
    return tokenizer


def tiny_config(*, vocab_size: int, hidden_size: int, num_layers: int, num_heads: int, intermediate_size: int,
                max_position_embeddings: int, pad_token_id: int | None = None,
                eos_token_id: int | None = None) -> LlamaConfig:
    """The tiny model's architecture: what :func:`build_tiny_model` builds, and what preflight inspects on the meta
    device before the tokenizer (and so the exact vocabulary) exists."""
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        intermediate_size=intermediate_size,
        max_position_embeddings=max_position_embeddings,
        pad_token_id=pad_token_id,
        eos_token_id=eos_token_id,
        bos_token_id=None,
        tie_word_embeddings=True,
    )


def build_tiny_model(
    tokenizer: PreTrainedTokenizerFast,
    *,
    hidden_size: int,
    num_layers: int,
    num_heads: int,
    intermediate_size: int,
    max_position_embeddings: int,
    seed: int,
) -> LlamaForCausalLM:
    """A randomly initialised Llama-style causal LM sized to ``tokenizer`` (seeded, so identical across runs)."""
    config = tiny_config(vocab_size=len(tokenizer), hidden_size=hidden_size, num_layers=num_layers,
                         num_heads=num_heads, intermediate_size=intermediate_size,
                         max_position_embeddings=max_position_embeddings, pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model


def save_tiny_checkpoint(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, directory: Path) -> Path:
    """Save in ``save_pretrained`` format (safetensors) so every later stage loads it like any hub model."""
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    return directory
