"""Embedding-level distillation from stored pooled penultimate embeddings: RKD, PKT, SP, CRD, FitNet.

Batch keys, besides ``label`` [B] int64:

- ``student_features`` [B, D_s]: the student's pooled penultimate embedding (its classifier's input), with
  gradient.
- ``teacher_features`` [B, T, D_t]: the T teachers' stored embeddings. Detached here even if they require grad.
- ``index`` [B] int64: the global sample index in [0, num_samples) (CRD's memory rows; not range-checked, to
  avoid a device sync per step).
- ``teacher_logits`` [B, T, C]: only read when ``kd_weight > 0``.

Every loss returns ``loss = ce_weight·CE + weight·term (+ kd_weight·KD)`` and the detached parts ``ce``,
``<name>`` (the unweighted term) and, when ``kd_weight > 0``, ``kd`` = T²·KL(p_t^T || p_s^T) batchmean on the
mean of the teachers' logits (the term of the ``kd`` loss). With T > 1 teachers the relational terms (rkd,
pkt, sp) are averaged over teachers; crd and fitnet keep one learned head per teacher and average.
Inputs in fp16/bf16 are upcast: terms are computed in float32 (float64 stays float64).

Storage (why embeddings): fp16 pooled embeddings cost 2·D bytes per sample and view (ResNet-50 2048-d: 4 KB,
5.2 GB per ImageNet pass); a layer-4 map is ~50× that, so map-level methods stay live-only. The methods
below were published on feature maps or pooled features of CIFAR nets; here they see pooled embeddings
only, so their published weights are a starting point, not a reproduction.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kd_losses._common import (
    Batch,
    LossDict,
    compute_dtype,
    cross_entropy,
    kd_term,
    loss_dict,
    student_and_labels,
)
from kd_losses.registry import register_loss

# --- shared ------------------------------------------------------------------------------------------


def embeddings(z: Tensor, batch: Batch, loss_name: str) -> tuple[Tensor, Tensor]:
    """Validated student features [B, D_s] in the compute dtype, and teacher features [B, T, D_t] detached
    and cast to the same dtype and device. ``z`` [B, C] gives B."""
    b = z.shape[0]
    s = batch.get("student_features")
    if s is None:
        raise ValueError(f"loss {loss_name!r} needs batch['student_features'] of shape [B, D_s]")
    if s.ndim != 2 or s.shape[0] != b:
        raise ValueError(
            f"batch['student_features'] must be [B, D_s] = [{b}, D_s], got shape {tuple(s.shape)}"
        )
    t = batch.get("teacher_features")
    if t is None:
        raise ValueError(f"loss {loss_name!r} needs batch['teacher_features'] of shape [B, T, D_t]")
    if t.ndim != 3 or t.shape[0] != b:
        raise ValueError(
            f"batch['teacher_features'] must be [B, T, D_t] = [{b}, T, D_t], got shape {tuple(t.shape)}"
        )
    s = s.to(compute_dtype(s))
    return s, t.detach().to(device=s.device, dtype=s.dtype)


def _total(
    loss_name: str,
    z: Tensor,
    y: Tensor,
    batch: Batch,
    term: Tensor,
    ce_weight: float,
    weight: float,
    kd_weight: float,
    T: float,
) -> LossDict:
    """ce_weight·CE + weight·term (+ kd_weight·KD); parts ``ce``, ``loss_name`` and ``kd``."""
    ce_term = cross_entropy(z, y, batch)
    loss = ce_weight * ce_term + weight * term
    parts = {"ce": ce_term, loss_name: term}
    if kd_weight > 0:
        kd_value = kd_term(z, batch, T, loss_name)
        loss = loss + kd_weight * kd_value
        parts["kd"] = kd_value
    return loss_dict(loss, **parts)


def _check_built_dims(
    loss_name: str, s: Tensor, t: Tensor, student_dim: int, teacher_dim: int, num_teachers: int
) -> None:
    if s.shape[1] != student_dim:
        raise ValueError(
            f"loss {loss_name!r} built for student_dim={student_dim}, "
            f"got batch['student_features'] of shape {tuple(s.shape)}"
        )
    if t.shape[1] != num_teachers or t.shape[2] != teacher_dim:
        raise ValueError(
            f"loss {loss_name!r} built for num_teachers={num_teachers}, teacher_dim={teacher_dim}, "
            f"got batch['teacher_features'] of shape {tuple(t.shape)}"
        )


# --- RKD ---------------------------------------------------------------------------------------------


def _rkd_distances(e: Tensor, eps: float = 1e-12) -> Tensor:
    """[B, D] -> [B, B]: sqrt(max(‖e_i − e_j‖², eps)) with the diagonal 0, divided by the mean of its
    positive entries (official RKD ``pdist`` and ``d[d > 0].mean()``, here without a host sync)."""
    sq = e.pow(2).sum(dim=1)
    d = (sq[:, None] + sq[None, :] - 2.0 * e @ e.T).clamp(min=eps).sqrt()
    d = d.masked_fill(torch.eye(e.shape[0], dtype=torch.bool, device=e.device), 0.0)
    positive = d > 0
    return d / ((d * positive).sum() / positive.sum())


def _rkd_angles(e: Tensor) -> Tensor:
    """[B, D] -> [B, B, B]: a[i, j, k] = <n(e_j − e_i), n(e_k − e_i)>, n = normalize (mdistiller's layout;
    the same set of values as the paper's a_ijk with the vertex in the middle). Memory O(B²·D + B³)."""
    unit = F.normalize(e[None, :, :] - e[:, None, :], p=2, dim=2)
    return torch.bmm(unit, unit.transpose(1, 2))


def rkd_term(s: Tensor, t: Tensor, distance_weight: float = 25.0, angle_weight: float = 50.0) -> Tensor:
    """distance_weight·L_dist + angle_weight·L_angle averaged over teachers; s [B, D_s], t [B, T, D_t].

    Smooth-L1 (beta 1) averaged over all B² pairs / B³ triplets, degenerate ones included, as the official
    code. The teacher potentials carry no gradient. B < 2 has no pairs: the term is 0.
    """
    if s.shape[0] < 2:
        return s.sum() * 0.0
    d_s, a_s = _rkd_distances(s), _rkd_angles(s)
    with torch.no_grad():
        d_t = torch.stack([_rkd_distances(t[:, k]) for k in range(t.shape[1])])
        a_t = torch.stack([_rkd_angles(t[:, k]) for k in range(t.shape[1])])
    loss_d = F.smooth_l1_loss(d_s.expand_as(d_t), d_t)  # mean over [T, B, B] = mean over teachers
    loss_a = F.smooth_l1_loss(a_s.expand_as(a_t), a_t)
    return distance_weight * loss_d + angle_weight * loss_a


@register_loss("rkd", needs_teacher=True, needs_features=True)
def rkd(
    student_logits: Tensor,
    batch: Batch,
    weight: float = 1.0,
    distance_weight: float = 25.0,
    angle_weight: float = 50.0,
    ce_weight: float = 1.0,
    kd_weight: float = 0.0,
    T: float = 4.0,
) -> LossDict:
    """RKD (Park, Kim, Lu, Cho, CVPR 2019): match pairwise distances and triplet angles of the batch.

    Follows the official code (lenscloth/RKD) and mdistiller's ``rkd_loss``: distances with eps 1e-12 inside
    the square root, diagonal 0, normalised by their mean positive value; angles between normalised
    difference vectors; smooth-L1 for both. Scale-, rotation- and translation-invariant, so D_s ≠ D_t works.
    student_logits [B, C], batch['student_features'] [B, D_s], batch['teacher_features'] [B, T, D_t].
    Defaults (mdistiller) distance_weight=25, angle_weight=50, weight=1, ce_weight=1, kd_weight=0, T=4.
    Parts: ``ce``, ``rkd`` = distance_weight·L_dist + angle_weight·L_angle (without ``weight``), ``kd``.
    """
    z, y = student_and_labels(student_logits, batch)
    s, t = embeddings(z, batch, "rkd")
    term = rkd_term(s, t, distance_weight, angle_weight)
    return _total("rkd", z, y, batch, term, ce_weight, weight, kd_weight, T)


# --- PKT ---------------------------------------------------------------------------------------------


def _pkt_probs(x: Tensor, eps: float) -> Tensor:
    """[..., B, D] -> [..., B, B] conditional probabilities from cosine similarities (rows sum to 1)."""
    x = x / (torch.linalg.vector_norm(x, dim=-1, keepdim=True) + eps)
    k = (x @ x.transpose(-1, -2) + 1.0) / 2.0
    return k / k.sum(dim=-1, keepdim=True)


def pkt_term(s: Tensor, t: Tensor, eps: float = 1e-7) -> Tensor:
    """mean over all B² entries of P_t·log((P_t + eps)/(P_s + eps)), averaged over teachers.
    s [B, D_s], t [B, T, D_t]."""
    p_s = _pkt_probs(s, eps)
    p_t = _pkt_probs(t.transpose(0, 1), eps)  # [T, B, B]
    return (p_t * torch.log((p_t + eps) / (p_s + eps))).mean()


@register_loss("pkt", needs_teacher=True, needs_features=True)
def pkt(
    student_logits: Tensor,
    batch: Batch,
    weight: float = 1.0,
    ce_weight: float = 1.0,
    kd_weight: float = 0.0,
    T: float = 4.0,
) -> LossDict:
    """PKT (Passalis & Tefas, ECCV 2018): match the batch's cosine-similarity distributions.

    Official code (passalis/probabilistic_kt ``cosine_similarity_loss``): rows divided by (‖x‖ + 1e-7),
    K = (x·xᵀ + 1)/2, rows normalised to sum 1, same for the teacher; term = mean of P_t·log((P_t + eps) /
    (P_s + eps)), eps 1e-7. The official NaN-to-0 replacement is not needed: a zero row gives 0, not NaN.
    student_logits [B, C], batch['student_features'] [B, D_s], batch['teacher_features'] [B, T, D_t].

    Default weight=1.0 (the raw term), not RepDistiller/mdistiller's 30000: the term is a mean over B²
    entries of row-stochastic matrices, so it shrinks like 1/B (≈ KL/B), and 30000 was tuned for B=64 on
    pooled CIFAR features; a weight copied silently would not transfer to other batch sizes or embeddings.
    Pass weight=30000 (at B=64) to follow RepDistiller. Defaults ce_weight=1, kd_weight=0, T=4.
    Parts: ``ce``, ``pkt`` (without ``weight``), ``kd``.
    """
    z, y = student_and_labels(student_logits, batch)
    s, t = embeddings(z, batch, "pkt")
    return _total("pkt", z, y, batch, pkt_term(s, t), ce_weight, weight, kd_weight, T)


# --- SP ----------------------------------------------------------------------------------------------


def sp_term(s: Tensor, t: Tensor) -> Tensor:
    """‖G_s − G_t‖²_F / B² with G = A·Aᵀ row-L2-normalised, averaged over teachers.
    s [B, D_s], t [B, T, D_t]."""
    b = s.shape[0]
    g_s = F.normalize(s @ s.T, p=2, dim=1)
    a_t = t.transpose(0, 1)  # [T, B, D_t]
    g_t = F.normalize(a_t @ a_t.transpose(1, 2), p=2, dim=2)
    return (g_t - g_s).pow(2).sum(dim=(1, 2)).mean() / (b * b)


@register_loss("sp", needs_teacher=True, needs_features=True)
def sp(
    student_logits: Tensor,
    batch: Batch,
    weight: float = 1.0,
    ce_weight: float = 1.0,
    kd_weight: float = 0.0,
    T: float = 4.0,
) -> LossDict:
    """SP, similarity-preserving KD (Tung & Mori, ICCV 2019), on embeddings: A = the [B, D] embeddings.

    G = A·Aᵀ with each row L2-normalised (``F.normalize(G, dim=1)`` as the official code / RepDistiller's
    ``Similarity``); term = ‖G_s − G_t‖²_F / B². Defined on flattened feature maps in the paper.
    student_logits [B, C], batch['student_features'] [B, D_s], batch['teacher_features'] [B, T, D_t].

    Default weight=1.0 (the raw term), not RepDistiller's 3000: the term is divided by B², which 3000
    compensates for B=64 on CIFAR feature maps; pass weight=3000 to follow RepDistiller.
    Defaults ce_weight=1, kd_weight=0, T=4. Parts: ``ce``, ``sp`` (without ``weight``), ``kd``.
    """
    z, y = student_and_labels(student_logits, batch)
    s, t = embeddings(z, batch, "sp")
    return _total("sp", z, y, batch, sp_term(s, t), ce_weight, weight, kd_weight, T)


# --- FitNet ------------------------------------------------------------------------------------------


@register_loss("fitnet", needs_teacher=True, needs_features=True)
class FitNetLoss(nn.Module):
    """FitNet hint (Romero et al., ICLR 2015) on embeddings: a learned linear regressor D_s → D_t per teacher.

    term = mean over teachers of MSE(regressor_k(s), t_k), MSE averaged over batch and dims. The paper (and
    RepDistiller / mdistiller's ``ConvReg``) regresses intermediate feature maps with a conv regressor;
    on embeddings it is ``nn.Linear(D_s, D_t)`` with bias, initialised from the global RNG at construction.
    Default weight=1.0; RepDistiller and mdistiller use 100 on feature maps (``-b 100``, FEAT_WEIGHT 100),
    a different target scale. Defaults ce_weight=1, kd_weight=0, T=4.
    forward: student_logits [B, C], batch['student_features'] [B, D_s], batch['teacher_features']
    [B, num_teachers, D_t] -> dict with ``loss``, ``ce``, ``fitnet`` (without ``weight``), ``kd``.
    """

    def __init__(
        self,
        student_dim: int,
        teacher_dim: int,
        num_teachers: int = 1,
        weight: float = 1.0,
        ce_weight: float = 1.0,
        kd_weight: float = 0.0,
        T: float = 4.0,
    ) -> None:
        super().__init__()
        self.student_dim = student_dim
        self.teacher_dim = teacher_dim
        self.num_teachers = num_teachers
        self.weight = weight
        self.ce_weight = ce_weight
        self.kd_weight = kd_weight
        self.T = T
        self.regressors = nn.ModuleList(nn.Linear(student_dim, teacher_dim) for _ in range(num_teachers))

    def forward(self, student_logits: Tensor, batch: Batch) -> LossDict:
        z, y = student_and_labels(student_logits, batch)
        s, t = embeddings(z, batch, "fitnet")
        _check_built_dims("fitnet", s, t, self.student_dim, self.teacher_dim, self.num_teachers)
        s_in = s.to(self.regressors[0].weight.dtype)
        term = torch.stack(
            [F.mse_loss(reg(s_in).to(s.dtype), t[:, k]) for k, reg in enumerate(self.regressors)]
        ).mean()
        return _total("fitnet", z, y, batch, term, self.ce_weight, self.weight, self.kd_weight, self.T)

    def extra_repr(self) -> str:
        return f"'fitnet', weight={self.weight!r}, ce_weight={self.ce_weight!r}, kd_weight={self.kd_weight!r}"


# --- CRD ---------------------------------------------------------------------------------------------


class LocalSync:
    """One process: every rank's batch is this batch (see :class:`pipeline.distributed.BatchSync`)."""

    def gather(self, t: Tensor) -> Tensor:
        return t

    def mean(self, value: Tensor, count: int) -> Tensor:
        return value


def _sample_index(batch: Batch, b: int, device: torch.device) -> Tensor:
    """batch['index'] [B] as int64 on ``device``."""
    idx = batch.get("index")
    if idx is None:
        raise ValueError("loss 'crd' needs batch['index'] (int64 global sample indices of shape [B])")
    if idx.shape != (b,) or idx.is_floating_point():
        raise ValueError(f"batch['index'] must be integer [B] = [{b}], got {idx.dtype} of shape {tuple(idx.shape)}")
    return idx.to(device=device, dtype=torch.long)


def nce_loss(x: Tensor, num_samples: int, eps: float = 1e-7) -> Tensor:
    """RepDistiller's ``ContrastLoss``: x [B, 1 + m] = exp(<m, v>/τ)/Z, the positive in column 0.

    With P_n = 1/num_samples: -(Σ_i log(x_i0 / (x_i0 + m·P_n + eps)) + Σ_ij log(m·P_n / (x_ij + m·P_n + eps))) / B.
    """
    m_pn = (x.shape[1] - 1) * (1.0 / float(num_samples))
    log_d1 = torch.log(x[:, 0] / (x[:, 0] + m_pn + eps))
    log_d0 = torch.log(m_pn / (x[:, 1:] + m_pn + eps))
    return -(log_d1.sum() + log_d0.sum()) / x.shape[0]


@register_loss("crd", needs_teacher=True, needs_features=True)
class CRDLoss(nn.Module):
    """CRD (Tian, Krishnan, Isola, ICLR 2020), as RepDistiller's ``CRDLoss``, on stored teacher embeddings.

    Per teacher k: heads v_s = normalize(Linear(D_s, feat_dim)(s)), v_t = normalize(Linear(D_t, feat_dim)(t_k));
    two memories [num_samples, feat_dim] (buffers ``memory_student`` / ``memory_teacher`` [T, N, feat_dim],
    RepDistiller's memory_v1 / memory_v2), initialised uniform(−stdv, stdv), stdv = 1/sqrt(feat_dim/3).
    For each sample: indices [index, nce_k negatives] drawn uniformly from [0, num_samples) with torch's
    global RNG (``torch.randint`` on the memories' device, so the checkpointed RNG state makes a resume
    bit-exact; the positive's index may be drawn as a negative, as with RepDistiller's AliasMethod);
    out_s = exp(<memory_teacher[idx], v_s>/nce_t) / Z_s, out_t = exp(<memory_student[idx], v_t>/nce_t) / Z_t;
    term = nce_loss(out_s) + nce_loss(out_t), averaged over teachers. Z = mean(out)·num_samples of the first
    batch, kept in buffers ``z_student`` / ``z_teacher`` [T] (-1 = unset) so they survive state_dict.
    In training mode the rows at batch['index'] are then updated: m ← normalize(momentum·m + (1 − momentum)·v).
    Each teacher gets its own pair of heads and memories (T independent RepDistiller CRDs; T = 1 is RepDistiller).

    Defaults (RepDistiller ``-r 1 -a 0 -b 0.8``): weight=0.8, ce_weight=1, kd_weight=0, T=4, feat_dim=128,
    nce_k=16384, nce_t=0.07, momentum=0.5. nce_k must be < num_samples.
    Costs: the memories are 2·T·N·feat_dim·4 bytes of buffers, saved with every checkpoint (ImageNet-1k,
    T=1: 1.3 GB); each step gathers 2·T·B·(nce_k+1)·feat_dim·4 bytes (B=256: 4.3 GB per teacher).
    Several processes: the memory updates and Z use every rank's batch through ``self.sync`` (a
    :class:`LocalSync` by default; stage 2 sets :class:`pipeline.distributed.BatchSync`, which all-gathers the
    indices and embeddings and averages Z's batch mean over ranks), so every rank holds the same memories and Z,
    the ones a single process with the global batch would hold.
    forward: student_logits [B, C], batch['student_features'] [B, D_s], batch['teacher_features']
    [B, T, D_t], batch['index'] [B]; ``negatives`` [T, B, nce_k] overrides the draw. Returns ``loss``,
    ``ce``, ``crd`` (without ``weight``), ``kd``.
    """

    def __init__(
        self,
        num_samples: int,
        student_dim: int,
        teacher_dim: int,
        num_teachers: int = 1,
        weight: float = 0.8,
        ce_weight: float = 1.0,
        feat_dim: int = 128,
        nce_k: int = 16384,
        nce_t: float = 0.07,
        momentum: float = 0.5,
        kd_weight: float = 0.0,
        T: float = 4.0,
    ) -> None:
        super().__init__()
        if not 1 <= nce_k < num_samples:
            raise ValueError(
                f"loss 'crd': nce_k={nce_k} negatives need 1 <= nce_k < num_samples={num_samples}; "
                f"pass loss.nce_k=K with K at most {num_samples - 1} (e.g. loss.nce_k={min(4096, num_samples - 1)})"
            )
        self.num_samples = num_samples
        self.student_dim = student_dim
        self.teacher_dim = teacher_dim
        self.num_teachers = num_teachers
        self.weight = weight
        self.ce_weight = ce_weight
        self.nce_k = nce_k
        self.nce_t = nce_t
        self.momentum = momentum
        self.kd_weight = kd_weight
        self.T = T
        self.embed_student = nn.ModuleList(nn.Linear(student_dim, feat_dim) for _ in range(num_teachers))
        self.embed_teacher = nn.ModuleList(nn.Linear(teacher_dim, feat_dim) for _ in range(num_teachers))
        stdv = 1.0 / math.sqrt(feat_dim / 3)
        shape = (num_teachers, num_samples, feat_dim)
        self.register_buffer("memory_student", torch.rand(shape).mul_(2 * stdv).add_(-stdv))
        self.register_buffer("memory_teacher", torch.rand(shape).mul_(2 * stdv).add_(-stdv))
        self.register_buffer("z_student", torch.full((num_teachers,), -1.0))
        self.register_buffer("z_teacher", torch.full((num_teachers,), -1.0))
        self.sync: Any = LocalSync()

    def _scores(self, memory: Tensor, z_const: Tensor, idx: Tensor, v: Tensor) -> Tensor:
        """exp(<memory[idx], v>/nce_t) / Z, [B, K+1]; sets Z (in place) from this batch (every rank's) if unset."""
        weights = memory[idx].to(v.dtype)  # [B, K+1, F], a copy: no gradient into the memory
        out = torch.exp(torch.bmm(weights, v[:, :, None]).squeeze(2) / self.nce_t)
        with torch.no_grad():
            if bool(z_const < 0):
                z_const.copy_(self.sync.mean(out.mean().to(z_const.dtype), out.shape[0]) * self.num_samples)
        return out / z_const.detach().clone().to(out.dtype)

    @torch.no_grad()
    def _update(self, memory: Tensor, idx: Tensor, v: Tensor) -> None:
        """m[idx] <- normalize(momentum·m[idx] + (1 - momentum)·v) for every rank's rows (idx [B], v [B, F])."""
        idx, v = self.sync.gather(idx), self.sync.gather(v.detach())
        rows = memory.index_select(0, idx) * self.momentum + v.to(memory.dtype) * (1.0 - self.momentum)
        memory.index_copy_(0, idx, F.normalize(rows, p=2, dim=1))

    def forward(self, student_logits: Tensor, batch: Batch, negatives: Tensor | None = None) -> LossDict:
        z, y = student_and_labels(student_logits, batch)
        s, t = embeddings(z, batch, "crd")
        _check_built_dims("crd", s, t, self.student_dim, self.teacher_dim, self.num_teachers)
        b, n_t, device = s.shape[0], self.num_teachers, self.memory_student.device
        idx = _sample_index(batch, b, device)
        if negatives is None:
            negatives = torch.randint(0, self.num_samples, (n_t, b, self.nce_k), device=device)
        elif negatives.shape != (n_t, b, self.nce_k):
            raise ValueError(
                f"negatives must be [T, B, nce_k] = [{n_t}, {b}, {self.nce_k}], got {tuple(negatives.shape)}"
            )
        contrast = torch.cat([idx[None, :, None].expand(n_t, b, 1), negatives.to(device, torch.long)], dim=2)
        w_dtype = self.embed_student[0].weight.dtype
        terms = []
        for k in range(n_t):
            v_s = F.normalize(self.embed_student[k](s.to(w_dtype)), p=2, dim=1).to(s.dtype)
            v_t = F.normalize(self.embed_teacher[k](t[:, k].to(w_dtype)), p=2, dim=1).to(s.dtype)
            out_s = self._scores(self.memory_teacher[k], self.z_student[k], contrast[k], v_s)
            out_t = self._scores(self.memory_student[k], self.z_teacher[k], contrast[k], v_t)
            terms.append(nce_loss(out_s, self.num_samples) + nce_loss(out_t, self.num_samples))
            if self.training:
                self._update(self.memory_student[k], idx, v_s)
                self._update(self.memory_teacher[k], idx, v_t)
        term = torch.stack(terms).mean()
        return _total("crd", z, y, batch, term, self.ce_weight, self.weight, self.kd_weight, self.T)

    def extra_repr(self) -> str:
        return (
            f"'crd', num_samples={self.num_samples}, nce_k={self.nce_k}, nce_t={self.nce_t!r}, "
            f"momentum={self.momentum!r}, weight={self.weight!r}, ce_weight={self.ce_weight!r}, "
            f"kd_weight={self.kd_weight!r}"
        )
