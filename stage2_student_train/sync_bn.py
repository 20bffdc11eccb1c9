"""Batch norm over the global batch of a many-rank run (``--sync-bn``, torchvision's and timm's flag of that name).

Under DDP each rank normalizes by its own batch unless the student's BN layers synchronise: a run on n ranks with
batch b per rank then trains another model than one rank with batch n*b (normalization noise and running
statistics of b images). With ``--sync-bn`` the mean and variance come from all ranks' samples, so the two runs
train the same model up to float rounding (tests/stage2_student_train/test_s2_ddp_equivalence.py).

On CUDA the layers become ``torch.nn.SyncBatchNorm`` (timm's ``convert_sync_batchnorm``, which also converts
timm's fused BatchNorm + activation layers). ``torch.nn.SyncBatchNorm`` refuses CPU tensors, so on CPU (gloo)
they become :class:`GlobalBatchNorm`, the same statistics from one autograd all-reduce per layer, written here.
"""

from __future__ import annotations

import logging

import torch
import torch.nn as nn

from pipeline.distributed import DistInfo, all_reduce_sum_with_grad
from pipeline.errors import UsageError

log = logging.getLogger(__name__)

_PLAIN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


class GlobalBatchNorm(nn.modules.batchnorm._BatchNorm):
    """Batch norm whose training statistics are those of every rank's batch together (torch's ``SyncBatchNorm``
    math, on any device). Input [B, C, *]; output the same shape and dtype.

    Per rank: n_r samples per channel, the local mean m_r and sum of squared deviations M2_r (float32); one
    all-reduce of [n_r, n_r m_r, M2_r + n_r m_r^2] in float64 gives the global mean and biased variance used to
    normalize (exact for any split of the batch), and the unbiased variance for ``running_var``, as
    ``F.batch_norm`` does for one batch. Gradients flow through the all-reduce, so every rank's backward sees the
    whole batch. Evaluation, and training without a process group, use ``F.batch_norm`` unchanged. ``post``:
    what timm's ``BatchNormAct2d`` applies after the normalization (dropout, activation), else identity."""

    def __init__(self, bn: nn.modules.batchnorm._BatchNorm, info: DistInfo):
        ref = next(iter([*bn.parameters(recurse=False), *bn.buffers(recurse=False)]), None)
        super().__init__(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats,
                         device=None if ref is None else ref.device)
        self.info = info
        self.post = nn.Sequential(*[getattr(bn, k) for k in ("drop", "act") if isinstance(getattr(bn, k, None),
                                                                                       nn.Module)])
        with torch.no_grad():
            for name, t in [*bn.named_parameters(recurse=False), *bn.named_buffers(recurse=False)]:
                getattr(self, name).copy_(t)

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected at least 2-D input [B, C, ...], got {x.dim()}-D")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(x)
        if not (self.training and self.info.enabled):
            return self.post(super().forward(x))
        c = x.shape[1]
        dims = [0, *range(2, x.dim())]
        shape = [1, c] + [1] * (x.dim() - 2)
        xf = x.float()
        n = x.numel() // c
        mean_r = xf.mean(dims) if n else xf.new_zeros(c)
        m2_r = (xf - mean_r.view(shape)).square().sum(dims)
        nd, md = float(n), mean_r.double()
        local = torch.cat([md.new_full((1,), nd), nd * md, m2_r.double() + nd * md.square()])
        total = all_reduce_sum_with_grad(local, self.info)
        count = total[0]
        mean = total[1:c + 1] / count
        var = (total[c + 1:] / count - mean.square()).clamp_min(0)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                f = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.mul_(1 - f).add_(mean.to(self.running_mean.dtype), alpha=f)
                unbiased = var * (count / (count - 1).clamp_min(1))
                self.running_var.mul_(1 - f).add_(unbiased.to(self.running_var.dtype), alpha=f)
        y = (xf - mean.float().view(shape)) * torch.rsqrt(var.float().view(shape) + self.eps)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return self.post(y.to(x.dtype))


def has_batch_norm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def convert_sync_batchnorm(model: nn.Module, info: DistInfo) -> nn.Module:
    """``model`` with every batch-norm layer computing its statistics over all ranks' batches (see the module
    docstring); convert before building the optimizer (the layers are new modules with copied parameters).
    Without a process group or without batch norm (both logged), ``model`` unchanged. Raises UsageError on CPU for a
    batch-norm subclass other than torch's and timm's ``BatchNormAct2d``."""
    if not info.enabled:
        log.warning("--sync-bn: one process (no torchrun); nothing to synchronise")
        return model
    if not has_batch_norm(model):
        if info.is_main:
            log.warning("--sync-bn: the student has no batch-norm layer; nothing to synchronise")
        return model
    if info.device == "cuda":
        from timm.layers import convert_sync_batchnorm as timm_convert

        return timm_convert(model)
    return _convert_cpu(model, info)


def _convert_cpu(module: nn.Module, info: DistInfo) -> nn.Module:
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        from timm.layers import BatchNormAct2d

        if type(module) not in (*_PLAIN, BatchNormAct2d):
            raise UsageError(f"--sync-bn on CPU converts torch's BatchNorm1d/2d/3d and timm's BatchNormAct2d, not "
                             f"the subclass {type(module).__name__}; run on --device cuda (torch's SyncBatchNorm) "
                             "or without --sync-bn")
        return GlobalBatchNorm(module, info)
    for name, child in module.named_children():
        new = _convert_cpu(child, info)
        if new is not child:
            setattr(module, name, new)
    return module
