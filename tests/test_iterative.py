"""The shared online loop (osp, online_dpo): rounds, judging, soft vs hard labels, per-round logs, round resume."""

from __future__ import annotations

import json
import os
import random
import shutil

import pytest
from conftest import TINY_RECIPE, write_recipe

from alignpipe.data.pairing import PreferencePair
from alignpipe.pipeline.rundir import StageDir
from alignpipe.pipeline.runner import Runner
from alignpipe.recipe import load_recipe
from alignpipe.rewards.judges import GoldPairwiseJudge
from alignpipe.tasks import gold_reward
from alignpipe.trainers.round_methods import gold_agreement, judge_samples

ROUND_STAGE = {"inputs": ["sft"], "judge": "gold", "rounds": 2, "prompts_per_round": 16, "samples_per_prompt": 4,
               "learning_rate": 2e-3, "per_device_train_batch_size": 8, "max_length": 48, "logging_steps": 2,
               "max_new_tokens": 10, "eval_prompts": 16, "save_steps": 1000}


def _recipe(*stages):
    return {**TINY_RECIPE, "stages": [TINY_RECIPE["stages"][0], *stages]}


def _records(stage_dir):
    lines = [json.loads(line) for line in StageDir(stage_dir).metrics.read_text().splitlines()]
    return [r for r in lines if "round" in r]


@pytest.fixture(scope="module")
def iterative_run(tmp_path_factory):
    directory = tmp_path_factory.mktemp("iterative")
    recipe = _recipe({"name": "osp", "type": "osp", **ROUND_STAGE},
                     {"name": "odpo", "type": "online_dpo", **ROUND_STAGE})
    path = write_recipe(directory, recipe)
    runner = Runner(load_recipe(path), runs_dir=directory / "runs", in_process=True)
    return runner, {o.name: o for o in runner.run()}, path


def test_rounds_write_checkpoints_and_per_round_metrics(iterative_run):
    runner, outcomes, _ = iterative_run
    assert outcomes["osp"].action == outcomes["odpo"].action == "ran"
    for name in ("osp", "odpo"):
        stage = StageDir(runner.run_dir / name)
        records = _records(stage.root)
        assert [r["round"] for r in records] == [0, 1]
        for r in records:
            assert r["pairs"] > 0 and r["judge"] == "gold"
            lo, hi = r["gold_reward_ci95"]
            assert lo <= r["gold_reward"] <= hi
            # The gold judge ranks by the gold reward itself, so every kept pair agrees with gold.
            assert r["judge_gold_agreement"] == 1.0
        assert (stage.root / "rounds" / "round-1" / "checkpoint" / "model.safetensors").exists()
        assert (stage.checkpoint / "model.safetensors").exists()
        assert stage.read_manifest()["summary"]["final_gold_reward"] == records[-1]["gold_reward"]


def test_anchored_strengths_clip_the_strength_not_the_anchor_scores():
    """§4b step 5: p = σ(logit s_i − logit s_j), clipped to [0.01, 0.99]. Scores a confident judge puts past 0.99 (or
    under 0.01) keep their order: clipped to 0.01 first, they were equal and their pairs dropped as ties."""
    from alignpipe.data.pairing import ScoredSet
    from alignpipe.trainers.round_methods import anchored_pairs

    sets = [ScoredSet("x", ("a", "b", "c", "d"), (0.9995, 0.995, 0.004, 0.0001))]
    pairs, _ = anchored_pairs(sets, "all_pairs", 0.0)
    strengths = {(p.chosen, p.rejected): p.strength for p in pairs}
    assert strengths[("a", "b")] == pytest.approx(1 / (1 + (199 / 1999)), abs=1e-9)  # σ(ln 1999 − ln 199) = 0.9095
    assert strengths[("c", "d")] == pytest.approx(1 / (1 + (0.0001 / 0.9999) / (0.004 / 0.996)), abs=1e-9)  # 0.9757
    assert strengths[("a", "c")] == 0.99 and len(pairs) == 6


def test_soft_labels_for_osp_and_hard_labels_for_online_dpo(iterative_run):
    runner, _, _ = iterative_run
    osp, odpo = _records(runner.run_dir / "osp"), _records(runner.run_dir / "odpo")
    assert all(0.5 < r["mean_strength"] < 1.0 for r in osp)
    assert all(r["mean_strength"] == 1.0 for r in odpo)
    logged = [json.loads(line) for line in StageDir(runner.run_dir / "osp").metrics.read_text().splitlines()]
    assert any("soft/margin_gap" in entry for entry in logged)


def test_resume_keeps_completed_rounds_and_reruns_the_interrupted_one(iterative_run, tmp_path):
    runner, _, _ = iterative_run
    runs = tmp_path / "runs"
    shutil.copytree(runner.run_dir, runs / "tiny")
    osp = StageDir(runs / "tiny" / "osp")
    round0 = json.loads((osp.root / "rounds" / "round-0" / "manifest.json").read_text())
    shutil.rmtree(osp.root / "rounds" / "round-1")
    shutil.rmtree(osp.checkpoint)
    osp.update_manifest(status="running")
    recipe_path = write_recipe(tmp_path, _recipe({"name": "osp", "type": "osp", **ROUND_STAGE},
                                                 {"name": "odpo", "type": "online_dpo", **ROUND_STAGE}))
    outcomes = {o.name: o for o in Runner(load_recipe(recipe_path), runs_dir=runs, resume=True,
                                          in_process=True).run()}
    assert outcomes["osp"].action == "resumed"
    assert "completed rounds" in outcomes["osp"].reason
    assert json.loads((osp.root / "rounds" / "round-0" / "manifest.json").read_text()) == round0
    assert (osp.root / "rounds" / "round-1" / "checkpoint").exists()
    assert osp.read_manifest()["status"] == "complete"


def test_judge_samples_reanchors_on_the_median():
    """With the gold judge, s orders samples by gold reward and the re-anchored median sample scores exactly 0.5."""
    prompt = "reverse: 1 2 3"
    samples = [["3 2 1", "3 2", "1 2 3", "3"]]  # gold: 1.2, 0.867, 0.533, 0.533
    strengths = judge_samples(GoldPairwiseJudge(temperature=0.1), [prompt], samples, rng=random.Random(0),
                              reanchor=True)[0]
    golds = [gold_reward(prompt, r) for r in samples[0]]
    assert strengths.count(0.5) >= 1
    assert strengths[0] == max(strengths) and golds[0] == max(golds)
    assert strengths[1] > strengths[2]


def test_gold_agreement_ignores_gold_ties():
    prompt = "copy: 1 2"
    pairs = [PreferencePair(prompt, "1 2", "1", 0.9),   # agrees
             PreferencePair(prompt, "1", "1 2", 0.6),   # disagrees
             PreferencePair(prompt, "1 9", "9 2", 0.6)]  # gold tie: left out
    assert gold_agreement(pairs) == 0.5


def test_self_judge_runs_inside_the_loop(tmp_path):
    """judge: self — the policy judges its own samples (OSP's default); the record carries its agreement with gold."""
    recipe = _recipe({"name": "osp", "type": "osp", **ROUND_STAGE, "judge": "self", "rounds": 1,
                      "prompts_per_round": 8})
    recipe["model"] = {**recipe["model"], "tiny": {**recipe["model"]["tiny"], "max_position_embeddings": 256}}
    runner = Runner(load_recipe(write_recipe(tmp_path, recipe)), runs_dir=tmp_path / "runs", in_process=True)
    runner.run()
    (record,) = _records(runner.run_dir / "osp")
    assert record["judge"] == "self" and record["pairs"] > 0
    assert record["judge_gold_agreement"] is None or 0.0 <= record["judge_gold_agreement"] <= 1.0


def test_references_load_in_the_policys_dtype(tmp_path, llama_path, monkeypatch):
    """Full fine-tuning under ``dtype: auto`` on a bf16 GPU loads the policy in float32 (``policy_dtype``), and round
    0's reference is TRL's copy in the policy's dtype; a later round's explicit reference and INPO's anchor must be
    float32 too, not auto's bf16 (they were: references computed in another precision than the policy's own)."""
    import torch

    import alignpipe.models.loading as loading
    import alignpipe.trainers.iterative as iterative
    import alignpipe.trainers.round_methods as round_methods
    from alignpipe.pipeline.stage import StageContext

    monkeypatch.setattr(loading, "bf16_supported", lambda: True)  # dtype auto = bf16, as on a capable GPU
    stages = [{"name": "osp", "type": "osp", **ROUND_STAGE, "lora": None},
              {"name": "inpo", "type": "inpo", **ROUND_STAGE, "lora": None}]
    recipe = load_recipe(write_recipe(tmp_path, _recipe(*stages)))

    def context(name):
        return StageContext(recipe=recipe, stage=recipe.stage(name), dir=StageDir(tmp_path / name), run_dir=tmp_path,
                            base=llama_path, inputs={"sft": llama_path}, resume_from=None)

    class Captured(Exception):
        pass

    class Capture:
        def trainer(self, ctx, **kwargs):
            raise Captured(kwargs["ref_model"])

    row = {"prompt": [{"role": "user", "content": "copy: 1"}], "chosen": [{"role": "assistant", "content": "1"}],
           "rejected": [{"role": "assistant", "content": "2"}]}
    with pytest.raises(Captured) as captured:
        iterative._train_round(context("osp"), Capture(), 1, None, None, [row], llama_path)
    monkeypatch.setattr(round_methods, "INPOTrainer", lambda **kwargs: kwargs["anchor_model"])
    anchor = round_methods.SelfPlayRule("inpo").trainer(context("inpo"))
    assert captured.value.args[0].dtype == anchor.dtype == torch.float32


def test_save_total_limit_holds_for_the_whole_stage(tmp_path, monkeypatch):
    """A round's trainer checkpoints only resume that round: they are deleted once it is complete, so an R-round stage
    keeps at most ``save_total_limit`` of them, not R times as many (with optimizer state) to its end."""
    import alignpipe.trainers.iterative as iterative

    train_round, kept = iterative._train_round, []

    def counting(ctx, *args):
        kept.append(len(list(ctx.dir.trainer.glob("*/checkpoint-*"))))  # what earlier rounds left
        return train_round(ctx, *args)

    monkeypatch.setattr(iterative, "_train_round", counting)
    stage = {"name": "osp", "type": "osp", **ROUND_STAGE, "rounds": 3, "prompts_per_round": 8, "save_steps": 1,
             "save_total_limit": 1, "truncated_samples": "keep"}
    runner = Runner(load_recipe(write_recipe(tmp_path, _recipe(stage))), runs_dir=tmp_path / "runs", in_process=True)
    assert [o.action for o in runner.run()] == ["ran", "ran"]
    osp = StageDir(runner.run_dir / "osp")
    assert kept == [0, 0, 0]
    assert not list(osp.trainer.glob("*/checkpoint-*")) and not osp.read_manifest().get("checkpoints")
    assert all((osp.root / "rounds" / f"round-{r}" / "checkpoint").is_dir() for r in range(3))


def test_round_training_numbers_weighs_each_logged_window_by_its_steps():
    """Each logged value averages the steps since the previous log: windows of 2, 2 and 1 steps."""
    from alignpipe.trainers.iterative import round_training_numbers

    history = [{"step": 2, "loss": 1.0, "inpo/h": 0.5}, {"step": 4, "loss": 3.0},
               {"step": 5, "loss": 6.0, "inpo/h": -1.0},
               {"step": 5, "train_loss": 2.8, "train_runtime": 1.0}]  # TRL's end-of-training record
    assert round_training_numbers(history) == {
        "steps": 5, "round_mean/loss": (2 * 1.0 + 2 * 3.0 + 1 * 6.0) / 5, "last_logged/loss": 6.0,
        "round_mean/inpo/h": (2 * 0.5 + 1 * -1.0) / 3, "last_logged/inpo/h": -1.0}
    assert round_training_numbers([{"step": 3, "train_loss": 1.0}]) == {}


def test_round_records_cover_every_step_of_the_round(tmp_path):
    """A round's record holds its training numbers over all its steps, also those after the last multiple of
    ``logging_steps`` and in a round shorter than ``logging_steps`` (it had none): its mean loss is TRL's
    ``train_loss`` of the round's trainer, its last logged window ends at the round's last step."""
    stages = [{"name": "osp", "type": "osp", **ROUND_STAGE, "rounds": 2, "max_steps": 5, "logging_steps": 2},
              {"name": "short", "type": "osp", **ROUND_STAGE, "rounds": 1, "max_steps": 3, "logging_steps": 50}]
    runner = Runner(load_recipe(write_recipe(tmp_path, _recipe(*stages))), runs_dir=tmp_path / "runs",
                    in_process=True)
    runner.run()
    steps = []
    for name in ("osp", "short"):
        lines = [json.loads(line) for line in StageDir(runner.run_dir / name).metrics.read_text().splitlines()]
        for record in (line for line in lines if "round" in line):
            trainer = [line for line in lines if line.get("trainer") == f"round-{record['round']}"]
            end = next(line for line in trainer if "train_loss" in line)
            last = [line for line in trainer if "loss" in line][-1]
            assert record["train/steps"] == end["step"] == last["step"]
            assert record["train/round_mean/loss"] == pytest.approx(end["train_loss"], rel=1e-6)
            assert record["train/last_logged/loss"] == last["loss"]
            steps.append(end["step"])
    assert steps == [5, 5, 3]  # every round ends between two logging steps


def test_round_seeds_are_hashed_per_round_and_purpose_and_stable_across_processes():
    """No two rounds or purposes share a stream: a round's sampling seeds (one per batch of 64 samples: seed + batch
    index) never meet another round's, and the trainer seeds differ; the same numbers in every Python process."""
    import inspect
    import subprocess
    import sys

    from alignpipe.trainers.round_methods import round_seed

    batches = 1000  # 64,000 samples a round
    for seed in range(3):
        sampling = [round_seed(seed, r, "sampling") for r in range(10)]
        ranges = sorted((s, s + batches) for s in sampling)
        assert all(end <= start for (_, end), (start, _) in zip(ranges, ranges[1:])), ranges
        trainer = {round_seed(seed, r, "trainer") for r in range(10)}
        assert len(trainer) == 10 and not trainer & set(sampling)
        assert all(0 <= s < 2 ** 32 for s in [*sampling, *trainer])  # numpy's limit (transformers' set_seed)
    # round_seed's own code in a fresh interpreter with another string-hash salt; run from its source, as importing
    # its module would load torch, transformers and TRL first (~7 s) for a function that needs hashlib alone
    code = f"import hashlib\n{inspect.getsource(round_seed)}\nprint(round_seed(0, 1, 'sampling'))"
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env={**os.environ, "PYTHONHASHSEED": "12345"}).stdout
    assert int(other) == round_seed(0, 1, "sampling") == 2305168030  # pinned: a change re-draws every round


def test_rounds_sample_and_initialise_their_adapters_from_their_own_seeds(tmp_path, monkeypatch):
    """Each round's samples come from its own seed, and its LoRA adapter starts from its own draw (every round's A
    matrix was the same: TRL seeds each trainer just before PEFT draws it); a rerun draws the same again."""
    import torch

    import alignpipe.trainers.round_methods as round_methods

    sampled, inits = [], []
    generate = round_methods.generate

    def recording_generate(model, tokenizer, prompts, settings, **kwargs):
        sampled.append(settings.seed)
        return generate(model, tokenizer, prompts, settings, **kwargs)

    class Recording(round_methods.SoftPreferenceDPOTrainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            inits.append({n: p.detach().clone() for n, p in self.model.named_parameters() if "lora_A" in n})

    monkeypatch.setattr(round_methods, "generate", recording_generate)
    monkeypatch.setattr(round_methods, "SoftPreferenceDPOTrainer", Recording)
    stage = {"name": "osp", "type": "osp", **ROUND_STAGE, "prompts_per_round": 8, "truncated_samples": "keep"}
    for attempt in ("first", "again"):
        Runner(load_recipe(write_recipe(tmp_path, _recipe(stage))), runs_dir=tmp_path / attempt, in_process=True).run()
    first, second, again, _ = inits
    assert first and not any(torch.equal(first[n], second[n]) for n in first)
    assert all(torch.equal(first[n], again[n]) for n in first)
    assert sampled == [round_methods.round_seed(0, r, "sampling") for r in (0, 1)] * 2
