"""Stage-2 configuration: frozen dataclasses, YAML recipes in ``configs/``, dotted overrides.

Precedence: dataclass defaults < ``--config`` YAML < CLI flags < ``key=value`` overrides. Unknown keys
are errors. The resolved config is written to ``<output_dir>/config.yaml`` and stored in checkpoints.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar


@dataclass(frozen=True)
class OptimConfig:
    """``name``: sgd | adamw. ``no_wd_bn_bias``: no weight decay on BN weights and biases (1-D params)."""

    name: str = "sgd"
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 1e-4
    no_wd_bn_bias: bool = False
    betas: tuple[float, float] = (0.9, 0.999)


@dataclass(frozen=True)
class ScheduleConfig:
    """``name``: step | multistep | cosine | constant; linear warm-up over ``warmup_epochs`` (may be fractional).

    ``warmup_start_factor``: the warm-up's first lr as a fraction of the base lr (``optim.lr``);
    ``min_lr_factor``: the cosine schedule's final lr as a fraction of the base lr.
    """

    RENAMED_KEYS: ClassVar[dict[str, str]] = {"warmup_start": "warmup_start_factor", "min_lr": "min_lr_factor"}

    name: str = "cosine"
    warmup_epochs: float = 0.0
    warmup_start_factor: float = 0.1
    step_size: int = 30
    milestones: tuple[int, ...] = ()
    gamma: float = 0.1
    min_lr_factor: float = 0.0


@dataclass(frozen=True)
class TrainConfig:
    """One student run. ``loss`` holds the method's hyperparameters (validated against the loss signature)."""

    RENAMED_KEYS: ClassVar[dict[str, str]] = {"labels": "banks"}

    method: str = "ce"
    loss: dict[str, Any] = field(default_factory=dict)
    student: str = "resnet18"
    student_weights: str | None = None
    # Label banks: --labels paths (several = ensemble on the T axis), or --teacher names found in the cache.
    banks: tuple[str, ...] = ()
    teacher: tuple[str, ...] = ()
    teacher_weights: tuple[str, ...] = ()
    # Live-teacher mode (comparisons only): the same batch key filled by running the teacher each step.
    live_teacher: tuple[str, ...] = ()
    live_teacher_weights: tuple[str, ...] = ()
    data: str = ""
    layout: str = "auto"  # dataset layout: auto, imagefolder, filelist, cifar, shards
    preset: str = "auto"  # auto: the bank's preprocessing, else the layout's default
    train_split: str = "train"
    val_split: str = "val"
    augment: bool = True
    replay_views: bool = False
    skip_corrupt: bool = False  # leave out undecodable images instead of stopping
    # Train on a seeded random subset of this many training samples (0 = all); the bank still covers all.
    train_subset: int = 0
    epochs: int = 90
    batch_size: int = 256
    workers: int = 4
    device: str = "cpu"
    seed: int = 0
    amp: str = "none"
    channels_last: bool = False
    loader: str = "auto"  # image loader: dali, torch, or auto (dali where installed)
    hw_decoder_load: float = 0.65  # share of JPEGs DALI's mixed decoding gives the hardware decoder, in [0, 1]
    max_steps_per_epoch: int = 0
    eval_every: int = 1  # evaluate every k epochs (and after the last)
    log_every: int = 50
    output_dir: str = ""
    resume: bool = False
    resume_from: str = ""  # a checkpoint file to resume from (default: <output_dir>/last.pt)
    test_only: bool = False  # evaluate a checkpoint on the val split, no training
    overwrite: bool = False
    optim: OptimConfig = field(default_factory=OptimConfig)
    sched: ScheduleConfig = field(default_factory=ScheduleConfig)
