"""Real-model (GPU cluster) recipes: they validate, and their documented launch commands plan cleanly, without
loading any weights, tokenizer or dataset (none of which this machine could download anyway).

tests/test_recipe.py::test_shipped_recipes_validate already validates every recipe under recipes/; here the same set
is validated again with every weight, tokenizer and dataset loader made to fail, so validation provably stays
model-free, and the GPU recipes get their own checks.
"""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest
from conftest import REPO
from test_recipe import _shipped_recipes

from alignpipe.recipe import DPOStage, EvalStage, RewardStage, SFTStage, _TrainingStage, load_recipe

GPU_RECIPES = {
    "recipes/ultrafeedback/qwen2.5-0.5b-dpo.yaml": {"world_size": 8, "models": "Qwen/Qwen2.5-0.5B-Instruct"},
    "recipes/ultrafeedback/llama-3.1-8b-qlora-dpo.yaml": {"world_size": 16, "models": "meta-llama/Llama-3.1-8B-Instruct"},
    "recipes/hh-rlhf/qwen2.5-0.5b-sft-dpo.yaml": {"world_size": 8, "models": "Qwen/Qwen2.5-0.5B-Instruct"},
}


@pytest.fixture
def nothing_loads(monkeypatch):
    """Every way to fetch weights, a tokenizer or a dataset raises."""
    import datasets
    import transformers

    def refuse(*args, **kwargs):
        raise AssertionError(f"validation tried to load {args[:1]!r}")

    for name in ("AutoModelForCausalLM", "AutoModel", "AutoModelForSequenceClassification", "AutoTokenizer",
                 "AutoConfig"):
        monkeypatch.setattr(getattr(transformers, name), "from_pretrained", refuse)
    monkeypatch.setattr(datasets, "load_dataset", refuse)
    monkeypatch.setattr(datasets, "load_from_disk", refuse)


def test_the_guard_catches_loads(nothing_loads):
    from alignpipe.data.rows import load_rows
    from alignpipe.models.loading import load_causal_lm, load_tokenizer

    for load in (lambda: load_causal_lm("Qwen/Qwen2.5-0.5B-Instruct"), lambda: load_tokenizer("org/model"),
                 lambda: load_rows("org/dataset", "train", what="w", expected="e")):
        with pytest.raises(AssertionError, match="validation tried to load"):
            load()


def _is_hub_model(recipe) -> bool:
    model = recipe.model
    return model.name_or_path != "tiny" and not model.name_or_path.startswith("pypi:") and model.gguf_package is None


@pytest.mark.parametrize("path", _shipped_recipes(), ids=lambda p: str(p.relative_to(REPO / "recipes")))
def test_shipped_recipes_validate_without_loading_anything(path, nothing_loads):
    load_recipe(path)


def test_gpu_recipes_are_shipped_hub_model_recipes():
    shipped = {str(p.relative_to(REPO)): p for p in _shipped_recipes()}
    for relative in GPU_RECIPES:
        assert relative in shipped and _is_hub_model(load_recipe(shipped[relative])), relative


def _launch_commands(path: Path) -> list[list[str]]:
    """The `./launch.sh RECIPE ...` commands of a recipe's header comment, as argument lists after the recipe."""
    lines = [line[1:].strip() for line in path.read_text().splitlines() if line.startswith("#")]
    commands, pending = [], ""
    for line in lines:
        if pending or line.startswith("./launch.sh"):
            pending += " " + line.removesuffix("\\")
            if not line.endswith("\\"):
                commands.append(shlex.split(pending.replace("<node-0 host>", "10.0.0.1"), comments=True))
                pending = ""
    return commands


@pytest.mark.parametrize("relative", GPU_RECIPES)
def test_header_launch_commands_plan_cleanly(relative, nothing_loads, tmp_path, capsys):
    """Each documented command runs as a dry run (topology, batch split, accelerate command) and writes nothing."""
    from alignpipe.cli import main

    path = REPO / relative
    commands = _launch_commands(path)
    assert commands, f"{relative}: no ./launch.sh command in the header"
    world = GPU_RECIPES[relative]["world_size"]
    for command in commands:
        assert command[:2] == ["./launch.sh", relative], command
        assert main(["run", str(path), *command[2:], "--dry-run", "--runs-dir", str(tmp_path / "runs")]) == 0
        out = capsys.readouterr().out
        assert out.count("[dry-run]") == len(load_recipe(path).stages)
        assert f"--num_processes {world}" in out
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("relative", GPU_RECIPES)
def test_gpu_recipe_settings(relative, nothing_loads):
    from alignpipe.pipeline.launch_checks import plan_batches

    path = REPO / relative
    recipe = load_recipe(path)
    header = path.read_text().split("\nname:", 1)[0]
    assert "NOT run" in header and "Hardware:" in header and "./launch.sh" in header
    assert recipe.model.name_or_path == GPU_RECIPES[relative]["models"]
    assert not any(isinstance(s, EvalStage) for s in recipe.stages)  # the eval stage only knows the synthetic task
    assert "No eval stage" in header
    training = [s for s in recipe.stages if isinstance(s, _TrainingStage)]
    assert [type(s) for s in training] == [SFTStage, DPOStage]
    for stage in training:
        assert stage.bf16 is True and stage.gradient_checkpointing is True and stage.max_length == 1024
        assert stage.global_batch_size is not None
    sft, dpo = training
    assert sft.dataset.source != "synthetic" and dpo.dataset.source != "synthetic"
    assert dpo.inputs == [sft.name]
    # the documented cluster splits every global batch exactly (otherwise the run stops before any model loads)
    world = GPU_RECIPES[relative]["world_size"]
    assert all(f"x {world} processes" in line for line in plan_batches(recipe, world).values())


def test_ultrafeedback_recipes():
    qwen = load_recipe(REPO / "recipes/ultrafeedback/qwen2.5-0.5b-dpo.yaml")
    llama = load_recipe(REPO / "recipes/ultrafeedback/llama-3.1-8b-qlora-dpo.yaml")
    for recipe in (qwen, llama):
        sft, dpo = recipe.stage("sft"), recipe.stage("dpo")
        assert (sft.dataset.source, sft.dataset.path, sft.dataset.split) == (
            "ultrafeedback", "HuggingFaceH4/ultrafeedback_binarized", "train_sft")
        assert (dpo.dataset.source, dpo.dataset.path, dpo.dataset.split) == (
            "trl", "HuggingFaceH4/ultrafeedback_binarized", "train_prefs")
        assert sft.lora is not None and dpo.lora is not None
        assert (sft.global_batch_size, dpo.global_batch_size) == (128, 64)
    assert qwen.model.dtype == "bfloat16" and qwen.model.quantization is None
    reward = qwen.stage("reward")
    assert isinstance(reward, RewardStage) and reward.members == 5 and reward.inputs == ["sft"]
    assert (reward.dataset.source, reward.dataset.split) == ("trl", "train_prefs")
    assert llama.model.quantization is not None and llama.model.quantization.bits == 4
    assert all(s.lora.r == 16 for s in llama.stages if isinstance(s, _TrainingStage))
    assert llama.stage("sft").assistant_only_loss is False  # TRL 1.16 cannot patch Llama 3.1's template


def test_hh_rlhf_recipe():
    recipe = load_recipe(REPO / "recipes/hh-rlhf/qwen2.5-0.5b-sft-dpo.yaml")
    sft, dpo = recipe.stage("sft"), recipe.stage("dpo")
    assert (sft.dataset.source, sft.dataset.path) == ("hh_rlhf", "Anthropic/hh-rlhf")
    assert (dpo.dataset.source, dpo.dataset.path) == ("hh_rlhf", "Anthropic/hh-rlhf")
    assert recipe.model.dtype == "float32"  # full fine-tuning: float32 master weights under bf16 autocast
