"""Publishing a trained policy under DeepSpeed ZeRO-3, where each rank's module holds only empty placeholders.

The real ZeRO-3 run needs GPUs (tests/test_gpu.py runs one); here a trainer whose accelerator reports ZeRO stage 3
hands over the gathered state dict, and the module's own weights are emptied the way ZeRO-3 leaves them.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from alignpipe.models.whole_weights import zero3_partitioning_off
from alignpipe.pipeline.rundir import StageDir
from alignpipe.trainers.common import publish_model, zero3_state_dict


def _trainer(model, *, zero_stage: int | None, gathered: dict | None = None):
    plugin = None if zero_stage is None else SimpleNamespace(zero_stage=zero_stage)
    accelerator = SimpleNamespace(
        state=SimpleNamespace(deepspeed_plugin=plugin),
        wait_for_everyone=lambda: None,
        unwrap_model=lambda m: m,
        get_state_dict=lambda wrapped: gathered,
    )
    engine = SimpleNamespace(module=model)  # what DeepSpeed wraps the model in once training starts
    return SimpleNamespace(accelerator=accelerator, model=model, model_wrapped=engine)


def _ctx(tmp_path: Path, start_model: str):
    model_spec = SimpleNamespace(dtype="float32", gguf_file=None, quantization=None)
    return SimpleNamespace(dir=StageDir(tmp_path / "stage"), start_model=start_model, is_main_process=True,
                           stage=SimpleNamespace(inputs=["sft"]), recipe=SimpleNamespace(model=model_spec))


def _empty_like_zero3(model) -> None:
    """What ZeRO-3 leaves in the module: every parameter a tensor of size 0 (its real values live in shards)."""
    for p in model.parameters():
        p.data = torch.empty(0, dtype=p.dtype)


def test_only_zero_stage_3_gathers():
    model = torch.nn.Linear(2, 2)
    assert zero3_state_dict(_trainer(model, zero_stage=None)) is None
    assert zero3_state_dict(_trainer(model, zero_stage=2, gathered={"x": torch.ones(1)})) is None
    assert zero3_state_dict(_trainer(model, zero_stage=3, gathered={"x": torch.ones(1)})) == {"x": torch.ones(1)}
    never_trained = _trainer(model, zero_stage=3, gathered={"x": torch.ones(1)})
    never_trained.model_wrapped = model  # no engine started (resume at the last step): the weights are whole
    assert zero3_state_dict(never_trained) is None


def test_a_full_model_is_published_from_the_gathered_weights(llama_path, tokenizer, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(llama_path, dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01)  # "trained": differs from the start model
    gathered = {k: v.clone() for k, v in model.state_dict().items()}
    _empty_like_zero3(model)

    published = publish_model(_trainer(model, zero_stage=3, gathered=gathered), tokenizer, _ctx(tmp_path, llama_path))
    weights = load_file(published / "model.safetensors")
    assert weights and all(w.numel() > 0 for w in weights.values())
    for name, w in weights.items():
        torch.testing.assert_close(w, gathered[name])
    assert AutoModelForCausalLM.from_pretrained(published) is not None


def test_lora_adapters_are_merged_into_a_reload_of_the_start_model(llama_path, tokenizer, tmp_path):
    torch.manual_seed(0)
    config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(llama_path, dtype=torch.float32), config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)  # a trained adapter (B starts at zero)
    gathered = {k: v.clone() for k, v in model.state_dict().items()}
    reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(llama_path, dtype=torch.float32),
                                          _saved_adapter(model, tmp_path)).merge_and_unload().state_dict()
    _empty_like_zero3(model)

    published = publish_model(_trainer(model, zero_stage=3, gathered=gathered), tokenizer, _ctx(tmp_path, llama_path))
    weights = load_file(published / "model.safetensors")
    assert not any("lora" in k for k in weights)
    q_proj = [k for k in weights if "q_proj" in k]
    assert q_proj
    base = load_file(Path(llama_path) / "model.safetensors")
    assert not torch.equal(weights[q_proj[0]], base[q_proj[0]])  # the update is in
    for name, w in weights.items():
        torch.testing.assert_close(w, reference[name])



def test_a_first_stage_on_a_gguf_file_merges_its_adapters_into_a_plain_reload(gguf_model, tokenizer, tmp_path):
    """A first stage on a recipe's ``model.gguf_file`` (LoRA under ZeRO-3, or QLoRA) merges into a reload of that file:
    transformers keeps its GGUF quantizer on the reload, which ``save_pretrained`` refused ("quantized with gguf and
    is not serializable"), so the stage failed at its very end."""
    from alignpipe.models.loading import load_causal_lm

    folder, name = str(gguf_model.parent), gguf_model.name
    torch.manual_seed(0)
    config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0)
    model = get_peft_model(load_causal_lm(folder, dtype="float32", gguf_file=name), config)  # load_start_model's
    with torch.no_grad():
        for parameter_name, p in model.named_parameters():
            if "lora_B" in parameter_name:
                p.normal_(0, 0.05)
    gathered = {k: v.clone() for k, v in model.state_dict().items()}
    reference = PeftModel.from_pretrained(load_causal_lm(folder, dtype="float32", gguf_file=name),
                                          _saved_adapter(model, tmp_path)).merge_and_unload().state_dict()
    _empty_like_zero3(model)
    ctx = _ctx(tmp_path, folder)
    ctx.stage.inputs, ctx.recipe.model.gguf_file = [], name

    published = publish_model(_trainer(model, zero_stage=3, gathered=gathered), tokenizer, ctx)
    weights = load_file(published / "model.safetensors")
    assert weights.keys() == reference.keys() - {"lm_head.weight"}  # tied to the embeddings, saved once
    for parameter_name, w in weights.items():
        torch.testing.assert_close(w, reference[parameter_name])
    assert "quantization_config" not in AutoModelForCausalLM.from_pretrained(published).config.to_dict()


def _saved_adapter(model, tmp_path: Path) -> str:
    directory = tmp_path / "adapter"
    model.save_pretrained(directory)
    return str(directory)



def test_models_used_outside_the_trainer_load_whole_in_a_zero3_process(zero3_run, llama_path, tokenizer, tmp_path):
    """Round policies, per-round evaluation, reward models and judges load whole in a ZeRO-3 stage process (on a GPU
    they came back as empty placeholders: merging failed, sampling raised), and the run's DeepSpeed hook stays."""
    from transformers import AutoModelForSequenceClassification
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

    from alignpipe.models.loading import load_causal_lm
    from alignpipe.rewards.ensemble import EnsembleSpec, RewardEnsemble
    from alignpipe.rewards.loading import load_reward_scorer
    from alignpipe.rewards.single import save_single_reward_model

    expected = load_file(Path(llama_path) / "model.safetensors")
    policy = load_causal_lm(llama_path, dtype="float32")
    for name, w in policy.state_dict().items():
        if name in expected:
            torch.testing.assert_close(w, expected[name])
    assert is_deepspeed_zero3_enabled()

    ensemble = RewardEnsemble.create(EnsembleSpec(backbone=llama_path, members=2, lora_r=2, top_layers=1, seed=0))
    assert all(p.numel() > 0 for p in ensemble.parameters())
    assert is_deepspeed_zero3_enabled()

    with zero3_partitioning_off():  # saving a reward model is the reward stage's job, which DeepSpeed never runs
        classifier = AutoModelForSequenceClassification.from_pretrained(llama_path, num_labels=1)
        directory = save_single_reward_model(classifier, tokenizer, tmp_path / "rm")
    scorer = load_reward_scorer(directory)
    assert all(p.numel() > 0 for p in scorer.model.parameters())
    assert is_deepspeed_zero3_enabled()


def test_lora_adapters_merge_into_a_whole_reload_in_a_zero3_process(zero3_run, llama_path, tokenizer, tmp_path):
    """The reload LoRA adapters are merged into is whole (on a GPU: 'size of tensor a (0) must match')."""
    torch.manual_seed(0)
    with zero3_partitioning_off():
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(llama_path, dtype=torch.float32),
                               LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    gathered = {k: v.clone() for k, v in model.state_dict().items()}
    _empty_like_zero3(model)

    published = publish_model(_trainer(model, zero_stage=3, gathered=gathered), tokenizer, _ctx(tmp_path, llama_path))
    weights = load_file(published / "model.safetensors")
    base = load_file(Path(llama_path) / "model.safetensors")
    assert weights.keys() == base.keys() and all(w.shape == base[k].shape for k, w in weights.items())
    assert any(not torch.equal(w, base[k]) for k, w in weights.items())
