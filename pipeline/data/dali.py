"""DALI pipelines for both stages: eval (resize + center crop), train (random crop + flip), view replay.

Every pipeline reads an explicit, ordered list of sample indices and carries the global sample index as
the reader's label, so each batch arrives with the indices of its samples; the true class comes from the
manifest. Order is decided here (seeded permutation per epoch), not by DALI's shuffle buffer, so runs are
reproducible, resumable and can be aligned with per-sample view boxes.

``device="cpu"`` runs DALI CPU-only (``device_id=None``); ``device="cuda"`` decodes with ``mixed``.
"""

from __future__ import annotations

import logging
import tempfile
from typing import Iterator, Sequence

import numpy as np
import torch

from pipeline.data.batch import Batch, DecodeError, check_request
from pipeline.data.manifest import Manifest
from pipeline.data.presets import Preprocess
from pipeline.errors import UsageError

log = logging.getLogger(__name__)


def build_pipeline(
    manifest: Manifest,
    order: np.ndarray,
    preprocess: Preprocess | Sequence[Preprocess],
    mode: str = "eval",
    batch_size: int = 64,
    num_threads: int = 2,
    device: str = "cpu",
    seed: int = 0,
    boxes: np.ndarray | None = None,
    hw_decoder_load: float = 0.65,
    raw: bool = False,
):
    """Build (not run) a DALI pipeline over ``manifest`` samples ``order`` (global indices, in that order).

    Args:
        mode: ``eval`` (resize shorter side + center crop), ``train`` (preset augmentation: RRC + flip or
            pad-crop + flip), ``views`` (crop boxes from ``boxes``).
        boxes: for ``views``: [len(order), V, 5] float32 (y, x, h, w normalized to the decoded image, flip);
            the pipeline outputs V images per sample (crop -> resize to ``crop`` -> flip).
        preprocess: one preprocessing, or several (``eval`` and ``views`` modes): each image is decoded once and
            preprocessed once per branch (teachers that want different preprocessing).
        hw_decoder_load: ``mixed`` decoding (``device="cuda"``): the share of JPEGs given to the hardware
            decoder; the others take nvJPEG's hybrid path, whose Huffman decoding runs on the ``num_threads``.
        raw: ``views`` mode only: uint8 CHW views (crop, resize, flip; not normalized), for the stored
            augmentations that follow in torch (:func:`pipeline.data.loaders.load_batches` with ``params``).
    Returns:
        A built pipeline whose outputs are (branch 0's image_0 .. image_{V-1}, branch 1's ..., index); its
        attribute ``kd_groups`` holds the number of outputs of each branch.
    Raises:
        UsageError: unknown device or mode, empty ``order``, ``boxes`` of the wrong shape.
    """
    from nvidia.dali import pipeline_def

    from pipeline.data.layouts import layout_of

    order = np.asarray(order, dtype=np.int64)
    branches = [preprocess] if isinstance(preprocess, Preprocess) else list(preprocess)
    check_request(order, mode, boxes, device, len(branches))
    decode_device = "mixed" if device == "cuda" else "cpu"
    layout = layout_of(manifest)
    groups = [boxes.shape[1] if mode == "views" else 1] * len(branches)

    @pipeline_def
    def _pipe():
        images, index = layout.dali_source(manifest, order, batch_size, decode_device, "Reader", hw_decoder_load,
                                           scratch)
        vb = (_box_source(boxes, batch_size), boxes.shape[1]) if mode == "views" else None
        ops = _raw_view_ops if raw and mode == "views" else _MODES[mode]
        outs = [o for p in branches for o in ops(images, p, vb, batch_size)]
        return (*outs, index)

    with tempfile.TemporaryDirectory(prefix="kd-dali-") as scratch:  # the reader's file list, read at build
        pipe = _pipe(
            batch_size=batch_size, num_threads=num_threads,
            device_id=(torch.cuda.current_device() if device == "cuda" else None),
            seed=seed, prefetch_queue_depth=2, exec_dynamic=True,
        )
        pipe.build()
    pipe.kd_groups = groups
    return pipe


def _interp(p: Preprocess):
    from nvidia.dali import types

    return {"bilinear": types.INTERP_LINEAR, "bicubic": types.INTERP_CUBIC, "nearest": types.INTERP_NN}[p.interpolation]


def _resize_for_eval(images, p: Preprocess):
    """``center``: the shorter side to ``resize``; ``squash``: both sides to ``resize`` (timm's crop modes)."""
    from nvidia.dali import fn

    if p.crop_mode == "squash":
        return fn.resize(images, size=[p.resize, p.resize], antialias=True, interp_type=_interp(p))
    return fn.resize(images, resize_shorter=p.resize, antialias=True, interp_type=_interp(p))


def _box_source(boxes: np.ndarray, batch_size: int):
    from nvidia.dali import fn

    return fn.external_source(source=_BoxSource(boxes.astype(np.float32), batch_size), batch=True, name="Boxes")


def _normalize(img, preprocess: Preprocess, mirror=None):
    """HWC uint8 -> CHW float32, (x - 255·mean) / (255·std), optional horizontal flip."""
    from nvidia.dali import fn, types

    return fn.crop_mirror_normalize(
        img, dtype=types.FLOAT, output_layout="CHW", mean=[255.0 * m for m in preprocess.mean],
        std=[255.0 * s for s in preprocess.std], mirror=mirror if mirror is not None else 0,
    )


def _eval_ops(images, preprocess: Preprocess, boxes, batch_size: int) -> list:
    """Resize (``crop_mode``), center-crop ``crop`` (padding when smaller)."""
    from nvidia.dali import fn

    size = preprocess.crop
    images = _resize_for_eval(images, preprocess)
    return [_normalize(fn.crop(images, crop=(size, size), out_of_bounds_policy="pad"), preprocess)]


def _train_ops(images, preprocess: Preprocess, boxes, batch_size: int) -> list:
    """The preset's augmentation: random-resized-crop or pad-and-crop, then a random horizontal flip."""
    from nvidia.dali import fn

    size = preprocess.crop
    flip = fn.random.coin_flip(probability=0.5)
    if preprocess.train == "rrc":
        images = fn.random_resized_crop(
            images, size=(size, size), random_area=list(preprocess.scale),
            random_aspect_ratio=list(preprocess.ratio), antialias=True, interp_type=_interp(preprocess),
        )
    elif preprocess.train == "pad_crop":
        images = _resize_for_eval(images, preprocess)
        images = fn.crop(images, crop=(size, size), out_of_bounds_policy="pad")
        p = preprocess.pad
        anchor = fn.random.uniform(values=[float(v) for v in range(-p, p + 1)], shape=2)
        images = fn.slice(images, anchor, np.array([size, size], np.float32), axis_names="HW",
                          normalized_anchor=False, normalized_shape=False, out_of_bounds_policy="pad")
    else:
        raise UsageError(f"unknown train augmentation '{preprocess.train}'")
    return [_normalize(images, preprocess, flip)]


def _view_crops(images, preprocess: Preprocess, boxes: tuple) -> list:
    """Per stored view (``boxes``: the boxes' external source and the number of views V): the box cropped and
    resized to ``crop`` (uint8 HWC), and its flip flag."""
    from nvidia.dali import fn, types

    size = preprocess.crop
    vb, num_views = boxes
    outs = []
    for v in range(num_views):
        start = fn.stack(vb[v, 0], vb[v, 1])
        shape = fn.stack(vb[v, 2], vb[v, 3])
        crop = fn.slice(images, start, shape, axis_names="HW", out_of_bounds_policy="trim_to_shape")
        crop = fn.resize(crop, size=(size, size), antialias=True, interp_type=_interp(preprocess))
        outs.append((crop, fn.cast(vb[v, 4], dtype=types.INT32)))
    return outs


def _view_ops(images, preprocess: Preprocess, boxes: tuple, batch_size: int) -> list:
    """One output per stored view: crop the box, resize to ``crop``, flip when the box says so, normalize."""
    return [_normalize(crop, preprocess, flip) for crop, flip in _view_crops(images, preprocess, boxes)]


def _raw_view_ops(images, preprocess: Preprocess, boxes: tuple, batch_size: int) -> list:
    """As :func:`_view_ops`, uint8 CHW out (not normalized): the input of the stored augmentations."""
    from nvidia.dali import fn, types

    return [fn.crop_mirror_normalize(crop, dtype=types.UINT8, output_layout="CHW", mirror=flip)
            for crop, flip in _view_crops(images, preprocess, boxes)]


_MODES = {"eval": _eval_ops, "train": _train_ops, "views": _view_ops}


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


def dali_error_summary(message: str) -> str:
    """The operator and the reason of a DALI error, one line, without the pipeline traceback and C++ stack
    (``Error in CPU operator `nvidia.dali.fn.decoders.image` ... encountered: ... Unsupported image type.``)."""
    import re

    op = re.search(r"Error in (\w+ operator `[^`]+`)", message)
    tail = message.split("encountered:", 1)[-1]
    tail = re.split(r"Stacktrace \(|Current pipeline object is no longer valid", tail, maxsplit=1)[0]
    tail = re.sub(r"\[/[^\]]*\]", "", tail)  # source locations
    reason = " ".join(tail.split()) or " ".join(message.split())
    return (f"{op.group(1)}: " if op else "") + reason[:300]


def iterate(pipe, num_samples: int, batch_size: int, device: str = "cpu") -> Iterator[Batch]:
    """Run ``pipe`` for exactly one pass over ``num_samples`` samples, dropping the padding at the end."""
    groups = getattr(pipe, "kd_groups", None)
    remaining = num_samples
    while remaining > 0:
        try:
            outs = pipe.run()
        except RuntimeError as e:  # DALI reports a failed batch (a file it cannot decode), not which file
            raise DecodeError(dali_error_summary(str(e))) from e
        n = min(batch_size, remaining)
        tensors = [_to_torch(o, device)[:n] for o in outs[:-1]]
        index = _to_torch(outs[-1], "cpu").reshape(-1)[:n].to(torch.int64)
        branches, k = [], 0
        for g in groups or [len(tensors)]:  # each branch: [B, 3, H, W], or [B, V, 3, H, W] with V views
            branches.append(tensors[k] if g == 1 else torch.stack(tensors[k:k + g], dim=1))
            k += g
        remaining -= n
        yield Batch(branches[0], index, branches if len(branches) > 1 else None)
