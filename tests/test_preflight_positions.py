"""Preflight's check that a sampling stage's prompts and its generation budget fit the model's positions: the eval
harness refused such samples only when the eval stage started, after every stage before it had trained, and the
training stages sampled past the positions silently."""

from __future__ import annotations

import re

import pytest
from conftest import TINY_RECIPE, write_recipe

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
