"""Weighted soft labels (WSLD): Zhou et al., "Rethinking soft labels for knowledge distillation:
a bias-variance tradeoff perspective", ICLR 2021; follows the released code."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from kd_losses._common import (
    Batch,
    LossDict,
    cross_entropy,
    loss_dict,
    soft_ce_rows,
    student_and_labels,
)
from kd_losses.registry import register_loss
from kd_losses.targets import teacher_log_probs


@register_loss("wsld", needs_teacher=True)
def wsld(
    student_logits: Tensor,
    batch: Batch,
    alpha: float = 2.5,
    T: float = 2.0,
) -> LossDict:
    """WSLD: L = CE + alpha·T²·mean_i(w_i·H_i).

    H_i = -sum_k p_t^T[k]·log p_s^T[k] (soft cross-entropy at temperature T). The weight uses T = 1 and
    detached logits (no gradient): CE_s = -log softmax(z_s)[y], CE_t = -log softmax(z_t)[y],
    w_i = 1 - exp(-max(CE_s / (CE_t + 1e-7), 0)) in [0, 1].

    student_logits [B, C], batch['label'] [B], batch['teacher_logits'] [B, T_teachers, C] (several
    teachers: mean of logits) or batch['teacher_target'] of a compact bank (the weight from the true class's
    exact T = 1 log-probability, H over the kept classes and one tail bucket, :mod:`kd_losses.targets`). Defaults (ImageNet) alpha=2.5, T=2; CIFAR-100: alpha=2.25, T=4.
    Parts: ``ce``; ``kd`` = T²·mean(w·H) (unweighted by alpha); ``weight_mean`` = mean_i w_i.
    """
    z, y = student_and_labels(student_logits, batch)
    ce_term = cross_entropy(z, y, batch)
    with torch.no_grad():
        ce_s = -F.log_softmax(z.detach(), dim=1).gather(1, y[:, None]).squeeze(1)
        ce_t = -teacher_log_probs(batch, z.detach(), 1.0, "wsld")[0].gather(1, y[:, None]).squeeze(1)
        w = 1.0 - torch.exp(-torch.clamp_min(ce_s / (ce_t + 1e-7), 0.0))
    log_pt, tail = teacher_log_probs(batch, z, T, "wsld")
    h = soft_ce_rows(log_pt, F.log_softmax(z / T, dim=1), tail)
    kd_term = T * T * (w * h).mean()
    loss = ce_term + alpha * kd_term
    return loss_dict(loss, ce=ce_term, kd=kd_term, weight_mean=w.mean())
