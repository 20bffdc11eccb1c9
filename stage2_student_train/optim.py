"""Optimizers, per-update learning-rate schedules and model EMA, all from timm (not rewritten here).

- Optimizer: ``timm.optim.create_optimizer_v2`` on this project's parameter groups (:func:`param_groups`):
  SGD (timm's ``sgd`` = Nesterov, ``momentum`` = classical) or AdamW (``torch.optim.AdamW``).
- Schedule: ``timm.scheduler.create_scheduler_v2`` stepped once per optimizer update (``step_update``), counted
  in updates: linear warm-up over ``warmup_epochs`` from ``warmup_start_factor x lr``, then step / multistep /
  cosine (to ``min_lr_factor x lr``, after the warm-up) / constant. The multiplier of the base lr at update ``u``
  with ``U`` updates per epoch and ``e = u / U`` is: ``ws + (1 - ws) e / W`` while ``e < W`` (W warm-up
  epochs), then ``gamma^(floor(e) // step_size)`` (step), ``gamma^#{m <= floor(e)}`` (multistep),
  ``m + (1 - m) (1 + cos(pi min((e - W) / (E - W), 1))) / 2`` (cosine), 1 (constant). timm's multistep decays
  at ``bisect_right(milestones, u + 1)``, one update before the milestone; the milestones are handed to it as
  ``m U + 1`` so the lr drops at the milestone's first update.
- Model EMA: ``timm.utils.ModelEmaV3`` with a constant decay: after every update
  ``ema = decay * ema + (1 - decay) * model`` for every floating-point parameter and buffer.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.scheduler.scheduler import Scheduler
from timm.utils import ModelEmaV3

from pipeline.errors import UsageError
from stage2_student_train.config import OptimConfig, ScheduleConfig

OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("step", "multistep", "cosine", "constant")
CLIP_MODES = ("norm", "value", "agc")


def param_groups(modules: list[nn.Module], weight_decay: float, no_wd_bn_bias: bool) -> list[dict]:
    """Parameters of ``modules``; with ``no_wd_bn_bias`` the 1-D ones (BN weights, biases) get no decay."""
    decay, no_decay = [], []
    for m in modules:
        for p in m.parameters():
            if not p.requires_grad:
                continue
            (no_decay if (no_wd_bn_bias and p.ndim <= 1) else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def build_optimizer(modules: list[nn.Module], cfg: OptimConfig) -> torch.optim.Optimizer:
    """``torch.optim.SGD`` or ``AdamW`` built by ``timm.optim.create_optimizer_v2`` over :func:`param_groups`.
    Raises UsageError for an unknown name."""
    groups = param_groups(modules, cfg.weight_decay, cfg.no_wd_bn_bias)
    if cfg.name == "sgd":
        nesterov = cfg.nesterov and cfg.momentum > 0
        return create_optimizer_v2(groups, "sgd" if nesterov else "momentum", lr=cfg.lr,
                                   weight_decay=cfg.weight_decay, momentum=cfg.momentum)
    if cfg.name == "adamw":
        return create_optimizer_v2(groups, "adamw", lr=cfg.lr, weight_decay=cfg.weight_decay, betas=tuple(cfg.betas))
    raise UsageError(f"unknown optimizer '{cfg.name}'; valid: {', '.join(OPTIMIZERS)}")


def build_scheduler(optimizer: torch.optim.Optimizer, updates_per_epoch: int, epochs: int, cfg: ScheduleConfig,
                    base_lr: float, start_update: int = 0) -> Scheduler:
    """timm's scheduler of ``cfg`` counted in optimizer updates (call ``step_update(u)`` after update ``u``),
    positioned at ``start_update``: every group's lr is set to the schedule's lr there now, from ``base_lr``
    whatever the optimizer held (a resumed run trains its first update at its own schedule's lr, never at a
    checkpoint's stored one). Raises UsageError for an unknown schedule name."""
    if cfg.name not in SCHEDULES:
        raise UsageError(f"unknown schedule '{cfg.name}'; valid: {', '.join(SCHEDULES)}")
    u = max(updates_per_epoch, 1)
    for g in optimizer.param_groups:
        g["initial_lr"] = base_lr  # timm's base value (setdefault would keep a checkpoint's)
    warmup = cfg.warmup_epochs * u
    cosine = cfg.name == "cosine"
    # cosine: the decay follows the warm-up (warmup_prefix) and lasts the remaining epochs, as lr_factor's did
    length = max(epochs - cfg.warmup_epochs, 1e-8) * u if cosine else epochs * u
    scheduler, _ = create_scheduler_v2(
        optimizer, sched=cfg.name, num_epochs=length, decay_epochs=cfg.step_size * u,
        decay_milestones=[m * u + 1 for m in cfg.milestones], decay_rate=cfg.gamma,
        min_lr=cfg.min_lr_factor * base_lr, warmup_lr=cfg.warmup_start_factor * base_lr, warmup_epochs=warmup,
        warmup_prefix=cosine, step_on_epochs=False, updates_per_epoch=1)
    scheduler.step_update(start_update)
    return scheduler


def build_ema(model: nn.Module, decay: float) -> ModelEmaV3 | None:
    """timm's ``ModelEmaV3`` of ``model`` (a deep copy, eval mode, same device) with the constant ``decay``; None
    when ``decay`` is 0 (off)."""
    if decay <= 0:
        return None
    if not decay < 1:
        raise UsageError(f"ema_decay={decay} must be in [0, 1) (0: off)")
    return ModelEmaV3(model, decay=decay)


def updates_per_epoch(steps: int, accum_steps: int) -> int:
    """Optimizer updates of an epoch of ``steps`` micro-batches: one per ``accum_steps``, the last group of a short
    epoch included."""
    return math.ceil(steps / max(accum_steps, 1))


def apply_settings(optimizer: torch.optim.Optimizer, cfg: OptimConfig) -> None:
    """Set the hyperparameters of ``cfg`` on every group of ``optimizer`` (after a checkpoint's optimizer state
    restored its own): momentum, nesterov, betas, weight decay (0 on the no-decay group of ``no_wd_bn_bias``).
    The lr is the scheduler's (:func:`build_scheduler`)."""
    for i, g in enumerate(optimizer.param_groups):
        g["weight_decay"] = 0.0 if (cfg.no_wd_bn_bias and i == 1) else cfg.weight_decay
        if cfg.name == "sgd":
            g["momentum"], g["nesterov"] = cfg.momentum, cfg.nesterov and cfg.momentum > 0
        elif cfg.name == "adamw":
            g["betas"] = tuple(cfg.betas)
