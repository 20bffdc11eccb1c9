"""Checkpoint state, in one place: what a training checkpoint holds, how it is written (never half-written:
temp file, fsync, rename) and how a run is restored from it.

``last.pt`` (every epoch): ``model``, ``criterion`` (a loss's parameters and buffers: SL-Enc's network, CRD's
memories), ``optimizer``, ``scheduler`` (recorded; a resumed run positions its own schedule at the global step),
``scaler``, ``ema`` (the model EMA's weights and buffers, with ``ema_decay`` > 0), ``epoch``, ``best_top1``,
``ema_best_top1``, ``pending_train_s``, ``pending_stats``, ``preprocessing`` (the eval transform's record), ``rng`` (one record per rank: Python, numpy, torch and that rank's own CUDA
device), ``config`` (the resolved TrainConfig), ``identity`` (the training data's fingerprint, the banks' keys, the
world size: what the run is, wherever its files are), ``num_classes``, ``arch``.

Resuming (:func:`restore_training`): keys that define the run (``RUN_DEFINING``) must be equal, data and banks
are compared by identity (fingerprint, bank key) rather than path (a moved copy resumes, the move is logged);
optimizer settings (lr, momentum, nesterov, betas, weight decay) and the whole schedule may change and apply from
the first resumed step, each change logged; another world size continues (its steps per epoch and per-rank
random streams change, logged). ``best.pt``: ``model``,
``epoch``, ``top1``, ``config``, ``arch``, ``preprocessing``; ``ema_best.pt``: the same for the EMA's best epoch
(its ``model`` is the EMA's weights). All load with ``torch.load(weights_only=True)`` and are valid teacher
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
from pipeline.config import RESUME_APPLY, RESUME_MATCH, keys_where, to_dict
from pipeline.errors import UsageError
from stage2_student_train.config import TrainConfig

log = logging.getLogger(__name__)

# The stateful parts of a run, saved and restored by name (each has state_dict / load_state_dict).
STATEFUL = ("model", "criterion", "optimizer", "scheduler", "scaler")
# Config keys (dotted) that define what a run trains (resuming with another value would continue a different
# experiment under the old one's name), and the keys a resumed run may change (applied from its first step, logged):
# both declared per key in stage2_student_train/config.py.
RUN_DEFINING = keys_where(TrainConfig, resume=RESUME_MATCH)
CHANGEABLE = keys_where(TrainConfig, resume=RESUME_APPLY)
_PATH_KEYS = ("data", "banks")
_DEFAULT_CONFIG = to_dict(TrainConfig())  # what a key missing from an older checkpoint's config meant
# ... except where the behaviour before the key differs from its default: key -> (the saved key that made the old
# behaviour matter, the value it meant). A --replay-views run from before view_order replayed the hash order.
_LEGACY = {"view_order": ("replay_views", "hash")}


def _default(dotted: str, config: dict[str, Any] | None = None) -> Any:
    if dotted in _LEGACY and config is not None and config.get(_LEGACY[dotted][0]):
        return _LEGACY[dotted][1]
    value: Any = _DEFAULT_CONFIG
    for part in dotted.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value


@dataclass
class TrainingParts:
    """Everything of a run whose state a checkpoint carries (the unwrapped model, not its DDP wrapper)."""

    model: nn.Module
    criterion: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    ema: nn.Module | None = None  # timm ModelEmaV3 (its ``module`` is the averaged student), None when off


def run_identity(train_manifest: Any, bank_keys: list[str], info: Any) -> dict[str, Any]:
    """What a run trains on, independent of paths: the training data's fingerprint, the banks' keys, the world
    size (processes)."""
    return {"data_fingerprint": train_manifest.fingerprint, "bank_keys": list(bank_keys),
            "world_size": int(info.world_size)}


def save_training(path: str | Path, parts: TrainingParts, epoch: int, best: dict[str, float], config: dict[str, Any],
                  arch: str, num_classes: int, identity: dict[str, Any] | None = None,
                  rng: list[dict[str, Any]] | None = None, preprocessing: dict[str, Any] | None = None) -> None:
    """Write ``last.pt``: every stateful part (the EMA's ``module`` when there is one), the epoch just finished,
    the best top-1 so far (``best``: ``top1`` and ``ema_top1``; ``pending_train_s``: training seconds of the
    epochs since the last evaluation; ``pending_stats``: the training statistics of an epoch whose evaluation is
    not recorded yet, or None), the RNG states of every rank (``rng``, gathered
    by the caller; default: this process's), the run's identity and its eval ``preprocessing``
    (``Preprocess.to_dict()``: what stage 1 uses for this checkpoint as a teacher, and ``--test-only``)."""
    state: dict[str, Any] = {name: getattr(parts, name).state_dict() for name in STATEFUL}
    if parts.ema is not None:
        state["ema"] = parts.ema.module.state_dict()
    state.update({"epoch": epoch, "best_top1": best["top1"], "ema_best_top1": best.get("ema_top1", -1.0),
                  "pending_train_s": best.get("pending_train_s", 0.0), "pending_stats": best.get("pending_stats"),
                  "rng": rng if rng is not None else [rng_state()],
                  "config": config, "identity": identity or {}, "num_classes": num_classes, "arch": arch,
                  "preprocessing": preprocessing})
    save_atomic(state, path)


def save_best(path: str | Path, model: nn.Module, epoch: int, top1: float, config: dict[str, Any], arch: str,
              preprocessing: dict[str, Any] | None = None) -> None:
    """Write ``best.pt``: the model of the best epoch so far (a teacher checkpoint for stage 1) and the
    preprocessing it was trained and evaluated with (stage 1's ``--preset auto`` uses it)."""
    save_atomic({"model": model.state_dict(), "epoch": epoch, "top1": top1, "config": config, "arch": arch,
                 "preprocessing": preprocessing}, path)


def _lookup(config: dict[str, Any], dotted: str) -> Any:
    """The value of ``dotted`` in ``config``; a declared key missing from it (a checkpoint older than the key)
    reads as the key's default."""
    value: Any = config
    for part in dotted.split("."):
        if isinstance(value, dict) and part not in value:
            return _default(dotted, config)
        value = value.get(part) if isinstance(value, dict) else None
    if dotted in _PATH_KEYS and value:
        value = [storage.absolute(v) for v in value] if isinstance(value, (list, tuple)) else storage.absolute(value)
    return list(value) if isinstance(value, tuple) else value


def check_resumable(saved: dict[str, Any], config: dict[str, Any], path: str | Path,
                    saved_identity: dict[str, Any] | None = None, identity: dict[str, Any] | None = None) -> None:
    """Raise UsageError when ``config`` (the resolved config of this run, as a dict) differs from the checkpoint's
    ``saved`` config in a key of :data:`RUN_DEFINING` (``banks`` only when the checkpoint records them). With both
    identities (:func:`run_identity`), ``data`` and ``banks`` are compared by fingerprint and key instead of path:
    the same data or bank at another path resumes (logged), other data is refused."""
    saved_identity, identity = saved_identity or {}, identity or {}
    by_identity = {"data": "data_fingerprint", "banks": "bank_keys"}
    keys, diff = [], []
    for key in RUN_DEFINING:
        if key == "banks" and not _lookup(saved, key):
            continue  # found by --teacher before the lookup's result was recorded: not compared
        ident = by_identity.get(key)
        if ident and saved_identity.get(ident) is not None and identity.get(ident) is not None:
            if saved_identity[ident] != identity[ident]:
                diff.append(f"{key} {_lookup(saved, key)!r} -> {_lookup(config, key)!r} ({ident.replace('_', ' ')} "
                            "differs: other content)")
            elif _lookup(saved, key) != _lookup(config, key):
                log.info("--resume: %s moved: %r -> %r (same %s)", key, _lookup(saved, key), _lookup(config, key),
                         ident.replace("_", " "))
            continue
        keys.append(key)
    diff += [f"{key} {_lookup(saved, key)!r} -> {_lookup(config, key)!r}" for key in keys
             if _lookup(saved, key) != _lookup(config, key)]
    if diff:
        raise UsageError(f"--resume: {path} was trained with another configuration ({'; '.join(diff)}); rerun with "
                         "the checkpoint's settings (its config.yaml), or use a new --output-dir or --overwrite")


def restore_training(path: str | Path, parts: TrainingParts, config: dict[str, Any] | None = None,
                     identity: dict[str, Any] | None = None, info: Any = None) -> tuple[int, dict[str, float]]:
    """Load the model, loss, optimizer, scaler and EMA states and this rank's RNG states from ``last.pt``; returns
    (next epoch, best top-1 so far: ``{"top1", "ema_top1"}``). The scheduler's stored state is not loaded: the caller positions this run's
    schedule at the global step (``optim.build_scheduler``).

    With ``config`` (this run's resolved config, as a dict), refuses a checkpoint of another run
    (:func:`check_resumable`, by ``identity`` for data and banks), then applies this config's optimizer settings
    over the restored ones, logging each setting that changed (:data:`CHANGEABLE`). ``info``: this process's
    ``DistInfo`` (rank, world size). Raises UsageError when the file is not a training checkpoint or its state
    does not fit ``parts`` (another architecture, class count or optimizer)."""
    try:
        state = load(path)
    except Exception as e:  # truncated, not a torch file, unpicklable objects
        raise UsageError(f"--resume: cannot read checkpoint {path}: {' '.join(str(e).split())[:160]}") from None
    missing = [k for k in (*STATEFUL, "epoch", "best_top1", "rng") if k not in state]
    if missing:
        raise UsageError(f"--resume: {path} is not a training checkpoint (no {', '.join(missing)}); "
                         "a best.pt or teacher checkpoint starts a run with --student-weights instead")
    saved_config = state.get("config") if isinstance(state.get("config"), dict) else None
    if config is not None and saved_config is not None:
        check_resumable(saved_config, config, path, state.get("identity"), identity)
        _log_changes(saved_config, config, path)
    if parts.ema is not None and "ema" not in state:
        raise UsageError(f"--resume: {path} holds no model EMA (trained without ema_decay); resume with "
                         "ema_decay=0 or start a new --output-dir")
    for name in STATEFUL + (("ema",) if parts.ema is not None else ()):
        if name == "scheduler":
            continue
        try:
            part = parts.ema.module if name == "ema" else getattr(parts, name)
            part.load_state_dict(state[name])
        except (RuntimeError, ValueError, KeyError) as e:
            first = " ".join(str(e).split())[:200]
            raise UsageError(f"--resume: the {name} state in {path} does not fit this run "
                             f"(saved for {state.get('arch', '?')}): {first}") from None
    if config is not None:
        from stage2_student_train.config import OptimConfig
        from pipeline.config import from_dict
        from stage2_student_train.optim import apply_settings

        apply_settings(parts.optimizer, from_dict(OptimConfig, config.get("optim", {}), "optim."))
    _restore_rng(state["rng"], state.get("identity", {}).get("world_size"), info, path)
    return int(state["epoch"]) + 1, {"top1": float(state["best_top1"]),
                                     "ema_top1": float(state.get("ema_best_top1", -1.0)),
                                     "pending_train_s": float(state.get("pending_train_s", 0.0)),
                                     "pending_stats": state.get("pending_stats")}


def _log_changes(saved: dict[str, Any], config: dict[str, Any], path: str | Path) -> None:
    """One warning naming every :data:`CHANGEABLE` setting that differs from the checkpoint's."""
    changed = [f"{k} {_lookup(saved, k)!r} -> {_lookup(config, k)!r}" for k in CHANGEABLE
               if _lookup(saved, k) is not None and _lookup(saved, k) != _lookup(config, k)]
    if changed:
        log.warning("--resume: %s was trained with other settings; from the first resumed step this run uses: %s",
                    path, "; ".join(changed))


def _restore_rng(saved: Any, saved_world: int | None, info: Any, path: str | Path) -> None:
    """This rank's RNG states from a checkpoint's ``rng`` (one record per rank; a single dict in checkpoints of
    earlier versions). Another world size: ranks keep the streams training derives per (seed, epoch, rank)."""
    records = saved if isinstance(saved, list) else [saved]
    rank, world = (info.rank, info.world_size) if info is not None else (0, 1)
    if len(records) != world:
        log.warning("--resume: %s was written by %d process(es), this run has %d: steps per epoch and each "
                    "rank's random streams (derived from seed, epoch and rank) follow the new world size", path,
                    saved_world or len(records), world)
        return
    set_rng_state(records[rank])


def rng_state() -> dict[str, Any]:
    """Every RNG's state in plain types and tensors, so checkpoints load with ``weights_only=True``."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": random.getstate(),
             "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached": float(cached)},
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state(torch.cuda.current_device())  # this rank's own device
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if isinstance(cuda, (list, tuple)):  # earlier checkpoints: every visible device's state, from rank 0
        cuda = cuda[0] if cuda else None
    if cuda is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(cuda, torch.cuda.current_device())


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
