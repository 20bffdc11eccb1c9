"""Label optimization family (SL, SL-Ens, SL-KD, SL-Enc), "Label Optimization" (ICCV 2021 submission).

The student learns from the teacher's soft label alone (no one-hot term):
    L = alpha·T²·mean_i H(softmax(z_t/T)_i, softmax(z_s/T)_i), H the soft cross-entropy.
The released code does not run as published and never implemented SL-Ens / SL-KD; the README tables are
the specification, so those two follow the README's one-line descriptions.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kd_losses._common import (
    Batch,
    LossDict,
    cross_entropy,
    loss_dict,
    soft_ce_rows,
    student_and_labels,
    teacher_logits,
)
from kd_losses.registry import register_loss
from kd_losses.targets import teacher_log_probs, teacher_log_probs_each


def _soft_label_term(log_p_t: Tensor, z: Tensor, T: float, tail: Tensor | None = None) -> Tensor:
    """T²·mean_i H(p_t, p_s^T); log_p_t [B, C], z [B, C] (``tail``: a compact bank's tail bucket) -> scalar."""
    return T * T * soft_ce_rows(log_p_t, F.log_softmax(z / T, dim=1), tail).mean()


@register_loss("sl", needs_teacher=True)
def sl(
    student_logits: Tensor,
    batch: Batch,
    alpha: float = 0.1,
    T: float = 3.0,
    use_gt: bool = False,
) -> LossDict:
    """SL: L = alpha·T²·mean_i H(softmax(z_t/T), softmax(z_s/T)); no one-hot term.

    ``use_gt=True`` adds onehot(y) to the teacher logits before the softmax. Several teachers are merged
    by averaging their logits. student_logits [B, C], batch['teacher_logits'] [B, T_teachers, C].
    Defaults (released code) alpha=0.1, T=3, use_gt=False. Parts: ``kd`` = T²·mean H (without alpha);
    ``ce`` = hard-label CE, logged only (not in the loss).
    """
    z, y = student_and_labels(student_logits, batch)
    log_pt, tail = teacher_log_probs(batch, z, T, "sl", use_gt)
    kd_term = _soft_label_term(log_pt, z, T, tail)
    return loss_dict(alpha * kd_term, ce=cross_entropy(z, y, batch), kd=kd_term)


@register_loss("sl_ens", needs_teacher=True, merge="mean_probs")
def sl_ens(
    student_logits: Tensor,
    batch: Batch,
    alpha: float = 0.1,
    T: float = 3.0,
    use_gt: bool = False,
) -> LossDict:
    """SL-Ens: one soft label from N teachers, p = (1/N)·sum_n softmax(z_t,n/T); then as ``sl``.

    Probabilities (not logits) are averaged, computed as logsumexp of log-probs - log N.
    student_logits [B, C], batch['teacher_logits'] [B, N, C]. Defaults alpha=0.1, T=3, use_gt=False.
    Parts: ``kd`` (without alpha), ``ce`` (logged only).
    """
    z, y = student_and_labels(student_logits, batch)
    log_p, tail = teacher_log_probs_each(batch, z, T, "sl_ens", use_gt)  # [B, N, C]
    log_p_ens = torch.logsumexp(log_p, dim=1) - math.log(log_p.shape[1])
    kd_term = _soft_label_term(log_p_ens, z, T, None if tail is None else tail.all(dim=1))
    return loss_dict(alpha * kd_term, ce=cross_entropy(z, y, batch), kd=kd_term)


@register_loss("sl_kd", needs_teacher=True, merge="each")
def sl_kd(
    student_logits: Tensor,
    batch: Batch,
    alpha: float = 0.1,
    T: float = 3.0,
    use_gt: bool = False,
) -> LossDict:
    """SL-KD: one soft-label loss per teacher, summed: L = alpha·sum_n T²·mean_i H(p_t,n^T, p_s^T).

    With N identical teachers this is N × ``sl``. student_logits [B, C], batch['teacher_logits']
    [B, N, C]. Defaults alpha=0.1, T=3, use_gt=False. Parts: ``kd`` (sum, without alpha), ``ce``.
    """
    z, y = student_and_labels(student_logits, batch)
    log_p, tail = teacher_log_probs_each(batch, z, T, "sl_kd", use_gt)  # [B, N, C]
    log_ps = F.log_softmax(z / T, dim=1)[:, None, :]
    kd_term = T * T * soft_ce_rows(log_p, log_ps, tail).mean(dim=0).sum()
    return loss_dict(alpha * kd_term, ce=cross_entropy(z, y, batch), kd=kd_term)


@register_loss("sl_enc", needs_teacher=True, sparse_formats=(),
               sparse_reason="its learned perturbation moves every class's logit, and a compact bank does not "
                             "know the tail's")
class SLEncLoss(nn.Module):
    """SL-Enc: the teacher's logits plus a learned perturbation g(eps), trained with the student.

    target = softmax((z_t + g(eps)) / T), g = Linear(noise_dim, hidden)-ReLU-Linear(hidden, K)-softmax,
    eps ~ N(0, noise_std² I) of shape [B, noise_dim], drawn per sample per call (pass ``noise`` or ``generator``
    for determinism; ``noise_std=0``: eps = 0, a deterministic learned offset, nothing drawn). g's output lies in the simplex, so the perturbation moves each logit by at most 1.
    L = alpha·T²·mean_i H(target_i, softmax(z_s/T)_i); gradients reach both the student and g.
    Several teachers: mean of logits. Defaults noise_dim=100, hidden=50, T=3, alpha=0.1, noise_std=1.
    forward: student_logits [B, K], batch['teacher_logits'] [B, T_teachers, K] -> dict with ``loss``,
    ``kd`` (without alpha), ``ce`` (logged only).
    """

    def __init__(
        self,
        num_classes: int,
        noise_dim: int = 100,
        hidden: int = 50,
        T: float = 3.0,
        alpha: float = 0.1,
        noise_std: float = 1.0,
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.noise_std = noise_std
        self.noise_dim = noise_dim
        self.T = T
        self.alpha = alpha
        self.g = nn.Sequential(
            nn.Linear(noise_dim, hidden),
            nn.ReLU(),
            nn.Linear(hidden, num_classes),
            nn.Softmax(dim=-1),
        )

    def forward(
        self,
        student_logits: Tensor,
        batch: Batch,
        noise: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> LossDict:
        z, y = student_and_labels(student_logits, batch)
        if z.shape[1] != self.num_classes:
            raise ValueError(
                f"loss 'sl_enc' built for num_classes={self.num_classes}, "
                f"got student_logits of shape {tuple(student_logits.shape)}"
            )
        zt = teacher_logits(batch, z, "sl_enc").mean(dim=1)
        weight = self.g[0].weight
        if noise is None and self.noise_std == 0:
            noise = torch.zeros(z.shape[0], self.noise_dim, device=weight.device, dtype=weight.dtype)
        elif noise is None:
            noise = self.noise_std * torch.randn(
                z.shape[0], self.noise_dim, generator=generator, device=weight.device, dtype=weight.dtype
            )
        perturbation = self.g(noise.to(device=weight.device, dtype=weight.dtype)).to(z.dtype)
        log_target = F.log_softmax((zt + perturbation) / self.T, dim=1)
        kd_term = _soft_label_term(log_target, z, self.T)
        return loss_dict(self.alpha * kd_term, ce=cross_entropy(z, y, batch), kd=kd_term)

    def extra_repr(self) -> str:
        return f"'sl_enc', num_classes={self.num_classes}, T={self.T!r}, alpha={self.alpha!r}"
