"""A run directory damaged on disk (a full disk, a crash mid-write without atomic rename, a hand edit, a deleted
folder): each damaged file is named in a clear message or recovered from, never a traceback or a silent reuse."""

from __future__ import annotations

import json
import shutil

import pytest
from conftest import TINY_RECIPE, write_recipe

from alignpipe.pipeline.decision import decide_stage
from alignpipe.pipeline.rundir import CHECKPOINTS, RESULTS, RUN_ROOT_RESULTS, StageDir


def _copy_of(completed_tiny_run, tmp_path):
    """The recipe and a copy of the completed tiny run's directory, to damage at will."""
    recipe_path = write_recipe(tmp_path, TINY_RECIPE)
    runs = tmp_path / "runs"
    shutil.copytree(completed_tiny_run[0].run_dir, runs / "tiny")
    return recipe_path, runs


def _dry_run(recipe_path, runs, capsys, *options) -> dict[str, str]:
    """``alignpipe run --dry-run``: {stage: what it says it would do}."""
    from alignpipe.cli import main

    assert main(["run", str(recipe_path), "--dry-run", "--runs-dir", str(runs), *options]) == 0
    heads = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[dry-run] ")]
    return {head.split(" ", 2)[1]: head.split(": ", 1)[1] for head in heads if "): " in head}


def _truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _as_directory(path):
    path.unlink()
    path.mkdir()


MANIFEST_DAMAGE = {
    "truncated": (_truncate, "cannot be read (JSONDecodeError"),
    "list": (lambda path: path.write_text("[1, 2]"), "holds a JSON list, not the object a manifest is"),
    "string": (lambda path: path.write_text('"complete"'), "holds a JSON str, not the object a manifest is"),
    "directory": (_as_directory, "cannot be read (IsADirectoryError"),
}


@pytest.mark.parametrize("damage", MANIFEST_DAMAGE)
def test_a_damaged_stage_manifest_is_named_in_the_reason_the_stage_starts_over(tmp_path, completed_tiny_run, capsys,
                                                                                damage):
    """A manifest that is not a readable JSON object means "not complete", as a torn one always did; the reason says
    which file is damaged, where it said "new" (or the run died on ``list.get``)."""
    recipe_path, runs = _copy_of(completed_tiny_run, tmp_path)
    sft = StageDir(runs / "tiny" / "sft")
    breaks, problem = MANIFEST_DAMAGE[damage]
    breaks(sft.manifest)
    for options in ((), ("--resume",)):
        said = _dry_run(recipe_path, runs, capsys, *options)["sft"]
        assert said.startswith(f"run ({sft.manifest} {problem}") and "starting over" in said

    assert sft.read_manifest() is None
    decision = decide_stage(sft, {}, "c", {}, forced=False, resume=True)
    assert decision.action == "run" and problem in decision.reason
    sft.reset()  # what a run does next: whatever stands in the manifest's place goes with the old outputs
    assert not sft.manifest.exists() and not sft.checkpoint.exists()


def test_hand_edited_checkpoint_records_are_no_records(tmp_path):
    """A manifest whose checkpoint records are not a mapping of hashes leaves nothing to resume from, not a crash."""
    stage = StageDir(tmp_path / "sft")
    (stage.trainer / "checkpoint-4").mkdir(parents=True)
    for records in ([1], "checkpoint-4", {"trainer/checkpoint-4": 7}):
        stage.write_manifest({"status": "interrupted", CHECKPOINTS: records})
        assert not stage.has_progress()
        assert stage.checkpoint_problem(stage.trainer / "checkpoint-4").startswith("its save never finished")
    assert json.loads(stage.manifest.read_text())[CHECKPOINTS] == {"trainer/checkpoint-4": 7}  # nothing rewritten


# ----------------------------------------------------------------------------- weights that cannot be read

def _truncated_weights(path):
    _truncate(path)


def _grown_tensor(path):
    """The file's first tensor replaced by one of another shape (a hand edit, another model's file copied over)."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(path))
    first = sorted(tensors)[0]
    tensors[first] = tensors[first].new_zeros(*[size + 1 for size in tensors[first].shape])
    save_file(tensors, str(path), metadata={"format": "pt"})


WEIGHTS_DAMAGE = {"truncated": (_truncated_weights, "its weights cannot be read"),
                  "reshaped": (_grown_tensor, "a tensor's shape does not match its config.json")}


@pytest.mark.parametrize("damage", WEIGHTS_DAMAGE)
def test_eval_of_a_checkpoint_with_damaged_weights_names_it(tmp_path, completed_tiny_run, capsys, damage):
    """A truncated or reshaped model.safetensors is a one-line error naming the checkpoint, exit status 2, where
    safetensors' "incomplete metadata" or transformers' "ignore_mismatched_sizes" came as a traceback."""
    from alignpipe.cli import main

    checkpoint = tmp_path / "checkpoint"
    shutil.copytree(StageDir(completed_tiny_run[0].run_dir / "sft").checkpoint, checkpoint)
    breaks, problem = WEIGHTS_DAMAGE[damage]
    breaks(checkpoint / "model.safetensors")
    assert main(["eval", str(checkpoint), "--n-prompts", "4", "--max-new-tokens", "4", "--out", str(tmp_path / "out"),
                 "--cache-dir", str(tmp_path / "cache")]) == 2
    error = capsys.readouterr().err
    assert f"checkpoint {checkpoint}: {problem}" in error and "--force STAGE" in error
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name, damage", [("tokenizer.json", _truncate), ("config.json", lambda p: p.write_text("[1]")),
                                          ("tokenizer.json", lambda p: p.unlink())])
def test_eval_of_a_checkpoint_with_a_damaged_tokenizer_names_it(tmp_path, completed_tiny_run, capsys, name, damage):
    """A tokenizer.json cut short or gone, or a config.json that is a JSON list, gave a message naming no file (or
    a TypeError traceback): the checkpoint is named, with the fix."""
    from alignpipe.cli import main

    checkpoint = tmp_path / "checkpoint"
    shutil.copytree(StageDir(completed_tiny_run[0].run_dir / "sft").checkpoint, checkpoint)
    damage(checkpoint / name)
    assert main(["eval", str(checkpoint), "--n-prompts", "4", "--max-new-tokens", "4", "--out", str(tmp_path / "out"),
                 "--cache-dir", str(tmp_path / "cache")]) == 2
    error = capsys.readouterr().err
    assert f"checkpoint {checkpoint}: its tokenizer cannot be read" in error and "--force STAGE" in error
    assert "Traceback" not in error


@pytest.mark.parametrize("damage", WEIGHTS_DAMAGE)
def test_a_reward_ensemble_with_damaged_heads_is_a_clear_error(tmp_path, llama_path, damage):
    from alignpipe.rewards.ensemble import EnsembleSpec, RewardEnsemble

    spec = EnsembleSpec(backbone=llama_path, members=2, lora_r=4, lora_alpha=8, top_layers=2, seed=0)
    saved = RewardEnsemble.create(spec).save(tmp_path / "rm")
    breaks, _ = WEIGHTS_DAMAGE[damage]
    breaks(saved / "heads.safetensors")
    problem = "its weights cannot be read" if damage == "truncated" else r"heads.safetensors: member-0.bias should have"
    with pytest.raises(ValueError, match=f"{problem}.*re-run"):
        RewardEnsemble.load(saved)


@pytest.mark.parametrize("record", ['"edited"', "[1, 2]"])
def test_a_reward_stage_whose_checkpoint_manifest_was_edited_starts_over(tmp_path, llama_path, record):
    """The skip decision hashes a complete reward stage's checkpoint by its identity, which reads its manifest: a
    backbone record edited to text or a list raised an AttributeError out of the decision (run and dry run died);
    the checkpoint is not the one published, so the stage starts over, saying so."""
    from alignpipe.pipeline.rundir import output_hash
    from alignpipe.rewards.ensemble import EnsembleSpec, RewardEnsemble

    stage = StageDir(tmp_path / "rm")
    spec = EnsembleSpec(backbone=llama_path, members=2, lora_r=4, lora_alpha=8, top_layers=2, seed=0)
    RewardEnsemble.create(spec).save(stage.checkpoint)
    manifest = {"status": "complete", "config_hash": "c", "input_hashes": {}, "output_sha256": output_hash(
        stage.checkpoint)}
    stage.write_manifest(manifest)
    assert decide_stage(stage, manifest, "c", {}, forced=False, resume=False).action == "skip"
    saved = json.loads((stage.checkpoint / "manifest.json").read_text())
    (stage.checkpoint / "manifest.json").write_text(json.dumps({**saved, "backbone": json.loads(record)}))
    decision = decide_stage(stage, manifest, "c", {}, forced=False, resume=False, look_only=True)
    assert decision.action == "run" and decision.reason.startswith("complete, but its checkpoint")


# ----------------------------------------------------------------------------- the report of a damaged run

def test_the_report_names_the_lines_of_a_damaged_metrics_file_it_leaves_out(tmp_path, completed_tiny_run):
    """A complete stage's metrics.jsonl cut short (a full disk) or edited drew curves from what was left, saying
    nothing; only the last line of a stage still running may be one being appended."""
    from alignpipe.evaluation.report_data import read_run

    _, runs = _copy_of(completed_tiny_run, tmp_path)
    sft = StageDir(runs / "tiny" / "sft")
    lines = sft.metrics.read_text().splitlines()
    sft.metrics.write_text("\n".join([*lines[:2], "not json", *lines[2:], lines[-1][:10]]) + "\n")
    total = len(lines) + 2

    run = read_run(runs / "tiny")
    assert [e for e in run.errors if e.startswith("metrics.jsonl in sft")] == [
        f"metrics.jsonl in sft: lines 3, {total} of {total} are not JSON records (the file is damaged: cut short, or "
        "edited); its curves below leave those lines out"]
    assert len(next(s for s in run.stages if s.name == "sft").records) == len(lines)

    sft.update_manifest(status="running")
    assert [e for e in read_run(runs / "tiny").errors if e.startswith("metrics.jsonl in sft")] == [
        f"metrics.jsonl in sft: line 3 of {total} is not a JSON record (the file is damaged: cut short, or edited); its "
        "curves below leave those lines out"]


def test_the_report_says_a_run_record_that_is_not_an_object_could_not_be_read(tmp_path, completed_tiny_run):
    from alignpipe.evaluation.report_data import read_run

    _, runs = _copy_of(completed_tiny_run, tmp_path)
    (runs / "tiny" / "run.json").write_text("[1, 2]")
    assert "run.json in tiny: it holds a JSON list, not an object" in read_run(runs / "tiny").errors


def test_the_report_says_a_run_record_that_is_not_utf8_could_not_be_read(tmp_path, completed_tiny_run):
    """A run.json of other bytes (overwritten, a disk error) raised a UnicodeDecodeError out of the report."""
    from alignpipe.evaluation.report_data import read_run

    _, runs = _copy_of(completed_tiny_run, tmp_path)
    (runs / "tiny" / "run.json").write_bytes(b"\xff\xfe{}")
    assert "run.json in tiny: not UTF-8 text (byte 0xff at offset 0)" in read_run(
        runs / "tiny").errors
    (runs / "tiny" / "run.json").write_text("[" * 100_000)  # a RecursionError out of json.loads, in every reader
    assert "run.json in tiny: nested too deeply to be a record this project wrote" in read_run(runs / "tiny").errors


def test_a_run_record_with_fields_of_other_types_costs_only_those_fields(tmp_path, completed_tiny_run, capsys):
    """run.json edited by hand (overrides a number, recipe_file a list): the report and the next run died on it."""
    from alignpipe.evaluation.report import write_report

    recipe_path, runs = _copy_of(completed_tiny_run, tmp_path)
    record_path = runs / "tiny" / "run.json"
    record = json.loads(record_path.read_text())
    record_path.write_text(json.dumps({**record, "overrides": 7, "recipe_file": [1], "status": 12}))

    assert _dry_run(recipe_path, runs, capsys)["sft"] == "skip (complete with the same config and inputs)"
    text = write_report(runs / "tiny").read_text()
    assert "its &#x27;overrides&#x27; is a int, not the list the runner writes" in text
    assert "its &#x27;status&#x27; is a int, not the str the runner writes" in text
    assert f"<code>{record['git_sha']}</code>" in text  # the rest of the record is shown


# ----------------------------------------------------------------------------- files the run cannot write

@pytest.mark.parametrize("name", ["run.json", "recipe.yaml"])
def test_a_directory_where_the_run_writes_a_file_is_a_clear_error(tmp_path, completed_tiny_run, capsys, name):
    from alignpipe.cli import main

    recipe_path, runs = _copy_of(completed_tiny_run, tmp_path)
    _as_directory(runs / "tiny" / name)
    assert main(["run", str(recipe_path), "--runs-dir", str(runs), "--in-process"]) == 2
    error = capsys.readouterr().err
    assert f"error: {runs / 'tiny' / name}: Is a directory (while the run read or wrote its run directory); move " \
           f"aside what stands at {runs / 'tiny' / name}" in error
    assert "Traceback" not in error


def test_a_full_disk_is_a_clear_error(tmp_path, completed_tiny_run, capsys, monkeypatch):
    import errno

    from alignpipe.cli import main
    from alignpipe.pipeline import runner

    def full(path, text):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    recipe_path, runs = _copy_of(completed_tiny_run, tmp_path)
    monkeypatch.setattr(runner, "atomic_write_text", full)
    assert main(["run", str(recipe_path), "--runs-dir", str(runs), "--in-process"]) == 2
    assert f"{runs / 'tiny' / 'recipe.yaml'}: No space left on device (while the run read or wrote its run " \
           "directory); free some space, then run the same command again" in capsys.readouterr().err


@pytest.mark.parametrize("content", ['{"metrics": {"accuracy": {"val', "[]", '{"metrics": {"accuracy": 0.5}}', None],
                         ids=["truncated", "list", "wrong-entries", "deleted"])
def test_an_eval_stage_names_a_damaged_reward_eval_json_and_the_fix(tmp_path, content):
    """The eval stage's reward row is read from the reward stage's reward_eval.json: damaged, it died on a KeyError
    or JSONDecodeError that named no file."""
    from types import SimpleNamespace

    from alignpipe.trainers.eval import _reward_row

    reward = StageDir(tmp_path / "reward")
    reward.root.mkdir()
    reward.write_manifest({"status": "complete", "output_sha256": "a" * 64})
    if content is not None:
        (reward.root / "reward_eval.json").write_text(content)
    ctx = SimpleNamespace(run_dir=tmp_path, inputs={"reward": str(reward.checkpoint)})
    with pytest.raises(ValueError, match=r"reward_eval.json: .*; re-run that stage \(`alignpipe run RECIPE --force "
                                         r"reward`\)"):
        _reward_row(ctx, "reward")


@pytest.mark.parametrize(("content", "problem", "recipe_path"), [
    ('{"recipe_path": "r.yaml", "git_', "run.json in run: Unterminated string", None),
    ("[1, 2]", "run.json in run: it holds a JSON list, not an object", None),
    (None, "run.json in run: [Errno 21] Is a directory", None),
    ('{"recipe_path": "r.yaml", "git_sha": 7}',
     "run.json: its 'git_sha' is a int, not the str the runner writes (edited by hand?); left out", "r.yaml"),
], ids=["truncated", "list", "directory", "wrong-type"])
def test_an_eval_stage_records_what_it_can_read_of_a_damaged_run_json(tmp_path, caplog, content, problem,
                                                                       recipe_path):
    """The eval stage reads the recipe and git commit its leaderboard records from run.json: damaged, it died on a
    JSONDecodeError or AttributeError after evaluating every checkpoint."""
    from types import SimpleNamespace

    from alignpipe.trainers.eval import _recorded_run

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    if content is None:
        (run_dir / "run.json").mkdir()
    else:
        (run_dir / "run.json").write_text(content)
    ctx = SimpleNamespace(run_dir=run_dir, dir=StageDir(run_dir / "eval"))
    assert _recorded_run(ctx) == {"recipe_path": recipe_path, "recipe_sha256": None, "git_sha": None}
    assert f"[eval] {problem}" in caplog.text


def test_a_directory_where_leaderboard_md_goes_reruns_the_eval_stage_into_a_clear_error(tmp_path, completed_tiny_run,
                                                                                        capsys):
    """The eval stage's recorded leaderboard.md replaced by a directory: the stage runs again and stops on it, naming
    it with the fix. An eval stage recorded before its results were is skipped as before, and the run's summary
    passes over a leaderboard.md that is not a file."""
    from alignpipe.cli import main

    recipe_path, runs = _copy_of(completed_tiny_run, tmp_path)
    board = runs / "tiny" / "leaderboard.md"
    _as_directory(board)
    evaluation = StageDir(runs / "tiny" / "eval")
    recorded = evaluation.read_manifest()
    evaluation.write_manifest({key: value for key, value in recorded.items() if key not in (RESULTS, RUN_ROOT_RESULTS)})
    assert main(["run", str(recipe_path), "--runs-dir", str(runs), "--in-process"]) == 0
    assert "skipped" in capsys.readouterr().out

    evaluation.write_manifest(recorded)
    assert main(["run", str(recipe_path), "--runs-dir", str(runs), "--in-process"]) == 2
    error = capsys.readouterr().err
    assert f"error: {board}: Is a directory (while the run read or wrote its run directory); move aside what " \
           f"stands at {board}" in error
    assert "Traceback" not in error


def _run_in_process(recipe_path, runs, **options) -> dict:
    """``alignpipe run --in-process``: {stage: its outcome}."""
    from alignpipe.pipeline.runner import Runner
    from alignpipe.recipe import load_recipe

    runner = Runner(load_recipe(recipe_path), runs_dir=runs, recipe_path=recipe_path, in_process=True, **options)
    return {outcome.name: outcome for outcome in runner.run()}


def _copy_with_eval_cache(completed_tiny_run, tmp_path):
    """``_copy_of``, with the runs directory's eval cache, so an eval stage that runs again samples nothing."""
    recipe_path, runs = _copy_of(completed_tiny_run, tmp_path)
    shutil.copytree(completed_tiny_run[0].run_dir.parent / ".cache", runs / ".cache")
    return recipe_path, runs


def _rows(board: dict) -> list[dict]:
    """A leaderboard's rows but their checkpoints' paths (a copied run's lie elsewhere)."""
    return [{key: value for key, value in row.items() if key != "path"} for row in board["checkpoints"]]


def _edit_a_metric(path):
    board = json.loads(path.read_text())
    board["checkpoints"][0]["results"]["gold_reward"]["value"] += 1.0
    path.write_text(json.dumps(board, indent=2))


LEADERBOARD_DAMAGE = {
    "deleted-md": ("leaderboard.md", lambda path: path.unlink(), "leaderboard.md is missing"),
    "edited-json": ("leaderboard.json", _edit_a_metric, "leaderboard.json hashes to "),
    "deleted-samples": ("eval/samples", shutil.rmtree, "eval/samples is missing"),
}


@pytest.mark.parametrize("damage", LEADERBOARD_DAMAGE)
def test_a_deleted_or_edited_leaderboard_reruns_the_eval_stage_which_restores_it(tmp_path, completed_tiny_run, capsys,
                                                                                damage):
    """A complete eval stage was skipped whatever had become of the run's leaderboard and its samples: deleted or
    edited, they stayed so. Its results are checked as a training stage's checkpoint is: the dry run and the run say
    which changed, the eval stage alone runs again (its cache serves the samples) and writes them as they were."""
    recipe_path, runs = _copy_with_eval_cache(completed_tiny_run, tmp_path)
    run_dir = runs / "tiny"
    before = json.loads((run_dir / "leaderboard.json").read_text())
    markdown = (run_dir / "leaderboard.md").read_text()
    name, breaks, problem = LEADERBOARD_DAMAGE[damage]
    breaks(run_dir / name)
    reason = f"complete, but its results in {run_dir} changed since it completed: {problem}"

    planned = _dry_run(recipe_path, runs, capsys)
    assert planned["eval"].startswith(f"run ({reason}") and planned["eval"].endswith("; starting over)")
    outcomes = _run_in_process(recipe_path, runs)
    assert {stage: outcome.action for stage, outcome in outcomes.items()} == {"sft": "skipped", "dpo": "skipped",
                                                                              "eval": "ran"}
    assert outcomes["eval"].reason.startswith(reason)
    after = json.loads((run_dir / "leaderboard.json").read_text())
    assert _rows(after) == _rows(before)
    assert (run_dir / "leaderboard.md").read_text() == markdown.replace(before["date"], after["date"])
    assert {path.name for path in (run_dir / "eval" / "samples").iterdir()} >= {"base.jsonl", "sft.jsonl", "dpo.jsonl"}
    assert {outcome.action for outcome in _run_in_process(recipe_path, runs).values()} == {"skipped"}


def test_an_untouched_run_skips_its_eval_stage_whose_results_are_recorded(tmp_path, completed_tiny_run):
    """The eval stage records the hash of its results and, apart, of the run's leaderboard (not report.html, which
    ``alignpipe report`` rewrites): as they were, and with the report written again, it is skipped."""
    from alignpipe.evaluation.report import write_report

    recipe_path, runs = _copy_of(completed_tiny_run, tmp_path)
    recorded = StageDir(runs / "tiny" / "eval").read_manifest()
    assert set(recorded[RESULTS]) == {"eval/results.json", "eval/samples"}
    assert set(recorded[RUN_ROOT_RESULTS]) == {"leaderboard.json", "leaderboard.csv", "leaderboard.md"}
    write_report(runs / "tiny")
    outcomes = _run_in_process(recipe_path, runs)
    assert {outcome.action for outcome in outcomes.values()} == {"skipped"}
    assert outcomes["eval"].reason == "complete with the same config and inputs"


def _with_a_second_eval(tmp_path) -> tuple:
    """The tiny recipe with a second eval stage, ``eval2``, after its ``eval``."""
    second = {**TINY_RECIPE["stages"][-1], "name": "eval2"}
    return write_recipe(tmp_path, {**TINY_RECIPE, "stages": [*TINY_RECIPE["stages"], second]}, "two-evals.yaml")


def test_of_two_eval_stages_the_last_ones_leaderboard_is_checked(tmp_path, completed_tiny_run):
    """Both eval stages write the run's leaderboard, and the last one's is kept: were the first's checked too, each
    would find the other's leaderboard and both would run again on every run."""
    _, runs = _copy_with_eval_cache(completed_tiny_run, tmp_path)
    recipe_path = _with_a_second_eval(tmp_path)
    outcomes = _run_in_process(recipe_path, runs, force=["eval"])  # it records the leaderboard eval2 then replaces
    assert (outcomes["eval"].action, outcomes["eval2"].action) == ("ran", "ran")
    assert set(StageDir(runs / "tiny" / "eval").read_manifest()[RESULTS]) == {"eval/results.json", "eval/samples"}
    assert "leaderboard.json" in StageDir(runs / "tiny" / "eval2").read_manifest()[RUN_ROOT_RESULTS]
    assert {outcome.action for outcome in _run_in_process(recipe_path, runs).values()} == {"skipped"}
    assert json.loads((runs / "tiny" / "leaderboard.json").read_text())["run"]["stage"] == "eval2"


def test_an_eval_stage_added_after_the_last_takes_its_leaderboard_over(tmp_path, completed_tiny_run, capsys):
    """Which eval stage's leaderboard is checked is the recipe's now, not when the stage ran: eval, the last when it
    ran, is skipped once eval2 follows it and has replaced its leaderboard. It was checked as when it ran, so the run
    after eval2's first ran both again ("leaderboard.json hashes to ..."), and only the run after that skipped all."""
    _, runs = _copy_with_eval_cache(completed_tiny_run, tmp_path)
    recipe_path = _with_a_second_eval(tmp_path)
    outcomes = _run_in_process(recipe_path, runs)
    assert (outcomes["eval"].action, outcomes["eval2"].action) == ("skipped", "ran")
    assert all(said.startswith("skip (") for said in _dry_run(recipe_path, runs, capsys).values())
    assert {outcome.action for outcome in _run_in_process(recipe_path, runs).values()} == {"skipped"}
    assert json.loads((runs / "tiny" / "leaderboard.json").read_text())["run"]["stage"] == "eval2"


def test_an_eval_stage_that_is_the_last_again_writes_its_own_leaderboard(tmp_path, completed_tiny_run, capsys):
    """eval ran before eval2, which replaced its leaderboard; eval2 dropped from the recipe, eval is the last eval
    stage again and the run's leaderboard is eval2's: eval runs again and writes its own (a deleted leaderboard.md
    with it). Recorded without a leaderboard as the first of two, it was skipped and the leaderboard.md stayed gone."""
    recipe_path, runs = _copy_with_eval_cache(completed_tiny_run, tmp_path)
    run_dir = runs / "tiny"
    outcomes = _run_in_process(_with_a_second_eval(tmp_path), runs, force=["eval"])
    assert (outcomes["eval"].action, outcomes["eval2"].action) == ("ran", "ran")
    (run_dir / "leaderboard.md").unlink()
    reason = f"complete, but its results in {run_dir} changed since it completed: "

    planned = _dry_run(recipe_path, runs, capsys)["eval"]
    assert planned.startswith(f"run ({reason}") and "leaderboard.md is missing" in planned
    outcomes = _run_in_process(recipe_path, runs)
    assert {stage: outcome.action for stage, outcome in outcomes.items()} == {"sft": "skipped", "dpo": "skipped",
                                                                              "eval": "ran"}
    assert outcomes["eval"].reason.startswith(reason) and "leaderboard.md is missing" in outcomes["eval"].reason
    assert json.loads((run_dir / "leaderboard.json").read_text())["run"]["stage"] == "eval"
    assert (run_dir / "leaderboard.md").is_file()
    assert {outcome.action for outcome in _run_in_process(recipe_path, runs).values()} == {"skipped"}


@pytest.mark.parametrize("owns_run_root", [True, False], ids=["last", "not-last"])
def test_an_eval_stage_recorded_without_its_leaderboard_runs_again_as_the_last(tmp_path, owns_run_root):
    """A record of its own results but none of the run's leaderboard (an eval stage that was not the last, as
    records once were): as the recipe's last eval stage the leaderboard it would keep is not known to be its own,
    so it runs again. A record of neither (from before results were recorded) is trusted, last or not."""
    stage = StageDir(tmp_path / "eval")
    stage.write_manifest({"status": "complete", RESULTS: {}})
    assert stage.published_problem(stage.read_manifest(), owns_run_root=owns_run_root) == (
        f"its record names no leaderboard of its own ({RUN_ROOT_RESULTS}): the run's may be another eval stage's"
        if owns_run_root else None)
    stage.write_manifest({"status": "complete"})
    assert stage.published_problem(stage.read_manifest(), owns_run_root=owns_run_root) is None


@pytest.mark.parametrize("key", [RESULTS, RUN_ROOT_RESULTS])
@pytest.mark.parametrize("record", [["leaderboard.md"], {"leaderboard.md": 7}], ids=["list", "number"])
def test_a_hand_edited_record_of_results_is_not_trusted(tmp_path, record, key):
    stage = StageDir(tmp_path / "eval")
    stage.write_manifest({"status": "complete", RESULTS: {}, RUN_ROOT_RESULTS: {}, key: record})
    assert stage.published_problem(stage.read_manifest(), owns_run_root=True) == (
        f"its record of its results ({key}) is not a mapping of file hashes (edited by hand?)")


def test_a_damaged_gguf_file_keeps_preflights_own_message(tmp_path):
    """load_tokenizer names a local folder's damaged tokenizer files; a GGUF file is its callers' to name (preflight
    says which file, and that reading one needs the gguf package), not a tokenizer.json to copy again."""
    from alignpipe.models.loading import ModelError
    from alignpipe.pipeline.preflight import _tokenizer

    (tmp_path / "model.gguf").write_bytes(b"GGUF\x03\x00")
    with pytest.raises(ModelError) as refused:
        _tokenizer(tmp_path, chat_template=True, gguf_file="model.gguf")
    assert f"{tmp_path / 'model.gguf'}: its tokenizer does not load" in str(refused.value)
    assert "tokenizer.json" not in str(refused.value)
