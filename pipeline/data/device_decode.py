"""The torch loader on a GPU (``--loader torch --device cuda``): decode JPEG batches with nvJPEG
(``torchvision.io.decode_jpeg(list, device="cuda")``) and resize, crop, flip and normalize on the GPU.

Two halves, so that the CPU tests run the same code (with ``device="cpu"`` the same functions decode with
libjpeg-turbo and transform on the CPU):

- worker side (:class:`EncodedSamples`, in persistent ``DataLoader`` workers): each sample's file bytes and its
  parameters (size and EXIF orientation from the JPEG header; the crop and flip drawn from
  ``np.random.default_rng([seed, index])`` exactly as the CPU path draws them). A batch crosses as one
  :class:`EncodedBatch`: the JPEG bytes concatenated in one uint8 tensor. Samples nvJPEG is not given (PNG and
  other formats, CMYK JPEGs, headers PIL cannot read, CIFAR pixel arrays) are decoded here on the CPU
  (:func:`pipeline.data.layouts.decode_tensor`) and cross as uint8 pixels.
- device side (:func:`decode_batch`, :func:`transform_batch`): one batched decode on the device, the EXIF
  orientation, then the geometry of :mod:`pipeline.data.transforms` in float32 (no rounding back to uint8) and
  one normalize per batch. A batch nvJPEG rejects is decoded sample by sample; a sample it rejects is decoded on
  the CPU; one that fails there too is a :class:`DecodeError` naming it.

Same samples, order, indices, crops and flips as the CPU path; pixels differ slightly (nvJPEG's IDCT and chroma
upsampling, float resampling): docs/GPU.md. The ``DataLoader`` of one (manifest, preprocessing, mode, workers)
is kept with its workers (the last ``_CACHE_SIZE``) and given each pass's order through its sampler.
"""

from __future__ import annotations

import io
import logging
import warnings
import weakref
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from pipeline.data.batch import Batch, DecodeError
from pipeline.data.layouts import decode_tensor, image_format, layout_of
from pipeline.data.manifest import Manifest
from pipeline.data.presets import Preprocess
from pipeline.data.transforms import box_geometry, draw_train, eval_geometry, normalize, orient, train_geometry

log = logging.getLogger(__name__)


# --- worker side -------------------------------------------------------------------------------------------
@dataclass
class EncodedBatch:
    """What workers send for one batch of B samples (uint8 only, apart from small per-sample parameters).

    ``data``: [sum(sizes)] uint8, the JPEGs to decode on the device, concatenated; ``sizes``: [B] bytes of each
    sample's JPEG in ``data`` (0: the sample is in ``pixels``, decoded on the CPU, uint8 [3, H, W]);
    ``shapes``: [B] (H, W) after EXIF orientation; ``orientation``: [B] EXIF orientation still to apply (1:
    none); ``params``: [B] a :class:`~pipeline.data.transforms.TrainDraw` (``train``), the [V, 5] boxes
    (``views``) or None (``eval``); ``ok``: [B] bool, False for a sample that cannot be read or decoded."""

    index: torch.Tensor
    ok: torch.Tensor
    data: torch.Tensor
    sizes: list[int]
    shapes: list[tuple[int, int]]
    orientation: list[int]
    params: list[Any]
    pixels: dict[int, torch.Tensor] = field(default_factory=dict)


@dataclass(frozen=True)
class Request:
    """One batch to read: sample indices [b] in order, the seed of the random draws, view boxes [b, V, 5]."""

    order: np.ndarray
    seed: int
    boxes: np.ndarray | None = None


def jpeg_header(data: bytes) -> tuple[int, int, int] | None:
    """(H, W after EXIF orientation, orientation 1-8) of a JPEG nvJPEG should decode (3-channel or grayscale),
    from its header; None for other formats, CMYK/YCCK JPEGs, headers PIL cannot read, and files that do not end
    with the end-of-image marker (nvJPEG decodes a truncated file without an error, grey where data is missing,
    measured on an H200: the CPU decoder refuses it, so it decides)."""
    if image_format(data[:12]) != "jpeg" or not data.rstrip(b"\x00\r\n ").endswith(b"\xff\xd9"):
        return None
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            if im.format not in ("JPEG", "MPO") or im.mode not in ("RGB", "L"):
                return None
            w, h = im.size
            orientation = im.getexif().get(0x0112, 1)
    except Exception:  # noqa: BLE001  (a header PIL cannot read: the CPU decoder decides)
        return None
    orientation = orientation if orientation in range(1, 9) else 1
    return (w, h, orientation) if orientation >= 5 else (h, w, orientation)


class EncodedSamples(torch.utils.data.Dataset):
    """``Request`` -> :class:`EncodedBatch` (a whole batch per item: the sampler yields one request per batch, so
    persistent workers serve any order). ``preprocess``: the train augmentation's (``train`` mode)."""

    def __init__(self, manifest: Manifest, preprocess: Preprocess, mode: str):
        self.manifest, self.preprocess, self.mode = manifest, preprocess, mode
        self.layout = layout_of(manifest)

    def __getitem__(self, req: Request) -> EncodedBatch:
        chunks: list[bytes] = []
        n = len(req.order)
        out = EncodedBatch(torch.from_numpy(np.asarray(req.order, np.int64)), torch.ones(n, dtype=torch.bool),
                           torch.empty(0, dtype=torch.uint8), [], [], [], [])
        for k, i in enumerate(int(i) for i in req.order):
            try:
                jpeg, pixels, shape, orientation = self._read(i)
            except Exception as e:  # noqa: BLE001  (any reader or decoder error: named by index in the main process)
                log.debug("cannot read or decode sample %d: %s", i, e)
                out.ok[k], jpeg, pixels, shape, orientation = False, b"", None, (0, 0), 1
            param = self._param(req, k, i, shape) if out.ok[k] else None
            chunks.append(jpeg)
            out.sizes.append(len(jpeg))
            out.shapes.append(shape)
            out.orientation.append(orientation)
            out.params.append(param)
            if pixels is not None:
                out.pixels[k] = pixels
        out.data = torch.frombuffer(bytearray(b"".join(chunks)), dtype=torch.uint8) if any(out.sizes) else out.data
        return out

    def _read(self, i: int) -> tuple[bytes, torch.Tensor | None, tuple[int, int], int]:
        """(JPEG bytes or b"", CPU-decoded pixels or None, (H, W), orientation) of sample ``i``."""
        if not self.layout.encoded_images:
            pixels = self.layout.load_tensor(self.manifest, i)
            return b"", pixels, tuple(pixels.shape[-2:]), 1
        data = self.layout.encoded(self.manifest, i)
        head = jpeg_header(data)
        if head is None:
            pixels = decode_tensor(data)
            return b"", pixels, tuple(pixels.shape[-2:]), 1
        return data, None, head[:2], head[2]

    def _param(self, req: Request, k: int, i: int, shape: tuple[int, int]) -> Any:
        if self.mode == "train":
            return draw_train(np.random.default_rng([req.seed, i]), shape[0], shape[1], self.preprocess)
        if self.mode == "views":
            return req.boxes[k]
        return None


# --- device side -------------------------------------------------------------------------------------------
def decode_batch(batch: EncodedBatch, device: str | torch.device) -> list[torch.Tensor]:
    """:class:`EncodedBatch` -> per sample uint8 [3, H, W] on ``device``, EXIF orientation applied. One batched
    ``decode_jpeg`` (nvJPEG on CUDA, libjpeg-turbo on the CPU); raises :class:`DecodeError` naming a sample
    that no decoder reads, or whose decoded size is not its header's."""
    images: list[torch.Tensor | None] = [None] * len(batch.sizes)
    jpegs = [k for k, n in enumerate(batch.sizes) if n > 0]
    if jpegs:
        parts = torch.split(batch.data, [batch.sizes[k] for k in jpegs])
        for k, img in zip(jpegs, _decode_jpegs(list(parts), [int(batch.index[k]) for k in jpegs],
                                               [batch.orientation[k] for k in jpegs], device)):
            images[k] = img
    for k, pixels in batch.pixels.items():
        images[k] = pixels.to(device, non_blocking=True)
    for k, img in enumerate(images):
        if tuple(img.shape[-2:]) != tuple(batch.shapes[k]):
            i = int(batch.index[k])
            raise DecodeError(f"cannot decode sample {i}: decoded {tuple(img.shape[-2:])} pixels, its header says "
                              f"{tuple(batch.shapes[k])}", sample=i)
    return images


def _decode_jpegs(parts: list[torch.Tensor], index: list[int], orientation: list[int],
                  device: str | torch.device) -> list[torch.Tensor]:
    """JPEG bytes [n_k] uint8 (CPU) -> uint8 [3, H, W] on ``device``, oriented. A failed batch is retried per
    sample, a failed sample is decoded on the CPU (EXIF applied there), and a sample no decoder reads raises."""
    from torchvision.io import ImageReadMode, decode_jpeg

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning, module="torchvision")
        try:
            return [orient(x, o) for x, o in zip(decode_jpeg(parts, ImageReadMode.RGB, device), orientation)]
        except (RuntimeError, ValueError) as e:
            log.debug("batched JPEG decoding on %s failed (%s); decoding sample by sample", device, e)
        out = []
        for part, i, o in zip(parts, index, orientation):
            try:
                out.append(orient(decode_jpeg(part, ImageReadMode.RGB, device), o))
                continue
            except (RuntimeError, ValueError) as e:
                cause = " ".join(str(e).split())[:200]
            try:
                out.append(decode_tensor(part.numpy().tobytes()).to(device))
            except Exception as e2:  # noqa: BLE001  (any decoder error names the sample)
                raise DecodeError(f"cannot decode sample {i}: {cause}", sample=i) from e2
            log.warning("sample %d: JPEG decoding on %s failed (%s); decoded on the CPU", i, device, cause)
        return out


def transform_batch(images: Sequence[torch.Tensor], params: Sequence[Any], branches: Sequence[Preprocess],
                    mode: str) -> list[torch.Tensor]:
    """Per sample uint8 [3, H_b, W_b] (any device) -> per branch float32 [B, 3, crop, crop] ([B, V, 3, crop,
    crop] in ``views`` mode with V > 1), normalized, on the images' device. Resampling in float32, clamped to
    [0, 255] before normalizing (bicubic overshoots; the CPU path rounds and clamps to uint8)."""
    outs: list[list[torch.Tensor]] = [[] for _ in branches]
    for img, param in zip(images, params):
        x = img.float()
        for b, p in enumerate(branches):
            if mode == "eval":
                y = eval_geometry(x, p)
            elif mode == "train":
                y = train_geometry(x, p, param)
            else:
                views = [box_geometry(x, p, box) for box in param]
                y = torch.stack(views) if len(views) > 1 else views[0]  # one view: [3, H, W], as DALI's output
            outs[b].append(y)
    return [normalize(torch.stack(o).clamp_(0, 255), p) for o, p in zip(outs, branches)]


# --- passes over persistent workers ------------------------------------------------------------------------
class _Requests(torch.utils.data.Sampler):
    """The current pass's requests, one per batch (replaced before each pass)."""

    def __init__(self) -> None:
        self.requests: list[Request] = []

    def __iter__(self) -> Iterator[Request]:
        return iter(self.requests)

    def __len__(self) -> int:
        return len(self.requests)


@dataclass
class _Loader:
    loader: torch.utils.data.DataLoader
    requests: _Requests
    owner: Any = None  # weakref to the generator of the pass using it

    def free(self) -> bool:
        gen = self.owner() if self.owner is not None else None
        return gen is None or gen.gi_frame is None  # collected, or finished


_CACHE: OrderedDict[tuple, _Loader] = OrderedDict()
_CACHE_SIZE = 2  # a training run's train and eval loaders


def _as_is(batch: EncodedBatch) -> EncodedBatch:
    return batch


def _loader(manifest: Manifest, preprocess: Preprocess, mode: str, workers: int) -> _Loader:
    """The kept loader of this (manifest object, preprocessing, mode, workers), or a new one (kept unless the
    kept one is in use by an unfinished pass)."""
    key = (id(manifest), preprocess, mode, workers)  # the entry holds the manifest: its id cannot be reused
    entry = _CACHE.get(key)
    if entry is not None and entry.free():
        _CACHE.move_to_end(key)
        return entry
    requests = _Requests()
    dl = torch.utils.data.DataLoader(EncodedSamples(manifest, preprocess, mode), batch_size=None, sampler=requests,
                                     num_workers=workers, collate_fn=_as_is, persistent_workers=workers > 0)
    fresh = _Loader(dl, requests)
    if entry is None:
        _CACHE[key] = fresh
        while len(_CACHE) > _CACHE_SIZE:
            _CACHE.popitem(last=False)  # its workers end when the loader is collected
    return fresh


def device_batches(manifest: Manifest, order: np.ndarray, preprocess: Preprocess | Sequence[Preprocess], mode: str,
                   batch_size: int, workers: int, device: str | torch.device, seed: int,
                   boxes: np.ndarray | None) -> Iterator[Batch]:
    """One pass over ``manifest`` samples ``order``, decoded and preprocessed on ``device``: :class:`Batch`
    objects with ``images`` float32 [B, 3, H, W] (or [B, V, 3, H, W]) on ``device``, ``index`` [B] int64 (CPU).
    Arguments as :func:`pipeline.data.loaders.load_batches` (checked there)."""
    branches = [preprocess] if isinstance(preprocess, Preprocess) else list(preprocess)
    entry = _loader(manifest, branches[0], mode, workers)
    entry.requests.requests = [Request(order[s:s + batch_size], seed,
                                       None if boxes is None else boxes[s:s + batch_size])
                               for s in range(0, len(order), batch_size)]
    gen = _passes(entry.loader, branches, mode, device)
    entry.owner = weakref.ref(gen)
    return gen


def _passes(loader: torch.utils.data.DataLoader, branches: list[Preprocess], mode: str,
            device: str | torch.device) -> Iterator[Batch]:
    for enc in loader:
        if not bool(enc.ok.all()):
            bad = int(enc.index[~enc.ok][0])
            raise DecodeError(f"cannot decode sample {bad}", sample=bad)
        outs = transform_batch(decode_batch(enc, device), enc.params, branches, mode)
        yield Batch(outs[0], enc.index, outs if len(outs) > 1 else None)
