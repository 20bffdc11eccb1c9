"""View policies for stage 1: which crops of each image the teachers see.

Box convention (the bank contract): ``views[i, v] = (y, x, h, w, flip)``, the box in fractions of the decoded
image's height and width (top-left corner, then size), ``flip = 1`` for a horizontal flip applied after the
crop; the crop is resized to the model's input size. A NaN box means the preset's eval transform
(resize shorter side + center crop), which is what ``center`` stores.

``rrc`` / ``rrc+flip`` sample K random-resized-crop boxes per image with the preset's training scale and
ratio (torchvision's ``RandomResizedCrop.get_params`` algorithm) from ``np.random.default_rng([seed, index])``,
so a sample's views depend only on (seed, index, image size): resumed and sharded dumps agree exactly.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from pipeline.data.manifest import Manifest
from pipeline.data.presets import Preprocess
from pipeline.errors import UsageError

POLICIES = ("center", "rrc", "rrc+flip")


def view_policy_record(policy: str, num_views: int, seed: int, preset: Preprocess) -> dict:
    """What the bank's attrs (and cache key) record about its views."""
    if policy not in POLICIES:
        raise UsageError(f"unknown view policy '{policy}'; valid: {', '.join(POLICIES)}")
    if policy == "center" and num_views != 1:
        raise UsageError("view policy 'center' has exactly one view; use --view-policy rrc or rrc+flip with --views K")
    rec = {"policy": policy, "num_views": num_views}
    if policy != "center":
        rec.update({"seed": seed, "scale": list(preset.scale), "ratio": list(preset.ratio)})
    return rec


def image_size(manifest: Manifest, i: int) -> tuple[int, int]:
    """(H, W) of sample i from its header (no full decode)."""
    if manifest.layout == "cifar":
        return 32, 32
    from PIL import Image

    with Image.open(Path(manifest.root) / manifest.files[i]) as im:
        w, h = im.size
    return h, w


def rrc_box(rng: np.random.Generator, h: int, w: int, scale: tuple[float, float],
            ratio: tuple[float, float]) -> tuple[float, float, float, float]:
    """One random-resized-crop box (y, x, h, w) in fractions, torchvision's algorithm (10 tries, then center)."""
    area = h * w
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        ar = math.exp(rng.uniform(*log_ratio))
        cw = int(round(math.sqrt(target * ar)))
        ch = int(round(math.sqrt(target / ar)))
        if 0 < cw <= w and 0 < ch <= h:
            y = int(rng.integers(0, h - ch + 1))
            x = int(rng.integers(0, w - cw + 1))
            return y / h, x / w, ch / h, cw / w
    in_ratio = w / h
    if in_ratio < min(ratio):
        cw, ch = w, int(round(w / min(ratio)))
    elif in_ratio > max(ratio):
        ch, cw = h, int(round(h * max(ratio)))
    else:
        cw, ch = w, h
    return (h - ch) // 2 / h, (w - cw) // 2 / w, ch / h, cw / w


class ViewSampler:
    """Boxes [len(order), V, 5] for ``order``, or None for the center policy (eval transform)."""

    def __init__(self, policy: str, num_views: int, seed: int, preset: Preprocess):
        view_policy_record(policy, num_views, seed, preset)
        self.policy, self.num_views, self.seed, self.preset = policy, num_views, seed, preset

    @property
    def mode(self) -> str:
        return "eval" if self.policy == "center" else "views"

    def boxes_for(self, manifest: Manifest, i: int) -> np.ndarray:
        h, w = image_size(manifest, i)
        rng = np.random.default_rng([self.seed, i])
        out = np.zeros((self.num_views, 5), np.float32)
        for v in range(self.num_views):
            out[v, :4] = rrc_box(rng, h, w, self.preset.scale, self.preset.ratio)
            out[v, 4] = float(rng.integers(0, 2)) if self.policy == "rrc+flip" else 0.0
        return out

    def boxes(self, manifest: Manifest, order: np.ndarray) -> np.ndarray | None:
        if self.policy == "center":
            return None
        return np.stack([self.boxes_for(manifest, int(i)) for i in order])
