"""The few collective operations our own training loops (PPO, the reward ensemble) and the online rounds' sampling
need across data-parallel ranks.

Why by hand: TRL trainers get data parallelism from accelerate's wrapped model and sampler; our loops call several
methods of one model (policy, critic, reference, ensemble members), which DDP's forward hook does not cover. So they
keep one replica per rank, split their batch, and average gradients over the process group that ``accelerate
launch`` set up (``alignpipe.pipeline.stage.init_distributed``). In one process every function here is the identity.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    return rank() == 0


def from_main(value: T) -> T:
    """Rank 0's ``value`` on every rank. Callers compute it on rank 0 only (``x() if is_main() else None``) when the
    computation has side effects on shared files, such as setting a corrupt checkpoint aside: one rank acts, and the
    others wait here for its answer instead of racing it."""
    if not is_distributed():
        return value
    box = [value if is_main() else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def shard(items: Sequence[T], *, what: str = "items") -> list[T]:
    """This rank's contiguous share of ``items``; the split must be exact so every rank does the same work."""
    n, w, r = len(items), world_size(), rank()
    if n % w:
        raise ValueError(f"{n} {what} do not split evenly over {w} processes; use a multiple of {w}")
    size = n // w
    return list(items[r * size:(r + 1) * size])


def collective_device(tensor: torch.Tensor) -> torch.device:
    """Where the process group can reduce ``tensor``: NCCL (GPU launches) takes CUDA tensors only, gloo (CPU
    launches) CPU ones, so statistics built on the CPU must travel; a mixed group ("cuda:nccl,cpu:gloo") takes
    either, so the tensor stays where it is."""
    backend = str(dist.get_backend())
    if backend == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    if backend == "gloo":
        return torch.device("cpu")
    return tensor.device


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Element-wise sum over ranks (a new tensor on the input's device; the input is left alone)."""
    out = tensor.detach().clone()
    if is_distributed():
        on_wire = out.to(collective_device(out))
        dist.all_reduce(on_wire, op=dist.ReduceOp.SUM)
        out = on_wire.to(tensor.device)
    return out


def all_gather_stack(tensor: torch.Tensor) -> torch.Tensor:
    """Every rank's ``tensor`` (one shape on all ranks), stacked in rank order: ``[world, *shape]`` on the input's
    device; ``[1, *shape]`` in one process. For state that differs by rank and must be saved whole (RNG states)."""
    if not is_distributed():
        return tensor.detach().clone().unsqueeze(0)
    on_wire = tensor.detach().to(collective_device(tensor)).contiguous()
    gathered = [torch.empty_like(on_wire) for _ in range(world_size())]
    dist.all_gather(gathered, on_wire)
    return torch.stack(gathered).to(tensor.device)


def all_gather_objects(value: T) -> list[T]:
    """Every rank's ``value`` (any picklable object) in rank order, on every rank; ``[value]`` in one process. For
    work split by rank whose result every rank needs whole (the online rounds' samples)."""
    if not is_distributed():
        return [value]
    gathered: list = [None] * world_size()
    dist.all_gather_object(gathered, value)
    return gathered


def all_reduce_mean(values: dict[str, float]) -> dict[str, float]:
    """Mean of each scalar over ranks (for logged statistics: every rank then logs the same numbers)."""
    if not is_distributed() or not values:
        return dict(values)
    keys = sorted(values)
    total = all_reduce_sum(torch.tensor([float(values[k]) for k in keys], dtype=torch.float64))
    return {k: float(v) / world_size() for k, v in zip(keys, total)}


def average_gradients(parameters: Iterable[torch.nn.Parameter]) -> None:
    """Replace every gradient by its mean over ranks (one flat all-reduce), so all replicas take the same step."""
    if not is_distributed():
        return
    params = [p for p in parameters if p.requires_grad]
    for p in params:  # every rank must contribute the same layout, even for parameters this step did not touch
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    if not params:
        return
    flat = torch.cat([p.grad.reshape(-1) for p in params])
    on_wire = flat.to(collective_device(flat))  # the same tensor (no copy) when it already lives there
    dist.all_reduce(on_wire, op=dist.ReduceOp.SUM)
    flat = on_wire.to(flat.device) / world_size()
    offset = 0
    for p in params:
        n = p.grad.numel()
        p.grad.copy_(flat[offset:offset + n].view_as(p.grad))
        offset += n


def barrier() -> None:
    if is_distributed():
        dist.barrier()
