"""Stage 2: train a student from images plus stored soft labels (or a live teacher, for comparisons).

Outputs in ``output_dir``: ``config.yaml`` (resolved), ``metrics.jsonl`` (one line per epoch), ``final.json``,
``last.pt`` / ``best.pt`` checkpoints, TensorBoard events in ``tb/``, and PNG plots at the end.
"""

from __future__ import annotations

import json
import logging
import math
import random
import shutil
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import torch.nn as nn

import kd_losses
from pipeline.bank.reader import LabelBank
from pipeline.config import save_yaml, to_dict
from pipeline.data.dali import Batch, build_pipeline, iterate
from pipeline.data.manifest import Manifest, build_manifest
from pipeline.data.presets import Preprocess, get_preset
from pipeline.distributed import DistInfo, barrier, cleanup, init_distributed
from pipeline.errors import UsageError
from pipeline.models import create_model
from stage2_student_train import checkpoint as ckpt
from stage2_student_train.config import TrainConfig
from stage2_student_train.labels import BankLabels, LiveTeacherLabels, find_bank
from stage2_student_train.loop import evaluate, train_one_epoch
from stage2_student_train.optim import build_optimizer, build_scheduler

log = logging.getLogger(__name__)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def build_criterion(cfg: TrainConfig, num_classes: int) -> nn.Module:
    """The method's loss with its hyperparameters validated (unknown method or hparam -> one-line error)."""
    try:
        return kd_losses.build_loss(cfg.method, num_classes=num_classes, **cfg.loss)
    except KeyError as e:  # UnknownLossError
        raise UsageError(str(e)) from None
    except (TypeError, ValueError) as e:
        raise UsageError(" ".join(str(e).split())) from None


def build_label_source(cfg: TrainConfig, train: Manifest, preset: Preprocess):
    """Bank(s) in memory, a live teacher, or None for methods that need no teacher."""
    needs = kd_losses.needs_teacher(cfg.method)
    if cfg.live_teacher:
        ws = list(cfg.live_teacher_weights) or ["DEFAULT"] * len(cfg.live_teacher)
        if len(ws) != len(cfg.live_teacher):
            raise UsageError("give one --live-teacher-weights per --live-teacher")
        return LiveTeacherLabels(list(cfg.live_teacher), ws, train.num_classes, cfg.device, cfg.seed)
    if not needs:
        if cfg.labels or cfg.teacher:
            log.info("method '%s' uses no teacher: ignoring the bank", cfg.method)
        return None
    paths = list(cfg.labels)
    if not paths:
        if not cfg.teacher:
            raise UsageError(f"method '{cfg.method}' needs soft labels: give --labels BANK or --teacher NAME")
        paths = [find_bank(train, preset, list(cfg.teacher), list(cfg.teacher_weights))]
    banks = [LabelBank(p) for p in paths]
    for b in banks:
        b.validate(train)
        if cfg.replay_views and b.num_views == 1 and b.attrs.get("views", {}).get("policy", "center") == "center":
            raise UsageError(f"--replay-views needs a bank with stored views; {b.path} has only the center view")
    src = BankLabels(banks, cfg.device, replay_seed=cfg.seed if cfg.replay_views else None)
    log.info("soft labels from %s: [N, T, V, C] = %s", ", ".join(paths), tuple(src.logits.shape))
    return src


def train_order(cfg: TrainConfig, n: int, skipped: np.ndarray | None, epoch: int, info: DistInfo) -> np.ndarray:
    """This rank's ordered sample indices for ``epoch``: seeded permutation, equal share per rank."""
    pool = np.arange(n)
    if skipped is not None:
        pool = pool[~skipped]
    if cfg.train_subset:
        if cfg.train_subset > len(pool):
            raise UsageError(f"train_subset={cfg.train_subset} exceeds the {len(pool)} training samples")
        pool = np.sort(np.random.default_rng([cfg.seed, 7919]).permutation(pool)[: cfg.train_subset])
    perm = np.random.default_rng([cfg.seed, epoch]).permutation(pool)
    per_rank = len(perm) // info.world_size
    return perm[info.rank::info.world_size][:per_rank]


def _batches(manifest: Manifest, order: np.ndarray, preset: Preprocess, mode: str, cfg: TrainConfig, seed: int,
             boxes: np.ndarray | None = None, max_steps: int = 0) -> Iterator[Batch]:
    if max_steps:
        order = order[: max_steps * cfg.batch_size]
        boxes = boxes[: len(order)] if boxes is not None else None
    pipe = build_pipeline(manifest, order, preset, mode, cfg.batch_size, cfg.workers, cfg.device, seed, boxes=boxes)
    yield from iterate(pipe, len(order), cfg.batch_size, cfg.device)


def prepare_output_dir(cfg: TrainConfig, info: DistInfo) -> Path:
    out = Path(cfg.output_dir or f"runs/{cfg.method}-{cfg.student}-seed{cfg.seed}")
    if info.is_main:
        if out.exists() and any(out.iterdir()):
            if cfg.overwrite and not cfg.resume:
                shutil.rmtree(out)
            elif not cfg.resume:
                raise UsageError(f"output dir {out} exists: pass --resume to continue it or --overwrite to replace it")
            elif not (out / "last.pt").is_file():
                raise UsageError(f"--resume: no checkpoint {out / 'last.pt'} to resume from")
        out.mkdir(parents=True, exist_ok=True)
    barrier(info)
    return out


def run_training(cfg: TrainConfig) -> dict[str, Any]:
    """Train one student as configured; returns the final metrics (also written to ``final.json``)."""
    if not cfg.data:
        raise UsageError("no dataset given: use --data ROOT")
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda but no CUDA device is available")
    if cfg.epochs < 1 or cfg.batch_size < 1:
        raise UsageError("epochs and batch_size must be >= 1")
    info = init_distributed(cfg.device)
    try:
        return _run(cfg, info)
    except OSError as e:  # disk full, read-only or unreadable output dir: one line, not a traceback
        raise UsageError(f"I/O error: {' '.join(str(e).split())}") from None
    finally:
        cleanup(info)


def _run(cfg: TrainConfig, info: DistInfo) -> dict[str, Any]:
    preset = get_preset(cfg.preset)
    train_m = build_manifest(cfg.data, cfg.train_split)
    val_m = build_manifest(cfg.data, cfg.val_split)
    if train_m.classes != val_m.classes:
        raise UsageError(f"classes of {cfg.train_split} and {cfg.val_split} differ in {cfg.data}")
    num_classes = train_m.num_classes
    seed_everything(cfg.seed)  # before the criterion: SL-Enc's network is initialised from the seed too
    criterion = build_criterion(cfg, num_classes).to(cfg.device)
    model = create_model(cfg.student, num_classes, cfg.student_weights).to(cfg.device)
    teacher = build_label_source(cfg, train_m, preset)
    out = prepare_output_dir(cfg, info)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer([model, criterion], cfg.optim)
    skipped = getattr(teacher, "skipped", None)
    n_per_rank = len(train_order(cfg, len(train_m), skipped, 0, info))
    steps = math.ceil(n_per_rank / cfg.batch_size)
    if cfg.max_steps_per_epoch:
        steps = min(steps, cfg.max_steps_per_epoch)
    scheduler = build_scheduler(optimizer, steps, cfg.epochs, cfg.sched)
    scaler = torch.amp.GradScaler("cuda", enabled=cfg.amp == "fp16" and cfg.device == "cuda")
    ddp_model = model
    if info.enabled:
        ddp_model = nn.parallel.DistributedDataParallel(model, device_ids=[info.local_rank] if cfg.device == "cuda" else None)

    start_epoch, best = 0, -1.0
    if cfg.resume and (out / "last.pt").is_file():
        state = ckpt.load(out / "last.pt")
        model.load_state_dict(state["model"])
        criterion.load_state_dict(state["criterion"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        ckpt.set_rng_state(state["rng"])
        start_epoch, best = state["epoch"] + 1, state["best_top1"]
        log.info("resumed from %s at epoch %d", out / "last.pt", start_epoch)
    if info.is_main:
        save_yaml(cfg, out / "config.yaml")
        _truncate_metrics(out / "metrics.jsonl", start_epoch)
    tb = _tensorboard(out) if info.is_main else None
    labels = torch.from_numpy(train_m.labels.astype(np.int64))
    val_labels = torch.from_numpy(val_m.labels.astype(np.int64))
    val_order = np.array_split(np.arange(len(val_m)), info.world_size)[info.rank]
    t_start = time.time()
    metrics: dict[str, Any] = {}
    acc = None
    for epoch in range(start_epoch, cfg.epochs):
        order = train_order(cfg, len(train_m), skipped, epoch, info)
        boxes = teacher.boxes(order, epoch) if cfg.replay_views else None
        mode = "views" if cfg.replay_views else ("train" if cfg.augment else "eval")
        batches = _batches(train_m, order, preset, mode, cfg, cfg.seed * 1000 + epoch * 10 + info.rank, boxes,
                           cfg.max_steps_per_epoch)

        def on_step(step: int, parts: dict[str, float], epoch=epoch) -> None:
            if tb is not None:
                for k, v in parts.items():
                    tb.add_scalar(f"train_step/{k}", v, epoch * steps + step)

        train_stats = train_one_epoch(
            ddp_model, criterion, optimizer, scheduler, batches, labels, teacher, epoch,
            device=cfg.device, amp=cfg.amp, scaler=scaler, channels_last=cfg.channels_last, info=info,
            total_steps=steps, log_every=cfg.log_every, on_step=on_step,
        )
        if info.enabled:  # DDP keeps parameters in sync, not the BN statistics of each rank's last batch:
            for buf in model.buffers():  # evaluate (and save) rank 0's on every rank
                torch.distributed.broadcast(buf, 0)
        val, acc = evaluate(model, _batches(val_m, val_order, preset, "eval", cfg, 0), val_labels,
                            device=cfg.device, amp=cfg.amp, channels_last=cfg.channels_last, info=info)
        metrics = {"epoch": epoch, **{k: v for k, v in val.items() if k != "n"}, "val_n": val["n"], **train_stats,
                   "lr": optimizer.param_groups[0]["lr"], "elapsed_s": time.time() - t_start}
        is_best = val["top1"] > best
        best = max(best, val["top1"])
        if info.is_main:
            with open(out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(metrics) + "\n")
            state = {"model": model.state_dict(), "criterion": criterion.state_dict(),
                     "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                     "scaler": scaler.state_dict(), "epoch": epoch, "best_top1": best, "rng": ckpt.rng_state(),
                     "config": to_dict(cfg), "num_classes": num_classes, "arch": cfg.student}
            ckpt.save_atomic(state, out / "last.pt")
            if is_best:
                ckpt.save_atomic({"model": model.state_dict(), "epoch": epoch, "top1": val["top1"],
                                  "config": to_dict(cfg), "arch": cfg.student}, out / "best.pt")
            for k, v in metrics.items():
                if tb is not None and isinstance(v, (int, float)):
                    tb.add_scalar(f"epoch/{k}", v, epoch)
            log.info("epoch %d: top1 %.2f top5 %.2f nll %.4f ece %.4f loss %.4f (%.0f img/s)", epoch, val["top1"],
                     val["top5"], val["nll"], val["ece"], train_stats.get("train_loss", float("nan")),
                     train_stats["train_images_per_s"])
        barrier(info)
    final = _finalize(cfg, out, metrics, best, acc, teacher, info)
    if tb is not None:
        tb.close()
    return final


def _finalize(cfg: TrainConfig, out: Path, metrics: dict, best: float, acc, teacher, info: DistInfo) -> dict:
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines() if l.strip()]
    last = rows[-1] if rows else metrics
    final = {
        "method": cfg.method, "student": cfg.student,
        "teacher": "+".join(t["arch"] for t in getattr(teacher, "teachers", []) or []) or None,
        "bank": ",".join(getattr(teacher, "paths", []) or []) or ("live" if cfg.live_teacher else None),
        "epochs": cfg.epochs, "seed": cfg.seed,
        **{k: last.get(k) for k in ("top1", "top5", "nll", "ece")},
        "best_top1": max((r["top1"] for r in rows), default=best),
        "train_time_s": sum(r.get("train_time_s", 0.0) for r in rows),
        "train_images_per_s": last.get("train_images_per_s"),
    }
    if info.is_main:
        (out / "final.json").write_text(json.dumps(final, indent=2))
        try:
            from stage2_student_train.plots import plot_run

            plot_run(out, rows, acc.reliability() if acc is not None else None)
        except Exception as e:  # plots are a convenience; never fail a finished run for them
            log.warning("plots failed: %s", e)
    return final


def _truncate_metrics(path: Path, start_epoch: int) -> None:
    """On resume, drop metric lines of epochs after the checkpoint (written before a crash)."""
    if not path.is_file():
        return
    keep = [l for l in path.read_text().splitlines() if l.strip() and json.loads(l)["epoch"] < start_epoch]
    path.write_text("".join(l + "\n" for l in keep))


def _tensorboard(out: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is a dependency; tolerate its absence in minimal installs
        return None
    return SummaryWriter(str(out / "tb"))
