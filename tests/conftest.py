"""Shared fixtures: small real data made by the tests themselves (no network, no mocks).

- ``image_tree``: a generated ImageNet-style tree with odd image sizes, grayscale/PNG members, and class
  folders created in non-sorted order.
- ``demo_root``: a small subset of the embedded Fashion-MNIST set (30 train / 10 val per class) as JPEGs.
- ``demo_bank``: a dumped bank of a randomly initialised small teacher over ``demo_root`` train.
- ``foolbox_dir``: 20 real ImageNet JPEGs from the foolbox wheel (installed by ``make setup``).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
FOOLBOX_DIR = REPO / "tests" / ".data" / "foolbox"

os.environ.setdefault("OMP_NUM_THREADS", "2")


def make_image_tree(root: Path, classes=("zebra", "apple", "mango"), per_class: int = 6, seed: int = 0,
                    split: str = "train", sizes=((23, 31), (40, 17), (32, 32), (57, 45))) -> Path:
    """Write ``root/split/<class>/img_<k>.jpg`` (RGB, odd sizes; one grayscale JPEG and one PNG per class)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for c in classes:  # creation order is deliberately not sorted order
        d = root / split / c
        d.mkdir(parents=True, exist_ok=True)
        for k in range(per_class):
            h, w = sizes[(k + len(c)) % len(sizes)]
            arr = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
            arr[: h // 2] = sum(map(ord, c)) % 200  # class-dependent structure so teachers can tell classes apart
            if k == 1:
                Image.fromarray(arr[:, :, 0], "L").save(d / f"img_{k}.jpg", quality=90)
            elif k == 2:
                Image.fromarray(arr).save(d / f"img_{k}.png")
            else:
                Image.fromarray(arr).save(d / f"img_{k}.jpg", quality=90)
    return root


@pytest.fixture
def image_tree(tmp_path: Path) -> Path:
    make_image_tree(tmp_path / "tree", split="train")
    make_image_tree(tmp_path / "tree", split="val", per_class=3, seed=1)
    return tmp_path / "tree"


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory) -> Path:
    from pipeline.data.embedded import FASHION_MNIST_DIR, prepare_default_dataset

    if not (FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip("embedded Fashion-MNIST not installed (make setup installs it)")
    return prepare_default_dataset(tmp_path_factory.mktemp("demo") / "fmnist", {"train": 30, "val": 10})


@pytest.fixture(scope="session")
def demo_bank(demo_root: Path, tmp_path_factory) -> Path:
    """Bank of a random-init ``democnn_s`` on demo train (300 samples, chunks of 64 rows)."""
    from pipeline.dump_logits import main

    out = tmp_path_factory.mktemp("banks") / "demo.zarr"
    rc = main(["--teacher", "democnn_s", "--weights", "none", "--data", str(demo_root), "--split", "train",
               "--preset", "demo", "--batch-size", "32", "--rows-per-chunk", "64", "--out", str(out)])
    assert rc == 0
    return out


@pytest.fixture
def foolbox_dir() -> Path:
    if not FOOLBOX_DIR.is_dir() or not list(FOOLBOX_DIR.glob("imagenet_*.jpg")):
        pytest.skip("foolbox ImageNet JPEGs not installed (make setup installs them)")
    return FOOLBOX_DIR


@pytest.fixture(autouse=True)
def _private_bank_cache(tmp_path_factory, monkeypatch):
    """Banks that a test writes to the default cache go to a per-session folder, never to ~/.cache."""
    if "KD_CACHE" not in os.environ:
        monkeypatch.setenv("KD_CACHE", str(tmp_path_factory.getbasetemp() / "kd_cache"))
