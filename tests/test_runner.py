"""The runner: stage directories, skip on re-run, selective re-runs, --force, --resume, failures."""

from __future__ import annotations

import json
import shutil

import pytest
from conftest import TINY_RECIPE, write_recipe
from safetensors.torch import load_file

from alignpipe.pipeline.rundir import StageDir
from alignpipe.pipeline.runner import Runner
from alignpipe.recipe import load_recipe


def _run(recipe_path, runs_dir, overrides=(), **kwargs):
    runner = Runner(load_recipe(recipe_path, overrides), runs_dir=runs_dir, recipe_path=recipe_path,
                    overrides=overrides, in_process=True, **kwargs)
    return {o.name: o for o in runner.run()}, runner


def test_first_run_writes_the_run_directory(completed_tiny_run):
    runner, outcomes = completed_tiny_run
    assert [o.action for o in outcomes] == ["ran", "ran", "ran"]
    for name in ("sft", "dpo"):
        stage = StageDir(runner.run_dir / name)
        manifest = stage.read_manifest()
        assert manifest["status"] == "complete"
        assert manifest["versions"]["trl"] and manifest["config_hash"] and manifest["output_sha256"]
        assert (stage.checkpoint / "model.safetensors").exists()
        assert not (stage.root / "checkpoint.tmp").exists()
        assert stage.config.exists() and stage.metrics.read_text().strip()
    assert set(StageDir(runner.run_dir / "dpo").read_manifest()["input_hashes"]) == {"base", "sft"}
    board = json.loads((runner.run_dir / "leaderboard.json").read_text())
    assert [c["name"] for c in board["checkpoints"]].count("dpo") == 1
    assert {c["name"] for c in board["checkpoints"]} == {"base", "sft", "dpo"}
    assert (runner.run_dir / "leaderboard.md").read_text().count("| sft ") == 1


def test_rerun_skips_complete_stages_and_beta_change_reruns_only_dpo_and_eval(tmp_path):
    recipe_path = write_recipe(tmp_path, TINY_RECIPE)
    runs = tmp_path / "runs"
    first, _ = _run(recipe_path, runs)
    assert all(o.action == "ran" for o in first.values())

    again, _ = _run(recipe_path, runs)
    assert {n: o.action for n, o in again.items()} == {"sft": "skipped", "dpo": "skipped", "eval": "skipped"}

    changed, runner = _run(recipe_path, runs, overrides=["stages.dpo.beta=0.3"])
    assert {n: o.action for n, o in changed.items()} == {"sft": "skipped", "dpo": "ran", "eval": "ran"}
    assert changed["dpo"].reason == "config or inputs changed"
    assert runner.run_dir.joinpath("run.json").read_text().count("stages.dpo.beta=0.3") == 1

    forced, runner = _run(recipe_path, runs, overrides=["stages.dpo.beta=0.3"], force=["sft"])
    assert forced["sft"].action == "ran" and forced["sft"].reason == "forced"
    # CPU training is deterministic: the same SFT weights come back, so nothing downstream needs re-running.
    assert forced["dpo"].action == "skipped"


def test_resume_continues_from_the_last_trainer_checkpoint(tmp_path, completed_tiny_run):
    reference_runner, _ = completed_tiny_run
    recipe_path = write_recipe(tmp_path, TINY_RECIPE)
    runs = tmp_path / "runs"
    # Reproduce the state of an SFT stage killed after its step-15 checkpoint: copy the finished run, then drop
    # everything written after step 15 and mark the stage as still running.
    shutil.copytree(reference_runner.run_dir, runs / "tiny")
    sft = StageDir(runs / "tiny" / "sft")
    shutil.rmtree(sft.checkpoint)
    shutil.rmtree(sft.trainer / "checkpoint-30")
    sft.update_manifest(status="running")
    expected = load_file(StageDir(reference_runner.run_dir / "sft").checkpoint / "model.safetensors")

    outcomes, _ = _run(recipe_path, runs, resume=True)
    assert outcomes["sft"].action == "resumed"
    assert "checkpoint-15" in outcomes["sft"].reason
    manifest = sft.read_manifest()
    assert manifest["status"] == "complete" and manifest["resume_from"].endswith("checkpoint-15")
    state = json.loads((sft.trainer / "checkpoint-30" / "trainer_state.json").read_text())
    assert state["global_step"] == 30
    resumed = load_file(sft.checkpoint / "model.safetensors")
    for name, tensor in expected.items():
        assert (resumed[name] - tensor).abs().max() < 1e-5, name
    # Same weights as the uninterrupted run, so the downstream stages stay valid.
    assert outcomes["dpo"].action == "skipped"


def test_interrupted_stage_starts_over_without_resume(tmp_path, completed_tiny_run):
    reference_runner, _ = completed_tiny_run
    recipe_path = write_recipe(tmp_path, TINY_RECIPE)
    runs = tmp_path / "runs"
    shutil.copytree(reference_runner.run_dir, runs / "tiny")
    StageDir(runs / "tiny" / "eval").update_manifest(status="failed")
    outcomes, _ = _run(recipe_path, runs)
    assert outcomes["eval"].action == "ran"
    assert "starting over" in outcomes["eval"].reason


def test_failed_stage_is_marked_failed_and_leaves_no_checkpoint(tmp_path, completed_tiny_run):
    # Weights that cannot be read get past the preflight (it reads configs and tokenizers, never weights) and fail
    # inside the stage.
    model = tmp_path / "model"
    shutil.copytree(completed_tiny_run[0].run_dir / "base" / "checkpoint", model)
    (model / "model.safetensors").write_bytes(b"not a safetensors file")
    recipe_path = write_recipe(tmp_path, {**TINY_RECIPE, "model": {"name_or_path": str(model)}})
    with pytest.raises(Exception, match="(?i)safetensors|header"):
        _run(recipe_path, tmp_path / "runs")
    sft = StageDir(tmp_path / "runs" / "tiny" / "sft")
    assert sft.read_manifest()["status"] == "failed"
    assert not sft.checkpoint.exists()


def test_force_of_an_unknown_stage_suggests_the_nearest(tiny_recipe_path, tmp_path):
    with pytest.raises(ValueError, match="did you mean 'dpo'"):
        Runner(load_recipe(tiny_recipe_path), runs_dir=tmp_path, force=["dpp"])
