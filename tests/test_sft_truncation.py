"""What max_length cuts from SFT conversations (alignpipe.data.length_report), and the sft stage's report of it."""

from __future__ import annotations

import copy
import dataclasses
import json
import logging

import pytest
from conftest import TINY_RECIPE, ending_turns_with, needs_smollm2_and_hh, smollm2_recipe_stage, write_recipe
from datasets import Dataset

from alignpipe.data.length_report import (
    ReplySpan,
    measure_truncation,
    reply_span,
    truncation_counts,
    truncation_warning,
)
from alignpipe.models.loading import activation_checkpointing_argument


def _copy_conversation(k: int) -> list[dict]:
    digits = " ".join(str(d) for d in range(1, k + 1))
    return [{"role": "user", "content": f"copy: {digits}"}, {"role": "assistant", "content": digits}]


# With the tiny tokenizer "copy: 1 .. k" is 1 + k tokens and each digit one token, so conversation k renders as
# <|user|> copy: 1..k <|end|> <|assistant|> 1..k <|end|>: 2k + 5 tokens, its reply (the digits and <|end|>, the
# assistant mask) at [k + 4, 2k + 5). With max_length 8: k = 1 fits (7 tokens); k = 2, 3 keep part of the reply
# (it starts at 6, 7) but not its <|end|> (at 8, 10); k = 4, 5 lose the whole reply (it starts at 8, 9).
CONVERSATIONS = [_copy_conversation(k) for k in range(1, 6)]
MAX_LENGTH = 8


def test_counts_from_spans():
    spans = [ReplySpan(7, 5, 7), ReplySpan(9, 6, 9), ReplySpan(9, 8, 9), ReplySpan(8, 4, 8), ReplySpan(12, 3, 6)]
    counts = truncation_counts(spans, max_length=8)
    # over: lengths 9, 9, 12; reply lost: starts at 8; end lost: start < 8 < end only for (6, 9); the last one is
    # cut after its reply (a trailing turn): over max_length but its reply whole
    assert (counts.examples, counts.over_max_length, counts.reply_lost, counts.end_lost) == (5, 3, 1, 1)
    assert counts.tokens_for_every_reply == 9
    assert truncation_counts(spans, max_length=9).reply_lost == truncation_counts(spans, max_length=9).end_lost == 0


def test_counts_on_the_tiny_tokenizer_are_what_sft_trainer_keeps(tokenizer, llama_path, tmp_path):
    spans = [reply_span(tokenizer, c) for c in CONVERSATIONS]
    assert spans == [ReplySpan(2 * k + 5, k + 4, 2 * k + 5) for k in range(1, 6)]
    counts = measure_truncation(Dataset.from_list([{"messages": c} for c in CONVERSATIONS]), tokenizer, MAX_LENGTH)
    assert (counts.examples, counts.over_max_length, counts.reply_lost, counts.end_lost) == (5, 4, 2, 2)
    assert counts.tokens_for_every_reply == 15 and counts.sampled_from is None

    # TRL's own preparation: the two conversations without a reply token are dropped, two of the three kept lose <|end|>
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig, SFTTrainer

    args = SFTConfig(output_dir=str(tmp_path / "trainer"), max_length=MAX_LENGTH, assistant_only_loss=True,
                     use_cpu=True, report_to=[], bf16=False, **activation_checkpointing_argument(False))
    trainer = SFTTrainer(model=AutoModelForCausalLM.from_pretrained(llama_path), args=args, processing_class=tokenizer,
                         train_dataset=Dataset.from_list([{"messages": c} for c in CONVERSATIONS]))
    kept = trainer.train_dataset
    assert len(kept) == counts.examples - counts.reply_lost
    ends = sum(row["labels"][-1] == tokenizer.eos_token_id for row in kept)
    assert len(kept) - ends == counts.end_lost


def test_a_template_without_generation_markers_finds_the_same_replies(tokenizer):
    plain = copy.deepcopy(tokenizer)
    plain.chat_template = tokenizer.chat_template.replace("{% generation %}", "").replace("{% endgeneration %}", "")
    assert [reply_span(plain, c) for c in CONVERSATIONS] == [reply_span(tokenizer, c) for c in CONVERSATIONS]


def test_a_reply_ends_at_the_templates_end_of_turn_when_the_eos_is_another_token(tokenizer):
    """A base model given ChatML ends its turn with <|im_end|> and a newline, its EOS being another token: the reply
    ends at the end of turn, so a cut that keeps it but loses the text after it is not counted as an end lost. (The
    tiny tokenizer drops whitespace, so a word stands in for ChatML's newline.)"""
    chatml_like = ending_turns_with(tokenizer, "<|system|> copy")
    system = tokenizer.convert_tokens_to_ids("<|system|>")
    for conversation in CONVERSATIONS:
        ids = chatml_like.apply_chat_template(conversation, tokenize=True, return_dict=True)["input_ids"]
        span = reply_span(chatml_like, conversation)
        assert ids[span.end - 1] == system and span.end < span.length
    span = reply_span(chatml_like, CONVERSATIONS[1])
    assert (span.start, span.end, span.length) == (6, 9, 10)  # 2 digits and <|system|>, then "copy"
    counts = truncation_counts([span], max_length=span.end)
    assert (counts.over_max_length, counts.reply_lost, counts.end_lost) == (1, 0, 0)


def test_large_datasets_are_measured_on_a_seeded_sample(tokenizer):
    dataset = Dataset.from_list([{"messages": CONVERSATIONS[i % 5]} for i in range(50)])
    counts = measure_truncation(dataset, tokenizer, MAX_LENGTH, sample_size=20, seed=3)
    assert counts.examples == 20 and counts.sampled_from == 50
    assert counts == measure_truncation(dataset, tokenizer, MAX_LENGTH, sample_size=20, seed=3)
    assert "20 conversations (a sample of 50)" in truncation_warning(counts, "stages.sft.max_length")


def test_warning_names_the_knob_and_the_length_that_keeps_every_reply():
    counts = truncation_counts([ReplySpan(9, 6, 9), ReplySpan(13, 8, 13), ReplySpan(7, 5, 7)], max_length=8)
    message = truncation_warning(counts, "stages.sft.max_length")
    assert message.startswith("max_length 8 cuts 2 of 3 conversations: 1 lose their whole reply")
    assert "1 lose the end of their reply with its end-of-turn token" in message
    assert "Raise stages.sft.max_length to 13" in message
    assert truncation_warning(truncation_counts([ReplySpan(7, 5, 7)], max_length=8), "k") is None
    long = truncation_counts([ReplySpan(3, 1, 30)], max_length=8)
    assert "Raise k to 30 " in truncation_warning(long, "k")
    assert "takes 30 tokens, past the model's 16 positions" in truncation_warning(long, "k", positions=16)


def test_warning_says_what_a_lost_reply_means_without_assistant_only_loss():
    """Without assistant-only loss TRL keeps a conversation whose reply is cut away and trains on its prompt."""
    counts = truncation_counts([ReplySpan(9, 8, 9), ReplySpan(7, 5, 7)], max_length=8)
    assert "TRL drops them" in truncation_warning(counts, "k")
    message = truncation_warning(counts, "k", assistant_only_loss=False)
    assert "1 lose their whole reply (they train on their prompt alone)" in message and "drops" not in message


def test_a_sample_that_misses_what_trl_dropped_still_warns_with_trls_count():
    """A seeded sample may hold none of a large dataset's few over-long conversations; TRL's own count over the
    whole dataset then says so; the sample's longest (7, within max_length) says nothing of how far to raise it."""
    sample = dataclasses.replace(truncation_counts([ReplySpan(7, 5, 7)] * 20, max_length=8), sampled_from=3000)
    assert truncation_warning(sample, "k") is None and truncation_warning(sample, "k", dropped_by_trl=0) is None
    message = truncation_warning(sample, "stages.sft.max_length", dropped_by_trl=1)
    assert message.startswith("max_length 8 cuts 0 of 20 conversations (a sample of 3000); TRL dropped 1 of all 3000")
    assert "Raise stages.sft.max_length above 8 (the sample holds none of the examples TRL dropped" in message


def test_sft_stage_logs_and_records_what_max_length_cuts(tmp_path, caplog):
    from alignpipe.models.loading import load_tokenizer
    from alignpipe.pipeline.rundir import StageDir
    from alignpipe.pipeline.runner import Runner
    from alignpipe.recipe import load_recipe

    data = tmp_path / "demos.jsonl"
    data.write_text("".join(json.dumps({"messages": _copy_conversation(k)}) + "\n" for k in (1, 2, 6, 8)))
    sft = {**TINY_RECIPE["stages"][0], "max_steps": 1, "per_device_train_batch_size": 2, "save_steps": 10,
           "max_length": 12, "long_prompts": "drop", "dataset": {"source": "trl", "path": str(data)}}
    runner = Runner(load_recipe(write_recipe(tmp_path, {**TINY_RECIPE, "stages": [sft]})), runs_dir=tmp_path / "runs",
                    in_process=True)
    with caplog.at_level(logging.WARNING, logger="alignpipe"):
        runner.run()
    recorded = StageDir(runner.run_dir / "sft").read_manifest()["summary"]["truncation"]
    dataset = Dataset.from_list([json.loads(line) for line in data.read_text().splitlines()])
    expected = measure_truncation(dataset, load_tokenizer(str(runner.run_dir / "base" / "checkpoint")), 12)
    assert recorded == {**expected.as_dict(), "dropped_by_trl": expected.reply_lost}
    # lengths 2k + 5 = 7, 9, 17, 21; replies from k + 4 = 5, 6, 10, 12: k = 6 loses its end, k = 8 its whole reply
    assert (expected.over_max_length, expected.reply_lost, expected.end_lost) == (2, 1, 1)
    assert any("Raise stages.sft.max_length to" in r.getMessage() for r in caplog.records if r.levelname == "WARNING")


@pytest.mark.parametrize("k", [1, 2])
def test_no_warning_when_every_reply_fits(tokenizer, k):
    counts = measure_truncation(Dataset.from_list([{"messages": _copy_conversation(k)}]), tokenizer, 2 * k + 5)
    assert counts.over_max_length == 0 and truncation_warning(counts, "stages.sft.max_length") is None


@pytest.mark.slow  # ~30 s: the GGUF tokenizer alone takes 10-20 s to read
@needs_smollm2_and_hh
def test_the_smollm2_recipe_keeps_every_sft_reply():
    """recipes/smollm2/hh-harmless-dpo.yaml's SFT max_length, measured with SmolLM2's own tokenizer (read from the
    package's GGUF file, with the recipe's chat template) on the recipe's HH conversations."""
    from alignpipe.trainers.sft import sft_dataset_for

    recipe, stage, tokenizer = smollm2_recipe_stage("sft")
    dataset = sft_dataset_for(stage.dataset, recipe.data, recipe.seed)
    counts = measure_truncation(dataset, tokenizer, stage.max_length)
    assert counts.examples == 256 and counts.reply_lost == counts.end_lost == 0
    before = measure_truncation(dataset, tokenizer, 128)  # the recipe's former setting, as its header reports
    assert (before.over_max_length, before.reply_lost, before.end_lost) == (136, 104, 32)
