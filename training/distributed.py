"""Data-parallel training across processes (`torchrun`), shared by stages 2 and 3.

nanoGPT's pattern: a process started by `torchrun` finds RANK/WORLD_SIZE/LOCAL_RANK in its environment,
joins the process group (NCCL on CUDA, gloo on the CPU), trains its share of every global batch in a
DistributedDataParallel wrapper (gradients averaged across ranks), and only rank 0 logs and writes files;
the others wait at a barrier and read what it wrote. Without those variables nothing here starts a group, and
every helper falls back to the one-process answer, so a plain `python -m training.stageN` run is unchanged.

The global batch stays the configured one: each rank takes a contiguous `shard` of it, so 1 and N processes
see the same examples per optimiser step (their losses agree up to floating-point reduction order).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from datetime import timedelta
from typing import TypeVar

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

log = logging.getLogger(__name__)

T = TypeVar("T")
# Rank 0 fills the caches (image features, a stand-in LLM) while the other ranks wait at a barrier; NCCL's
# default 10 minutes would end them on a large cohort.
TIMEOUT = timedelta(hours=2)


def launched() -> bool:
    """Whether this process was started by torchrun (or srun with the same variables)."""
    return int(os.environ.get("RANK", -1)) != -1


def setup() -> bool:
    """Join the process group when launched by torchrun; True when this run is distributed.

    NCCL and one GPU per process (LOCAL_RANK) when CUDA is available, gloo on the CPU otherwise.
    """
    if not launched() or dist.is_initialized():
        return active()
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group(backend="nccl" if cuda else "gloo", timeout=TIMEOUT)
    log.info("distributed: rank %d of %d (%s)", dist.get_rank(), dist.get_world_size(), dist.get_backend())
    return True


def teardown() -> None:
    """Leave the process group (a no-op when none was joined)."""
    if dist.is_initialized():
        dist.destroy_process_group()


def active() -> bool:
    """Whether a process group with more than one rank is running."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    """Rank 0, the process that logs and writes checkpoints (always true without a group)."""
    return rank() == 0


def barrier() -> None:
    """Wait for every rank (e.g. until rank 0 has written a checkpoint the others will read)."""
    if active():
        dist.barrier()


def shard(items: Sequence[T], rank_: int | None = None, world: int | None = None) -> Sequence[T]:
    """This rank's contiguous share of a global batch; ranks in order concatenate back to `items`.

    The batch must split evenly, so every rank does the same work and the global batch is unchanged.
    """
    rank_ = rank() if rank_ is None else rank_
    world = world_size() if world is None else world
    if len(items) % world:
        raise ValueError(f"a batch of {len(items)} does not split evenly over {world} processes")
    per = len(items) // world
    return items[rank_ * per : (rank_ + 1) * per]


def share(items: Sequence[T], rank_: int | None = None, world: int | None = None) -> Sequence[T]:
    """This rank's contiguous share of a batch that need not split evenly (shares differ by at most one item;
    a rank's share is empty when the batch has fewer items than there are ranks)."""
    rank_ = rank() if rank_ is None else rank_
    world = world_size() if world is None else world
    return items[len(items) * rank_ // world : len(items) * (rank_ + 1) // world]


def sum_across(value: float) -> float:
    """The sum of a float over all ranks (the value itself without a group)."""
    if not active():
        return value
    total = torch.tensor([value], dtype=torch.float64, device=_collective_device())
    dist.all_reduce(total)
    return float(total.cpu())


def mean_across(value: float) -> float:
    """The mean of a float over all ranks, for logging a loss every rank measured on its own share."""
    return sum_across(value) / world_size()


def gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Every rank's `tensor` concatenated along dim 0 in rank order; gradients flow back to each rank's part.

    The backward sums the gradients of all ranks, and DDP then averages over ranks, so a loss every rank
    computes identically on the gathered batch trains as that loss would in one process.
    """
    if not active():
        return tensor
    return _GatherWithGrad.apply(tensor)


class _GatherWithGrad(torch.autograd.Function):
    """all_gather forward; backward sums the gathered gradient over ranks and keeps this rank's rows.

    (torch.distributed.nn.functional.all_gather does the same but is deprecated; gloo has no reduce-scatter.)
    Every rank's share must have the same number of rows.
    """

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, tensor.contiguous())
        ctx.rows = tensor.shape[0]
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        total = grad.contiguous().clone()
        dist.all_reduce(total)
        start = dist.get_rank() * ctx.rows
        return total[start : start + ctx.rows]


def wrap(module: nn.Module, device: torch.device, *, find_unused: bool = False) -> nn.Module:
    """`module` in DistributedDataParallel when distributed (itself otherwise).

    `find_unused`: some trainable parameters may get no gradient in a step (stage 3: an eye without OCT
    leaves the OCT projector idle), which DDP must be told about.
    """
    if not active():
        return module
    ids = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=ids, find_unused_parameters=find_unused)


def _collective_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
