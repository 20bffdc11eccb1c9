"""Stage 2 from a label-map bank (issue 26): a fresh random crop per (seed, epoch, sample), its soft label pooled
from the teacher's map over the crop's box (ReLabel's LabelPooling, Yun et al. CVPR 2021), so that one pass of
the teacher labels unlimited crops.

The coordinate convention (crop boxes into the map's frame, RoIAlign, clipping, flips) is documented and
implemented once, in :mod:`pipeline.bank.map_pool`.

CutMix (``--cutmix ALPHA``): one box per batch (timm's batch mode: the partner of sample i is B - 1 - i,
lambda ~ Beta(ALPHA, ALPHA), box clipped to the image, lambda corrected to the box's area); each sample's label
is its own crop's map pooled over the part it keeps plus the partner's map pooled over the pasted part, weighted
by area, in logits (region-exact: the composite map pooled over the crop): ``z_i = pool_i(crop_i) -
r·pool_i(cut_i) + r·pool_j(cut_j)``, r = 1 - lambda, where cut is the box inside each sample's own crop.
Hard labels follow the shared contract: ``label`` (own class), ``label_mix`` (partner's class), ``lam`` [B]
float32 (area weight of ``label``).
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch

from pipeline.bank.labelmap import densify, require_map_bank
from pipeline.bank.map_pool import crop_boxes, map_boxes, pool, sub_crops
from pipeline.bank.reader import LabelBank
from pipeline.data.presets import Preprocess
from pipeline.errors import BankError, UsageError

log = logging.getLogger(__name__)


def cutmix_box(rng: np.random.Generator, alpha: float, height: int, width: int) -> tuple[tuple[float, ...], float]:
    """timm's CutMix box (``rand_bbox`` + ``correct_lam``): -> ((top, left, bottom, right) in fractions of the
    image, lambda = 1 - box area / image area)."""
    lam = float(rng.beta(alpha, alpha))
    rat = np.sqrt(1 - lam)
    ch, cw = int(height * rat), int(width * rat)
    cy, cx = int(rng.integers(0, height)), int(rng.integers(0, width))
    y1, y2 = np.clip(cy - ch // 2, 0, height), np.clip(cy + ch // 2, 0, height)
    x1, x2 = np.clip(cx - cw // 2, 0, width), np.clip(cx + cw // 2, 0, width)
    lam = 1 - (y2 - y1) * (x2 - x1) / float(height * width)
    return (y1 / height, x1 / width, y2 / height, x2 / width), lam


def cutmix_logits(maps: torch.Tensor, crops: torch.Tensor, regions: torch.Tensor, cut: tuple[float, ...],
                  partner: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Region-exact CutMix labels: maps [B, T, S, S, C], crops [B, 5], regions [B, 4], ``cut`` (top, left,
    bottom, right) in crop fractions, ``partner`` [B] -> (logits [B, T, C], r = the pasted area's share)."""
    s = maps.shape[2]
    whole = pool(maps, map_boxes(crops, regions, s))
    r = (cut[2] - cut[0]) * (cut[3] - cut[1])
    if r <= 0:
        return whole, 0.0
    sub = map_boxes(sub_crops(crops, cut), regions, s)
    own = pool(maps, sub)
    return whole - r * own + r * own[partner], float(r)


class MapLabelSource:
    """Soft labels pooled from a label-map bank held in memory (its own format: top-k maps stay top-k and are
    densified per batch on the device), for fresh random crops: :meth:`boxes` draws each epoch's crops (the
    loader replays them, ``draws_crops``), :meth:`__call__` pools the map over each crop's box and adds
    ``teacher_logits`` [B, T, C] float32, which every logit method reads as a bank's logits; with ``cutmix`` > 0
    it also mixes the batch's images and adds ``label_mix`` and ``lam``.

    Attributes as :class:`stage2_student_train.label_sources.LabelSource`; ``size`` S, ``region`` (eval/full),
    ``arrays`` ({name: [N, T, S, S(, K|C)] tensor}), ``regions`` [N, 4], ``image_size`` [N, 2]."""

    draws_crops = True

    def __init__(self, bank: LabelBank, preset: Preprocess, seed: int = 0, cutmix: float = 0.0):
        lm = require_map_bank(bank.attrs, bank.path)
        self.size, self.region, self.num_classes = int(lm["size"]), lm["region"], bank.num_classes
        self.teachers, self.paths = bank.teachers, [bank.path]
        self.bank_keys = [str(bank.attrs.get("key", ""))]
        self.skipped = bank.skipped()
        self.num_views, self.stores_views, self.feature_dim = 1, False, None
        self.preprocessing = bank.attrs.get("preprocessing")
        self.preset, self.seed, self.cutmix = preset, seed, float(cutmix)
        self.arrays = {n: torch.from_numpy(_read(bank, n)) for n in lm["arrays"]}
        self.regions = torch.from_numpy(_read(bank, "views")[:, 0, :4].astype(np.float32))
        self.image_size = _read(bank, "image_size")
        self._epoch: tuple[int, np.ndarray] | None = None
        if preset.train != "rrc":
            raise UsageError(f"a label-map bank labels random-resized crops; preset '{preset.name}' trains with "
                             f"'{preset.train}': give --preset with rrc training (e.g. demo_rrc, imagenet)")

    @property
    def nbytes(self) -> int:
        return sum(a.numel() * a.element_size() for a in self.arrays.values())

    def boxes(self, order: np.ndarray, epoch: int) -> np.ndarray:
        """This epoch's crops [len(order), 1, 5] (kept for :meth:`__call__`)."""
        idx = np.asarray(order, np.int64)
        crops = crop_boxes(self.seed, epoch, idx, self.image_size[idx], self.preset.scale, self.preset.ratio)
        table = np.full((len(self.image_size), 5), np.nan, np.float32)
        table[idx] = crops
        self._epoch = (epoch, table)
        return crops[:, None, :]

    def crops(self, index: np.ndarray, epoch: int) -> np.ndarray:
        """[B, 5] crops of samples ``index`` in ``epoch`` (this epoch's table, else drawn now)."""
        if self._epoch is not None and self._epoch[0] == epoch and not np.isnan(self._epoch[1][index]).any():
            return self._epoch[1][index]
        return crop_boxes(self.seed, epoch, index, self.image_size[index], self.preset.scale, self.preset.ratio)

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        index = batch["index"].cpu().numpy().astype(np.int64)
        image = batch.get("image")
        dev = image.device if image is not None else torch.device("cpu")
        rows = torch.from_numpy(index)
        maps = densify({n: a[rows].to(dev, non_blocking=True) for n, a in self.arrays.items()}, self.num_classes)
        crops = torch.from_numpy(self.crops(index, int(batch["epoch"]))).to(dev)
        regions = self.regions[rows].to(dev)
        if self.cutmix <= 0 or image is None:
            return {"teacher_logits": pool(maps, map_boxes(crops, regions, self.size))}
        return self._cutmix(batch, maps, crops, regions, index)

    def _cutmix(self, batch: dict[str, Any], maps: torch.Tensor, crops: torch.Tensor, regions: torch.Tensor,
                index: np.ndarray) -> dict[str, Any]:
        image = batch["image"]
        rng = np.random.default_rng([self.seed, int(batch["epoch"]), int(index[0]), len(index), 0xC07])
        cut, lam = cutmix_box(rng, self.cutmix, image.shape[-2], image.shape[-1])
        partner = torch.arange(len(index) - 1, -1, -1, device=image.device)
        logits, _ = cutmix_logits(maps, crops, regions, cut, partner)
        t, l_, b_, r_ = (int(round(v * n)) for v, n in zip(cut, image.shape[-2:] * 2))
        mixed = image.clone()
        mixed[:, :, t:b_, l_:r_] = image[partner][:, :, t:b_, l_:r_]
        label = batch["label"]
        return {"image": mixed, "teacher_logits": logits, "label_mix": label[partner],
                "lam": torch.full((len(index),), lam, dtype=torch.float32, device=image.device)}


def _read(bank: LabelBank, name: str) -> np.ndarray:
    """A whole array of a complete map bank (BankError naming it when a chunk is missing or unreadable)."""
    if name not in bank.group:
        raise BankError(f"label bank {bank.path} is damaged: array '{name}' is missing; run python -m "
                        "pipeline.labels verify")
    missing = bank.missing_row_chunks(name)
    if missing:
        raise BankError(f"label bank {bank.path} is damaged: array '{name}' has no chunk {missing[0]}")
    try:
        return np.asarray(bank.group[name][:])
    except Exception as e:  # noqa: BLE001  (checksum mismatch, truncated chunk)
        raise BankError(f"label bank {bank.path} is damaged: array '{name}' unreadable ({type(e).__name__}); run "
                        "python -m pipeline.labels verify") from None
