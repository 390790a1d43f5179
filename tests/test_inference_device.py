"""Models that sample or score outside a trainer go to the process's device (its GPU on a GPU machine).

``from_pretrained`` loads onto the CPU and generation runs where the weights are, so a loader that forgets the device
makes a GPU run sample on the CPU. The CPU suite has no GPU, so the ``meta`` device stands in for "a device other than
the CPU": every path below must end up there. tests/test_gpu.py checks the real CUDA case.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

META = torch.device("meta")


class _Sampled(Exception):
    """Raised by a stand-in for ``generate`` once it has seen where the model is."""


def _devices(model) -> set[str]:
    return {p.device.type for p in model.parameters()}


def _ctx(path: str, **extra) -> SimpleNamespace:
    from alignpipe.recipe import DataSpec

    recipe = SimpleNamespace(model=SimpleNamespace(dtype="float32", quantization=None, gguf_file=None),
                             data=DataSpec(), seed=0)
    return SimpleNamespace(**{"recipe": recipe, "device": META, "start_model": path,
                              "stage": SimpleNamespace(inputs=["sft"], lora=None, trains_full_weights=True),
                              "dir": SimpleNamespace(name="stage"), **extra})


def _spy_generate(seen: list):
    def fake_generate(model, tokenizer, prompts, settings, desc=None):
        seen.append(_devices(model))
        raise _Sampled

    return fake_generate


def test_load_causal_lm_puts_the_model_on_the_requested_device(llama_path):
    from alignpipe.models.loading import load_causal_lm

    assert _devices(load_causal_lm(llama_path, dtype="float32")) == {"cpu"}
    assert _devices(load_causal_lm(llama_path, dtype="float32", device=META)) == {"meta"}


def test_evaluation_models_load_on_the_process_device(llama_path, monkeypatch):
    from alignpipe.evaluation import harness

    monkeypatch.setattr(harness, "process_device", lambda: META)
    model, _ = harness.LazyModel(harness.Checkpoint("policy", llama_path), "float32").get()
    assert _devices(model) == {"meta"}
    pinned, _ = harness.LazyModel(harness.Checkpoint("policy", llama_path), "float32", device="cpu").get()
    assert _devices(pinned) == {"cpu"}


def test_online_rounds_sample_on_the_stage_device(llama_path, monkeypatch):
    from alignpipe.trainers import iterative

    seen = []

    def round_data(ctx, method, r, model, tokenizer):
        seen.append(_devices(model))
        raise _Sampled

    monkeypatch.setattr(iterative, "_round_data", round_data)
    with pytest.raises(_Sampled):
        iterative._run_round(_ctx(llama_path), method=None, r=0, policy_path=llama_path, reference_path=llama_path)
    assert seen == [{"meta"}]


def test_best_of_n_samples_on_the_stage_device(llama_path, monkeypatch):
    from alignpipe.trainers import bon

    seen = []
    monkeypatch.setattr(bon, "generate", _spy_generate(seen))
    ctx = _ctx(llama_path, inputs={"sft": llama_path}, stage=SimpleNamespace(inputs=["sft"], n_samples=2))
    with pytest.raises(_Sampled):
        bon._sample(ctx, ["sort: 3 1 2"], settings=None)
    assert seen == [{"meta"}]


def test_reward_stage_samples_its_policy_on_the_stage_device(llama_path, monkeypatch):
    from alignpipe.trainers import reward

    seen = []
    monkeypatch.setattr(reward, "generate", _spy_generate(seen))
    with pytest.raises(_Sampled):
        reward._policy_samples(_ctx(llama_path), scorer=None)
    assert seen == [{"meta"}]


def test_reward_scorers_load_on_the_process_device_unless_given_one(llama_path, monkeypatch, tmp_path):
    """load_reward_scorer's default device is the process's (suites pass none); a stage's own device is kept."""
    from alignpipe.rewards import loading as reward_loading
    from alignpipe.rewards.ensemble import EnsembleSpec, RewardEnsemble

    saved = RewardEnsemble.create(EnsembleSpec(backbone=llama_path, members=2, lora_r=4, lora_alpha=8, top_layers=1,
                                               seed=0)).save(tmp_path / "rm")
    monkeypatch.setattr(reward_loading, "process_device", lambda: META)
    assert _devices(reward_loading.load_reward_scorer(saved).ensemble) == {"meta"}
    assert _devices(reward_loading.load_reward_scorer(saved, device="cpu").ensemble) == {"cpu"}


@pytest.mark.parametrize("suite_kind", ["policy", "reward_models"])
def test_suite_reward_models_load_on_the_process_device(suite_kind, monkeypatch, tmp_path):
    """A suite's reward-model judge (policy suites) and the reward models it compares (reward suites) take
    load_reward_scorer's default device, the process's."""
    from alignpipe.rewards import loading as reward_loading
    from alignpipe.rewards.ensemble_files import ENSEMBLE_FORMAT, MANIFEST_FILE
    from alignpipe.rewards.ensemble_scorer import EnsembleScorer

    asked = []

    def fake_load(path, **kwargs):
        asked.append(kwargs.get("device"))
        raise _Sampled

    (tmp_path / MANIFEST_FILE).write_text(json.dumps({"format": ENSEMBLE_FORMAT}))
    monkeypatch.setattr(reward_loading, "process_device", lambda: META)
    monkeypatch.setattr(EnsembleScorer, "load", fake_load)
    with pytest.raises(_Sampled):
        if suite_kind == "policy":
            from alignpipe.evaluation import suites

            suites._judge(SimpleNamespace(judge="reward", name="s"), str(tmp_path), cache=None)
        else:
            from alignpipe.evaluation.reward_suite import run_reward_suite

            run_reward_suite(SimpleNamespace(pair_sources=[]), "hash", [("rm", str(tmp_path))])
    assert asked == [META]


def test_the_process_device_of_a_multi_process_cpu_launch_is_plain_cpu(monkeypatch):
    """accelerate gives each process of a multi-process CPU launch ``cpu:0``; torch.load cannot map to it and it
    compares unequal to ``cpu``, so the process device is plain ``cpu`` there (a GPU rank keeps its index)."""
    import accelerate

    from alignpipe.models.loading import process_device

    for given, expected in ((torch.device("cpu", 0), torch.device("cpu")), (torch.device("cuda", 1),
                                                                             torch.device("cuda", 1))):
        monkeypatch.setattr(accelerate, "PartialState", lambda given=given: SimpleNamespace(device=given))
        assert process_device() == expected
