"""The one training loop (every method) and evaluation.

Batches are dicts with fixed keys: ``image`` [B, 3, H, W], ``label`` [B] (true classes), ``index`` [B] (sample
indices), ``epoch`` (int), plus what the label source adds (``teacher_logits`` [B, T, C] for methods with a
teacher). The loss returns a dict; everything in it is logged. There is no per-method branch here: methods
differ only in the loss and the label source (:mod:`stage2_student_train.label_sources`).
"""

from __future__ import annotations

import logging
import math
import time
from contextlib import nullcontext
from typing import Any, Callable, Iterable

import torch
import torch.nn as nn
from tqdm import tqdm

from pipeline.data.dali import Batch
from pipeline.distributed import DistInfo, all_reduce_sum
from pipeline.errors import UsageError
from pipeline.metrics import MetricAccumulator

log = logging.getLogger(__name__)


class TrainingDiverged(UsageError):
    """The loss became non-finite; the run stops and the last good checkpoint is kept (exit code 1)."""

    exit_code = 1


def autocast_context(device: str, amp: str):
    if amp == "none":
        return nullcontext()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)
    if dtype is None:
        raise UsageError(f"unknown amp mode '{amp}'; valid: none, bf16, fp16")
    return torch.autocast(device_type=device, dtype=dtype)


def make_batch(b: Batch, targets: torch.Tensor, device: str, epoch: int, channels_last: bool) -> dict:
    """Decoded batch -> the loop's batch dict; ``targets`` [N] int64 are the manifest's true classes, looked up
    by sample index."""
    images = b.images.to(device, non_blocking=True)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    return {"image": images, "label": targets[b.index].to(device, non_blocking=True), "index": b.index,
            "epoch": epoch}


def train_one_epoch(
    module: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    batches: Iterable[Batch],
    targets: torch.Tensor,
    label_source: Callable[[dict], dict[str, torch.Tensor]] | None,
    epoch: int,
    *,
    device: str = "cpu",
    scaler: torch.amp.GradScaler | None = None,
    channels_last: bool = False,
    info: DistInfo = DistInfo(),
    total_steps: int | None = None,
    log_every: int = 50,
    on_step: Callable[[int, dict[str, float]], None] | None = None,
) -> dict[str, float]:
    """One pass over ``batches``; returns the sample-weighted means of every loss part (``train_<part>``),
    images/s, time, and the learning rate of the epoch's first and last steps (``lr_first``, ``lr_last``).

    ``module``: a :class:`stage2_student_train.step.TrainModule` (student + loss; ``forward(batch)`` -> the loss
    dict), or its DDP wrapper. ``targets`` [N] int64: true classes by sample index; ``label_source``: a
    :class:`~stage2_student_train.label_sources.LabelSource` (its entries are added to each batch) or None.
    Raises TrainingDiverged (exit 1) when the loss becomes non-finite on any rank.
    """
    module.train()
    sums: dict[str, float] = {}
    n_seen = 0
    lr_first = lr_last = optimizer.param_groups[0]["lr"]
    t0 = time.time()
    pbar = tqdm(total=total_steps, desc=f"epoch {epoch}", unit="step", disable=not info.is_main, mininterval=1.0,
                leave=False)
    for step, b in enumerate(batches):
        batch = make_batch(b, targets, device, epoch, channels_last)
        if label_source is not None:
            batch.update(label_source(batch))
        out = module(batch)
        loss = out["loss"]
        finite = all_reduce_sum(torch.isfinite(loss.detach()).float(), info) / info.world_size
        if finite.item() < 1.0:
            pbar.close()  # so the error is a line of its own, not glued to the progress bar
            kept = (f"last.pt of epoch {epoch - 1} is kept" if epoch > 0 else
                    "no epoch had finished, so there is no checkpoint")
            raise TrainingDiverged(f"loss became non-finite at epoch {epoch} step {step}; stopped ({kept}): lower "
                                   "the lr or the loss weights, or try --amp none")
        lr_last = optimizer.param_groups[0]["lr"]
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None and scaler.is_enabled():
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        scheduler.step()
        bs = len(b.index)
        n_seen += bs
        parts = {k: float(v.detach()) for k, v in out.items()}
        for k, v in parts.items():
            sums[k] = sums.get(k, 0.0) + v * bs
        if on_step is not None and step % max(log_every, 1) == 0:
            on_step(step, {**parts, "lr": lr_last})
        pbar.update(1)
        pbar.set_postfix(loss=f"{parts['loss']:.4f}", img_s=f"{n_seen / max(time.time() - t0, 1e-9):.0f}")
    pbar.close()
    elapsed = time.time() - t0
    names = sorted(sums)
    vec = torch.tensor([n_seen, elapsed] + [sums[k] for k in names], dtype=torch.float64)
    vec = all_reduce_sum(vec, info)
    n_total = max(vec[0].item(), 1)
    result = {f"train_{k}": vec[2 + i].item() / n_total for i, k in enumerate(names)}
    result["train_images_per_s"] = vec[0].item() / max(elapsed, 1e-9)
    result["train_time_s"] = elapsed
    result["lr_first"], result["lr_last"] = lr_first, lr_last
    return result


@torch.no_grad()
def evaluate(model: nn.Module, batches: Iterable[Batch], targets: torch.Tensor, *, device: str = "cpu",
             amp: str = "none", channels_last: bool = False, info: DistInfo = DistInfo()
             ) -> tuple[dict[str, float], MetricAccumulator]:
    """Top-1/top-5 (percent), NLL and ECE (15 bins) over ``batches``, all-reduced across ranks."""
    model.eval()
    acc = MetricAccumulator()
    for b in batches:
        batch = make_batch(b, targets, device, 0, channels_last)
        with autocast_context(device, amp):
            logits = model(batch["image"])
        acc.update(logits.float(), batch["label"])
    if info.enabled:
        acc.load_state(all_reduce_sum(acc.state(), info))
    m = acc.compute()
    if not math.isfinite(m["nll"]):
        log.warning("non-finite NLL in evaluation")
    return m, acc
