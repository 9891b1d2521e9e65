"""Data-parallel DP training across processes (``torchrun --nproc_per_node N vision.py ...``), on Opacus's
distributed parts and ``torch.distributed``.

How one DP-SGD step is shared out, and why it is the single-process step over the union of the ranks' batches:
- sampling: the training set is split into fixed shards (example j to rank j mod N, independent of the
  data), and each rank keeps each example of its shard with the *global* sample rate q
  (Opacus's ``DistributedUniformWithReplacementSampler``). Every example is still in the step's batch
  independently with probability q, so the union is one Poisson batch of the whole set and the accountant
  is told (q, sigma) once per step, as in one process. Each rank draws from its own stream (the same stream
  on every rank would include examples j and j+1 together, which is not Poisson sampling);
- clipping: each rank clips its examples' gradients with its engine and sums them;
- noise: added once, by rank 0, with standard deviation sigma*C (Opacus's ``DistributedDPOptimizer`` family:
  the other ranks add none); the sum over ranks (all-reduce) is the sum of every clipped gradient plus one
  noise draw, divided by the global expected batch size;
- every rank then takes the same optimizer step, so the weights stay identical without a broadcast.

Rank 0 alone writes the run directory, checkpoints (which hold every rank's random streams) and wandb.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, List

import numpy as np
import torch
import torch.distributed as dist
from opacus.utils.uniform_sampler import DistributedUniformWithReplacementSampler
from torch.utils.data import DataLoader

from src.errors import UserError

# A rank that waits for another this long gives up instead of hanging (e.g. rank 0 failed writing a file).
COLLECTIVE_TIMEOUT = timedelta(minutes=30)


@dataclass(frozen=True)
class Ranks:
    """This process's place in a data-parallel run (torchrun's RANK, WORLD_SIZE, LOCAL_RANK); one process: 0 of 1."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """The process that writes files, prints and logs to wandb."""
        return self.rank == 0


SINGLE_PROCESS = Ranks()


def ranks_from_environment() -> Ranks:
    """The ranks torchrun (or any launcher setting its variables) gave this process."""
    try:
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    except ValueError:
        raise UserError("WORLD_SIZE, RANK and LOCAL_RANK must be integers (as torchrun sets them)") from None
    if world_size < 1 or not 0 <= rank < world_size:
        raise UserError(f"RANK {rank} is not a rank of WORLD_SIZE {world_size}")
    return Ranks(rank=rank, world_size=world_size, local_rank=local_rank)


def start(ranks: Ranks, device_name: str) -> None:
    """Join the process group: NCCL when training on CUDA, gloo on the CPU. No-op for one process."""
    if not ranks.distributed or dist.is_initialized():
        return
    on_cuda = device_name == "cuda" or (device_name == "auto" and torch.cuda.is_available())
    if on_cuda:
        torch.cuda.set_device(ranks.local_rank)
    dist.init_process_group(backend="nccl" if on_cuda else "gloo", timeout=COLLECTIVE_TIMEOUT)


def stop() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def current_ranks() -> Ranks:
    """The process group this process belongs to (one process when there is none)."""
    if not dist.is_initialized():
        return SINGLE_PROCESS
    return Ranks(rank=dist.get_rank(), world_size=dist.get_world_size(),
                 local_rank=int(os.environ.get("LOCAL_RANK", "0")))


def rank_stream(seed: int, ranks: Ranks) -> int:
    """Rank r's own stream of a run's seed: the seed itself in one process (runs unchanged), else child r."""
    if not ranks.distributed:
        return seed
    return int(np.random.SeedSequence([seed, ranks.rank]).generate_state(1)[0])


def broadcast(value: Any) -> Any:
    """Rank 0's ``value`` on every rank (a picklable object); the value itself in one process."""
    if not dist.is_initialized():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather(value: Any) -> List[Any]:
    """Every rank's ``value``, in rank order (a collective: every rank calls it at the same point)."""
    if not dist.is_initialized():
        return [value]
    values = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values


class PoissonShardSampler(DistributedUniformWithReplacementSampler):
    """Opacus's distributed Poisson sampler over a fixed shard (example j on rank j mod N), drawing exactly the
    plan's ``steps`` batches and yielding empty ones too: Opacus skips a rank's empty batch, which would leave
    the ranks a step apart and hang the next all-reduce."""

    def __init__(self, *, total_size: int, sample_rate: float, steps: int, generator: torch.Generator):
        super().__init__(total_size=total_size, sample_rate=sample_rate, shuffle=False, steps=steps,
                         generator=generator)

    @property
    def steps(self) -> int:  # the name src.checkpoint.resumed_sampling shortens a resumed epoch by
        return self.num_batches

    @steps.setter
    def steps(self, value: int) -> None:
        self.num_batches = value

    def __iter__(self):
        shard = torch.arange(self.rank, self.total_size, self.num_replicas)
        for _ in range(self.num_batches):
            keep = torch.rand(self.num_samples, generator=self.generator) < self.sample_rate
            yield shard[keep].tolist()


class ShardedPoissonLoader(DataLoader):
    """This rank's part of every Poisson batch, with the loader attributes the rest of the code reads
    (``sample_rate``, ``distributed``) like Opacus's ``DPDataLoader``."""

    def __init__(self, dataset, *, sample_rate: float, steps: int, generator: torch.Generator, collate_fn):
        sampler = PoissonShardSampler(total_size=len(dataset), sample_rate=sample_rate, steps=steps,
                                      generator=generator)
        super().__init__(dataset, batch_sampler=sampler, collate_fn=collate_fn)
        self.sample_rate = sample_rate
        self.distributed = True


def all_reduce_gradients(parameters) -> None:
    """Sum every parameter's ``.grad`` over the ranks (non-private training: each rank's loss is already its
    part of the global mean)."""
    for param in parameters:
        if param.grad is not None:
            dist.all_reduce(param.grad, op=dist.ReduceOp.SUM)
