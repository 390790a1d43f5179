"""Preflight's check that every reply starts within max_length: the rows are located with the chat template, as TRL's
trainers tokenize them and as the stages' length reports count them, so preflight flags exactly the rows TRL drops
(counting the raw prompt text missed the template's tokens), and a template TRL cannot train assistant-only on is
reported before any weights load."""

from __future__ import annotations

import copy
import json
import re

import pytest
from conftest import TINY_RECIPE, write_recipe
from datasets import Dataset
from test_dpo_truncation import _copy_pair
from test_sft_truncation import _copy_conversation as copy_conversation

from alignpipe.data.length_report import (
    MeasuredRows,
    ReplySpan,
    dpo_pair_spans,
    measure_pair_truncation,
    rows_without_reply,
    sft_reply_spans,
    sft_training_template,
)
from alignpipe.models.loading import activation_checkpointing_argument
from alignpipe.pipeline.preflight import PreflightError, preflight
from alignpipe.recipe import load_recipe


def _copy_conversation(k: int) -> dict:
    return {"messages": copy_conversation(k)}


# With the tiny tokenizer "copy: 1..k" is k + 1 tokens, and with the chat template the prompt TRL keeps is k + 4 tokens
# (<|user|> ... <|end|> <|assistant|>). At max_length 9 TRL drops k >= 5; the raw text alone reaches 9 only at k = 8.
MAX_LENGTH = 9
KS = range(1, 9)


def test_rows_without_reply_are_numbered_as_loaded():
    measured = MeasuredRows(rows=[2, 5, 7], spans=[ReplySpan(9, 8, 9), ReplySpan(9, 6, 9), ReplySpan(12, 9, 12)],
                            sampled_from=10)
    assert rows_without_reply(measured, 9) == [7]
    assert rows_without_reply(measured, 8) == [2, 7]
    pairs = MeasuredRows(rows=[0, 1], spans=[(ReplySpan(9, 4, 9), ReplySpan(10, 4, 10)),
                                              (ReplySpan(12, 9, 12), ReplySpan(11, 9, 11))], sampled_from=None)
    assert rows_without_reply(pairs, 9) == [1]


def test_a_sample_keeps_the_row_numbers_of_the_dataset(tokenizer):
    dataset = Dataset.from_list([_copy_pair(1 + i % 8) for i in range(40)])
    measured = dpo_pair_spans(dataset, tokenizer, seed=1, sample_size=10)
    assert len(measured.rows) == 10 and measured.sampled_from == 40 and measured.rows == sorted(measured.rows)
    for row, span in zip(measured.rows, measured.spans):  # each span is its own row's
        assert span[0].start == (1 + row % 8) + 4
    assert dpo_pair_spans(dataset, tokenizer, seed=1, sample_size=40).sampled_from is None


def test_the_training_template_is_the_one_sft_trainer_uses(tokenizer, llama_path, tmp_path):
    """The tiny template has generation markers (TRL keeps it: None); a known template without them is patched; an
    unknown one without them cannot be trained assistant-only, and SFTTrainer refuses it as the helper does."""
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig, SFTTrainer
    from trl.chat_template_utils import qwen2_5_chat_template

    def trainer_template(tok, assistant_only_loss: bool):
        args = SFTConfig(output_dir=str(tmp_path / "trainer"), max_length=32, assistant_only_loss=assistant_only_loss,
                         use_cpu=True, report_to=[], bf16=False, **activation_checkpointing_argument(False))
        return SFTTrainer(model=AutoModelForCausalLM.from_pretrained(llama_path), args=args, processing_class=tok,
                          train_dataset=Dataset.from_list([_copy_conversation(2)])).chat_template

    assert sft_training_template(tokenizer, assistant_only_loss=True) is None
    assert trainer_template(tokenizer, True) is None

    plain = copy.deepcopy(tokenizer)
    plain.chat_template = tokenizer.chat_template.replace("{% generation %}", "").replace("{% endgeneration %}", "")
    assert sft_training_template(plain, assistant_only_loss=False) is None
    with pytest.raises(ValueError, match="not training-compatible"):
        sft_training_template(plain, assistant_only_loss=True)
    with pytest.raises(ValueError, match="not training-compatible"):
        trainer_template(plain, True)

    qwen = copy.deepcopy(tokenizer)
    qwen.chat_template = qwen2_5_chat_template
    patched = sft_training_template(qwen, assistant_only_loss=True)
    assert patched is not None and "{% generation %}" in patched
    assert trainer_template(qwen, True) == patched


def _recipe(tmp_path, llama_path, stage: dict, rows: list[dict]) -> object:
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    stage = {**stage, "max_length": MAX_LENGTH, "dataset": {"source": "trl", "path": str(data)}}
    stages = ([stage] if stage["type"] == "sft" else [{"name": "sft", "type": "sft"}, {**stage, "inputs": ["sft"]}])
    return load_recipe(write_recipe(tmp_path, {"name": "lengths", "model": {"name_or_path": llama_path},
                                               "stages": stages}))


def test_preflight_flags_exactly_the_pairs_dpo_trainer_drops(tmp_path, tokenizer, llama_path):
    """Pairs k = 5..8 (rows 4..7) have a templated prompt that fills max_length; the raw text flagged only k = 8."""
    rows = [_copy_pair(k) for k in KS]
    recipe = _recipe(tmp_path, llama_path, {"name": "dpo", "type": "dpo"}, rows)
    with pytest.raises(PreflightError) as raised:
        preflight(recipe)
    message = str(raised.value)
    assert "rows.jsonl: 4 of its 8 pairs (numbered as loaded: 4, 5, 6, 7) have a prompt of at least " \
           "stages.dpo.max_length = 9 tokens with the chat template (pair 4: its reply starts at token 9" in message
    assert "TRL's DPOTrainer would drop those pairs; raise stages.dpo.max_length (to 22 to keep" in message
    # the count the dpo stage's report makes, which tests/test_dpo_truncation.py checks against TRL's own
    assert measure_pair_truncation(Dataset.from_list(rows), tokenizer, MAX_LENGTH).dropped == 4


def test_preflight_flags_the_conversations_sft_trainer_drops(tmp_path, tokenizer, llama_path):
    rows = [_copy_conversation(k) for k in KS]
    recipe = _recipe(tmp_path, llama_path, {"name": "sft", "type": "sft"}, rows)
    with pytest.raises(PreflightError, match=r"4 of its 8 conversations \(numbered as loaded: 4, 5, 6, 7\) have a "
                                             r"prompt of at least stages\.sft\.max_length = 9 tokens with the chat "
                                             r"template .*TRL's SFTTrainer would drop those conversations"):
        preflight(recipe)
    measured = sft_reply_spans(Dataset.from_list(rows), tokenizer)
    assert rows_without_reply(measured, MAX_LENGTH) == [4, 5, 6, 7]

    without = _recipe(tmp_path, llama_path, {"name": "sft", "type": "sft", "assistant_only_loss": False}, rows)
    with pytest.raises(PreflightError, match="those conversations would train on their prompt alone"):
        preflight(without)


def test_long_prompts_drop_lets_trl_drop_those_rows_with_a_warning(tmp_path, llama_path, caplog):
    """The refusal names the knob; with it, the run starts and the warning counts the rows TRL will drop."""
    rows = [_copy_pair(k) for k in KS]
    with pytest.raises(PreflightError, match=r"or set stages\.dpo\.long_prompts: drop to train without them"):
        preflight(_recipe(tmp_path, llama_path, {"name": "dpo", "type": "dpo"}, rows))
    with caplog.at_level("WARNING", logger="alignpipe"):
        preflight(_recipe(tmp_path, llama_path, {"name": "dpo", "type": "dpo", "long_prompts": "drop"}, rows))
    assert "4 of its 8 pairs (numbered as loaded: 4, 5, 6, 7)" in caplog.text
    assert "(stages.dpo.long_prompts: drop)" in caplog.text


def test_the_tiny_model_is_measured_with_the_tokenizer_the_runner_trains(tmp_path):
    """The tiny model's tokenizer does not exist before the run, but the runner trains it from the task text in well
    under a second: preflight trains the same one, so a data file is checked as for any other model (it was skipped,
    and `validate` passed a recipe whose pairs `alignpipe data` showed TRL would drop)."""
    from alignpipe.models.factory import tiny_tokenizer

    rows = [_copy_pair(k) for k in KS]
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    dpo = {"name": "dpo", "type": "dpo", "inputs": ["sft"], "max_length": 12,
           "dataset": {"source": "trl", "path": str(data)}}
    recipe = load_recipe(write_recipe(tmp_path, {"name": "tiny-lengths", "model": {"name_or_path": "tiny"},
                                                 "stages": [{"name": "sft", "type": "sft"}, dpo]}))
    lost = rows_without_reply(dpo_pair_spans(Dataset.from_list(rows), tiny_tokenizer(recipe)), 12)
    assert 0 < len(lost) < len(rows)
    with pytest.raises(PreflightError, match=rf"{len(lost)} of its {len(rows)} pairs \(numbered as loaded: "
                                             rf"{', '.join(map(str, lost))}\) have a prompt of at least "
                                             r"stages\.dpo\.max_length = 12 tokens"):
        preflight(recipe)


def test_preflight_passes_when_every_reply_starts_within_max_length(tmp_path, llama_path):
    preflight(_recipe(tmp_path, llama_path, {"name": "dpo", "type": "dpo"}, [_copy_pair(k) for k in range(1, 5)]))


def test_a_template_trl_cannot_patch_is_reported_before_the_stage(tmp_path, tokenizer, llama_path):
    """No generation markers and unknown to TRL: SFTTrainer would raise after the model loaded; preflight names the
    knob, and does not report the same template again as a dataset problem."""
    from alignpipe.models.tiny import build_tiny_model, save_tiny_checkpoint

    plain = copy.deepcopy(tokenizer)
    plain.chat_template = tokenizer.chat_template.replace("{% generation %}", "").replace("{% endgeneration %}", "")
    model = build_tiny_model(plain, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64,
                             max_position_embeddings=64, seed=0)
    path = str(save_tiny_checkpoint(model, plain, tmp_path / "plain"))
    recipe = _recipe(tmp_path, path, {"name": "sft", "type": "sft"}, [_copy_conversation(8)])
    with pytest.raises(PreflightError) as raised:
        preflight(recipe)
    assert [p.split(":")[0] for p in raised.value.problems] == ["stages.sft.assistant_only_loss"]
    assert "set stages.sft.assistant_only_loss: false" in raised.value.problems[0]
    preflight(_recipe(tmp_path, path, {"name": "sft", "type": "sft", "assistant_only_loss": False},
                      [_copy_conversation(2)]))


def test_a_trl_reward_stage_whose_pairs_are_all_longer_than_max_length_is_refused(tmp_path, tokenizer, llama_path,
                                                                                   capsys):
    """TRL's RewardTrainer drops pairs longer than max_length (it does not truncate them): with none left it would
    fail after loading the model. The ensemble keeps the end of long texts, so the same rows pass with it."""
    from alignpipe.cli import main
    from alignpipe.data.preference import is_reward_heldout

    rows = [_copy_pair(k) for k in range(5, 45)]  # every templated prompt alone fills max_length
    reward = {"name": "reward", "type": "reward", "members": 1}
    recipe = _recipe(tmp_path, llama_path, {**reward, "implementation": "trl"}, rows)
    with pytest.raises(PreflightError, match=r"rows\.jsonl: none of its \d+ training pairs fits in "
                                             r"stages\.reward\.max_length = 9 tokens .*TRL's RewardTrainer "
                                             r"\(implementation: trl\) drops every pair longer than max_length"):
        preflight(recipe)
    assert main(["data", str(tmp_path / "recipe.yaml")]) == 2
    assert "none of its" in capsys.readouterr().err

    preflight(_recipe(tmp_path, llama_path, reward, rows))  # the ensemble
    assert not is_reward_heldout("copy: 1", 0.1)  # trained on: 7 and 8 tokens, within max_length
    preflight(_recipe(tmp_path, llama_path, {**reward, "implementation": "trl"}, [_copy_pair(1), *rows]))


@pytest.mark.parametrize(("stage", "noun", "fate"), [
    ({"name": "sft", "type": "sft"}, "conversations", "TRL's SFTTrainer would drop those conversations"),
    ({"name": "dpo", "type": "dpo", "inputs": ["sft"]}, "pairs", "TRL's DPOTrainer would drop those pairs"),
])
def test_the_synthetic_tasks_rows_are_checked_for_room_too(tmp_path, stage, noun, fate):
    """With a max_length below the task's prompts TRL drops every row of the built-in task, and the stage stopped on
    the empty sampler's error ('num_samples should be a positive integer value') after writing the run directory;
    preflight refuses it as it refuses a data file's rows. long_prompts: drop is refused on the task, so the only fix
    named is max_length."""
    stages = [{"name": "sft", "type": "sft"}] if stage["type"] == "dpo" else []
    recipe = {**TINY_RECIPE, "stages": [*stages, {**stage, "max_length": 6}]}
    with pytest.raises(PreflightError) as raised:
        preflight(load_recipe(write_recipe(tmp_path, recipe)))
    problem = str(raised.value)
    assert f"stages.{stage['name']}.dataset: the synthetic task's rows: " in problem
    assert fate in problem and "long_prompts" not in problem
    needed = int(re.search(rf"raise stages\.{stage['name']}\.max_length \(to (\d+) to keep every reply whole\)$",
                           problem).group(1))
    preflight(load_recipe(write_recipe(tmp_path, {**recipe, "stages": [*stages, {**stage, "max_length": needed}]})))
    assert noun in problem
