"""Tokenisation shared by the reward scorers and the ensemble trainer: (prompt, response) pairs to unpadded token ids
(:func:`encode_examples`), and those to one padded batch (:func:`collate_features`)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = [
    "collate_features",
    "encode_examples",
]


def encode_examples(
    tokenizer, prompts: Sequence[str], responses: Sequence[str], *, max_length: int
) -> list[dict[str, list[int]]]:
    """Token ids (unpadded) of each (prompt, response), truncated to ``max_length`` while keeping the response END.

    * Tokenizer with a chat template (decoders): the conversation ``[user: prompt, assistant: response]`` is rendered
      with the template and tokenised with ``add_special_tokens=False`` (the template already contains BOS etc.). A
      too-long sequence keeps its LAST ``max_length`` tokens: the template's start (BOS, system prompt) and the
      prompt's start are dropped first.
    * Without a chat template (encoders): pair encoding ``tokenizer(prompt, response)`` (``[CLS] p [SEP] r [SEP]``
      with ``token_type_ids``). Truncation cuts from the LEFT, and from the prompt only when the prompt is long enough
      (``only_first``), else from both (``longest_first``). So ``[CLS]``/``[SEP]`` and the end of the response are
      kept. This temporarily sets ``tokenizer.truncation_side = "left"`` and restores it afterwards.
    """
    if len(prompts) != len(responses):
        raise ValueError(f"prompts and responses must have the same length, got {len(prompts)} and {len(responses)}")
    if max_length < 2:
        raise ValueError(f"max_length must be >= 2, got {max_length}")
    out: list[dict[str, list[int]]] = []
    if getattr(tokenizer, "chat_template", None):
        for prompt, response in zip(prompts, responses):
            text = tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}], tokenize=False
            )
            ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
            if not ids:
                raise ValueError(f"chat template rendered an empty token sequence for prompt {prompt[:40]!r}")
            out.append({"input_ids": ids[-max_length:]})
        return out
    old_side = tokenizer.truncation_side
    try:
        tokenizer.truncation_side = "left"
        for prompt, response in zip(prompts, responses):
            enc = tokenizer(prompt, response)
            if len(enc["input_ids"]) > max_length:
                over = len(enc["input_ids"]) - max_length
                prompt_len = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
                specials = len(enc["input_ids"]) - prompt_len - len(tokenizer(response, add_special_tokens=False)[
                    "input_ids"])
                if max_length - specials < 2:  # longest_first could then keep a prompt token and no response
                    raise ValueError(f"max_length {max_length} leaves {max_length - specials} token(s) beside the "
                                     f"pair encoding's {specials} special tokens; a prompt and response need 2 (the "
                                     f"response's end is what is scored): set max_length >= {specials + 2}")
                strategy = "only_first" if prompt_len - over >= 1 else "longest_first"
                enc = tokenizer(prompt, response, truncation=strategy, max_length=max_length)
            feature = {"input_ids": list(enc["input_ids"])}
            if "token_type_ids" in enc:
                feature["token_type_ids"] = list(enc["token_type_ids"])
            out.append(feature)
    finally:
        tokenizer.truncation_side = old_side
    return out


def collate_features(tokenizer, features: Sequence[dict[str, list[int]]]) -> dict[str, Tensor]:
    """Pad ``features`` (from :func:`encode_examples`) on ``tokenizer.padding_side`` into ``input_ids``,
    ``attention_mask`` (and ``token_type_ids``, padded with 0, when the features have them)."""
    if not features:
        raise ValueError("cannot collate an empty batch")
    pad_id = tokenizer.pad_token_id
    if pad_id is None:
        pad_id = tokenizer.eos_token_id
    if pad_id is None:
        raise ValueError("tokenizer has neither a pad nor an EOS token to pad with")
    left = getattr(tokenizer, "padding_side", "right") == "left"
    width = max(len(f["input_ids"]) for f in features)
    with_types = all("token_type_ids" in f for f in features)
    ids = torch.full((len(features), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(features), width), dtype=torch.long)
    types = torch.zeros((len(features), width), dtype=torch.long) if with_types else None
    for i, f in enumerate(features):
        n = len(f["input_ids"])
        sl = slice(width - n, width) if left else slice(0, n)
        ids[i, sl] = torch.tensor(f["input_ids"], dtype=torch.long)
        mask[i, sl] = 1
        if types is not None:
            types[i, sl] = torch.tensor(f["token_type_ids"], dtype=torch.long)
    batch = {"input_ids": ids, "attention_mask": mask}
    if types is not None:
        batch["token_type_ids"] = types
    return batch
