"""Optimizers and per-step learning-rate schedules (linear warm-up, then step / multistep / cosine / constant)."""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from pipeline.errors import UsageError
from stage2_student_train.config import OptimConfig, ScheduleConfig

OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("step", "multistep", "cosine", "constant")


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
    groups = param_groups(modules, cfg.weight_decay, cfg.no_wd_bn_bias)
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0)
    if cfg.name == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas))
    raise UsageError(f"unknown optimizer '{cfg.name}'; valid: {', '.join(OPTIMIZERS)}")


def lr_factor(step: int, steps_per_epoch: int, epochs: int, cfg: ScheduleConfig) -> float:
    """Multiplier of the base lr at global ``step`` (0-based)."""
    if cfg.name not in SCHEDULES:
        raise UsageError(f"unknown schedule '{cfg.name}'; valid: {', '.join(SCHEDULES)}")
    e = step / max(steps_per_epoch, 1)
    warm = cfg.warmup_epochs
    if warm > 0 and e < warm:
        return cfg.warmup_start_factor + (1.0 - cfg.warmup_start_factor) * e / warm
    epoch = int(e)
    if cfg.name == "step":
        return cfg.gamma ** (epoch // max(cfg.step_size, 1))
    if cfg.name == "multistep":
        return cfg.gamma ** sum(epoch >= m for m in cfg.milestones)
    if cfg.name == "cosine":
        total = max(epochs - warm, 1e-8)
        t = min(max(e - warm, 0.0) / total, 1.0)
        return cfg.min_lr_factor + (1 - cfg.min_lr_factor) * 0.5 * (1 + math.cos(math.pi * t))
    return 1.0


def build_scheduler(optimizer: torch.optim.Optimizer, steps_per_epoch: int, epochs: int, cfg: ScheduleConfig,
                    base_lr: float, start_step: int = 0) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-step scheduler (call ``.step()`` after every optimizer step) positioned at global step ``start_step``:
    every group's lr is set to ``base_lr * lr_factor(start_step)`` now, whatever the optimizer held (a resumed run
    trains its first step at its own schedule's lr, never at a checkpoint's stored one)."""
    lr_factor(0, steps_per_epoch, epochs, cfg)  # validates the name now, not at the first step
    for g in optimizer.param_groups:
        g["initial_lr"] = base_lr
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, steps_per_epoch, epochs, cfg),
                                             last_epoch=start_step - 1)


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
