"""Where things sit in a transformer backbone, found without per-architecture code: the layer stack, the modules to
adapt inside it, the final norm and output projection beside it, the width of ``last_hidden_state``, where position
ids start, which forward arguments it takes, and pooling. Used by :class:`alignpipe.rewards.ensemble.RewardEnsemble`,
whose module docstring explains the shared trunk they make possible."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    from alignpipe.rewards.ensemble import EnsembleSpec

_FINAL_NORM_NAMES = ("norm", "final_layer_norm", "final_layernorm", "ln_f", "final_norm")
_OUTPUT_PROJECTION_NAMES = ("project_out",)  # after the final norm: OPT when word_embed_proj_dim != hidden_size


def _find_layer_stack(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The transformer layer list: the shallowest ``ModuleList`` with ``num_hidden_layers`` entries (``layers``
    on Llama, ``encoder.layer`` on BERT, ``h`` on GPT-2); the largest ``ModuleList`` if the config has no count."""
    config = getattr(model, "config", None)
    n_layers = getattr(config, "num_hidden_layers", None) if config is not None else None
    candidates = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
    if n_layers is not None:
        exact = [(name, m) for name, m in candidates if len(m) == n_layers]
        if exact:
            return min(exact, key=lambda c: c[0].count("."))
    if not candidates:
        raise ValueError(f"cannot find the transformer layer stack (no nn.ModuleList) in {type(model).__name__}")
    return max(candidates, key=lambda c: (len(c[1]), -c[0].count(".")))


def _is_linear(module: nn.Module) -> bool:
    if isinstance(module, nn.Linear):
        return True
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover
        return False
    return isinstance(module, Conv1D)


def _resolve_target_modules(model: nn.Module, spec: EnsembleSpec) -> list[str]:
    """Explicit full names of the modules to adapt: ``spec.target_modules`` restricted to the selected layers."""
    stack_name, layers = _find_layer_stack(model)
    n_layers = len(layers)
    if spec.top_layers is not None and spec.top_layers > n_layers:
        raise ValueError(f"top_layers={spec.top_layers} but the backbone has only {n_layers} layers")
    first = 0 if spec.top_layers is None else n_layers - spec.top_layers
    targets = spec.target_modules
    names: list[str] = []
    linear_names: set[str] = set()
    for i in range(first, n_layers):
        for sub, module in layers[i].named_modules():
            if not sub:
                continue
            full = f"{stack_name}.{i}.{sub}" if stack_name else f"{i}.{sub}"
            if _is_linear(module):
                linear_names.add(sub)
            if targets == "all-linear":
                hit = _is_linear(module)
            elif isinstance(targets, str):
                hit = re.fullmatch(targets, full) is not None
            else:
                hit = any(sub == t or sub.endswith("." + t) or full == t for t in targets)
            if hit:
                names.append(full)
    if not names:
        raise ValueError(
            f"target_modules={targets!r} matches no module in layers {first}..{n_layers - 1} of "
            f"{type(model).__name__}; linear modules there: {sorted(linear_names)}"
        )
    return names


def _position_offset(model: nn.Module) -> int:
    """The position id of a sequence's first token: ``padding_idx + 1`` on encoders whose embeddings number positions
    with transformers' ``create_position_ids_from_input_ids`` (RoBERTa, XLM-R, CamemBERT, MPNet, ...), else 0. Their
    learned position table is indexed from there, so positions counted from 0 would shift every token."""
    import sys

    numbering = "create_position_ids_from_input_ids"  # a method on some, a function of the model's module on others
    for module in model.modules():
        padding_idx = getattr(module, "padding_idx", None)
        table = getattr(module, "position_embeddings", None)
        from_padding = hasattr(module, numbering) or hasattr(sys.modules.get(type(module).__module__), numbering)
        if isinstance(padding_idx, int) and isinstance(table, nn.Embedding) and from_padding:
            return padding_idx + 1
    return 0


def _accepts(module: nn.Module, name: str) -> bool:
    import inspect

    try:
        return name in inspect.signature(module.forward).parameters
    except (TypeError, ValueError):  # pragma: no cover
        return False


def _beside_stack(model: nn.Module, stack_name: str, names: Sequence[str]) -> nn.Module | None:
    """The first module called one of ``names`` on the module that holds the layer stack (None if there is none)."""
    parent = model.get_submodule(stack_name.rsplit(".", 1)[0]) if "." in stack_name else model
    for name in names:
        module = getattr(parent, name, None)
        if isinstance(module, nn.Module):
            return module
    return None


def _hidden_size(model: nn.Module) -> int:
    """The width of ``last_hidden_state``, which the heads read: the output projection's (OPT-350m projects its 1024
    hidden features to 512) or else the config's hidden size."""
    projection = _beside_stack(model, _find_layer_stack(model)[0], _OUTPUT_PROJECTION_NAMES)
    if isinstance(getattr(projection, "out_features", None), int):
        return projection.out_features
    config = model.config
    hidden = getattr(config, "hidden_size", None)
    if hidden is None and hasattr(config, "get_text_config"):
        hidden = getattr(config.get_text_config(), "hidden_size", None)
    if isinstance(hidden, int):
        return hidden
    raise ValueError(f"cannot read the hidden size from {type(config).__name__}")


def _pool(hidden: Tensor, attention_mask: Tensor, pooling: str) -> Tensor:
    """``[N, T, H]`` → ``[N, H]`` in float32; padding-side agnostic (the mask decides which tokens count)."""
    mask = attention_mask.to(hidden.device).long()
    rows = torch.arange(hidden.shape[0], device=hidden.device)
    if pooling == "last":
        positions = torch.arange(mask.shape[1], device=hidden.device).unsqueeze(0)
        index = (positions * mask).argmax(dim=1)  # last non-pad position
        return hidden[rows, index].float()
    if pooling == "cls":
        return hidden[rows, mask.argmax(dim=1)].float()  # first non-pad position
    if pooling == "mean":
        keep = mask.bool().unsqueeze(-1)
        # masked_fill, not a multiply: pad positions can hold NaN/inf in some attention kernels.
        summed = hidden.float().masked_fill(~keep, 0.0).sum(dim=1)
        return summed / keep.sum(dim=1).clamp(min=1).float()
    raise ValueError(f"unknown pooling {pooling!r}")
