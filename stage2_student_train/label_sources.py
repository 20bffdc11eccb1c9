"""Where ``batch["teacher_logits"]`` comes from: a bank in memory (the point of this project), a live teacher
(comparisons only), or nothing (methods without a teacher).

Banks are loaded once and gathered by index: no per-step zarr reads. Stage 2 never imports stage 1 and, with
a bank, never builds a teacher model.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from pipeline.bank.key import bank_key, cache_root, default_bank_path
from pipeline.bank.reader import LabelBank
from pipeline.data.manifest import Manifest
from pipeline.data.presets import Preprocess
from pipeline.errors import BankError, UsageError
from pipeline.models import weights_identity

log = logging.getLogger(__name__)


def view_choice(index: torch.Tensor, epoch: int, seed: int, num_views: int) -> torch.Tensor:
    """Which stored view sample ``index`` uses in ``epoch``: a seeded hash, so every view gets used and runs
    are reproducible. -> [B] int64 in [0, num_views)."""
    x = index.to(torch.int64) * 0x9E3779B1 + (epoch + 1) * 0x85EBCA77 + (seed + 1) * 0xC2B2AE3D
    x = (x ^ (x >> 15)) * 0x2C1B3C6D
    x = x ^ (x >> 12)
    return torch.remainder(x, num_views)


class BankLabels:
    """Teacher logits of one or more banks held in memory: [N, T, V, C] (several banks: concatenated on T)."""

    def __init__(self, banks: list[LabelBank], device: str = "cpu", replay_seed: int | None = None):
        """``replay_seed``: replay stored views (view per sample and epoch = ``view_choice``); None = view 0."""
        first = banks[0]
        for b in banks[1:]:
            for what, a, c in (("num_samples", b.num_samples, first.num_samples),
                               ("num_views", b.num_views, first.num_views),
                               ("num_classes", b.num_classes, first.num_classes)):
                if a != c:
                    raise BankError(f"banks {first.path} and {b.path} differ in field '{what}' ({c} vs {a})")
        self.paths = [b.path for b in banks]
        logits = torch.cat([b.load(torch.float16) for b in banks], dim=1)
        if device == "cuda":
            free = torch.cuda.mem_get_info()[0]
            if logits.numel() * 2 < 0.25 * free:
                logits = logits.to(device)
            else:
                logits = logits.pin_memory()
        self.logits = logits
        # CPU gather through numpy: a row memcpy, ~1M rows/s on one core; torch's advanced indexing on CPU goes
        # through its thread pool and ran 10x slower on a busy 2-core machine (bench/stage2.py)
        self._rows = logits[:, :, 0].numpy() if logits.device.type == "cpu" else None
        self.device = device
        self.num_views = first.num_views
        self.views = torch.from_numpy(first.views()) if first.num_views > 1 or _has_boxes(first) else None
        self.skipped = np.logical_or.reduce([b.skipped() for b in banks])
        self.teachers = [t for b in banks for t in b.teachers]
        self.replay_seed = replay_seed

    def boxes(self, order: np.ndarray, epoch: int) -> np.ndarray:
        """Per-sample boxes [len(order), 1, 5] of the chosen view (for the DALI view-replay pipeline)."""
        if self.views is None:
            raise UsageError("--replay-views needs a bank with stored views (dump with --views K --view-policy rrc)")
        idx = torch.from_numpy(np.asarray(order, np.int64))
        v = view_choice(idx, epoch, self.replay_seed or 0, self.num_views)
        return self.views[idx, v].numpy()[:, None, :]

    def __call__(self, batch: dict, images: torch.Tensor | None = None) -> torch.Tensor:
        """-> teacher logits [B, T, C] float32 for ``batch['index']`` (view chosen per sample when replaying)."""
        index = batch["index"]
        idx = index.to(self.logits.device)
        if self.replay_seed is not None and self.num_views > 1:
            view = view_choice(index, batch["epoch"], self.replay_seed, self.num_views)
            out = self.logits[idx, :, view.to(self.logits.device)]
        elif self._rows is not None:
            out = torch.from_numpy(self._rows[index.cpu().numpy()])
        else:
            out = self.logits[idx, :, 0]
        return out.to(images.device if images is not None else self.device, non_blocking=True).float()


def _has_boxes(bank: LabelBank) -> bool:
    return bank.attrs.get("views", {}).get("policy", "center") != "center"


class LiveTeacherLabels:
    """Runs a teacher ensemble on each batch's images (eval mode, inference mode) -> [B, T, C]."""

    def __init__(self, archs: list[str], weights: list[str | None], num_classes: int, device: str, seed: int = 0):
        from pipeline.models.ensemble import build_ensemble

        self.model = build_ensemble(archs, weights, num_classes, device, seed)
        self.teachers = [{"arch": a, **weights_identity(w)} for a, w in zip(archs, weights)]
        self.paths: list[str] = []
        self.skipped = None
        self.num_views = 1

    def __call__(self, batch: dict, images: torch.Tensor | None = None) -> torch.Tensor:
        return self.model(images).clone()


def find_bank(manifest: Manifest, preset: Preprocess, teachers: list[str], weights: list[str]) -> str:
    """The cached bank of ``teachers`` for this dataset: the default-key path of a plain dump (fp16, center view)
    if it exists, else the single complete bank in the cache directory whose teachers and dataset match."""
    ws = list(weights) if weights else ["DEFAULT"] * len(teachers)
    if len(ws) != len(teachers):
        raise UsageError(f"{len(teachers)} --teacher flags but {len(ws)} --teacher-weights flags")
    idents = [{"name": a, "arch": a, **weights_identity(w)} for a, w in zip(teachers, ws)]
    preprocessing = {**preset.to_dict(), "teacher_amp": False}
    key = bank_key(idents, manifest.fingerprint, preprocessing, {"policy": "center", "num_views": 1}, "float16")
    path = default_bank_path(manifest.name, manifest.split, idents, key)
    if path.exists():
        return str(path)
    folder = path.parent
    want = [(t["arch"], t["weights"], t.get("sha256")) for t in idents]
    found = []
    for cand in sorted(folder.glob(f"{'+'.join(teachers)}-*.zarr")) if folder.is_dir() else []:
        try:
            b = LabelBank(cand)
        except BankError:
            continue
        have = [(t["arch"], t["weights"], t.get("sha256")) for t in b.teachers]
        if have == want and b.complete and b.attrs.get("dataset", {}).get("fingerprint") == manifest.fingerprint:
            found.append(str(cand))
    if len(found) == 1:
        return found[0]
    if len(found) > 1:
        raise UsageError(f"several banks match --teacher {' '.join(teachers)}: {', '.join(found)}; choose one with --labels")
    raise UsageError(
        f"no bank for teacher(s) {' '.join(teachers)} on {manifest.name}/{manifest.split} in {cache_root()}: "
        f"run python -m pipeline.dump_logits --teacher {' --teacher '.join(teachers)} --data {manifest.root} first, "
        "or give --labels PATH"
    )
