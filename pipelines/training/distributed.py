"""torchrun support: read the environment torchrun sets, pick gloo on CPU and nccl on GPU."""

from __future__ import annotations

import logging
import os
import sys
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


def leave(info: DistInfo) -> None:
    """Ends a torchrun rank whose training succeeded: every rank meets at a barrier, then the
    process exits at once with status 0, its output flushed, running no destructor.

    Why no teardown: it hung twice in the two-rank test under a loaded CI, after training had
    finished and written its files. Once with `destroy_process_group` called as soon as a rank
    was done (rank 1 alive, rank 0 gone); once with a barrier first, as pytorch/pytorch#75097
    advises: the stuck rank's main thread was in a C destructor as train_detector returned, one
    thread with no Python frame beside it, which looks like the GIL-versus-worker-thread
    deadlocks of pytorch/pytorch#56297 and #56017 (not confirmed: 32 two-rank runs under CPU
    hogs here did not hang, and which destructor blocked is unknown). Destroying the group would
    not even free it: with a DDP model ever built, gloo's threads outlive
    `destroy_process_group` and the model (measured, torch 2.13). Everything a rank owes is on
    disk by now, so it leaves as a killed process would and torchrun reads its 0.

    Not called on a failure: the exception ends the rank, torchrun sees it fail and stops the
    others, which may be waiting in a collective the failed rank never reaches
    (pytorch/torchtitan#1342). Without torchrun (one process) it does nothing."""
    if not info.enabled:
        return
    dist.barrier()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
