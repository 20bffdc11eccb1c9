"""Replaying a stored view's augmentation (``view_params``, :mod:`pipeline.data.policy`) on images.

Order (what stage 1 did, what stage 2 replays): the crop box and flip (the loaders' ``views`` geometry, uint8),
the operations (torchvision's op implementations with the stored magnitudes, nearest interpolation, fill 0, on
uint8), normalization, random erasing (value 0 on the normalized image, as torchvision's ``RandomErasing`` after
``Normalize``), then mixing with the partner's view, itself built the same way from ITS stored row: Mixup
``lam·x + (1 − lam)·x_partner``, CutMix pastes the partner's box (timm's ``Mixup``).

Nothing here draws random numbers: the same image and row give the same output, bit for bit, on one device.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
import torch

from pipeline.data.policy import MIX_CUTMIX, MIX_MIXUP, OP_NAMES, PARAM_COLUMNS
from pipeline.data.presets import Preprocess
from pipeline.data.transforms import box_geometry, normalize


@lru_cache(maxsize=1)
def _tv_ops():
    """torchvision's op implementations (``_AutoAugmentBase._apply_image_or_video_transform``; every ``RandAugment``,
    ``TrivialAugmentWide`` and ``AutoAugment`` op, ``Invert`` included) and its default fill."""
    import torchvision.transforms.v2 as T

    return T.AutoAugment()


def apply_op(img: torch.Tensor, op: int, magnitude: float) -> torch.Tensor:
    """[3, H, W] uint8 -> the same with op ``OP_NAMES[op]`` at ``magnitude`` (torchvision's implementation,
    nearest interpolation, fill 0). ``op < 0``: unchanged."""
    from torchvision.transforms import InterpolationMode

    if op < 0:
        return img
    t = _tv_ops()
    return t._apply_image_or_video_transform(img, OP_NAMES[op], float(magnitude),
                                             interpolation=InterpolationMode.NEAREST, fill=t._fill)


def _pixels(frac: np.ndarray, size_h: int, size_w: int) -> tuple[int, int, int, int]:
    y, x, h, w = (float(v) for v in frac)
    return round(y * size_h), round(x * size_w), round(h * size_h), round(w * size_w)


def augment_view(view: torch.Tensor, row: np.ndarray, p: Preprocess) -> torch.Tensor:
    """One view's geometry output [3, S, S] uint8 -> [3, S, S] float32: the stored ops, normalization, erasing.

    ``row``: the view's ``view_params`` row [A] (mixing columns are ignored here: :func:`mix_views`)."""
    row = np.asarray(row, np.float32)
    for k in range(len(PARAM_COLUMNS), len(row) - 1, 2):
        view = apply_op(view, int(row[k]), float(row[k + 1]))
    out = normalize(view, p)
    if not math.isnan(float(row[0])):
        i, j, h, w = _pixels(row[0:4], out.shape[-2], out.shape[-1])
        out = out.clone()
        out[..., i:i + h, j:j + w] = 0.0
    return out


def mix_views(x: torch.Tensor, partner: torch.Tensor, rows: np.ndarray) -> torch.Tensor:
    """Mix each view with its partner's: ``x``, ``partner`` [..., 3, H, W] float32, ``rows`` [..., A] (the own
    views' rows). Mixup: ``lam·x + (1 − lam)·partner``; CutMix: the stored box taken from ``partner``; other rows
    unchanged."""
    rows = np.asarray(rows, np.float32)
    lead = x.shape[:-3]
    flat_x, flat_p = x.reshape(-1, *x.shape[-3:]).clone(), partner.reshape(-1, *x.shape[-3:])
    flat_r = rows.reshape(-1, rows.shape[-1])
    for n, r in enumerate(flat_r):
        kind = int(r[4])
        if kind == MIX_MIXUP:
            lam = float(r[5])
            flat_x[n] = flat_x[n] * lam + flat_p[n] * (1.0 - lam)
        elif kind == MIX_CUTMIX:
            i, j, h, w = _pixels(r[6:10], x.shape[-2], x.shape[-1])
            flat_x[n, :, i:i + h, j:j + w] = flat_p[n, :, i:i + h, j:j + w]
    return flat_x.reshape(*lead, *x.shape[-3:])


def replay_view(image: torch.Tensor, box: np.ndarray, row: np.ndarray, p: Preprocess,
                partner_image: torch.Tensor | None = None, partner_box: np.ndarray | None = None,
                partner_row: np.ndarray | None = None) -> torch.Tensor:
    """A stored view rebuilt from the decoded images: ``image`` [3, H, W] uint8 (the sample), ``box`` [5] and
    ``row`` [A] its stored view; for a mixed view the partner's decoded image, stored box and row (its own view
    of the same index v). Returns [3, crop, crop] float32, what the torch loader feeds the teacher.

    Raises:
        ValueError: a mixed row without its partner."""
    out = augment_view(box_geometry(image, p, box), row, p)
    if int(np.asarray(row)[4]) in (MIX_MIXUP, MIX_CUTMIX):
        if partner_image is None or partner_box is None or partner_row is None:
            raise ValueError("a mixed view needs its partner's image, box and params row")
        other = augment_view(box_geometry(partner_image, p, partner_box), partner_row, p)
        out = mix_views(out, other, row)
    return out
