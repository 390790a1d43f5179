"""Whole models from ``from_pretrained`` inside a DeepSpeed ZeRO-3 stage process."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def zero3_partitioning_off() -> Iterator[None]:
    """``from_pretrained`` builds whole modules inside this block, also in a process running DeepSpeed ZeRO-3.

    Why: once a ZeRO-3 run's training arguments exist, transformers' DeepSpeed hook (a module-level weak reference
    to the run's config) makes every ``from_pretrained`` construct its model under ``deepspeed.zero.Init``: each
    weight is then an empty placeholder outside the engine. Models used outside a trainer (a round's sampling
    policy, the per-round evaluation, judges and reward models, the reload that LoRA adapters are merged into) fail
    on it (``size of tensor a (0) must match``, ``Padding_idx must be within num_embeddings``; seen on an H100). A
    whole model handed to a trainer is still partitioned by DeepSpeed's engine when it starts. The hook has no
    public switch, so the reference is cleared and put back afterwards.
    """
    from transformers.integrations import deepspeed as hf_deepspeed

    hook = hf_deepspeed._hf_deepspeed_config_weak_ref
    hf_deepspeed.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = hook
