"""What a stage-2 run allocates beside its label banks, on this node, for the memory check before training
(``pipeline.bank.resident.check_host_memory``): every process's loss state (CRD's memories are 2·T·N·feat_dim
float32: 1.3 GB per process on ImageNet, RepDistiller#40) and image batches in flight. Banks are counted by the
resident module itself (once per node)."""

from __future__ import annotations

import torch

from pipeline.distributed import local_world_size
from pipeline.errors import UsageError
from stage2_student_train.config import TrainConfig


def loss_state_bytes(cfg: TrainConfig, num_classes: int, num_samples: int, num_teachers: int | None,
                     teacher_dim: int | None) -> int:
    """Bytes of the loss's parameters and buffers (heads, memories), measured by building it on the ``meta``
    device (nothing allocated). Function losses: 0."""
    import kd_losses
    from stage2_student_train.run import build_criterion

    if kd_losses.needs_features(cfg.method) and not teacher_dim:
        return 0  # no stored embeddings: the label source refuses the bank with its own message
    try:
        with torch.device("meta"):
            crit = build_criterion(cfg, num_classes, num_samples=num_samples, student_dim=1,
                                   num_teachers=num_teachers or None, teacher_dim=teacher_dim)
    except UsageError:
        return 0  # the run's own build of the loss reports it
    return sum(t.numel() * t.element_size() for t in (*crit.parameters(), *crit.buffers()))


def batch_bytes(cfg: TrainConfig, crop: int) -> int:
    """Host bytes of the image batches one process holds in flight: float32 [B, 3, crop, crop] per batch, with a
    DataLoader's 2 prefetched batches per worker (torch loader) or DALI's queue of 2 plus the one in use."""
    per_batch = cfg.batch_size * 3 * crop * crop * 4
    return per_batch * (2 * max(cfg.workers, 1) + 1 if cfg.loader == "torch" else 3)


def run_items(cfg: TrainConfig, num_classes: int, num_samples: int, num_teachers: int | None,
              teacher_dim: int | None, crop: int) -> list[tuple[str, int]]:
    """(what, bytes) of the run's large host allocations on this node, every process counted; the loss state
    counts on the host for CPU runs only (on a GPU it is the device's: checked by :func:`check_device_memory`)."""
    procs = local_world_size()
    each = f" ({procs} processes)" if procs > 1 else ""
    items = [(f"image batches{each}", procs * batch_bytes(cfg, crop))]
    state = loss_state_bytes(cfg, num_classes, num_samples, num_teachers, teacher_dim)
    if cfg.device == "cpu" and state:
        items.append((f"{cfg.method} loss state{each}", procs * state))
    return items


def check_device_memory(cfg: TrainConfig, state: int) -> None:
    """On CUDA: refuse (one line) a loss state that would take more than half of the GPU's free memory."""
    if cfg.device != "cuda" or not state:
        return
    free = torch.cuda.mem_get_info()[0]
    if state > free / 2:
        raise UsageError(f"the {cfg.method} loss state (memories, heads) takes {state / 1e9:.3g} GB, more than half "
                         f"of the {free / 1e9:.3g} GB free on the GPU: lower loss.feat_dim, or train on a subset "
                         f"(train_subset=), or use a method without memories")

