"""The ppo stage: model layout (one base copy, reference = adapters off), a tiny run's metrics, exact resume."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from conftest import TINY_RECIPE, write_recipe
from peft import LoraConfig
from safetensors.torch import load_file

from alignpipe.models.tiny import build_tiny_model
from alignpipe.pipeline.rundir import StageDir
from alignpipe.pipeline.runner import Runner
from alignpipe.recipe import RecipeError, load_recipe
from alignpipe.trainers.actor_critic import ActorCritic, RolloutTensors, response_logprobs

PPO = {"name": "ppo", "type": "ppo", "inputs": ["sft"], "reward": {"source": "gold"}, "total_steps": 4,
       "rollout_batch_size": 16, "mini_batch_size": 8, "ppo_epochs": 2, "learning_rate": 1e-3, "max_new_tokens": 10,
       "eval_every": 2, "eval_prompts": 16, "save_steps": 2}
STEP_KEYS = {"reward/proxy", "reward/penalised", "reward/penalty", "reward/gold", "kl", "kl_coef", "policy/entropy",
             "policy/clip_fraction", "policy/approx_kl", "loss/value", "value/explained_variance", "response_length",
             "no_eos_fraction"}


def _lora():
    return LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")


@pytest.fixture
def layout(tokenizer):
    start = build_tiny_model(tokenizer, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64,
                             max_position_embeddings=128, seed=0)
    reference = build_tiny_model(tokenizer, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64,
                                 max_position_embeddings=128, seed=0).eval()
    model = ActorCritic(start, lora_config=_lora(), critic="adapter").eval()
    ids = [tokenizer("copy : 1 2", add_special_tokens=False)["input_ids"], [5, 6, 7]]
    batch = RolloutTensors.build(ids, [[8, 9], [10]], tokenizer.pad_token_id)
    return model, reference, batch


def test_adapter_layout_keeps_one_base_copy_and_trains_only_adapters_and_head(layout):
    model, reference, _ = layout
    base = sum(p.numel() for p in reference.parameters())
    non_lora = sum(p.numel() for n, p in model.named_parameters() if "lora_" not in n and "value_head" not in n)
    assert non_lora == base  # no second copy of the base weights for the reference or the critic
    trainable = {n for n, p in model.named_parameters() if p in set(model.trainable_parameters())}
    assert trainable and all("lora_" in n or "value_head" in n for n in trainable)
    assert any(".critic." in n for n in trainable) and any(".default." in n for n in trainable)


def test_reference_is_the_start_model_and_updates_stay_in_their_adapter(layout):
    model, reference, batch = layout
    inputs = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask, "position_ids": batch.position_ids}
    expected = reference(**inputs).logits
    torch.testing.assert_close(model.reference_logits(batch), expected)
    torch.testing.assert_close(model.values(batch), torch.zeros_like(batch.response_mask))  # zero-initialised head
    optimizer = torch.optim.SGD(model.trainable_parameters(), lr=1.0)
    policy_before = model.policy_logits(batch).detach()

    # A value-loss step moves the critic (adapter + head) and leaves the policy and reference untouched.
    (model.values(batch) - 1).pow(2).sum().backward()
    optimizer.step()
    optimizer.zero_grad()
    torch.testing.assert_close(model.policy_logits(batch).detach(), policy_before)
    assert model.values(batch).abs().sum() > 0

    # A policy step moves the policy; the reference (adapters off) is still the start model.
    for _ in range(3):  # LoRA B starts at 0, so the first step only moves B; the logits change from then on
        logp, _ = response_logprobs(model.policy_logits(batch), batch)
        (-(logp * batch.response_mask).sum()).backward()
        optimizer.step()
        optimizer.zero_grad()
    assert (model.policy_logits(batch).detach() - policy_before).abs().max() > 1e-4
    torch.testing.assert_close(model.reference_logits(batch), expected)


def test_merged_policy_drops_the_critic(layout):
    model, reference, batch = layout
    merged = model.merged_policy()
    assert not any("lora_" in n for n, _ in merged.named_parameters())
    assert sum(p.numel() for p in merged.parameters()) == sum(p.numel() for p in reference.parameters())


def test_full_fine_tuning_keeps_a_frozen_reference_and_needs_a_model_critic(tokenizer):
    start = build_tiny_model(tokenizer, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64,
                             max_position_embeddings=128, seed=0)
    with pytest.raises(ValueError, match="critic: adapter needs a LoRA policy"):
        ActorCritic(start, lora_config=None, critic="adapter")
    model = ActorCritic(start, lora_config=None, critic="model")
    assert model.reference is not None and not any(p.requires_grad for p in model.reference.parameters())
    assert model.critic_backbone is not None


@pytest.mark.parametrize("critic", ["adapter", "model"])
def test_the_value_head_reads_the_width_of_the_last_hidden_state(critic):
    """OPT-350m projects its hidden states (hidden_size) to word_embed_proj_dim before the LM head: a value head
    sized from hidden_size failed on the first values() call."""
    from transformers import OPTConfig, OPTForCausalLM

    config = OPTConfig(vocab_size=64, hidden_size=32, word_embed_proj_dim=16, num_hidden_layers=2,
                       num_attention_heads=2, ffn_dim=64, max_position_embeddings=64, do_layer_norm_before=False,
                       pad_token_id=1)
    torch.manual_seed(0)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    model = ActorCritic(OPTForCausalLM(config), lora_config=lora, critic=critic).eval()
    assert model.value_head.in_features == 16
    batch = RolloutTensors.build([[5, 6, 7], [8, 9]], [[10, 11], [12]], pad_id=1)
    assert model.values(batch).shape == batch.response_mask.shape


def _records(stage_dir):
    return [json.loads(line) for line in StageDir(stage_dir).metrics.read_text().splitlines()]


@pytest.fixture(scope="module")
def ppo_run(tmp_path_factory):
    directory = tmp_path_factory.mktemp("ppo")
    path = write_recipe(directory, {**TINY_RECIPE, "stages": [TINY_RECIPE["stages"][0], PPO]})
    runner = Runner(load_recipe(path), runs_dir=directory / "runs", recipe_path=path, in_process=True)
    return runner, {o.name: o for o in runner.run()}, path


def test_ppo_stage_logs_every_step_and_the_over_optimisation_points(ppo_run):
    runner, outcomes, _ = ppo_run
    assert outcomes["ppo"].action == "ran"
    records = _records(runner.run_dir / "ppo")
    steps = [r for r in records if "step" in r]
    evals = [r for r in records if "eval_step" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    for r in steps:
        assert STEP_KEYS <= set(r)
        assert r["reward/proxy"] == pytest.approx(r["reward/gold"])  # source: gold
        assert 0 <= r["policy/clip_fraction"] <= 1
    assert [e["eval_step"] for e in evals] == [0, 2, 4]
    assert evals[0]["kl"] == 0.0  # before any update the policy is the reference
    assert all(e["reward_penalty"] == "mean" and e["penalised_reward"] == e["proxy_reward"] for e in evals)
    assert all(e["kl_k3"] >= 0 for e in evals)
    stage = StageDir(runner.run_dir / "ppo")
    assert (stage.checkpoint / "model.safetensors").exists()
    assert stage.read_manifest()["summary"]["iterations"] == 4


def test_stored_gao_fit_follows_the_reports_rule():
    """The manifest's gao_rl_fit and the report's fitted curve come from the same evaluations by the same rule: none
    from two points with d > 0 (any two are matched exactly), Gao's coefficients from three."""
    from alignpipe.evaluation.best_of_n import gold_rl
    from alignpipe.evaluation.report_plots import ppo_curve
    from alignpipe.trainers.ppo import _gao_fit

    d = [0.0, 0.5, 1.5, 2.5]
    gold = (0.4 + gold_rl(d, 0.3, 0.2)).tolist()
    evaluations = [{"eval_step": 5 * i, "gold_reward": g, "kl": x * x, "sqrt_kl": x} for i, (x, g) in
                   enumerate(zip(d, gold))]
    assert _gao_fit(evaluations[:3]) is None and ppo_curve("ppo", evaluations[:3]).fit is None
    stored, drawn = _gao_fit(evaluations), ppo_curve("ppo", evaluations).fit
    assert (stored["alpha"], stored["beta"]) == (pytest.approx(0.3), pytest.approx(0.2))
    assert (drawn.alpha, drawn.beta) == (pytest.approx(stored["alpha"]), pytest.approx(stored["beta"]))
    assert stored["peak_sqrt_kl"] == pytest.approx(math.exp(0.3 / 0.2 - 1))


def test_ppo_resume_gives_the_uninterrupted_weights(ppo_run, tmp_path):
    reference_runner, _, path = ppo_run
    runs = tmp_path / "runs"
    shutil.copytree(reference_runner.run_dir, runs / "tiny")
    ppo = StageDir(runs / "tiny" / "ppo")
    assert (ppo.trainer / "checkpoint-2" / "trainer_state.json").exists()
    shutil.rmtree(ppo.checkpoint)  # as if killed after the step-2 save
    ppo.update_manifest(status="running")
    runner = Runner(load_recipe(path), runs_dir=runs, recipe_path=path, in_process=True, resume=True)
    outcomes = {o.name: o for o in runner.run()}
    assert outcomes["ppo"].action == "resumed"
    expected = load_file(StageDir(reference_runner.run_dir / "ppo").checkpoint / "model.safetensors")
    resumed = load_file(ppo.checkpoint / "model.safetensors")
    assert expected.keys() == resumed.keys()
    for name, tensor in expected.items():
        assert torch.equal(resumed[name], tensor), name
    steps = [r["step"] for r in _records(ppo.root) if "step" in r]
    assert steps == [1, 2, 3, 4]  # the redone steps replace, not duplicate, the interrupted ones


def test_ppo_recipe_errors(tmp_path):
    def load(stage):
        return load_recipe(write_recipe(tmp_path, {**TINY_RECIPE, "stages": [TINY_RECIPE["stages"][0], stage]}))

    with pytest.raises(RecipeError, match="reward.source: model needs 2 inputs"):
        load({**PPO, "reward": {"source": "model"}})
    with pytest.raises(RecipeError, match="with full fine-tuning"):
        load({**PPO, "lora": None})
    with pytest.raises(RecipeError, match="multiple of mini_batch_size"):
        load({**PPO, "mini_batch_size": 5})
    with pytest.raises(RecipeError, match="penalties combine ensemble members"):
        load({**PPO, "reward": {"source": "gold", "penalty": "min"}})
    with pytest.raises(RecipeError, match="package.module:function"):
        load({**PPO, "reward": {"source": "callable"}})
    with pytest.raises(RecipeError, match="rollout_batch_size: advantages are whitened .* set rollout_batch_size >= 2"):
        load({**PPO, "rollout_batch_size": 1, "mini_batch_size": 1})


@pytest.mark.parametrize("layout", [{"critic": "model"}, {"critic": "model", "lora": None}])
def test_ppo_full_weights_are_refused_in_half_precision_and_load_in_float32_under_auto(tmp_path, monkeypatch,
                                                                                      layout):
    """The loop steps weights in the dtype they load in: full weights in bf16 would round most AdamW steps away. An
    explicit bf16 is refused when the recipe loads; auto (bf16 on a capable GPU) loads them in float32."""
    import alignpipe.models.loading as loading
    from alignpipe.models.loading import policy_dtype

    def recipe(dtype, ppo_layout=layout):
        return load_recipe(write_recipe(tmp_path, {**TINY_RECIPE, "model": {**TINY_RECIPE["model"], "dtype": dtype},
                                                   "stages": [TINY_RECIPE["stages"][0], {**PPO, **ppo_layout}]}))

    with pytest.raises(RecipeError, match="barely move, silently; set model.dtype: auto or float32"):
        recipe("bfloat16")
    monkeypatch.setattr(loading, "bf16_supported", lambda: True)
    stage = recipe("auto").stage(PPO["name"])
    assert stage.trains_full_weights
    assert policy_dtype("auto", full_weights=stage.trains_full_weights) == torch.float32
    # the default layout trains LoRA adapters and the value head, which stay in float32 over a bf16 base
    lean = recipe("auto", ppo_layout={}).stage(PPO["name"])
    assert policy_dtype("auto", full_weights=lean.trains_full_weights) == torch.bfloat16


def test_model_critic_with_a_lora_policy_is_a_plain_copy_of_the_start_decoder(tokenizer):
    start = build_tiny_model(tokenizer, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64,
                             max_position_embeddings=128, seed=0)
    model = ActorCritic(start, lora_config=_lora(), critic="model")
    assert not any("lora_" in n for n, _ in model.critic_backbone.named_parameters())
    assert all(p.requires_grad for p in model.critic_backbone.parameters())


@pytest.mark.parametrize("temperature", [1.0, 0.5, 2.0])
def test_rollout_logprobs_are_those_of_the_tempered_sampler(tokenizer, temperature):
    """PPO samples at the stage's temperature, so the ratio and the KL must score that distribution: the log-probs
    of the sampled tokens equal the sampler's own (``softmax(logits / T)``), not the untempered policy's."""
    from alignpipe.evaluation.generation import render_prompts

    model = build_tiny_model(tokenizer, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64,
                             max_position_embeddings=128, seed=0).eval()
    rendered = render_prompts(tokenizer, ["sort: 3 1 2", "copy: 4 5 6 7"])
    tokenizer.padding_side = "left"
    encoded = tokenizer(rendered, return_tensors="pt", padding=True, add_special_tokens=False)
    torch.manual_seed(0)
    out = model.generate(**encoded, do_sample=True, temperature=temperature, top_k=0, top_p=1.0, max_new_tokens=8,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                         output_scores=True, return_dict_in_generate=True)
    sampled = out.sequences[:, encoded["input_ids"].shape[1]:]
    sampler = torch.stack([torch.log_softmax(step.float(), -1).gather(-1, sampled[:, i:i + 1]).squeeze(-1)
                           for i, step in enumerate(out.scores)], dim=1)
    responses = [row[:row.index(tokenizer.eos_token_id) + 1] if tokenizer.eos_token_id in row else row
                 for row in sampled.tolist()]
    batch = RolloutTensors.build([tokenizer(t, add_special_tokens=False)["input_ids"] for t in rendered], responses,
                                 tokenizer.pad_token_id)
    with torch.no_grad():
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                       position_ids=batch.position_ids).logits
    logp, _ = response_logprobs(logits, batch, temperature)
    mask = batch.response_mask
    torch.testing.assert_close(logp * mask, sampler[:, :mask.shape[1]] * mask, atol=1e-4, rtol=0)


class _State:
    """A KL controller's or reward source's stand-in: a dict it saves and loads."""

    def __init__(self, state: dict) -> None:
        self.state = state

    def state_dict(self) -> dict:
        return dict(self.state)

    def load_state_dict(self, state: dict) -> None:
        self.state = dict(state)


def test_ppo_state_resumes_on_a_multi_process_cpu_device(tmp_path):
    """A multi-process CPU launch's device is ``cpu:0``, which ``torch.load`` cannot map to: every --resume of a ppo
    stage under --cpu --processes 2 failed loading its optimizer. The state goes to the CPU first and the optimizer
    puts it by its parameters."""
    from types import SimpleNamespace

    from alignpipe.trainers.ppo import PPOLoop, RunningMoments

    def loop(device: torch.device) -> SimpleNamespace:
        weight = torch.nn.Parameter(torch.ones(3))
        return SimpleNamespace(model=SimpleNamespace(trainable_parameters=lambda: [weight]), device=device,
                               optimizer=torch.optim.AdamW([weight], lr=0.1), step=0, kl=_State({"coef": 0.05}),
                               reward=_State({"running_std": 0.0}), score_moments=RunningMoments())

    saved = loop(torch.device("cpu"))
    saved.model.trainable_parameters()[0].grad = torch.tensor([1.0, -2.0, 3.0])
    saved.optimizer.step()
    saved.step, saved.kl.state, saved.reward.state = 7, {"coef": 0.07}, {"running_std": 0.3}
    saved.score_moments.combine(4, 1.5, 2.0)
    PPOLoop.save_state(saved, tmp_path)

    resumed = loop(torch.device("cpu", 0))
    PPOLoop.load_state(resumed, tmp_path)
    assert torch.equal(resumed.model.trainable_parameters()[0], saved.model.trainable_parameters()[0])
    ours, theirs = resumed.optimizer.state_dict()["state"][0], saved.optimizer.state_dict()["state"][0]
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert (resumed.step, resumed.kl.state, resumed.reward.state) == (7, {"coef": 0.07}, {"running_std": 0.3})
    assert vars(resumed.score_moments) == vars(saved.score_moments)
