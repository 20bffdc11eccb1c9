"""Teacher-free KD (Tf-KD): Yuan et al., "Revisiting Knowledge Distillation via Label Smoothing
Regularization", CVPR 2020."""

from __future__ import annotations

import math
from typing import Literal

import torch.nn.functional as F
from torch import Tensor

from kd_losses._common import (
    Batch,
    LossDict,
    check_choice,
    cross_entropy,
    kd_term,
    kl_rows,
    loss_dict,
    student_and_labels,
)
from kd_losses.registry import register_loss


@register_loss("tfkd_self", needs_teacher=True)
def tfkd_self(
    student_logits: Tensor,
    batch: Batch,
    alpha: float = 0.95,
    T: float = 6.0,
    multiplier: float = 1.0,
) -> LossDict:
    """Tf-KD self-training: L = (1-alpha)·CE + alpha·multiplier·T²·KL(p_t^T || p_s^T), batchmean.

    The teacher is a normally trained model of the student's own architecture (its stored logits).
    The released code reduces KL with PyTorch's 'mean' (÷ B·K); its multipliers (1–100) compensate that,
    so a repo multiplier m corresponds to m/K here. Defaults alpha=0.95, T=6, multiplier=1 (paper range:
    alpha 0.9–0.95, T 6–20). student_logits [B, C], batch['teacher_logits'] [B, T_teachers, C] (mean of
    logits over teachers) or batch['teacher_target'] (:mod:`kd_losses.targets`). Parts: ``ce``; ``kd`` = T²·KL
    (without alpha, multiplier).
    """
    z, y = student_and_labels(student_logits, batch)
    ce_term = cross_entropy(z, y, batch)
    kd_value = kd_term(z, batch, T, "tfkd_self")
    loss = (1.0 - alpha) * ce_term + alpha * multiplier * kd_value
    return loss_dict(loss, ce=ce_term, kd=kd_value)


@register_loss("tfkd_reg", needs_teacher=False)
def tfkd_reg(
    student_logits: Tensor,
    batch: Batch,
    alpha: float = 0.1,
    T: float = 20.0,
    a: float = 0.99,
    multiplier: float = 1.0,
    form: Literal["paper", "reference"] = "paper",
) -> LossDict:
    """Tf-KD with a manually designed teacher built from labels alone (no teacher logits).

    p^d[k] = a if k = y else (1-a)/(K-1).
    - ``form="paper"`` (Eq. 9): kd = T²·KL(p^d_T || p_s^T) batchmean, p^d_T = softmax(log(p^d)/T).
    - ``form="reference"`` (released code): kd = KL(softmax(p^d/T) || softmax(z_s)) summed over all
      elements and divided by B·K (KLDivLoss 'mean'), no T², student without temperature.
    Difference in one line: paper softens log-probabilities with T and scales by T²; the code applies
    softmax to the probabilities (a nearly uniform target) and divides by B·K.
    L = (1-alpha)·CE + alpha·multiplier·kd.

    student_logits [B, C], batch['label'] [B]. Defaults alpha=0.1, T=20 (ImageNet recipe), a=0.99,
    multiplier=1, form="paper". Requires 0 < a < 1. Parts: ``ce``, ``kd`` (without alpha, multiplier).
    """
    check_choice("tfkd_reg", "form", form, ("paper", "reference"))
    if not 0.0 < a < 1.0:
        raise ValueError(f"loss 'tfkd_reg': a must be in (0, 1); got {a!r}")
    z, y = student_and_labels(student_logits, batch)
    b, k = z.shape
    onehot = F.one_hot(y, k).to(z.dtype)
    ce_term = cross_entropy(z, y, batch)
    if form == "paper":
        log_pd = onehot * math.log(a) + (1.0 - onehot) * math.log((1.0 - a) / (k - 1))
        log_target = F.log_softmax(log_pd / T, dim=1)
        kd_term = T * T * kl_rows(log_target, F.log_softmax(z / T, dim=1)).mean()
    else:
        pd = onehot * a + (1.0 - onehot) * ((1.0 - a) / (k - 1))
        log_target = F.log_softmax(pd / T, dim=1)
        kd_term = kl_rows(log_target, F.log_softmax(z, dim=1)).sum() / (b * k)
    loss = (1.0 - alpha) * ce_term + alpha * multiplier * kd_term
    return loss_dict(loss, ce=ce_term, kd=kd_term)
