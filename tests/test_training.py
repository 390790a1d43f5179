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
