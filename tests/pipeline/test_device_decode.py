"""The torch loader's device path (issue 24): workers send JPEG bytes and per-sample parameters, the device decodes
(nvJPEG on CUDA) and transforms. On a CPU the same code decodes with libjpeg-turbo and transforms on the CPU, and
is compared here with the CPU path (decode and transform in the workers): same samples, order, indices, crops and
flips; pixels within one gray level, because the CPU path rounds resampled pixels to uint8 and the device path
resamples in float32 (measured on the 20 real ImageNet JPEGs, every mode: mean 0.005, max 0.0175 = one level
in normalized units). The nvJPEG test runs where CUDA is available."""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.data import build_manifest, layout_of
from pipeline.data import device_decode as dd
from pipeline.data.batch import DecodeError
from pipeline.data.loaders import load_batches
from pipeline.data.presets import Preprocess, get_preset
from pipeline.data.transforms import draw_train

TINY = Preprocess("t", 24, 20, (0.5, 0.4, 0.3), (0.25, 0.2, 0.3), "rrc", (0.25, 1.0))
PAD = Preprocess("p", 22, 18, (0.4, 0.5, 0.6), (0.3, 0.25, 0.2), "pad_crop", pad=3)


def _level(p: Preprocess) -> float:
    """One gray level in normalized units (the largest over the channels), plus float slack."""
    return 1 / (255 * min(p.std)) + 1e-4


def _cpu(m, order, p, mode="eval", boxes=None, seed=3, bs=4):
    out = list(load_batches("torch", m, order, p, mode, bs, 0, "cpu", seed, boxes=boxes))
    return torch.cat([b.images for b in out]), torch.cat([b.index for b in out]), [len(b.index) for b in out]


def _dev(m, order, p, mode="eval", boxes=None, seed=3, bs=4, workers=0, device="cpu"):
    out = list(dd.device_batches(m, order, p, mode, bs, workers, device, seed, boxes))
    return torch.cat([b.images for b in out]), torch.cat([b.index for b in out]), [len(b.index) for b in out]


def _boxes(n: int, views: int = 2, seed: int = 0) -> np.ndarray:
    from pipeline.data.crops import rrc_box

    rng = np.random.default_rng(seed)
    boxes = np.zeros((n, views, 5), np.float32)
    for k in range(n):
        for v in range(views):
            boxes[k, v, :4] = rrc_box(rng, 512, 512, (0.2, 1.0), (3 / 4, 4 / 3))
            boxes[k, v, 4] = v % 2
    return boxes


def _jpeg(arr: np.ndarray, mode: str = "RGB", orientation: int = 1) -> bytes:
    exif = Image.Exif()
    if orientation != 1:
        exif[0x0112] = orientation
    b = io.BytesIO()
    Image.fromarray(arr).convert(mode).save(b, "JPEG", quality=90, exif=exif.tobytes())
    return b.getvalue()


@pytest.mark.parametrize("mode,workers", [("eval", 0), ("train", 2), ("views", 0)])
def test_device_path_matches_the_cpu_path_on_real_jpegs(foolbox_tree: Path, mode: str, workers: int):
    """ImageNet preset on 20 real JPEGs (one 1024x683), shuffled: same indices, order and batches; the same
    crops and flips (a crop or flip off by a pixel would differ by far more than one gray level)."""
    m = build_manifest(foolbox_tree, "val")
    order = np.random.default_rng(1).permutation(len(m))
    p = get_preset("imagenet")
    boxes = _boxes(len(m)) if mode == "views" else None
    a, ia, na = _cpu(m, order, p, mode, boxes)
    b, ib, nb = _dev(m, order, p, mode, boxes, workers=workers)
    assert ia.tolist() == ib.tolist() == order.tolist() and na == nb == [4] * 5
    assert a.shape == b.shape and b.dtype == torch.float32
    d = (a - b).abs()
    assert d.max() <= _level(p) and d.mean() < 0.01, (d.mean().item(), d.max().item())


def test_worker_sends_bytes_and_the_cpu_paths_draws(image_tree: Path):
    """Train mode, both augmentations: each sample's crop and flip are the CPU path's draws from
    ``default_rng([seed, index])`` at the size the header gives; JPEGs cross as their file bytes; the grayscale
    JPEG goes to the device decoder, the PNG is decoded in the worker."""
    m = build_manifest(image_tree, "train")
    lay = layout_of(m)
    order = np.random.default_rng(2).permutation(len(m))
    for p in (TINY, PAD):
        enc = dd.EncodedSamples(m, p, "train")[dd.Request(order, 5)]
        assert enc.index.tolist() == order.tolist() and bool(enc.ok.all())
        parts = iter(torch.split(enc.data, [n for n in enc.sizes if n]))
        for k, i in enumerate(order):
            ref = lay.load_tensor(m, int(i))
            assert enc.shapes[k] == tuple(ref.shape[-2:])
            assert enc.params[k] == draw_train(np.random.default_rng([5, int(i)]), *ref.shape[-2:], p)
            if m.files[i].endswith(".png"):
                assert enc.sizes[k] == 0 and torch.equal(enc.pixels[k], ref)
            else:
                assert enc.sizes[k] > 0 and k not in enc.pixels
                assert next(parts).numpy().tobytes() == (image_tree / m.files[i]).read_bytes()
        a, _, _ = _cpu(m, order, p, "train", seed=5)
        b, _, _ = _dev(m, order, p, "train", seed=5)
        assert (a - b).abs().max() <= _level(p)


def test_exif_orientation_is_applied_on_the_device(tmp_path: Path):
    """Orientations 1-8 on a 37x53 image: the worker reads the tag and the rotated size from the header, the
    device side turns the decoded pixels exactly as torchvision's CPU decoder does, and the eval crops agree."""
    from torchvision.io import ImageReadMode, decode_jpeg

    arr = np.random.default_rng(0).integers(0, 255, (37, 53, 3), dtype=np.uint8)
    arr[:12, :20] = 240  # a corner that shows the turn
    d = tmp_path / "ex" / "val" / "c"
    d.mkdir(parents=True)
    for o in range(1, 9):
        (d / f"o{o}.jpg").write_bytes(_jpeg(arr, orientation=o))
    m = build_manifest(tmp_path / "ex", "val")
    order = np.arange(len(m))
    enc = dd.EncodedSamples(m, TINY, "eval")[dd.Request(order, 0)]
    assert enc.orientation == list(range(1, 9)) and all(n > 0 for n in enc.sizes)
    assert enc.shapes == [(37, 53)] * 4 + [(53, 37)] * 4
    for k, img in enumerate(dd.decode_batch(enc, "cpu")):
        data = torch.frombuffer(bytearray((d / f"o{k + 1}.jpg").read_bytes()), dtype=torch.uint8)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # torchvision.io's move to TorchCodec
            ref = decode_jpeg(data, ImageReadMode.RGB, apply_exif_orientation=True)
        assert torch.equal(img, ref)
    a, _, _ = _cpu(m, order, TINY)
    b, _, _ = _dev(m, order, TINY)
    assert (a - b).abs().max() <= _level(TINY)


def test_cmyk_png_and_pixel_arrays_fall_back_to_the_cpu(image_tree: Path, tmp_path: Path, write_cifar10):
    """CMYK JPEGs and PNGs are decoded in the workers (uint8 pixels cross), then transformed like the rest; two
    preprocessing branches come out of one decode. CIFAR pixel arrays take the same fallback."""
    arr = np.random.default_rng(3).integers(0, 255, (30, 41, 3), dtype=np.uint8)
    (image_tree / "train" / "apple" / "img_cmyk.jpg").write_bytes(_jpeg(arr, "CMYK"))
    m = build_manifest(image_tree, "train")
    order = np.arange(len(m))
    enc = dd.EncodedSamples(m, TINY, "eval")[dd.Request(order, 0)]
    fallback = {k for k, f in enumerate(m.files) if f.endswith((".png", "_cmyk.jpg"))}
    assert set(enc.pixels) == fallback and {k for k, n in enumerate(enc.sizes) if n == 0} == fallback
    out = list(dd.device_batches(m, order, [TINY, PAD], "eval", 5, 0, "cpu", 0, None))
    for b_, p in enumerate((TINY, PAD)):
        a, _, _ = _cpu(m, order, p)
        b = torch.cat([x.branches[b_] for x in out])
        assert (a - b).abs().max() <= _level(p), p.name

    write_cifar10(tmp_path / "cifar")
    c = build_manifest(tmp_path / "cifar", "train")
    order = np.random.default_rng(0).permutation(len(c))
    for mode in ("eval", "train"):
        a, ia, _ = _cpu(c, order, get_preset("cifar"), mode)
        b, ib, _ = _dev(c, order, get_preset("cifar"), mode)
        assert ia.tolist() == ib.tolist() and (a - b).abs().max() <= _level(get_preset("cifar"))


@pytest.mark.parametrize("damage", ["not a jpeg", "truncated"])
def test_an_undecodable_sample_is_named(image_tree: Path, damage: str):
    """Bytes after a JPEG signature that no decoder reads fail in the worker's CPU decode; so does a truncated
    JPEG (no end-of-image marker): it is never sent to the device decoder, because nvJPEG decodes a truncated
    file without an error (measured on an H200). Either way the batches before it arrive and the error names the
    sample, as on the CPU path."""
    m = build_manifest(image_tree, "train")
    bad = 7
    path = image_tree / m.files[bad]
    data = path.read_bytes()
    path.write_bytes(b"\xff\xd8\xff not really a jpeg" if damage == "not a jpeg"
                     else data[:data.index(b"\xff\xda") + 40])  # the scan cut short, no end marker
    if damage == "truncated":
        assert dd.jpeg_header(path.read_bytes()) is None  # the CPU decoder decides, never nvJPEG
        assert dd.jpeg_header(data) is not None and dd.jpeg_header(data + b"\x00\x00") is not None  # padding is fine
    for it in (load_batches("torch", m, np.arange(len(m)), TINY, "eval", 4, 0, "cpu", 0),
               dd.device_batches(m, np.arange(len(m)), TINY, "eval", 4, 0, "cpu", 0, None)):
        seen = []
        with pytest.raises(DecodeError) as e:
            for b in it:
                seen += b.index.tolist()
        assert e.value.sample == bad and f"sample {bad}" in str(e.value) and seen == [0, 1, 2, 3]


def test_persistent_workers_serve_each_pass_its_own_order(image_tree: Path):
    """Two workers kept across passes: each pass gets its own order and seed; a pass abandoned after one batch
    does not leak into the next; two passes alive at once each get their own loader."""
    m = build_manifest(image_tree, "train")
    orders = [np.random.default_rng(s).permutation(len(m))[:11] for s in range(3)]
    want = [_cpu(m, o, TINY, "train", seed=s)[0] for s, o in enumerate(orders)]

    def run(s: int) -> tuple[torch.Tensor, torch.Tensor]:
        out = list(dd.device_batches(m, orders[s], TINY, "train", 4, 2, "cpu", s, None))
        return torch.cat([b.images for b in out]), torch.cat([b.index for b in out])

    for s in (0, 1):
        x, idx = run(s)
        assert idx.tolist() == orders[s].tolist() and (x - want[s]).abs().max() <= _level(TINY)
    kept = [e.loader for e in dd._CACHE.values() if e.loader.dataset.manifest is m]
    assert len(kept) == 1
    abandoned = dd.device_batches(m, orders[2], TINY, "train", 4, 2, "cpu", 2, None)
    assert next(abandoned).index.tolist() == orders[2][:4].tolist()
    x, idx = run(0)  # the abandoned pass is still alive: this one gets a loader of its own
    assert idx.tolist() == orders[0].tolist() and (x - want[0]).abs().max() <= _level(TINY)
    del abandoned
    x, idx = run(1)  # the kept loader again, after a pass that stopped early
    assert idx.tolist() == orders[1].tolist() and (x - want[1]).abs().max() <= _level(TINY)
    assert [e.loader for e in dd._CACHE.values() if e.loader.dataset.manifest is m] == kept


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (nvJPEG)")
def test_nvjpeg_path_on_cuda(foolbox_tree: Path, image_tree: Path):
    """``--loader torch --device cuda``: batches on the GPU, same indices and crops as the CPU path. nvJPEG's
    IDCT and chroma upsampling are not libjpeg-turbo's, so real JPEGs get loose bounds (a wrong crop, flip or
    orientation is far outside them; bench/gpu_check.py measures the actual difference); samples decoded on the
    CPU (PNG, CMYK) stay within one gray level. An undecodable JPEG is named."""
    m = build_manifest(foolbox_tree, "val")
    order = np.random.default_rng(1).permutation(len(m))
    p = get_preset("imagenet")
    for mode in ("eval", "train", "views"):
        boxes = _boxes(len(m)) if mode == "views" else None
        a, ia, _ = _cpu(m, order, p, mode, boxes)
        out = list(load_batches("torch", m, order, p, mode, 4, 2, "cuda", 3, boxes=boxes))
        assert all(b.images.is_cuda for b in out)
        b = torch.cat([x.images for x in out]).cpu()
        assert torch.cat([x.index for x in out]).tolist() == ia.tolist() and a.shape == b.shape
        d = (a - b).abs()
        assert d.mean() < 0.02 and d.max() < 1.0, (mode, d.mean().item(), d.max().item())

    arr = np.random.default_rng(3).integers(0, 255, (30, 41, 3), dtype=np.uint8)
    (image_tree / "train" / "apple" / "img_cmyk.jpg").write_bytes(_jpeg(arr, "CMYK"))
    t = build_manifest(image_tree, "train")
    order = np.arange(len(t))
    a, _, _ = _cpu(t, order, TINY)
    b = torch.cat([x.images for x in load_batches("torch", t, order, TINY, "eval", 5, 0, "cuda", 0)]).cpu()
    cpu_side = [k for k, f in enumerate(t.files) if f.endswith((".png", "_cmyk.jpg"))]
    assert (a[cpu_side] - b[cpu_side]).abs().max() <= _level(TINY) and bool(torch.isfinite(b).all())

    bad = 5
    data = (image_tree / t.files[bad]).read_bytes()
    (image_tree / t.files[bad]).write_bytes(data[:data.index(b"\xff\xda") + 40])
    with pytest.raises(DecodeError) as e:
        for _ in load_batches("torch", t, order, TINY, "eval", 4, 0, "cuda", 0):
            pass
    assert e.value.sample == bad
