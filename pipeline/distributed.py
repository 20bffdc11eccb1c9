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

import functools
import os
from dataclasses import dataclass
from typing import Any, Callable, TypeVar

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn

from pipeline.errors import UsageError

F = TypeVar("F", bound=Callable[..., Any])


class PeerFailed(UsageError):
    """A collective failed because another process of the run stopped (its own error names the cause): one line
    and exit code 1 here, instead of a traceback beside the real error."""

    exit_code = 1


def _collective(fn: F) -> F:
    """Turn a collective's backend error (a peer closed its connection, a timeout) into :class:`PeerFailed`."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except RuntimeError as e:  # torch.distributed.DistBackendError and gloo/NCCL errors are RuntimeErrors
            if not dist.is_initialized():
                raise
            first = " ".join(str(e).split())[:160]
            raise PeerFailed(f"rank {dist.get_rank()}: another process of this run stopped (see its error); "
                             f"{fn.__name__} failed: {first}") from None

    return wrapper  # type: ignore[return-value]


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


def current_info(device: str = "cpu") -> DistInfo:
    """This process's :class:`DistInfo` from the initialised process group (rank 0 of 1 without one), for library
    code that takes part in the run's collectives without being handed the run's info."""
    if not (dist.is_available() and dist.is_initialized()):
        return DistInfo(device=device)
    return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")), device, True)


def local_world_size() -> int:
    """Processes of this run on this node (torchrun's ``LOCAL_WORLD_SIZE``; 1 without torchrun)."""
    return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1"))) if dist.is_available() and dist.is_initialized() \
        else 1


@_collective
def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def _all_reduce(t: torch.Tensor, info: DistInfo, op: Any) -> torch.Tensor:
    if not info.enabled:
        return t
    out = t.detach().to(info.torch_device, copy=True)
    dist.all_reduce(out, op=op)
    return out.to(t.device)


@_collective
def all_reduce_sum(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Sum ``t`` over ranks (reduced on the rank's device, returned on ``t``'s device); ``t`` is not modified."""
    return _all_reduce(t, info, dist.ReduceOp.SUM)


@_collective
def all_reduce_min(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Elementwise minimum of ``t`` over ranks (on the rank's device, returned on ``t``'s device)."""
    return _all_reduce(t, info, dist.ReduceOp.MIN)


@_collective
def all_reduce_sum_with_grad(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Sum ``t`` over ranks with autograd: the gradient of each rank's ``t`` is the sum over ranks of the output's
    gradients (torch's functional ``all_reduce``, whose backward is registered by torch; gloo and NCCL). ``t``
    must be on the rank's device; without a process group ``t`` itself."""
    if not info.enabled:
        return t
    from torch.distributed import _functional_collectives as fc

    return fc.wait_tensor(fc.all_reduce(t, "sum", dist.group.WORLD))


@_collective
def all_gather_cat(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Every rank's ``t`` [n_r, ...] concatenated in rank order -> [sum n_r, ...] on ``t``'s device (the first
    dimension may differ across ranks; the others must agree). Gathered on the rank's device, like
    :func:`all_reduce_sum`; no gradient flows through it."""
    if not info.enabled:
        return t
    dev = info.torch_device
    x = t.detach().to(dev).contiguous()
    sizes = [torch.zeros(1, dtype=torch.int64, device=dev) for _ in range(info.world_size)]
    dist.all_gather(sizes, torch.tensor([x.shape[0]], dtype=torch.int64, device=dev))
    n = [int(s.item()) for s in sizes]
    pad = torch.zeros((max(n) - x.shape[0], *x.shape[1:]), dtype=x.dtype, device=dev)
    parts = [torch.empty((max(n), *x.shape[1:]), dtype=x.dtype, device=dev) for _ in n]
    dist.all_gather(parts, torch.cat([x, pad]))
    return torch.cat([p[:k] for p, k in zip(parts, n)]).to(t.device)


class BatchSync:
    """What a loss whose buffers learn from the batch (CRD's memories and normalisation constants) needs to keep
    those buffers identical on every rank: :meth:`gather` (every rank's rows, in rank order) and :meth:`mean`
    (the sample-weighted mean of a per-rank mean). Single-process: both return their input. A loss holds one in
    its ``sync`` attribute; stage 2 sets it to the run's (``stage2_student_train.step.TrainModule``)."""

    def __init__(self, info: DistInfo | None = None):
        self.info = info or DistInfo()

    def gather(self, t: torch.Tensor) -> torch.Tensor:
        return all_gather_cat(t, self.info)

    def mean(self, value: torch.Tensor, count: int) -> torch.Tensor:
        """Mean over all ranks' samples of a per-rank mean ``value`` (a tensor of any shape) over ``count``
        samples."""
        if not self.info.enabled:
            return value
        both = all_reduce_sum(torch.cat([value.detach().reshape(-1).double() * count,
                                         torch.tensor([float(count)], dtype=torch.float64, device=value.device)]),
                              self.info)
        return (both[:-1] / both[-1]).reshape(value.shape).to(value.dtype)


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from a tuple of non-negative integers (e.g. ``(seed, PURPOSE, epoch, rank)``), through numpy's
    ``SeedSequence``: distinct tuples give independent streams, with no packing arithmetic that could collide
    (``seed*1000 + epoch*10 + rank`` repeats for more than 10 ranks)."""
    state = np.random.SeedSequence([int(p) for p in parts]).generate_state(2, np.uint32)
    return (int(state[0]) << 31 | int(state[1]) >> 1) & (2**63 - 1)


@_collective
def gather_objects(obj: Any, info: DistInfo) -> list[Any]:
    """Every rank's ``obj`` (picklable), in rank order, on every rank (``[obj]`` without a process group)."""
    if not info.enabled:
        return [obj]
    out: list[Any] = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


@_collective
def broadcast_buffers(module: nn.Module, info: DistInfo, src: int = 0) -> None:
    """Overwrite every buffer of ``module`` (BN running statistics) with rank ``src``'s, in place."""
    if info.enabled:
        for buf in module.buffers():
            dist.broadcast(buf, src)


@_collective
def broadcast_object(obj: Any, info: DistInfo, src: int = 0) -> Any:
    if not info.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def cleanup(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()


def torchrun_args(nproc: int) -> list[str]:
    """The interpreter arguments that start ``nproc`` processes on this node with torchrun (``--standalone``: a
    free rendezvous port), to be followed by ``-m MODULE ARGS``: ``[sys.executable, *torchrun_args(2), "-m", ...]``."""
    return ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
