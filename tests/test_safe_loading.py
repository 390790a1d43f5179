"""Safe loading, kept that way by reading the source tree: no pickle-based loading of untrusted files, YAML only
through a SafeLoader, remote code only when a recipe turns it on; published checkpoints are safetensors only."""

from __future__ import annotations

import ast
import logging

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
    from alignpipe.rewards import ensemble, single

    loaders = [loading.load_tokenizer, loading.load_causal_lm, ensemble._load_backbone,
               ensemble.EnsembleScorer.for_ensemble, single.train_single_reward_model]
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
