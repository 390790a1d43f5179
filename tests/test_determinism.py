"""The same recipe and seed twice gives the same leaderboard.json (timestamps and run-directory paths aside) on CPU:
every stage type that feeds the leaderboard (SFT, reward ensemble, DPO, PPO, evaluation) is reproducible."""

from __future__ import annotations

import json
import shutil

from conftest import TINY_RECIPE, write_recipe

from alignpipe.pipeline.runner import Runner
from alignpipe.recipe import load_recipe

STAGES = [
    TINY_RECIPE["stages"][0],
    {"name": "reward", "type": "reward", "inputs": ["sft"], "members": 2, "top_layers": 1, "learning_rate": 1e-3,
     "per_device_train_batch_size": 16, "max_length": 48},
    TINY_RECIPE["stages"][1],
    {"name": "ppo", "type": "ppo", "inputs": ["sft", "reward"], "total_steps": 3, "rollout_batch_size": 16,
     "mini_batch_size": 8, "ppo_epochs": 1, "learning_rate": 1e-3, "max_new_tokens": 8, "eval_every": 3,
     "eval_prompts": 16, "save_steps": 100},
    {**TINY_RECIPE["stages"][2], "inputs": ["sft", "dpo", "ppo", "reward"]},
]


def _fresh_leaderboard(runs, tmp_path) -> dict:
    """Run the recipe from nothing into ``runs`` (removed first) and return its leaderboard without the date."""
    shutil.rmtree(runs, ignore_errors=True)
    recipe = load_recipe(write_recipe(tmp_path, {**TINY_RECIPE, "stages": STAGES}))
    runner = Runner(recipe, runs_dir=runs, in_process=True)
    assert {o.action for o in runner.run()} == {"ran"}
    board = json.loads((runner.run_dir / "leaderboard.json").read_text())
    board.pop("date")
    return board


def test_same_recipe_and_seed_twice_give_the_same_leaderboard(tmp_path) -> None:
    # Same place both times: the leaderboard names each checkpoint by its path.
    first = _fresh_leaderboard(tmp_path / "runs", tmp_path)
    second = _fresh_leaderboard(tmp_path / "runs", tmp_path)
    assert sorted(c["name"] for c in first["checkpoints"]) == ["base", "dpo", "ppo", "sft"]
    assert first["reward_models"]  # the reward ensemble's row is part of what must repeat
    assert first == second
