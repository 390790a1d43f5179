"""The command line: --help texts, validate exit codes and messages, and one real end-to-end run via subprocesses."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import REPO, TINY_RECIPE, write_recipe

from alignpipe.cli import main


@pytest.mark.parametrize("argv, expected", [
    (["--help"], "Staged RLHF"),
    (["run", "--help"], "--resume"),
    (["validate", "--help"], "without loading any weights"),
    (["eval", "--help"], "held-out prompts"),
])
def test_help_explains_each_command(argv, expected, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 0
    assert expected in capsys.readouterr().out


def test_validate_accepts_the_quickstart(capsys):
    assert main(["validate", str(REPO / "recipes" / "quickstart.yaml")]) == 0
    assert "sft(sft) -> reward(reward) -> dpo(dpo) -> osp(osp) -> ppo(ppo) -> eval(eval)" in capsys.readouterr().out


def test_validate_rejects_a_bad_override_naming_file_and_key(tiny_recipe_path, capsys):
    assert main(["validate", str(tiny_recipe_path), "stages.dpo.betta=0.2"]) == 2
    err = capsys.readouterr().err
    assert str(tiny_recipe_path) in err and "stages.dpo.betta" in err and "did you mean 'beta'" in err


def test_overrides_may_follow_options(tiny_recipe_path, capsys):
    assert main(["validate", str(tiny_recipe_path), "--print", "stages.dpo.beta=0.25"]) == 0
    assert "beta: 0.25" in capsys.readouterr().out


def test_run_end_to_end_through_stage_processes(tmp_path):
    """The real path: `alignpipe run` launching pipelines/<type>.py processes, then a second run that skips all."""
    recipe = {**TINY_RECIPE, "stages": [
        {**TINY_RECIPE["stages"][0], "max_steps": 4, "save_steps": 4},
        {**TINY_RECIPE["stages"][1], "max_steps": 2, "save_steps": 2},
        {**TINY_RECIPE["stages"][2], "n_prompts": 8},
    ]}
    recipe_path = write_recipe(tmp_path, recipe)
    command = [sys.executable, "-m", "alignpipe.cli", "run", str(recipe_path), "--runs-dir", str(tmp_path / "runs")]
    first = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "pipelines/sft.py" in first.stderr
    board = json.loads((tmp_path / "runs" / "tiny" / "leaderboard.json").read_text())
    assert board["schema_version"] == "1.0" and len(board["checkpoints"]) == 3
    second = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0 and second.stderr.count("skipped") >= 3
