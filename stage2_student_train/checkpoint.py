"""Checkpoint state, in one place: what a training checkpoint holds, how it is written (never half-written:
temp file, fsync, rename) and how a run is restored from it.

``last.pt`` (every epoch): ``model``, ``criterion`` (a loss's parameters and buffers: SL-Enc's network, CRD's
memories), ``optimizer``, ``scheduler``, ``scaler``, ``epoch``, ``best_top1``, ``rng`` (Python, numpy, torch and
CUDA generators), ``config`` (the resolved TrainConfig), ``num_classes``, ``arch``. ``best.pt``: ``model``,
``epoch``, ``top1``, ``config``, ``arch``. Both load with ``torch.load(weights_only=True)`` and are valid teacher
weights for stage 1 (the model registry reads the ``model`` entry).
"""

from __future__ import annotations

import logging
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from pipeline import storage
from pipeline.errors import UsageError

log = logging.getLogger(__name__)

# The stateful parts of a run, saved and restored by name (each has state_dict / load_state_dict).
STATEFUL = ("model", "criterion", "optimizer", "scheduler", "scaler")
# Config keys (dotted) that define what a run trains: resuming with another value would continue a different
# experiment under the old one's name. Epochs, logging, workers, device and the schedule's length may change.
RUN_DEFINING = ("method", "loss", "student", "banks", "live_teacher", "data", "layout", "train_split", "preset",
                "train_subset", "augment", "replay_views", "batch_size", "optim.name")
_PATH_KEYS = ("data", "banks")


@dataclass
class TrainingParts:
    """Everything of a run whose state a checkpoint carries (the unwrapped model, not its DDP wrapper)."""

    model: nn.Module
    criterion: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler


def save_training(path: str | Path, parts: TrainingParts, epoch: int, best_top1: float, config: dict[str, Any],
                  arch: str, num_classes: int) -> None:
    """Write ``last.pt``: every stateful part, the epoch just finished, the RNG states and the run's identity."""
    state: dict[str, Any] = {name: getattr(parts, name).state_dict() for name in STATEFUL}
    state.update({"epoch": epoch, "best_top1": best_top1, "rng": rng_state(), "config": config,
                  "num_classes": num_classes, "arch": arch})
    save_atomic(state, path)


def save_best(path: str | Path, model: nn.Module, epoch: int, top1: float, config: dict[str, Any], arch: str) -> None:
    """Write ``best.pt``: the model of the best epoch so far (a teacher checkpoint for stage 1)."""
    save_atomic({"model": model.state_dict(), "epoch": epoch, "top1": top1, "config": config, "arch": arch}, path)


def _lookup(config: dict[str, Any], dotted: str) -> Any:
    value: Any = config
    for part in dotted.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    if dotted in _PATH_KEYS and value:
        value = [storage.absolute(v) for v in value] if isinstance(value, (list, tuple)) else storage.absolute(value)
    return list(value) if isinstance(value, tuple) else value


def check_resumable(saved: dict[str, Any], config: dict[str, Any], path: str | Path) -> None:
    """Raise UsageError when ``config`` (the resolved config of this run, as a dict) differs from the checkpoint's
    ``saved`` config in a key of :data:`RUN_DEFINING` (``banks`` only when the checkpoint records them)."""
    # a checkpoint without banks found its bank by --teacher before the lookup's result was recorded: not compared
    keys = [k for k in RUN_DEFINING if not (k == "banks" and not _lookup(saved, k))]
    diff = [f"{key} {_lookup(saved, key)!r} -> {_lookup(config, key)!r}" for key in keys
            if _lookup(saved, key) != _lookup(config, key)]
    if diff:
        raise UsageError(f"--resume: {path} was trained with another configuration ({'; '.join(diff)}); rerun with "
                         "the checkpoint's settings (its config.yaml), or use a new --output-dir or --overwrite")


def restore_training(path: str | Path, parts: TrainingParts, config: dict[str, Any] | None = None) -> tuple[int, float]:
    """Load every stateful part and the RNG states from ``last.pt``; returns (next epoch, best top-1 so far).

    With ``config`` (this run's resolved config), refuses a checkpoint of another run (:func:`check_resumable`).
    Raises UsageError when the file is not a training checkpoint or its state does not fit ``parts`` (another
    architecture, class count or optimizer)."""
    try:
        state = load(path)
    except Exception as e:  # truncated, not a torch file, unpicklable objects
        raise UsageError(f"--resume: cannot read checkpoint {path}: {' '.join(str(e).split())[:160]}") from None
    missing = [k for k in (*STATEFUL, "epoch", "best_top1", "rng") if k not in state]
    if missing:
        raise UsageError(f"--resume: {path} is not a training checkpoint (no {', '.join(missing)}); "
                         "a best.pt or teacher checkpoint starts a run with --student-weights instead")
    if config is not None and isinstance(state.get("config"), dict):
        check_resumable(state["config"], config, path)
        before, now = state["config"].get("epochs"), config.get("epochs")
        if before != now:  # extending (or shortening) a run is allowed, but never without a word
            log.warning("--resume: %s was a run of %s epochs; this one runs to %s (pass --epochs %s to keep it)",
                        path, before, now, before)
    for name in STATEFUL:
        try:
            getattr(parts, name).load_state_dict(state[name])
        except (RuntimeError, ValueError, KeyError) as e:
            first = " ".join(str(e).split())[:200]
            raise UsageError(f"--resume: the {name} state in {path} does not fit this run "
                             f"(saved for {state.get('arch', '?')}): {first}") from None
    set_rng_state(state["rng"])
    return int(state["epoch"]) + 1, float(state["best_top1"])


def rng_state() -> dict[str, Any]:
    """Every RNG's state in plain types and tensors, so checkpoints load with ``weights_only=True``."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": random.getstate(),
             "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached": float(cached)},
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_atomic(obj: Any, path: str | Path) -> None:
    """``torch.save`` to ``path`` so that a crash leaves either the old file or the new one, never a torn one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:  # disk full, read-only folder (torch.save reports short writes as RuntimeError)
        tmp.unlink(missing_ok=True)
        raise UsageError(f"cannot write checkpoint {path}: {' '.join(str(e).split())[:200]}; "
                         "the previous checkpoint (if any) is kept") from None
    dfd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def load(path: str | Path) -> dict[str, Any]:
    """A checkpoint's dict, tensors on the CPU (``load_state_dict`` copies them to each part's device)."""
    return torch.load(path, map_location="cpu", weights_only=True)
