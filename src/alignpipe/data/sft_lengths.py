"""What cutting SFT conversations to ``max_length`` tokens does to their replies, measured before training.

Why: TRL's ``SFTTrainer`` tokenizes each conversation with the chat template, keeps its first ``max_length`` tokens
(``truncation_mode="keep_start"``) and silently drops every example left with no token to train on. With
assistant-only loss a conversation whose prompt alone fills ``max_length`` loses its whole reply and is dropped, and
one cut inside the reply loses the end-of-turn token, so the model is not taught to stop. Neither shows in the
training loss; these counts make them visible (and :func:`truncation_warning` says which knob to turn).
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass, replace
from typing import Iterable, Sequence

from datasets import Dataset
from transformers import PreTrainedTokenizerBase
from trl.chat_template_utils import has_generation_markers
from trl.data_utils import common_prefix_length

SAMPLE_SIZE = 2000  # conversations tokenized at most (a seeded sample of larger datasets): ~1 s with a fast tokenizer


@dataclass(frozen=True)
class ReplySpan:
    """One tokenized conversation: its length and where its reply lies, tokens ``[start, end)``; ``end - 1`` is the
    reply's last token (its end-of-turn token)."""

    length: int
    start: int
    end: int


@dataclass(frozen=True)
class TruncationCounts:
    """How many of ``examples`` conversations ``max_length`` cuts, and how deep (keep-start truncation)."""

    examples: int
    max_length: int
    over_max_length: int  # longer than max_length
    reply_lost: int  # the reply starts at or after max_length: nothing of it is trained (TRL drops the example)
    end_lost: int  # part of the reply kept, its end-of-turn token cut
    tokens_for_every_reply: int  # the smallest max_length that keeps every reply's end token
    sampled_from: int | None = None  # the dataset's size when the counts come from a sample of it

    def as_dict(self) -> dict:
        return asdict(self)


def truncation_counts(spans: Iterable[ReplySpan], max_length: int) -> TruncationCounts:
    """Count, for keep-start truncation to ``max_length``, the conversations cut, those whose reply is cut away
    entirely and those that keep part of their reply but lose its end-of-turn token."""
    spans = list(spans)
    return TruncationCounts(
        examples=len(spans),
        max_length=max_length,
        over_max_length=sum(s.length > max_length for s in spans),
        reply_lost=sum(s.start >= max_length for s in spans),
        end_lost=sum(s.start < max_length < s.end for s in spans),
        tokens_for_every_reply=max((s.end for s in spans), default=0),
    )


def reply_span(tokenizer: PreTrainedTokenizerBase, messages: Sequence[dict], chat_template: str | None = None,
               ) -> ReplySpan:
    """Tokenize ``messages`` as TRL's SFTTrainer does (``apply_chat_template`` with the template it trains with:
    ``chat_template``, or the tokenizer's own when None) and locate the reply.

    With ``{% generation %}`` markers the reply is the assistant mask TRL trains on, from the first assistant token to
    the last (the end-of-turn token; several assistant turns count as one reply). Without them, it starts where the
    conversation departs from its prompt rendered with the generation prompt (as TRL finds a completion) and ends at
    its last EOS token (or the sequence's end)."""
    template = chat_template or tokenizer.chat_template
    if has_generation_markers(template):
        rendered = tokenizer.apply_chat_template(list(messages), chat_template=chat_template, tokenize=True,
                                                 return_dict=True, return_assistant_tokens_mask=True)
        ids, mask = rendered["input_ids"], rendered["assistant_masks"]
        trained = [i for i, bit in enumerate(mask) if bit]
        if trained:
            return ReplySpan(length=len(ids), start=trained[0], end=trained[-1] + 1)
    else:
        ids = tokenizer.apply_chat_template(list(messages), chat_template=chat_template, tokenize=True,
                                            return_dict=True)["input_ids"]
    prompt = tokenizer.apply_chat_template(list(messages[:-1]), chat_template=chat_template, tokenize=True,
                                           return_dict=True, add_generation_prompt=True)["input_ids"]
    start = common_prefix_length(prompt, ids)
    eos = [i for i in range(start, len(ids)) if ids[i] == tokenizer.eos_token_id]
    return ReplySpan(length=len(ids), start=start, end=eos[-1] + 1 if eos else len(ids))


def measure_truncation(dataset: Dataset, tokenizer: PreTrainedTokenizerBase, max_length: int, *,
                       chat_template: str | None = None, seed: int = 0,
                       sample_size: int = SAMPLE_SIZE) -> TruncationCounts:
    """:func:`truncation_counts` over a ``messages`` dataset, or over a seeded sample of ``sample_size`` of its rows
    when it has more (the counts are then the sample's; ``sampled_from`` says of how many)."""
    size = len(dataset)
    sampled = size > sample_size
    if sampled:
        dataset = dataset.select(sorted(random.Random(seed).sample(range(size), sample_size)))
    counts = truncation_counts((reply_span(tokenizer, messages, chat_template) for messages in dataset["messages"]),
                               max_length)
    return replace(counts, sampled_from=size) if sampled else counts


def truncation_warning(counts: TruncationCounts, knob: str) -> str | None:
    """A warning naming ``knob`` (the recipe key to raise) when ``max_length`` cuts into any reply; None when not."""
    if not counts.reply_lost and not counts.end_lost:
        return None
    of = f"{counts.examples} conversations" + (f" (a sample of {counts.sampled_from})" if counts.sampled_from else "")
    lost = []
    if counts.reply_lost:
        lost.append(f"{counts.reply_lost} lose their whole reply (with assistant-only loss nothing is left to train "
                    "on, and TRL drops them)")
    if counts.end_lost:
        lost.append(f"{counts.end_lost} lose the end of their reply with its end-of-turn token (the model is not "
                    "taught to stop there)")
    return (f"max_length {counts.max_length} cuts {counts.over_max_length} of {of}: {'; '.join(lost)}. Raise {knob} "
            f"to {counts.tokens_for_every_reply} to keep every reply whole (longer sequences cost memory and time), "
            "or shorten the data")
