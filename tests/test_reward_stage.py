"""The reward stage: a LoRA ensemble trained on the tiny model's backbone, saved as one directory, evaluated."""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch
from conftest import TINY_RECIPE, write_recipe

from alignpipe.evaluation.report import render_report
from alignpipe.evaluation.report_data import read_run
from alignpipe.evaluation.reward_suite import expand_reward_models
from alignpipe.pipeline.rundir import StageDir
from alignpipe.pipeline.runner import Runner
from alignpipe.recipe import RecipeError, load_recipe
from alignpipe.rewards.ensemble_scorer import EnsembleScorer
from alignpipe.rewards.loading import reward_model_identity
from alignpipe.trainers import reward as reward_stage

REWARD = {"name": "rm", "type": "reward", "inputs": ["sft"], "members": 3, "top_layers": 1,
          "learning_rate": 3e-3, "num_train_epochs": 2, "per_device_train_batch_size": 16, "max_length": 48,
          "logging_steps": 4, "heldout_fraction": 0.25, "diversity_weight": 0.1}
SFT_AND_REWARD = {**TINY_RECIPE, "data": {**TINY_RECIPE["data"], "n_pairs": 256},
                  "stages": [TINY_RECIPE["stages"][0], REWARD]}


@pytest.fixture(scope="module")
def reward_run(tmp_path_factory):
    """sft + rm run once, uninterrupted; tests copy it (``_copy``) before changing anything."""
    directory = tmp_path_factory.mktemp("reward-run")
    recipe_path = write_recipe(directory, SFT_AND_REWARD)
    Runner(load_recipe(recipe_path), runs_dir=directory / "runs", in_process=True).run()
    return recipe_path, directory / "runs"


def _copy(reward_run, tmp_path):
    shutil.copytree(reward_run[1], tmp_path / "runs")
    return tmp_path / "runs"


def _interrupt_held_out_scoring(monkeypatch) -> None:
    """Ctrl-C once training has finished, while the stage scores its held-out pairs."""
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt("Ctrl-C during held-out scoring")

    monkeypatch.setattr(reward_stage, "reward_model_metrics", interrupted)


def _reward_section(run_dir) -> str:
    return re.search(r'<section id="reward-models">(.*?)</section>', render_report(read_run(run_dir)), re.S).group(1)


def test_reward_stage_trains_saves_and_reports(tmp_path):
    recipe = {**TINY_RECIPE, "data": {**TINY_RECIPE["data"], "n_pairs": 256},
              "stages": [TINY_RECIPE["stages"][0], REWARD]}
    runner = Runner(load_recipe(write_recipe(tmp_path, recipe)), runs_dir=tmp_path / "runs", in_process=True)
    outcomes = {o.name: o.action for o in runner.run()}
    assert outcomes == {"sft": "ran", "rm": "ran"}
    stage = StageDir(runner.run_dir / "rm")
    losses = [json.loads(line)["loss"] for line in stage.metrics.read_text().splitlines()]
    assert losses[-1] < losses[0]
    report = json.loads((stage.root / "reward_eval.json").read_text())["metrics"]
    for key in ("accuracy", "ece", "brier", "nll", "member_std", "gold_accuracy", "off_distribution_std_ratio",
                "policy_std_vs_proxy_gold_gap_spearman"):
        assert key in report, key
    assert report["accuracy"]["value"] > 0.5
    scorer = EnsembleScorer.load(stage.checkpoint)  # the saved directory is all a consumer needs
    rewards = scorer.score(["copy: 1 2"], ["1 2"])
    assert tuple(rewards.per_member.shape) == (1, 3)
    # the backbone is this run's sft checkpoint, named relative to the ensemble: the run can be moved whole
    manifest = json.loads((stage.checkpoint / "manifest.json").read_text())
    assert manifest["spec"]["backbone"] == "../../sft/checkpoint"
    assert manifest["backbone"]["sha256"] == StageDir(runner.run_dir / "sft").read_manifest()["output_sha256"]
    # how the stage trained and evaluated it: a judge or a policy stage reloading it scores the same way
    assert manifest["scoring"] == {"dtype": "float32", "max_length": REWARD["max_length"]}
    assert scorer.max_length == REWARD["max_length"]
    shutil.move(tmp_path / "runs", tmp_path / "archive")
    moved = EnsembleScorer.load(tmp_path / "archive" / "tiny" / "rm" / "checkpoint")
    assert moved.score(["copy: 1 2"], ["1 2"]).per_member.tolist() == rewards.per_member.tolist()


def test_reward_stage_with_ids_and_its_row_on_the_leaderboard(tmp_path):
    recipe = {**TINY_RECIPE, "data": {**TINY_RECIPE["data"], "n_pairs": 256}, "stages": [
        TINY_RECIPE["stages"][0], {**REWARD, "ids_rate": 0.3},
        {"name": "eval", "type": "eval", "inputs": ["sft", "rm"], "n_prompts": 16, "max_new_tokens": 8,
         "bootstrap_resamples": 100},
    ]}
    runner = Runner(load_recipe(write_recipe(tmp_path, recipe)), runs_dir=tmp_path / "runs", in_process=True)
    runner.run()
    logs = [json.loads(line) for line in StageDir(runner.run_dir / "rm").metrics.read_text().splitlines()]
    labels = [entry["ids/mean_label"] for entry in logs if "ids/mean_label" in entry]
    assert len(labels) == 2 and 0.5 < labels[1] < labels[0] < 1.0  # smoothed once per epoch, toward the model
    board = json.loads((runner.run_dir / "leaderboard.json").read_text())
    assert [c["name"] for c in board["checkpoints"]] != [] and "rm" not in [c["name"] for c in board["checkpoints"]]
    assert [r["name"] for r in board["reward_models"]] == ["rm"]
    table = (runner.run_dir / "leaderboard.md").read_text().split("## Reward models", 1)[1]
    assert "| member_std | member_std_off_distribution | off_distribution_std_ratio |" in table.splitlines()[2]
    # the reward stage is the proxy (auto: the only reward input): every policy row gets the proxy metrics, scored
    # by the saved ensemble itself, and the reference (sft) gains nothing over itself on either reward
    assert board["config"]["proxy"]["stage"] == "rm"
    # its identity, as a judge's: a copy of the run elsewhere records the same proxy (not its directory hash)
    assert board["config"]["proxy"]["sha256"] == reward_model_identity(runner.run_dir / "rm" / "checkpoint")
    rows = {c["name"]: c["results"] for c in board["checkpoints"]}
    for name in ("base", "sft"):
        assert {"proxy_reward", "proxy_reward_min", "proxy_member_var", "proxy_gold_gap"} <= set(rows[name])
    assert rows["sft"]["proxy_gold_gap"]["value"] == 0.0 and rows["sft"]["proxy_reward_delta_vs_ref"]["value"] == 0.0
    # against its own responses gold ties everywhere: no agreement to measure; base's responses differ from sft's
    assert "proxy_gold_agreement" not in rows["sft"] and 0 <= rows["base"]["proxy_gold_agreement"]["value"] <= 1
    rows_file = runner.run_dir / "eval" / "samples" / "base.jsonl"
    samples = [json.loads(line) for line in rows_file.read_text().splitlines()]
    scorer = EnsembleScorer.load(runner.run_dir / "rm" / "checkpoint")
    members = scorer.score([r["prompt"] for r in samples], [r["response"] for r in samples]).per_member
    assert torch.allclose(torch.tensor([r["proxy_members"] for r in samples]), members, atol=1e-5)
    assert rows["base"]["proxy_reward"]["value"] == pytest.approx(float(members.mean()), abs=1e-5)
    assert rows["base"]["proxy_reward_min"]["value"] == pytest.approx(float(members.min(dim=1).values.mean()),
                                                                     abs=1e-5)
    # the stage's output hash is its identity too: re-run in a moved run folder, where its files name other paths, it
    # hands on the same hash, and the eval stage after it is skipped
    recorded = StageDir(runner.run_dir / "rm").read_manifest()["output_sha256"]
    assert recorded == reward_model_identity(runner.run_dir / "rm" / "checkpoint")
    shutil.move(tmp_path / "runs", tmp_path / "moved")
    moved = Runner(load_recipe(tmp_path / "recipe.yaml"), runs_dir=tmp_path / "moved", force=["rm"], in_process=True)
    assert {o.name: o.action for o in moved.run()} == {"sft": "skipped", "rm": "ran", "eval": "skipped"}
    assert StageDir(moved.run_dir / "rm").read_manifest()["output_sha256"] == recorded


def test_eval_reference_must_be_a_policy(tmp_path):
    evaluation = {"name": "eval", "type": "eval", "inputs": ["sft", "rm"], "reference": "rm"}
    path = write_recipe(tmp_path, {**TINY_RECIPE, "stages": [TINY_RECIPE["stages"][0], REWARD, evaluation]})
    with pytest.raises(RecipeError, match=r"stages\.eval\.reference: 'rm' is a reward stage"):
        load_recipe(path)


@pytest.mark.parametrize("proxy, message", [
    ("dpo", r"stages\.eval\.proxy: 'dpo' is not one of this stage's inputs"),
    ("sft", r"stages\.eval\.proxy: 'sft' is not a reward stage; the proxy must be one of this stage's reward inputs: "
            r"rm"),
])
def test_eval_proxy_must_be_a_reward_input(tmp_path, proxy, message):
    evaluation = {"name": "eval", "type": "eval", "inputs": ["sft", "rm"], "proxy": proxy}
    path = write_recipe(tmp_path, {**TINY_RECIPE, "stages": [TINY_RECIPE["stages"][0], REWARD, evaluation]})
    with pytest.raises(RecipeError, match=message):
        load_recipe(path)


def test_eval_proxy_auto_takes_the_only_reward_input_trained_on_the_task(tmp_path):
    def proxy_of(rewards: list[dict], **evaluation) -> str | None:
        stage = {"name": "eval", "type": "eval", "inputs": ["sft", *(r["name"] for r in rewards)], **evaluation}
        recipe = load_recipe(write_recipe(tmp_path, {**TINY_RECIPE, "stages": [TINY_RECIPE["stages"][0], *rewards,
                                                                               stage]}))
        return recipe.eval_proxy(recipe.stage("eval"))

    other = {**REWARD, "name": "rm2"}
    assert proxy_of([REWARD]) == "rm"
    assert proxy_of([REWARD], proxy=None) is None
    assert proxy_of([]) is None
    assert proxy_of([REWARD, other]) is None  # which one is ambiguous: name it
    assert proxy_of([REWARD, other], proxy="rm2") == "rm2"


def test_a_reward_stage_cannot_feed_a_policy_stage(tmp_path):
    dpo = {**TINY_RECIPE["stages"][1], "inputs": ["rm"]}
    path = write_recipe(tmp_path, {**TINY_RECIPE, "stages": [TINY_RECIPE["stages"][0], REWARD, dpo]})
    with pytest.raises(RecipeError, match=r"stages\.dpo\.inputs\[0\]: 'rm' is a reward stage"):
        load_recipe(path)


def test_single_reward_model_through_trl_with_full_fine_tuning(tmp_path):
    single = {"name": "rm", "type": "reward", "inputs": ["sft"], "implementation": "trl", "members": 1, "lora": None,
              "learning_rate": 3e-4, "num_train_epochs": 4, "per_device_train_batch_size": 16, "max_length": 48,
              "logging_steps": 4, "heldout_fraction": 0.25}
    recipe = {**TINY_RECIPE, "data": {**TINY_RECIPE["data"], "n_pairs": 256},
              "stages": [TINY_RECIPE["stages"][0], single]}
    runner = Runner(load_recipe(write_recipe(tmp_path, recipe)), runs_dir=tmp_path / "runs", in_process=True)
    runner.run()
    from alignpipe.rewards.loading import load_reward_scorer

    scorer = load_reward_scorer(StageDir(runner.run_dir / "rm").checkpoint)
    assert tuple(scorer.score(["copy: 1 2"], ["1 2"]).per_member.shape) == (1, 1)
    assert scorer.max_length == 48  # the stage's, not the loader's default 512
    report = json.loads((runner.run_dir / "rm" / "reward_eval.json").read_text())["metrics"]
    # Learning itself is covered in tests/test_single_reward.py; here: the held-out report of one model.
    assert report["accuracy"]["n"] == json.loads((runner.run_dir / "rm" / "reward_eval.json").read_text())[
        "heldout_pairs"]
    assert "member_std" not in report and "policy_proxy_gold_spearman" in report  # one model: no disagreement
    summary = StageDir(runner.run_dir / "rm").read_manifest()["summary"]  # TRL drops over-long pairs: counted
    assert summary["train_pairs"] > 0 and summary["train_pairs_over_max_length"] >= 0
    assert summary["train_pairs"] + summary["train_pairs_over_max_length"] + summary["heldout_pairs"] == 256


def test_trl_implementation_rejects_ensemble_options(tmp_path):
    single = {"name": "rm", "type": "reward", "inputs": ["sft"], "implementation": "trl", "members": 5}
    path = write_recipe(tmp_path, {**TINY_RECIPE, "stages": [TINY_RECIPE["stages"][0], single]})
    with pytest.raises(RecipeError, match=r"stages\.rm\.members: is 5 \(the ensemble's default is 5\); "
                                          r"TRL's RewardTrainer trains one model: set members: 1"):
        load_recipe(path)


def test_only_complete_reward_stages_count_and_an_interrupted_rerun_leaves_none_of_its_files(reward_run, tmp_path,
                                                                                             monkeypatch):
    runs = _copy(reward_run, tmp_path)
    run_dir, stage = runs / "tiny", StageDir(runs / "tiny" / "rm")
    assert expand_reward_models(str(run_dir)) == [("rm", str(stage.checkpoint))]
    named = [("mine", str(stage.checkpoint))]
    assert expand_reward_models(f"mine={stage.checkpoint}") == named
    assert expand_reward_models(f"={stage.checkpoint}") == [("rm", str(stage.checkpoint))]  # an empty NAME: as without
    assert '<td class="l">rm</td>' in _reward_section(run_dir)

    stage.update_manifest(status="failed")  # whatever files a stage holds, they count only once it is complete
    with pytest.raises(ValueError, match=r"has no completed reward stage \(rm: failed\)"):
        expand_reward_models(str(run_dir))
    section = _reward_section(run_dir)
    assert '<td class="l">rm</td>' not in section and "Not shown: reward stage rm (status failed)" in section

    # Another config, interrupted after training, while scoring: the previous attempt's model and metrics went when
    # the stage started over, and the new model is not published before its metrics are written.
    _interrupt_held_out_scoring(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        Runner(load_recipe(reward_run[0], ["stages.rm.members=2"]), runs_dir=runs, in_process=True).run()
    assert stage.read_manifest()["status"] == "interrupted"
    assert not stage.checkpoint.exists() and not (stage.root / "reward_eval.json").exists()
    assert not list(stage.root.glob(".checkpoint.staging-*"))


def test_resume_after_an_interrupt_while_scoring_trains_no_step_again(reward_run, tmp_path, monkeypatch):
    """Training finished, then Ctrl-C while scoring (save_steps exceeds the step count, so the last step's state is the
    only trainer checkpoint): --resume restores it without a step and gives the uninterrupted run's files."""
    runs = _copy(reward_run, tmp_path)
    stage, reference = StageDir(runs / "tiny" / "rm"), StageDir(reward_run[1] / "tiny" / "rm")
    shutil.rmtree(stage.root)
    _interrupt_held_out_scoring(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        Runner(load_recipe(reward_run[0]), runs_dir=runs, in_process=True).run()
    monkeypatch.undo()
    last = json.loads(reference.metrics.read_text().splitlines()[-1])["step"]
    assert [p.name for p in stage.trainer_checkpoints()] == [f"checkpoint-{last}"]

    steps: list[int] = []
    train_ensemble = reward_stage.train_ensemble

    def counting(*args, on_log, **kwargs):
        return train_ensemble(*args, on_log=lambda record: (steps.append(record["step"]), on_log(record)), **kwargs)

    monkeypatch.setattr(reward_stage, "train_ensemble", counting)
    outcomes = {o.name: o for o in Runner(load_recipe(reward_run[0]), runs_dir=runs, resume=True,
                                          in_process=True).run()}
    assert outcomes["sft"].action == "skipped"
    assert outcomes["rm"].action == "resumed" and outcomes["rm"].reason == f"resuming from checkpoint-{last}"
    assert steps == []  # no step trained again
    # byte for byte, once the reference's backbone path (the sft checkpoint of ITS run directory) names this copy's
    files = sorted(p.relative_to(reference.checkpoint) for p in reference.checkpoint.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(stage.checkpoint) for p in stage.checkpoint.rglob("*") if p.is_file())
    for name in files:
        expected = (reference.checkpoint / name).read_bytes().replace(str(reward_run[1]).encode(), str(runs).encode())
        assert (stage.checkpoint / name).read_bytes() == expected, name
    assert stage.metrics.read_text() == reference.metrics.read_text()
    assert (stage.root / "reward_eval.json").read_text() == (reference.root / "reward_eval.json").read_text()


def test_a_first_reward_stage_reads_the_recipes_gguf_file(gguf_model, tmp_path):
    """A reward stage with no inputs trains on the recipe's model, here a GGUF file: its backbone and the policy it
    samples for the uncertainty-vs-gold correlation both come from that file (the folder holds nothing else). TRL's
    RewardTrainer cannot read one, so a trl stage there is a recipe error."""
    model = {"name_or_path": str(gguf_model.parent), "gguf_file": gguf_model.name}
    stage = {**REWARD, "inputs": [], "num_train_epochs": 1}
    recipe = {**TINY_RECIPE, "model": model, "data": {**TINY_RECIPE["data"], "n_pairs": 64}, "stages": [stage]}
    runner = Runner(load_recipe(write_recipe(tmp_path, recipe)), runs_dir=tmp_path / "runs", in_process=True)
    assert {o.name: o.action for o in runner.run()} == {"rm": "ran"}
    report = json.loads((runner.run_dir / "rm" / "reward_eval.json").read_text())["metrics"]
    assert report["policy_std_vs_proxy_gold_gap_spearman"]["n"] > 0

    trl = {**{k: v for k, v in stage.items() if k not in ("top_layers", "diversity_weight")}, "members": 1}
    (tmp_path / "trl").mkdir()
    (tmp_path / "backbone").mkdir()
    with pytest.raises(RecipeError, match=r"stages\.rm\.implementation: implementation: trl cannot train on the "
                                          r"recipe's model\.gguf_file"):
        load_recipe(write_recipe(tmp_path / "trl", {**recipe, "stages": [{**trl, "implementation": "trl"}]}))
    load_recipe(write_recipe(tmp_path / "backbone", {**recipe, "stages": [
        {**trl, "implementation": "trl", "backbone": str(tmp_path)}]}))
