"""Multi-process training under `torchrun`: process group from the environment, samplers, gathers.

A single process is the case world_size == 1 of the same code, so there is one training loop:
`torchrun --nproc_per_node 4 -m cxrlib train ...` and `python -m cxrlib train ...` differ only in
`setup()`. GPUs use NCCL, CPUs gloo. Every rank holds an identical model (DDP broadcasts rank 0's
weights at wrap time and averages gradients); only rank 0 writes files.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import Sampler

from .errors import CXRError


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits: rank among world_size processes, local_rank on its machine."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def setup(device: str = "auto") -> DistInfo:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT).

    Without WORLD_SIZE > 1 this is a no-op returning rank 0 of 1. NCCL when this process will use
    a GPU, gloo otherwise (CPU runs, and the CPU tests of the distributed path).
    """
    if dist.is_initialized():
        return current()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    local = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and device != "cpu"
    if use_cuda:
        torch.cuda.set_device(local)
    dist.init_process_group("nccl" if use_cuda else "gloo")
    return current()


def current() -> DistInfo:
    """This process's DistInfo (rank 0 of 1 when no process group is initialised)."""
    if not dist.is_initialized():
        return DistInfo()
    return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", dist.get_rank())))


def shutdown() -> None:
    """Leave the process group. The barrier first: gloo shutdown fails when ranks exit at different times."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def gather_objects(obj: Any) -> list[Any]:
    """`obj` of every rank, in rank order, on every rank ([obj] in a single process)."""
    if not dist.is_initialized():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def resolve_device(spec: str = "auto", info: DistInfo | None = None) -> torch.device:
    """auto -> this rank's GPU when there is one, else the CPU; "cuda" means this rank's GPU under torchrun.
    A GPU that is not here is a CXRError naming it and the GPUs there are, before any work."""
    info = info or current()
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    if not spec.startswith("cuda"):
        return torch.device(spec)
    count = torch.cuda.device_count()
    index = int(spec[5:]) if spec.startswith("cuda:") else info.local_rank if info.distributed else None
    if count == 0 or (index or 0) >= count:
        have = f"{count} CUDA GPU(s), cuda:0 to cuda:{count - 1}" if count else "no CUDA GPU"
        raise CXRError(f"device {spec!r} is not available: this machine has {have}; use --device auto or cpu")
    return torch.device("cuda", torch.cuda.current_device() if index is None else index)


class WeightedShardSampler(Sampler[int]):
    """Weighted sampling with replacement, sharded across ranks (the distributed weighted sampler).

    Every rank draws the same `num_samples` indices from (seed, epoch), then keeps every
    world_size-th one from its rank on, so the ranks together see exactly one weighted sample per
    epoch, as one process would. Call `set_epoch` each epoch, as with DistributedSampler.
    """

    def __init__(self, weights: Sequence[float] | torch.Tensor, num_samples: int, rank: int = 0,
                 world_size: int = 1, seed: int = 0):
        self.weights = torch.as_tensor(weights, dtype=torch.double)
        self.num_samples, self.rank, self.world_size, self.seed = int(num_samples), rank, world_size, seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return math.ceil(self.num_samples / self.world_size)

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        total = len(self) * self.world_size  # padded so every rank takes the same number of steps
        drawn = torch.multinomial(self.weights, total, replacement=True, generator=g)
        return iter(drawn[self.rank::self.world_size].tolist())


class ShardSampler(Sampler[int]):
    """Indices rank, rank + world_size, ... in order: evaluation shards, no padding, no shuffling."""

    def __init__(self, n: int, rank: int = 0, world_size: int = 1):
        self.indices = list(range(rank, n, world_size))

    def __len__(self) -> int:
        return len(self.indices)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)
