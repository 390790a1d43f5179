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


def _saved_adapter(model, tmp_path: Path) -> str:
    directory = tmp_path / "adapter"
    model.save_pretrained(directory)
    return str(directory)

