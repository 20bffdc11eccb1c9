"""Fixtures of the pipeline tests: tiny fake CIFAR pickles in the real python-pickle format."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest


def _write_cifar10(root: Path, per_batch: int = 4, test: int = 5, seed: int = 0) -> dict:
    """Tiny CIFAR-10-format pickles (``data_batch_1..5``, ``test_batch``, ``batches.meta``) -> what was written."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    written = {}
    for b, n in [(f"data_batch_{i}", per_batch) for i in range(1, 6)] + [("test_batch", test)]:
        d = {"batch_label": b, "data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
             "labels": [int(x) for x in rng.integers(0, 10, n)], "filenames": [f"{b}_{k}.png" for k in range(n)]}
        (root / b).write_bytes(pickle.dumps(d))
        written[b] = d
    (root / "batches.meta").write_bytes(pickle.dumps({"label_names": names, "num_cases_per_batch": per_batch}))
    written["label_names"] = names
    return written


def _write_cifar100(root: Path, n_train: int = 6, n_test: int = 4, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    fine = [f"class_{k:03d}" for k in range(100)]
    out = {}
    for b, n in (("train", n_train), ("test", n_test)):
        d = {"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
             "fine_labels": [int(x) for x in rng.integers(0, 100, n)], "coarse_labels": [0] * n}
        (root / b).write_bytes(pickle.dumps(d))
        out[b] = d
    (root / "meta").write_bytes(pickle.dumps({"fine_label_names": fine, "coarse_label_names": ["x"] * 20}))
    out["fine"] = fine
    return out


@pytest.fixture
def write_cifar10():
    """``write_cifar10(root, per_batch=4, test=5, seed=0) -> dict`` of what was written."""
    return _write_cifar10


@pytest.fixture
def write_cifar100():
    """``write_cifar100(root, n_train=6, n_test=4, seed=0) -> dict`` of what was written."""
    return _write_cifar100


@pytest.fixture
def foolbox_tree(foolbox_dir: Path, tmp_path: Path) -> Path:
    """The 20 foolbox ImageNet JPEGs as a one-class ``val`` split (real photographs, odd sizes, EXIF)."""
    import shutil

    d = tmp_path / "fb" / "val" / "all"
    d.mkdir(parents=True)
    for f in sorted(foolbox_dir.glob("imagenet_*.jpg")):
        shutil.copy(f, d / f.name)
    return tmp_path / "fb"
