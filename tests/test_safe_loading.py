"""Safe loading, kept that way by reading the source tree: no pickle-based loading of untrusted files, YAML only
through a SafeLoader, remote code only when a recipe turns it on; published checkpoints are safetensors only."""

from __future__ import annotations

import ast
import dataclasses
import json
import logging
import sys

import pytest
import yaml
from conftest import REPO, TINY_RECIPE, write_recipe

SOURCES = sorted(p for folder in ("src", "pipelines", "benchmarks", "eval") for p in (REPO / folder).rglob("*.py"))


def _calls(name: str):
    """(file, call node) for every call of ``<something>.<name>(...)`` or ``name(...)`` in the source tree."""
    for path in SOURCES:
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Call):
                func = node.func
                called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
                if called == name:
                    yield path.relative_to(REPO), node


def _keyword(node: ast.Call, name: str):
    return next((k.value for k in node.keywords if k.arg == name), None)


def test_the_source_tree_was_read() -> None:
    assert len(SOURCES) > 50 and any(p.name == "ppo.py" for p in SOURCES)


def test_torch_load_is_always_weights_only() -> None:
    bad = [f"{path}:{node.lineno}" for path, node in _calls("load")
           if isinstance(node.func, ast.Attribute) and getattr(node.func.value, "id", None) == "torch"
           and not (isinstance(v := _keyword(node, "weights_only"), ast.Constant) and v.value is True)]
    assert not bad, f"torch.load without weights_only=True at {bad}"


def test_no_pickle_and_yaml_only_through_a_safe_loader() -> None:
    from alignpipe.strict_yaml import _StrictLoader

    assert issubclass(_StrictLoader, yaml.SafeLoader)
    for path in SOURCES:
        tree = ast.parse(path.read_text())
        imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import | ast.ImportFrom)
                    for alias in (node.names if isinstance(node, ast.Import) else [ast.alias(node.module or "")])}
        assert not imported & {"pickle", "dill", "cloudpickle", "joblib"}, f"{path} imports a pickle library"
    for path, node in _calls("load"):
        if isinstance(node.func, ast.Attribute) and getattr(node.func.value, "id", None) == "yaml":
            loader = _keyword(node, "Loader")
            assert isinstance(loader, ast.Name) and loader.id == "_StrictLoader", f"yaml.load at {path}:{node.lineno}"
    for path, node in _calls("unsafe_load"):
        pytest.fail(f"yaml.unsafe_load at {path}:{node.lineno}")


def test_remote_code_is_never_switched_on_in_code() -> None:
    """Only the recipe's model.trust_remote_code (through loading.remote_code_kwargs) may turn it on."""
    for path in SOURCES:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.keyword) and node.arg == "trust_remote_code":
                assert not (isinstance(node.value, ast.Constant) and node.value.value is True), path


def test_every_loader_of_a_recipe_model_follows_the_remote_code_policy() -> None:
    """The functions that load a recipe's (possibly hub) policy, tokenizer or reward backbone pass the policy on;
    the other from_pretrained calls read files alignpipe wrote itself (checkpoints, adapters, GGUF conversions)."""
    import inspect

    from alignpipe.models import loading, quantization
    from alignpipe.rewards import ensemble, ensemble_scorer, single

    loaders = [loading.load_tokenizer, loading.load_causal_lm, ensemble._load_backbone,
               ensemble_scorer.EnsembleScorer.for_ensemble, single.train_single_reward_model]
    assert [f.__qualname__ for f in loaders if "remote_code_kwargs()" not in inspect.getsource(f)] == []
    assert "load_tokenizer(" in inspect.getsource(single._load_tokenizer)  # through the checked loader
    assert "load_causal_lm(" in inspect.getsource(quantization.merge_adapters_in_full_precision)


def test_the_recipe_switch_is_off_by_default_and_logged_when_on(tmp_path, caplog) -> None:
    from alignpipe.models import loading
    from alignpipe.recipe import load_recipe

    assert load_recipe(write_recipe(tmp_path, TINY_RECIPE)).model.trust_remote_code is False
    assert loading.remote_code_kwargs() == {"trust_remote_code": False}
    try:
        with caplog.at_level(logging.WARNING, logger="alignpipe"):
            loading.allow_remote_code(True)
        assert loading.remote_code_kwargs() == {"trust_remote_code": True}
        assert "model.trust_remote_code is on" in caplog.text
    finally:
        loading.allow_remote_code(False)


def test_published_checkpoints_hold_no_pickle_files(completed_tiny_run) -> None:
    runner, _ = completed_tiny_run
    checkpoints = [d for d in runner.run_dir.rglob("checkpoint") if d.is_dir()]
    assert checkpoints
    pickled = [p for d in checkpoints for p in d.rglob("*") if p.suffix in {".bin", ".pt", ".pth", ".pkl"}]
    assert not pickled, pickled
    assert all(any(d.rglob("*.safetensors")) for d in checkpoints)


# --------------------------------------------------------------------------------------------------------------------
# A custom-code policy through the trainers: the recipe's switch reaches the TRL configs
# --------------------------------------------------------------------------------------------------------------------

CUSTOM_MODEL_TYPE = "alignpipe_test_remote_llama"
CUSTOM_MODEL_CODE = f"""from transformers import LlamaConfig, LlamaForCausalLM


class RemoteLlamaConfig(LlamaConfig):
    model_type = "{CUSTOM_MODEL_TYPE}"


class RemoteLlamaForCausalLM(LlamaForCausalLM):
    config_class = RemoteLlamaConfig
"""


@pytest.fixture
def custom_code_checkpoint(tmp_path, monkeypatch, tokenizer):
    """A tiny Llama saved with its classes beside the weights (``auto_map``) under a model type transformers does not
    know, so only ``trust_remote_code`` loads it. Its code is imported from a modules cache under ``tmp_path`` (not
    ~/.cache), which transformers puts on ``sys.path`` for the test only."""
    from transformers import dynamic_module_utils

    from alignpipe.models.tiny import build_tiny_model, save_tiny_checkpoint

    monkeypatch.setattr(dynamic_module_utils, "HF_MODULES_CACHE", str(tmp_path / "hf-modules"))
    monkeypatch.setattr(sys, "path", list(sys.path))
    model = build_tiny_model(tokenizer, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64,
                             max_position_embeddings=128, seed=0)
    path = save_tiny_checkpoint(model, tokenizer, tmp_path / "custom_code_llama")
    (path / "modeling_remote_llama.py").write_text(CUSTOM_MODEL_CODE)
    config = json.loads((path / "config.json").read_text())
    config.update(model_type=CUSTOM_MODEL_TYPE, architectures=["RemoteLlamaForCausalLM"], auto_map={
        "AutoConfig": "modeling_remote_llama.RemoteLlamaConfig",
        "AutoModelForCausalLM": "modeling_remote_llama.RemoteLlamaForCausalLM"})
    (path / "config.json").write_text(json.dumps(config))
    return path


def test_dpo_trainer_builds_the_reference_of_a_custom_code_policy(custom_code_checkpoint, tmp_path, monkeypatch,
                                                                  tokenizer) -> None:
    """The dpo stage's default (full weights, no ref_model): TRL loads the reference itself from the policy's path,
    with its config's trust_remote_code, so the recipe's switch must reach the config (the default False refused
    the checkpoint: "contains custom code which must be executed")."""
    from datasets import Dataset
    from trl import DPOConfig

    from alignpipe.models import loading
    from alignpipe.pipeline.rundir import StageDir
    from alignpipe.pipeline.stage import StageContext
    from alignpipe.recipe import Recipe
    from alignpipe.tasks.synthetic import preference_pairs
    from alignpipe.trainers.common import trainer_arguments
    from alignpipe.trainers.soft_dpo import SoftPreferenceDPOTrainer

    path = str(custom_code_checkpoint)
    recipe = Recipe.model_validate({**TINY_RECIPE, "model": {"name_or_path": path, "trust_remote_code": True}})
    stage = recipe.stage("dpo")
    assert stage.lora is None
    ctx = StageContext(recipe=recipe, stage=stage, dir=StageDir(tmp_path / "run" / "dpo"), run_dir=tmp_path / "run",
                       base=path, inputs={"sft": path}, resume_from=None)
    monkeypatch.setattr(loading, "_trust_remote_code", True)  # what the stage process sets from the recipe
    policy = loading.load_causal_lm(path, dtype="float32")
    assert type(policy).__name__ == "RemoteLlamaForCausalLM"

    pairs = Dataset.from_list(preference_pairs(4, 0, noise=0.5, temperature=0.1))
    trainer = SoftPreferenceDPOTrainer(model=policy, args=DPOConfig(**trainer_arguments(ctx), beta=stage.beta),
                                       train_dataset=pairs, processing_class=tokenizer)
    assert type(trainer.ref_model).__name__ == "RemoteLlamaForCausalLM"
    assert trainer.ref_model is not trainer.model


def test_every_config_built_from_trainer_arguments_takes_trust_remote_code() -> None:
    """``trainer_arguments`` passes trust_remote_code to every TRL config built from it without asking: each must
    have the field (a TRL upgrade that drops one would otherwise fail every stage of that type)."""
    from trl import DPOConfig, GRPOConfig, RLOOConfig, SFTConfig

    for config_class in (SFTConfig, DPOConfig, GRPOConfig, RLOOConfig):
        assert "trust_remote_code" in {f.name for f in dataclasses.fields(config_class)}, config_class.__name__
