"""One training step, as one object: :class:`TrainStep` (device, autocast, GradScaler, DDP, label source,
optimizer, per-update schedule, gradient clipping, gradient accumulation, model EMA), around :class:`TrainModule`:
everything that trains in a run, as one module: the student and the loss (its heads, regressors, encoder and
memories), so that DDP wraps them together and averages every gradient (torchdistill's ``wrap_if_distributed``
applies to each trainable module; here there is one).

The loop (:func:`stage2_student_train.loop.train_one_epoch`) iterates :meth:`TrainStep.steps`, which prepares the
next batch (device copy, soft-label gather) right after the current step is queued, so on a GPU the host gathers
batch i + 1 while the device runs step i; nothing in a step reads a value back to the host.

Under torchrun the :class:`TrainModule` is wrapped in ``DistributedDataParallel`` with ``broadcast_buffers=False``:
the loss's memory buffers (CRD) are kept identical on all ranks by the loss itself, from every rank's batch
(:class:`pipeline.distributed.BatchSync`), and re-broadcasting them from rank 0 every step would cost their whole
size per step (CRD on ImageNet: 1.3 GB). The student's BN statistics are rank 0's where they are used (evaluation
and checkpoints: ``pipeline.distributed.broadcast_buffers``).
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any, Callable, Iterable, Iterator

import torch
import torch.nn as nn
from timm.utils import dispatch_clip_grad

from pipeline.data.batch import Batch
from pipeline.distributed import BatchSync, DistInfo
from stage2_student_train import loop
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


class TrainStep:
    """Forward, backward and (every ``accum_steps`` micro-batches) an optimizer update of ``module``.

    Args:
        module: a :class:`TrainModule` or its DDP wrapper (:func:`wrap`); ``model`` is the unwrapped student.
        optimizer, scheduler: the optimizer and its timm scheduler (``step_update(u)`` after update u; None: none).
        targets: [N] int64, the true class of every sample index. ``label_source``: adds ``teacher_logits`` etc.
        scaler: a ``torch.amp.GradScaler`` (disabled: plain backward and step).
        clip_grad, clip_mode: clip the (unscaled) gradients before each update with timm's ``dispatch_clip_grad``
            (norm: total 2-norm <= clip_grad; value: |g| <= clip_grad; agc: adaptive, factor clip_grad); 0: off.
        accum_steps: micro-batches per update. Their gradients are summed, then divided by their number (the
            group's own, for an epoch's short last group): the update of the mean loss over the group, as one
            batch of their total size would give when the micro-batches are equal. Under DDP the non-final
            micro-batches run in ``no_sync`` (no all-reduce); the final one all-reduces the sum.
        ema: a ``timm.utils.ModelEmaV3`` of ``model``, updated after every optimizer update, or None.
        updates: optimizer updates done before this step object (a resumed run's position in its schedule).
    """

    def __init__(self, module: nn.Module, optimizer: torch.optim.Optimizer, targets: torch.Tensor, *,
                 scheduler: Any = None, label_source: Callable[[dict], dict] | None = None, device: str = "cpu",
                 scaler: torch.amp.GradScaler | None = None, channels_last: bool = False, clip_grad: float = 0.0,
                 clip_mode: str = "norm", accum_steps: int = 1, ema: nn.Module | None = None, updates: int = 0,
                 info: DistInfo = DistInfo()):
        self.module, self.optimizer, self.scheduler, self.targets = module, optimizer, scheduler, targets
        inner = module.module if isinstance(module, nn.parallel.DistributedDataParallel) else module
        self.model = inner.student
        self.label_source, self.device, self.channels_last, self.info = label_source, device, channels_last, info
        self.scaler = scaler if scaler is not None else torch.amp.GradScaler("cpu", enabled=False)
        self.clip_grad, self.clip_mode, self.accum_steps = clip_grad, clip_mode, max(accum_steps, 1)
        self.ema, self.updates, self.micro = ema, updates, 0
        self._last_lr = self.lr
        self.params = [p for g in optimizer.param_groups for p in g["params"]]
        first = next(self.model.parameters(), None)
        self.dtype = first.dtype if first is not None else torch.float32
        optimizer.zero_grad(set_to_none=True)

    @property
    def lr(self) -> float:
        """The lr of the next update (group 0; a host value, no device read)."""
        return self.optimizer.param_groups[0]["lr"]

    @property
    def last_lr(self) -> float:
        """The lr the latest micro-batch's update uses (or used)."""
        return self._last_lr

    def prepare(self, b: Batch, epoch: int) -> dict[str, Any]:
        """The loop's batch dict of ``b`` (:func:`stage2_student_train.loop.make_batch`: images on the device in
        the student's dtype and memory format) with the label source's entries (soft labels gathered by index)."""
        batch = loop.make_batch(b, self.targets, self.device, epoch, self.channels_last, self.dtype)
        if self.label_source is not None:
            batch.update(self.label_source(batch))
        return batch

    def steps(self, batches: Iterable[Batch], epoch: int) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
        """(batch, loss dict) of every step over ``batches``, in order, one-ahead: batch i + 1 is prepared
        (:meth:`prepare`) after step i is queued and before step i's outputs are handed out. The epoch's last
        micro-batch ends an accumulation group (an update)."""
        it = iter(batches)
        raw = next(it, None)
        if raw is None:
            return
        cur = self.prepare(raw, epoch)
        for raw in it:
            out = self(cur, last=False)
            nxt = self.prepare(raw, epoch)
            yield cur, out
            cur = nxt
        yield cur, self(cur, last=True)

    def __call__(self, batch: dict[str, Any], last: bool = False) -> dict[str, torch.Tensor]:
        """Forward and backward of one micro-batch; an optimizer update when it completes a group of
        ``accum_steps`` or is ``last``. Returns the loss dict (device tensors, not read back)."""
        self.micro += 1
        self._last_lr = self.lr
        final = last or self.micro >= self.accum_steps
        quiet = not final and isinstance(self.module, nn.parallel.DistributedDataParallel)
        with self.module.no_sync() if quiet else nullcontext():
            out = self.module(batch)
            self.scaler.scale(out["loss"]).backward()
        if final:
            self._update()
        return out

    def _update(self) -> None:
        """Average the group's gradients, clip, step (through the scaler), zero, advance the schedule, EMA."""
        if self.micro > 1:
            for p in self.params:
                if p.grad is not None:
                    p.grad.div_(self.micro)
        if self.clip_grad > 0:
            self.scaler.unscale_(self.optimizer)
            dispatch_clip_grad([p for p in self.params if p.grad is not None], self.clip_grad, self.clip_mode)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.micro = 0
        self.updates += 1
        if self.scheduler is not None:
            self.scheduler.step_update(self.updates)
        if self.ema is not None:
            self.ema.update(self.model)

    def train(self) -> None:
        self.module.train()
