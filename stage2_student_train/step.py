"""Everything that trains in a run, as one module: the student and the loss (its heads, regressors, encoder and
memories), so that DDP wraps them together and averages every gradient (torchdistill's ``wrap_if_distributed``
applies to each trainable module; here there is one).

Under torchrun the :class:`TrainModule` is wrapped in ``DistributedDataParallel`` with ``broadcast_buffers=False``:
the loss's memory buffers (CRD) are kept identical on all ranks by the loss itself, from every rank's batch
(:class:`pipeline.distributed.BatchSync`), and re-broadcasting them from rank 0 every step would cost their whole
size per step (CRD on ImageNet: 1.3 GB). The student's BN statistics are rank 0's where they are used (evaluation
and checkpoints: ``pipeline.distributed.broadcast_buffers``).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from pipeline.distributed import BatchSync, DistInfo
from stage2_student_train.loop import autocast_context


class TrainModule(nn.Module):
    """``forward(batch)`` -> the loss dict: the student on ``batch['image']`` [B, 3, H, W] under autocast, its
    embedding [B, D] (``batch['student_features']``, when ``tap`` is given) and the loss on the float32 logits
    [B, C]. Parameters: the student's, then the loss's; ``state_dict`` keys ``student.*`` and ``criterion.*``
    (checkpoints keep saving the two parts separately)."""

    def __init__(self, student: nn.Module, criterion: nn.Module, tap: Any = None, amp: str = "none",
                 info: DistInfo = DistInfo()):
        super().__init__()
        self.student, self.criterion, self.amp, self.device_type = student, criterion, amp, info.device
        self._tap = tap
        sync = BatchSync(info)
        for m in criterion.modules():  # losses whose buffers learn from the batch (CRD) use every rank's batch
            if hasattr(m, "sync"):
                m.sync = sync

    def forward(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        with autocast_context(self.device_type, self.amp):
            logits = self.student(batch["image"])
        if self._tap is not None:
            batch = {**batch, "student_features": self._tap.pop()}
        return self.criterion(logits.float(), batch)


def wrap(module: TrainModule, info: DistInfo) -> nn.Module:
    """``module`` in DDP under torchrun (its device's GPU when CUDA), else itself. DDP is built with
    ``find_unused_parameters`` off: every loss uses all its parameters on every step."""
    if not info.enabled:
        return module
    if not any(p.requires_grad for p in module.parameters()):
        return module
    ids = [info.local_rank] if info.device == "cuda" else None
    return nn.parallel.DistributedDataParallel(module, device_ids=ids, broadcast_buffers=False)
