"""What cutting training sequences to ``max_length`` tokens does to their replies, measured before training.

Why: TRL tokenizes each example with the chat template and keeps its first ``max_length`` tokens
(``truncation_mode="keep_start"``), silently. ``SFTTrainer`` drops every conversation left with no token to train on:
with assistant-only loss, one whose prompt alone fills ``max_length`` loses its whole reply. ``DPOTrainer`` drops every
pair whose prompt alone fills ``max_length``. A sequence cut inside its reply loses the end-of-turn token, so the
model is not taught to stop (and DPO compares truncated replies). None of this shows in the training loss; these counts
make it visible, and the warnings say which knob to turn.

One sequence is a :class:`ReplySpan` (its length and where its reply lies), located exactly as the trainer tokenizes
it (:func:`reply_span` for SFT conversations, :func:`pair_spans` for DPO pairs); the counts come from the spans alone.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass, replace
from typing import Callable, Collection, Iterable, Sequence

from datasets import Dataset
from jinja2 import TemplateError
from transformers import PreTrainedTokenizerBase
from trl.chat_template_utils import get_training_chat_template, has_generation_markers
from trl.data_utils import common_prefix_length, is_conversational

from alignpipe.data.errors import DataError
from alignpipe.models.chat_templates import reply_end_ids

SAMPLE_SIZE = 2000  # examples tokenized at most (a seeded sample of larger datasets): ~1 s with a fast tokenizer


@dataclass(frozen=True)
class ReplySpan:
    """One tokenized sequence: its length and where its reply lies, tokens ``[start, end)``; ``end - 1`` is the
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


@dataclass(frozen=True)
class PairTruncationCounts:
    """How many of ``pairs`` DPO pairs ``max_length`` cuts, and how deep (keep-start truncation, as TRL's DPO does)."""

    pairs: int
    max_length: int
    over_max_length: int  # prompt + chosen or prompt + rejected longer than max_length
    dropped: int  # the prompt alone fills max_length: TRL's DPOTrainer drops the pair
    chosen_end_lost: int  # pairs kept whose chosen reply loses its end-of-turn token
    rejected_end_lost: int  # pairs kept whose rejected reply loses its end-of-turn token
    tokens_for_every_pair: int  # the smallest max_length that keeps both replies of every pair whole
    sampled_from: int | None = None  # the dataset's size when the counts come from a sample of it

    @property
    def cuts_a_reply(self) -> bool:
        """A pair dropped or a reply kept without its end: what :func:`pair_truncation_warning` warns about."""
        return bool(self.dropped or self.chosen_end_lost or self.rejected_end_lost)

    def as_dict(self) -> dict:
        return asdict(self)


def truncation_counts(spans: Iterable[ReplySpan], max_length: int) -> TruncationCounts:
    """Count, for keep-start truncation to ``max_length``, the sequences cut, those whose reply is cut away
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


def pair_truncation_counts(pairs: Iterable[tuple[ReplySpan, ReplySpan]], max_length: int) -> PairTruncationCounts:
    """:func:`truncation_counts` of the chosen and of the rejected sequences of (chosen, rejected) span pairs. Both
    replies of a pair start where TRL ends the shared prompt, so a reply lost is the pair dropped."""
    pairs = list(pairs)
    chosen = truncation_counts((c for c, _ in pairs), max_length)
    rejected = truncation_counts((r for _, r in pairs), max_length)
    return PairTruncationCounts(
        pairs=len(pairs),
        max_length=max_length,
        over_max_length=sum(max(c.length, r.length) > max_length for c, r in pairs),
        dropped=chosen.reply_lost,
        chosen_end_lost=chosen.end_lost,
        rejected_end_lost=rejected.end_lost,
        tokens_for_every_pair=max(chosen.tokens_for_every_reply, rejected.tokens_for_every_reply),
    )


def _ends_at_last_end(ids: Sequence[int], start: int, end_ids: Collection[int]) -> ReplySpan:
    """The span of a reply from ``start`` to the sequence's last end token (inclusive; ``end_ids``:
    :func:`alignpipe.models.chat_templates.reply_end_ids`), or to its end without one. Why not the EOS alone: a
    template whose turn ends with another special token (ChatML's ``<|im_end|>`` on a tokenizer whose EOS is
    ``<|endoftext|>``) writes text after it, which a cut there loses without losing the reply's end."""
    ends = [i for i in range(start, len(ids)) if ids[i] in end_ids]
    return ReplySpan(length=len(ids), start=start, end=ends[-1] + 1 if ends else len(ids))


def reply_span(tokenizer: PreTrainedTokenizerBase, messages: Sequence[dict], chat_template: str | None = None,
               end_ids: Collection[int] | None = None) -> ReplySpan:
    """Tokenize ``messages`` as TRL's SFTTrainer does (``apply_chat_template`` with the template it trains with:
    ``chat_template``, or the tokenizer's own when None) and locate the reply.

    With ``{% generation %}`` markers the reply is the assistant mask TRL trains on, from the first assistant token to
    the last (the end-of-turn token; several assistant turns count as one reply). Without them, it starts where the
    conversation departs from its prompt rendered with the generation prompt (as TRL finds a completion) and ends at
    its last end token (the EOS or the template's end of turn; or the sequence's end). ``end_ids``: those tokens
    (:func:`~alignpipe.models.chat_templates.reply_end_ids` of the tokenizer and template), when the caller measures
    many rows."""
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
    if end_ids is None:
        end_ids = reply_end_ids(tokenizer, chat_template)
    return _ends_at_last_end(ids, common_prefix_length(prompt, ids), end_ids)


def sft_training_template(tokenizer: PreTrainedTokenizerBase, *, assistant_only_loss: bool) -> str | None:
    """The chat template TRL 1.16's SFTTrainer trains with, for measuring before a trainer exists (preflight): with
    assistant-only loss and no ``{% generation %}`` markers in the tokenizer's template, TRL's patched copy of a
    template it knows; otherwise None (the tokenizer's own). Raises ValueError, as the trainer would, for a template
    without markers that TRL cannot patch."""
    if assistant_only_loss and not has_generation_markers(tokenizer.chat_template):
        return get_training_chat_template(tokenizer)
    return None


def pair_spans(tokenizer: PreTrainedTokenizerBase, pair: dict, end_ids: Collection[int] | None = None,
               ) -> tuple[ReplySpan, ReplySpan]:
    """Tokenize a ``prompt``/``chosen``/``rejected`` row as TRL 1.16's DPOTrainer does and locate both replies.

    Conversational rows: the prompt with the generation prompt, and prompt + reply, each through the tokenizer's chat
    template (with the row's ``tools`` and ``chat_template_kwargs``, if any); standard (string) rows: plain
    tokenization, with the EOS token appended to replies that lack it. The replies start where the tokenized prompt
    departs from either prompt + reply (TRL's shared prompt length) and end at their last end token (the EOS or the
    template's end of turn; or the sequence's end). ``end_ids`` as for :func:`reply_span`."""
    prompt, chosen, rejected = (_chat_pair_ids if is_conversational(pair) else _text_pair_ids)(tokenizer, pair)
    start = min(common_prefix_length(prompt, chosen), common_prefix_length(prompt, rejected))
    ends = reply_end_ids(tokenizer) if end_ids is None else end_ids
    return _ends_at_last_end(chosen, start, ends), _ends_at_last_end(rejected, start, ends)


def _chat_pair_ids(tokenizer: PreTrainedTokenizerBase, pair: dict) -> tuple[list[int], list[int], list[int]]:
    """Prompt (with the generation prompt), prompt + chosen and prompt + rejected through the chat template."""
    tools = json.loads(pair["tools"]) if isinstance(pair.get("tools"), str) else pair.get("tools")
    template_kwargs = {"tools": tools, **(pair.get("chat_template_kwargs") or {})}

    def ids(messages: list, **kwargs) -> list[int]:
        return tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, **template_kwargs,
                                             **kwargs)["input_ids"]

    return (ids(pair["prompt"], add_generation_prompt=True), ids(pair["prompt"] + pair["chosen"]),
            ids(pair["prompt"] + pair["rejected"]))


def _text_pair_ids(tokenizer: PreTrainedTokenizerBase, pair: dict) -> tuple[list[int], list[int], list[int]]:
    """Prompt, prompt + chosen and prompt + rejected as plain text, each reply ending with the EOS token."""
    eos = tokenizer.eos_token
    chosen, rejected = (reply if reply.endswith(eos) else reply + eos for reply in (pair["chosen"], pair["rejected"]))
    return tuple(tokenizer(text=text)["input_ids"] for text in (pair["prompt"], pair["prompt"] + chosen,
                                                                 pair["prompt"] + rejected))


@dataclass(frozen=True)
class MeasuredRows:
    """The spans of a dataset's rows (all of them, or a seeded sample): ``rows[i]`` is the row, numbered as loaded,
    that ``spans[i]`` measures (a :class:`ReplySpan`, or a (chosen, rejected) pair of them)."""

    rows: list[int]
    spans: list
    sampled_from: int | None  # the dataset's size when the rows are a sample of it


def _seeded_sample(size: int, sample_size: int, seed: int) -> list[int]:
    """All row numbers of a dataset of ``size`` rows, or a sorted seeded sample of ``sample_size`` of them."""
    return list(range(size)) if size <= sample_size else sorted(random.Random(seed).sample(range(size), sample_size))


def _roles(row: dict) -> list[str]:
    """The roles of a row's turns as the chat template sees them (``messages``, or prompt + chosen)."""
    turns = row["messages"] if "messages" in row else [*row["prompt"], *row["chosen"]]
    return [turn["role"] for turn in turns if isinstance(turn, dict)]


def _span_or_error(span_of: Callable[[dict], object], row: dict, number: int, source: str) -> object:
    """``span_of(row)``; a chat template that refuses the row (its ``raise_exception``, e.g. roles that do not
    alternate or a system turn the model has no place for) becomes a DataError naming the row and its roles, since
    the trainer would fail on the same row only after the model is loaded."""
    try:
        return span_of(row)
    except TemplateError as error:
        raise DataError(
            f"{source}: row {number} (numbered as loaded): the model's chat template refuses its turns "
            f"(roles {', '.join(_roles(row))}): {error}; fix or drop that row (for example fold a system turn into "
            "the first user turn, or merge turns so that user and assistant alternate), or use a model whose chat "
            "template accepts these roles"
        ) from error


def _measure_rows(dataset: Dataset, span_of: Callable[[dict], object], seed: int, sample_size: int,
                  source: str) -> MeasuredRows:
    """``span_of`` every row, or a seeded sample of ``sample_size`` rows of a larger dataset."""
    rows = _seeded_sample(len(dataset), sample_size, seed)
    return MeasuredRows(rows, [_span_or_error(span_of, row, number, source)
                               for number, row in zip(rows, dataset.select(rows))],
                        len(dataset) if len(rows) < len(dataset) else None)


def sft_reply_spans(dataset: Dataset, tokenizer: PreTrainedTokenizerBase, *, chat_template: str | None = None,
                    seed: int = 0, sample_size: int = SAMPLE_SIZE, source: str = "dataset") -> MeasuredRows:
    """:func:`reply_span` of every ``messages`` row, or of a seeded sample of ``sample_size`` rows of a larger
    dataset. A row the chat template refuses raises a DataError naming ``source`` and the row."""
    ends = reply_end_ids(tokenizer, chat_template)  # once: two template renders per call
    return _measure_rows(dataset, lambda row: reply_span(tokenizer, row["messages"], chat_template, ends), seed,
                         sample_size, source)


def dpo_pair_spans(dataset: Dataset, tokenizer: PreTrainedTokenizerBase, *, seed: int = 0,
                   sample_size: int = SAMPLE_SIZE, source: str = "dataset") -> MeasuredRows:
    """:func:`pair_spans` of every preference row, or of a seeded sample of ``sample_size`` rows of a larger
    dataset. A row the chat template refuses raises a DataError naming ``source`` and the row."""
    ends = reply_end_ids(tokenizer)  # once: two template renders per call
    return _measure_rows(dataset, lambda pair: pair_spans(tokenizer, pair, ends), seed, sample_size, source)


def rows_without_reply(measured: MeasuredRows, max_length: int) -> list[int]:
    """The rows (numbered as loaded) whose reply starts at or after ``max_length``: keep-start truncation leaves
    nothing of it (for a pair, both replies start at the shared prompt's end)."""
    return [row for row, span in zip(measured.rows, measured.spans)
            if (span[0] if isinstance(span, tuple) else span).start >= max_length]


def require_reward_pairs_within(measured: MeasuredRows, max_length: int, heldout: Sequence[bool], *, source: str,
                                stage: str) -> None:
    """Raise a DataError when none of the measured pairs a reward stage trains on (``heldout[row]`` false) has
    prompt + chosen and prompt + rejected within ``max_length`` tokens.

    Why: TRL's RewardTrainer drops longer pairs instead of truncating them (``implementation: trl``), so with none
    left it has nothing to train on, and fails only after the model is loaded. The lengths are :func:`pair_spans`',
    which tokenize each sequence as the RewardTrainer does (chat template, or text with the EOS token appended)."""
    trained = [(row, max(c.length, r.length)) for row, (c, r) in zip(measured.rows, measured.spans) if not heldout[row]]
    if not trained or any(length <= max_length for _, length in trained):
        return
    shortest = min(length for _, length in trained)
    of = (f"{len(trained)} training pairs measured (a seeded sample of its {measured.sampled_from} pairs)"
          if measured.sampled_from else f"its {len(trained)} training pairs")
    raise DataError(
        f"{source}: none of {of} fits in stages.{stage}.max_length = {max_length} tokens (the shortest, prompt + its "
        f"longer reply tokenized as the trainer does, takes {shortest}), and TRL's RewardTrainer (implementation: "
        "trl) drops every pair longer than max_length instead of truncating it, so it would have nothing to train on; "
        f"raise stages.{stage}.max_length (to at least {shortest}), use implementation: ensemble (it keeps the end "
        "of long texts), or shorten the data"
    )


def measure_truncation(dataset: Dataset, tokenizer: PreTrainedTokenizerBase, max_length: int, *,
                       chat_template: str | None = None, seed: int = 0,
                       sample_size: int = SAMPLE_SIZE) -> TruncationCounts:
    """:func:`truncation_counts` over a ``messages`` dataset, or over a seeded sample of ``sample_size`` of its rows
    when it has more (the counts are then the sample's; ``sampled_from`` says of how many)."""
    measured = sft_reply_spans(dataset, tokenizer, chat_template=chat_template, seed=seed, sample_size=sample_size)
    return replace(truncation_counts(measured.spans, max_length), sampled_from=measured.sampled_from)


def measure_pair_truncation(dataset: Dataset, tokenizer: PreTrainedTokenizerBase, max_length: int, *,
                            seed: int = 0, sample_size: int = SAMPLE_SIZE) -> PairTruncationCounts:
    """:func:`pair_truncation_counts` over a TRL preference dataset, or over a seeded sample of ``sample_size`` of
    its rows when it has more (the counts are then the sample's; ``sampled_from`` says of how many)."""
    measured = dpo_pair_spans(dataset, tokenizer, seed=seed, sample_size=sample_size)
    return replace(pair_truncation_counts(measured.spans, max_length), sampled_from=measured.sampled_from)


def _measured(count: int, noun: str, sampled_from: int | None) -> str:
    return f"{count} {noun}" + (f" (a sample of {sampled_from})" if sampled_from else "")


def _advice(knob: str, tokens: int, whole: str, sampled_from: int | None, max_length: int,
            positions: int | None = None) -> str:
    """How far to raise ``knob``: exact for a whole dataset; from a sample, only a lower bound (its longest), and
    no number at all when the sample fits (TRL's drops lie outside it). Never past the model's ``positions`` (when
    known): a length the model cannot read is no fix, so the advice is then to shorten or drop the longest rows."""
    unknown = sampled_from and tokens <= max_length  # the sample fits: how long the rows TRL dropped are is unknown
    if positions is not None and (tokens > positions or (unknown and max_length >= positions)):
        length = f"at least {tokens}" if sampled_from else str(tokens)
        needs = (f"rows longer than {max_length}" if unknown else f"keeping {whole} whole takes {length} tokens")
        where = (f"{knob} is already at or past them" if max_length >= positions else
                 f"raising {knob} cannot (at most to {positions})")
        return (f"{needs[0].upper()}{needs[1:]}, past the model's {positions} positions, and {where}: shorten the "
                "longest rows or leave them out of the data")
    if unknown:
        to = (f"above {max_length} (the sample holds none of the examples TRL dropped, so how far is not known; "
              "measure the whole dataset with alignpipe.data.length_report and sample_size=len(dataset))")
    elif sampled_from:
        to = f"to at least {tokens} (the longest in the sample; the whole dataset may need more)"
    else:
        to = f"to {tokens}"
    return f"Raise {knob} {to} to keep {whole} whole (longer sequences cost memory and time), or shorten the data"


def _dropped_by_trl(dropped: int | None, size: int | None) -> str:
    """TRL's own count over the whole dataset, beside a sample's counts (it sees every example, the sample not)."""
    return f"; TRL dropped {dropped} of all {size}" if dropped and size else ""


def truncation_warning(counts: TruncationCounts, knob: str, *, assistant_only_loss: bool = True,
                       dropped_by_trl: int | None = None, positions: int | None = None) -> str | None:
    """A warning naming ``knob`` (the recipe key to raise) when ``max_length`` cuts into any reply or TRL dropped a
    conversation (``dropped_by_trl``, its count over the whole dataset, which a sample's counts can miss); None when
    not. A reply cut away entirely leaves nothing to train under ``assistant_only_loss`` (TRL drops the example);
    without it the example trains on its prompt alone. ``positions``: the model's, when known; the advice to raise
    ``knob`` goes no further."""
    if not counts.reply_lost and not counts.end_lost and not dropped_by_trl:
        return None
    lost = []
    if counts.reply_lost:
        fate = ("with assistant-only loss nothing is left to train on, and TRL drops them" if assistant_only_loss
                else "they train on their prompt alone")
        lost.append(f"{counts.reply_lost} lose their whole reply ({fate})")
    if counts.end_lost:
        lost.append(f"{counts.end_lost} lose the end of their reply with its end-of-turn token (the model is not "
                    "taught to stop there)")
    cut = (f"{counts.over_max_length} of {_measured(counts.examples, 'conversations', counts.sampled_from)}"
           f"{': ' + '; '.join(lost) if lost else ''}")
    return (f"max_length {counts.max_length} cuts {cut}"
            f"{_dropped_by_trl(dropped_by_trl, counts.sampled_from or counts.examples)}. "
            + _advice(knob, counts.tokens_for_every_reply, "every reply", counts.sampled_from, counts.max_length,
                      positions))


def pair_truncation_warning(counts: PairTruncationCounts, knob: str, *, dropped_by_trl: int | None = None,
                            positions: int | None = None) -> str | None:
    """A warning naming ``knob`` (the recipe key to raise) when ``max_length`` drops a pair or cuts into a reply, or
    TRL dropped a pair (``dropped_by_trl``, its count over the whole dataset, which a sample's counts can miss); None
    when not. ``positions``: the model's, when known; the advice to raise ``knob`` goes no further."""
    if not counts.cuts_a_reply and not dropped_by_trl:
        return None
    lost = []
    if counts.dropped:
        lost.append(f"{counts.dropped} have a prompt that fills it (TRL drops them)")
    if counts.chosen_end_lost or counts.rejected_end_lost:
        lost.append(f"of those kept, {counts.chosen_end_lost} lose the end of their chosen reply and "
                    f"{counts.rejected_end_lost} the end of their rejected reply, with its end-of-turn token (DPO then "
                    "compares cut-off replies)")
    cut = f"{counts.over_max_length} of {_measured(counts.pairs, 'pairs', counts.sampled_from)}"
    return (f"max_length {counts.max_length} cuts {cut}{': ' + '; '.join(lost) if lost else ''}"
            f"{_dropped_by_trl(dropped_by_trl, counts.sampled_from or counts.pairs)}. "
            + _advice(knob, counts.tokens_for_every_pair, "both replies of every pair", counts.sampled_from,
                      counts.max_length, positions))
