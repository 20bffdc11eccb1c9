"""DIST: Huang et al., "Knowledge Distillation from A Stronger Teacher", NeurIPS 2022; follows the
official ``DIST`` loss (hunto/image_classification_sota, lib/models/losses/dist_kd.py)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from kd_losses._common import (
    Batch,
    LossDict,
    cross_entropy,
    loss_dict,
    student_and_labels,
)
from kd_losses.registry import register_loss
from kd_losses.targets import teacher_log_probs


def pearson_rows(a: Tensor, b: Tensor, eps: float = 1e-8) -> Tensor:
    """Pearson correlation between matching rows, [N, M] x [N, M] -> [N] (official eps=1e-8)."""
    a = a - a.mean(dim=1, keepdim=True)
    b = b - b.mean(dim=1, keepdim=True)
    return (a * b).sum(dim=1) / (a.norm(dim=1) * b.norm(dim=1) + eps)


@register_loss("dist", needs_teacher=True, sparse_formats=("topk",),
               sparse_reason="its Pearson correlations are nonlinear in the whole distribution, which an "
                             "importance-sampled target estimates only on average")
def dist(
    student_logits: Tensor,
    batch: Batch,
    beta: float = 1.0,
    gamma: float = 1.0,
    T: float = 1.0,
) -> LossDict:
    """DIST: L = CE + beta·inter + gamma·intra, with p = softmax(z/T) [B, C] for student and teacher:

    inter = T²·(1 - mean_i pearson(p_s[i, :], p_t[i, :]))   (rows: inter-class relation per sample)
    intra = T²·(1 - mean_k pearson(p_s[:, k], p_t[:, k]))   (columns: intra-class relation over batch)

    Defaults are the official ImageNet ones: beta=1, gamma=1, T (tau)=1 (CIFAR-100 setups commonly use
    beta=gamma=2, T=4). The intra term depends on the batch composition; B >= 2.
    student_logits [B, C], batch['teacher_logits'] [B, T_teachers, C] (mean of logits) or a top-k bank's
    batch['teacher_target']: the kept classes exact at T and the tail's exact mass at T spread evenly over its
    classes (the bank does not know the tail's shape; :mod:`kd_losses.targets`). Sampled banks are refused.
    Parts: ``ce``, ``inter``, ``intra`` (unweighted, with T²).
    """
    z, y = student_and_labels(student_logits, batch)
    ps = F.softmax(z / T, dim=1)
    pt = teacher_log_probs(batch, z, T, "dist")[0].exp()
    ce_term = cross_entropy(z, y, batch)
    inter = T * T * (1.0 - pearson_rows(ps, pt).mean())
    intra = T * T * (1.0 - pearson_rows(ps.t(), pt.t()).mean())
    loss = ce_term + beta * inter + gamma * intra
    return loss_dict(loss, ce=ce_term, inter=inter, intra=intra)
