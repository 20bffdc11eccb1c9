"""The two image loaders (issue 13): torch (torchvision decoding + transforms in a DataLoader) against DALI on
the same samples, orders, modes and preprocessing; decode errors named by the torch loader."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.data import build_manifest
from pipeline.data.batch import DecodeError
from pipeline.data.loaders import load_batches, resolve_loader
from pipeline.data.presets import Preprocess, get_preset
from pipeline.errors import UsageError

TINY = Preprocess("t", 24, 20, (0.5, 0.4, 0.3), (0.25, 0.2, 0.3), "rrc", (0.25, 1.0))


def _all(loader: str, m, order, p, mode="eval", bs=5, workers=1, seed=0, boxes=None):
    bs_ = list(load_batches(loader, m, order, p, mode, bs, workers, "cpu", seed, boxes=boxes))
    return torch.cat([b.images for b in bs_]), torch.cat([b.index for b in bs_]), [len(b.index) for b in bs_]


def test_eval_pixels_agree_on_real_imagenet_jpegs(foolbox_tree: Path):
    """ImageNet preset (resize 256, crop 224) on 20 real JPEGs, one of them 1024x683: same order and indices,
    pixels within a few gray levels (measured: mean 0.003, max 0.14 in normalised units; 1 level = 0.017)."""
    m = build_manifest(foolbox_tree, "val")
    order = np.arange(len(m))[::-1].copy()
    a, ia, na = _all("dali", m, order, get_preset("imagenet"), bs=6)
    b, ib, nb = _all("torch", m, order, get_preset("imagenet"), bs=6, workers=2)
    assert ia.tolist() == ib.tolist() == order.tolist() and na == nb == [6, 6, 6, 2]
    d = (a - b).abs()
    assert d.mean() < 0.01 and d.max() < 0.3, (d.mean().item(), d.max().item())


def test_eval_pixels_agree_on_odd_sizes_gray_and_png(image_tree: Path):
    m = build_manifest(image_tree, "train")
    order = np.arange(len(m))
    a, _, _ = _all("dali", m, order, TINY)
    b, _, _ = _all("torch", m, order, TINY, workers=0)
    d = (a - b).abs()
    assert d.mean() < 0.05 and a.shape == b.shape == (len(m), 3, 20, 20), d.mean().item()


def test_view_boxes_give_the_same_crops(foolbox_tree: Path):
    """Stored view boxes (crop + flip) replayed by both loaders: [B, V, 3, H, W], same crops."""
    from pipeline.data.crops import rrc_box

    m = build_manifest(foolbox_tree, "val")
    order = np.arange(6)
    rng = np.random.default_rng(0)
    boxes = np.zeros((6, 3, 5), np.float32)
    for i in order:
        for v in range(3):
            boxes[i, v, :4] = rrc_box(rng, 512, 512, (0.2, 1.0), (3 / 4, 4 / 3))
            boxes[i, v, 4] = v % 2
    p = get_preset("imagenet")
    a, _, _ = _all("dali", m, order, p, "views", boxes=boxes)
    b, _, _ = _all("torch", m, order, p, "views", boxes=boxes)
    assert a.shape == b.shape == (6, 3, 3, 224, 224)
    assert (a - b).abs().mean() < 0.02


def test_torch_train_mode_is_seeded_per_sample(image_tree: Path):
    """Random crops and flips depend on (seed, index) only: the same whatever the worker count; another seed
    draws other crops."""
    m = build_manifest(image_tree, "train")
    order = np.random.default_rng(1).permutation(len(m))
    a, ia, _ = _all("torch", m, order, TINY, "train", workers=0, seed=3)
    b, ib, _ = _all("torch", m, order, TINY, "train", workers=2, seed=3)
    c, _, _ = _all("torch", m, order, TINY, "train", workers=0, seed=4)
    assert torch.equal(a, b) and ia.tolist() == ib.tolist() == order.tolist()
    assert not torch.equal(a, c)


def test_torch_loader_names_an_undecodable_sample(image_tree: Path):
    m = build_manifest(image_tree, "train")
    bad = 7
    (image_tree / m.files[bad]).write_bytes(b"\xff\xd8\xff not really a jpeg")
    it = load_batches("torch", m, np.arange(len(m)), TINY, "eval", 4, 0, "cpu", 0)
    seen = []
    with pytest.raises(DecodeError) as e:
        for b in it:
            seen += b.index.tolist()
    assert e.value.sample == bad and seen == [0, 1, 2, 3]  # the batches before the bad one arrive


def test_loader_names():
    assert resolve_loader("torch") == "torch" and resolve_loader("auto") in ("dali", "torch")
    with pytest.raises(UsageError, match="unknown loader 'pil'"):
        resolve_loader("pil")
