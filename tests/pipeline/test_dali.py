"""DALI eval pipelines (issue 2, point 2) on CPU: every index exactly once and in order, no padding duplicates,
grayscale and PNG decode to 3 channels with exact pixels, CIFAR arrays through an external source."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.data.dali import build_pipeline, iterate
from pipeline.data import build_manifest
from pipeline.data.presets import Preprocess, get_preset
from pipeline.errors import UsageError

# resize 32 / crop 32 on 32x32 images with mean 0, std 1/255: the output is the decoded pixels themselves
IDENTITY32 = Preprocess("identity32", 32, 32, (0.0, 0.0, 0.0), (1 / 255, 1 / 255, 1 / 255))


def _indices(manifest, order, batch_size, preset=None):
    pipe = build_pipeline(manifest, order, preset or get_preset("tiny"), "eval", batch_size, 1, "cpu")
    batches = list(iterate(pipe, len(order), batch_size))
    return batches, np.concatenate([b.index.numpy() for b in batches])


@pytest.mark.parametrize("batch_size", [4, 5, 7])
def test_eval_each_index_once_in_order(image_tree: Path, batch_size: int):
    m = build_manifest(image_tree, "train")  # 18 samples: not divisible by 4, 5 or 7
    order = np.arange(len(m))
    batches, idx = _indices(m, order, batch_size)
    assert idx.tolist() == list(range(len(m)))  # no padding duplicates, nothing missing
    assert [len(b.index) for b in batches][:-1] == [batch_size] * (len(batches) - 1)
    assert 0 < len(batches[-1].index) <= batch_size
    for b in batches:
        assert b.images.dtype == torch.float32 and tuple(b.images.shape[1:]) == (3, 16, 16)
        assert b.index.dtype == torch.int64 and len(b.images) == len(b.index)
        assert torch.isfinite(b.images).all()


def test_eval_arbitrary_order_and_subset(image_tree: Path):
    m = build_manifest(image_tree, "train")
    order = np.array([17, 3, 9, 0, 12, 5, 6, 1, 11, 2, 16])
    _, idx = _indices(m, order, 4)
    assert idx.tolist() == order.tolist()
    # the images follow the indices: a sample decodes to the same tensor wherever it sits in the order
    b1, _ = _indices(m, np.array([9]), 1)
    b2, idx2 = _indices(m, order, 4)
    pos = order.tolist().index(9)
    torch.testing.assert_close(b2[pos // 4].images[pos % 4], b1[0].images[0], rtol=0, atol=0)


def test_empty_order_and_bad_mode_are_usage_errors(image_tree: Path):
    m = build_manifest(image_tree, "train")
    with pytest.raises(UsageError, match="empty"):
        build_pipeline(m, np.array([], np.int64), get_preset("tiny"))
    with pytest.raises(UsageError, match="device"):
        build_pipeline(m, np.arange(3), get_preset("tiny"), device="tpu")


def test_png_and_grayscale_decode_exact_rgb(tmp_path: Path):
    rng = np.random.default_rng(0)
    root = tmp_path / "png"
    expected = {}
    for c in ("b", "a"):
        d = root / "train" / c
        d.mkdir(parents=True)
        rgb = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
        Image.fromarray(rgb).save(d / "rgb.png")
        expected[f"train/{c}/rgb.png"] = rgb
        gray = rng.integers(0, 256, (32, 32), dtype=np.uint8)
        Image.fromarray(gray, "L").save(d / "gray.png")
        expected[f"train/{c}/gray.png"] = np.repeat(gray[:, :, None], 3, axis=2)
        rgba = rng.integers(0, 256, (32, 32, 4), dtype=np.uint8)
        rgba[..., 3] = 255
        Image.fromarray(rgba, "RGBA").save(d / "rgba.png")
        expected[f"train/{c}/rgba.png"] = rgba[..., :3]
    m = build_manifest(root, "train")
    batches, idx = _indices(m, np.arange(len(m)), 4, IDENTITY32)
    images = torch.cat([b.images for b in batches])
    assert images.shape == (6, 3, 32, 32)
    for k, i in enumerate(idx):
        want = expected[m.files[i]].transpose(2, 0, 1).astype(np.float32)
        np.testing.assert_array_equal(images[k].numpy(), want, err_msg=m.files[i])


def test_grayscale_jpeg_decodes_to_three_equal_channels(image_tree: Path):
    m = build_manifest(image_tree, "train")
    gray = [i for i, f in enumerate(m.files) if f.endswith("img_1.jpg")]  # the fixture's grayscale JPEGs
    assert len(gray) == 3 and all(Image.open(image_tree / m.files[i]).mode == "L" for i in gray)
    batches, idx = _indices(m, np.array(gray), 3)
    img = batches[0].images  # tiny preset has equal mean/std per channel
    assert img.shape == (3, 3, 16, 16)
    torch.testing.assert_close(img[:, 0], img[:, 1], rtol=0, atol=0)
    torch.testing.assert_close(img[:, 0], img[:, 2], rtol=0, atol=0)


def test_cifar_arrays_pipeline_exact(tmp_path: Path, write_cifar10):
    w = write_cifar10(tmp_path / "c10", per_batch=3, test=7)
    m = build_manifest(tmp_path / "c10", "val")
    order = np.array([6, 0, 3, 1, 5, 2, 4])
    batches, idx = _indices(m, order, 3, IDENTITY32)
    assert idx.tolist() == order.tolist()  # padded last batch trimmed
    images = torch.cat([b.images for b in batches]).numpy()
    for k, i in enumerate(idx):
        want = w["test_batch"]["data"][i].reshape(3, 32, 32).astype(np.float32)
        np.testing.assert_array_equal(images[k], want)


def test_file_list_reader_equals_the_lists_and_takes_odd_names(image_tree: Path, tmp_path: Path, monkeypatch):
    """The reader gets the order as a file list (issue 24: an epoch's rebuild at ImageNet size is ~3x cheaper):
    the same indices and pixels as files=/labels= lists; names with spaces (a leading one too) go through the
    list; a name a line cannot hold (a newline) falls back to the lists; no list file outlives the build."""
    import shutil
    import tempfile

    from pipeline.data import layouts

    root = tmp_path / "odd_names"
    shutil.copytree(image_tree, root)
    cls = sorted(p for p in (root / "train").iterdir() if p.is_dir())[0]
    files = sorted(cls.iterdir())
    files[0].rename(cls / "a name with spaces.jpg")
    files[1].rename(cls / " leading space.jpg")
    order = np.random.default_rng(0).permutation(18)
    before = sorted(Path(tempfile.gettempdir()).glob("kd-dali-*"))
    written: list[str | None] = []
    real = layouts._file_list

    def spy(manifest, o, path):
        written.append(real(manifest, o, path))
        return written[-1]

    def run(m, listed: bool):
        monkeypatch.setattr(layouts, "_file_list", spy if listed else (lambda *a: None))
        written.clear()
        batches, idx = _indices(m, order, 4)
        return torch.cat([b.images for b in batches]), idx

    m = build_manifest(root, "train")
    assert len(m) == 18 and sum(" " in f for f in m.files) == 2
    x_list, idx_list = run(m, True)
    assert written[0] is not None and not Path(written[0]).exists()  # the list: used, then gone
    x_ref, idx_ref = run(m, False)
    assert idx_list.tolist() == idx_ref.tolist() == order.tolist()
    assert torch.equal(x_list, x_ref)
    (cls / " leading space.jpg").rename(cls / "new\nline.jpg")
    m2 = build_manifest(root, "train")
    x_nl, idx_nl = run(m2, True)
    assert written == [None] and idx_nl.tolist() == order.tolist()  # the lists
    assert torch.isfinite(x_nl).all()
    assert sorted(Path(tempfile.gettempdir()).glob("kd-dali-*")) == before
