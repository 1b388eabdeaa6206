"""torchrun support: read the environment torchrun sets, pick gloo on CPU and nccl on GPU."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed() -> DistInfo:
    """Start the process group when launched by torchrun; a no-op otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    info = DistInfo(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(info.local_rank)
        dist.init_process_group(backend=backend)
    return info


def device_for(info: DistInfo) -> torch.device:
    return torch.device(f"cuda:{info.local_rank}") if torch.cuda.is_available() else torch.device("cpu")


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def all_reduce_mean(value: float, info: DistInfo) -> float:
    if not info.enabled:
        return value
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t)
    return float(t.item()) / info.world_size


def shutdown(info: DistInfo) -> None:
    """The process group's teardown, once training has succeeded on this rank. Every rank meets
    first: a rank destroying the group while another still works (rank 0 exporting the best
    epoch) is a known cause of hangs (pytorch/pytorch#75097), and a two-rank run here once hung
    past 240 s after rank 0 exited. Not called on a failure: a failed rank leaves without it,
    since the others may wait in a collective it never reaches (pytorch/torchtitan#1342), and
    torchrun stops them."""
    if info.enabled and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
