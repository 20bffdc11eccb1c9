"""The teacher's target at a loss's temperature, from dense logits or from a compact bank's sparse payload.

Every loss that reads a teacher goes through :func:`teacher_log_probs` (one merged teacher) or
:func:`teacher_log_probs_each` (one per teacher); the batch holds either ``teacher_logits`` [B, N, C] (dense and
int8 banks, a live teacher) or ``teacher_target``, a :class:`SparseTarget` (top-k and sampled banks, built by
:mod:`pipeline.bank.resident`). Both helpers return log-probabilities at temperature T and a ``tail`` mask (None
for dense targets): the classes the bank does not know one by one, which the divergences of
:mod:`kd_losses._common` pool into ONE bucket on both sides (the student's tail probabilities summed), so an
unknown tail is never spread over its classes and re-softened.

The math (notation of :mod:`pipeline.bank.compact`): l the teacher's log-probabilities at T = 1, S the kept
classes (top K and the true class y), R the rest (m classes), F(beta) = log sum_R exp(beta l) stored at the grid
``tail_temperatures`` and interpolated linearly in beta = 1/T in between (F(0) = log m). At temperature T:

- ``topk``: p^T_k = exp(l_k / T - log Z_T) for k in S, and the tail bucket holds exp(F(1/T) - log Z_T), with
  Z_T = sum_S exp(l_k / T) + exp(F(1/T)): the teacher's exact coarse-grained distribution (exact on the grid).
  KL and soft cross-entropy over the buckets are the dense ones minus the within-tail term the bank cannot know
  (for KL: a lower bound, whose student gradient leaves the shape inside the tail to the student). In the dense
  tensor the tail classes each hold 1/m of the bucket (what a method that needs every class, DIST, sees).
- ``sampled`` (Sparse Logit Sampling, Anshumann et al., ACL 2025, arXiv 2503.16870): kept classes as above; the S
  stored draws j_1..j_S come from the proposal q_j = exp(l_j / T_q - F(1/T_q)) on R (T_q = 1) and share the tail's
  exact mass at T, M_T = exp(F(1/T) - log Z_T), by self-normalized importance weights: draw n gets
  M_T · r_n / sum_m r_m with r_n = exp(l_{j_n} (1/T - 1/T_q)) (proportional to p^T / q); classes never drawn get 0.
  At T = T_q = 1 every r_n is 1: each draw holds P_R / S, the unbiased random-sampling target of the paper
  (E[target] = p, so losses linear in it, KD, Tf-KD, WSLD, SL, SL-Ens, SL-KD, get unbiased gradients). At other
  temperatures the plain importance weights (1/S) p^T/q are unbiased too, but their variance explodes when the
  target is much flatter than the proposal (a tail class with p = 1e-4 and p^T = 1e-2 weighs 100 P_R / S): measured
  on the 100-class pairs task (BENCHMARKS.md), a KD student at T = 4 from a 5+5 bank with those weights trained to
  chance level (1.3% against 61.8% from the dense bank). The self-normalized weights sum to the exact tail mass, so
  the target is a distribution (its total is right, always), at the price of a ratio-estimator bias of O(1/S) at
  T != 1. DKD's NCKD renormalizes the non-target classes (a ratio estimate too) and its TCKD is exact; DIST (Pearson
  correlations) and SL-Enc (a learned perturbation of every logit) are nonlinear in the whole distribution and
  refuse the format.

Several teachers (N > 1), merged by their mean logit (KD, WSLD, DKD, DIST, SL, Tf-KD): the mean of the
per-teacher log-probabilities at T, renormalized (the same distribution as the mean logit); a top-k teacher's
classes that another teacher kept take the mean value of its tail (exact bucket masses, approximate values);
the merged tail is the classes no teacher kept. Importance-sampled targets cannot be merged by mean logit (the
geometric mean of estimates estimates nothing): refused (:func:`check_teacher_format`), while SL-Ens (mean of
probabilities, linear) and SL-KD (one term per teacher) take them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor

TAIL_EMPTY = float(torch.finfo(torch.float16).min)  # a stored F of an empty tail (pipeline.bank.compact.TAIL_EMPTY)


@dataclass(frozen=True)
class SparseTarget:
    """A compact bank's soft labels for a batch, gathered rows only (built by :mod:`pipeline.bank.resident`).

    ``kind``: ``topk`` or ``sampled``; ``kept_index`` [B, N, K+1] int64 (top K, then the true class, which may
    repeat one of them) and ``kept_logprob`` [B, N, K+1] float32 (log-probabilities at T = 1); ``tail_lse`` [B, N, G]
    float32 (F at ``tail_temperatures``); ``num_classes`` C; sampled only: ``sample_index`` [B, N, S] int64,
    ``sample_logprob`` [B, N, S] float32, ``sample_temperature`` T_q.
    """

    kind: str
    kept_index: Tensor
    kept_logprob: Tensor
    tail_lse: Tensor
    num_classes: int
    tail_temperatures: tuple[float, ...]
    sample_index: Tensor | None = None
    sample_logprob: Tensor | None = None
    sample_temperature: float = 1.0

    @property
    def num_teachers(self) -> int:
        return int(self.kept_index.shape[1])

    @property
    def batch_size(self) -> int:
        return int(self.kept_index.shape[0])

    def to(self, device: torch.device | str) -> "SparseTarget":
        move = {k: getattr(self, k).to(device, non_blocking=True) for k in
                ("kept_index", "kept_logprob", "tail_lse", "sample_index", "sample_logprob")
                if getattr(self, k) is not None}
        return replace(self, **move)

    def tail_log_partition(self, beta: float, count: Tensor) -> Tensor:
        """F(beta) [B, N]: exact on the grid, linear in beta between grid points (F(0) = log m), extrapolated from
        the last segment beyond beta = 1; -inf for an empty tail. ``count`` [B, N]: m."""
        betas = sorted((1.0 / t, g) for g, t in enumerate(self.tail_temperatures))
        xs = [0.0] + [b for b, _ in betas]
        cols = [torch.log(count.clamp_min(1.0))] + [self.tail_lse[..., g] for _, g in betas]
        i = max(0, min(len(xs) - 2, max(j for j, x in enumerate(xs) if x <= beta) if beta >= 0 else 0))
        w = (beta - xs[i]) / (xs[i + 1] - xs[i])
        f = cols[i] if w == 0.0 else (cols[i + 1] if w == 1.0 else cols[i] * (1.0 - w) + cols[i + 1] * w)
        empty = (count <= 0) | (self.tail_lse[..., 0] <= TAIL_EMPTY)
        return f.masked_fill(empty, -math.inf)

    def log_probs(self, T: float) -> tuple[Tensor, Tensor | None]:
        """Per-teacher target at temperature T: (log_p [B, N, C] float32, tail [B, N, C] bool for ``topk`` / None
        for ``sampled``). See the module docstring for the formulas."""
        idx, lp = self.kept_index, self.kept_logprob.float()
        b, n, k1 = idx.shape
        c = self.num_classes
        dup = (idx[..., -1:] == idx[..., :-1]).any(dim=-1)  # the true class is in the top K
        count = (c - k1 + dup.to(lp.dtype))
        terms = torch.cat([lp[..., :-1] / T, (lp[..., -1] / T).masked_fill(dup, -math.inf).unsqueeze(-1)], dim=-1)
        f = self.tail_log_partition(1.0 / T, count)
        log_z = torch.logaddexp(torch.logsumexp(terms, dim=-1), f)
        kept = lp / T - log_z.unsqueeze(-1)
        if self.kind == "topk":
            fill = (f - torch.log(count.clamp_min(1.0)) - log_z).unsqueeze(-1)
            out = fill.expand(b, n, c).contiguous().scatter_(2, idx, kept)
            tail = torch.ones(b, n, c, dtype=torch.bool, device=idx.device).scatter_(2, idx, False)
            return out, tail
        # self-normalized importance weights: the draws share the tail's exact mass at T, exp(F(1/T) - log Z_T),
        # in proportion to p^T / q (see the module docstring)
        rel = self.sample_logprob.float() * (1.0 / T - 1.0 / self.sample_temperature)  # [B, N, S]
        logw = (f - log_z).unsqueeze(-1) + rel - torch.logsumexp(rel, dim=-1, keepdim=True)
        mass = torch.zeros(b, n, c, dtype=lp.dtype, device=idx.device).scatter_add_(2, self.sample_index, logw.exp())
        out = torch.log(mass).scatter_(2, idx, kept)
        return out, None

    @staticmethod
    def cat(targets: list["SparseTarget"]) -> "SparseTarget":
        """Targets of several banks (same kind, K, S and grid) concatenated on the teacher axis."""
        first = targets[0]
        if len(targets) == 1:
            return first
        fields = ("kept_index", "kept_logprob", "tail_lse") + (
            ("sample_index", "sample_logprob") if first.kind == "sampled" else ())
        return replace(first, **{f: torch.cat([getattr(t, f) for t in targets], dim=1) for f in fields})


# --- what the losses call -----------------------------------------------------------------------------------
def sparse_target(batch: Mapping[str, Any]) -> SparseTarget | None:
    return batch.get("teacher_target")


def _dense_logits(batch: Mapping[str, Any], student: Tensor, loss_name: str) -> Tensor:
    from kd_losses._common import teacher_logits

    return teacher_logits(batch, student, loss_name)


def _check_sparse(t: SparseTarget, student: Tensor, loss_name: str) -> None:
    b, c = student.shape
    if t.batch_size != b or t.num_classes != c:
        raise ValueError(f"batch['teacher_target'] is [B, N, C] = [{t.batch_size}, N, {t.num_classes}]; loss "
                         f"{loss_name!r} got student logits [{b}, {c}]")


def with_true_class(log_p: Tensor, y: Tensor, T: float) -> Tensor:
    """Label optimization's ``use_gt``: the target of the logits plus onehot(y), from log-probabilities at T:
    log_p + onehot / T - log(1 + p_y (e^(1/T) - 1)). Exact for a normalized target; for an importance-sampled one
    p_y is exact (the true class is always kept), so the estimate stays unbiased. log_p [B, (N,) C], y [B]."""
    y_idx = y.view(-1, *([1] * (log_p.ndim - 1))).expand(*log_p.shape[:-1], 1)
    lp_y = log_p.gather(-1, y_idx)
    return (log_p.scatter_add(-1, y_idx, torch.full_like(lp_y, 1.0 / T))
            - torch.log1p(lp_y.exp() * math.expm1(1.0 / T)))


def teacher_log_probs(batch: Mapping[str, Any], student: Tensor, T: float, loss_name: str,
                      use_gt: bool = False) -> tuple[Tensor, Tensor | None]:
    """The mean-logit teacher at temperature T: (log-probabilities [B, C] in the student's dtype, tail [B, C] bool or
    None). Dense: ``log_softmax(mean_n z_n / T)`` (with ``use_gt``: of ``mean_n z_n + onehot(y)``); sparse: see
    the module docstring."""
    t = sparse_target(batch)
    y = batch["label"].to(student.device, torch.long)
    if t is None:
        zt = _dense_logits(batch, student, loss_name).mean(dim=1)
        if use_gt:
            zt = zt + F.one_hot(y, zt.shape[-1]).to(zt.dtype)
        return F.log_softmax(zt / T, dim=1), None
    _check_sparse(t, student, loss_name)
    if t.num_teachers > 1 and t.kind == "sampled":
        raise ValueError(f"loss {loss_name!r} merges teachers by their mean logit, which importance-sampled "
                         "targets do not estimate: use one teacher per sampled bank, or sl_ens / sl_kd")
    log_p, tail = t.log_probs(T)
    if t.num_teachers > 1:
        log_p, tail = F.log_softmax(log_p.mean(dim=1), dim=-1), tail.all(dim=1)
    else:
        log_p, tail = log_p[:, 0], (tail[:, 0] if tail is not None else None)
    if use_gt:
        log_p = with_true_class(log_p, y, T)
    return log_p.to(student.dtype), tail


def teacher_log_probs_each(batch: Mapping[str, Any], student: Tensor, T: float, loss_name: str,
                           use_gt: bool = False) -> tuple[Tensor, Tensor | None]:
    """Every teacher at temperature T: (log-probabilities [B, N, C], tail [B, N, C] bool or None)."""
    t = sparse_target(batch)
    y = batch["label"].to(student.device, torch.long)
    if t is None:
        zt = _dense_logits(batch, student, loss_name)
        if use_gt:
            zt = zt + F.one_hot(y, zt.shape[-1]).to(zt.dtype)[:, None, :]
        return F.log_softmax(zt / T, dim=-1), None
    _check_sparse(t, student, loss_name)
    log_p, tail = t.log_probs(T)
    if use_gt:
        log_p = with_true_class(log_p, y, T)
    return log_p.to(student.dtype), tail


def pool_tail(log_p: Tensor, tail: Tensor) -> Tensor:
    """[..., C] log-probabilities -> [..., C + 1]: the tail classes set to -inf and their logsumexp appended as one
    bucket (-inf when a row has no tail; no NaN gradient then)."""
    tail = tail.expand_as(log_p)
    has = tail.any(dim=-1, keepdim=True)
    inside = torch.where(tail, log_p, torch.where(has, -math.inf, 0.0))
    bucket = torch.logsumexp(inside, dim=-1, keepdim=True).masked_fill(~has, -math.inf)
    return torch.cat([log_p.masked_fill(tail, -math.inf), bucket], dim=-1)


# --- which methods read which formats -------------------------------------------------------------------------
def check_teacher_format(loss_name: str, fmt: str, num_teachers: int) -> None:
    """ValueError (one line) when loss ``loss_name`` cannot be correct from a bank of format ``fmt`` with
    ``num_teachers`` teachers (declared at registration: ``sparse_formats``, ``merge``)."""
    from kd_losses.registry import get_spec

    spec = get_spec(loss_name)
    if not spec.needs_teacher or fmt not in ("topk", "sampled"):
        return
    if fmt not in spec.sparse_formats:
        ok = "dense or int8" + (" or top-k" if "topk" in spec.sparse_formats else "")
        raise ValueError(f"loss {loss_name!r} is not correct from a {fmt} bank ({spec.sparse_reason or 'it needs every class of the teacher'}): "
                         f"use a {ok} bank")
    if fmt == "sampled" and num_teachers > 1 and spec.merge == "mean_logits":
        raise ValueError(f"loss {loss_name!r} merges {num_teachers} teachers by their mean logit, which importance-"
                         "sampled targets do not estimate: ensemble the dense banks first (labels ensemble), or use "
                         "sl_ens / sl_kd")
