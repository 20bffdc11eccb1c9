"""DALI pipelines for both stages: eval (resize + center crop), train (random crop + flip), view replay.

Every pipeline reads an explicit, ordered list of sample indices and carries the global sample index as
the reader's label, so each batch arrives with the indices of its samples; the true class comes from the
manifest. Order is decided here (seeded permutation per epoch), not by DALI's shuffle buffer, so runs are
reproducible, resumable and can be aligned with per-sample view boxes.

``device="cpu"`` runs DALI CPU-only (``device_id=None``); ``device="cuda"`` decodes with ``mixed``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from pipeline.data.manifest import Manifest, load_cifar_batch
from pipeline.data.presets import Preprocess
from pipeline.errors import UsageError

log = logging.getLogger(__name__)


@dataclass
class Batch:
    """One decoded batch: ``images`` [B, 3, H, W] float32 (or [B, V, 3, H, W] for multi-view), ``index`` [B] int64."""

    images: torch.Tensor
    index: torch.Tensor


class _ArraySource:
    """External source for array datasets (CIFAR pickles): yields HWC uint8 images in the given order."""

    def __init__(self, manifest: Manifest, order: np.ndarray, batch_size: int):
        self.order = order
        self.batch_size = batch_size
        self.images = load_array_images(manifest)
        self.pos = 0

    def __call__(self) -> tuple[list[np.ndarray], list[np.ndarray]]:
        if self.pos >= len(self.order):
            # Pad like the file reader's pad_last_batch: the loop trims by count.
            idx = np.full(self.batch_size, self.order[-1])
        else:
            idx = self.order[self.pos:self.pos + self.batch_size]
            if len(idx) < self.batch_size:
                idx = np.concatenate([idx, np.full(self.batch_size - len(idx), idx[-1])])
        self.pos += self.batch_size
        return [self.images[i] for i in idx], [np.array([i], np.int32) for i in idx]


_ARRAY_CACHE: dict[str, np.ndarray] = {}


def load_array_images(manifest: Manifest) -> np.ndarray:
    """CIFAR pickles -> [N, 32, 32, 3] uint8 in manifest order (cached per root+split)."""
    key = f"{manifest.root}|{manifest.split}"
    if key not in _ARRAY_CACHE:
        by_file: dict[str, np.ndarray] = {}
        out = []
        for f in manifest.files:
            name, row = f.split("#")
            if name not in by_file:
                d = load_cifar_batch(Path(manifest.root) / name)
                by_file[name] = np.asarray(d["data"], np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
            out.append(by_file[name][int(row)])
        _ARRAY_CACHE[key] = np.ascontiguousarray(np.stack(out))
    return _ARRAY_CACHE[key]


def _decoded_images(manifest: Manifest, order: np.ndarray, batch_size: int, decode_device: str, name: str):
    """Graph fragment: (decoded HWC uint8 images, index) from files or arrays, in ``order``."""
    from nvidia.dali import fn, types

    if manifest.layout == "cifar":
        images, index = fn.external_source(
            source=_ArraySource(manifest, order, batch_size), num_outputs=2, batch=True,
        )  # no name: DALI refuses a named external_source with num_outputs
        if decode_device == "mixed":
            images = images.gpu()
        return images, index
    if manifest.layout == "shards":
        from pipeline.data.shards import shard_reader  # packed tar shards (dataset-preparation issue)

        jpegs, index = shard_reader(manifest, order, name=name)
    else:
        jpegs, index = fn.readers.file(
            file_root=manifest.root,
            files=[manifest.files[i] for i in order],
            labels=[int(i) for i in order],
            random_shuffle=False,
            pad_last_batch=True,
            name=name,
        )
    images = fn.decoders.image(jpegs, device=decode_device, output_type=types.RGB)
    return images, index


def build_pipeline(
    manifest: Manifest,
    order: np.ndarray,
    preprocess: Preprocess,
    mode: str = "eval",
    batch_size: int = 64,
    num_threads: int = 2,
    device: str = "cpu",
    seed: int = 0,
    boxes: np.ndarray | None = None,
):
    """Build (not run) a DALI pipeline over ``manifest`` samples ``order`` (global indices, in that order).

    Args:
        mode: ``eval`` (resize shorter side + center crop), ``train`` (preset augmentation: RRC + flip or
            pad-crop + flip), ``views`` (crop boxes from ``boxes``).
        boxes: for ``views``: [len(order), V, 5] float32 (y, x, h, w normalized to the decoded image, flip);
            the pipeline outputs V images per sample (crop -> resize to ``crop`` -> flip).
    Returns:
        A built pipeline whose outputs are (image_0, ..., image_{V-1}, index).
    """
    from nvidia.dali import fn, pipeline_def, types

    if device not in ("cpu", "cuda"):
        raise UsageError(f"unknown device '{device}'; valid: cpu, cuda")
    order = np.asarray(order, dtype=np.int64)
    if len(order) == 0:
        raise UsageError("empty sample list")
    decode_device = "mixed" if device == "cuda" else "cpu"
    size = preprocess.crop
    mean = [255.0 * m for m in preprocess.mean]
    std = [255.0 * s for s in preprocess.std]

    def normalize(img, mirror=None):
        return fn.crop_mirror_normalize(
            img, dtype=types.FLOAT, output_layout="CHW", mean=mean, std=std,
            mirror=mirror if mirror is not None else 0,
        )

    @pipeline_def
    def _pipe():
        images, index = _decoded_images(manifest, order, batch_size, decode_device, "Reader")
        if mode == "eval":
            images = fn.resize(images, resize_shorter=preprocess.resize, antialias=True)
            outs = [fn.crop(images, crop=(size, size), out_of_bounds_policy="pad")]
            outs = [normalize(o) for o in outs]
        elif mode == "train":
            flip = fn.random.coin_flip(probability=0.5)
            if preprocess.train == "rrc":
                images = fn.random_resized_crop(
                    images, size=(size, size), random_area=list(preprocess.scale),
                    random_aspect_ratio=list(preprocess.ratio), antialias=True,
                )
            elif preprocess.train == "pad_crop":
                images = fn.resize(images, resize_shorter=preprocess.resize, antialias=True)
                images = fn.crop(images, crop=(size, size), out_of_bounds_policy="pad")
                p = preprocess.pad
                anchor = fn.random.uniform(values=[float(v) for v in range(-p, p + 1)], shape=2)
                images = fn.slice(images, anchor, np.array([size, size], np.float32), axis_names="HW",
                                  normalized_anchor=False, normalized_shape=False, out_of_bounds_policy="pad")
            else:
                raise UsageError(f"unknown train augmentation '{preprocess.train}'")
            outs = [normalize(images, flip)]
        elif mode == "views":
            if boxes is None or boxes.ndim != 3 or boxes.shape[0] != len(order) or boxes.shape[2] != 5:
                raise UsageError("views mode needs boxes of shape [len(order), V, 5]")
            src = _BoxSource(boxes.astype(np.float32), batch_size)
            vb = fn.external_source(source=src, batch=True, name="Boxes")
            outs = []
            for v in range(boxes.shape[1]):
                start = fn.stack(vb[v, 0], vb[v, 1])
                shape = fn.stack(vb[v, 2], vb[v, 3])
                crop = fn.slice(images, start, shape, axis_names="HW", out_of_bounds_policy="trim_to_shape")
                crop = fn.resize(crop, size=(size, size), antialias=True)
                outs.append(normalize(crop, fn.cast(vb[v, 4], dtype=types.INT32)))
        else:
            raise UsageError(f"unknown pipeline mode '{mode}'")
        return (*outs, index)

    pipe = _pipe(
        batch_size=batch_size, num_threads=num_threads,
        device_id=(torch.cuda.current_device() if device == "cuda" else None),
        seed=seed, prefetch_queue_depth=2, exec_dynamic=True,
    )
    pipe.build()
    return pipe


class _BoxSource:
    """Feeds per-sample boxes [V, 5] in reader order (padded like the reader at the end)."""

    def __init__(self, boxes: np.ndarray, batch_size: int):
        self.boxes = boxes
        self.batch_size = batch_size
        self.pos = 0

    def __call__(self) -> list[np.ndarray]:
        n = len(self.boxes)
        idx = [min(i, n - 1) for i in range(self.pos, self.pos + self.batch_size)]
        self.pos += self.batch_size
        return [self.boxes[i] for i in idx]


def _to_torch(tl, device: str) -> torch.Tensor:
    """DALI TensorList -> torch tensor (zero-copy-ish on CPU; device copy via feed_ndarray on CUDA)."""
    if device == "cuda":
        from nvidia.dali.plugin.pytorch import feed_ndarray

        from nvidia.dali import types

        t = tl.as_tensor()
        dtypes = {types.FLOAT: torch.float32, types.INT32: torch.int32, types.INT64: torch.int64,
                  types.UINT8: torch.uint8}
        out = torch.empty(t.shape(), dtype=dtypes[t.dtype], device="cuda")
        feed_ndarray(t, out, cuda_stream=torch.cuda.current_stream())
        return out
    return torch.from_numpy(np.array(tl.as_tensor()))


def iterate(pipe, num_samples: int, batch_size: int, device: str = "cpu") -> Iterator[Batch]:
    """Run ``pipe`` for exactly one pass over ``num_samples`` samples, dropping the padding at the end."""
    remaining = num_samples
    while remaining > 0:
        outs = pipe.run()
        n = min(batch_size, remaining)
        views = [_to_torch(o, device)[:n] for o in outs[:-1]]
        index = _to_torch(outs[-1], "cpu").reshape(-1)[:n].to(torch.int64)
        images = views[0] if len(views) == 1 else torch.stack(views, dim=1)
        remaining -= n
        yield Batch(images, index)
