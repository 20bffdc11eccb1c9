"""The torch loader's preprocessing as functions of a tensor on any device (torchvision ops), shared by the CPU
path (decode and transform in worker processes) and the device path (:mod:`pipeline.data.device_decode`: decode
with nvJPEG, transform on the GPU).

Geometry (``*_geometry``) keeps the input's dtype and device: uint8 [3, H, W] on the CPU path, float32 [3, H, W]
on the device path (resampled without rounding back to uint8); :func:`normalize` then maps to float32. The
parameters follow DALI's: the shorter side resized with the longer one rounded half up, center-crop offsets
rounded half up, antialiased resampling, random crops and flips drawn per sample by :func:`draw_train`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from pipeline.data.crops import rrc_box
from pipeline.data.presets import Preprocess
from pipeline.errors import UsageError


def interpolation(p: Preprocess):
    """torchvision's ``InterpolationMode`` of ``p.interpolation``."""
    from torchvision.transforms import InterpolationMode

    return InterpolationMode(p.interpolation)


def normalize(img: torch.Tensor, p: Preprocess) -> torch.Tensor:
    """[..., 3, H, W] (uint8 or float) -> float32 (x - 255·mean) / (255·std), on ``img``'s device, as DALI's
    crop_mirror_normalize."""
    mean = torch.tensor([255.0 * m for m in p.mean], device=img.device).view(3, 1, 1)
    std = torch.tensor([255.0 * s for s in p.std], device=img.device).view(3, 1, 1)
    return (img.float() - mean) / std


def orient(img: torch.Tensor, orientation: int) -> torch.Tensor:
    """[3, H, W] as stored in a JPEG -> as displayed, for EXIF orientation 1-8 (what torchvision's
    ``apply_exif_orientation`` and DALI do on the CPU; nvJPEG leaves it to the caller). Other values: unchanged."""
    ops = {2: lambda x: x.flip(-1), 3: lambda x: x.flip(-2, -1), 4: lambda x: x.flip(-2),
           5: lambda x: x.transpose(-2, -1), 6: lambda x: x.rot90(-1, (-2, -1)),
           7: lambda x: x.transpose(-2, -1).flip(-2, -1), 8: lambda x: x.rot90(1, (-2, -1))}
    op = ops.get(int(orientation))
    return img if op is None else op(img)


def resize_shorter(img: torch.Tensor, p: Preprocess) -> torch.Tensor:
    """``center``: the shorter side to ``resize``, the longer one scaled and rounded half up (as DALI's
    ``resize_shorter``; torchvision truncates, a pixel off on non-square images); ``squash``: both to ``resize``."""
    import torchvision.transforms.v2.functional as F

    h, w = img.shape[-2:]
    size, mode = p.resize, interpolation(p)
    if p.crop_mode == "squash":
        return F.resize(img, [size, size], interpolation=mode, antialias=True)
    if h <= w:
        return F.resize(img, [size, math.floor(w * size / h + 0.5)], interpolation=mode, antialias=True)
    return F.resize(img, [math.floor(h * size / w + 0.5), size], interpolation=mode, antialias=True)


def center_crop(img: torch.Tensor, size: int) -> torch.Tensor:
    """Center crop (offsets rounded half up, as DALI's ``crop``); zero padding when the image is smaller."""
    import torchvision.transforms.v2.functional as F

    h, w = img.shape[-2:]
    if h < size or w < size:
        return F.center_crop(img, [size, size])
    return F.crop(img, math.floor((h - size) / 2 + 0.5), math.floor((w - size) / 2 + 0.5), size, size)


@dataclass(frozen=True)
class TrainDraw:
    """One sample's random augmentation, in pixels of the decoded image: ``box`` (top, left, height, width) of
    a random-resized crop, or ``shift`` (dy, dx) of a pad-and-crop; ``flip`` horizontally."""

    box: tuple[int, int, int, int] | None
    shift: tuple[int, int] | None
    flip: bool


def draw_train(rng: np.random.Generator, h: int, w: int, p: Preprocess) -> TrainDraw:
    """The augmentation of a decoded image of ``h`` x ``w`` pixels, drawn from ``rng`` (the loaders seed it with
    ``[seed, sample index]``): the crop first, then the flip."""
    box = shift = None
    if p.train == "rrc":
        y, x, bh, bw = rrc_box(rng, h, w, p.scale, p.ratio)
        box = (round(y * h), round(x * w), round(bh * h), round(bw * w))
    elif p.train == "pad_crop":
        dy, dx = rng.integers(-p.pad, p.pad + 1, size=2)
        shift = (int(dy), int(dx))
    else:
        raise UsageError(f"unknown train augmentation '{p.train}'")
    return TrainDraw(box, shift, bool(rng.random() < 0.5))


def eval_geometry(img: torch.Tensor, p: Preprocess) -> torch.Tensor:
    """[3, H, W] -> [3, crop, crop]: resize (``crop_mode``), center crop."""
    return center_crop(resize_shorter(img, p), p.crop)


def train_geometry(img: torch.Tensor, p: Preprocess, draw: TrainDraw) -> torch.Tensor:
    """[3, H, W] -> [3, crop, crop]: the drawn random-resized crop, or resize + center crop + shifted crop of the
    zero-padded image; then the drawn flip."""
    import torchvision.transforms.v2.functional as F

    if draw.box is not None:
        img = F.resized_crop(img, *draw.box, [p.crop, p.crop], interpolation=interpolation(p), antialias=True)
    else:
        img = center_crop(resize_shorter(img, p), p.crop)
        dy, dx = draw.shift
        img = F.crop(F.pad(img, [p.pad]), p.pad + dy, p.pad + dx, p.crop, p.crop)
    return F.horizontal_flip(img) if draw.flip else img


def box_geometry(img: torch.Tensor, p: Preprocess, box: np.ndarray) -> torch.Tensor:
    """[3, H, W] -> [3, crop, crop]: one stored view, ``box`` = (y, x, h, w in fractions of the decoded image,
    flip), cropped, resized to ``crop``, flipped."""
    import torchvision.transforms.v2.functional as F

    h, w = img.shape[-2:]
    y, x, bh, bw, flip = (float(v) for v in box)
    top, left = round(y * h), round(x * w)
    height, width = max(1, min(h - top, round(bh * h))), max(1, min(w - left, round(bw * w)))
    out = F.resized_crop(img, top, left, height, width, [p.crop, p.crop], interpolation=interpolation(p),
                         antialias=True)
    return F.horizontal_flip(out) if flip >= 0.5 else out
