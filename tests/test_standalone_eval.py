"""`alignpipe eval` on an existing run directory uses the same harness as the eval stage."""

from __future__ import annotations

import json

import pytest
import yaml

from alignpipe.cli import main


def test_eval_command_on_a_run_directory(completed_tiny_run, tmp_path, capsys):
    runner, _ = completed_tiny_run
    out = tmp_path / "board"
    code = main(["eval", str(runner.run_dir), "--reference", str(runner.run_dir / "sft" / "checkpoint"),
                 "--out", str(out), "--n-prompts", "16", "--max-new-tokens", "8"])
    assert code == 0
    board = json.loads((out / "leaderboard.json").read_text())
    rows = {c["name"]: c["results"] for c in board["checkpoints"]}
    assert {"sft", "dpo"} <= set(rows)
    assert rows["sft"]["kl_ref_k1"]["value"] == 0.0 and rows["sft"]["win_rate_vs_ref"]["value"] == 0.5
    assert rows["dpo"]["gold_reward"]["n"] == 16
    assert "| sft" in capsys.readouterr().out
    assert len((out / "samples" / "dpo.jsonl").read_text().splitlines()) == 16  # what the dpo row was computed on


def test_eval_command_rejects_a_directory_that_is_not_a_checkpoint(tmp_path, capsys):
    assert main(["eval", str(tmp_path)]) == 2
    assert "neither a run directory" in capsys.readouterr().err


def test_re_running_eval_is_served_from_the_cache(completed_tiny_run, tmp_path, monkeypatch):
    """Second run: no generation and no model load at all; the same numbers (the JSON minus its date)."""
    import alignpipe.evaluation.harness as harness

    runner, _ = completed_tiny_run
    args = ["eval", str(runner.run_dir), "--reference", str(runner.run_dir / "sft" / "checkpoint"),
            "--n-prompts", "12", "--max-new-tokens", "8", "--cache-dir", str(tmp_path / "cache")]
    assert main([*args, "--out", str(tmp_path / "first")]) == 0

    def fail(*a, **k):
        raise AssertionError("the second evaluation generated or loaded a model")

    monkeypatch.setattr(harness, "generate", fail)
    monkeypatch.setattr(harness, "load_causal_lm", fail)
    assert main([*args, "--out", str(tmp_path / "second")]) == 0
    first, second = (json.loads((tmp_path / d / "leaderboard.json").read_text()) for d in ("first", "second"))
    first.pop("date"), second.pop("date")
    assert first == second
    assert any((tmp_path / "cache" / "generations").rglob("*.json"))


def test_a_hub_model_is_pinned_fetched_and_cached_like_a_local_checkpoint(completed_tiny_run, tmp_path, monkeypatch,
                                                                           capsys):
    """``ORG/NAME@REVISION`` resolves through the Hugging Face cache here (offline, as on a node without network)."""
    import shutil

    from huggingface_hub import constants

    import alignpipe.evaluation.harness as harness

    runner, _ = completed_tiny_run
    repository = tmp_path / "hf-cache" / "models--owner--tiny"
    for commit, stage in (("1" * 40, "sft"), ("2" * 40, "dpo")):
        shutil.copytree(runner.run_dir / stage / "checkpoint", repository / "snapshots" / commit)
    (repository / "snapshots" / ("2" * 40) / "pytorch_model.bin").write_bytes(b"left by a full download")  # unused
    (repository / "refs").mkdir()
    (repository / "refs" / "main").write_text("2" * 40)
    (repository / "refs" / "v1").write_text("1" * 40)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    args = ["--reference", "sft=owner/tiny@v1", "--n-prompts", "12", "--max-new-tokens", "8",
            "--cache-dir", str(tmp_path / "cache")]
    assert main(["eval", "owner/tiny", "dpo=" + str(runner.run_dir / "dpo" / "checkpoint"), *args,
                 "--out", str(tmp_path / "first")]) == 0
    board = json.loads((tmp_path / "first" / "leaderboard.json").read_text())
    rows = {c["name"]: c for c in board["checkpoints"]}
    assert rows["tiny"]["path"] == str(repository / "snapshots" / ("2" * 40))  # main: the dpo weights
    assert rows["tiny"]["weights_sha256"] == rows["dpo"]["weights_sha256"]  # the model's files only
    assert rows["tiny"]["results"]["gold_reward"] == rows["dpo"]["results"]["gold_reward"]
    assert board["run"]["reference"] == "sft"

    def fail(*a, **k):
        raise AssertionError("the second evaluation generated or loaded a model")

    monkeypatch.setattr(harness, "generate", fail)
    monkeypatch.setattr(harness, "load_causal_lm", fail)
    assert main(["eval", "owner/tiny", *args, "--out", str(tmp_path / "second")]) == 0  # cached by content
    assert main(["eval", "owner/gone@v2", "--out", str(tmp_path / "third")]) == 2
    assert not (tmp_path / "third").exists()
    assert "model 'owner/gone' at revision 'v2' is not in the local Hugging Face cache" in capsys.readouterr().err


def test_eval_with_a_suite_rejects_the_synthetic_prompt_options(llama_path, tmp_path, capsys):
    """A suite pins prompts and sampling: --n-prompts, --max-new-tokens, --batch-size and --seed are refused with it
    (before anything is evaluated or written) instead of being silently ignored."""
    suite = tmp_path / "mini.yaml"
    suite.write_text(yaml.safe_dump({"name": "mini", "prompts": {"source": "synthetic", "n": 4},
                                     "generation": {"max_new_tokens": 2, "batch_size": 4}, "reference": "checkpoint",
                                     "judge": "gold", "primary_metric": "gold_reward", "bootstrap_resamples": 100}))
    out = tmp_path / "out"
    for option, value in (("--n-prompts", "8"), ("--max-new-tokens", "4"), ("--batch-size", "2"), ("--seed", "7")):
        assert main(["eval", f"m={llama_path}", "--suite", str(suite), option, value, "--out", str(out),
                     "--cache-dir", str(tmp_path / "cache")]) == 2
        error = capsys.readouterr().err
        assert option in error and "--suite" in error
    assert not out.exists()


def test_eval_without_out_leaves_the_runs_own_leaderboard_alone(completed_tiny_run, tmp_path, monkeypatch,
                                                                 capsys):
    """The run's leaderboard is its eval stage's record (with its reward table); a re-evaluation goes beside it."""
    runner, _ = completed_tiny_run
    recorded = (runner.run_dir / "leaderboard.json").read_bytes()
    monkeypatch.chdir(tmp_path)
    assert main(["eval", str(runner.run_dir), "--n-prompts", "8", "--max-new-tokens", "6"]) == 0
    assert (runner.run_dir / "leaderboard.json").read_bytes() == recorded
    board = json.loads((tmp_path / "eval-out" / runner.run_dir.name / "leaderboard.json").read_text())
    assert board["checkpoints"][0]["results"]["gold_reward"]["n"] == 8
    assert board["run"]["reference"] == "base"  # a tiny run's first checkpoint, as `alignpipe eval --help` says
    # nor does it go into a run directory when asked to: the next run would find its leaderboard changed
    assert main(["eval", str(runner.run_dir), "--n-prompts", "8", "--out", str(runner.run_dir)]) == 2
    assert "is a run directory: its leaderboard is its eval stage's record" in capsys.readouterr().err
    assert (runner.run_dir / "leaderboard.json").read_bytes() == recorded


def test_eval_help_says_a_runs_default_reference_is_its_base(capsys):
    """The help names the reference `alignpipe eval RUN` uses (its tiny base model, the first checkpoint), not the
    first training stage."""
    with pytest.raises(SystemExit):
        main(["eval", "--help"])
    text = capsys.readouterr().out
    example = next(line for line in text.splitlines() if line.strip().startswith("alignpipe eval runs/quickstart "))
    assert "reference = its base" in example and "reference = first stage" not in text
    assert "its tiny base model" in " ".join(text.split())


def test_a_run_directory_gives_its_completed_policy_stages_only(completed_tiny_run, tmp_path):
    """A reward stage's checkpoint (a TRL single reward model has a config.json too) is no policy, and a stage whose
    manifest is not complete may hold any checkpoint: neither becomes a row."""
    import shutil

    from alignpipe.evaluation.standalone import expand_checkpoints
    from alignpipe.pipeline.rundir import StageDir

    run = tmp_path / "tiny"
    shutil.copytree(completed_tiny_run[0].run_dir, run)
    shutil.copytree(run / "sft", run / "rm")
    StageDir(run / "rm").update_manifest(type="reward")
    StageDir(run / "dpo").update_manifest(status="failed")
    assert [c.name for c in expand_checkpoints([str(run)])] == ["base", "sft"]


def test_rows_of_several_run_directories_are_named_run_and_stage(completed_tiny_run, tmp_path, capsys, monkeypatch):
    """Two runs' stages share names: with several run directories each row is ``<run>/<stage>`` (the run's shortest
    distinguishing path, or NAME of NAME=DIR). Names that still collide are refused before any model is loaded."""
    import shutil

    import alignpipe.evaluation.harness as harness

    runs = [tmp_path / user / "tiny" for user in ("a", "b")]
    for run in runs:
        shutil.copytree(completed_tiny_run[0].run_dir, run)
    out, cache = tmp_path / "board", tmp_path / "cache"
    assert main(["eval", *map(str, runs), "--out", str(out), "--n-prompts", "8", "--max-new-tokens", "4",
                 "--cache-dir", str(cache)]) == 0
    board = json.loads((out / "leaderboard.json").read_text())
    assert sorted(c["name"] for c in board["checkpoints"]) == [f"{user}/tiny/{stage}" for user in ("a", "b")
                                                               for stage in ("base", "dpo", "sft")]
    assert all((out / row["samples"]).is_file() for row in board["checkpoints"])
    # a suite's results/<name>.json of such a row lies deeper: it names the same samples file from there
    suite = tmp_path / "mini.yaml"
    suite.write_text(json.dumps({
        "name": "mini", "prompts": {"source": "synthetic", "n": 8}, "reference": "checkpoint", "judge": "gold",
        "primary_metric": "gold_reward", "diversity": {"samples_per_prompt": 0},
        "generation": {"max_new_tokens": 4, "batch_size": 8}}))
    assert main(["eval", *map(str, runs), "--suite", str(suite), "--out", str(tmp_path / "suite"),
                 "--cache-dir", str(cache)]) == 0
    recorded = tmp_path / "suite" / "results" / "a" / "tiny" / "dpo.json"
    row = json.loads(recorded.read_text())["checkpoints"][0]
    assert (recorded.parent / row["samples"]).samefile(tmp_path / "suite" / "samples" / "a" / "tiny" / "dpo.jsonl")

    def fail(*a, **k):
        raise AssertionError("a model was loaded before the duplicate names were refused")

    monkeypatch.setattr(harness, "generate", fail)
    monkeypatch.setattr(harness, "load_causal_lm", fail)
    capsys.readouterr()
    sft = str(runs[1] / "sft" / "checkpoint")
    for args, duplicate in (([str(runs[0]), sft], "'sft'"), ([f"x={runs[0]}", f"x={runs[1]}"], "'x/base'")):
        assert main(["eval", *args, "--out", str(tmp_path / "refused"), "--cache-dir", str(tmp_path / "other")]) == 2
        error = capsys.readouterr().err
        assert duplicate in error and "NAME=PATH" in error
    assert not (tmp_path / "refused").exists()


def test_a_later_evaluation_into_the_same_out_removes_what_it_did_not_write(completed_tiny_run, tmp_path):
    """Files beside a table are of its rows: a checkpoint left out of a later run into the same --out loses its
    samples and results; the earlier table's other files are replaced."""
    runner, _ = completed_tiny_run
    out = tmp_path / "board"
    sft, dpo = (f"{name}={runner.run_dir / name / 'checkpoint'}" for name in ("sft", "dpo"))
    args = ["--out", str(out), "--n-prompts", "8", "--max-new-tokens", "4", "--cache-dir", str(tmp_path / "cache")]
    assert main(["eval", sft, dpo, *args]) == 0
    assert (out / "samples" / "dpo.jsonl").is_file() and (out / "samples" / "dpo.diversity.jsonl").is_file()
    assert main(["eval", sft, *args]) == 0
    assert sorted(p.name for p in (out / "samples").iterdir()) == ["sft.diversity.jsonl", "sft.jsonl"]


@pytest.mark.parametrize("names, message", [
    (["a", "a.diversity"], "would share sample files"),
    (["../../x"], "would write outside --out"),
])
def test_names_whose_files_would_clash_or_escape_are_refused_before_any_work(completed_tiny_run, tmp_path, capsys,
                                                                             monkeypatch, names, message):
    import alignpipe.evaluation.harness as harness

    def fail(*a, **k):
        raise AssertionError("a model was loaded before the names were refused")

    monkeypatch.setattr(harness, "load_causal_lm", fail)
    checkpoint = completed_tiny_run[0].run_dir / "sft" / "checkpoint"
    assert main(["eval", *(f"{name}={checkpoint}" for name in names), "--out", str(tmp_path / "out")]) == 2
    assert message in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_a_run_directorys_checkpoint_is_hashed_by_its_files_not_its_manifest(completed_tiny_run, tmp_path, caplog):
    """A checkpoint whose weights changed since its stage finished gets its files' hash (the cache key of its samples),
    not the manifest's, so the old weights' cached samples are not served for it; the log says it changed."""
    import shutil

    from alignpipe.evaluation.standalone import expand_checkpoints
    from alignpipe.pipeline.rundir import StageDir, directory_hash

    run = tmp_path / "tiny"
    shutil.copytree(completed_tiny_run[0].run_dir, run)
    shutil.copyfile(run / "sft" / "checkpoint" / "model.safetensors", run / "dpo" / "checkpoint" / "model.safetensors")
    rows = {c.name: c.weights_sha256 for c in expand_checkpoints([str(run)])}
    assert rows["dpo"] == directory_hash(run / "dpo" / "checkpoint")
    assert rows["dpo"] != StageDir(run / "dpo").read_manifest()["output_sha256"]
    assert rows["sft"] == StageDir(run / "sft").read_manifest()["output_sha256"]  # unchanged: the same hash
    assert "files changed since the dpo stage wrote them" in caplog.text


def test_a_runs_synthetic_prompts_come_from_its_own_task_space(completed_tiny_run, tmp_path, capsys, monkeypatch):
    """A run trained on some families is scored on those, as its eval stage scores it (the board records the task
    space); run directories of different task spaces are refused before any model is loaded."""
    import shutil

    import alignpipe.evaluation.harness as harness
    from alignpipe.tasks import parse_prompt

    runs = [tmp_path / name for name in ("copy", "all")]
    for run in runs:
        shutil.copytree(completed_tiny_run[0].run_dir, run)
    recipe = yaml.safe_load((runs[0] / "recipe.yaml").read_text())
    recipe["data"]["families"] = ["copy"]
    (runs[0] / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    out = tmp_path / "board"
    assert main(["eval", f"{runs[0]}", "--out", str(out), "--n-prompts", "8", "--max-new-tokens", "2",
                 "--cache-dir", str(tmp_path / "cache")]) == 0
    board = json.loads((out / "leaderboard.json").read_text())
    assert board["config"]["task_space"]["families"] == ["copy"]
    prompts = [json.loads(line)["prompt"] for line in (out / "samples" / "dpo.jsonl").read_text().splitlines()]
    assert len(prompts) == 8 and {parse_prompt(p).family for p in prompts} == {"copy"}

    def fail(*a, **k):
        raise AssertionError("a model was loaded before the task spaces were compared")

    monkeypatch.setattr(harness, "load_causal_lm", fail)
    capsys.readouterr()
    assert main(["eval", *map(str, runs), "--out", str(tmp_path / "refused")]) == 2
    error = capsys.readouterr().err
    assert "different synthetic tasks" in error and "families copy," in error and str(runs[1]) in error


@pytest.mark.parametrize("suite, message", [
    (None, "without --suite the synthetic prompts are judged by their gold reward"),
    ("synthetic", "suite 'synthetic' is judged by the gold reward"),
    ("reward-models-synthetic", "scores reward models on its pairs"),
])
def test_a_judge_is_refused_where_no_reward_model_judges(llama_path, tmp_path, capsys, suite, message):
    """--judge would be ignored (the board judged by gold) without --suite or with a suite no reward model judges:
    refused before anything is evaluated or written."""
    out = tmp_path / "out"
    args = ["eval", f"m={llama_path}", "--judge", str(tmp_path / "reward-model"), "--out", str(out),
            "--cache-dir", str(tmp_path / "cache")]
    assert main([*args, *(["--suite", suite] if suite else [])]) == 2
    error = capsys.readouterr().err
    assert message in error and "drop --judge" in error
    assert not out.exists()


@pytest.mark.parametrize("suite, message", [
    ("alpaca-eval", "compares each checkpoint with its dataset's reference outputs"),
    ("hh-harmless", "compares each checkpoint with its dataset's reference outputs"),
    ("reward-models-synthetic", "scores reward models on its pairs"),
])
def test_a_reference_is_refused_where_the_suite_compares_with_none(llama_path, tmp_path, capsys, suite, message):
    """A dataset-reference suite's win rates are against its dataset's outputs whatever --reference says: refused
    before anything is evaluated or written."""
    out = tmp_path / "out"
    assert main(["eval", f"m={llama_path}", "--suite", suite, "--reference", llama_path, "--out", str(out),
                 "--cache-dir", str(tmp_path / "cache")]) == 2
    error = capsys.readouterr().err
    assert message in error and "drop --reference" in error
    assert not out.exists()


def test_samples_that_would_run_past_a_models_positions_are_refused_before_sampling(llama_path, tmp_path, capsys,
                                                                                    monkeypatch):
    """Prompt and max_new_tokens beyond max_position_embeddings (128 here) would be sampled at positions the model
    never learned: refused, naming the checkpoint, its limit and the setting to lower, before any model is loaded."""
    import alignpipe.evaluation.harness as harness

    def fail(*a, **k):
        raise AssertionError("a model was loaded before the positions were checked")

    monkeypatch.setattr(harness, "load_causal_lm", fail)
    out = tmp_path / "out"
    assert main(["eval", f"m={llama_path}", "--n-prompts", "4", "--max-new-tokens", "125", "--out", str(out),
                 "--cache-dir", str(tmp_path / "cache")]) == 2
    error = capsys.readouterr().err
    assert "checkpoint 'm'" in error and "has 128 positions" in error and "--max-new-tokens" in error
    assert not out.exists()


def test_runs_of_different_task_spaces_are_refused_only_where_a_suite_draws_synthetic_tasks(completed_tiny_run,
                                                                                           tmp_path, monkeypatch):
    """A suite of AlpacaEval or HH prompts reads no task space: runs trained on different synthetic tasks may share
    it. The synthetic suite draws its prompts from theirs, so it refuses them."""
    import shutil

    import alignpipe.evaluation.standalone as standalone

    runs = [tmp_path / name for name in ("copy", "all")]
    for run in runs:
        shutil.copytree(completed_tiny_run[0].run_dir, run)
    recipe = yaml.safe_load((runs[0] / "recipe.yaml").read_text())
    (runs[0] / "recipe.yaml").write_text(yaml.safe_dump({**recipe, "data": {**recipe["data"], "families": ["copy"]}}))
    reached = []

    def stub(spec, suite_hash, checkpoints, **kwargs):
        reached.append((spec.name, kwargs["space"]))
        raise RuntimeError("stop before any model is loaded")

    monkeypatch.setattr(standalone, "run_suite", stub)
    for suite in ("alpaca-eval", "hh-harmless-vs-base"):
        with pytest.raises(RuntimeError, match="stop before"):
            standalone.evaluate_suite(list(map(str, runs)), suite=suite, reference=None, judge="judge", out=tmp_path)
    assert reached == [("alpaca-eval", None), ("hh-harmless-vs-base", None)]
    with pytest.raises(ValueError, match="different synthetic tasks"):
        standalone.evaluate_suite(list(map(str, runs)), suite="synthetic", reference=None, judge=None, out=tmp_path)
