"""Preflight's check that the task holds as many distinct held-out prompts as each stage samples: a small task space
(one family, few items) passed validation and preflight, and the run stopped at the first stage that sampled them,
after every stage before it had trained."""

from __future__ import annotations

import pytest
from conftest import TINY_RECIPE, write_recipe

from alignpipe.data.synthetic import evaluation_tasks
from alignpipe.pipeline.preflight import PreflightError, preflight
from alignpipe.recipe import load_recipe

SMALL_TASK = {"families": ["sum"], "min_items": 2, "max_items": 2}  # 100 prompts, about 1 in 8 of them held out
SFT = {"name": "sft", "type": "sft", "max_steps": 1}


def _recipe(tmp_path, stage: dict, data: dict):
    recipe = {**TINY_RECIPE, "data": {**TINY_RECIPE["data"], **data}, "stages": [SFT, {**stage, "inputs": ["sft"]}]}
    return load_recipe(write_recipe(tmp_path, recipe))


@pytest.mark.parametrize(("stage", "key"), [
    ({"name": "eval", "type": "eval"}, "n_prompts"),
    ({"name": "bon", "type": "bon", "reward": {"source": "gold"}}, "n_prompts"),
    ({"name": "ppo", "type": "ppo", "reward": {"source": "gold"}}, "eval_prompts"),
    ({"name": "osp", "type": "osp"}, "eval_prompts"),
    ({"name": "grpo", "type": "grpo", "reward": {"source": "gold"}}, "eval_prompts"),
])
def test_more_held_out_prompts_than_the_task_holds_are_refused_before_training(tmp_path, stage, key):
    recipe = _recipe(tmp_path, {**stage, key: 64}, SMALL_TASK)
    with pytest.raises(ValueError, match="the task space is too small"):
        evaluation_tasks(recipe.data, 64, 1234)  # what the stage would have met after training
    with pytest.raises(PreflightError) as raised:
        preflight(recipe)
    problem = str(raised.value)
    assert f"stages.{stage['name']}.{key}: the stage " in problem and " 64 distinct held-out prompts of the task, " \
        "more than its families ['sum'] with 2..2 items hold: " in problem
    assert problem.endswith(f"lower {key}, raise data.max_items (or lower data.min_items), or add data.families")
    preflight(_recipe(tmp_path, {**stage, key: 8}, SMALL_TASK))


def test_a_reward_stage_sampling_its_policy_needs_its_fixed_number_of_held_out_prompts(tmp_path):
    stage = {"name": "rm", "type": "reward", "members": 2}
    with pytest.raises(PreflightError) as raised:
        preflight(_recipe(tmp_path, stage, {**SMALL_TASK, "max_items": 3}))
    problem = str(raised.value)
    assert "stages.rm: the stage samples its starting policy (to score its uncertainty against the gold reward) on " \
        "256 distinct held-out prompts" in problem  # a number no setting changes: the fixes widen the task
    assert problem.endswith("raise data.max_items (or lower data.min_items), add data.families, or give the stage a "
                            "backbone")
    preflight(_recipe(tmp_path, stage, {**SMALL_TASK, "max_items": 4}))
