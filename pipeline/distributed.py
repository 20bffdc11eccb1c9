"""torchrun integration shared by both stages: process group, barriers and every collective.

Single-process runs need no torchrun: everything degrades to rank 0 of 1 without a process group. Under
torchrun a process group exists even with one process (``--nproc_per_node 1``), so every collective path runs. Every collective of the project goes
through this module, and each hands its backend what it accepts (docs/GPU.md):

- ``--device cpu``: one gloo process group.
- ``--device cuda``: the process group is ``cpu:gloo,cuda:nccl`` (one NCCL backend for CUDA tensors, gloo for CPU
  tensors, object collectives and barriers), and :func:`all_reduce_sum` moves its tensor to the rank's GPU
  first, so CPU-side statistics (loss sums, metric states) reduce on NCCL like the rest.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: str = "cpu"  # the run's device type: cpu or cuda
    group: bool = False  # a process group exists (launched by torchrun)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        """Whether collectives run: under torchrun, whatever the number of processes."""
        return self.group

    @property
    def torch_device(self) -> torch.device:
        """This rank's device: ``cuda:<local_rank>`` for CUDA runs, else ``cpu``."""
        return torch.device("cuda", self.local_rank) if self.device == "cuda" else torch.device("cpu")


def cores_per_local_rank() -> int:
    """The CPU cores this process may run on (its affinity) divided by the processes torchrun started on this
    node (``LOCAL_WORLD_SIZE``, 1 without torchrun), at least 1: the default number of loader threads."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # no affinity API (macOS)
        cores = os.cpu_count() or 1
    try:
        local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        local = 1
    return max(1, cores // local)


def backend_for(device: str) -> str:
    """The process-group backend of a run on ``device``: gloo on CPU; gloo for CPU tensors and NCCL for CUDA
    tensors on GPUs (NCCL alone accepts only CUDA tensors, and object collectives would need one too)."""
    return "cpu:gloo,cuda:nccl" if device == "cuda" else "gloo"


def init_distributed(device: str = "cpu") -> DistInfo:
    """Initialise the process group when launched by torchrun (``RANK``, ``WORLD_SIZE`` and ``MASTER_ADDR`` set);
    on CUDA, pin this process to GPU ``LOCAL_RANK`` first."""
    if not all(k in os.environ for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR")):
        return DistInfo(device=device)
    world = int(os.environ["WORLD_SIZE"])
    rank = int(os.environ["RANK"])
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "cuda":
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        dist.init_process_group(backend=backend_for(device))
    return DistInfo(rank, world, local, device, group=True)


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def all_reduce_sum(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Sum ``t`` over ranks (reduced on the rank's device, returned on ``t``'s device); ``t`` is not modified."""
    if not info.enabled:
        return t
    out = t.detach().to(info.torch_device, copy=True)
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out.to(t.device)


def broadcast_buffers(module: nn.Module, info: DistInfo, src: int = 0) -> None:
    """Overwrite every buffer of ``module`` (BN running statistics) with rank ``src``'s, in place."""
    if info.enabled:
        for buf in module.buffers():
            dist.broadcast(buf, src)


def broadcast_object(obj: Any, info: DistInfo, src: int = 0) -> Any:
    if not info.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def cleanup(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()
