"""k-bit (bitsandbytes) loading and QLoRA stages on the tiny model, on CPU.

Covers: the recipe -> BitsAndBytesConfig mapping, k-bit loading (layer types, logits near full precision), a real
quantized SFT -> DPO run (adapters learn, frozen k-bit base untouched, 8-bit AdamW), and publishing full-precision
checkpoints that plain ``from_pretrained`` loads.
"""

from __future__ import annotations

import importlib.util
import json
import math
from types import SimpleNamespace

import pytest
import torch
from conftest import TINY_RECIPE, write_recipe
from safetensors.torch import load_file

from alignpipe.models.loading import load_causal_lm
from alignpipe.models.quantization import (
    bitsandbytes_config,
    is_quantized,
    merge_dtype,
    prepare_for_kbit_training,
)
from alignpipe.recipe import QuantizationSpec, RecipeError, load_recipe

bnb = pytest.importorskip("bitsandbytes")

LORA = {"r": 4, "alpha": 8, "dropout": 0.0}


def test_bitsandbytes_config_maps_every_field():
    config = bitsandbytes_config(QuantizationSpec(bits=4, quant_type="fp4", double_quant=False,
                                                  compute_dtype="float16"))
    assert config.load_in_4bit and not config.load_in_8bit
    assert config.bnb_4bit_quant_type == "fp4"
    assert config.bnb_4bit_use_double_quant is False
    assert config.bnb_4bit_compute_dtype == torch.float16

    qlora = bitsandbytes_config(QuantizationSpec())  # the defaults are QLoRA's
    assert qlora.load_in_4bit and qlora.bnb_4bit_quant_type == "nf4" and qlora.bnb_4bit_use_double_quant
    assert qlora.bnb_4bit_compute_dtype == torch.bfloat16
    assert bitsandbytes_config(QuantizationSpec(compute_dtype="float32")).bnb_4bit_compute_dtype == torch.float32

    int8 = bitsandbytes_config(QuantizationSpec(bits=8))
    assert int8.load_in_8bit and not int8.load_in_4bit


def test_missing_bitsandbytes_says_how_to_install_it(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "bitsandbytes" else real_find_spec(name, *a))
    with pytest.raises(ImportError, match=r"pip install 'alignpipe\[quant\]'"):
        bitsandbytes_config(QuantizationSpec())


def test_recipe_rejects_quantization_with_a_full_finetuning_stage(tmp_path):
    recipe = {**TINY_RECIPE, "model": {**TINY_RECIPE["model"], "quantization": {"bits": 4}},
              "stages": [TINY_RECIPE["stages"][0]]}
    with pytest.raises(RecipeError, match="this training stage needs a lora block"):
        load_recipe(write_recipe(tmp_path, recipe))


def test_a_gguf_file_is_refused_k_bit_before_it_is_read(gguf_model):
    """transformers cannot quantize a model it reads from a GGUF file: recipes refuse model.gguf_file with
    model.quantization (tests/bad_inputs/recipes/quantization_with_gguf_file.yaml), and the loader says so too."""
    from alignpipe.models.loading import ModelError

    with pytest.raises(ModelError, match=r"tiny\.gguf: a GGUF file cannot be loaded k-bit quantized; .*convert_gguf"):
        load_causal_lm(str(gguf_model.parent), gguf_file=gguf_model.name, quantization=QuantizationSpec())


def test_optimizer_arguments_pick_8bit_adamw_only_for_quantized_recipes():
    from alignpipe.trainers.common import optimizer_arguments

    def ctx(quantization):
        return SimpleNamespace(recipe=SimpleNamespace(model=SimpleNamespace(quantization=quantization)))

    assert optimizer_arguments(ctx(QuantizationSpec())) == {"optim": "adamw_bnb_8bit"}
    assert optimizer_arguments(ctx(QuantizationSpec(optimizer_8bit=False))) == {}
    assert optimizer_arguments(ctx(None)) == {}


@pytest.fixture(scope="module")
def token_batch(tokenizer):
    return tokenizer(["add 3 and 4", "sort the letters d b a c please"], return_tensors="pt", padding=True)


@pytest.fixture(scope="module")
def full_logits(llama_path, token_batch):
    model = load_causal_lm(llama_path, dtype="float32").eval()
    with torch.no_grad():
        return model(**token_batch).logits


# Measured on the tiny random-init Llama (hidden 32, logits' std ~0.12): 4-bit max |diff| ~0.07-0.08, mean
# ~0.013-0.018, cosine 0.983-0.991; 8-bit max ~0.004-0.006, mean ~0.0006, cosine 0.99998. 4 bits leave 16 levels
# per 64-value block, i.e. a weight error of several percent of the block's largest value, which compounds over
# the layers; the bounds below leave about 2x headroom over those numbers.
@pytest.mark.parametrize("spec, layer, max_diff, min_cosine", [
    (QuantizationSpec(bits=4), "Linear4bit", 0.2, 0.97),
    (QuantizationSpec(bits=4, quant_type="fp4", double_quant=False, compute_dtype="float32"), "Linear4bit", 0.2, 0.97),
    (QuantizationSpec(bits=8), "Linear8bitLt", 0.02, 0.9995),
], ids=["nf4-bf16", "fp4-fp32", "int8"])
def test_kbit_loading_gives_bitsandbytes_layers_and_close_logits(llama_path, token_batch, full_logits, spec, layer,
                                                                 max_diff, min_cosine):
    model = load_causal_lm(llama_path, quantization=spec).eval()
    assert is_quantized(model)
    assert not is_quantized(load_causal_lm(llama_path))
    kinds = {type(m).__name__ for name, m in model.named_modules() if name.endswith(("_proj",))}
    assert kinds == {layer}, kinds
    assert isinstance(model.model.layers[0].self_attn.q_proj, getattr(bnb.nn, layer))
    with torch.no_grad():  # eval + no_grad: the path where bitsandbytes would repack 4-bit weights on CPU
        logits = model(**{k: v.to(model.device) for k, v in token_batch.items()}).logits.float().cpu()
    mask = token_batch["attention_mask"].bool()
    diff = (logits - full_logits)[mask].abs()
    cosine = torch.nn.functional.cosine_similarity(logits[mask].flatten(), full_logits[mask].flatten(), dim=0)
    assert 0 < diff.max() < max_diff, diff.max()
    assert cosine > min_cosine, cosine


def test_4bit_lora_gets_gradients_after_an_eval_forward(llama_path, token_batch):
    """Sampling (eval, no grad) must not leave 4-bit layers on bitsandbytes' CPU kernel that has no backward."""
    from peft import LoraConfig, get_peft_model

    model = prepare_for_kbit_training(load_causal_lm(llama_path, quantization=QuantizationSpec(bits=4)))
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM"))
    batch = {k: v.to(model.device) for k, v in token_batch.items()}
    model.eval()
    with torch.no_grad():
        model(**batch)
    model.train()
    model(**batch, labels=batch["input_ids"]).loss.backward()
    lora_b = {n: p.grad for n, p in model.named_parameters() if "lora_B" in n}
    assert lora_b and all(g is not None and g.abs().sum() > 0 for g in lora_b.values()), \
        [n for n, g in lora_b.items() if g is None or not g.abs().sum()]
    assert not any(p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)


def _kbit_weights(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}


def _lora_weights(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().float().cpu() for n, p in model.named_parameters() if "lora_" in n}


@pytest.fixture(scope="module", params=[4, 8], ids=["nf4", "int8"])
def qlora_run(request, tmp_path_factory):
    """A real quantized SFT -> DPO run with LoRA, recording each trainer's weights before and after training."""
    import alignpipe.trainers.dpo as dpo_stage
    import alignpipe.trainers.sft as sft_stage
    from alignpipe.pipeline.runner import Runner

    records = {}

    def recording(train_and_publish, name):
        def wrapper(trainer, tokenizer, ctx):
            before = (_kbit_weights(trainer.model), _lora_weights(trainer.model))
            summary = train_and_publish(trainer, tokenizer, ctx)
            records[name] = SimpleNamespace(trainer=trainer, before=before,
                                            after=(_kbit_weights(trainer.model), _lora_weights(trainer.model)))
            return summary
        return wrapper

    directory = tmp_path_factory.mktemp("qlora")
    stages = [{**TINY_RECIPE["stages"][0], "max_steps": 4, "save_steps": 4, "logging_steps": 1, "lora": LORA},
              {**TINY_RECIPE["stages"][1], "max_steps": 4, "save_steps": 4, "logging_steps": 1, "lora": LORA}]
    recipe = {**TINY_RECIPE, "model": {**TINY_RECIPE["model"], "quantization": {"bits": request.param}},
              "stages": stages}
    path = write_recipe(directory, recipe)
    with pytest.MonkeyPatch.context() as patch:
        for module, name in ((sft_stage, "sft"), (dpo_stage, "dpo")):
            patch.setattr(module, "train_and_publish", recording(module.train_and_publish, name))
        runner = Runner(load_recipe(path), runs_dir=directory / "runs", in_process=True)
        outcomes = runner.run()
    assert [o.action for o in outcomes] == ["ran", "ran"]
    return runner, records, request.param


@pytest.mark.parametrize("stage", ["sft", "dpo"])
def test_qlora_stage_trains_the_adapters_only(qlora_run, stage):
    _, records, bits = qlora_run
    record = records[stage]
    model = record.trainer.model
    layer = bnb.nn.Linear4bit if bits == 4 else bnb.nn.Linear8bitLt
    assert is_quantized(model) and isinstance(model.base_model.model.model.layers[0].self_attn.q_proj.base_layer, layer)
    assert type(record.trainer.optimizer.optimizer).__module__.startswith("bitsandbytes")  # 8-bit AdamW, on CPU
    kbit_before, lora_before = record.before
    kbit_after, lora_after = record.after
    assert set(kbit_before) == set(kbit_after)
    assert all(torch.equal(kbit_before[n], kbit_after[n]) for n in kbit_before)  # k-bit base frozen
    changed = [n for n in lora_before if not torch.equal(lora_before[n], lora_after[n])]
    assert any("lora_A" in n for n in changed) and any("lora_B" in n for n in changed)
    losses = [e["loss"] for e in record.trainer.state.log_history if "loss" in e]
    assert len(losses) == 4 and all(math.isfinite(x) for x in losses)
    if stage == "dpo":  # the reference is the same k-bit weights with the adapters off: policy == reference at step 0
        assert abs(losses[0] - math.log(2)) < 0.01


@pytest.mark.parametrize("stage, start", [("sft", "base"), ("dpo", "sft")])
def test_qlora_publishes_a_full_precision_checkpoint(qlora_run, stage, start):
    from transformers import AutoModelForCausalLM

    from alignpipe.pipeline.rundir import StageDir

    runner, records, _ = qlora_run
    checkpoint = StageDir(runner.run_dir / stage).checkpoint
    config = json.loads((checkpoint / "config.json").read_text())
    assert "quantization_config" not in config
    assert not (checkpoint / "adapter_config.json").exists()
    assert not list(checkpoint.parent.glob(".adapter-*"))  # the temporary adapter folder is gone
    model = AutoModelForCausalLM.from_pretrained(checkpoint)
    assert not is_quantized(model) and type(model.model.layers[0].self_attn.q_proj) is torch.nn.Linear
    dtype = merge_dtype(QuantizationSpec())  # float32 on CPU, the compute dtype (bf16) on a GPU
    assert model.dtype == dtype

    # The published weights are the start model's full-precision weights plus exactly the trained LoRA update.
    published = load_file(checkpoint / "model.safetensors")
    base = load_file(StageDir(runner.run_dir / start).checkpoint / "model.safetensors")
    assert set(published) == set(base)
    lora = records[stage].after[1]
    scale = LORA["alpha"] / LORA["r"]
    for key in base:
        module = key.removesuffix(".weight")
        a = next((v for n, v in lora.items() if n.endswith(f"{module}.lora_A.default.weight")), None)
        if a is None:  # embeddings and norms: not adapted, the start model's (bit-for-bit in float32)
            assert torch.equal(published[key], base[key].to(dtype)), key
            continue
        b = next(v for n, v in lora.items() if n.endswith(f"{module}.lora_B.default.weight"))
        expected = base[key].to(dtype).float() + scale * b @ a
        if dtype == torch.float32:
            torch.testing.assert_close(published[key], expected, rtol=0, atol=1e-6)
        else:
            torch.testing.assert_close(published[key].float(), expected, rtol=1e-2, atol=1e-3)
    assert any(not torch.equal(published[k], base[k]) for k in base if k.endswith("q_proj.weight"))


def test_ppo_and_online_rounds_train_quantized_and_publish_full_precision(tmp_path):
    """model.quantization reaches every policy-training stage: PPO (policy + critic adapters on the k-bit base) and
    the online rounds (osp) train 4-bit and publish float32 checkpoints without a quantization_config."""
    from alignpipe.pipeline.runner import Runner

    sft = {**TINY_RECIPE["stages"][0], "max_steps": 4, "save_steps": 4, "lora": LORA}
    ppo = {"name": "ppo", "type": "ppo", "inputs": ["sft"], "reward": {"source": "gold"}, "total_steps": 2,
           "rollout_batch_size": 8, "mini_batch_size": 8, "ppo_epochs": 1, "learning_rate": 1e-3,
           "max_new_tokens": 6, "eval_every": 2, "eval_prompts": 8, "save_steps": 100, "lora": LORA}
    osp = {"name": "osp", "type": "osp", "inputs": ["sft"], "judge": "gold", "rounds": 1, "prompts_per_round": 8,
           "samples_per_prompt": 4, "learning_rate": 2e-3, "per_device_train_batch_size": 8, "max_length": 48,
           "max_new_tokens": 6, "eval_prompts": 8, "save_steps": 1000, "lora": LORA,
           "truncated_samples": "keep"}  # a 4-step SFT rarely ends a reply within 6 tokens; this is about 4-bit
    recipe = {**TINY_RECIPE, "model": {**TINY_RECIPE["model"], "quantization": {"bits": 4}},
              "stages": [sft, ppo, osp]}
    runner = Runner(load_recipe(write_recipe(tmp_path, recipe)), runs_dir=tmp_path / "runs", in_process=True)
    assert [o.action for o in runner.run()] == ["ran", "ran", "ran"]
    start = load_file(runner.run_dir / "sft" / "checkpoint" / "model.safetensors")
    for stage in ("ppo", "osp"):
        checkpoint = runner.run_dir / stage / "checkpoint"
        assert "quantization_config" not in json.loads((checkpoint / "config.json").read_text())
        weights = load_file(checkpoint / "model.safetensors")
        assert all(w.dtype == torch.float32 for w in weights.values())
        moved = max(float((weights[k] - start[k]).abs().max()) for k in start)
        assert moved > 0  # the adapters trained and were merged into the full-precision weights


def test_ppo_with_a_full_critic_model_is_refused_under_quantization(tmp_path):
    recipe = {**TINY_RECIPE, "model": {**TINY_RECIPE["model"], "quantization": {"bits": 4}},
              "stages": [{**TINY_RECIPE["stages"][0], "lora": LORA},
                         {"name": "ppo", "type": "ppo", "inputs": ["sft"], "reward": {"source": "gold"},
                          "critic": "model", "lora": LORA}]}
    with pytest.raises(RecipeError, match="stages.ppo.critic: critic: model trains a full copy of the decoder"):
        load_recipe(write_recipe(tmp_path, recipe))


def test_online_references_are_the_k_bit_start_model_as_in_round_0(tmp_path, monkeypatch):
    """Under QLoRA every reference of the rounds is loaded as the policy is (k-bit), so it is what round 0's reference
    (the policy's own base, adapters off) is: osp's round 1 (``reference: initial``) scores a sequence exactly as
    round 0's reference did, and INPO's anchor π_ref gives h = 0 at its first step, where π_θ = π_t = π_ref (§10e).
    Loaded in full precision they differed by the quantization error (h = −0.016 at step 1)."""
    import alignpipe.trainers.round_methods as round_methods
    from alignpipe.evaluation.generation import Generation
    from alignpipe.pipeline.runner import Runner

    scored = []

    class Scoring(round_methods.SoftPreferenceDPOTrainer):
        def __init__(self, *args, model, ref_model, processing_class, **kwargs):
            from alignpipe.evaluation.generation import sequence_logprobs

            reply = processing_class("7", add_special_tokens=False)["input_ids"] + [processing_class.eos_token_id]
            reference = ref_model if ref_model is not None else model  # round 0: TRL turns the adapters off
            scored.append(sequence_logprobs(reference, processing_class, [Generation("add 3 and 4", "7",
                                                                                     tuple(reply), False)])[0])
            super().__init__(*args, model=model, ref_model=ref_model, processing_class=processing_class, **kwargs)

    monkeypatch.setattr(round_methods, "SoftPreferenceDPOTrainer", Scoring)
    online = {"inputs": ["sft"], "judge": "gold", "prompts_per_round": 8, "samples_per_prompt": 4,
              "learning_rate": 2e-3, "per_device_train_batch_size": 8, "max_length": 48, "max_new_tokens": 6,
              "eval_prompts": 8, "save_steps": 1000, "logging_steps": 1, "lora": LORA, "truncated_samples": "keep"}
    stages = [{**TINY_RECIPE["stages"][0], "max_steps": 4, "save_steps": 4, "lora": LORA},
              {"name": "osp", "type": "osp", **online, "rounds": 2},
              {"name": "inpo", "type": "inpo", **online, "rounds": 1, "reference_mix": 1.0}]
    recipe = {**TINY_RECIPE, "model": {**TINY_RECIPE["model"], "quantization": {"bits": 4}}, "stages": stages}
    runner = Runner(load_recipe(write_recipe(tmp_path, recipe)), runs_dir=tmp_path / "runs", in_process=True)
    assert [o.action for o in runner.run()] == ["ran", "ran", "ran"]
    assert len(scored) == 2 and scored[1] == pytest.approx(scored[0], abs=1e-6), scored
    logged = [json.loads(line) for line in (runner.run_dir / "inpo" / "metrics.jsonl").read_text().splitlines()]
    first = next(entry for entry in logged if "inpo/h" in entry)
    assert first["step"] == 1 and first["inpo/h"] == pytest.approx(0.0, abs=1e-6)
    assert first["loss"] == pytest.approx((1 / 0.1 / 2) ** 2, abs=1e-4)  # (η/2)² with η = 1/β
