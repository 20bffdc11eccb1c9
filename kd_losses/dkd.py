"""Decoupled KD (DKD): Zhao et al., "Decoupled Knowledge Distillation", CVPR 2022; follows mdistiller's
``dkd_loss`` (TCKD and NCKD both include T², reduced with sum / B)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from kd_losses._common import (
    Batch,
    LossDict,
    cross_entropy,
    kl_rows,
    loss_dict,
    student_and_labels,
)
from kd_losses.registry import register_loss
from kd_losses.targets import teacher_log_probs


def _binary_log_probs(log_p: Tensor, gt_mask: Tensor) -> Tensor:
    """[log p_target, log p_other] per row, [B, C] -> [B, 2], computed in log space."""
    log_target = log_p.masked_select(gt_mask)[:, None]
    log_other = torch.logsumexp(log_p.masked_fill(gt_mask, float("-inf")), dim=1, keepdim=True)
    return torch.cat([log_target, log_other], dim=1)


def _non_target(x: Tensor, gt_mask: Tensor) -> Tensor:
    """Drop the target column: [B, C] -> [B, C-1] (row order kept)."""
    return x.masked_select(~gt_mask).view(x.shape[0], x.shape[1] - 1)


def warmup_factor(epoch: int | None, warmup_epochs: int) -> float:
    """min((epoch + 1) / warmup_epochs, 1) for a 0-based epoch; 1 when epoch is None or no warm-up.

    Equals mdistiller's min(epoch / warmup, 1), whose epochs start at 1.
    """
    if epoch is None or warmup_epochs <= 0:
        return 1.0
    return min((int(epoch) + 1) / warmup_epochs, 1.0)


@register_loss("dkd", needs_teacher=True)
def dkd(
    student_logits: Tensor,
    batch: Batch,
    alpha: float = 1.0,
    beta: float = 8.0,
    T: float = 4.0,
    warmup_epochs: int = 20,
    epoch: int | None = None,
) -> LossDict:
    """DKD: L = CE + w·(alpha·TCKD + beta·NCKD).

    TCKD = T²·mean_i KL(b_t || b_s), b = [p^T[y], 1 - p^T[y]] (binary target / non-target split).
    NCKD = T²·mean_i KL(q_t || q_s), q = softmax over the non-target classes of z/T. mdistiller masks
    the target by subtracting 1000 from its logit; here the target column is dropped instead, which is
    the same value without overflow for fp16 or extreme logits, and the binary split uses logsumexp.
    Warm-up w = min((epoch + 1) / warmup_epochs, 1) with a 0-based epoch taken from batch['epoch'] if
    present, else the ``epoch`` hparam; w = 1 when neither is given (e.g. evaluation).

    student_logits [B, C] (C >= 2), batch['teacher_logits'] [B, T_teachers, C] (mean of logits) or
    batch['teacher_target'] of a compact bank (:mod:`kd_losses.targets`): TCKD from the true class's exact
    probability at T; NCKD over the non-target kept classes and one tail bucket (top-k), or over the
    importance-sampled estimate renormalized on the non-target classes (sampled).
    Defaults (CIFAR-100) alpha=1, beta=8, T=4, warmup_epochs=20; ImageNet uses beta=0.5.
    Parts: ``ce``, ``tckd``, ``nckd`` (unweighted, with T²), ``warmup`` (= w).
    """
    z, y = student_and_labels(student_logits, batch)
    gt_mask = F.one_hot(y, z.shape[1]).bool()
    ce_term = cross_entropy(z, y, batch)

    log_ps = F.log_softmax(z / T, dim=1)
    log_pt, tail = teacher_log_probs(batch, z, T, "dkd")
    tckd = T * T * kl_rows(_binary_log_probs(log_pt, gt_mask), _binary_log_probs(log_ps, gt_mask)).mean()

    log_qs = F.log_softmax(_non_target(z, gt_mask) / T, dim=1)
    nt = _non_target(log_pt, gt_mask)
    log_qt = nt - torch.logsumexp(nt, dim=1, keepdim=True)  # = log_softmax(z_t[non-target] / T) for dense logits
    nckd = T * T * kl_rows(log_qt, log_qs, None if tail is None else _non_target(tail, gt_mask)).mean()

    w = warmup_factor(batch.get("epoch", epoch), warmup_epochs)
    loss = ce_term + w * (alpha * tckd + beta * nckd)
    return loss_dict(loss, ce=ce_term, tckd=tckd, nckd=nckd, warmup=w)
