"""Tests for alignpipe.models.tiny (local tokenizer + random-init Llama) and alignpipe.models.loading."""

import shutil
import warnings

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainingArguments

from alignpipe.models.loading import (
    activation_checkpointing_argument,
    load_causal_lm,
    load_tokenizer,
    resolve_bf16,
    resolve_dtype,
)
from alignpipe.models.tiny import (
    ASSISTANT,
    CHAT_TEMPLATE,
    EOS,
    PAD,
    USER,
    build_tiny_model,
    save_tiny_checkpoint,
    train_tokenizer,
)
from alignpipe.tasks.synthetic import heldout_tasks, sample_tasks, tokenizer_corpus

SHAPE = dict(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, max_position_embeddings=128)
VOCAB = 160
CONVERSATION = [{"role": "user", "content": "sort: 3 1 4"}, {"role": "assistant", "content": "1 3 4"}]


def _tokenizer():
    return train_tokenizer(tokenizer_corpus(n=400), vocab_size=VOCAB)


@pytest.fixture(scope="module")
def tokenizer():
    return _tokenizer()


@pytest.fixture(scope="module")
def model(tokenizer):
    return build_tiny_model(tokenizer, **SHAPE, seed=0)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tokenizer, model):
    return save_tiny_checkpoint(model, tokenizer, tmp_path_factory.mktemp("tiny") / "ckpt")


# ------------------------------------------------------------------------------------------------ tokenizer


def test_tokenizer_special_tokens(tokenizer):
    assert tokenizer.eos_token == EOS and tokenizer.pad_token == PAD
    assert tokenizer.eos_token_id != tokenizer.pad_token_id
    assert tokenizer.padding_side == "left"
    # each special token is a single id
    for tok in (USER, ASSISTANT, EOS, PAD):
        assert len(tokenizer(tok, add_special_tokens=False)["input_ids"]) == 1
    assert len(tokenizer) <= VOCAB


def test_tokenizer_round_trips_task_texts(tokenizer):
    texts = []
    for task in heldout_tasks(50, 0) + sample_tasks(50, 1):
        texts += [task.prompt, " ".join(task.target())]
    texts += ["count 3: 3 1 3", "27", "0 0 7", "1 2 3 4 5 6 7 8 9 10 11"]
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert tokenizer.unk_token_id not in ids, text
        assert tokenizer.decode(ids) == text


def test_chat_template_renders_conversation(tokenizer):
    rendered = tokenizer.apply_chat_template(CONVERSATION, tokenize=False)
    assert rendered == "<|user|>sort: 3 1 4<|end|><|assistant|>1 3 4<|end|>"
    system = [{"role": "system", "content": "be brief"}] + CONVERSATION
    assert tokenizer.apply_chat_template(system, tokenize=False) == (
        "<|system|>be brief<|end|><|user|>sort: 3 1 4<|end|><|assistant|>1 3 4<|end|>"
    )


def test_generation_prompt_ends_with_assistant_tag(tokenizer):
    rendered = tokenizer.apply_chat_template(CONVERSATION[:1], tokenize=False, add_generation_prompt=True)
    assert rendered == "<|user|>sort: 3 1 4<|end|><|assistant|>"
    ids = tokenizer.apply_chat_template(CONVERSATION[:1], add_generation_prompt=True, return_dict=True)["input_ids"]
    assert ids[-1] == tokenizer.convert_tokens_to_ids(ASSISTANT)


def test_assistant_mask_covers_exactly_response_and_final_eos(tokenizer):
    out = tokenizer.apply_chat_template(CONVERSATION, return_dict=True, return_assistant_tokens_mask=True)
    ids, mask = list(out["input_ids"]), list(out["assistant_masks"])
    prefix = list(tokenizer.apply_chat_template(CONVERSATION[:1], add_generation_prompt=True,
                                                return_dict=True)["input_ids"])
    response = tokenizer("1 3 4", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert ids == prefix + response
    assert mask == [0] * len(prefix) + [1] * len(response)
    masked = [i for i, m in zip(ids, mask) if m]
    assert tokenizer.decode(masked) == "1 3 4<|end|>"


def test_assistant_mask_multi_turn(tokenizer):
    conv = CONVERSATION + [{"role": "user", "content": "sum: 2 3"}, {"role": "assistant", "content": "5"}]
    out = tokenizer.apply_chat_template(conv, return_dict=True, return_assistant_tokens_mask=True)
    masked = [i for i, m in zip(out["input_ids"], out["assistant_masks"]) if m]
    eos = tokenizer.eos_token_id
    expected = (tokenizer("1 3 4", add_special_tokens=False)["input_ids"] + [eos]
                + tokenizer("5", add_special_tokens=False)["input_ids"] + [eos])
    assert masked == expected
    # the user's <|end|> tokens are not trained on
    assert sum(1 for i, m in zip(out["input_ids"], out["assistant_masks"]) if i == eos and not m) == 2


# ------------------------------------------------------------------------------------------------ model


def test_build_tiny_model_is_seeded(tokenizer, model):
    again = build_tiny_model(tokenizer, **SHAPE, seed=0)
    other = build_tiny_model(tokenizer, **SHAPE, seed=1)
    a, b, c = model.state_dict(), again.state_dict(), other.state_dict()
    assert a.keys() == b.keys() == c.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["model.embed_tokens.weight"], c["model.embed_tokens.weight"])


def test_build_tiny_model_config(tokenizer, model):
    cfg = model.config
    assert cfg.vocab_size == len(tokenizer)
    assert model.get_input_embeddings().weight.shape == (len(tokenizer), 32)
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.intermediate_size) == (32, 2, 2, 64)
    assert cfg.pad_token_id == tokenizer.pad_token_id
    assert cfg.eos_token_id == tokenizer.eos_token_id
    assert model.generation_config.eos_token_id == tokenizer.eos_token_id
    assert model.generation_config.pad_token_id == tokenizer.pad_token_id
    # tied embeddings: the LM head is the embedding matrix
    assert model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    ids = torch.tensor([tokenizer("sort: 3 1 4", add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        assert model(input_ids=ids).logits.shape == (1, ids.shape[1], len(tokenizer))


# ------------------------------------------------------------------------------------------------ save / load


def test_checkpoint_files_are_safetensors(checkpoint):
    names = {p.name for p in checkpoint.iterdir()}
    assert "model.safetensors" in names
    assert "config.json" in names
    assert not {n for n in names if n.endswith((".bin", ".pt", ".pth"))}


def test_save_load_round_trip(checkpoint, tokenizer, model):
    loaded_tok = AutoTokenizer.from_pretrained(checkpoint)
    loaded = AutoModelForCausalLM.from_pretrained(checkpoint)
    texts = [t.prompt for t in heldout_tasks(6, 0)] + ["1 3 4", "27"]
    for text in texts:
        assert loaded_tok(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert loaded_tok.chat_template == CHAT_TEMPLATE
    assert loaded_tok.apply_chat_template(CONVERSATION, tokenize=False) == (
        "<|user|>sort: 3 1 4<|end|><|assistant|>1 3 4<|end|>"
    )
    assert loaded_tok.eos_token_id == tokenizer.eos_token_id and loaded_tok.pad_token_id == tokenizer.pad_token_id

    rendered = [tokenizer.apply_chat_template([{"role": "user", "content": t}], tokenize=False,
                                              add_generation_prompt=True) for t in texts]
    batch = tokenizer(rendered, return_tensors="pt", padding=True, add_special_tokens=False)
    # padding_side is an attribute, not persisted by save_pretrained: plain AutoTokenizer reloads it as "right";
    # load_tokenizer (the path every stage uses) restores left padding, so batches match exactly.
    loaded_batch = load_tokenizer(str(checkpoint))(rendered, return_tensors="pt", padding=True,
                                                   add_special_tokens=False)
    assert torch.equal(batch["input_ids"], loaded_batch["input_ids"])
    assert torch.equal(batch["attention_mask"], loaded_batch["attention_mask"])
    assert batch["attention_mask"][:, -1].all() and not batch["attention_mask"][:, 0].all()  # left padded
    model.eval()
    loaded.eval()
    with torch.no_grad():
        expected = model(**batch).logits
        got = loaded(**batch).logits
    assert torch.equal(expected, got)


# ------------------------------------------------------------------------------------------------ loading


def test_load_tokenizer_pads_left(tmp_path):
    tok = _tokenizer()
    tok.padding_side = "right"
    tok.save_pretrained(tmp_path)
    assert AutoTokenizer.from_pretrained(tmp_path).padding_side == "right"
    loaded = load_tokenizer(str(tmp_path))
    assert loaded.padding_side == "left"
    assert loaded.pad_token == PAD
    assert loaded.chat_template == CHAT_TEMPLATE
    assert load_tokenizer(str(tmp_path), padding_side=None).padding_side == "right"  # reward models keep theirs


def test_load_tokenizer_without_chat_template_raises(tmp_path):
    tok = _tokenizer()
    tok.chat_template = None
    path = tmp_path / "no_template"
    tok.save_pretrained(path)
    with pytest.raises(ValueError, match="chat template") as info:
        load_tokenizer(str(path))
    assert str(path) in str(info.value)


def test_load_causal_lm_from_checkpoint(checkpoint, model):
    loaded = load_causal_lm(str(checkpoint), dtype="float32")
    assert loaded.dtype == torch.float32
    sd, ref = loaded.state_dict(), model.state_dict()
    assert all(torch.equal(sd[k], ref[k]) for k in ref)


def test_a_home_relative_path_loads_and_is_handed_to_the_stage_expanded(checkpoint, model, tmp_path, monkeypatch):
    """``~/ckpt`` passes the preflight and the runner's checks, so the runner must hand the stage that folder and
    the loaders must read it as one, not as a (malformed) hub id."""
    from alignpipe.models.loading import resolve_model_location
    from alignpipe.pipeline.runner import _local_model_location

    shutil.copytree(checkpoint, tmp_path / "ckpt")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert resolve_model_location("~/ckpt") == _local_model_location("~/ckpt") == str(tmp_path / "ckpt")
    assert load_tokenizer("~/ckpt").chat_template == CHAT_TEMPLATE
    loaded = load_causal_lm("~/ckpt", dtype="float32")
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in model.state_dict().items())


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU defaults")
def test_precision_defaults_on_cpu():
    assert resolve_bf16(None) is False
    assert resolve_bf16(False) is False
    assert resolve_dtype("auto") == torch.float32


@pytest.mark.parametrize("enabled", [True, False])
def test_checkpointing_argument_sets_the_flag_without_a_deprecation_warning(tmp_path, enabled):
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[],
                                 **activation_checkpointing_argument(enabled))
    assert args.gradient_checkpointing is enabled  # the name TRL and older code read


@pytest.mark.parametrize("full_weights, expected", [(True, torch.float32), (False, torch.bfloat16)])
def test_a_policy_whose_full_weights_train_loads_them_in_float32_under_auto_on_a_bf16_gpu(
        checkpoint, monkeypatch, full_weights, expected):
    """Neither transformers' Trainer nor the PPO loop keeps float32 masters: full weights loaded in bf16 were stepped
    in bf16, where most AdamW steps of about the learning rate round away. A LoRA stage keeps the lighter bf16 base
    (its adapters are float32 anyway); an explicit dtype is taken as given."""
    from types import SimpleNamespace

    import alignpipe.models.loading as loading
    from alignpipe.trainers.common import load_policy

    monkeypatch.setattr(loading, "bf16_supported", lambda: True)  # what `auto` sees on a capable GPU
    assert loading.policy_dtype("auto", full_weights=full_weights) == expected
    assert loading.policy_dtype("bfloat16", full_weights=True) == torch.bfloat16
    assert loading.policy_dtype("float32", full_weights=False) == torch.float32
    ctx = SimpleNamespace(recipe=SimpleNamespace(model=SimpleNamespace(dtype="auto", quantization=None)),
                          stage=SimpleNamespace(trains_full_weights=full_weights, lora=None),
                          dir=SimpleNamespace(name="sft"),
                          device=torch.device("cpu"))
    assert load_policy(ctx, str(checkpoint)).dtype == expected


def test_lora_on_an_input_embedding_the_output_head_shares_is_refused_before_training(checkpoint):
    """Merged for publishing, an adapter on either end of a tied matrix changes the other too, which training never
    saw."""
    from types import SimpleNamespace

    from alignpipe.recipe import LoraSpec
    from alignpipe.trainers.common import load_policy

    def ctx(targets):
        return SimpleNamespace(recipe=SimpleNamespace(model=SimpleNamespace(dtype="float32", quantization=None)),
                               stage=SimpleNamespace(trains_full_weights=False,
                                                     lora=LoraSpec(r=4, alpha=8, target_modules=targets)),
                               dir=SimpleNamespace(name="sft"), device=torch.device("cpu"))

    model = load_policy(ctx(["q_proj"]), str(checkpoint))
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight  # the tiny model ties them
    load_policy(ctx("all-linear"), str(checkpoint))
    for targets, module in ((["q_proj", "embed_tokens"], "model.embed_tokens"), (["model.embed_tokens"], None),
                            (["lm_head"], "lm_head")):
        with pytest.raises(ValueError, match=rf"stage 'sft': lora.target_modules adapts {module or targets[0]}, "
                                             r"which shares its matrix with the model's other end"):
            load_policy(ctx(targets), str(checkpoint))


def test_resolve_dtype_explicit():
    assert resolve_dtype("float32") == torch.float32
    assert resolve_dtype("bfloat16") == torch.bfloat16
    assert resolve_dtype("float16") == torch.float16


@pytest.fixture
def shipped_model_pkg(tmp_path, monkeypatch):
    """An importable package ``shipped_model_pkg`` whose ``model/`` folder holds HF files (here a config)."""
    package = tmp_path / "shipped_model_pkg"
    (package / "model").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "model" / "config.json").write_text("{}")
    monkeypatch.syspath_prepend(str(tmp_path))
    return package


def test_pypi_model_locations_resolve_to_the_package_model_folder(shipped_model_pkg):
    from alignpipe.models.loading import resolve_model_location

    package = shipped_model_pkg
    assert resolve_model_location("pypi:shipped_model_pkg") == str(package / "model")
    assert resolve_model_location("org/model-id") == "org/model-id"  # hub ids and paths pass through
    with pytest.raises(ValueError, match="no installed Python package 'not_installed_pkg'"):
        resolve_model_location("pypi:not_installed_pkg")


def test_pypi_model_locations_take_the_pypi_spelling_of_the_package_name(shipped_model_pkg):
    """``pypi:shipped-model-pkg`` (how PyPI and pip spell it) is the installed ``shipped_model_pkg``, as for
    ``model.gguf_package``; not a package the user is told to install."""
    from alignpipe.models.loading import resolve_model_location

    package = shipped_model_pkg
    assert resolve_model_location("pypi:shipped-model-pkg") == str(package / "model")
    assert resolve_model_location("pypi:shipped.model-pkg") == str(package / "model")
    assert resolve_model_location("pypi:Shipped-Model-Pkg") == str(package / "model")  # pip ignores case too
    with pytest.raises(ValueError, match="no installed Python package 'not_installed_pkg'.*not-installed-pkg"):
        resolve_model_location("pypi:not-installed-pkg")
