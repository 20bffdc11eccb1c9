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
from pipeline.distributed import DistInfo, all_reduce_min, all_reduce_sum
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


def make_batch(b: Batch, targets: torch.Tensor, device: str, epoch: int, channels_last: bool,
               dtype: torch.dtype | None = None) -> dict:
    """Decoded batch -> the loop's batch dict; ``targets`` [N] int64 are the manifest's true classes, looked up
    by sample index. ``image`` [B, 3, H, W] on ``device`` (copied without blocking the host), in ``dtype`` (the
    student's; None: as decoded) and channels_last memory format when asked."""
    images = b.images.to(device, dtype=dtype, non_blocking=True)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    out = {"image": images, "label": targets[b.index].to(device, non_blocking=True), "index": b.index,
           "epoch": epoch}
    if b.mix is not None:  # mixed in the loader (--mix-labels blend): the partners' classes and λ
        out.update(index_mix=b.mix["index_mix"], label_mix=targets[b.mix["index_mix"]].to(device, non_blocking=True),
                   lam=b.mix["lam"].to(device, non_blocking=True))
    return out


def train_one_epoch(step: Any, batches: Iterable[Batch], epoch: int, *, total_steps: int | None = None,
                    log_every: int = 50, on_step: Callable[[int, dict[str, float]], None] | None = None,
                    ) -> dict[str, float]:
    """One pass over ``batches`` with ``step`` (a :class:`stage2_student_train.step.TrainStep`: forward, backward,
    updates, soft labels gathered one batch ahead); returns the sample-weighted means of every loss part
    (``train_<part>``), images/s, time, and the learning rate of the epoch's first and last steps (``lr_first``,
    ``lr_last``).

    Loss parts and finiteness accumulate on the device; the host reads them every ``log_every`` steps (``on_step``
    gets the step's parts and lr there) and at the end of the epoch, never per step. Raises TrainingDiverged
    (exit 1) when the loss became non-finite on any rank, at the first such read after it.
    """
    step.train()
    info = step.info
    sums: dict[str, torch.Tensor] = {}  # sample-weighted sums of the loss parts, on the device: no host sync
    first_bad = torch.full((), -1, dtype=torch.int64, device=step.device)  # first step whose loss was not finite
    n_seen = 0
    lr_first = lr_last = step.lr
    t0 = time.time()
    pbar = tqdm(total=total_steps, desc=f"epoch {epoch}", unit="step", disable=not info.is_main, mininterval=1.0,
                leave=False)
    for i, (batch, out) in enumerate(step.steps(batches, epoch)):
        bad = ~torch.isfinite(out["loss"].detach())
        first_bad = torch.where(bad & (first_bad < 0), torch.full_like(first_bad, i), first_bad)
        bs = len(batch["index"])
        n_seen += bs
        lr_last = step.last_lr
        for k, v in out.items():
            sums[k] = sums[k] + v.detach().float() * bs if k in sums else v.detach().float() * bs
        if i % max(log_every, 1) == 0:  # the only host reads of a step: every log_every steps
            _stop_if_diverged(first_bad, epoch, info, pbar)
            parts = {k: float(v.detach()) for k, v in out.items()}
            if on_step is not None:
                on_step(i, {**parts, "lr": lr_last})
            pbar.set_postfix(loss=f"{parts['loss']:.4f}", img_s=f"{n_seen / max(time.time() - t0, 1e-9):.0f}")
        pbar.update(1)
    _stop_if_diverged(first_bad, epoch, info, pbar)
    pbar.close()
    elapsed = time.time() - t0
    names = sorted(sums)
    vec = torch.stack([torch.tensor(float(n_seen), dtype=torch.float64), torch.tensor(elapsed, dtype=torch.float64)]
                      + [sums[k].double().cpu() for k in names])
    vec = all_reduce_sum(vec, info)
    n_total = max(vec[0].item(), 1)
    result = {f"train_{k}": vec[2 + i].item() / n_total for i, k in enumerate(names)}
    result["train_images_per_s"] = vec[0].item() / max(elapsed, 1e-9)
    result["train_time_s"] = elapsed
    result["lr_first"], result["lr_last"] = lr_first, lr_last
    return result


def _stop_if_diverged(first_bad: torch.Tensor, epoch: int, info: DistInfo, pbar: Any) -> None:
    """Raise TrainingDiverged when a step's loss was not finite on any rank (``first_bad`` >= 0: the step). Read
    every ``log_every`` steps and at the end of the epoch, on every rank at the same steps (a collective); the
    epoch's checkpoint is only written after the epoch, so the last good one is kept."""
    never = torch.full_like(first_bad, 2**62)
    worst = int(all_reduce_min(torch.where(first_bad < 0, never, first_bad), info).item())
    if worst == 2**62:
        return
    pbar.close()  # so the error is a line of its own, not glued to the progress bar
    kept = f"last.pt of epoch {epoch - 1} is kept" if epoch > 0 else "no epoch had finished, so there is no checkpoint"
    raise TrainingDiverged(f"loss became non-finite at epoch {epoch} step {worst}; stopped ({kept}): lower the lr or "
                           "the loss weights, or try --amp none")


@torch.no_grad()
def recalibrate_bn(model: nn.Module, batches: Iterable[Batch], targets: torch.Tensor, *, device: str = "cpu",
                   amp: str = "none", channels_last: bool = False, info: DistInfo = DistInfo()) -> int:
    """Precise BN (Wu & Johnson 2021, "Rethinking 'Batch' in BatchNorm", sec. 3): replace every batch-norm
    layer's running mean and variance by their equal-weight averages over ``batches`` (images [B, 3, H, W], the
    model in training mode, no gradients; ``torch.optim.swa_utils.update_bn``), then average them over ranks, so
    every rank evaluates the statistics of all ranks' batches. With a momentum of 0.1 the running averages
    otherwise follow the last ~20 training batches, which makes evaluations of the same weights differ.
    Returns the number of batches this rank ran (0: the model has no batch norm, nothing changed). Every rank
    must run the same number of batches (a synchronised BN layer all-reduces in each forward)."""
    from torch.optim.swa_utils import update_bn

    layers = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not layers:
        return 0
    seen = [0]

    def images() -> Iterable[torch.Tensor]:
        for b in batches:
            seen[0] += 1
            yield make_batch(b, targets, device, 0, channels_last)["image"]

    with autocast_context(device, amp):
        update_bn(images(), model)
    if info.enabled:
        for m in layers:
            for buf in (m.running_mean, m.running_var):
                buf.copy_(all_reduce_sum(buf, info) / info.world_size)
    return seen[0]


@torch.no_grad()
def evaluate(model: nn.Module, batches: Iterable[Batch], targets: torch.Tensor, *, device: str = "cpu",
             amp: str = "none", channels_last: bool = False, info: DistInfo = DistInfo(),
             teacher: Callable[[dict], torch.Tensor] | None = None,
             ) -> tuple[dict[str, float], MetricAccumulator]:
    """Top-1/top-5 (percent), NLL and ECE (15 bins) over ``batches``, all-reduced across ranks.

    With ``teacher`` (batch dict -> the teachers' logits [B, T, C] of its images; several teachers: their mean
    logit, the ensemble every mean-logit method distils), also the student's agreement with the teacher
    (``teacher_agreement``: percent of samples whose top-1 classes agree) and ``teacher_kl``: the mean
    KL(teacher ‖ student) at T = 1 in nats (big_vision's distillation metrics)."""
    model.eval()
    acc = MetricAccumulator()
    fid = torch.zeros(3, dtype=torch.float64)  # samples, agreements, KL sum
    for b in batches:
        batch = make_batch(b, targets, device, 0, channels_last)
        with autocast_context(device, amp):
            logits = model(batch["image"])
        acc.update(logits.float(), batch["label"])
        if teacher is not None:
            zt = teacher(batch).float().mean(dim=1)
            log_pt, log_ps = torch.log_softmax(zt, dim=1), torch.log_softmax(logits.float(), dim=1)
            kl = (log_pt.exp() * (log_pt - log_ps)).sum(dim=1)
            fid += torch.stack([torch.tensor(float(len(zt))), (zt.argmax(1) == logits.argmax(1)).sum().double().cpu(),
                                kl.sum().double().cpu()]).double()
    if info.enabled:
        acc.load_state(all_reduce_sum(acc.state(), info))
        fid = all_reduce_sum(fid, info)
    m = acc.compute()
    if teacher is not None:
        n = max(fid[0].item(), 1.0)
        m.update(teacher_agreement=100.0 * fid[1].item() / n, teacher_kl=fid[2].item() / n)
    if not math.isfinite(m["nll"]):
        log.warning("non-finite NLL in evaluation")
    return m, acc
