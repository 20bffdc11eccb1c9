"""Stage 2: train a student from images plus stored soft labels (or a live teacher, for comparisons).

Outputs in ``output_dir``: ``config.yaml`` (resolved), ``metrics.jsonl`` (one line per evaluated epoch: every
``eval_every``-th and each of the last ``eval_last``; its ``train_time_s`` is the training time of every epoch since
the previous line), ``final.json``,
``last.pt`` / ``best.pt`` checkpoints, TensorBoard events in ``tb/``, and PNG plots at the end.
"""

from __future__ import annotations

import json
import logging
import math
import random
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
import torch.nn as nn

import kd_losses
from pipeline import storage
from pipeline.config import save_yaml, to_dict
from pipeline.data import Manifest, layout_of
from pipeline.data.batch import Batch, DecodeError
from pipeline.data.loaders import load_batches, load_blended_batches, load_mixed_batches, resolve_loader
from pipeline.data.policy import blend_rows, parse_mix_policy
from pipeline.data.presets import PRESETS, Preprocess, resolve_preset, typical_side, upscale_warning
from pipeline.distributed import (DistInfo, barrier, broadcast_buffers, broadcast_object, cleanup, derive_seed,
                                  gather_objects, init_distributed)
from pipeline.errors import UsageError
from pipeline.metrics import MetricAccumulator
from pipeline.models import create_model
from pipeline.models.features import FeatureTap, embedding_dim
from pipeline.models.registry import read_checkpoint
from stage2_student_train import checkpoint as ckpt
from stage2_student_train import memory
from stage2_student_train.config import TrainConfig
from stage2_student_train.inputs import check_config, load_manifests, undecodable
from stage2_student_train.label_sources import LabelSource, build_label_source, val_teacher
from stage2_student_train.loop import evaluate, recalibrate_bn, train_one_epoch
from stage2_student_train.optim import build_ema, build_optimizer, build_scheduler, updates_per_epoch
from stage2_student_train.step import TrainModule, TrainStep, wrap
from stage2_student_train.sync_bn import convert_sync_batchnorm

log = logging.getLogger(__name__)


# Purposes of derived seeds (pipeline.distributed.derive_seed): each (seed, purpose, epoch, rank) is its own stream.
SEED_TRAIN, SEED_LOADER, SEED_PRECISE_BN = 1, 2, 3


def seed_everything(seed: int) -> None:
    """Python, numpy and torch (every CUDA device too) from ``seed``: the same on every rank, so initialisation is
    identical everywhere (DDP also broadcasts rank 0's parameters when it wraps the module)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def seed_epoch(seed: int, epoch: int, rank: int) -> None:
    """Reseed everything random during training (dropout, CRD negatives, SL-Enc noise) for ``epoch`` on ``rank``:
    a stream of its own per (seed, epoch, rank) (:func:`pipeline.distributed.derive_seed`), so ranks never share
    masks or negatives, and a resumed epoch draws what the uninterrupted run drew, whatever ran before."""
    seed_everything(derive_seed(seed, SEED_TRAIN, epoch, rank))


def loader_seed(seed: int, epoch: int, rank: int) -> int:
    """The image loader's seed (augmentation) of ``epoch`` on ``rank``: 31 bits, as DALI takes it."""
    return derive_seed(seed, SEED_LOADER, epoch, rank) % 2**31


def build_criterion(cfg: TrainConfig, num_classes: int, **dims: int | None) -> nn.Module:
    """The method's loss with its hyperparameters validated (unknown method or hparam -> one-line error).
    ``dims``: what losses with learned heads and memories are built with (``num_samples``, ``student_dim``,
    ``teacher_dim``, ``num_teachers``)."""
    try:
        return kd_losses.build_loss(cfg.method, num_classes=num_classes, **dims, **cfg.loss)
    except KeyError as e:  # UnknownLossError
        raise UsageError(str(e)) from None
    except (TypeError, ValueError) as e:
        raise UsageError(" ".join(str(e).split())) from None


def train_order(cfg: TrainConfig, n: int, excluded: np.ndarray | None, epoch: int, info: DistInfo) -> np.ndarray:
    """This rank's ordered sample indices for ``epoch``: seeded permutation, equal share per rank. ``excluded``:
    [N] bool, samples never trained on (skipped by the bank, undecodable)."""
    perm = np.random.default_rng([cfg.seed, epoch]).permutation(train_pool(cfg, n, excluded))
    per_rank = len(perm) // info.world_size
    if per_rank == 0:  # decided alike on every rank, before any collective
        raise UsageError(f"the training split has {len(perm)} usable samples, fewer than the {info.world_size} "
                         "processes: use fewer processes (torchrun --nproc_per_node) or more data")
    return perm[info.rank::info.world_size][:per_rank]


def train_pool(cfg: TrainConfig, n: int, excluded: np.ndarray | None) -> np.ndarray:
    """The sorted sample indices a run trains on: all ``n`` but the ``excluded``, or its seeded ``train_subset``
    of them (UsageError when the subset is larger)."""
    pool = np.arange(n)
    if excluded is not None:
        pool = pool[~excluded]
    if cfg.train_subset:
        if cfg.train_subset > len(pool):
            raise UsageError(f"train_subset={cfg.train_subset} exceeds the {len(pool)} training samples")
        pool = np.sort(np.random.default_rng([cfg.seed, 7919]).permutation(pool)[: cfg.train_subset])
    return pool


def _batches(manifest: Manifest, order: np.ndarray, preset: Preprocess, mode: str, cfg: TrainConfig, seed: int,
             boxes: np.ndarray | None = None, max_steps: int = 0,
             params: dict[str, np.ndarray] | None = None,
             blend: tuple[np.ndarray, np.ndarray] | None = None) -> Iterator[Batch]:
    """``params``: the replayed views' stored parameters (``LabelSource.view_params``), mixed with their partners
    when the policy mixes; ``blend``: partners and rows of ``--mix-labels blend`` (mixed in the loader)."""
    if max_steps:
        order = order[: max_steps * cfg.batch_size]
        boxes = boxes[: len(order)] if boxes is not None else None
        params = {k: a[: len(order)] for k, a in params.items()} if params is not None else None
        blend = (blend[0][: len(order)], blend[1][: len(order)]) if blend is not None else None
    if len(order) == 0:  # a rank's empty val share: no batches (the loaders refuse an empty request)
        return
    loader = resolve_loader(cfg.loader)
    try:
        if blend is not None:
            yield from load_blended_batches(loader, manifest, order, preset, mode, cfg.batch_size, cfg.workers,
                                            cfg.device, seed, *blend, hw_decoder_load=cfg.hw_decoder_load)
            return
        if params is not None and (params["partners"] >= 0).any():
            yield from load_mixed_batches(loader, manifest, order, preset, cfg.batch_size, cfg.workers, cfg.device,
                                          boxes, hw_decoder_load=cfg.hw_decoder_load, **params)
            return
        yield from load_batches(loader, manifest, order, preset, mode, cfg.batch_size, cfg.workers, cfg.device,
                                seed, boxes=boxes, hw_decoder_load=cfg.hw_decoder_load,
                                params=params["params"] if params is not None else None)
    except DecodeError as e:  # not caught by the pre-scan: find the file to name it
        lay = layout_of(manifest)
        found = (list(order).index(e.sample), str(e)) if e.sample is not None else \
            lay.find_corrupt(manifest, order, 0)
        where = f"{lay.describe_sample(manifest, int(order[found[0]]))}: {found[1]}" if found else str(e)
        raise UsageError(f"cannot decode {where} (split {manifest.split}); fix or remove it and rerun with --resume "
                         "(finished epochs are kept)") from None


def prepare_output_dir(cfg: TrainConfig, info: DistInfo) -> Path:
    out = Path(cfg.output_dir)
    if info.is_main:
        if out.exists() and any(out.iterdir()) and not cfg.test_only:
            if cfg.overwrite and not cfg.resume:
                shutil.rmtree(out)
            elif not cfg.resume:
                raise UsageError(f"output dir {out} exists: pass --resume to continue it or --overwrite to replace it")
            elif not (Path(cfg.resume_from) if cfg.resume_from else out / "last.pt").is_file():
                raise UsageError(f"--resume: no checkpoint {out / 'last.pt'} to resume from (the run in {out} "
                                 "finished no epoch): rerun with --overwrite to start it again")
        problem = storage.folder_problem(out)
        if problem:
            raise UsageError(f"cannot write the run to --output-dir {out}: {problem}; choose another --output-dir")
    barrier(info)
    return out


def run_training(cfg: TrainConfig) -> dict[str, Any]:
    """Train one student as configured (or, with ``test_only``, evaluate a checkpoint); returns the final
    metrics (also written to ``final.json`` / ``test.json``). Raises UsageError on bad input."""
    cfg = check_config(cfg)
    info = init_distributed(cfg.device)
    if cfg.device == "cuda":  # the fastest kernels for the run's fixed shapes, unless reproducibility is asked for
        torch.backends.cudnn.benchmark = not cfg.deterministic
        torch.backends.cudnn.deterministic = cfg.deterministic
    try:
        return _test_only(cfg, info) if cfg.test_only else _train(cfg, info)
    except OSError as e:  # disk full, read-only or unreadable output dir: one line, not a traceback
        raise UsageError(f"I/O error: {' '.join(str(e).split())}") from None
    finally:
        cleanup(info)


@dataclass
class Run:
    """What every epoch of a run shares, built once by :func:`_setup`."""

    cfg: TrainConfig  # resolved: preset, loader, loss hyperparameters and output dir filled in
    info: DistInfo
    out: Path
    preset: Preprocess
    train_m: Manifest
    val_m: Manifest
    excluded: np.ndarray  # [N_train] bool: never trained on (skipped by the bank, undecodable)
    val_keep: np.ndarray  # val sample indices evaluated (all but undecodable ones)
    parts: ckpt.TrainingParts
    module: nn.Module  # TrainModule(parts.model, parts.criterion), wrapped in DDP under torchrun
    label_source: LabelSource
    steps: int  # steps (micro-batches) per epoch
    tb: Any  # TensorBoard SummaryWriter on rank 0, else None
    identity: dict[str, Any]  # what the data and banks are, whatever their paths (checkpoint.run_identity)
    val_teacher: Callable[[dict], torch.Tensor] | None = None  # the teachers' val logits, for agreement and KL
    step: TrainStep | None = None  # built by _train once the checkpoint (if any) is restored

    @property
    def updates(self) -> int:
        """Optimizer updates per epoch (one per ``optim.accum_steps`` steps)."""
        return updates_per_epoch(self.steps, self.cfg.optim.accum_steps)

    @property
    def num_classes(self) -> int:
        return self.train_m.num_classes


def _train(cfg: TrainConfig, info: DistInfo) -> dict[str, Any]:
    run = _setup(cfg, info)
    cfg = run.cfg
    start_epoch, best = 0, {"top1": -1.0, "ema_top1": -1.0, "pending_train_s": 0.0}
    last = Path(cfg.resume_from) if cfg.resume_from else run.out / "last.pt"
    if cfg.resume and last.is_file():
        start_epoch, best = ckpt.restore_training(last, run.parts, to_dict(cfg), run.identity, info)
        log.info("resumed from %s at epoch %d", last, start_epoch)
    # the schedule's position is the global update, whatever the checkpoint's scheduler stored (a resumed run
    # follows its own config's schedule from its first update)
    run.parts.scheduler = build_scheduler(run.parts.optimizer, run.updates, cfg.epochs, cfg.sched, cfg.optim.lr,
                                          start_epoch * run.updates)
    run.step = _train_step(run, start_epoch * run.updates)
    if info.is_main:
        save_yaml(cfg, run.out / "config.yaml")
        _truncate_metrics(run.out / "metrics.jsonl", start_epoch)
    t_start = time.time()
    metrics: dict[str, Any] = {}
    acc = None

    def evaluate_epoch(epoch: int, train_stats: dict[str, float]) -> None:
        nonlocal metrics, acc, best
        val, acc = _evaluate(run)
        metrics = {"epoch": epoch, **{k: v for k, v in val.items() if k != "n"}, "val_n": val["n"], **train_stats,
                   "train_time_s": best["pending_train_s"], "elapsed_s": time.time() - t_start}
        best = _record_epoch(run, epoch, metrics, {**best, "pending_train_s": 0.0, "pending_stats": None})

    done = start_epoch - 1  # a run stopped between an epoch's training and its evaluation: evaluate it first
    if done >= 0 and best.get("pending_stats") and _evaluates(cfg, done):
        log.info("epoch %d was trained but not evaluated before the run stopped: evaluating it now", done)
        evaluate_epoch(done, best["pending_stats"])
    for epoch in range(start_epoch, cfg.epochs):
        train_stats = _train_epoch(run, epoch)
        # training seconds since the last evaluation (epochs it skips), kept in last.pt for a resumed run, with
        # the epoch's training statistics until its evaluation is recorded
        best["pending_train_s"] = best.get("pending_train_s", 0.0) + train_stats["train_time_s"]
        best["pending_stats"] = train_stats
        _save_last(run, epoch, best)  # the epoch's training is kept even if its evaluation fails
        if _evaluates(cfg, epoch):
            evaluate_epoch(epoch, train_stats)
    final = _finalize(cfg, run.out, metrics, best["top1"], acc, run.label_source, info)
    if run.tb is not None:
        run.tb.close()
    return final


def _evaluates(cfg: TrainConfig, epoch: int) -> bool:
    """Whether ``epoch`` (0-based) is evaluated: every ``eval_every``-th epoch and each of the last ``eval_last``."""
    return (epoch + 1) % max(cfg.eval_every, 1) == 0 or epoch >= cfg.epochs - max(cfg.eval_last, 1)


def _setup(cfg: TrainConfig, info: DistInfo) -> Run:
    """Manifests, loss, student, label source, preset, undecodable images, output dir, optimizer, schedule,
    scaler, DDP, TensorBoard."""
    train_m, val_m = load_manifests(cfg)
    num_classes = train_m.num_classes
    seed_everything(cfg.seed)
    model = create_model(cfg.student, num_classes, cfg.student_weights).to(cfg.device)
    if cfg.sync_bn:
        model = convert_sync_batchnorm(model, info)
    label_source = build_label_source(cfg, train_m, lambda t, d, crop: memory.run_items(
        cfg, num_classes, len(train_m), t, d, crop))
    preset = _choose_preset(cfg, train_m, label_source)
    tap = FeatureTap(model) if kd_losses.needs_features(cfg.method) else None
    dims = {"num_samples": len(train_m), "num_teachers": len(label_source.teachers) or None,
            "teacher_dim": label_source.feature_dim,
            "student_dim": embedding_dim(model, preset.crop) if tap is not None else None}
    if cfg.device == "cuda":
        memory.check_device_memory(cfg, memory.loss_state_bytes(cfg, num_classes, len(train_m),
                                                                 dims["num_teachers"], dims["teacher_dim"]))
    # the loss's own parameters (SL-Enc's network, CRD's heads and memories) from seed + 1, whatever the label
    # source drew before (a live teacher's random init reseeds the global generator)
    seed_everything(cfg.seed + 1)
    criterion = build_criterion(cfg, num_classes, **dims).to(cfg.device)
    # rank 0 scans the splits for undecodable files and tells the others (the same result or the same error)
    excluded, val_bad = on_rank0(lambda: (undecodable(train_m, cfg.skip_corrupt),
                                          undecodable(val_m, cfg.skip_corrupt)), info)
    if label_source.skipped is not None:
        excluded |= label_source.skipped
    val_keep = np.flatnonzero(~val_bad)
    # resolved: the preset, every loss hyperparameter, the bank(s) read (a --teacher lookup's; none when not read)
    cfg = replace(cfg, preset=preset.name, loss=kd_losses.get_spec(cfg.method).resolved_hparams(cfg.loss),
                  banks=tuple(label_source.paths))
    out = prepare_output_dir(cfg, info)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer([model, criterion], cfg.optim)
    n_per_rank = len(train_order(cfg, len(train_m), excluded, 0, info))
    steps = math.ceil(n_per_rank / cfg.batch_size)
    if cfg.max_steps_per_epoch:
        steps = min(steps, cfg.max_steps_per_epoch)
    if cfg.optim.accum_steps > steps and info.is_main:
        log.warning("--accum-steps %d exceeds the %d steps of an epoch: each update averages one epoch's %d "
                    "batches (global_batch_size counts %d micro-batches it never reaches)", cfg.optim.accum_steps,
                    steps, steps, cfg.optim.accum_steps)
    scheduler = build_scheduler(optimizer, updates_per_epoch(steps, cfg.optim.accum_steps), cfg.epochs, cfg.sched,
                                cfg.optim.lr)
    scaler = torch.amp.GradScaler("cuda", enabled=cfg.amp == "fp16" and cfg.device == "cuda")
    module = wrap(TrainModule(model, criterion, tap, cfg.amp, info), info)
    parts = ckpt.TrainingParts(model, criterion, optimizer, scheduler, scaler, build_ema(model, cfg.ema_decay))
    tb = _tensorboard(out) if info.is_main else None
    identity = ckpt.run_identity(train_m, label_source.bank_keys, info)
    teacher = val_teacher(label_source, val_m, preset.name, cfg.device, cfg.data)
    return Run(cfg, info, out, preset, train_m, val_m, excluded, val_keep, parts, module, label_source, steps, tb,
               identity, teacher)


def _train_step(run: Run, updates: int) -> TrainStep:
    """The run's :class:`TrainStep`: its module, optimizer, schedule, scaler, EMA, label source, clipping and
    accumulation, positioned after ``updates`` optimizer updates."""
    cfg, p = run.cfg, run.parts
    targets = torch.from_numpy(run.train_m.labels.astype(np.int64))
    return TrainStep(run.module, p.optimizer, targets, scheduler=p.scheduler, label_source=run.label_source,
                     device=cfg.device, scaler=p.scaler, channels_last=cfg.channels_last,
                     clip_grad=cfg.optim.clip_grad, clip_mode=cfg.optim.clip_mode,
                     accum_steps=cfg.optim.accum_steps, ema=p.ema, updates=updates, info=run.info)


def on_rank0(fn: Callable[[], Any], info: DistInfo) -> Any:
    """``fn()`` run by rank 0 alone, its result (or its UsageError, raised on every rank alike) broadcast to all:
    for work every rank would otherwise repeat (scanning a dataset) and that must not leave a rank waiting."""
    if not info.enabled:
        return fn()
    result: tuple[str, Any] = ("", None)
    if info.is_main:
        try:
            result = ("ok", fn())
        except UsageError as e:
            result = ("error", str(e))
    status, value = broadcast_object(result, info)
    if status == "error":
        raise UsageError(value)
    return value


def _choose_preset(cfg: TrainConfig, train_m: Manifest, label_source: LabelSource) -> Preprocess:
    """``--preset``, or the bank's, or the layout's; warn when a given one differs from the bank's and when a
    multi-view bank is read without replaying its views."""
    bank_pre = label_source.preprocessing
    preset = resolve_preset(cfg.preset, train_m, bank_pre)
    if cfg.preset == "auto" and not bank_pre:  # the layout's default, chosen without a word otherwise
        warning = upscale_warning([(preset, f"the {train_m.layout} layout's default")], typical_side(train_m))
        if warning:
            log.warning("%s", warning)
    same_input = bank_pre and label_source.draws_crops and all(  # a map pools its own crops: input size and norm
        getattr(Preprocess.from_record(bank_pre), k) == getattr(preset, k) for k in ("crop", "mean", "std"))
    if bank_pre and cfg.preset != "auto" and bank_pre.get("name") != preset.name and not same_input:
        log.warning("--preset %s differs from the preprocessing the bank was dumped with (%s): the student sees the "
                    "images otherwise than the teacher did", preset.name, bank_pre.get("name"))
    if label_source.draws_crops and not cfg.augment:
        raise UsageError("--no-augment trains on center views, but a label-map bank exists to label fresh random "
                         "crops (each pooled from its map): drop --no-augment, or train from a dense center bank")
    if label_source.stores_views and not cfg.replay_views:
        log.warning("the bank stores %d random-crop view(s) per image; without --replay-views every sample uses "
                    "view 0's soft labels with the student's own random %s augmentation: pass --replay-views to "
                    "train on the stored views", label_source.num_views, preset.train)
    return preset


def _train_epoch(run: Run, epoch: int) -> dict[str, float]:
    """One epoch: this rank's seeded order, the pipeline of the epoch's mode, the loop; TensorBoard per step."""
    cfg, info = run.cfg, run.info
    order = train_order(cfg, len(run.train_m), run.excluded, epoch, info)
    replay = cfg.replay_views or run.label_source.draws_crops  # a label-map source draws each epoch's crops
    boxes = run.label_source.boxes(order, epoch) if replay else None
    params = run.label_source.view_params(order, epoch) if cfg.replay_views else None
    blend = blend_rows(parse_mix_policy(cfg.mix_policy), cfg.seed, order, epoch, run.preset.crop,
                       len(run.train_m)) if cfg.mix_labels else None
    mode = "views" if replay else ("train" if cfg.augment else "eval")
    seed_epoch(cfg.seed, epoch, info.rank)
    batches = _batches(run.train_m, order, run.preset, mode, cfg, loader_seed(cfg.seed, epoch, info.rank), boxes,
                       cfg.max_steps_per_epoch, params, blend)

    def on_step(step: int, parts: dict[str, float]) -> None:
        if run.tb is not None:
            for k, v in parts.items():
                run.tb.add_scalar(f"train_step/{k}", v, epoch * run.steps + step)

    return train_one_epoch(run.step, batches, epoch, total_steps=run.steps, log_every=cfg.log_every,
                           on_step=on_step)


def _evaluate(run: Run) -> tuple[dict[str, float], MetricAccumulator]:
    """Val metrics of the student, every rank evaluating its share (BN statistics of rank 0 first); with a model
    EMA, its metrics too, prefixed ``ema_`` (``ema_top1``, ...)."""
    cfg, info = run.cfg, run.info
    val_order = val_share(run.val_keep, info)
    targets = torch.from_numpy(run.val_m.labels.astype(np.int64))
    results = []
    for model in [run.parts.model] + ([run.parts.ema.module] if run.parts.ema is not None else []):
        if cfg.precise_bn:
            recalibrate_bn(model, _precise_bn_batches(run), torch.from_numpy(run.train_m.labels.astype(np.int64)),
                           device=cfg.device, amp=cfg.amp, channels_last=cfg.channels_last, info=info)
        # DDP keeps parameters in sync, not the BN statistics of each rank's last batch: evaluate (and save)
        # rank 0's
        broadcast_buffers(model, info)
        results.append(evaluate(model, _batches(run.val_m, val_order, run.preset, "eval", cfg, 0), targets,
                                device=cfg.device, amp=cfg.amp, channels_last=cfg.channels_last, info=info,
                                teacher=run.val_teacher))
    val, acc = results[0]
    if len(results) > 1:
        val = {**val, **{f"ema_{k}": v for k, v in results[1][0].items() if k != "n"}}
    return val, acc


def _precise_bn_batches(run: Run) -> Iterator[Batch]:
    """``cfg.precise_bn`` training batches per rank for :func:`recalibrate_bn`: the same seeded sample of the
    images the run trains on (its ``train_subset`` when it has one) with the same augmentation (the preset's train
    transform, seeded once) at every evaluation; the rank's share of ``precise_bn x batch_size x ranks`` images
    (fewer when the run trains on fewer)."""
    cfg, info = run.cfg, run.info
    pool = train_pool(cfg, len(run.train_m), run.excluded)  # never an image the run does not train on
    per_rank = min(cfg.precise_bn * cfg.batch_size, len(pool) // info.world_size)
    order = np.random.default_rng([cfg.seed, 104729]).permutation(pool)[: per_rank * info.world_size]
    order = order[info.rank::info.world_size]
    mode = "train" if cfg.augment else "eval"
    return _batches(run.train_m, order, run.preset, mode, cfg, derive_seed(cfg.seed, SEED_PRECISE_BN, 0, info.rank)
                    % 2**31)


def val_share(keep: np.ndarray, info: DistInfo) -> np.ndarray:
    """This rank's contiguous share of the val samples ``keep``; empty for ranks beyond the number of samples
    (they evaluate nothing and still take part in the all-reduce of the metric sums)."""
    return np.array_split(keep, info.world_size)[info.rank]


def _save_last(run: Run, epoch: int, best: dict[str, float]) -> None:
    """Rank 0: ``last.pt`` of a finished training epoch (written again with the epoch's top-1 after evaluation)."""
    rng = gather_objects(ckpt.rng_state(), run.info)  # every rank's own generators
    if run.info.is_main:
        cfg = run.cfg
        ckpt.save_training(run.out / "last.pt", run.parts, epoch, best, to_dict(cfg), cfg.student, run.num_classes,
                           run.identity, rng)
    barrier(run.info)


def _record_epoch(run: Run, epoch: int, metrics: dict[str, Any], best: dict[str, float]) -> dict[str, float]:
    """Rank 0: append to metrics.jsonl, write last.pt (and best.pt, ema_best.pt), TensorBoard, log line. Returns
    the best top-1 so far (``top1``, ``ema_top1``)."""
    cfg = run.cfg
    top1 = metrics["top1"]
    is_best = top1 > best["top1"]
    ema_best = "ema_top1" in metrics and metrics["ema_top1"] > best["ema_top1"]
    best = {**best, **{k: max(best[k], metrics.get(k, best[k])) for k in ("top1", "ema_top1")}}
    rng = gather_objects(ckpt.rng_state(), run.info)
    if run.info.is_main:
        with open(run.out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(metrics) + "\n")
        config = to_dict(cfg)
        ckpt.save_training(run.out / "last.pt", run.parts, epoch, best, config, cfg.student, run.num_classes,
                           run.identity, rng, run.preset.to_dict())
        if is_best:
            ckpt.save_best(run.out / "best.pt", run.parts.model, epoch, top1, config, cfg.student,
                           run.preset.to_dict())
        if ema_best:
            ckpt.save_best(run.out / "ema_best.pt", run.parts.ema.module, epoch, metrics["ema_top1"], config,
                           cfg.student, run.preset.to_dict())
        for k, v in metrics.items():
            if run.tb is not None and isinstance(v, (int, float)):
                run.tb.add_scalar(f"epoch/{k}", v, epoch)
        log.info("epoch %d: top1 %.2f top5 %.2f nll %.4f ece %.4f loss %.4f (%.0f img/s)", epoch, top1,
                 metrics["top5"], metrics["nll"], metrics["ece"], metrics.get("train_loss", float("nan")),
                 metrics["train_images_per_s"])
    barrier(run.info)
    return best


def _test_only(cfg: TrainConfig, info: DistInfo) -> dict[str, Any]:
    """Evaluate a checkpoint (``--resume PATH``, ``--student-weights``, else ``<output_dir>/last.pt``) on the val
    split: torchvision's ``--test-only``. Prints nothing itself; writes ``<output_dir>/test.json``."""
    weights = cfg.resume_from or cfg.student_weights or str(Path(cfg.output_dir) / "last.pt")
    if not Path(weights).is_file():
        raise UsageError(f"--test-only: no checkpoint {weights}; give --resume PATH or --student-weights PATH")
    _, val_m = load_manifests(cfg)
    preset = _checkpoint_preset(cfg, weights, val_m)
    model = create_model(cfg.student, val_m.num_classes, weights).to(cfg.device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    keep = np.flatnonzero(~on_rank0(lambda: undecodable(val_m, cfg.skip_corrupt), info))
    order = val_share(keep, info)
    val, _ = evaluate(model, _batches(val_m, order, preset, "eval", cfg, 0),
                      torch.from_numpy(val_m.labels.astype(np.int64)), device=cfg.device, amp=cfg.amp,
                      channels_last=cfg.channels_last, info=info)
    result = {"checkpoint": str(weights), "student": cfg.student, "split": cfg.val_split, "preset": preset.name,
              **{k: val[k] for k in ("top1", "top5", "nll", "ece")}, "n": val["n"]}
    out = Path(cfg.output_dir)
    if info.is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "test.json").write_text(json.dumps(result, indent=2))
    return result


def _checkpoint_preset(cfg: TrainConfig, weights: str, val_m: Manifest) -> Preprocess:
    """``--preset``, else the checkpoint's own preprocessing record, else (older checkpoints) the preset its config
    names, else the layout's."""
    if cfg.preset != "auto":
        return resolve_preset(cfg.preset, val_m)
    state = read_checkpoint(weights)
    state = state if isinstance(state, dict) else {}
    record = state.get("preprocessing")
    if isinstance(record, dict) and "crop" in record:
        return resolve_preset("auto", val_m, record)
    saved = state.get("config") if isinstance(state.get("config"), dict) else {}
    return resolve_preset(saved.get("preset") if saved.get("preset") in PRESETS else "auto", val_m)


def _finalize(cfg: TrainConfig, out: Path, metrics: dict, best: float, acc: MetricAccumulator | None,
              label_source: LabelSource, info: DistInfo) -> dict:
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines() if l.strip()]
    last = rows[-1] if rows else metrics
    final = {
        "method": cfg.method, "student": cfg.student,
        "teacher": "+".join(t["arch"] for t in label_source.teachers) or None,
        "bank": ",".join(label_source.paths) or ("live" if cfg.live_teacher else None),
        "preset": cfg.preset, "amp": cfg.amp, "loader": cfg.loader,
        "epochs": cfg.epochs, "seed": cfg.seed, "world_size": info.world_size,
        "global_batch_size": cfg.batch_size * info.world_size * cfg.optim.accum_steps,  # images per update
        **{k: last.get(k) for k in ("top1", "top5", "nll", "ece", "teacher_agreement", "teacher_kl")},
        "best_top1": max((r["top1"] for r in rows), default=best),
        **({"ema_top1": last["ema_top1"], "ema_best_top1": max(r["ema_top1"] for r in rows if "ema_top1" in r)}
           if "ema_top1" in last else {}),
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
