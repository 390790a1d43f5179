"""Preflight's check that a sampling stage's prompts and its generation budget fit the model's positions: the eval
harness refused such samples only when the eval stage started, after every stage before it had trained, and the
training stages sampled past the positions silently."""

from __future__ import annotations

import re

import pytest
from conftest import TINY_RECIPE, ending_turns_with, write_recipe

from alignpipe.data.synthetic import evaluation_tasks
from alignpipe.evaluation.generation import render_prompts
from alignpipe.models.factory import tiny_tokenizer
from alignpipe.pipeline.preflight import PreflightError, preflight
from alignpipe.recipe import load_recipe

POSITIONS = TINY_RECIPE["model"]["tiny"]["max_position_embeddings"]
SFT = {"name": "sft", "type": "sft", "max_steps": 1}


def _recipe(tmp_path, stage: dict, model: dict | None = None, data: dict | None = None):
    recipe = {**TINY_RECIPE, "model": model or TINY_RECIPE["model"], "data": {**TINY_RECIPE["data"], **(data or {})},
              "stages": [SFT, {**stage, "inputs": ["sft"]}]}
    return load_recipe(write_recipe(tmp_path, recipe))


def _room(error: PreflightError, key: str) -> int:
    """The budget the refusal says fits."""
    return int(re.search(rf"lower {key} to (\d+) or less", str(error)).group(1))


@pytest.mark.parametrize(("stage", "key"), [
    ({"name": "ppo", "type": "ppo", "reward": {"source": "gold"}}, "max_new_tokens"),
    ({"name": "osp", "type": "osp"}, "max_new_tokens"),
    ({"name": "grpo", "type": "grpo", "reward": {"source": "gold"}}, "max_completion_length"),
    ({"name": "eval", "type": "eval"}, "max_new_tokens"),
])
def test_a_budget_past_the_tiny_models_positions_is_refused_and_the_one_it_names_fits(tmp_path, stage, key):
    with pytest.raises(PreflightError) as raised:
        preflight(_recipe(tmp_path, {**stage, key: POSITIONS}))
    problem = str(raised.value)
    assert f"stages.{stage['name']}.{key}: the recipe's task has prompts of " in problem
    assert f"past the {POSITIONS} of the tiny model" in problem
    assert "or raise model.tiny.max_position_embeddings" in problem
    room = _room(raised.value, key)
    assert 0 < room < POSITIONS
    preflight(_recipe(tmp_path, {**stage, key: room}))  # the boundary: prompt + budget = the positions
    with pytest.raises(PreflightError):
        preflight(_recipe(tmp_path, {**stage, key: room + 1}))


def test_the_measured_prompt_bounds_the_prompts_the_stages_draw(tmp_path):
    """The longest prompt preflight measures is at least every eval prompt's length, so a recipe preflight passes is
    never refused by the eval harness's own check (which measures the prompts it samples)."""
    with pytest.raises(PreflightError) as raised:
        preflight(_recipe(tmp_path, {"name": "eval", "type": "eval", "max_new_tokens": POSITIONS}))
    longest = POSITIONS - _room(raised.value, "max_new_tokens")
    recipe = _recipe(tmp_path, {"name": "eval", "type": "eval"})
    tokenizer = tiny_tokenizer(recipe)
    prompts = [task.prompt for task in evaluation_tasks(recipe.data, 2000, 7)]
    drawn = max(len(tokenizer(text, add_special_tokens=False)["input_ids"])
                for text in render_prompts(tokenizer, prompts))
    assert drawn == longest  # 2000 prompts reach the longest; none is longer


def test_longer_task_prompts_leave_less_room(tmp_path):
    rooms = []
    for max_items in (6, 12):
        with pytest.raises(PreflightError) as raised:
            preflight(_recipe(tmp_path, {"name": "eval", "type": "eval", "max_new_tokens": POSITIONS},
                              data={"max_items": max_items}))
        assert f"data.max_items {max_items}" in str(raised.value)
        rooms.append(_room(raised.value, "max_new_tokens"))
    assert rooms[1] < rooms[0]


def test_a_local_models_positions_are_read_from_its_config(tmp_path, llama_path):
    stage = {"name": "eval", "type": "eval", "max_new_tokens": 128}  # the checkpoint has 128 positions
    with pytest.raises(PreflightError) as raised:
        preflight(_recipe(tmp_path, stage, model={"name_or_path": llama_path}))
    problem = str(raised.value)
    assert f"past the 128 of {llama_path} (max_position_embeddings)" in problem
    assert "model.tiny" not in problem
    preflight(_recipe(tmp_path, {**stage, "max_new_tokens": _room(raised.value, "max_new_tokens")},
                      model={"name_or_path": llama_path}))


def _tiny(positions: int) -> dict:
    return {**TINY_RECIPE["model"], "tiny": {**TINY_RECIPE["model"]["tiny"], "max_position_embeddings": positions}}


def test_a_reward_stage_that_samples_its_policy_is_checked_at_the_harness_budget(tmp_path):
    """A reward stage on the task without a backbone samples its starting policy (24 new tokens, the harness's
    default) to score its uncertainty against gold; no key sets that budget, so the fixes are the data's and the
    model's."""
    stage = {"name": "rm", "type": "reward", "members": 2}
    with pytest.raises(PreflightError) as raised:
        preflight(_recipe(tmp_path, stage, model=_tiny(30)))
    problem = str(raised.value)
    assert "stages.rm: the recipe's task has prompts of " in problem
    assert "sampling its starting policy (24 new tokens, to score its uncertainty against the gold reward)" in problem
    assert problem.endswith("past the 30 of the tiny model: lower data.max_items or raise "
                            "model.tiny.max_position_embeddings")
    preflight(_recipe(tmp_path, stage, model=_tiny(64)))


def test_no_budget_is_suggested_when_the_prompts_alone_fill_the_positions(tmp_path):
    with pytest.raises(PreflightError) as raised:
        preflight(_recipe(tmp_path, {"name": "eval", "type": "eval", "max_new_tokens": 1,
                                     "implicit_reward_pairs": 0}, model=_tiny(10)))
    assert "lower max_new_tokens" not in str(raised.value)
    assert str(raised.value).endswith("lower data.max_items or raise model.tiny.max_position_embeddings")


def test_a_kept_truncated_reply_counts_its_end_of_turn_token(tmp_path):
    """truncation_samples: keep trains a cut reply with the template's end of turn appended (one token here), so at
    the boundary of the sampled tokens alone its training row runs one position past."""
    osp = {"name": "osp", "type": "osp", "judge": "gold"}
    with pytest.raises(PreflightError) as raised:
        preflight(_recipe(tmp_path, {**osp, "max_new_tokens": POSITIONS}))
    room = _room(raised.value, "max_new_tokens")
    preflight(_recipe(tmp_path, {**osp, "max_new_tokens": room}))
    with pytest.raises(PreflightError, match=rf"and the 1 end-of-turn token\(s\) a kept truncated reply trains with "
                                             rf"a sample reaches {POSITIONS + 1} positions.*lower max_new_tokens to "
                                             rf"{room - 1} or less"):
        preflight(_recipe(tmp_path, {**osp, "max_new_tokens": room, "truncated_samples": "keep"}))
    with pytest.raises(PreflightError, match=r"and the 1 end-of-turn token\(s\) a kept truncated reply trains with"):
        preflight(_recipe(tmp_path, {**osp, "max_new_tokens": room, "truncated_samples": "reject"}))
    # a max_length within the positions cuts the row before its end of turn: nothing trains past them
    preflight(_recipe(tmp_path, {**osp, "max_new_tokens": room, "truncated_samples": "keep", "max_length": 48}))


def test_a_template_that_refuses_an_assistant_turn_is_refused_where_a_kept_reply_trains(tokenizer):
    """Such a stage trains its samples as conversations, and would fail on the template after every stage before it
    had trained (it returned no end-of-turn tokens and let the run start)."""
    from alignpipe.pipeline.preflight import _reply_end_tokens

    refusing = ending_turns_with(tokenizer, "<|end|>")
    refusing.chat_template = ("{%- for m in messages -%}{%- if m['role'] == 'assistant' -%}"
                              "{{ raise_exception('no assistant turns') }}{%- endif -%}{{ m['content'] }}"
                              "{%- endfor -%}{%- if add_generation_prompt -%}<|assistant|>{%- endif -%}")
    with pytest.raises(ValueError, match="the model's chat template raises on an assistant turn"):
        _reply_end_tokens(refusing)
    assert _reply_end_tokens(tokenizer) == 1  # the tiny template's <|end|>


def test_a_self_judge_whose_prompts_run_past_the_positions_is_warned_of(tmp_path, caplog):
    osp = {"name": "osp", "type": "osp", "judge": "self", "max_new_tokens": 24}
    with caplog.at_level("WARNING", logger="alignpipe"):
        preflight(_recipe(tmp_path, osp, model=_tiny(128)))
    assert "stages.osp: its self-judge's prompts hold the task prompt and two replies of up to max_new_tokens 24" \
        in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="alignpipe"):
        preflight(_recipe(tmp_path, {**osp, "max_new_tokens": 4}, model=_tiny(128)))
    assert "self-judge" not in caplog.text


def test_implicit_reward_pairs_that_run_past_the_positions_are_refused_before_training(tmp_path):
    """The eval stage's check on its implicit-reward pairs (prompt and reply), made by preflight with the same pairs."""
    stage = {"name": "eval", "type": "eval", "max_new_tokens": 2}
    with pytest.raises(PreflightError) as raised:
        preflight(_recipe(tmp_path, stage, model=_tiny(16)))
    assert re.search(r"stages\.eval\.implicit_reward_pairs: the stage scores 256 held-out pairs of the task as "
                     r"conversations of up to (\d+) tokens \(prompt and reply, in the model's chat template\), past "
                     r"the 16 of the tiny model: set implicit_reward_pairs: 0, lower data\.max_items, or raise "
                     r"model\.tiny\.max_position_embeddings", str(raised.value))
    preflight(_recipe(tmp_path, {**stage, "implicit_reward_pairs": 0}, model=_tiny(16)))
