"""GRPO and RLOO stages: TRL's trainers on the tiny recipe with the reward plug-in, and their recipe checks."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import TINY_RECIPE, write_recipe

from alignpipe.pipeline.launch_checks import plan_batches
from alignpipe.pipeline.rundir import StageDir, directory_hash
from alignpipe.pipeline.runner import Runner
from alignpipe.recipe import GRPOStage, RecipeError, RLOOStage, load_recipe
from alignpipe.trainers import trl_online
from alignpipe.trainers.trl_online import check_prompts

REWARD = {"name": "rm", "type": "reward", "inputs": ["sft"], "members": 2}
FAST = {"inputs": ["sft"], "reward": {"source": "gold"}, "learning_rate": 1e-3, "max_steps": 4,
        "per_device_train_batch_size": 8, "num_generations": 4, "prompts": 32, "max_completion_length": 10,
        "logging_steps": 1, "save_steps": 2, "eval_prompts": 16}


@pytest.fixture(scope="module")
def online_run(tmp_path_factory):
    directory = tmp_path_factory.mktemp("online")
    recipe = {**TINY_RECIPE, "stages": [TINY_RECIPE["stages"][0],
                                        {"name": "grpo", "type": "grpo", "loss_type": "grpo", **FAST},
                                        {"name": "rloo", "type": "rloo", **FAST, "missing_eos_penalty": 2.0},
                                        {"name": "luspo", "type": "grpo", "loss_type": "luspo", **FAST,
                                         "max_steps": 1, "save_steps": 1, "mask_truncated_completions": True}]}
    runner = Runner(load_recipe(write_recipe(directory, recipe)), runs_dir=directory / "runs", in_process=True)
    return runner, {o.name: o.action for o in runner.run()}


DECODING = {"min_new_tokens": 10, "no_repeat_ngram_size": 1}  # options a hub checkpoint may carry; TRL sets neither


def copy_sft(runner: Runner, runs: Path) -> Path:
    """A copy of ``runner``'s run directory under ``runs`` with its sft stage alone: a later recipe with the same sft
    skips it."""
    run = runs / runner.run_dir.name
    shutil.copytree(runner.run_dir, run, ignore=lambda folder, names: {"grpo", "rloo", "luspo"} & set(names))
    return run


@pytest.fixture(scope="module")
def decoding_run(online_run, tmp_path_factory):
    """``online_run``'s stages one step long, from its sft policy with ``DECODING`` in its generation_config.json."""
    runner, _ = online_run
    directory = tmp_path_factory.mktemp("decoding")
    run = copy_sft(runner, directory / "runs")
    config = run / "sft" / "checkpoint" / "generation_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), **DECODING}))
    # as if sft had published it so: a checkpoint changed after its stage completed would be made again
    StageDir(run / "sft").update_manifest(output_sha256=directory_hash(run / "sft" / "checkpoint"))
    recipe = {**TINY_RECIPE, "stages": [TINY_RECIPE["stages"][0],
                                        {"name": "grpo", "type": "grpo", "loss_type": "grpo", **FAST, "max_steps": 1},
                                        {"name": "rloo", "type": "rloo", **FAST, "max_steps": 1}]}
    decoding = Runner(load_recipe(write_recipe(directory, recipe)), runs_dir=directory / "runs", in_process=True)
    outcomes = {o.name: o.action for o in decoding.run()}
    assert outcomes == {"sft": "skipped", "grpo": "ran", "rloo": "ran"}
    return decoding


@pytest.mark.parametrize("name", ["grpo", "rloo"])
def test_training_samples_ignore_the_checkpoints_decoding_options(online_run, decoding_run, name):
    """TRL sets temperature, top-p/k and the length, not min_new_tokens or no_repeat_ngram_size: the stage samples as
    from the same policy without them (the evaluation ignores them too), and publishes the checkpoint's own file."""
    def first_step(runner):
        records = [json.loads(line) for line in StageDir(runner.run_dir / name).metrics.read_text().splitlines()]
        return {k: v for k, v in records[0].items() if k.startswith("completions/")}

    runner, _ = online_run
    sampled = first_step(decoding_run)
    assert sampled["completions/min_length"] < DECODING["min_new_tokens"]
    assert sampled == first_step(runner)
    published = json.loads((StageDir(decoding_run.run_dir / name).checkpoint / "generation_config.json").read_text())
    assert {k: published.get(k) for k in DECODING} == DECODING


@pytest.mark.parametrize("name", ["grpo", "rloo"])
def test_stage_trains_logs_reward_publishes_and_evaluates(online_run, name):
    runner, outcomes = online_run
    assert outcomes[name] == "ran"
    stage = StageDir(runner.run_dir / name)
    assert (stage.checkpoint / "model.safetensors").exists()
    assert not (stage.checkpoint / "adapter_config.json").exists()  # LoRA merged: loads like any checkpoint
    records = [json.loads(line) for line in stage.metrics.read_text().splitlines()]
    steps = [r for r in records if "reward" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    assert all("rewards/alignpipe_gold/mean" in r and "rewards/ensemble_std" not in r for r in steps)
    final = records[-1]
    assert final["final_evaluation"] and final["step"] == 4
    lo, hi = final["gold_reward_ci95"]
    assert lo <= final["gold_reward"] <= hi
    assert final["proxy_reward"] == pytest.approx(final["gold_reward"], abs=1e-6)  # gold source: proxy is gold
    assert final["ensemble_std"] is None and final["kl_initial_k3"] >= 0
    summary = stage.read_manifest()["summary"]
    assert summary["global_step"] == 4 and summary["first_reward"] is not None
    assert (stage.trainer / "checkpoint-4" / "reward_source.json").exists()


def test_grpo_keeps_the_reference_only_when_beta_is_set(online_run):
    runner, _ = online_run
    records = [json.loads(line) for line in StageDir(runner.run_dir / "grpo").metrics.read_text().splitlines()]
    assert all("kl" in r for r in records if "reward" in r)  # beta 0.04 by default: TRL logs the KL term


def test_grpo_trains_with_the_recipes_loss_type(online_run):
    """The stage's loss_type reaches TRL (its default is dapo; this run asks for DeepSeekMath's grpo)."""
    import torch

    runner, _ = online_run
    args = torch.load(StageDir(runner.run_dir / "grpo").trainer / "checkpoint-4" / "training_args.bin",
                      weights_only=False)
    assert args.loss_type == "grpo" and args.importance_sampling_level == "token"  # TRL's default
    assert args.mask_truncated_completions is False  # TRL's default


def test_luspo_takes_one_importance_ratio_per_completion(online_run):
    """LUSPO is a sequence-level loss (a length-scaled GSPO): TRL needs importance_sampling_level sequence for it,
    and without it only warns and trains a token-level variant."""
    import torch

    runner, outcomes = online_run
    assert outcomes["luspo"] == "ran"
    args = torch.load(StageDir(runner.run_dir / "luspo").trainer / "checkpoint-1" / "training_args.bin",
                      weights_only=False)
    assert args.loss_type == "luspo" and args.importance_sampling_level == "sequence"
    assert args.mask_truncated_completions is True  # the stage's setting reaches TRL


def test_the_missing_eos_penalty_falls_on_the_completions_trl_counts_as_clipped(online_run):
    """The rloo stage's penalty hits a share of completions equal to TRL's own ``completions/clipped_ratio`` at every
    logged step (both averaged over the step's generation batches), and some step had one to hit; grpo, without a
    penalty, logs no share."""
    runner, _ = online_run
    records = [json.loads(line) for line in StageDir(runner.run_dir / "rloo").metrics.read_text().splitlines()]
    steps = [r for r in records if "reward" in r]
    assert [r["rewards/missing_eos_penalised"] for r in steps] == \
        pytest.approx([r["completions/clipped_ratio"] for r in steps])
    assert any(r["completions/clipped_ratio"] > 0 for r in steps)
    grpo = [json.loads(line) for line in StageDir(runner.run_dir / "grpo").metrics.read_text().splitlines()]
    assert not any("rewards/missing_eos_penalised" in r for r in grpo)


def test_the_online_reward_penalises_cut_completions_by_the_trainers_end_ids():
    """Rewards from the source, less the penalty where TRL's completion ids end in neither an end id of the trainer
    (eos 2, end-of-turn 7) nor padding (0); the penalised share goes to TRL's ``log_metric``."""
    import torch

    from alignpipe.rewards.plugin import RewardSource, ScoredBatch

    class Fixed(RewardSource):
        name = "fixed"

        def __call__(self, prompts, responses, *, update=True):
            return ScoredBatch(torch.tensor([1.0, 0.5, -1.0, 2.0]), torch.zeros(4), None)

    logged = []
    reward = trl_online.OnlineReward(Fixed(), missing_eos_penalty=0.75)
    with pytest.raises(RuntimeError, match="use_ends_of"):
        reward(["p"] * 4, ["c"] * 4, completion_ids=[[2]] * 4)
    reward.use_ends_of(SimpleNamespace(eos_token_ids=[2, 7]), SimpleNamespace(pad_token_id=0))
    rewards = reward(["p"] * 4, ["c"] * 4, completion_ids=[[4, 2], [4, 5], [7], [4, 0]],
                     log_metric=lambda name, value: logged.append((name, value)))
    assert rewards == [1.0, -0.25, -1.0, 2.0]
    assert logged == [("rewards/missing_eos_penalised", 0.25)]
    assert trl_online.OnlineReward(Fixed())(["p"], ["c"]) == [1.0, 0.5, -1.0, 2.0]  # no penalty: no ids needed


def test_resume_after_the_final_evaluation_was_written_keeps_one(online_run, tmp_path, monkeypatch):
    """Killed after the final evaluation reached metrics.jsonl but before the stage was complete: --resume publishes
    the last trainer checkpoint without training and evaluates it again; the log holds that record once, as an
    uninterrupted run's does."""
    def read():
        return [json.loads(line) for line in StageDir(run / "grpo").metrics.read_text().splitlines()]

    def killed_after_final_record(path, record):
        append_metrics(path, record)
        if record.get("final_evaluation"):
            raise RuntimeError("killed after writing the final evaluation")

    run = copy_sft(online_run[0], tmp_path / "runs")
    recipe = write_recipe(tmp_path, {**TINY_RECIPE, "stages": [
        TINY_RECIPE["stages"][0], {"name": "grpo", "type": "grpo", **FAST, "max_steps": 2, "save_steps": 2}]})
    append_metrics = trl_online.append_metrics
    monkeypatch.setattr(trl_online, "append_metrics", killed_after_final_record)
    with pytest.raises(RuntimeError, match="killed after writing the final evaluation"):
        Runner(load_recipe(recipe), runs_dir=tmp_path / "runs", in_process=True).run()
    interrupted = read()
    monkeypatch.setattr(trl_online, "append_metrics", append_metrics)
    outcomes = Runner(load_recipe(recipe), runs_dir=tmp_path / "runs", in_process=True, resume=True).run()
    assert {o.name: o.action for o in outcomes}["grpo"] == "resumed"
    records = read()
    kinds = [("final" if r.get("final_evaluation") else "summary" if "train_runtime" in r else "log", r["step"])
             for r in records]
    assert kinds == [("log", 1), ("log", 2), ("summary", 2), ("final", 2)]
    assert records == interrupted  # the same checkpoint, evaluated with the same seeds


def test_grpo_with_a_reward_ensemble_logs_its_std_and_saves_the_penalty_state(tmp_path):
    rm = {**REWARD, "top_layers": 1, "learning_rate": 3e-3, "per_device_train_batch_size": 16, "max_length": 48,
          "heldout_fraction": 0.25}
    grpo = {"name": "grpo", "type": "grpo", **FAST, "inputs": ["sft", "rm"], "max_steps": 2,
            "reward": {"source": "model", "penalty": "mean_minus_std", "penalty_coef": 1.0}}
    recipe = {**TINY_RECIPE, "stages": [TINY_RECIPE["stages"][0], rm, grpo]}
    runner = Runner(load_recipe(write_recipe(tmp_path, recipe)), runs_dir=tmp_path / "runs", in_process=True)
    runner.run()
    stage = StageDir(runner.run_dir / "grpo")
    records = [json.loads(line) for line in stage.metrics.read_text().splitlines()]
    assert all(r["rewards/ensemble_std"] > 0 for r in records if "reward" in r)
    assert records[-1]["ensemble_std"] > 0 and records[-1]["proxy_reward"] != records[-1]["gold_reward"]
    state = json.loads((stage.trainer / "checkpoint-2" / "reward_source.json").read_text())
    assert state["running_std"]["count"] == 2 * 8  # two generation batches of 8 completions folded into u-bar


@pytest.fixture
def check(tmp_path):
    def load(*stages: dict):
        return load_recipe(write_recipe(tmp_path, {**TINY_RECIPE, "stages": [TINY_RECIPE["stages"][0], *stages]}))
    return load


@pytest.mark.parametrize("kind", ["grpo", "rloo"])
def test_valid_combinations(check, kind):
    recipe = check(REWARD, {"name": "rl", "type": kind, "inputs": ["sft", "rm"],
                            "reward": {"penalty": "mean_minus_std", "penalty_coef": 0.5}})
    stage = recipe.stage("rl")
    assert isinstance(stage, GRPOStage if kind == "grpo" else RLOOStage) and stage.lora is not None
    assert stage.num_generations == (8 if kind == "grpo" else 2)


@pytest.mark.parametrize(("kind", "stage", "message"), [
    ("grpo", {"per_device_train_batch_size": 6, "num_generations": 4}, r"grpo\.num_generations: .*multiple of"),
    ("rloo", {"gradient_accumulation_steps": 3, "per_device_train_batch_size": 1}, "multiple of num_generations"),
    ("grpo", {"num_generations": 1}, r"grpo\.num_generations"),
    ("grpo", {"max_length": 64}, r"grpo\.max_length: not read by grpo/rloo stages: prompts come whole"),
    ("rloo", {"max_length": 64}, r"rloo\.max_length: .*max_completion_length bounds each completion"),
    ("rloo", {"reward": {"source": "model"}}, "reward.source: model needs 2 inputs"),
    ("grpo", {"reward": {"source": "gold", "penalty": "mean_minus_std", "penalty_coef": 1.0}},
     "penalties combine ensemble members"),
    ("rloo", {"inputs": ["sft", "sft"]}, "second input is only read with reward.source: model"),
    ("grpo", {"inputs": ["sft", "sft"], "reward": {"source": "model"}}, "not a reward stage"),
    ("rloo", {"inputs": ["rm"], "reward": {"source": "gold"}}, "is a reward stage"),
    ("grpo", {"beta": -0.1}, r"grpo\.beta"),
    ("rloo", {"num_generation": 4}, "did you mean 'num_generations'"),
    ("grpo", {"prompts": 1, "per_device_train_batch_size": 8, "num_generations": 4},
     r"grpo\.prompts: 1 cannot fill one generation batch of 2 prompts \(global batch 8 = 8 per device x 1 "
     r"accumulation x 1 process, counted in completions, 4 per prompt\).*set prompts to at least 2"),
    ("rloo", {"prompts": 3, "global_batch_size": 16, "per_device_train_batch_size": 4, "num_generations": 4},
     r"rloo\.prompts: 3 cannot fill one generation batch of 4 prompts"),
])
def test_bad_combinations_are_recipe_errors(check, kind, stage, message):
    defaults = {"name": kind, "type": kind, "inputs": ["sft"], "reward": {"source": "gold"}}
    with pytest.raises(RecipeError, match=message):
        check(REWARD, {**defaults, **stage})


def test_too_few_prompts_for_the_launchs_processes_stop_the_run_before_it_starts(check):
    """Per-device sizes make a generation batch grow with the process count: 2 prompts fill one batch of 8
    completions (4 per prompt) on one process, not the 4 prompts' batch of two processes, which TRL's sampler would
    drop, leaving nothing to train on. The runner refuses the launch and the stage refuses to start."""
    recipe = check({"name": "grpo", "type": "grpo", **FAST, "prompts": 2})
    stage = recipe.stage("grpo")
    assert plan_batches(recipe, 1)["grpo"]
    check_prompts(stage, 1)
    message = r"stages\.grpo\.prompts: 2 cannot fill one generation batch of 4 prompts .*x 2 processes"
    with pytest.raises(ValueError, match=message):
        plan_batches(recipe, 2)
    with pytest.raises(ValueError, match=message):
        check_prompts(stage, 2)
    fixed = recipe.stage("grpo").model_copy(update={"global_batch_size": 8, "per_device_train_batch_size": 4})
    check_prompts(fixed, 2)  # a global batch is the same on any number of processes


def test_prompts_left_out_of_each_epoch_are_logged(check, caplog):
    stage = check({"name": "rloo", "type": "rloo", **FAST, "prompts": 5}).stage("rloo")  # batches of 2 prompts
    with caplog.at_level(logging.INFO, logger="alignpipe"):
        check_prompts(stage, 1)
    assert "[rloo] 1 of the 5 prompts are left out of each epoch" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="alignpipe"):
        check_prompts(stage.model_copy(update={"prompts": 6}), 1)
    assert "left out" not in caplog.text


@pytest.mark.parametrize("kind", ["grpo", "rloo"])
def test_a_run_resumed_in_its_second_epoch_trains_as_the_uninterrupted_one(online_run, tmp_path, monkeypatch, kind):
    """TRL's RepeatSampler shuffles each epoch from a generator seeded once; a resumed trainer's fresh sampler
    replayed epoch 1's order in epoch 2, so some prompts trained twice and others never, and the weights differed."""
    from safetensors.torch import load_file

    from alignpipe.trainers.common import MetricsLogger

    class KilledAtStep6(MetricsLogger):
        def on_log(self, args, state, control, logs=None, **kwargs):
            super().on_log(args, state, control, logs=logs, **kwargs)
            if state.global_step == 6:
                raise RuntimeError("killed at step 6")

    # 8 prompts, 2 per step: 4 steps an epoch; the checkpoint at step 5 is one step into epoch 2
    stage = {"name": kind, "type": kind, **FAST, "prompts": 8, "num_train_epochs": 2, "max_steps": -1,
             "save_steps": 5}
    recipe = write_recipe(tmp_path, {**TINY_RECIPE, "stages": [TINY_RECIPE["stages"][0], stage]})
    weights = {}
    for attempt in ("uninterrupted", "resumed"):
        runs = tmp_path / attempt
        copy_sft(online_run[0], runs)
        if attempt == "resumed":
            monkeypatch.setattr(trl_online, "MetricsLogger", KilledAtStep6)
            with pytest.raises(RuntimeError, match="killed at step 6"):
                Runner(load_recipe(recipe), runs_dir=runs, in_process=True).run()
            monkeypatch.setattr(trl_online, "MetricsLogger", MetricsLogger)
        outcomes = Runner(load_recipe(recipe), runs_dir=runs, in_process=True, resume=attempt == "resumed").run()
        assert {o.name: o.action for o in outcomes}[kind] == ("resumed" if attempt == "resumed" else "ran")
        weights[attempt] = load_file(runs / "tiny" / kind / "checkpoint" / "model.safetensors")
    for name, tensor in weights["uninterrupted"].items():
        assert (weights["resumed"][name] == tensor).all(), name


def test_the_sampler_shuffles_each_epoch_as_trls_does_and_starts_at_any_epoch():
    import torch
    from trl.trainer.utils import RepeatSampler

    from alignpipe.trainers.epoch_sampling import EpochReplayingRepeatSampler

    options = {"data_source": list(range(12)), "mini_repeat_count": 2, "batch_size": 3, "repeat_count": 2,
               "seed": 7}
    trls = RepeatSampler(**options)
    trl_epochs = [list(trls) for _ in range(3)]
    ours = EpochReplayingRepeatSampler(**options)
    assert [list(ours) for _ in range(3)] == trl_epochs  # an uninterrupted run is unchanged
    assert list(EpochReplayingRepeatSampler(**options, first_epoch=2)) == trl_epochs[2]
    assert list(RepeatSampler(**options)) == trl_epochs[0] != trl_epochs[2]  # what a resumed TRL sampler drew
    torch.manual_seed(0)  # the global generator plays no part
    assert list(EpochReplayingRepeatSampler(**options, first_epoch=1)) == trl_epochs[1]


def test_cispo_on_policy_steps_as_dapo_does(online_run, tmp_path):
    """On policy the ratio is 1, so CISPO's weight min(ratio, ε_max) is 1 and its gradient is DAPO's; with TRL's
    fallback ε_max (0.2) every token's policy gradient was a fifth of it."""
    stages = [{"name": loss, "type": "grpo", "loss_type": loss, **FAST, "max_steps": 1, "save_steps": 1}
              for loss in ("dapo", "cispo")]
    recipe = write_recipe(tmp_path, {**TINY_RECIPE, "stages": [TINY_RECIPE["stages"][0], *stages]})
    copy_sft(online_run[0], tmp_path / "runs")
    Runner(load_recipe(recipe), runs_dir=tmp_path / "runs", in_process=True).run()
    first = {}
    for loss in ("dapo", "cispo"):
        records = StageDir(tmp_path / "runs" / "tiny" / loss).metrics.read_text().splitlines()
        first[loss] = next(r for r in map(json.loads, records) if "grad_norm" in r)
    assert first["dapo"]["reward"] == first["cispo"]["reward"]  # the same samples
    assert first["cispo"]["grad_norm"] == pytest.approx(first["dapo"]["grad_norm"], rel=1e-4)
    assert first["cispo"]["grad_norm"] > 0.01


@pytest.mark.parametrize("scale", ["none", "batch"])
def test_grpo_hands_its_reward_scaling_to_trl(online_run, tmp_path, monkeypatch, scale):
    """Dr. GRPO drops the division by the group's std as well as the length normalisation (loss_type dr_grpo)."""
    seen = {}

    def stop_before_training(trainer, ctx, resume_from):
        seen.update(scale_rewards=trainer.args.scale_rewards, loss_type=trainer.args.loss_type)
        raise RuntimeError("stopped before training")

    monkeypatch.setattr(trl_online, "train", stop_before_training)
    stage = {"name": "grpo", "type": "grpo", "loss_type": "dr_grpo", "scale_rewards": scale, **FAST}
    recipe = write_recipe(tmp_path, {**TINY_RECIPE, "stages": [TINY_RECIPE["stages"][0], stage]})
    copy_sft(online_run[0], tmp_path / "runs")
    with pytest.raises(RuntimeError, match="stopped before training"):
        Runner(load_recipe(recipe), runs_dir=tmp_path / "runs", in_process=True).run()
    assert seen == {"scale_rewards": scale, "loss_type": "dr_grpo"}


@pytest.mark.parametrize(("kind", "setting"), [("grpo", {}), ("rloo", {}), ("grpo", {"disable_dropout": False})])
def test_group_rl_samples_and_trains_without_dropout_unless_asked(online_run, tmp_path, monkeypatch, kind, setting):
    """TRL's GRPO/RLOO keep dropout on by default, so completions came from a randomly thinned policy (the recipe's
    LoRA dropout, 0.05); the stages turn every dropout off, as ppo and the DPO family do, unless told otherwise."""
    seen = {}

    def stop_before_training(trainer, ctx, resume_from):
        seen["rates"] = {m.p for name, m in trainer.model.named_modules() if name.endswith("lora_dropout.default")}
        raise RuntimeError("stopped before training")

    monkeypatch.setattr(trl_online, "train", stop_before_training)
    stage = {"name": kind, "type": kind, **FAST, "lora": {"r": 4, "alpha": 8, "dropout": 0.1}, **setting}
    recipe = write_recipe(tmp_path, {**TINY_RECIPE, "stages": [TINY_RECIPE["stages"][0], stage]})
    copy_sft(online_run[0], tmp_path / "runs")
    with pytest.raises(RuntimeError, match="stopped before training"):
        Runner(load_recipe(recipe), runs_dir=tmp_path / "runs", in_process=True).run()
    assert seen["rates"] == ({0.1} if setting else {0.0})


def test_trl_ends_a_completion_at_the_chat_templates_end_of_turn(tmp_path):
    """GRPO/RLOO end a completion at the ids the model's generation config declares (TRL's ``eos_token_ids``): the
    config the stage trains under declares every sampler's end ids, so a chat template's end of turn that the model
    does not declare ends TRL's completions too, as it ends the evaluation's."""
    from conftest import ending_turns_with
    from datasets import Dataset
    from test_generation import SHAPE
    from trl import GRPOConfig, GRPOTrainer

    from alignpipe.evaluation.generation import decoding_with
    from alignpipe.models.tiny import build_tiny_model, train_tokenizer
    from alignpipe.tasks.synthetic import tokenizer_corpus

    tokenizer = ending_turns_with(train_tokenizer(tokenizer_corpus(n=200), vocab_size=120), "<|system|>")
    model = build_tiny_model(tokenizer, **SHAPE, seed=0)
    config = GRPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=2, num_generations=2, report_to=[],
                        use_cpu=True)
    with decoding_with(model, trl_online.token_ids_only(model, tokenizer)):
        trainer = GRPOTrainer(model=model, reward_funcs=lambda completions, **_: [0.0] * len(completions), args=config,
                              train_dataset=Dataset.from_list([{"prompt": [{"role": "user", "content": "x"}]}] * 2),
                              processing_class=tokenizer)
    assert set(trainer.eos_token_ids) == {tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|system|>")}
    assert model.generation_config.eos_token_id == tokenizer.eos_token_id  # the model's own, restored
