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

import numpy as np

from pipeline.bank.identity import view_record
from pipeline.data.crops import rrc_box
from pipeline.data import Manifest, layout_of
from pipeline.data.presets import Preprocess

class ViewSampler:
    """Boxes [len(order), V, 5] for ``order``, or None for the center policy (eval transform)."""

    def __init__(self, policy: str, num_views: int, seed: int, preset: Preprocess):
        view_record(policy, num_views, seed, preset)  # validates
        self.policy, self.num_views, self.seed, self.preset = policy, num_views, seed, preset

    @property
    def mode(self) -> str:
        return "eval" if self.policy == "center" else "views"

    def boxes_for(self, manifest: Manifest, i: int) -> np.ndarray:
        h, w = layout_of(manifest).image_size(manifest, i)
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

    def recorded(self, manifest: Manifest, order: np.ndarray,
                 boxes: np.ndarray | None) -> tuple[np.ndarray | None, dict[str, np.ndarray]]:
        """What the bank stores for samples ``order`` beside their logits: the boxes (None: NaN, the center
        view) and no other per-row arrays (a map dump's sampler, ``stage1_teacher_logits.label_maps.MapRegion``,
        records its regions and image sizes)."""
        return boxes, {}
