"""What max_length cuts from DPO pairs (alignpipe.data.length_report), checked against what TRL's DPOTrainer keeps,
and the dpo stage's report of it."""

from __future__ import annotations

import dataclasses
import json
import logging

import pytest
from conftest import TINY_RECIPE, needs_smollm2_and_hh, smollm2_recipe_stage, write_recipe
from datasets import Dataset

from alignpipe.data.length_report import (
    ReplySpan,
    measure_pair_truncation,
    pair_spans,
    pair_truncation_counts,
    pair_truncation_warning,
)
from alignpipe.models.loading import activation_checkpointing_argument


def _digits(k: int) -> str:
    return " ".join(str(d) for d in range(1, k + 1))


def _copy_pair(k: int) -> dict:
    """A conversational pair: copy 1..k; chosen 1..k, rejected 1..k+1."""
    return {"prompt": [{"role": "user", "content": f"copy: {_digits(k)}"}],
            "chosen": [{"role": "assistant", "content": _digits(k)}],
            "rejected": [{"role": "assistant", "content": _digits(k + 1)}]}


def _standard_pair(k: int) -> dict:
    """The same pair as plain strings (TRL appends EOS to the replies and tokenizes without a template)."""
    return {"prompt": f"copy: {_digits(k)}", "chosen": f" {_digits(k)}", "rejected": f" {_digits(k + 1)}"}


# With the tiny tokenizer and template pair k renders as <|user|> copy: 1..k <|end|> <|assistant|> (k + 4 tokens, the
# prompt TRL keeps) followed by 1..k <|end|> (chosen, ends at 2k + 5) or 1..k+1 <|end|> (rejected, ends at 2k + 6).
# With max_length 9: k = 1 fits (7, 8); k = 2 keeps its chosen (9) but not the rejected's <|end|> (at 10); k = 3, 4
# cut both (prompts 7, 8 < 9); k = 5's prompt is 9 tokens, so TRL drops the pair.
PAIRS = [_copy_pair(k) for k in range(1, 6)]
MAX_LENGTH = 9


def test_pair_counts_from_spans():
    pairs = [
        (ReplySpan(7, 5, 7), ReplySpan(8, 5, 8)),  # fits
        (ReplySpan(9, 6, 9), ReplySpan(10, 6, 10)),  # rejected end lost
        (ReplySpan(12, 5, 12), ReplySpan(6, 5, 6)),  # chosen end lost, rejected whole
        (ReplySpan(12, 9, 12), ReplySpan(11, 9, 11)),  # prompt fills max_length: dropped, not counted as end lost
        (ReplySpan(11, 4, 8), ReplySpan(8, 4, 8)),  # over max_length after the reply's end token: whole
    ]
    counts = pair_truncation_counts(pairs, max_length=9)
    assert (counts.pairs, counts.over_max_length, counts.dropped) == (5, 4, 1)
    assert (counts.chosen_end_lost, counts.rejected_end_lost) == (1, 1)
    assert counts.tokens_for_every_pair == 12 and counts.sampled_from is None
    whole = pair_truncation_counts(pairs, max_length=12)
    assert whole.dropped == whole.chosen_end_lost == whole.rejected_end_lost == 0


def test_spans_of_the_tiny_pairs(tokenizer):
    assert [pair_spans(tokenizer, p) for p in PAIRS] == [
        (ReplySpan(2 * k + 5, k + 4, 2 * k + 5), ReplySpan(2 * k + 6, k + 4, 2 * k + 6)) for k in range(1, 6)]
    counts = measure_pair_truncation(Dataset.from_list(PAIRS), tokenizer, MAX_LENGTH)
    assert (counts.pairs, counts.over_max_length, counts.dropped) == (5, 4, 1)
    assert (counts.chosen_end_lost, counts.rejected_end_lost, counts.tokens_for_every_pair) == (2, 3, 16)


@pytest.mark.parametrize("make_pair", [_copy_pair, _standard_pair], ids=["conversational", "standard"])
def test_counts_are_what_dpo_trainer_keeps(tokenizer, llama_path, tmp_path, make_pair):
    """TRL's own preparation and collator: the pairs it drops, and the kept ones whose chosen / rejected sequence, cut
    to max_length, no longer ends with the reply's EOS token."""
    from transformers import AutoModelForCausalLM
    from trl import DPOConfig, DPOTrainer

    rows = [make_pair(k) for k in range(1, 9)]
    dataset = Dataset.from_list(rows)
    max_length = MAX_LENGTH if make_pair is _copy_pair else 6
    counts = measure_pair_truncation(dataset, tokenizer, max_length)
    assert counts.dropped and counts.chosen_end_lost and counts.rejected_end_lost  # the check below sees each kind

    def config(length: int | None) -> DPOConfig:
        return DPOConfig(output_dir=str(tmp_path / "trainer"), max_length=length, use_cpu=True, report_to=[],
                         bf16=False, **activation_checkpointing_argument(False))

    trainer = DPOTrainer(model=AutoModelForCausalLM.from_pretrained(llama_path), args=config(max_length),
                         processing_class=tokenizer, train_dataset=dataset)
    kept = trainer.train_dataset
    assert len(kept) == counts.pairs - counts.dropped
    batch = trainer.data_collator([kept[i] for i in range(len(kept))])
    ends = [ids[mask.bool()][-1].item() for ids, mask in zip(batch["input_ids"], batch["completion_mask"])]
    chosen_ends, rejected_ends = ends[:len(kept)], ends[len(kept):]
    assert sum(end != tokenizer.eos_token_id for end in chosen_ends) == counts.chosen_end_lost
    assert sum(end != tokenizer.eos_token_id for end in rejected_ends) == counts.rejected_end_lost
    untruncated = trainer._prepare_dataset(dataset, tokenizer, config(None), "train")
    longest = max(len(row["prompt_ids"]) + max(len(row["chosen_ids"]), len(row["rejected_ids"])) for row in untruncated)
    assert counts.tokens_for_every_pair == longest  # every reply ends with its EOS token: the whole sequences


def test_large_datasets_are_measured_on_a_seeded_sample(tokenizer):
    dataset = Dataset.from_list([PAIRS[i % 5] for i in range(50)])
    counts = measure_pair_truncation(dataset, tokenizer, MAX_LENGTH, sample_size=20, seed=3)
    assert counts.pairs == 20 and counts.sampled_from == 50
    assert counts == measure_pair_truncation(dataset, tokenizer, MAX_LENGTH, sample_size=20, seed=3)
    assert "of 20 pairs (a sample of 50)" in pair_truncation_warning(counts, "stages.dpo.max_length")


def test_warning_names_the_knob_and_the_length_that_keeps_every_pair():
    counts = pair_truncation_counts([(ReplySpan(9, 6, 9), ReplySpan(10, 6, 10)),
                                     (ReplySpan(14, 9, 14), ReplySpan(13, 9, 13)),
                                     (ReplySpan(7, 5, 7), ReplySpan(8, 5, 8))], max_length=9)
    message = pair_truncation_warning(counts, "stages.dpo.max_length")
    assert message.startswith("max_length 9 cuts 2 of 3 pairs: 1 have a prompt that fills it (TRL drops them)")
    assert "0 lose the end of their chosen reply and 1 the end of their rejected reply" in message
    assert "Raise stages.dpo.max_length to 14" in message
    fits = pair_truncation_counts([(ReplySpan(7, 5, 7), ReplySpan(8, 5, 8))], max_length=8)
    assert pair_truncation_warning(fits, "k") is None


def test_the_advice_never_asks_for_more_than_the_models_positions():
    """A pair that needs more tokens than the model has positions cannot be kept whole by any max_length: the warning
    says so and asks for the data to be shortened, instead of naming a length the model cannot read."""
    counts = pair_truncation_counts([(ReplySpan(14, 9, 14), ReplySpan(13, 9, 13)),
                                     (ReplySpan(7, 5, 7), ReplySpan(8, 5, 8))], max_length=9)
    assert "Raise k to 14 " in pair_truncation_warning(counts, "k", positions=14)
    message = pair_truncation_warning(counts, "k", positions=12)
    assert "Raise k to" not in message
    assert "takes 14 tokens, past the model's 12 positions, and raising k cannot (at most to 12)" in message
    # a sample that fits, at a max_length already at the positions: what TRL dropped cannot be kept by raising it
    fits = dataclasses.replace(pair_truncation_counts([(ReplySpan(7, 5, 7), ReplySpan(8, 5, 8))], max_length=16),
                               sampled_from=3000)
    message = pair_truncation_warning(fits, "k", dropped_by_trl=4, positions=16)
    assert "Raise k" not in message and "k is already at or past them" in message


def test_a_sample_that_misses_what_trl_dropped_still_warns_with_trls_count():
    fits = pair_truncation_counts([(ReplySpan(7, 5, 7), ReplySpan(8, 5, 8))] * 20, max_length=8)
    sample = dataclasses.replace(fits, sampled_from=3000)
    assert pair_truncation_warning(sample, "k") is None
    message = pair_truncation_warning(sample, "stages.dpo.max_length", dropped_by_trl=2)
    assert message.startswith("max_length 8 cuts 0 of 20 pairs (a sample of 3000); TRL dropped 2 of all 3000")
    assert "Raise stages.dpo.max_length above 8 (the sample holds none of the examples TRL dropped" in message


def test_a_sample_with_longer_pairs_asks_for_at_least_its_longest():
    pairs = [(ReplySpan(9, 6, 9), ReplySpan(10, 6, 10)), (ReplySpan(14, 9, 14), ReplySpan(13, 9, 13))]
    sample = dataclasses.replace(pair_truncation_counts(pairs, max_length=9), sampled_from=3000)
    assert "Raise k to at least 14 (the longest in the sample" in pair_truncation_warning(sample, "k")


@pytest.mark.parametrize("pairs, expected", [
    ([(ReplySpan(7, 5, 7), ReplySpan(8, 5, 8))], "max_length 9 cuts 0 of 1 pairs (a sample of 3000); TRL dropped 5"),
    ([(ReplySpan(14, 9, 14), ReplySpan(13, 9, 13))],
     "TRL dropped 5 of all 3000 pairs whose prompt fills max_length 9 (the counts above are of a sample of 1)"),
], ids=["sample saw nothing", "sample saw a drop"])
def test_the_dpo_stage_says_trls_count_once_beside_a_samples(caplog, pairs, expected):
    """The stage warns about a sample's counts before the trainer is built; TRL's count over the whole dataset comes
    after: as the whole warning when the sample showed nothing, else as one line beside it (not a second warning)."""
    from types import SimpleNamespace

    from alignpipe.trainers.dpo import _warn_with_trls_count

    ctx = SimpleNamespace(stage=SimpleNamespace(name="dpo"), dir=SimpleNamespace(name="dpo"))
    sample = dataclasses.replace(pair_truncation_counts(pairs, max_length=9), sampled_from=3000)
    with caplog.at_level(logging.WARNING, logger="alignpipe"):
        _warn_with_trls_count(ctx, sample, dropped_by_trl=5)
    assert [r.getMessage() for r in caplog.records if expected in r.getMessage()] and len(caplog.records) == 1


@pytest.mark.parametrize("positions", [None, 20])
def test_dpo_stage_logs_and_records_what_max_length_cuts(tmp_path, caplog, positions):
    """The stage warns with the length that keeps every pair whole, or, on a model with fewer positions than that
    (20 here), says that no max_length can."""
    from alignpipe.models.loading import load_tokenizer
    from alignpipe.pipeline.rundir import StageDir
    from alignpipe.pipeline.runner import Runner
    from alignpipe.recipe import load_recipe

    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(_copy_pair(k)) + "\n" for k in (1, 3, 6, 8)))
    sft, dpo = TINY_RECIPE["stages"][:2]
    few_steps = {"max_steps": 1, "per_device_train_batch_size": 2, "save_steps": 10}
    dpo = {**dpo, **few_steps, "max_length": 12, "long_prompts": "drop",  # the drop is what this test measures
           "dataset": {"source": "trl", "path": str(data)}}
    model = TINY_RECIPE["model"] if positions is None else \
        {**TINY_RECIPE["model"], "tiny": {**TINY_RECIPE["model"]["tiny"], "max_position_embeddings": positions}}
    recipe = {**TINY_RECIPE, "model": model, "stages": [{**sft, **few_steps}, dpo]}
    runner = Runner(load_recipe(write_recipe(tmp_path, recipe)), runs_dir=tmp_path / "runs", in_process=True)
    with caplog.at_level(logging.WARNING, logger="alignpipe"):
        runner.run()
    recorded = StageDir(runner.run_dir / "dpo").read_manifest()["summary"]["truncation"]
    dataset = Dataset.from_list([json.loads(line) for line in data.read_text().splitlines()])
    expected = measure_pair_truncation(dataset, load_tokenizer(str(runner.run_dir / "base" / "checkpoint")), 12)
    assert recorded == {**expected.as_dict(), "dropped_by_trl": expected.dropped}
    # prompts k + 4 = 5, 7, 10, 12; chosen ends 2k + 5 = 7, 11, 17, 21; rejected 8, 12, 18, 22: k = 6 keeps its prompt
    # and loses both ends, k = 8's prompt fills max_length
    assert (expected.over_max_length, expected.dropped) == (2, 1)
    assert (expected.chosen_end_lost, expected.rejected_end_lost) == (1, 1)
    advice = ("Raise stages.dpo.max_length to 22" if positions is None else
              "takes 22 tokens, past the model's 20 positions, and raising stages.dpo.max_length cannot")
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any(advice in message for message in warnings)
    assert positions is None or not any("max_length to 22" in message for message in warnings)


@pytest.mark.parametrize("k", [1, 2])
def test_no_warning_when_every_pair_fits(tokenizer, k):
    counts = measure_pair_truncation(Dataset.from_list([_copy_pair(k)]), tokenizer, 2 * k + 6)
    assert counts.over_max_length == 0 and pair_truncation_warning(counts, "stages.dpo.max_length") is None


@pytest.mark.slow  # ~30 s: the GGUF tokenizer alone takes 10-20 s to read
@needs_smollm2_and_hh
def test_the_smollm2_recipe_keeps_every_dpo_pair():
    """recipes/smollm2/hh-harmless-dpo.yaml's DPO max_length, measured with SmolLM2's own tokenizer (read from the
    package's GGUF file, with the recipe's chat template) on the recipe's HH pairs."""
    from alignpipe.data.preference import preference_pairs_for

    recipe, stage, tokenizer = smollm2_recipe_stage("dpo")
    dataset = preference_pairs_for(stage.dataset, recipe.data, recipe.seed)
    counts = measure_pair_truncation(dataset, tokenizer, stage.max_length)
    assert counts.pairs == 512 and counts.dropped == counts.chosen_end_lost == counts.rejected_end_lost == 0
    assert counts.tokens_for_every_pair == 1005  # as the recipe's header reports
    before = measure_pair_truncation(dataset, tokenizer, 128)  # the recipe's former setting
    assert (before.dropped, before.chosen_end_lost, before.rejected_end_lost) == (204, 62, 79)
