"""Several processes over one corpus: their environment, the process group, sharding and collectives.

Nothing here schedules work: the processes are started by cascadectl's own launcher (`--each --nproc N`, one
host: cascadectl/launch.py) or by `torchrun` (torch.distributed.run, any number of hosts), which both describe
each process in the same environment variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT), one process
per GPU (or per CPU slot); torch.distributed moves the results (NCCL on CUDA, gloo on CPU). Files are assigned
up front by size, so no rank waits on another until the final reduce and gather, and every rank reaches the
same collectives in the same order whatever happens to a single file.

    world = world_from_env()                      # rank 0 of 1 when started alone
    with process_group(world, device):            # no-op for one process
        shard = shard_by_size(sizes, world.size)[world.rank]
        ...
        totals = all_reduce_sums([...], world, device)
        rows = gather_to_main(my_rows, world)     # a list on rank 0, None elsewhere
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Iterator, Mapping, Sequence

import torch
import torch.distributed as dist

from .errors import CascadeError, ConfigError

# A rank that stops answering (killed, stuck on a device) fails the others after this long instead of never.
COLLECTIVE_TIMEOUT = timedelta(hours=2)


@dataclass(frozen=True)
class World:
    """This process's place among the workers (--nproc or torchrun); rank 0 of 1 when started alone."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0  # index among the processes of this machine: the GPU it uses

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def world_from_env(environ: Mapping[str, str] = os.environ) -> World:
    """The World described by WORLD_SIZE, RANK and LOCAL_RANK (absent: one process)."""
    try:
        size = int(environ.get("WORLD_SIZE", "1"))
        rank = int(environ.get("RANK", "0"))
        local_rank = int(environ.get("LOCAL_RANK", str(rank)))
    except ValueError as e:
        raise ConfigError(f"WORLD_SIZE, RANK and LOCAL_RANK must be integers (set by --nproc or torchrun): {e}") \
            from e
    if size < 1 or not 0 <= rank < size or local_rank < 0:
        raise ConfigError(f"inconsistent worker environment: RANK {rank}, LOCAL_RANK {local_rank}, WORLD_SIZE {size}")
    return World(rank, size, local_rank)


def rank_device(world: World, device: str) -> str:
    """`--device` for this rank: with several processes, CUDA means cuda:LOCAL_RANK, so each has its own GPU."""
    if not world.distributed:
        return device
    name = (device or "auto").strip().lower()
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return "cpu"
    if name not in ("auto", "cuda"):
        raise ConfigError(f"--device {device} pins one GPU, but with several processes each uses its own "
                          f"(cuda:LOCAL_RANK); use --device auto or cuda")
    if not torch.cuda.is_available():
        return name  # "cuda" without CUDA: the loader says so in its own words
    if world.local_rank >= torch.cuda.device_count():
        raise ConfigError(f"{world.local_rank + 1} processes on this host need as many GPUs, but "
                          f"{torch.cuda.device_count()} are visible; lower --nproc (torchrun: --nproc-per-node)")
    return f"cuda:{world.local_rank}"


@contextmanager
def process_group(world: World, device: torch.device) -> Iterator[None]:
    """The default process group for the duration (NCCL for CUDA devices, else gloo); destroyed on any exit."""
    if not world.distributed:
        yield
        return
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.set_device(device)  # NCCL's and gather_object's tensors go to the current device
    dist.init_process_group("nccl" if cuda else "gloo", rank=world.rank, world_size=world.size,
                            timeout=COLLECTIVE_TIMEOUT, device_id=device if cuda else None)
    try:
        yield
        # every rank done before any tears its connections down: without this, gloo ranks that finish first
        # sometimes abort at exit ("terminate called without an active exception") under torchrun
        dist.barrier()
    finally:
        dist.destroy_process_group()


def shard_by_size(sizes: Sequence[int], n: int) -> list[list[int]]:
    """Indices of `sizes` split over `n` ranks, greedy longest-processing-time: largest first, each to the rank
    with the least bytes so far (ties: the lower rank). Deterministic, so every rank computes the same split;
    each shard is returned in index order. The largest load is at most 4/3 of the best possible."""
    order = sorted(range(len(sizes)), key=lambda i: (-sizes[i], i))
    loads = [0] * n
    shards: list[list[int]] = [[] for _ in range(n)]
    for i in order:
        rank = min(range(n), key=lambda r: (loads[r], r))
        shards[rank].append(i)
        loads[rank] += sizes[i]
    return [sorted(shard) for shard in shards]


def all_reduce_sums(values: Sequence[float], world: World, device: torch.device) -> list[float]:
    """Element-wise sums of `values` over all ranks, in float64 (NLL sums over millions of tokens)."""
    if not world.distributed:
        return [float(v) for v in values]
    t = torch.tensor(list(values), dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def gather_to_main(obj: Any, world: World) -> list[Any] | None:
    """Every rank's `obj` (picklable) as a list in rank order on rank 0; None on the other ranks."""
    if not world.distributed:
        return [obj]
    out: list[Any] | None = [None] * world.size if world.is_main else None
    dist.gather_object(obj, out, dst=0)
    return out


def agree(error: BaseException | None, world: World) -> None:
    """Raise on every rank if any rank failed (e.g. loading the model), instead of leaving the others blocked in
    the next collective. The local error is re-raised as is; another rank's as a CascadeError naming it."""
    if not world.distributed:
        if error is not None:
            raise error
        return
    errors: list[Any] = [None] * world.size
    dist.all_gather_object(errors, None if error is None else str(error))
    if error is not None:
        raise error
    for rank, message in enumerate(errors):
        if message is not None:
            raise CascadeError(f"rank {rank} failed: {message}")
