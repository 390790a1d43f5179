"""Crash safety: checkpoint hashes in the manifest, and a resume that skips incomplete or corrupt checkpoints."""

from __future__ import annotations

import json
import logging
import shutil
from collections import Counter
from pathlib import Path

import pytest
from conftest import TINY_RECIPE, write_recipe
from safetensors.torch import load_file

from alignpipe.pipeline.rundir import CHECKPOINTS, StageDir, prune_checkpoints
from alignpipe.pipeline.runner import Runner
from alignpipe.recipe import load_recipe


def _checkpoint(stage: StageDir, step: int, payload: bytes = b"weights") -> object:
    path = stage.trainer / f"checkpoint-{step}"
    path.mkdir(parents=True)
    (path / "model.safetensors").write_bytes(payload)
    (path / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    return path


def test_only_recorded_intact_checkpoints_are_resumed_from(tmp_path, caplog):
    stage = StageDir(tmp_path / "sft")
    stage.root.mkdir()
    stage.write_manifest({"status": "running"})
    first, second = _checkpoint(stage, 2), _checkpoint(stage, 4)
    stage.record_checkpoint(first)
    stage.record_checkpoint(second)
    assert set(stage.read_manifest()[CHECKPOINTS]) == {"trainer/checkpoint-2", "trainer/checkpoint-4"}
    assert stage.latest_trainer_checkpoint() == second

    (second / "model.safetensors").write_bytes(b"weightz")  # same size, one byte changed
    third = _checkpoint(stage, 6)  # killed before its hash was recorded
    with caplog.at_level(logging.WARNING, logger="alignpipe"):
        assert stage.latest_trainer_checkpoint() == first
    messages = "\n".join(r.getMessage() for r in caplog.records)
    assert "skipping trainer/checkpoint-6: its save never finished" in messages
    assert "skipping trainer/checkpoint-4: its files differ from the hash recorded" in messages
    assert "falling back to the previous checkpoint" in messages
    # set aside, so a resumed trainer neither saves into them nor counts them when rotating
    assert not third.exists() and (stage.trainer / "invalid-checkpoint-6").is_dir()
    assert [p.name for p in stage.trainer_checkpoints()] == ["checkpoint-2"]


def test_quiet_lookup_changes_nothing_and_rotation_drops_records(tmp_path):
    stage = StageDir(tmp_path / "ppo")
    stage.root.mkdir()
    paths = [_checkpoint(stage, step) for step in (1, 2, 3)]
    for path in paths[:2]:
        stage.record_checkpoint(path)
    assert stage.latest_trainer_checkpoint(quiet=True) == paths[1]
    assert paths[2].exists()  # nothing set aside by a quiet look
    prune_checkpoints(stage.trainer, keep=1)
    assert [p.name for p in stage.trainer_checkpoints()] == ["checkpoint-3"]
    stage.record_checkpoint(paths[2])
    assert list(stage.read_manifest()[CHECKPOINTS]) == ["trainer/checkpoint-3"]  # rotated-away records dropped


def test_an_interrupt_while_hashing_a_new_checkpoint_leaves_the_previous_one_to_resume_from(tmp_path, monkeypatch):
    """With ``save_total_limit: 1``, pruning before the new checkpoint was recorded left nothing to resume from."""
    import alignpipe.pipeline.rundir as rundir

    stage = StageDir(tmp_path / "ppo")
    stage.root.mkdir()
    stage.write_manifest({"status": "running"})
    write = lambda step: lambda path: (path / "weights.bin").write_bytes(bytes([step]) * 100)  # noqa: E731
    first = stage.save_trainer_checkpoint(10, write(10), keep=1)

    def interrupted(path):
        raise KeyboardInterrupt(f"Ctrl-C while hashing {Path(path).name}")

    monkeypatch.setattr(rundir, "directory_hash", interrupted)
    with pytest.raises(KeyboardInterrupt):
        stage.save_trainer_checkpoint(20, write(20), keep=1)
    monkeypatch.undo()
    assert stage.has_progress() and stage.latest_trainer_checkpoint() == first
    third = stage.save_trainer_checkpoint(30, write(30), keep=1)
    assert stage.trainer_checkpoints() == [third]  # pruned to keep once the new one is recorded


def test_trl_stages_prune_their_checkpoints_only_after_recording_the_new_one(tmp_path, monkeypatch):
    """transformers rotates old checkpoints away before ``on_save``, where the new one is recorded: with
    ``save_total_limit: 1`` an interrupt while hashing it lost every resumable checkpoint."""
    recipe = {**TINY_RECIPE, "stages": [dict(TINY_RECIPE["stages"][0], save_total_limit=1)]}  # saves at 15 and 30
    path = write_recipe(tmp_path, recipe)
    record = StageDir.record_checkpoint

    def interrupted_at_30(self, checkpoint):
        if checkpoint.name == "checkpoint-30":
            raise KeyboardInterrupt("Ctrl-C while hashing checkpoint-30")
        return record(self, checkpoint)

    monkeypatch.setattr(StageDir, "record_checkpoint", interrupted_at_30)
    with pytest.raises(KeyboardInterrupt):
        Runner(load_recipe(path), runs_dir=tmp_path / "runs", in_process=True).run()
    monkeypatch.undo()
    sft = StageDir(tmp_path / "runs" / "tiny" / "sft")
    assert list(sft.read_manifest()[CHECKPOINTS]) == ["trainer/checkpoint-15"]
    outcomes = Runner(load_recipe(path), runs_dir=tmp_path / "runs", in_process=True, resume=True).run()
    assert [(o.action, o.reason) for o in outcomes] == [("resumed", "resuming from checkpoint-15")]
    assert [p.name for p in sft.trainer_checkpoints()] == ["checkpoint-30"]  # save_total_limit still holds


def test_has_progress_looks_at_records_and_rounds_without_hashing(tmp_path, monkeypatch):
    """Deciding whether to resume must not hash checkpoints (a 7B one takes minutes); the runner verifies once."""
    import alignpipe.pipeline.rundir as rundir

    def no_hashing(path):
        raise AssertionError(f"has_progress hashed {path}")

    stage = StageDir(tmp_path / "osp")
    stage.root.mkdir()
    stage.write_manifest({"status": "running"})
    unrecorded = _checkpoint(stage, 3)
    monkeypatch.setattr(rundir, "directory_hash", no_hashing)
    assert not stage.has_progress()  # a save that never finished is not progress
    stage.update_manifest(**{CHECKPOINTS: {"trainer/checkpoint-3": "0" * 64}})
    assert stage.has_progress()  # recorded (verified later, when resuming)
    shutil.rmtree(unrecorded)
    assert not stage.has_progress()  # the record of a deleted checkpoint counts for nothing
    round_data = stage.root / "rounds" / "round-0" / rundir.ROUND_DATA
    round_data.parent.mkdir(parents=True)
    round_data.write_text("[]")
    assert stage.has_progress() and stage.has_round_progress()


def test_keep_metrics_drops_redone_steps_and_a_torn_last_line(tmp_path):
    stage = StageDir(tmp_path / "dpo")
    stage.root.mkdir()
    stage.metrics.write_text('{"step": 1}\n{"step": 2}\n{"step": 3}\n{"step": 4, "lo')
    stage.keep_metrics(lambda r: r["step"] <= 2)
    assert stage.metrics.read_text() == '{"step": 1}\n{"step": 2}\n'


def test_starting_over_deletes_every_result_of_the_previous_attempt(tmp_path):
    """A stage that starts over and then fails must not leave the previous attempt's results beside its manifest."""
    stage = StageDir(tmp_path / "rm")
    stage.root.mkdir()
    stage.write_manifest({"status": "failed"})
    stage.write_config({"stage": "rm"})
    for name in ("checkpoint", "trainer/checkpoint-4", "rounds/round-0", "samples", ".checkpoint.staging-x1y2"):
        (stage.root / name).mkdir(parents=True)
        (stage.root / name / "file").write_text("old")
    for name in ("metrics.jsonl", "reward_eval.json", "bon.json", "samples.jsonl", "results.json"):
        (stage.root / name).write_text("{}")
    stage.reset()
    assert sorted(p.name for p in stage.root.iterdir()) == ["config.yaml"]  # the runner writes the new manifest


def _count_hashes(monkeypatch) -> Counter:
    """Count ``directory_hash`` calls per directory name from here on."""
    import alignpipe.pipeline.rundir as rundir

    counts: Counter = Counter()
    original = rundir.directory_hash

    def counting(path):
        counts[Path(path).name] += 1
        return original(path)

    monkeypatch.setattr(rundir, "directory_hash", counting)
    return counts


@pytest.mark.parametrize("damage", ["corrupt", "unrecorded"])
def test_resume_falls_back_past_a_bad_checkpoint_to_the_same_weights(tmp_path, completed_tiny_run, caplog, damage,
                                                                     monkeypatch):
    reference_runner, _ = completed_tiny_run
    runs = tmp_path / "runs"
    shutil.copytree(reference_runner.run_dir, runs / "tiny")
    sft = StageDir(runs / "tiny" / "sft")
    shutil.rmtree(sft.checkpoint)  # killed after its step-30 save, before publishing
    latest = sft.trainer / "checkpoint-30"
    if damage == "corrupt":  # a bit flip in the optimizer state
        data = bytearray((latest / "optimizer.pt").read_bytes())
        data[len(data) // 2] ^= 0xFF
        (latest / "optimizer.pt").write_bytes(bytes(data))
        sft.update_manifest(status="running")
    else:  # killed after writing the files but before recording the hash
        records = sft.read_manifest()[CHECKPOINTS]
        del records["trainer/checkpoint-30"]
        sft.update_manifest(status="running", **{CHECKPOINTS: records})
    recipe_path = write_recipe(tmp_path, TINY_RECIPE)
    hashed = _count_hashes(monkeypatch)
    with caplog.at_level(logging.WARNING, logger="alignpipe"):
        outcomes = {o.name: o for o in Runner(load_recipe(recipe_path), runs_dir=runs, resume=True,
                                              in_process=True).run()}
    assert "skipping trainer/checkpoint-30" in caplog.text
    assert hashed["checkpoint-15"] == 1  # verified once, by the runner; the stage trusts the manifest's resume_from
    assert outcomes["sft"].action == "resumed" and "checkpoint-15" in outcomes["sft"].reason
    assert sft.read_manifest()["resume_from"].endswith("checkpoint-15")
    expected = load_file(StageDir(reference_runner.run_dir / "sft").checkpoint / "model.safetensors")
    resumed = load_file(sft.checkpoint / "model.safetensors")
    assert all((resumed[name] - tensor).abs().max() < 1e-5 for name, tensor in expected.items())
    assert outcomes["dpo"].action == "skipped"  # same weights: downstream stays valid
    assert "trainer/checkpoint-30" in sft.read_manifest()[CHECKPOINTS]  # re-saved, re-recorded


def test_resume_from_the_final_checkpoint_publishes_it_without_another_step(tmp_path, completed_tiny_run):
    reference_runner, _ = completed_tiny_run
    runs = tmp_path / "runs"
    shutil.copytree(reference_runner.run_dir, runs / "tiny")
    sft = StageDir(runs / "tiny" / "sft")
    shutil.rmtree(sft.checkpoint)  # killed after the step-30 (last) save, before publishing
    sft.update_manifest(status="running")
    reference_metrics = StageDir(reference_runner.run_dir / "sft").metrics.read_text().splitlines()
    outcomes = {o.name: o for o in Runner(load_recipe(write_recipe(tmp_path, TINY_RECIPE)), runs_dir=runs,
                                          resume=True, in_process=True).run()}
    assert outcomes["sft"].action == "resumed" and "checkpoint-30" in outcomes["sft"].reason
    records = [json.loads(line) for line in sft.metrics.read_text().splitlines()]
    assert max(r["step"] for r in records) == 30 and len(records) == len(reference_metrics)  # no step 31
    expected = load_file(StageDir(reference_runner.run_dir / "sft").checkpoint / "model.safetensors")
    resumed = load_file(sft.checkpoint / "model.safetensors")
    assert all((resumed[name] - tensor).abs().max() < 1e-5 for name, tensor in expected.items())
    assert outcomes["dpo"].action == "skipped"


def test_resume_with_no_intact_checkpoint_starts_over(tmp_path, completed_tiny_run, caplog):
    reference_runner, _ = completed_tiny_run
    runs = tmp_path / "runs"
    shutil.copytree(reference_runner.run_dir, runs / "tiny")
    sft = StageDir(runs / "tiny" / "sft")
    shutil.rmtree(sft.checkpoint)
    for path in sft.trainer_checkpoints():  # every recorded save damaged
        (path / "trainer_state.json").write_text("{}")
    sft.update_manifest(status="running")
    with caplog.at_level(logging.WARNING, logger="alignpipe"):
        outcomes = {o.name: o for o in Runner(load_recipe(write_recipe(tmp_path, TINY_RECIPE)), runs_dir=runs,
                                              resume=True, in_process=True).run()}
    assert outcomes["sft"].action == "ran" and outcomes["sft"].reason.startswith("no intact checkpoint")
    assert sft.read_manifest()["resume_from"] is None
    assert not list(sft.trainer.glob("invalid-*"))  # starting over cleared the trainer directory
    expected = load_file(StageDir(reference_runner.run_dir / "sft").checkpoint / "model.safetensors")
    rerun = load_file(sft.checkpoint / "model.safetensors")
    assert all((rerun[name] - tensor).abs().max() < 1e-5 for name, tensor in expected.items())
    assert outcomes["dpo"].action == "skipped"  # same weights: downstream stays valid


def test_side_state_is_saved_in_each_checkpoint_and_read_back_on_resume(tmp_path):
    """State a TRL trainer does not checkpoint itself (TRL's token count, UP-RLHF's running std mean)."""
    from types import SimpleNamespace

    from alignpipe.trainers.common import CheckpointSideState, load_side_state

    (tmp_path / "checkpoint-4").mkdir()
    args = SimpleNamespace(output_dir=str(tmp_path))
    values = iter([{"count": 7}, None])
    callback = CheckpointSideState("side.json", lambda: next(values))
    callback.on_save(args, SimpleNamespace(global_step=4, is_world_process_zero=True), None)
    assert load_side_state(tmp_path / "checkpoint-4", "side.json") == {"count": 7}
    (tmp_path / "checkpoint-6").mkdir()
    callback.on_save(args, SimpleNamespace(global_step=6, is_world_process_zero=True), None)  # nothing to save
    other_rank = CheckpointSideState("side.json", lambda: {"count": 9})
    other_rank.on_save(args, SimpleNamespace(global_step=6, is_world_process_zero=False), None)
    assert load_side_state(tmp_path / "checkpoint-6", "side.json") is None
    assert load_side_state(None, "side.json") is None  # not resuming


@pytest.mark.parametrize("step, said", [(3, "resuming at step 3, between two logging steps: the first loss logged "
                                              "after it averages steps 4-4 only"), (4, None)])
def test_a_resume_between_two_logging_steps_says_its_first_loss_averages_fewer_steps(tmp_path, caplog, step, said):
    """transformers saves no partial loss sums, so the first record after such a resume averages fewer steps than
    the uninterrupted run's (the weights are the same bit for bit)."""
    import json
    import logging
    from types import SimpleNamespace

    from alignpipe.trainers.common import train

    checkpoint = tmp_path / f"checkpoint-{step}"
    checkpoint.mkdir()
    (checkpoint / "trainer_state.json").write_text(json.dumps({"global_step": step, "max_steps": 10}))
    resumed = []
    trainer = SimpleNamespace(args=SimpleNamespace(output_dir=str(tmp_path), logging_steps=2),
                              add_callback=lambda callback: None,
                              train=lambda resume_from_checkpoint: resumed.append(resume_from_checkpoint))
    ctx = SimpleNamespace(is_main_process=False, dir=SimpleNamespace(name="sft"),
                          stage=SimpleNamespace(save_total_limit=2))
    caplog.set_level(logging.INFO, logger="alignpipe")
    train(trainer, ctx, checkpoint)
    assert resumed == [str(checkpoint)]
    assert (said in caplog.text) if said else "between two logging steps" not in caplog.text
