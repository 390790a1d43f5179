"""Tiny SFT and DPO runs through TRL learn: their losses go down and DPO separates chosen from rejected."""

from __future__ import annotations

import json
import math

from alignpipe.pipeline.rundir import StageDir


def _metrics(run_dir, stage):
    return [json.loads(line) for line in StageDir(run_dir / stage).metrics.read_text().splitlines()]


def test_sft_loss_goes_down(completed_tiny_run):
    runner, _ = completed_tiny_run
    losses = [m["loss"] for m in _metrics(runner.run_dir, "sft") if "loss" in m]
    assert len(losses) >= 4
    assert losses[-1] < 0.6 * losses[0], losses


def test_dpo_starts_at_log2_and_its_loss_goes_down(completed_tiny_run):
    runner, _ = completed_tiny_run
    logs = [m for m in _metrics(runner.run_dir, "dpo") if "loss" in m]
    # Policy == reference at step 0, so the first logged window starts near -log sigmoid(0) = log 2.
    assert abs(logs[0]["loss"] - math.log(2)) < 0.05, logs[0]
    assert logs[-1]["loss"] < logs[0]["loss"] - 0.05, [m["loss"] for m in logs]
    assert logs[-1]["rewards/margins"] > 0
    summary = StageDir(runner.run_dir / "dpo").read_manifest()["summary"]
    assert summary["global_step"] == 32


def test_lora_sft_publishes_a_merged_full_checkpoint(tmp_path):
    """With `lora:` the stage trains adapters, then publishes merged weights every later stage loads as usual."""
    import torch
    from conftest import TINY_RECIPE, write_recipe
    from safetensors.torch import load_file

    from alignpipe.pipeline.runner import Runner
    from alignpipe.recipe import load_recipe

    sft = {**TINY_RECIPE["stages"][0], "max_steps": 4, "save_steps": 4, "lora": {"r": 4, "alpha": 8, "dropout": 0.0}}
    recipe_path = write_recipe(tmp_path, {**TINY_RECIPE, "stages": [sft]})
    runner = Runner(load_recipe(recipe_path), runs_dir=tmp_path / "runs", in_process=True)
    runner.run()
    checkpoint = StageDir(runner.run_dir / "sft").checkpoint
    assert not (checkpoint / "adapter_config.json").exists()
    trained = load_file(checkpoint / "model.safetensors")
    base = load_file(StageDir(runner.run_dir / "base").checkpoint / "model.safetensors")
    assert set(trained) == set(base)
    changed = [k for k in base if not torch.equal(base[k], trained[k])]
    assert any("q_proj" in k for k in changed)
    assert not any("embed_tokens" in k for k in changed)  # all-linear LoRA leaves the embeddings alone
