"""Helpers shared by the losses: dtype promotion, batch access, log-space divergences.

Everything is computed in log space from ``log_softmax`` so that extreme logits (±1e4) and fp16/bf16
inputs give finite losses and gradients: no ``log(softmax(...))`` and no ``0 * log 0``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

Batch = Mapping[str, Any]
LossDict = dict[str, Tensor]


def compute_dtype(x: Tensor) -> torch.dtype:
    """float32 for fp16/bf16/fp32 inputs, float64 stays float64 (so gradcheck works)."""
    return torch.promote_types(x.dtype, torch.float32)


def student_and_labels(student_logits: Tensor, batch: Batch) -> tuple[Tensor, Tensor]:
    """Validate and upcast. Returns student logits [B, C] in the compute dtype and labels [B] int64."""
    if student_logits.ndim != 2:
        raise ValueError(f"student_logits must be [B, C], got shape {tuple(student_logits.shape)}")
    if "label" not in batch:
        raise ValueError("batch has no 'label' key (expected int64 labels of shape [B])")
    z = student_logits.to(compute_dtype(student_logits))
    y = batch["label"]
    if y.shape != z.shape[:1]:
        raise ValueError(f"batch['label'] must be [B]={z.shape[0]}, got shape {tuple(y.shape)}")
    return z, y.to(device=z.device, dtype=torch.long)


def teacher_logits(batch: Batch, student: Tensor, loss_name: str) -> Tensor:
    """All teachers' logits [B, T, C], cast to ``student``'s (compute) dtype and device."""
    if batch.get("teacher_logits") is None:
        raise ValueError(f"loss {loss_name!r} needs batch['teacher_logits'] of shape [B, T, C]")
    t = batch["teacher_logits"]
    b, c = student.shape
    if t.ndim != 3 or t.shape[0] != b or t.shape[2] != c:
        raise ValueError(
            f"batch['teacher_logits'] must be [B, T, C] = [{b}, T, {c}], got shape {tuple(t.shape)}"
        )
    return t.to(device=student.device, dtype=student.dtype)


def mean_teacher(batch: Batch, student: Tensor, loss_name: str) -> Tensor:
    """Single-teacher view [B, C]: the mean of the T teachers' logits (identity when T = 1)."""
    return teacher_logits(batch, student, loss_name).mean(dim=1)


def _pooled(log_p_t: Tensor, log_p_s: Tensor, tail: Tensor | None) -> tuple[Tensor, Tensor]:
    if tail is None:
        return log_p_t, log_p_s
    from kd_losses.targets import pool_tail

    shape = torch.broadcast_shapes(log_p_t.shape, log_p_s.shape)
    return pool_tail(log_p_t.expand(shape), tail), pool_tail(log_p_s.expand(shape), tail)


def kl_rows(log_p_t: Tensor, log_p_s: Tensor, tail: Tensor | None = None) -> Tensor:
    """KL(p_t || p_s) per row, [..., C] -> [...]; from log-probabilities (finite for p_t -> 0, and for p_t = 0
    exactly: log p_t = -inf). ``tail`` [..., C] bool: classes pooled into one bucket on both sides
    (:func:`kd_losses.targets.pool_tail`; a compact bank's unknown tail)."""
    log_p_t, log_p_s = _pooled(log_p_t, log_p_s, tail)
    p = log_p_t.exp()
    return torch.where(p > 0, p * (log_p_t - log_p_s), 0.0).sum(dim=-1)


def hinton_kd_term(z: Tensor, zt: Tensor, T: float) -> Tensor:
    """Hinton KD term T²·KL(p_t^T || p_s^T), batchmean. z, zt [B, C] -> scalar."""
    return T * T * kl_rows(F.log_softmax(zt / T, dim=1), F.log_softmax(z / T, dim=1)).mean()


def kd_term(z: Tensor, batch: Batch, T: float, loss_name: str) -> Tensor:
    """Hinton KD term T²·KL(p_t^T || p_s^T), batchmean, for any teacher target (dense logits: exactly
    :func:`hinton_kd_term` of the mean teacher; a compact bank's: over its buckets, :mod:`kd_losses.targets`)."""
    from kd_losses.targets import teacher_log_probs

    log_pt, tail = teacher_log_probs(batch, z, T, loss_name)
    return T * T * kl_rows(log_pt, F.log_softmax(z / T, dim=1), tail).mean()


def soft_ce_rows(log_p_t: Tensor, log_p_s: Tensor, tail: Tensor | None = None) -> Tensor:
    """Soft cross-entropy H(p_t, p_s) = -sum_k p_t[k] log p_s[k] per row, [..., C] -> [...] (``tail``: as
    :func:`kl_rows`)."""
    log_p_t, log_p_s = _pooled(log_p_t, log_p_s, tail)
    p = log_p_t.exp()
    return -torch.where(p > 0, p * log_p_s, 0.0).sum(dim=-1)


def check_choice(loss_name: str, param: str, value: Any, choices: Iterable[str]) -> None:
    """One-line ValueError when a string hparam is not one of ``choices``."""
    choices = tuple(choices)
    if value not in choices:
        valid = ", ".join(repr(c) for c in choices)
        raise ValueError(f"loss {loss_name!r}: {param} must be one of {valid}; got {value!r}")


def loss_dict(loss: Tensor, **parts: Tensor | float) -> LossDict:
    """``{"loss": loss, **parts}`` with the logging parts detached."""
    out: LossDict = {"loss": loss}
    for key, value in parts.items():
        out[key] = value.detach() if isinstance(value, Tensor) else loss.new_tensor(float(value)).detach()
    return out


def mixed_labels(batch: Batch | None, y: Tensor) -> tuple[Tensor, Tensor] | None:
    """A mixed batch's partner classes ``batch["label_mix"]`` [B] int64 and weights ``batch["lam"]`` [B] (of
    ``label``; 1 for unmixed rows) on ``y``'s device, or None when the batch is not mixed.

    Raises:
        ValueError: only one of the two keys, or shapes other than [B]."""
    if batch is None or (batch.get("label_mix") is None and batch.get("lam") is None):
        return None
    if batch.get("label_mix") is None or batch.get("lam") is None:
        raise ValueError("a mixed batch needs both 'label_mix' [B] and 'lam' [B]")
    y2, lam = batch["label_mix"], batch["lam"]
    if y2.shape != y.shape or lam.shape != y.shape:
        raise ValueError(f"batch['label_mix'] and batch['lam'] must be [B]={y.shape[0]}, got "
                         f"{tuple(y2.shape)} and {tuple(lam.shape)}")
    return y2.to(device=y.device, dtype=torch.long), lam.to(device=y.device)


def hard_target(y: Tensor, num_classes: int, batch: Batch | None = None, smoothing: float = 0.0,
                dtype: torch.dtype = torch.float32) -> Tensor:
    """The hard-label target [B, C] as timm's ``mixup_target``: one-hot with ``off = smoothing / C`` and
    ``on = 1 − smoothing + off``, and for a mixed batch (:func:`mixed_labels`) ``lam·t(label) + (1 − lam)·
    t(label_mix)`` per row (timm's λ is per batch; here each row has its own)."""
    off = smoothing / num_classes
    on = 1.0 - smoothing + off
    t1 = torch.full((len(y), num_classes), off, dtype=dtype, device=y.device).scatter_(1, y[:, None], on)
    mix = mixed_labels(batch, y)
    if mix is None:
        return t1
    y2, lam = mix
    t2 = torch.full_like(t1, off).scatter_(1, y2[:, None], on)
    lam = lam.to(dtype)[:, None]
    return t1 * lam + t2 * (1.0 - lam)


def cross_entropy(z: Tensor, y: Tensor, batch: Batch | None = None, smoothing: float = 0.0) -> Tensor:
    """Hard-label CE, mean over the batch. z [B, C], y [B] -> scalar.

    For a mixed batch (``batch["label_mix"]``, ``batch["lam"]``: Mixup / CutMix views) or ``smoothing`` > 0, the
    soft cross-entropy with :func:`hard_target` (timm's ``SoftTargetCrossEntropy`` on ``mixup_target``); else
    exactly ``F.cross_entropy(z, y)``."""
    if smoothing == 0.0 and mixed_labels(batch, y) is None:
        return F.cross_entropy(z, y)
    target = hard_target(y, z.shape[1], batch, smoothing, z.dtype)
    return -(target * F.log_softmax(z, dim=1)).sum(dim=1).mean()
