"""The runner: stage directories, skip on re-run, selective re-runs, --force, --resume, failures."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import asdict

import pytest
from conftest import TINY_RECIPE, write_recipe
from safetensors.torch import load_file

from alignpipe.pipeline import rundir
from alignpipe.pipeline.batching import split_global_batch
from alignpipe.pipeline.decision import BATCH_SPLIT, decide_stage
from alignpipe.pipeline.rundir import StageDir
from alignpipe.pipeline.runner import BACKBONE, BASE, DATASET, MODEL, Runner, local_model_hash
from alignpipe.recipe import SFTStage, load_recipe


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
    record = json.loads((runner.run_dir / "run.json").read_text())
    assert record["status"] == "complete" and "stopped_at" not in record and record["started"] <= record["updated"]
    assert {c["name"] for c in board["checkpoints"]} == {"base", "sft", "dpo"}
    assert (runner.run_dir / "leaderboard.md").read_text().count("| sft ") == 2  # headline and "All metrics"


def test_rerun_skips_complete_stages_and_beta_change_reruns_only_dpo_and_eval(tmp_path, completed_tiny_run):
    # the first run is the shared one (every stage ran: test_first_run_writes_the_run_directory), copied to change
    recipe_path, runs = _copy_of(completed_tiny_run, tmp_path)
    assert all(o.action == "ran" for o in completed_tiny_run[1])

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


def _copy_of(completed_tiny_run, tmp_path):
    """The recipe and a copy of the completed tiny run's directory, to change at will."""
    recipe_path = write_recipe(tmp_path, TINY_RECIPE)
    runs = tmp_path / "runs"
    shutil.copytree(completed_tiny_run[0].run_dir, runs / "tiny")
    return recipe_path, runs


def _killed_sft(runs) -> StageDir:
    """The copied run's sft as if killed after its last trainer checkpoint: no published checkpoint, still running."""
    sft = StageDir(runs / "tiny" / "sft")
    shutil.rmtree(sft.checkpoint)
    sft.update_manifest(status="running")
    return sft


def test_resume_continues_from_the_last_trainer_checkpoint(tmp_path, completed_tiny_run):
    reference_runner, _ = completed_tiny_run
    recipe_path, runs = _copy_of(completed_tiny_run, tmp_path)
    # Reproduce the state of an SFT stage killed after its step-15 checkpoint: drop everything written after step 15.
    sft = _killed_sft(runs)
    shutil.rmtree(sft.trainer / "checkpoint-30")
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


@pytest.mark.parametrize("name, resume, reason", [
    ("eval", False, "previous attempt failed; no checkpoint to resume from; starting over"),
    ("eval", True, "previous attempt failed; no checkpoint to resume from; starting over"),
    ("sft", False, "previous attempt failed; starting over (use --resume to continue)"),
])
def test_failed_stage_starts_over_saying_whether_resume_could_continue_it(tmp_path, completed_tiny_run, name, resume,
                                                                          reason):
    reference_runner, _ = completed_tiny_run
    recipe_path = write_recipe(tmp_path, TINY_RECIPE)
    runs = tmp_path / "runs"
    shutil.copytree(reference_runner.run_dir, runs / "tiny")
    StageDir(runs / "tiny" / name).update_manifest(status="failed")  # sft kept its trainer checkpoints, eval has none
    outcomes, _ = _run(recipe_path, runs, resume=resume)
    assert outcomes[name].action == "ran"
    assert outcomes[name].reason == reason


def test_a_complete_stage_whose_checkpoint_is_gone_runs_again(tmp_path, completed_tiny_run):
    reference_runner, _ = completed_tiny_run
    recipe_path = write_recipe(tmp_path, TINY_RECIPE)
    runs = tmp_path / "runs"
    shutil.copytree(reference_runner.run_dir, runs / "tiny")
    shutil.rmtree(runs / "tiny" / "dpo" / "checkpoint")
    outcomes, _ = _run(recipe_path, runs)
    assert outcomes["sft"].action == "skipped" and outcomes["dpo"].action == "ran"
    assert "checkpoint" in outcomes["dpo"].reason and "missing" in outcomes["dpo"].reason
    assert (runs / "tiny" / "dpo" / "checkpoint" / "model.safetensors").exists()


def test_a_complete_stage_whose_checkpoint_changed_runs_again(tmp_path, completed_tiny_run, capsys):
    """A complete stage hands its recorded output hash on to the stages after it, so a checkpoint whose files changed
    since (a copy cut short, a disk error, an edit) was trained on and evaluated under the old one's name: the
    stage runs again, saying why, in the dry run and the run; the base model likewise is made again."""
    recipe_path, runs = _copy_of(completed_tiny_run, tmp_path)
    weights = runs / "tiny" / "sft" / "checkpoint" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    said = _dry_run(recipe_path, runs, capsys=capsys)["sft"][0]
    assert said.startswith("run (complete, but its checkpoint's files") and "changed since it completed" in said
    outcomes, _ = _run(recipe_path, runs)
    assert outcomes["sft"].action == "ran" and "changed since it completed" in outcomes["sft"].reason
    assert StageDir(runs / "tiny" / "sft").published_problem(StageDir(runs / "tiny" / "sft").read_manifest()) is None
    # sft trains deterministically on the CPU, so it comes out as before and dpo is skipped again
    assert outcomes["dpo"].action == "skipped"
    base_config = runs / "tiny" / "base" / "checkpoint" / "config.json"
    base_config.write_text(base_config.read_text() + " ")
    outcomes, _ = _run(recipe_path, runs)
    assert not base_config.read_text().endswith(" ")  # made again, as it was (the tiny base is seeded)
    assert {outcome.action for outcome in outcomes.values()} == {"skipped"}


def test_an_interrupted_reset_leaves_no_complete_manifest_behind(tmp_path, completed_tiny_run, monkeypatch):
    """Starting a stage over deletes its old checkpoint; stopped half-way, the stage must not look complete."""
    reference_runner, _ = completed_tiny_run
    stage = StageDir(tmp_path / "sft")
    shutil.copytree(reference_runner.run_dir / "sft", stage.root)
    assert stage.read_manifest()["status"] == "complete"

    def interrupted(path, *args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(shutil, "rmtree", interrupted)
    with pytest.raises(KeyboardInterrupt):
        stage.reset()
    assert stage.checkpoint.exists() and (stage.read_manifest() or {}).get("status") != "complete"


def test_a_failed_eval_rerun_leaves_no_leaderboard_of_the_previous_attempt(tmp_path, completed_tiny_run,
                                                                           monkeypatch):
    import alignpipe.trainers.eval as eval_stage

    reference_runner, _ = completed_tiny_run
    recipe_path = write_recipe(tmp_path, TINY_RECIPE)
    runs = tmp_path / "runs"
    shutil.copytree(reference_runner.run_dir, runs / "tiny")
    assert (runs / "tiny" / "leaderboard.json").exists() and (runs / "tiny" / "report.html").exists()

    def broken(*args, **kwargs):
        raise RuntimeError("the evaluation failed")

    monkeypatch.setattr(eval_stage, "evaluate_checkpoints", broken)
    with pytest.raises(RuntimeError, match="the evaluation failed"):
        _run(recipe_path, runs, force=["eval"])
    assert not any((runs / "tiny" / name).exists() for name in eval_stage.RUN_RESULTS)


def test_a_leaderboard_left_by_an_eval_stage_the_recipe_dropped_is_said(tmp_path, completed_tiny_run, caplog):
    """Nothing checks or replaces it any more, so it may show checkpoints that have changed since; it is kept."""
    _, runs = _copy_of(completed_tiny_run, tmp_path)
    without_eval = write_recipe(tmp_path, {**TINY_RECIPE, "stages": TINY_RECIPE["stages"][:2]}, "no-eval.yaml")
    with caplog.at_level(logging.WARNING, logger="alignpipe"):
        outcomes, _ = _run(without_eval, runs)
    assert {o.action for o in outcomes.values()} == {"skipped"}
    notes = [r.getMessage() for r in caplog.records if "has no eval stage" in r.getMessage()]
    assert notes == [f"{runs / 'tiny'} holds leaderboard.json, leaderboard.csv, leaderboard.md from eval stage 'eval', "
                     "but this recipe has no eval stage: they show the checkpoints as that stage evaluated them, and "
                     "nothing updates them now. Add an eval stage to evaluate the checkpoints as they are, or remove "
                     "the files."]
    assert (runs / "tiny" / "leaderboard.md").exists()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="alignpipe"):
        _run(write_recipe(tmp_path, TINY_RECIPE), runs)  # with the eval stage back, its own leaderboard again
    assert "has no eval stage" not in caplog.text


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


# ----------------------------------------------------------------------------- local dataset files are inputs too

def _pairs_file(path, rows=(("copy: 1", "1", "2"), ("copy: 3", "3", "4"))):
    path.write_text("".join(json.dumps({"prompt": p, "chosen": c, "rejected": r}) + "\n" for p, c, r in rows))
    return path


@pytest.mark.parametrize("stage_type", ["sft", "dpo", "reward"])
def test_a_local_dataset_is_hashed_by_content_for_every_stage_that_reads_one(tmp_path, stage_type):
    source = "ultrafeedback" if stage_type == "sft" else "trl"  # any source with a path; the file is not parsed here
    data = _pairs_file(tmp_path / "pairs.jsonl")
    stage = {"name": "s", "type": stage_type, "dataset": {"source": source, "path": str(data)},
             **({"inputs": ["sft"]} if stage_type == "dpo" else {})}
    stages = [TINY_RECIPE["stages"][0], stage] if stage_type == "dpo" else [stage]
    runner = Runner(load_recipe(write_recipe(tmp_path, {**TINY_RECIPE, "stages": stages})), runs_dir=tmp_path / "runs")
    outputs = {BASE: ("base", "b" * 64), "sft": ("sft", "s" * 64)}

    def hashes():
        return runner._stage_hashes(runner.recipe.stage("s"), outputs)

    config_hash, inputs = hashes()
    assert inputs[DATASET] == hashlib.sha256(data.read_bytes()).hexdigest()
    data.write_bytes(data.read_bytes())  # rewritten, same bytes: same inputs (the stage would be skipped)
    assert hashes() == (config_hash, inputs)
    _pairs_file(data, [("copy: 1", "2", "1"), ("copy: 3", "4", "3")])  # chosen and rejected swapped, same path
    changed_config, changed_inputs = hashes()
    assert changed_config == config_hash and changed_inputs[DATASET] != inputs[DATASET]
    assert changed_inputs == {**inputs, DATASET: changed_inputs[DATASET]}  # nothing else moved


def test_a_local_dataset_directory_is_hashed_by_its_files(tmp_path):
    """(A hub dataset is hashed by the commit it is pinned to: tests/test_hub_datasets.py.)"""
    data = tmp_path / "data"
    data.mkdir()
    _pairs_file(data / "train.jsonl")
    reward = {"name": "rm", "type": "reward", "dataset": {"source": "trl", "path": str(data)}}
    recipe = {**TINY_RECIPE, "stages": [reward]}
    runner = Runner(load_recipe(write_recipe(tmp_path, recipe)), runs_dir=tmp_path / "runs")
    outputs = {BASE: ("base", "b" * 64)}
    before = runner._stage_hashes(runner.recipe.stage("rm"), outputs)[1][DATASET]
    _pairs_file(data / "test.jsonl")  # a new file in the directory
    after = runner._stage_hashes(runner.recipe.stage("rm"), outputs)[1][DATASET]
    assert before != after
    (data / "test.jsonl").rename(data / "extra.jsonl")  # same bytes under another name: another dataset
    assert runner._stage_hashes(runner.recipe.stage("rm"), outputs)[1][DATASET] not in (before, after)

    recipe = {**TINY_RECIPE, "stages": [{"name": "rm", "type": "reward", "dataset": {"source": "synthetic"}}]}
    runner = Runner(load_recipe(write_recipe(tmp_path, recipe)), runs_dir=tmp_path / "runs")
    assert runner._stage_hashes(runner.recipe.stage("rm"), outputs)[1] == {BASE: "b" * 64}  # no file


def test_a_reward_callable_is_hashed_by_the_file_that_defines_it(tmp_path, monkeypatch):
    """The recipe names a callable only by 'module:function': editing the function must change the stage's inputs
    (and so re-run it), and a function a module re-exports is hashed by the file that defines it."""
    import sys

    from alignpipe.pipeline.runner import CALLABLE, _recorded_before_content_keys

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    defining = tmp_path / "hashed_reward_impl.py"
    defining.write_text("def length(p, r): return [float(len(x)) for x in r]\n")
    (tmp_path / "hashed_reward.py").write_text("from hashed_reward_impl import length\n")
    bon = {"name": "bon", "type": "bon", "inputs": ["sft"], "n_samples": 2, "n_prompts": 4, "max_new_tokens": 4,
           "batch_size": 4, "reward": {"source": "callable", "callable": "hashed_reward:length"}}
    runner = Runner(load_recipe(write_recipe(tmp_path, {**TINY_RECIPE, "stages": [TINY_RECIPE["stages"][0], bon]})),
                    runs_dir=tmp_path / "runs")
    outputs = {BASE: ("base", "b" * 64), "sft": ("sft", "s" * 64)}

    def hashes():
        return runner._stage_hashes(runner.recipe.stage("bon"), outputs)

    config_hash, inputs = hashes()
    assert set(inputs) == {BASE, "sft", CALLABLE} and len(inputs[CALLABLE]) == 64
    defining.write_text("def length(p, r): return [-float(len(x)) for x in r]\n")  # the sign flipped
    changed_config, changed_inputs = hashes()
    assert changed_config == config_hash and changed_inputs == {**inputs, CALLABLE: changed_inputs[CALLABLE]}
    assert changed_inputs[CALLABLE] != inputs[CALLABLE]
    # a stage recorded before callables were hashed is kept and adopts the hash, as for the other content keys
    older = {"config_hash": config_hash, "input_hashes": {k: v for k, v in inputs.items() if k != CALLABLE}}
    assert _recorded_before_content_keys(older, config_hash, inputs)


def test_a_decorated_reward_callable_is_hashed_by_its_own_file_not_the_decorators(tmp_path, monkeypatch):
    """``inspect.getsourcefile`` follows a decorator's wrapper (``@torch.no_grad()``, a ``functools.wraps`` helper in
    another module) to the decorator's file, so editing the function itself changed nothing and its stage was
    reused."""
    import sys

    from alignpipe.rewards.plugin import callable_source_hash

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    (tmp_path / "reward_decorators.py").write_text(
        "import functools\n"
        "def logged(function):\n"
        "    @functools.wraps(function)\n"
        "    def wrapper(*args):\n"
        "        return function(*args)\n"
        "    return wrapper\n")
    module = tmp_path / "decorated_reward.py"
    body = ("import torch\nfrom reward_decorators import logged\n\n"
            "@logged\n@torch.no_grad()\ndef score(p, r): return {}\n")
    module.write_text(body.format("[1.0 for x in r]"))
    before = callable_source_hash("decorated_reward:score")
    module.write_text(body.format("[-1.0 for x in r]"))
    sys.modules.pop("decorated_reward", None)
    assert callable_source_hash("decorated_reward:score") != before


def test_editing_a_local_dataset_file_reruns_the_stage_that_reads_it(tmp_path):
    from alignpipe.data.synthetic import sft_dataset
    from alignpipe.recipe import DataSpec

    rows = sft_dataset(DataSpec(n_sft=8, demo_noise=0.0), seed=7).to_list()
    data = tmp_path / "demos.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    sft = {**TINY_RECIPE["stages"][0], "max_steps": 2, "per_device_train_batch_size": 4, "save_steps": 10,
           "dataset": {"source": "trl", "path": str(data)}}
    recipe_path = write_recipe(tmp_path, {**TINY_RECIPE, "stages": [sft]})
    runs = tmp_path / "runs"
    first, runner = _run(recipe_path, runs)
    assert first["sft"].action == "ran"
    manifest = StageDir(runner.run_dir / "sft").read_manifest()
    assert manifest["input_hashes"][DATASET] == hashlib.sha256(data.read_bytes()).hexdigest()

    data.write_bytes(data.read_bytes())  # touched, not changed
    assert _run(recipe_path, runs)[0]["sft"].action == "skipped"

    data.write_text("".join(json.dumps(row) + "\n" for row in reversed(rows)))  # same path, other content
    edited, runner = _run(recipe_path, runs)
    assert (edited["sft"].action, edited["sft"].reason) == ("ran", "config or inputs changed")
    manifest = StageDir(runner.run_dir / "sft").read_manifest()
    assert manifest["input_hashes"][DATASET] == hashlib.sha256(data.read_bytes()).hexdigest()


# ----------------------------------------------------------------------------- local models are hashed by content


def test_a_local_reward_backbone_and_a_local_recipe_model_are_hashed_by_content(llama_path, tmp_path):
    """Other weights at the same path re-run what was trained on them (the config hash sees only the path)."""
    model = tmp_path / "model"
    shutil.copytree(llama_path, model)
    reward = {"name": "rm", "type": "reward", "inputs": [], "backbone": str(model)}
    recipe = {**TINY_RECIPE, "model": {"name_or_path": str(model)}, "stages": [reward]}
    outputs = {BASE: ("base", "b" * 64)}

    def hashes(recipe):
        runner = Runner(load_recipe(write_recipe(tmp_path, recipe)), runs_dir=tmp_path / "runs")
        return runner._stage_hashes(runner.recipe.stage("rm"), outputs)[1]

    inputs = hashes(recipe)
    assert inputs[BACKBONE] == inputs[MODEL] and hashes(recipe) == inputs  # the same files: the same hashes
    (model / ".git").mkdir()
    (model / ".git" / "index").write_bytes(b"rewritten by git status")  # not part of the model
    assert hashes(recipe) == inputs

    weights = next(model.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:-1] + b"\0")  # other weights, same path
    changed = hashes(recipe)
    assert changed[BACKBONE] != inputs[BACKBONE] and changed == {**inputs, BACKBONE: changed[BACKBONE],
                                                                 MODEL: changed[BACKBONE]}

    hub = {**recipe, "model": {"name_or_path": "owner/name"}, "stages": [{**reward, "backbone": None}]}
    assert hashes(hub) == {BASE: "b" * 64}  # a hub model: its commit is in the base hash (tests/test_hub_model.py)


def test_only_the_named_gguf_file_of_a_folder_is_part_of_the_model(tmp_path):
    folder = tmp_path / "quantised"
    folder.mkdir()
    for name in ("model-Q4_K_M.gguf", "model-Q8_0.gguf", "README.md"):
        (folder / name).write_bytes(name.encode())
    before = local_model_hash(str(folder), "model-Q4_K_M.gguf")
    (folder / "model-Q8_0.gguf").write_bytes(b"another quantisation")
    assert local_model_hash(str(folder), "model-Q4_K_M.gguf") == before
    (folder / "model-Q4_K_M.gguf").write_bytes(b"other weights")
    assert local_model_hash(str(folder), "model-Q4_K_M.gguf") != before


def _settled_model(tmp_path, monkeypatch):
    """A model folder (with a hidden ``.git``) whose files were last written a minute ago, past the racy window of
    ``cached_directory_hash``; its hash cache is this test's own."""
    monkeypatch.setenv("ALIGNPIPE_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "model"
    files = {"config.json": b"{}", "model.safetensors": b"weights" * 100, "sub/tokenizer.json": b"{\"v\": 1}",
             ".git/index": b"not part of the model"}
    for name, data in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
        _set_mtime(folder / name, seconds_ago=60)
    return folder


def _set_mtime(path, seconds_ago: int) -> None:
    when = time.time_ns() - seconds_ago * 10**9
    os.utime(path, ns=(when, when))


def _hash_entries(tmp_path) -> list:
    return sorted((tmp_path / "cache" / rundir.HASH_CACHE).glob("*.json"))


def _other_bytes_same_stat(path) -> None:
    """Rewrite ``path`` in place (same inode) with other bytes of the same size and give it back its mtime, as
    ``cp -p`` or ``rsync -a --inplace`` of another release of the file can: only its ctime (which nothing can set
    back) and its bytes tell."""
    before = path.stat()
    path.write_bytes(bytes(b ^ 0xFF for b in path.read_bytes()))
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = path.stat()
    assert (after.st_size, after.st_mtime_ns, after.st_ino, after.st_dev) == \
        (before.st_size, before.st_mtime_ns, before.st_ino, before.st_dev)


def _visible(relative) -> bool:
    return not relative.parts[0].startswith(".")


def test_cached_directory_hash_equals_directory_hash(tmp_path, monkeypatch):
    folder = _settled_model(tmp_path, monkeypatch)
    expected = hashlib.sha256()  # directory_hash's definition, so recorded hashes stay valid
    for name in ("config.json", "model.safetensors", "sub/tokenizer.json"):
        expected.update(name.encode() + (folder / name).read_bytes())
    assert rundir.directory_hash(folder, _visible) == expected.hexdigest() != rundir.directory_hash(folder)
    for include in (None, _visible):
        assert rundir.cached_directory_hash(folder, include) == rundir.directory_hash(folder, include)
        assert rundir.cached_directory_hash(folder, include) == rundir.directory_hash(folder, include)  # kept
    assert len(_hash_entries(tmp_path)) == 2  # one per include filter: they hash other files


def _reads(monkeypatch) -> list:
    """The files ``rundir`` reads to hash them, from now on."""
    read, update = [], rundir._update_with_file

    def reading(digest, path) -> None:
        read.append(path)
        update(digest, path)

    monkeypatch.setattr(rundir, "_update_with_file", reading)
    return read


def test_a_local_model_is_not_read_again_while_its_files_are_unchanged(tmp_path, monkeypatch, caplog):
    folder = _settled_model(tmp_path, monkeypatch)
    monkeypatch.setattr(rundir, "LARGE_FOLDER", 0)  # say so for any size
    read = _reads(monkeypatch)
    with caplog.at_level(logging.INFO, logger="alignpipe"):
        first = local_model_hash(str(folder))
    assert f"hashing {folder} (0.0 GB) once; later runs reuse it while its files are unchanged" in caplog.text
    assert len(read) == 3  # config.json, model.safetensors, sub/tokenizer.json
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="alignpipe"):
        assert local_model_hash(str(folder)) == first
    assert len(read) == 3 and "hashing" not in caplog.text  # nothing read the second time


def test_a_large_checkpoint_just_published_is_not_read_again_by_the_next_run(tmp_path, monkeypatch):
    """A stage hashed its fresh checkpoint without the stat cache (its files were too new to trust by their stat), so
    the next run's check that the published checkpoint is unchanged read all of it again: once per large stage. A
    large one now waits out the rest of the 2 s and is hashed through the cache; a small one is not kept waiting."""
    monkeypatch.setenv("ALIGNPIPE_CACHE", str(tmp_path / "cache"))
    small = tmp_path / "small"
    small.mkdir()
    (small / "model.safetensors").write_bytes(b"weights")
    started = time.monotonic()
    assert rundir.published_output_hash(small) == rundir.directory_hash(small)
    assert time.monotonic() - started < 1 and not _hash_entries(tmp_path)
    monkeypatch.setattr(rundir, "LARGE_FOLDER", 0)  # the same folder counts as large
    (small / "config.json").write_bytes(b"{}")  # just written
    started = time.monotonic()
    published = rundir.published_output_hash(small)
    assert published == rundir.directory_hash(small) and 1.5 < time.monotonic() - started < 5
    read = _reads(monkeypatch)
    assert rundir.output_hash(small, cached=True) == published and read == []  # the next run reads nothing
    _set_mtime(small / "config.json", seconds_ago=-15)  # dated ahead (clock skew): waits 2 s at most, caches nothing
    started = time.monotonic()
    assert rundir.published_output_hash(small) == published and time.monotonic() - started < 4


def test_a_copy_that_keeps_size_mtime_and_inode_is_seen_by_its_ctime(tmp_path, monkeypatch):
    folder = _settled_model(tmp_path, monkeypatch)
    first = rundir.cached_directory_hash(folder)
    _other_bytes_same_stat(folder / "model.safetensors")
    assert rundir.cached_directory_hash(folder) == rundir.directory_hash(folder) != first


def test_the_hash_cache_is_no_error_where_there_is_no_home_directory(tmp_path, monkeypatch):
    """A container's bare uid: neither $HOME nor a passwd entry, so no user cache to keep hashes in."""
    import pwd

    folder = _settled_model(tmp_path, monkeypatch)
    monkeypatch.delenv("ALIGNPIPE_CACHE")
    monkeypatch.delenv("HOME", raising=False)

    def no_entry(uid):
        raise KeyError(f"getpwuid(): uid not found: {uid}")

    monkeypatch.setattr(pwd, "getpwuid", no_entry)
    assert local_model_hash(str(folder)) == rundir.directory_hash(folder, _visible)


def test_cached_directory_hash_sees_a_changed_added_or_removed_file(tmp_path, monkeypatch):
    folder = _settled_model(tmp_path, monkeypatch)
    first = rundir.cached_directory_hash(folder)
    weights = folder / "model.safetensors"
    inode = weights.stat().st_ino
    weights.write_bytes(b"W" * weights.stat().st_size)  # same size and inode: only the mtime tells
    _set_mtime(weights, seconds_ago=30)
    assert weights.stat().st_ino == inode
    changed = rundir.cached_directory_hash(folder)
    assert changed == rundir.directory_hash(folder) != first
    (folder / "added.bin").write_bytes(b"")
    _set_mtime(folder / "added.bin", seconds_ago=30)
    assert rundir.cached_directory_hash(folder) == rundir.directory_hash(folder) != changed
    (folder / "added.bin").unlink()
    assert rundir.cached_directory_hash(folder) == changed
    (folder / "sub" / "tokenizer.json").unlink()
    assert rundir.cached_directory_hash(folder) == rundir.directory_hash(folder) != changed


def test_cached_directory_hash_keeps_nothing_while_a_file_may_still_be_written(tmp_path, monkeypatch):
    """A file modified within 2 s of hashing could change again with the same size and mtime (racily clean)."""
    folder = _settled_model(tmp_path, monkeypatch)
    weights = folder / "model.safetensors"
    os.utime(weights)  # modified now
    first = rundir.cached_directory_hash(folder)
    assert first == rundir.directory_hash(folder) and _hash_entries(tmp_path) == []
    read = _reads(monkeypatch)
    assert rundir.cached_directory_hash(folder) == first and len(read) == 4  # read again (.git too: no filter)


def test_a_corrupt_or_unwritable_hash_cache_is_no_error(tmp_path, monkeypatch, caplog):
    folder = _settled_model(tmp_path, monkeypatch)
    rundir.cached_directory_hash(folder)
    [entry] = _hash_entries(tmp_path)
    current = rundir.directory_hash(folder)
    read = _reads(monkeypatch)
    for garbage in (b"{not json", b"\xff\xfe", b"[]", b'{"sha256": 5}', b'{"sha256": "not a hash"}', b""):
        entry.write_bytes(garbage)
        before = len(read)
        assert rundir.cached_directory_hash(folder) == current and len(read) > before  # recomputed
        assert json.loads(entry.read_text())["sha256"] == current  # rewritten
    (tmp_path / "blocked").write_text("a file where the cache directory would be")
    monkeypatch.setenv("ALIGNPIPE_CACHE", str(tmp_path / "blocked"))
    with caplog.at_level(logging.DEBUG, logger="alignpipe"):
        assert rundir.cached_directory_hash(folder) == current
    assert f"not caching the hash of {folder}" in caplog.text


def test_a_stage_recorded_before_content_hashes_is_kept_and_gets_them(tmp_path):
    """Runs recorded before local files were hashed have no such keys: they are skipped, not re-run, and their
    manifest adopts the current hashes (so a later edit of the file re-runs the stage)."""
    sft = {**TINY_RECIPE["stages"][0], "max_steps": 2, "per_device_train_batch_size": 4, "save_steps": 10,
           "dataset": {"source": "trl", "path": str(tmp_path / "demos.jsonl")}}
    from alignpipe.data.synthetic import sft_dataset
    from alignpipe.recipe import DataSpec

    rows = sft_dataset(DataSpec(n_sft=8, demo_noise=0.0), seed=7).to_list()
    (tmp_path / "demos.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    recipe_path = write_recipe(tmp_path, {**TINY_RECIPE, "stages": [sft]})
    runs = tmp_path / "runs"
    _, runner = _run(recipe_path, runs)
    stage = StageDir(runner.run_dir / "sft")
    recorded = stage.read_manifest()["input_hashes"]
    stage.update_manifest(input_hashes={k: v for k, v in recorded.items() if k != DATASET})  # as an older run wrote
    outcome, _ = _run(recipe_path, runs)
    assert outcome["sft"].action == "skipped" and stage.read_manifest()["input_hashes"] == recorded
    stage.update_manifest(input_hashes={**{k: v for k, v in recorded.items() if k != DATASET}, BASE: "other"})
    assert _run(recipe_path, runs)[0]["sft"].action == "ran"  # a key it did record differs: that is a change


def test_logging_saving_and_long_prompts_settings_do_not_rerun_a_complete_stage(tmp_path):
    sft = {**TINY_RECIPE["stages"][0], "max_steps": 4, "save_steps": 2, "logging_steps": 1, "save_total_limit": 1}
    runs = tmp_path / "runs"

    def run(**changes):
        return _run(write_recipe(tmp_path, {**TINY_RECIPE, "stages": [{**sft, **changes}]}), runs)

    outcome, runner = run()
    assert outcome["sft"].action == "ran"
    stage = StageDir(runner.run_dir / "sft")
    recorded = stage.read_manifest()
    assert run(logging_steps=3, save_steps=3, save_total_limit=2)[0]["sft"].action == "skipped"
    # long_prompts decides whether a run starts, not what trains (drop needs a data file; the hash ignores it)
    from_file = {**sft, "dataset": {"source": "trl", "path": "rows.jsonl"}}
    hashed = {policy: runner._hashed_stage(SFTStage(**{**from_file, "long_prompts": policy}))
              for policy in ("refuse", "drop")}
    assert hashed["refuse"] == hashed["drop"]

    # recorded by an older alignpipe, whose config hash covered them: adopted, not re-run
    older = runner._config_hash_with_logging_and_saving(runner.recipe.stage("sft"), stage)
    assert older != recorded["config_hash"]
    stage.update_manifest(config_hash=older)
    assert run()[0]["sft"].action == "skipped" and stage.read_manifest()["config_hash"] == recorded["config_hash"]
    stage.update_manifest(config_hash=older)  # and changed since: the older hash is rebuilt with the values it ran with
    assert run(save_steps=3)[0]["sft"].action == "skipped"
    assert stage.read_manifest()["config_hash"] == recorded["config_hash"]

    assert run(save_steps=3, learning_rate=1e-3)[0]["sft"].action == "ran"


def test_a_setting_added_since_is_hashed_only_when_it_changes_what_the_stage_does(tmp_path):
    """grpo and rloo gained missing_eos_penalty, whose default (null) trains as they did before: at it, the stage's
    hashed settings are those it had before the field existed, so an upgrade re-runs nothing; set, it is hashed.
    Each such entry names a field of its stage type at that field's default, so a misspelt one cannot pass."""
    from alignpipe.pipeline.runner import HASHED_UNLESS_AS_BEFORE, NOT_HASHED
    from alignpipe.recipe import GRPOStage, PPOStage, RLOOStage

    fast = {"inputs": ["sft"], "reward": {"source": "gold"}}
    stages = [TINY_RECIPE["stages"][0], {"name": "grpo", "type": "grpo", **fast}, {"name": "rloo", "type": "rloo",
              **fast}, {"name": "ppo", "type": "ppo", **fast, "missing_eos_penalty": None}]
    recipe = load_recipe(write_recipe(tmp_path, {**TINY_RECIPE, "stages": stages}))
    runner = Runner(recipe, runs_dir=tmp_path / "runs", in_process=True)
    for name in ("grpo", "rloo"):
        stage = recipe.stage(name)
        before = stage.model_dump(mode="json", exclude={*NOT_HASHED, *HASHED_UNLESS_AS_BEFORE[name]})
        assert runner._hashed_stage(stage) == before
        assert runner._hashed_stage(stage.model_copy(update={"missing_eos_penalty": 0.5})) == \
            {**before, "missing_eos_penalty": 0.5}
    assert runner._hashed_stage(recipe.stage("grpo").model_copy(update={"scale_rewards": "none"}))[
        "scale_rewards"] == "none"
    assert runner._hashed_stage(recipe.stage("ppo"))["missing_eos_penalty"] is None  # ppo always had it: hashed
    classes = {"grpo": GRPOStage, "rloo": RLOOStage, "ppo": PPOStage}
    for kind, settings in HASHED_UNLESS_AS_BEFORE.items():
        for key, value in settings.items():
            assert classes[kind].model_fields[key].default == value, (kind, key)


def test_logging_and_saving_settings_leave_every_training_loops_output_unchanged(tmp_path):
    """What lets ``LOGGING_AND_SAVING`` out of the config hash: each training loop's checkpoint is the same bit for
    bit whatever they are (TRL's SFT, DPO and GRPO trainers, the reward ensemble's loop, OSP's rounds, PPO's)."""
    def stages(**every):
        return [
            {"name": "sft", "type": "sft", "learning_rate": 3e-3, "max_steps": 6, "per_device_train_batch_size": 16,
             "max_length": 48, "lr_scheduler_type": "constant", **every},
            {"name": "reward", "type": "reward", "inputs": ["sft"], "members": 2, "max_length": 48,
             "per_device_train_batch_size": 16, "learning_rate": 1e-3, **every},
            {"name": "dpo", "type": "dpo", "inputs": ["sft"], "beta": 0.5, "learning_rate": 2e-3, "max_steps": 6,
             "per_device_train_batch_size": 16, "max_length": 48, **every},
            {"name": "osp", "type": "osp", "inputs": ["sft"], "judge": "gold", "rounds": 2, "prompts_per_round": 16,
             "samples_per_prompt": 2, "learning_rate": 2e-3, "per_device_train_batch_size": 4, "max_length": 48,
             "eval_prompts": 8, **every},
            {"name": "ppo", "type": "ppo", "inputs": ["sft"], "reward": {"source": "gold"}, "total_steps": 6,
             "rollout_batch_size": 8, "mini_batch_size": 4, "ppo_epochs": 1, "learning_rate": 1e-3, "eval_every": 3,
             "eval_prompts": 8, "save_steps": every["save_steps"], "save_total_limit": every["save_total_limit"]},
            {"name": "grpo", "type": "grpo", "inputs": ["sft"], "reward": {"source": "gold"}, "learning_rate": 1e-3,
             "max_steps": 4, "per_device_train_batch_size": 8, **every},
        ]

    runs = tmp_path / "runs"
    recipe = {**TINY_RECIPE, "stages": stages(logging_steps=1, save_steps=2, save_total_limit=1)}
    _, runner = _run(write_recipe(tmp_path, recipe), runs)
    names = [stage["name"] for stage in recipe["stages"]]
    first = {name: StageDir(runner.run_dir / name).read_manifest()["output_sha256"] for name in names}
    recipe = {**TINY_RECIPE, "stages": stages(logging_steps=3, save_steps=3, save_total_limit=2)}
    outcomes, _ = _run(write_recipe(tmp_path, recipe), runs, force=names)
    assert {name: outcomes[name].action for name in names} == dict.fromkeys(names, "ran")
    assert {name: StageDir(runner.run_dir / name).read_manifest()["output_sha256"] for name in names} == first


def _dry_run(recipe_path, runs, *options, capsys) -> dict[str, tuple[str, str]]:
    """``alignpipe run --dry-run``: {stage: (what it says it would do, the command)}; checks it changed nothing."""
    from alignpipe.cli import main

    before = {p: p.stat().st_mtime_ns for p in runs.rglob("*")}
    assert main(["run", str(recipe_path), "--dry-run", "--runs-dir", str(runs), *options]) == 0
    assert {p: p.stat().st_mtime_ns for p in runs.rglob("*")} == before
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith(("[dry-run] ", "  "))]
    return {head.split(" ", 2)[1]: (head.split(": ", 1)[1], command.strip())
            for head, command in zip(lines[::2], lines[1::2])}


def test_dry_run_reports_what_the_run_decides_for_each_stage(tmp_path, completed_tiny_run, capsys):
    recipe_path, runs = _copy_of(completed_tiny_run, tmp_path)
    complete = "skip (complete with the same config and inputs)"
    assert {n: said for n, (said, _) in _dry_run(recipe_path, runs, capsys=capsys).items()} == {
        "sft": complete, "dpo": complete, "eval": complete}

    # dpo's config changes: it runs; eval's input dpo is made again first, so eval runs unless dpo comes out the same
    planned = _dry_run(recipe_path, runs, "stages.dpo.beta=0.3", capsys=capsys)
    assert planned["sft"][0] == complete
    assert planned["dpo"][0] == "run (config or inputs changed)"
    assert planned["eval"][0] == ("run (its inputs are made first: dpo), or skip if they come out unchanged "
                                  "(complete with the same config and inputs)")
    assert {said for said, _ in _dry_run(recipe_path, tmp_path / "empty", capsys=capsys).values()} == {"run (new)"}


def test_dry_run_with_resume_reports_a_start_over_when_the_stage_config_changed(tmp_path, completed_tiny_run,
                                                                                 capsys):
    """An interrupted sft with a trainer checkpoint: --resume continues it while its config is the same, and starts
    it over (no --resume in its command) once its config changed, as the run decides."""
    recipe_path, runs = _copy_of(completed_tiny_run, tmp_path)
    _killed_sft(runs)

    said, command = _dry_run(recipe_path, runs, "--resume", capsys=capsys)["sft"]
    assert said == "resume (resuming from checkpoint-30)" and command.endswith("--resume")
    said, command = _dry_run(recipe_path, runs, "--resume", "stages.sft.learning_rate=0.001", capsys=capsys)["sft"]
    assert said == "run (config or inputs changed)" and not command.endswith("--resume")


def test_resume_on_another_process_count_starts_over_when_the_global_batch_would_change(tmp_path, completed_tiny_run,
                                                                                        capsys):
    """Without global_batch_size the global batch is per device x accumulation x processes, which the config hash
    leaves out: resuming the 1-process sft on 2 processes would double its batch mid-stage."""
    recipe_path, runs = _copy_of(completed_tiny_run, tmp_path)
    sft = _killed_sft(runs)
    assert sft.read_manifest()["batch_split"] == {"global_batch_size": 16, "world_size": 1, "per_device": 16,
                                                  "accumulation": 1}
    said, command = _dry_run(recipe_path, runs, "--resume", "--cpu", "--processes", "2", capsys=capsys)["sft"]
    assert said == ("run (batch split changed: global batch 16 = 16 per device x 1 accumulation x 1 process when it "
                    "started, global batch 32 = 16 per device x 1 accumulation x 2 processes now; starting over)")
    assert not command.endswith("--resume")
    said, command = _dry_run(recipe_path, runs, "--resume", "--cpu", capsys=capsys)["sft"]
    assert said == "resume (resuming from checkpoint-30)" and command.endswith("--resume")


@pytest.mark.parametrize("recorded, now, action", [
    (split_global_batch(16, 1, 16), split_global_batch(16, 2, 16), "resume"),  # global_batch_size: another split
    (split_global_batch(16, 1, 16), split_global_batch(32, 2, 16), "run"),
    (None, split_global_batch(32, 2, 16), "resume"),  # recorded before splits were: cannot tell
], ids=["same-global-batch", "other-global-batch", "not-recorded"])
def test_a_resume_keeps_the_global_batch_not_the_split(tmp_path, recorded, now, action):
    stage = StageDir(tmp_path / "sft")
    checkpoint = stage.trainer / "checkpoint-4"
    checkpoint.mkdir(parents=True)
    (checkpoint / "trainer_state.json").write_text("{}")
    stage.write_manifest({"status": "interrupted", "config_hash": "c", "input_hashes": {},
                          **({BATCH_SPLIT: asdict(recorded)} if recorded else {})})
    stage.record_checkpoint(checkpoint)
    decision = decide_stage(stage, stage.read_manifest(), "c", {}, forced=False, resume=True, batch=now,
                            look_only=True)
    assert decision.action == action
    assert decision.reason.startswith("batch split changed: ") == (action == "run")


def _recorded_stage(tmp_path, manifest: dict, *, trainer: str = "", published: bool = False,
                    rounds: bool = False) -> StageDir:
    """A stage directory an earlier attempt left: ``manifest``, a recorded trainer checkpoint-4 ("intact" or
    "corrupt": its weights changed after the hash was recorded), the published checkpoint, a finished round."""
    stage = StageDir(tmp_path / "sft")
    stage.root.mkdir()
    stage.write_manifest(manifest)
    if trainer:
        checkpoint = stage.trainer / "checkpoint-4"
        checkpoint.mkdir(parents=True)
        (checkpoint / "model.safetensors").write_bytes(b"weights")
        stage.record_checkpoint(checkpoint)
        if trainer == "corrupt":
            (checkpoint / "model.safetensors").write_bytes(b"weightz")
    if published:
        stage.checkpoint.mkdir(parents=True)
        (stage.checkpoint / "model.safetensors").write_bytes(b"published")
        if manifest.get("output_sha256") and published != "changed":  # as the stage recorded it
            stage.update_manifest(output_sha256=rundir.directory_hash(stage.checkpoint))
    if rounds:
        (stage.root / "rounds" / "round-0" / "checkpoint").mkdir(parents=True)
    return stage


SAME = {"config_hash": "c", "input_hashes": {"sft": "i"}}


@pytest.mark.parametrize("manifest, layout, options, action, reason", [
    ({}, {}, {}, "run", "new"),
    ({**SAME, "status": "complete"}, {}, {}, "skip", "complete with the same config and inputs"),
    ({**SAME, "status": "complete", "output_sha256": "f"}, {"published": True}, {}, "skip", "complete with the same"),
    ({**SAME, "status": "complete", "output_sha256": "f"}, {}, {}, "run", "complete, but its checkpoint ("),
    ({**SAME, "status": "complete", "output_sha256": "f"}, {"published": "changed"}, {}, "run",
     "complete, but its checkpoint's files ("),
    ({**SAME, "status": "complete"}, {}, {"forced": True}, "run", "forced"),
    ({**SAME, "status": "complete", "config_hash": "d"}, {}, {}, "run", "config or inputs changed"),
    ({**SAME, "status": "complete", "input_hashes": {"sft": "j"}}, {}, {}, "run", "config or inputs changed"),
    ({**SAME, "status": "interrupted", "config_hash": "d"}, {"trainer": "intact"}, {"resume": True}, "run",
     "config or inputs changed"),
    ({**SAME, "status": "interrupted"}, {"trainer": "intact"}, {"resume": True}, "resume",
     "resuming from checkpoint-4"),
    ({**SAME, "status": "interrupted"}, {"rounds": True}, {"resume": True}, "resume",
     "resuming from its completed rounds"),
    # --force skips no unfinished stage, so --resume decides, and the reason says what happens (it said "forced")
    ({**SAME, "status": "interrupted"}, {"trainer": "intact"}, {"resume": True, "forced": True}, "resume",
     "resuming from checkpoint-4"),
    ({**SAME, "status": "interrupted"}, {"trainer": "corrupt"}, {"resume": True}, "run",
     "no intact checkpoint to resume from; starting over"),
    ({**SAME, "status": "interrupted"}, {"trainer": "intact"}, {}, "run",
     "previous attempt interrupted; starting over (use --resume to continue)"),
    ({**SAME, "status": "failed"}, {}, {"resume": True}, "run",
     "previous attempt failed; no checkpoint to resume from; starting over"),
    ({**SAME}, {}, {}, "run", "previous attempt unknown; no checkpoint to resume from"),
    ({**SAME, "status": "interrupted", BATCH_SPLIT: asdict(split_global_batch(16, 1, 16))}, {"trainer": "intact"},
     {"batch": split_global_batch(32, 2, 16)}, "run", "previous attempt interrupted; starting over (use --resume"),
], ids=["new", "complete", "published", "published-gone", "published-changed", "forced", "config", "inputs", "resume-other-work",
        "resume", "resume-rounds", "resume-forced", "resume-corrupt", "no-resume", "nothing-to-resume", "no-status",
        "no-resume-other-batch"])
def test_decide_stage_skips_runs_or_resumes_by_the_recorded_attempt(tmp_path, manifest, layout, options, action,
                                                                     reason):
    stage = _recorded_stage(tmp_path, manifest, **layout)
    decision = decide_stage(stage, stage.read_manifest() or {}, "c", {"sft": "i"}, **{"forced": False,
                            "resume": False, **options})
    assert (decision.action, decision.reason[:len(reason)]) == (action, reason)
    resumed_from = stage.trainer / "checkpoint-4" if reason == "resuming from checkpoint-4" else None
    assert decision.resume_from == resumed_from


@pytest.mark.parametrize("look_only", [True, False], ids=["dry-run", "run"])
def test_only_the_run_sets_a_corrupt_checkpoint_aside_when_deciding(tmp_path, look_only):
    stage = _recorded_stage(tmp_path, {**SAME, "status": "interrupted"}, trainer="corrupt")
    decide_stage(stage, stage.read_manifest(), "c", {"sft": "i"}, forced=False, resume=True, look_only=look_only)
    assert (stage.trainer / "checkpoint-4").is_dir() == look_only
    assert (stage.trainer / "invalid-checkpoint-4").is_dir() != look_only


# ----------------------------------------------------------------------------- preflight reads each file once

@pytest.mark.parametrize("backbone", [False, True], ids=["recipe-model", "backbone"])
def test_preflight_reads_a_trl_reward_file_once(tmp_path, monkeypatch, llama_path, backbone):
    """A trl reward stage's file is read to see whether its rows are conversations (the tokenizer check of the
    recipe's model or of the stage's backbone) and to check its rows: one read serves both."""
    import alignpipe.data.preference as preference
    from alignpipe.pipeline.preflight import PreflightError, preflight

    reads = []

    def counting_load_rows(path, *args, **kwargs):
        reads.append(path)
        return original(path, *args, **kwargs)

    original = preference.load_rows
    monkeypatch.setattr(preference, "load_rows", counting_load_rows)
    # enough prompts that the held-out split has both sides, which preflight checks too
    data = _pairs_file(tmp_path / "pairs.jsonl", rows=[(f"copy: {i}", str(i), str(i + 1)) for i in range(1, 31)])
    reward = {"name": "rm", "type": "reward", "implementation": "trl", "members": 1, "max_length": 48,
              "dataset": {"source": "trl", "path": str(data)}, **({"backbone": llama_path} if backbone else {})}
    model = TINY_RECIPE["model"] if backbone else {"name_or_path": llama_path}
    recipe = load_recipe(write_recipe(tmp_path, {**TINY_RECIPE, "model": model, "stages": [reward]}))
    preflight(recipe)
    assert reads == [str(data)]

    reads.clear()
    data.write_text('{"prompt": "copy: 1", "chosen": "1"}\n')  # no rejected column: reported, still from one read
    with pytest.raises(PreflightError, match="stages.rm.dataset: .*rejected"):
        preflight(recipe)
    assert reads == [str(data)]


@pytest.mark.parametrize("error, status", [(KeyboardInterrupt(), "interrupted"), (RuntimeError("boom"), "failed")])
def test_run_json_says_where_and_how_the_last_attempt_stopped(tiny_recipe_path, tmp_path, monkeypatch, error,
                                                              status):
    """After an attempt stopped part-way (perhaps under other overrides), the stages it did not reach hold an earlier
    attempt's outputs; run.json says so, where it said nothing and described the new recipe."""
    from alignpipe.pipeline.runner import StageOutcome

    def run_stage(self, stage, outputs, channel):
        if stage.name == "dpo":
            raise error
        return StageOutcome(stage.name, "skipped", 0.0, "stand-in")

    monkeypatch.setattr(Runner, "_run_stage", run_stage)
    runner = Runner(load_recipe(tiny_recipe_path), runs_dir=tmp_path / "runs", in_process=True)
    with pytest.raises(type(error)):
        runner.run()
    record = json.loads((runner.run_dir / "run.json").read_text())
    assert (record["status"], record["stopped_at"]) == (status, "dpo")


def test_the_batch_plan_shows_a_trl_reward_stages_batch_which_grows_with_the_processes(tmp_path):
    """TRL's reward trainer takes per_device_train_batch_size on each process, so its global batch doubles on two:
    the plan logged at the start and printed by --dry-run says so, as the stage's manifest records it (it was left
    out, and only the manifest showed it)."""
    from alignpipe.pipeline.launch_checks import plan_batches

    reward = {"name": "rm", "type": "reward", "inputs": ["sft"], "implementation": "trl", "members": 1,
              "per_device_train_batch_size": 16}
    ensemble = {"name": "ensemble", "type": "reward", "inputs": ["sft"]}
    recipe = load_recipe(write_recipe(tmp_path, {**TINY_RECIPE, "stages": [TINY_RECIPE["stages"][0], reward,
                                                                            ensemble]}))
    plans = [plan_batches(recipe, world) for world in (1, 2)]
    assert plans[0]["rm"] == ("global batch 16 = 16 per device x 1 accumulation x 1 process (a trl reward stage's "
                              "per_device_train_batch_size is per process)")
    assert plans[1]["rm"].startswith("global batch 32 = 16 per device x 1 accumulation x 2 processes")
    assert "ensemble" not in plans[1]  # the ensemble's batch is global whatever the process count


def test_a_second_recipe_file_with_the_same_name_is_warned_of(tmp_path, monkeypatch, caplog, capsys):
    """runs/<name> is one run directory per name: a copied recipe not renamed, or a child recipe (which inherits its
    parent's name), would replace the first recipe's outputs; the run and its dry run say so, naming both files.
    The same file again (by another path to it, or moved with its runs) and overrides of it are that recipe's run,
    and say nothing."""
    from alignpipe.pipeline.runner import StageOutcome

    monkeypatch.setattr(Runner, "_run_stage", lambda self, stage, outputs, channel:
                        StageOutcome(stage.name, "skipped", 0.0, "stand-in"))
    monkeypatch.setattr(Runner, "_prepare_base", lambda self: ("base", None))
    runs = tmp_path / "runs"
    (tmp_path / "a").mkdir()
    parent = write_recipe(tmp_path / "a", TINY_RECIPE, "parent.yaml")
    child = tmp_path / "a" / "child.yaml"
    child.write_text("extends: parent.yaml\nstages:\n  - {name: dpo, beta: 0.3}\n")

    def run(path, overrides=(), dry_run=False):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="alignpipe"):
            Runner(load_recipe(path, overrides), runs_dir=runs, recipe_path=path, overrides=list(overrides),
                   in_process=True, dry_run=dry_run).run()
        return [r.getMessage() for r in caplog.records if "has the same name" in r.getMessage()]

    assert run(parent) == [] and run(parent, ["stages.dpo.beta=0.2"]) == []
    monkeypatch.chdir(tmp_path / "a")
    assert run(parent.name) == []  # the same file by a relative path
    capsys.readouterr()
    assert run(child, dry_run=True) == []
    note = capsys.readouterr().out
    assert f"[dry-run] note: {runs / 'tiny'} holds the run of {parent.resolve()}; this recipe, {child.resolve()}" \
        in note and "Give this recipe its own name:" in note
    [warning] = run(child)
    assert f"holds the run of {parent.resolve()}; this recipe, {child.resolve()}, has the same name (tiny)" in warning
    assert run(child) == []  # now the child's run: the parent's turn to be warned
    assert len(run(parent)) == 1
    moved = tmp_path / "moved"  # the project moved whole, recipes with runs: the same files
    shutil.copytree(tmp_path / "a", moved / "a")
    shutil.copytree(runs, moved / "runs")
    runs = moved / "runs"
    assert run(moved / "a" / "parent.yaml") == []
    scratch = tmp_path / "scratch"  # runs/ linked to scratch space, and the project then moved: the same file
    shutil.copytree(runs, scratch)
    shutil.copytree(moved / "a", tmp_path / "project" / "a")
    (tmp_path / "project" / "runs").symlink_to(scratch)
    runs = tmp_path / "project" / "runs"
    assert run(tmp_path / "project" / "a" / "parent.yaml") == []
    shutil.move(tmp_path / "project", tmp_path / "project2")
    runs = tmp_path / "project2" / "runs"
    assert run(tmp_path / "project2" / "a" / "parent.yaml") == []
    (tmp_path / "project2" / "link.yaml").symlink_to(tmp_path / "project2" / "a" / "parent.yaml")
    assert run(tmp_path / "project2" / "link.yaml") == []  # the same file through a link to it
    assert len(run(tmp_path / "project2" / "a" / "child.yaml")) == 1


@pytest.mark.parametrize(("name", "hint"), [("SFT", "; did you mean 'sft'?"), ("dpoo", "; did you mean 'dpo'?"),
                                            ("reward", "")])
def test_force_of_an_unknown_stage_names_the_stages_and_the_nearest(tiny_recipe_path, tmp_path, name, hint):
    """--force names a stage as the recipe writes it; a wrong one (capitals included) is refused before anything
    runs, pointing to the nearest stage name."""
    with pytest.raises(ValueError) as refused:
        Runner(load_recipe(tiny_recipe_path), runs_dir=tmp_path / "runs", force=[name], in_process=True)
    assert str(refused.value) == (f"--force {name}: no such stage in recipe 'tiny'{hint}; "
                                  "stages: ['sft', 'dpo', 'eval']")
    assert not (tmp_path / "runs").exists()
