"""View policies for stage 1: which crops of each image the teachers see.

Box convention (the bank contract): ``views[i, v] = (y, x, h, w, flip)``, the box in fractions of the decoded
image's height and width (top-left corner, then size), ``flip = 1`` for a horizontal flip applied after the
crop; the crop is resized to the model's input size. A NaN box means the preset's eval transform
(resize shorter side + center crop), which is what ``center`` stores.

``rrc`` / ``rrc+flip`` sample K random-resized-crop boxes per image with the preset's training scale and
ratio (torchvision's ``RandomResizedCrop.get_params`` algorithm) from ``np.random.default_rng([seed, index])``,
so a sample's views depend only on (seed, index, image size): resumed and sharded dumps agree exactly.

Policies with augmentations (``rrc+flip+randaug(2,9)+erasing(0.25)+mixup(0.8)+cutmix(1.0)``, syntax in
:mod:`pipeline.data.policy`) also give each view a parameter row (:meth:`ViewSampler.params`) and a mixing
partner (:meth:`ViewSampler.partners`), drawn per (seed, index, view) as that module documents.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from pipeline.bank.identity import view_record
from pipeline.data.crops import rrc_box
from pipeline.data.policy import draw_params, parse_view_policy, partner_permutation
from pipeline.data import Manifest, layout_of
from pipeline.data.presets import Preprocess

class ViewSampler:
    """Boxes [len(order), V, 5] for ``order``, or None for the center policy (eval transform)."""

    def __init__(self, policy: str, num_views: int, seed: int, preset: Preprocess):
        view_record(policy, num_views, seed, preset)  # validates
        self.policy, self.num_views, self.seed, self.preset = policy, num_views, seed, preset
        self.parsed = parse_view_policy(policy)
        self._perms: dict[tuple[int, int], np.ndarray] = {}

    @property
    def mode(self) -> str:
        return "eval" if self.parsed.geometry == "center" else "views"

    def boxes_for(self, manifest: Manifest, i: int) -> np.ndarray:
        h, w = layout_of(manifest).image_size(manifest, i)
        rng = np.random.default_rng([self.seed, i])
        out = np.zeros((self.num_views, 5), np.float32)
        for v in range(self.num_views):
            out[v, :4] = rrc_box(rng, h, w, self.preset.scale, self.preset.ratio)
            out[v, 4] = float(rng.integers(0, 2)) if self.parsed.geometry == "rrc+flip" else 0.0
        return out

    def boxes(self, manifest: Manifest, order: np.ndarray) -> np.ndarray | None:
        if self.parsed.geometry == "center":
            return None
        return np.stack([self.boxes_for(manifest, int(i)) for i in order])

    def params(self, order: np.ndarray) -> np.ndarray | None:
        """``view_params`` rows [len(order), V, A] float32 (:func:`pipeline.data.policy.draw_params` at the
        preset's crop size), or None for a policy without stored parameters."""
        if not self.parsed.stores_params:
            return None
        size = int(self.preset.crop)
        return np.stack([np.stack([draw_params(self.parsed, self.seed, int(i), v, size)
                                   for v in range(self.num_views)]) for i in order]).astype(np.float32)

    def partners(self, order: np.ndarray, num_samples: int) -> np.ndarray | None:
        """``view_partner`` [len(order), V] int32: each view's mixing partner in a dataset of ``num_samples``
        (-1 for views that are not mixed: a policy without mixup/cutmix); None without stored parameters."""
        if not self.parsed.stores_params:
            return None
        order = np.asarray(order, np.int64)
        if not self.parsed.mixes:
            return np.full((len(order), self.num_views), -1, np.int32)
        cols = []
        for v in range(self.num_views):
            key = (v, num_samples)
            if key not in self._perms:
                self._perms[key] = partner_permutation(self.seed, v, num_samples)
            cols.append(self._perms[key][order])
        return np.stack(cols, axis=1).astype(np.int32)

    def partner_views(self, manifest: Manifest, partners: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The partners' own stored views: boxes [n, V, 5] and rows [n, V, A], element (k, v) being view v of
        sample ``partners[k, v]`` (-1, unmixed: sample 0's, unused)."""
        flat = np.maximum(partners, 0).reshape(-1)
        v = np.tile(np.arange(self.num_views), len(partners))
        boxes = np.stack([self.boxes_for(manifest, int(i))[k] for i, k in zip(flat, v)])
        size = int(self.preset.crop)
        rows = np.stack([draw_params(self.parsed, self.seed, int(i), int(k), size) for i, k in zip(flat, v)])
        return boxes.reshape(*partners.shape, 5), rows.reshape(*partners.shape, -1)

    def batches(self, loader: str, manifest: Manifest, order: np.ndarray, preprocess, batch_size: int,
                workers: int, device: str, seed: int, hw_decoder_load: float = 0.65, new_views: Any = None):
        """The views of ``order`` through the loader: ``(boxes, params, partners, batches)``, the stored arrays
        ([len(order), V, 5] or None, [.., V, A] or None, [.., V] or None) and the :class:`Batch` iterator (views
        with stored parameters replayed and mixed with their partners': the images the teachers see).
        ``new_views``: boxes [P, V, 5] -> the boxes the teachers still run on (``--append-views``: the new views;
        policies with rrc boxes only)."""
        from pipeline.data.loaders import load_batches, load_mixed_batches

        boxes = self.boxes(manifest, order)
        params = self.params(order)
        partners = self.partners(order, len(manifest))
        if params is not None and self.parsed.mixes:
            pboxes, prows = self.partner_views(manifest, partners)
            it = load_mixed_batches(loader, manifest, order, preprocess, batch_size, workers, device, boxes, params,
                                    partners, pboxes, prows, hw_decoder_load)
        else:
            load = boxes if new_views is None else new_views(boxes)
            it = load_batches(loader, manifest, order, preprocess, self.mode, batch_size, workers, device, seed,
                              boxes=load, hw_decoder_load=hw_decoder_load, params=params)
        return boxes, params, partners, it
    def recorded(self, manifest: Manifest, order: np.ndarray,
                 boxes: np.ndarray | None) -> tuple[np.ndarray | None, dict[str, np.ndarray]]:
        """What the bank stores for samples ``order`` beside their logits: the boxes (None: NaN, the center
        view) and no other per-row arrays (a map dump's sampler, ``stage1_teacher_logits.label_maps.MapRegion``,
        records its regions and image sizes)."""
        return boxes, {}
