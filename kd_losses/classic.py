"""Label-only baselines (CE, label smoothing) and Hinton KD.

Reductions are explicit: per-sample terms are summed over classes and averaged over the batch
("batchmean"). ``T`` is always the temperature (not the number of teachers).
"""

from __future__ import annotations

from typing import Literal

import torch.nn.functional as F
from torch import Tensor

from kd_losses._common import (
    Batch,
    LossDict,
    check_choice,
    cross_entropy,
    kd_term,
    loss_dict,
    mixed_labels,
    student_and_labels,
)
from kd_losses.registry import register_loss


@register_loss("ce", needs_teacher=False)
def ce(student_logits: Tensor, batch: Batch) -> LossDict:
    """Cross-entropy with hard labels: L = mean_i -log softmax(z_s)_i[y_i].

    student_logits [B, C], batch['label'] [B]. Parts: ``ce``.
    """
    z, y = student_and_labels(student_logits, batch)
    loss = cross_entropy(z, y, batch)
    return loss_dict(loss, ce=loss)


@register_loss("ls", needs_teacher=False)
def ls(
    student_logits: Tensor,
    batch: Batch,
    eps: float = 0.1,
    convention: Literal["uniform", "tfkd"] = "uniform",
) -> LossDict:
    """Label smoothing: L = mean_i H(q_i, softmax(z_s)_i), K classes.

    - ``convention="uniform"`` (PyTorch ``label_smoothing``): q = (1-eps)·onehot(y) + eps/K.
    - ``convention="tfkd"`` (Yuan et al., CVPR 2020 released code): q = 1-eps on y, eps/(K-1) elsewhere.

    Mixed batches (``label_mix``, ``lam``): q = lam·q(label) + (1 − lam)·q(label_mix) (timm's ``mixup_target``
    for the uniform convention).

    student_logits [B, C], batch['label'] [B]. Defaults eps=0.1, convention="uniform".
    Parts: ``ce`` (plain hard-label CE, logged only; the mixed one for mixed batches).
    """
    check_choice("ls", "convention", convention, ("uniform", "tfkd"))
    z, y = student_and_labels(student_logits, batch)
    k = z.shape[1]

    def smoothed(labels: Tensor) -> Tensor:
        onehot = F.one_hot(labels, k).to(z.dtype)
        if convention == "uniform":
            return (1.0 - eps) * onehot + eps / k
        return (1.0 - eps) * onehot + (1.0 - onehot) * (eps / (k - 1))

    q = smoothed(y)
    mix = mixed_labels(batch, y)
    if mix is not None:
        lam = mix[1].to(z.dtype)[:, None]
        q = lam * q + (1.0 - lam) * smoothed(mix[0])
    log_p = F.log_softmax(z, dim=1)
    loss = -(q * log_p).sum(dim=1).mean()
    return loss_dict(loss, ce=F.nll_loss(log_p, y) if mix is None else cross_entropy(z, y, batch))


@register_loss("kd", needs_teacher=True)
def kd(
    student_logits: Tensor,
    batch: Batch,
    alpha: float = 0.9,
    T: float = 4.0,
) -> LossDict:
    """Hinton KD (Hinton et al., 2015): L = (1-alpha)·CE + alpha·T²·KL(p_t^T || p_s^T), batchmean.

    student_logits [B, C], batch['label'] [B], batch['teacher_logits'] [B, T_teachers, C] (several teachers are
    merged by averaging their logits) or batch['teacher_target'] of a compact bank (KL over the kept classes and
    one tail bucket, :mod:`kd_losses.targets`). Defaults alpha=0.9, T=4.
    Parts: ``ce``; ``kd`` = T²·KL (unweighted by alpha).
    """
    z, y = student_and_labels(student_logits, batch)
    ce_term = cross_entropy(z, y, batch)
    kd_value = kd_term(z, batch, T, "kd")
    loss = (1.0 - alpha) * ce_term + alpha * kd_value
    return loss_dict(loss, ce=ce_term, kd=kd_value)
