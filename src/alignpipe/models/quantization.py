"""k-bit (bitsandbytes) loading for QLoRA-style training: the recipe's ``model.quantization`` as transformers sees it.

Why here: stages load their start model through :func:`alignpipe.models.loading.load_causal_lm`, so the mapping from
the recipe's :class:`~alignpipe.recipe.QuantizationSpec` to a ``BitsAndBytesConfig``, the preparation for training
and the CPU caveats of bitsandbytes live once. bitsandbytes is an optional dependency (``alignpipe[quant]``): it is
imported only when a quantized model is actually loaded.
"""

from __future__ import annotations

import importlib.util
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from transformers import BitsAndBytesConfig

if TYPE_CHECKING:
    from alignpipe.recipe import QuantizationSpec

INSTALL_HINT = "install it with `pip install 'alignpipe[quant]'` (or `pip install bitsandbytes`)"


def require_bitsandbytes() -> None:
    """Fail early, with the fix, when a recipe asks for quantization and bitsandbytes is missing."""
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ImportError(f"model.quantization needs the bitsandbytes package, which is not installed; {INSTALL_HINT}, "
                          "or drop model.quantization to train in full precision")


def compute_dtype(spec: QuantizationSpec) -> torch.dtype:
    """The torch dtype de-quantised weights are computed in (the spec's names are torch's own)."""
    return getattr(torch, spec.compute_dtype)


def bitsandbytes_config(spec: QuantizationSpec) -> BitsAndBytesConfig:
    """The transformers ``quantization_config`` for ``spec``: NF4/FP4 (QLoRA) or LLM.int8() weights.

    For 8 bits the 4-bit fields (``quant_type``, ``double_quant``, ``compute_dtype``) do not apply: LLM.int8()
    multiplies in int8 with fp16 outliers.
    """
    require_bitsandbytes()
    if spec.bits == 4:
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=spec.quant_type,
            bnb_4bit_use_double_quant=spec.double_quant,
            bnb_4bit_compute_dtype=compute_dtype(spec),
        )
    if spec.bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    raise ValueError(f"model.quantization.bits must be 4 or 8, got {spec.bits!r}")


def is_quantized(model) -> bool:
    """Whether ``model`` (a transformers model, or a PeftModel around one) holds k-bit quantized weights."""
    if getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False):
        return True
    config = getattr(model, "config", None)
    return getattr(config, "quantization_config", None) is not None


def keep_4bit_layers_differentiable(model) -> None:
    """Turn off bitsandbytes' CPU inference packing of 4-bit weights on every ``Linear4bit`` of ``model``.

    Why: bitsandbytes 0.50 repacks a 4-bit weight for its AVX512-bf16 CPU kernel the first time the layer runs in
    eval mode without gradients (e.g. while sampling). The repacked path (``gemv_4bit``) has no autograd kernel, so
    when training continues gradients stop flowing through that layer (LoRA adapters below it get none; torch
    only warns), and it requires ``in_features`` to be a multiple of the 64-value block (the tiny models crash).
    Only CPU inference speed is given up; GPU runs never take that path.
    """
    if importlib.util.find_spec("bitsandbytes") is None:
        return
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


def prepare_for_kbit_training(model, *, use_gradient_checkpointing: bool = False):
    """peft's ``prepare_model_for_kbit_training``: freeze the base, upcast norms/embeddings to fp32.

    ``use_gradient_checkpointing`` defaults to False (peft's default is True) because checkpointing is the stage's
    own choice (``gradient_checkpointing`` in its config, which TRL applies, enabling input gradients for PEFT
    itself); turning it on here would checkpoint every quantized run, including the tiny CPU runs that never want
    it (it only trades speed for memory).
    """
    from peft import prepare_model_for_kbit_training

    keep_4bit_layers_differentiable(model)
    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=use_gradient_checkpointing)


def merge_dtype(spec: QuantizationSpec | None) -> torch.dtype:
    """The precision a quantized run's adapters are merged (and its checkpoint saved) in.

    float32 on CPU: a LoRA update is small next to the weight it is added to, so merging in bf16 (8 mantissa bits)
    rounds much of it away, which is the very loss the full-precision merge avoids; CPUs have no fast bf16 matmul to
    gain, and later stages load with ``dtype: auto`` = float32 on CPU anyway. On a GPU the spec's ``compute_dtype``
    (bf16 for QLoRA): the precision the adapters were trained against, what a non-quantized LoRA run there merges
    in, and half the memory of float32 for the one full copy of a large model.
    """
    return compute_dtype(spec) if spec is not None and torch.cuda.is_available() else torch.float32


def merge_adapters_in_full_precision(model, base: str, *, dtype: torch.dtype, gguf_file: str | None = None,
                                     workdir: Path, state_dict: dict[str, torch.Tensor] | None = None):
    """Merge the LoRA adapters of ``model`` (a PeftModel on a k-bit base) into a full-precision copy of ``base``.

    Why not ``merge_and_unload`` on ``model`` itself: that adds each update to de-quantised weights and rounds the
    sum back to 4/8 bits, losing most of what was trained. Instead the adapters are saved (into a temporary folder
    under ``workdir``), ``base`` is reloaded un-quantized in ``dtype`` on the CPU, and the adapters are loaded onto
    and merged into it. Returns the plain transformers model, ready for ``save_pretrained``. ``state_dict`` gives the
    weights where ``model``'s own are not whole (DeepSpeed ZeRO-3 keeps only a slice per rank).

    The reload is :func:`~alignpipe.models.loading.load_causal_lm`'s, so a ``gguf_file`` base arrives de-quantised
    into an ordinary model: loaded as transformers gives it, it keeps a GGUF quantizer that makes the merged model
    refuse ``save_pretrained``.
    """
    from peft import PeftModel

    from alignpipe.models.loading import load_causal_lm

    workdir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=workdir, prefix=".adapter-") as adapter_dir:
        model.save_pretrained(adapter_dir, safe_serialization=True, state_dict=state_dict)
        full = load_causal_lm(base, dtype=dtype, gguf_file=gguf_file)
        merged = PeftModel.from_pretrained(full, adapter_dir).merge_and_unload()
    return merged
