"""Pooling a label map over a crop's box: the coordinate convention of label-map banks (issue 26), used by stage 2
(:mod:`stage2_student_train.map_labels`) and ``labels map-check`` (:mod:`pipeline.bank.map_check`).

Coordinate convention (the one place it lives; tested against hand-computed values with a non-square box):

- a crop is ``(y, x, h, w, flip)`` in fractions of the decoded image (the bank contract's view box); the bank's
  ``views[i, 0]`` holds the mapped region ``(ry, rx, rh, rw)`` in the same units;
- in the map's frame the crop is the box ``x1 = (x - rx) / rw · S``, ``y1 = (y - ry) / rh · S``,
  ``x2 = (x + w - rx) / rw · S``, ``y2 = (y + h - ry) / rh · S``, in **cell units**, passed to
  ``torchvision.ops.roi_align`` as ``(batch_index, x1, y1, x2, y2)`` with ``spatial_scale=1``,
  ``aligned=True`` (cell (y, x) has its centre at (x + 0.5, y + 0.5): a box [0, S] x [0, S] averages exactly
  every cell), ``output_size=(1, 1)`` and ``sampling_ratio=-1`` (ceil(box size) bilinear samples per side,
  evenly spaced inside the box);
- the box is clipped to the mapped region [0, S]: only the part of a crop that the map covers is pooled (with
  ``--map-region eval`` a random crop often reaches past the center crop the teacher saw; its label then comes
  from the overlap; a crop entirely outside the region gets the label of the region's nearest border cells);
  ``--map-region full`` maps the whole image, so nothing is clipped;
- a flip does not change a whole crop's pooled label (pooling averages); it mirrors the map for the regions
  inside a crop (CutMix boxes): a box at (u1, u2) of the flipped crop is at (1 - u2, 1 - u1) of the crop (exact
  for CNN maps; approximate for ViT token maps, whose tokens are not mirror-equivariant).

ReLabel's released code (``utils/relabel_functions.py``) passes ``coords · S - 0.5`` with the default
``aligned=False`` instead (the same half-cell shift by hand), with coords from ``RandomResizedCropWithCoords``
in (y, x, h, w) order.
"""

from __future__ import annotations

import numpy as np
import torch

from pipeline.data.crops import rrc_box

EPS = 1e-3  # the smallest box side, in cells, after clipping (roi_align samples ceil(side) points)


def crop_boxes(seed: int, epoch: int, index: np.ndarray, image_size: np.ndarray, scale: tuple[float, float],
               ratio: tuple[float, float], flip: bool = True) -> np.ndarray:
    """Fresh random-resized crops [len(index), 5] = (y, x, h, w, flip) in fractions of each decoded image
    (``image_size`` [len, 2] = height, width), torchvision's algorithm (:func:`pipeline.data.crops.rrc_box`) from
    ``np.random.default_rng([seed, epoch, i])``: the same on every rank, loader and resume."""
    out = np.zeros((len(index), 5), np.float32)
    for k, (i, (h, w)) in enumerate(zip(np.asarray(index, np.int64), np.asarray(image_size))):
        rng = np.random.default_rng([seed, epoch, int(i)])
        out[k, :4] = rrc_box(rng, int(h), int(w), scale, ratio)
        out[k, 4] = float(rng.random() < 0.5) if flip else 0.0
    return out


def map_boxes(crops: torch.Tensor, regions: torch.Tensor, size: int) -> torch.Tensor:
    """Crops [B, >= 4] (y, x, h, w in image fractions) and regions [B, 4] (y, x, h, w) -> boxes [B, 4] =
    (x1, y1, x2, y2) in cell units of an S x S map, clipped to [0, S] (module docstring)."""
    y, x, h, w = (crops[:, k].double() for k in range(4))
    ry, rx, rh, rw = (regions[:, k].double() for k in range(4))
    x1, x2 = (x - rx) / rw * size, (x + w - rx) / rw * size
    y1, y2 = (y - ry) / rh * size, (y + h - ry) / rh * size
    x1, y1 = x1.clamp(0, size - EPS), y1.clamp(0, size - EPS)
    x2, y2 = torch.maximum(x2.clamp(max=size), x1 + EPS), torch.maximum(y2.clamp(max=size), y1 + EPS)
    return torch.stack([x1, y1, x2, y2], dim=1).float()


def pool(maps: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """maps [B, T, S, S, C] (any float dtype), boxes [B, 4] (x1, y1, x2, y2 in cell units) -> [B, T, C] float32:
    each teacher's map averaged over the box by ``torchvision.ops.roi_align`` (aligned=True, 1x1 output,
    adaptive sampling: module docstring)."""
    from torchvision.ops import roi_align

    b, t, s, _, c = maps.shape
    x = maps.float().permute(0, 1, 4, 2, 3).reshape(b * t, c, s, s)
    rois = torch.cat([torch.arange(b * t, device=maps.device, dtype=torch.float32)[:, None],
                      boxes.to(maps.device, torch.float32).repeat_interleave(t, dim=0)], dim=1)
    out = roi_align(x, rois, output_size=(1, 1), spatial_scale=1.0, sampling_ratio=-1, aligned=True)
    return out.reshape(b, t, c)


def sub_crops(crops: torch.Tensor, cut: tuple[float, float, float, float]) -> torch.Tensor:
    """The part ``cut`` = (v1, u1, v2, u2) (top, left, bottom, right in fractions of the student's crop, as the
    student sees it) of each crop [B, 5] -> [B, 4] (y, x, h, w) in image fractions; a flipped crop shows its
    left edge on the right, so its columns are mirrored: (u1, u2) -> (1 - u2, 1 - u1)."""
    v1, u1, v2, u2 = cut
    y, x, h, w, flip = (crops[:, k] for k in range(5))
    left = torch.where(flip >= 0.5, 1 - u2, torch.full_like(x, u1))
    return torch.stack([y + v1 * h, x + left * w, (v2 - v1) * h, (u2 - u1) * w], dim=1)
