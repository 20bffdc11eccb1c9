"""Stage 2's checks of what the user gave: flags that conflict, the dataset's splits, undecodable images.

Every problem is a one-line UsageError (exit code 2) naming the flag, the classes or the file, raised before any
training starts; a warning where the run is valid but may not be what the user meant.
"""

from __future__ import annotations

import logging
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

import kd_losses

from pipeline.data import Manifest, build_manifest, layout_of
from pipeline.data.loaders import resolve_loader
from pipeline.distributed import cores_per_local_rank
from pipeline.data.policy import parse_mix_policy
from pipeline.errors import UsageError
from pipeline.storage import name_for_path
from stage2_student_train.config import TrainConfig
from stage2_student_train.optim import CLIP_MODES, OPTIMIZERS, SCHEDULES

log = logging.getLogger(__name__)

DEFAULT_MAX_WORKERS = 4  # the default --workers: the cores of this process, at most this many

DEMO_HINT = ("for the embedded demo data run `make demo` (it prepares data/fashion-mnist and prints its bank), then "
             "e.g. python -m pipeline.train_student --method wsld --student democnn_s --data data/fashion-mnist "
             "--preset demo --teacher democnn --teacher-weights runs/demo/teacher-ce/best.pt")


def check_config(cfg: TrainConfig) -> TrainConfig:
    """Refuse conflicting or impossible settings; return the config with the loader and output dir resolved."""
    if not cfg.data:
        raise UsageError("no dataset given: use --data ROOT (ROOT/train/<class>/*.jpg and ROOT/val/<class>/*.jpg, "
                         f"file lists, CIFAR pickles or packed shards); {DEMO_HINT}")
    try:
        kd_losses.check_hparams(cfg.method, dict(cfg.loss))
    except KeyError as e:  # UnknownLossError, listing the valid names
        raise UsageError(str(e)) from None
    except (TypeError, ValueError) as e:  # an unknown hyperparameter or a value outside its choices
        raise UsageError(" ".join(str(e).split())) from None
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda but no CUDA device is available")
    for name in ("epochs", "batch_size"):
        if getattr(cfg, name) < 1:
            raise UsageError(f"{name}={getattr(cfg, name)} must be >= 1")
    if cfg.workers is None:  # more loader workers than cores only slows a run down (and PyTorch warns)
        cfg = replace(cfg, workers=min(DEFAULT_MAX_WORKERS, cores_per_local_rank()))
    _check_numbers(cfg)
    if cfg.amp == "fp16" and cfg.device != "cuda":
        raise UsageError("--amp fp16 on a CPU runs about 9x slower than fp32 (no fp16 kernels): use --amp bf16 "
                         "or none on a CPU, fp16 on CUDA")
    if cfg.live_teacher and (cfg.banks or cfg.teacher):
        raise UsageError("--live-teacher runs a teacher instead of reading a bank: drop --labels/--teacher, or "
                         "drop --live-teacher")
    if cfg.resume and cfg.overwrite and not cfg.test_only:
        raise UsageError("--resume continues the run in --output-dir and --overwrite replaces it: drop one of them")
    if cfg.resume_from and not Path(cfg.resume_from).is_file():
        raise UsageError(f"--resume: checkpoint file not found: {cfg.resume_from}")
    if cfg.replay_views and not cfg.augment:
        raise UsageError("--replay-views trains on the bank's stored augmented views and --no-augment on center "
                         "crops: drop one of them")
    if cfg.mix_labels not in ("", "blend"):
        raise UsageError(f"--mix-labels '{cfg.mix_labels}' is unknown; valid: blend (or leave it out)")
    if cfg.mix_labels:
        parse_mix_policy(cfg.mix_policy)
        if cfg.replay_views:
            raise UsageError("--mix-labels blend mixes in stage 2 and --replay-views replays the bank's views: drop "
                             "one of them (a bank dumped with a mixing --view-policy replays mixing exactly)")
    if not math.isfinite(cfg.cutmix) or cfg.cutmix < 0:
        raise UsageError(f"--cutmix {cfg.cutmix}: give ALPHA > 0 (Beta(ALPHA, ALPHA) area weights), or 0 for none")
    defaults = TrainConfig()
    if cfg.mix_policy != defaults.mix_policy and not cfg.mix_labels:
        if cfg.cutmix:  # blend and --cutmix exclude each other: "add --mix-labels blend" would send the user in a circle
            raise UsageError(f"--mix-policy {cfg.mix_policy} says how --mix-labels blend mixes, and --cutmix mixes a "
                             "label-map bank region-exactly instead: drop --mix-policy")
        raise UsageError(f"--mix-policy {cfg.mix_policy} says how --mix-labels blend mixes; add --mix-labels blend "
                         "or drop --mix-policy")
    if cfg.view_order != defaults.view_order and not cfg.replay_views:
        raise UsageError(f"--view-order {cfg.view_order} orders the stored views --replay-views replays; add "
                         "--replay-views or drop --view-order")
    if cfg.cutmix and cfg.mix_labels:
        raise UsageError("--cutmix (region-exact, from a label-map bank) and --mix-labels blend both mix in stage 2: "
                         "drop one of them")
    if cfg.teacher_weights and not cfg.teacher:
        raise UsageError("--teacher-weights names the weights of --teacher NAME, and no --teacher is given")
    out = cfg.output_dir or (str(Path(cfg.resume_from).parent) if cfg.resume_from else
                             f"runs/{cfg.method}-{name_for_path(cfg.student)}-seed{cfg.seed}")
    return replace(cfg, loader=resolve_loader(cfg.loader), output_dir=out)


def _check_numbers(cfg: TrainConfig) -> None:
    """Optimizer, schedule and loop settings a run cannot use: one-line UsageError naming the key."""
    o, sc = cfg.optim, cfg.sched
    if o.name not in OPTIMIZERS:
        raise UsageError(f"unknown optimizer '{o.name}' (optim.name / --opt); valid: {', '.join(OPTIMIZERS)}")
    if sc.name not in SCHEDULES:
        raise UsageError(f"unknown schedule '{sc.name}' (sched.name / --lr-scheduler); valid: {', '.join(SCHEDULES)}")
    bad = [(key, value, need) for key, value, ok, need in (
        ("optim.lr", o.lr, 0 < o.lr < math.inf, "> 0"),
        ("optim.weight_decay", o.weight_decay, 0 <= o.weight_decay < math.inf, ">= 0"),
        ("optim.momentum", o.momentum, 0 <= o.momentum < 1, "in [0, 1)"),
        ("optim.betas", list(o.betas), len(o.betas) == 2 and all(0 <= b < 1 for b in o.betas), "two in [0, 1)"),
        ("optim.clip_grad", o.clip_grad, 0 <= o.clip_grad < math.inf, ">= 0 (0: off)"),
        ("optim.clip_mode", o.clip_mode, o.clip_mode in CLIP_MODES, "one of " + ", ".join(CLIP_MODES)),
        ("optim.accum_steps", o.accum_steps, o.accum_steps >= 1, ">= 1"),
        ("ema_decay", cfg.ema_decay, 0 <= cfg.ema_decay < 1, "in [0, 1) (0: off)"),
        ("sched.warmup_epochs", sc.warmup_epochs, 0 <= sc.warmup_epochs < math.inf, ">= 0"),
        ("sched.warmup_start_factor", sc.warmup_start_factor, 0 <= sc.warmup_start_factor <= 1, "in [0, 1]"),
        ("sched.min_lr_factor", sc.min_lr_factor, 0 <= sc.min_lr_factor <= 1, "in [0, 1]"),
        ("sched.gamma", sc.gamma, 0 < sc.gamma < math.inf, "> 0"),
        ("sched.step_size", sc.step_size, sc.step_size >= 1, ">= 1"),
        ("sched.milestones", list(sc.milestones), all(m >= 0 for m in sc.milestones), ">= 0 each"),
        ("workers", cfg.workers, cfg.workers >= 0, ">= 0"),
        ("hw_decoder_load", cfg.hw_decoder_load, 0 <= cfg.hw_decoder_load <= 1, "in [0, 1]"),
        ("eval_every", cfg.eval_every, cfg.eval_every >= 1, ">= 1"),
        ("eval_last", cfg.eval_last, cfg.eval_last >= 1, ">= 1"),
        ("precise_bn", cfg.precise_bn, cfg.precise_bn >= 0, ">= 0"),
        ("log_every", cfg.log_every, cfg.log_every >= 1, ">= 1"),
        ("max_steps_per_epoch", cfg.max_steps_per_epoch, cfg.max_steps_per_epoch >= 0, ">= 0 (0: all)"),
        ("train_subset", cfg.train_subset, cfg.train_subset >= 0, ">= 0 (0: all)"),
    ) if not ok]
    if bad:
        key, value, need = bad[0]
        raise UsageError(f"{key}={value} must be {need}")


def load_manifests(cfg: TrainConfig) -> tuple[Manifest, Manifest]:
    """The train and val manifests; their classes must be the same (the error names the differing ones)."""
    train = build_manifest(cfg.data, cfg.train_split, layout=cfg.layout)
    val = build_manifest(cfg.data, cfg.val_split, layout=cfg.layout)
    if train.classes != val.classes:
        a, b = set(train.classes), set(val.classes)
        only_t, only_v = sorted(a - b), sorted(b - a)
        what = []
        if only_t:
            what.append(f"only in {cfg.train_split}: {', '.join(only_t[:5])}" + (" ..." if len(only_t) > 5 else ""))
        if only_v:
            what.append(f"only in {cfg.val_split}: {', '.join(only_v[:5])}" + (" ..." if len(only_v) > 5 else ""))
        raise UsageError(f"classes of {cfg.train_split} and {cfg.val_split} differ in {cfg.data}: {'; '.join(what)}")
    return train, val


def undecodable(manifest: Manifest, skip: bool) -> np.ndarray:
    """[N] bool: samples of ``manifest`` no loader can decode (the layout's structural pre-scan). With ``skip``
    they are left out with a warning naming them; without, the first one is a one-line UsageError."""
    lay = layout_of(manifest)
    found = lay.scan(manifest, np.arange(len(manifest)))
    bad = np.zeros(len(manifest), bool)
    if not found:
        return bad
    pos, reason = next(iter(sorted(found.items())))
    where = lay.describe_sample(manifest, pos)
    if not skip:
        more = f" (and {len(found) - 1} more)" if len(found) > 1 else ""
        raise UsageError(f"cannot decode {where} (sample {pos}, split {manifest.split}): {reason}{more}; fix or "
                         "remove it, or pass --skip-corrupt to leave such images out")
    for p, r in sorted(found.items()):
        log.warning("leaving out undecodable %s (sample %d, split %s): %s", lay.describe_sample(manifest, p), p,
                    manifest.split, r)
    bad[list(found)] = True
    return bad
