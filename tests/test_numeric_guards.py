"""NaN/Inf in a loss, a reward or an advantage stops the stage with a clear error; the last good trainer checkpoint
stays and nothing is published."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import TINY_RECIPE, write_recipe

from alignpipe.pipeline.rundir import StageDir
from alignpipe.pipeline.runner import Runner
from alignpipe.recipe import load_recipe


def _runner(tmp_path, stages) -> Runner:
    return Runner(load_recipe(write_recipe(tmp_path, {**TINY_RECIPE, "stages": stages})), runs_dir=tmp_path / "runs",
                  in_process=True)


def test_a_nan_loss_stops_sft_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch) -> None:
    import trl

    real = trl.SFTTrainer.compute_loss
    calls = {"n": 0}

    def poisoned(self, *args, **kwargs):
        calls["n"] += 1
        loss = real(self, *args, **kwargs)
        if calls["n"] > 6:  # from step 7 on (one micro-batch per step)
            loss = loss if isinstance(loss, torch.Tensor) else loss[0]
            return loss * float("nan")
        return loss

    monkeypatch.setattr(trl.SFTTrainer, "compute_loss", poisoned)
    sft = {**TINY_RECIPE["stages"][0], "max_steps": 20, "save_steps": 5, "logging_steps": 5}
    runner = _runner(tmp_path, [sft])
    with pytest.raises(FloatingPointError, match=r"non-finite training numbers at step 10 of sft: \{'loss': nan"):
        runner.run()
    stage = StageDir(runner.run_dir / "sft")
    assert json.loads(stage.manifest.read_text())["status"] == "failed"
    assert stage.latest_trainer_checkpoint().name == "checkpoint-5"  # saved before the NaN, kept
    assert not stage.checkpoint.exists()


def test_a_nan_reward_stops_ppo_before_any_update(tmp_path, monkeypatch) -> None:
    from alignpipe.rewards import plugin

    real = plugin.GoldRewardSource.__call__

    def nan_rewards(self, prompts, responses, **kwargs):
        scored = real(self, prompts, responses, **kwargs)
        scored.reward[0] = float("nan")
        return scored

    monkeypatch.setattr(plugin.GoldRewardSource, "__call__", nan_rewards)
    ppo = {"name": "ppo", "type": "ppo", "inputs": ["sft"], "reward": {"source": "gold"}, "total_steps": 2,
           "rollout_batch_size": 8, "mini_batch_size": 8, "ppo_epochs": 1, "learning_rate": 1e-3,
           "max_new_tokens": 6, "eval_every": 2, "eval_prompts": 8}
    sft = {**TINY_RECIPE["stages"][0], "max_steps": 4}
    runner = _runner(tmp_path, [sft, ppo])
    with pytest.raises(FloatingPointError, match=r"PPO reward is not finite \(\[nan\]\) at iteration 0"):
        runner.run()
    assert not StageDir(runner.run_dir / "ppo").checkpoint.exists()


def test_a_padding_slot_that_overflows_exp_leaves_the_ppo_gradient_as_it_would_be():
    """A padding slot's log-ratio of 100 overflows exp: masked after exp, it added 0 to the loss and 0 * inf = NaN to
    its gradient. Masked before, loss and gradient equal those of an ordinary padding slot."""
    import torch

    from alignpipe.losses.ppo import clipped_policy_loss, clipped_value_loss

    mask, advantages = torch.tensor([[1.0, 1.0, 0.0]]), torch.tensor([[0.5, -0.5, 0.0]])

    def policy(padding_old_logp: float):
        weight = torch.nn.Parameter(torch.tensor([1.0]))
        loss, _ = clipped_policy_loss(weight * torch.tensor([[-1.0, -1.0, 0.0]]),
                                      torch.tensor([[-1.1, -0.9, padding_old_logp]]), advantages, mask, 0.2)
        loss.backward()
        return loss.item(), weight.grad.item()

    assert policy(-100.0) == policy(0.0) and torch.isfinite(torch.tensor(policy(-100.0))).all()

    def value(padding: float):  # a padding slot's old value and return (constants) overflowed
        weight = torch.nn.Parameter(torch.tensor([1.0]))
        values = weight * torch.tensor([[0.2, 0.4, 0.0]])
        loss, _ = clipped_value_loss(values, torch.tensor([[0.1, 0.5, padding]]),
                                     torch.tensor([[1.0, 0.0, padding]]), mask, 0.2)
        loss.backward()
        return loss.item(), weight.grad.item()

    assert value(float("inf")) == value(0.0)


def test_a_nan_gradient_stops_the_ppo_step_and_leaves_the_weights():
    """The losses are checked before the backward pass; a gradient that overflowed inside the model is caught at the
    step, by its norm, before it writes NaN into every weight."""
    import torch

    from alignpipe.trainers.ppo import clipped_step

    weight = torch.nn.Parameter(torch.tensor([1.0]))
    optimizer = torch.optim.AdamW([weight], lr=1e-3)
    weight.grad = torch.tensor([float("nan")])
    with pytest.raises(FloatingPointError, match=r"PPO gradient norm is not finite \(\[nan\]\) at iteration 3; "
                       r".*The losses were finite"):
        clipped_step([weight], optimizer, 1.0, "iteration 3")
    assert weight.item() == 1.0
    weight.grad = torch.tensor([0.5])
    clipped_step([weight], optimizer, 1.0, "iteration 4")
    assert weight.item() < 1.0  # a finite gradient steps
