"""Image loaders for both stages: DALI (the default wherever it is installed) and torch (torchvision decoding and
transforms in a ``DataLoader``), behind one function, :func:`load_batches`.

Both read exactly the samples ``order`` in that order, carry the sample indices, and apply the same preprocessing
parameters (``pipeline.data.presets.Preprocess``) in the same modes:

- ``eval``: resize the shorter side to ``resize`` (antialiased bilinear), center-crop ``crop`` (zero padding when
  smaller), normalise;
- ``train``: the preset's augmentation (random-resized-crop with ``scale``/``ratio``, or pad-and-crop by
  ``pad`` pixels), then a random horizontal flip;
- ``views``: per-sample boxes [len(order), V, 5] (y, x, h, w in fractions of the decoded image, flip): crop,
  resize to ``crop``, flip; V images per sample. With ``params`` [len(order), V, A] (a view policy's stored
  parameters, :mod:`pipeline.data.policy`) each view's ops, normalization and erasing are replayed by
  :func:`pipeline.data.augment.augment_view` on the uint8 crop (torch: in the workers; DALI: crop, resize and
  flip in DALI, uint8 out, then the same torch function); :func:`load_mixed_batches` adds the mixing.

Images are decoded with EXIF orientation applied (DALI's default; torchvision's ``apply_exif_orientation``).
Resampling differs slightly between the two libraries: docs/GPU.md gives the measured logit difference. A bank
records the loader that made it, and stage 2 warns when it trains with the other one.

Randomness: DALI draws from its pipeline seed; the torch loader draws each sample's crop and flip from
``np.random.default_rng([seed, index])``, so it is reproducible whatever the number of workers.

The torch loader on ``cuda`` moves only encoded bytes from its (persistent) workers and decodes with nvJPEG,
then transforms and normalizes on the GPU (:mod:`pipeline.data.device_decode`); on ``cpu`` its workers decode and
transform (:mod:`pipeline.data.transforms` holds the transforms of both).
"""

from __future__ import annotations

import importlib.util
import logging
from typing import Iterator, Sequence

import numpy as np
import torch

from pipeline.data.augment import augment_view, mix_views
from pipeline.data.batch import Batch, DecodeError, check_request
from pipeline.data.manifest import Manifest
from pipeline.data.presets import Preprocess
from pipeline.data.transforms import box_geometry, draw_train, eval_geometry, normalize, train_geometry
from pipeline.errors import UsageError

log = logging.getLogger(__name__)

LOADERS = ("dali", "torch")


def dali_available() -> bool:
    """Whether NVIDIA DALI can be imported here (without importing it)."""
    try:
        return importlib.util.find_spec("nvidia.dali") is not None
    except (ImportError, ValueError):
        return False


def resolve_loader(name: str) -> str:
    """``auto`` -> ``dali`` when DALI is installed, else ``torch``; UsageError for an unknown name or for ``dali``
    where DALI is missing (the message names ``--loader torch``)."""
    if name in ("auto", "", None):
        return "dali" if dali_available() else "torch"
    if name not in LOADERS:
        raise UsageError(f"unknown loader '{name}'; valid: auto, {', '.join(LOADERS)}")
    if name == "dali" and not dali_available():
        raise UsageError("NVIDIA DALI is not installed here (pip install nvidia-dali-cuda130, Linux only): "
                         "pass --loader torch to decode with torchvision instead")
    return name


def load_batches(loader: str, manifest: Manifest, order: np.ndarray, preprocess: Preprocess | Sequence[Preprocess],
                 mode: str = "eval",
                 batch_size: int = 64, workers: int = 2, device: str = "cpu", seed: int = 0,
                 boxes: np.ndarray | None = None, hw_decoder_load: float = 0.65,
                 params: np.ndarray | None = None) -> Iterator[Batch]:
    """One pass over ``manifest`` samples ``order`` -> :class:`Batch` objects (``images`` [B, 3, H, W] float32,
    or [B, V, 3, H, W] in ``views`` mode with V > 1; ``index`` [B] int64), the last batch short.

    ``loader``: ``dali`` or ``torch`` (resolve ``auto`` with :func:`resolve_loader` first); ``torch`` on
    ``device="cuda"`` decodes JPEGs with nvJPEG and preprocesses on the GPU (:mod:`pipeline.data.device_decode`),
    on ``cpu`` decodes and preprocesses in the worker processes. Several
    ``preprocess`` (``eval`` and ``views`` modes): each image is decoded once and preprocessed per branch; the
    batches carry every branch in ``Batch.branches``. ``hw_decoder_load``: DALI ``mixed`` decoding only, the
    share of JPEGs for the hardware decoder. ``params`` (``views`` mode): [len(order), V, A] stored view
    parameters, replayed on every view (not mixed). Raises UsageError on bad arguments; iterating raises
    :class:`DecodeError` when a batch cannot be decoded.
    """
    order = np.asarray(order, dtype=np.int64)
    check_request(order, mode, boxes, device, 1 if isinstance(preprocess, Preprocess) else len(preprocess))
    if params is not None and (mode != "views" or params.shape[:2] != boxes.shape[:2]):
        raise UsageError("view parameters need views mode and one row per box: [len(order), V, A]")
    if loader == "dali":
        from pipeline.data.dali import build_pipeline, iterate

        pipe = build_pipeline(manifest, order, preprocess, mode, batch_size, workers, device, seed, boxes=boxes,
                              hw_decoder_load=hw_decoder_load, raw=params is not None)
        it = iterate(pipe, len(order), batch_size, device)
        return it if params is None else _augmented(it, params, preprocess)
    if loader == "torch" and device == "cuda" and params is not None:
        raise UsageError("augmenting view policies replay with --loader dali, or --loader torch on --device cpu")
    if loader == "torch" and device == "cuda":
        from pipeline.data.device_decode import device_batches

        return device_batches(manifest, order, preprocess, mode, batch_size, workers, device, seed, boxes)
    if loader == "torch":
        return _torch_batches(manifest, order, preprocess, mode, batch_size, workers, device, seed, boxes, params)
    raise UsageError(f"unknown loader '{loader}'; valid: {', '.join(LOADERS)}")


# --- torch ------------------------------------------------------------------------------------------------
class TorchSamples(torch.utils.data.Dataset):
    """Position k -> (image tensor, sample index, ok). A sample that fails to decode yields ``ok = False`` and a
    zero image instead of raising inside a worker, so the main process can name it (:class:`DecodeError`)."""

    def __init__(self, manifest: Manifest, order: np.ndarray, preprocess: Preprocess | Sequence[Preprocess],
                 mode: str, seed: int, boxes: np.ndarray | None, params: np.ndarray | None = None):
        from pipeline.data.layouts import layout_of

        self.branches = [preprocess] if isinstance(preprocess, Preprocess) else list(preprocess)
        self.manifest, self.order, self.mode, self.seed = manifest, order, mode, seed
        self.boxes, self.params = boxes, params
        self.layout = layout_of(manifest)
        self.views = boxes.shape[1] if mode == "views" else 1

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, k: int) -> tuple[list[torch.Tensor], int, bool]:
        i = int(self.order[k])
        try:
            img = self.layout.load_tensor(self.manifest, i)
        except Exception as e:  # noqa: BLE001  (any decoder error: reported by index in the main process)
            log.debug("cannot decode sample %d: %s", i, e)
            return [torch.zeros((self.views, 3, p.crop, p.crop) if self.views > 1 else (3, p.crop, p.crop))
                    for p in self.branches], i, False
        return [self._transform(img, p, k, i) for p in self.branches], i, True

    def _transform(self, img: torch.Tensor, p: Preprocess, k: int, i: int) -> torch.Tensor:
        if self.mode == "eval":
            return _eval_transform(img, p)
        if self.mode == "train":
            return _train_transform(img, p, np.random.default_rng([self.seed, i]))
        if self.params is not None:
            views = [augment_view(box_geometry(img, p, b), r, p) for b, r in zip(self.boxes[k], self.params[k])]
        else:
            views = [_box_transform(img, p, b) for b in self.boxes[k]]
        return torch.stack(views) if len(views) > 1 else views[0]  # one view: [3, H, W], as DALI's output


def _eval_transform(img: torch.Tensor, p: Preprocess) -> torch.Tensor:
    return normalize(eval_geometry(img, p), p)


def _train_transform(img: torch.Tensor, p: Preprocess, rng: np.random.Generator) -> torch.Tensor:
    h, w = img.shape[-2:]
    return normalize(train_geometry(img, p, draw_train(rng, h, w, p)), p)


def _box_transform(img: torch.Tensor, p: Preprocess, box: np.ndarray) -> torch.Tensor:
    """One stored view: the box (fractions of the decoded image) cropped, resized to ``crop``, flipped."""
    return normalize(box_geometry(img, p, box), p)


def _torch_batches(manifest: Manifest, order: np.ndarray, preprocess: Preprocess | Sequence[Preprocess], mode: str,
                   batch_size: int,
                   workers: int, device: str, seed: int, boxes: np.ndarray | None,
                   params: np.ndarray | None = None) -> Iterator[Batch]:
    ds = TorchSamples(manifest, order, preprocess, mode, seed, boxes, params)
    dl = torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=workers,
                                     pin_memory=device == "cuda", drop_last=False)
    for branches, index, ok in dl:
        if not bool(ok.all()):
            bad = int(index[~ok][0])
            raise DecodeError(f"cannot decode sample {bad}", sample=bad)
        yield Batch(branches[0], index.to(torch.int64), branches if len(branches) > 1 else None)


# --- stored view parameters ---------------------------------------------------------------------------------
def _augmented(it: Iterator[Batch], params: np.ndarray, preprocess: Preprocess | Sequence[Preprocess]
               ) -> Iterator[Batch]:
    """DALI's uint8 views [B, (V,) 3, S, S] -> each view's ops, normalization and erasing replayed
    (:func:`pipeline.data.augment.augment_view`), branch by branch, the rows taken in order from ``params``."""
    branches = [preprocess] if isinstance(preprocess, Preprocess) else list(preprocess)
    pos = 0
    for b in it:
        n = len(b.index)
        rows = params[pos:pos + n]
        out = []
        for x, p in zip(b.inputs(), branches):
            flat = x.reshape(-1, *x.shape[-3:])
            done = torch.stack([augment_view(v, r, p) for v, r in zip(flat, rows.reshape(-1, rows.shape[-1]))])
            out.append(done.reshape(*x.shape[:-3], *done.shape[-3:]))
        pos += n
        yield Batch(out[0], b.index, out if len(out) > 1 else None)


def load_mixed_batches(loader: str, manifest: Manifest, order: np.ndarray,
                       preprocess: Preprocess | Sequence[Preprocess], batch_size: int, workers: int, device: str,
                       boxes: np.ndarray, params: np.ndarray, partners: np.ndarray, partner_boxes: np.ndarray,
                       partner_params: np.ndarray, hw_decoder_load: float = 0.65) -> Iterator[Batch]:
    """Views with stored parameters, mixed with their partners' views: :func:`load_batches` over ``order``
    (``boxes`` [n, V, 5], ``params`` [n, V, A]) and, in step, over the partners ``partners`` [n, V] (each with ITS
    stored box and row of the same view: ``partner_boxes`` [n, V, 5], ``partner_params`` [n, V, A]), then
    :func:`pipeline.data.augment.mix_views`. Rows whose kind is not mixed come out unmixed. Batches as
    :func:`load_batches` in ``views`` mode."""
    n, v = partners.shape
    if v != boxes.shape[1] or n != len(order):
        raise UsageError("partners must be [len(order), V]")
    own = load_batches(loader, manifest, order, preprocess, "views", batch_size, workers, device, boxes=boxes,
                       hw_decoder_load=hw_decoder_load, params=params)
    # partners: one view each, V positions per sample, so batch b of the partners is batch b of the samples
    other = load_batches(loader, manifest, np.maximum(partners, 0).reshape(-1), preprocess, "views", batch_size * v,
                         workers, device, boxes=partner_boxes.reshape(n * v, 1, 5), hw_decoder_load=hw_decoder_load,
                         params=partner_params.reshape(n * v, 1, -1))
    pos = 0
    for a, b in zip(own, other):
        k = len(a.index)
        rows = params[pos:pos + k]
        mixed = [mix_views(x, y.reshape(x.shape), rows) for x, y in zip(a.inputs(), b.inputs())]
        pos += k
        yield Batch(mixed[0], a.index, mixed if len(mixed) > 1 else None)


def load_blended_batches(loader: str, manifest: Manifest, order: np.ndarray, preprocess: Preprocess, mode: str,
                         batch_size: int, workers: int, device: str, seed: int, partners: np.ndarray,
                         rows: np.ndarray, hw_decoder_load: float = 0.65) -> Iterator[Batch]:
    """Stage 2's approximate mixing (``--mix-labels blend``): the batches of :func:`load_batches` in ``mode`` over
    ``order`` and, in step, over ``partners`` [len(order)] (their own augmentation), mixed by ``rows``
    [len(order), A] (:func:`pipeline.data.policy.blend_rows`); each batch carries ``mix`` (partner indices, λ)."""
    own = load_batches(loader, manifest, order, preprocess, mode, batch_size, workers, device, seed,
                       hw_decoder_load=hw_decoder_load)
    other = load_batches(loader, manifest, partners, preprocess, mode, batch_size, workers, device, seed,
                         hw_decoder_load=hw_decoder_load)
    pos = 0
    for a, b in zip(own, other):
        k = len(a.index)
        r = rows[pos:pos + k]
        mix = {"index_mix": torch.from_numpy(np.asarray(partners[pos:pos + k], np.int64)),
               "lam": torch.from_numpy(np.ascontiguousarray(r[:, 5], np.float32))}
        pos += k
        yield Batch(mix_views(a.images, b.images.to(a.images.device), r), a.index, None, mix)
