"""The embedded default dataset: Fashion-MNIST (Debian package ``dataset-fashion-mnist``), written once as a
JPEG ImageNet-style tree so the demo exercises the very same DALI path as ImageNet.

Everything goes through :func:`prepare_default_dataset`; replacing the embedded set means changing this module only.
"""

from __future__ import annotations

import gzip
import logging
import os
import shutil
from pathlib import Path

import numpy as np
from tqdm import tqdm

from pipeline.errors import UsageError

log = logging.getLogger(__name__)

FASHION_MNIST_DIR = Path(os.environ.get("FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist"))
FASHION_MNIST_CLASSES = (
    "T-shirt_top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle_boot",
)
DEFAULT_DATA_DIR = Path("data/fashion-mnist")


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (optionally gzipped): magic 0x0000 | dtype 0x08 | ndim, then big-endian dims."""
    with (gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")) as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise UsageError(f"{path} is not an unsigned-byte IDX file")
    ndim = raw[3]
    dims = np.frombuffer(raw, ">u4", count=ndim, offset=4).astype(int)
    data = np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise UsageError(f"{path} is truncated")
    return data.reshape(dims)


def load_fashion_mnist(split: str) -> tuple[np.ndarray, np.ndarray]:
    """-> images [N, 28, 28] uint8, labels [N] uint8."""
    prefix = "train" if split == "train" else "t10k"
    img = FASHION_MNIST_DIR / f"{prefix}-images-idx3-ubyte.gz"
    lab = FASHION_MNIST_DIR / f"{prefix}-labels-idx1-ubyte.gz"
    if not img.is_file():
        raise UsageError(
            f"Fashion-MNIST not found at {FASHION_MNIST_DIR}: install Debian's dataset-fashion-mnist "
            "(make setup does) or set FASHION_MNIST_DIR"
        )
    return read_idx(img), read_idx(lab)


def prepare_default_dataset(out: str | Path = DEFAULT_DATA_DIR, per_class: dict[str, int] | None = None,
                            quality: int = 95) -> Path:
    """Write the embedded dataset as ``out/{train,val}/<class>/<NNNNN>.jpg`` (RGB JPEG). Idempotent.

    Args:
        per_class: optional cap of images per class per split (``{"train": 1000, "val": 200}``), taking the
            first ones in the original order so the subset is deterministic. ``train`` comes from Fashion-MNIST's
            training set, ``val`` from its test set.
    """
    caps = per_class or {}
    return write_tree(out, {"train": ("train", 0, caps.get("train")), "val": ("val", 0, caps.get("val"))}, quality)


def _begin_tree(out: Path, want: str) -> Path | None:
    """None when ``out`` already holds the tree ``want`` describes (its ``.complete`` marker); else ``out`` removed
    and an empty temporary folder to write the tree into (:func:`_finish_tree` moves it into place)."""
    marker = out / ".complete"
    if marker.is_file() and marker.read_text() == want:
        log.info("dataset ready at %s", out)
        return None
    if out.exists():
        shutil.rmtree(out)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    return tmp


def _finish_tree(tmp: Path, out: Path, want: str) -> None:
    """The written tree into place, then its marker (a partial tree never looks complete)."""
    tmp.rename(out)
    (out / ".complete").write_text(want)
    log.info("wrote dataset %s", out)


def write_tree(out: str | Path, splits: dict[str, tuple[str, int, int | None]], quality: int = 95) -> Path:
    """Write ``out/<split>/<class>/<NNNNN>.jpg`` for each ``split: (source, start, count)``: per class, the images
    of rank ``start`` to ``start + count`` (None: to the end) in Fashion-MNIST's ``source`` set (``train`` or
    ``val`` = its test set), in the original order. File names are the source indices. Idempotent (a marker
    records what was written); a partial tree is rebuilt.

    Disjoint ranges of the training set give a held-out split that is never the test set (hyperparameter choice).
    """
    from PIL import Image

    out = Path(out)
    want = repr(sorted(splits.items())) + f" q{quality}"
    tmp = _begin_tree(out, want)
    if tmp is None:
        return out
    for split, (source, start, count) in splits.items():
        images, labels = load_fashion_mnist(source)
        rank = np.zeros(len(FASHION_MNIST_CLASSES), int)
        for c in FASHION_MNIST_CLASSES:
            (tmp / split / c).mkdir(parents=True, exist_ok=True)
        chosen = []  # per class, its images ranked start .. start + count - 1 (in file order)
        for i, y in enumerate(labels.tolist()):
            r = rank[y]
            rank[y] += 1
            if r >= start and (count is None or r < start + count):
                chosen.append(i)
        for i in tqdm(chosen, desc=f"writing {split}", unit="img", mininterval=1.0):
            y = int(labels[i])
            rgb = np.repeat(images[i][:, :, None], 3, axis=2)
            Image.fromarray(rgb).save(tmp / split / FASHION_MNIST_CLASSES[y] / f"{i:05d}.jpg", quality=quality)
    _finish_tree(tmp, out, want)
    return out


# --- a 100-class task from the same images ------------------------------------------------------------------
PAIRS_DATA_DIR = Path("data/fashion-pairs")
PAIR_ITEM = 16  # px: each item's side in a pair image (two stacked: 32 x 16, padded to 32 x 32)


def pair_class_names() -> list[str]:
    """The 100 classes, ``<top>_over_<bottom>`` (Fashion-MNIST names), in sorted (ImageFolder) order."""
    return sorted(f"{a}_over_{b}" for a in FASHION_MNIST_CLASSES for b in FASHION_MNIST_CLASSES)


def pair_image(top: np.ndarray, bottom: np.ndarray) -> np.ndarray:
    """Two 28 x 28 items -> one 32 x 32 RGB uint8 image: each item resized to 16 x 16 (area), ``top`` above
    ``bottom`` in the middle 16 columns, black elsewhere. Stacked vertically, so a horizontal flip (the demo
    preset's augmentation) keeps the class."""
    from PIL import Image

    def small(a: np.ndarray) -> np.ndarray:
        return np.asarray(Image.fromarray(a).resize((PAIR_ITEM, PAIR_ITEM), Image.BOX))

    out = np.zeros((2 * PAIR_ITEM, 2 * PAIR_ITEM), np.uint8)
    lo = PAIR_ITEM // 2
    out[:PAIR_ITEM, lo:lo + PAIR_ITEM] = small(top)
    out[PAIR_ITEM:, lo:lo + PAIR_ITEM] = small(bottom)
    return np.repeat(out[:, :, None], 3, axis=2)


def prepare_pairs_dataset(out: str | Path = PAIRS_DATA_DIR, per_class: dict[str, int] | None = None,
                          quality: int = 95, seed: int = 0) -> Path:
    """Write the 100-class task: ``out/{train,heldout,val}/<top>_over_<bottom>/<NNNNNN>.jpg``. Idempotent.

    Each image stacks two Fashion-MNIST items vertically (:func:`pair_image`); its class is the pair (top item's
    class, bottom item's class): 100 classes that share parts, so a teacher's distribution over them has structure
    (a confusable top item makes ten classes likely at once), as ImageNet's do, and top-k formats lose real mass.
    ``per_class``: images per class per split (default train 200, heldout 20, val 50: 20,000 / 2,000 / 5,000).
    Items are drawn with a seeded generator: train from the first 5,000 images of each Fashion-MNIST training
    class, heldout from the last 1,000 (disjoint from train: hyperparameter choice), val from the test set."""
    from PIL import Image

    caps = {"train": 200, "heldout": 20, "val": 50, **(per_class or {})}
    out = Path(out)
    want = f"pairs {sorted(caps.items())} q{quality} seed{seed}"
    tmp = _begin_tree(out, want)
    if tmp is None:
        return out
    sources = {"train": ("train", 0, 5000), "heldout": ("train", 5000, 6000), "val": ("val", 0, None)}
    for s, (split, (source, start, stop)) in enumerate(sources.items()):
        images, labels = load_fashion_mnist(source)
        pools = [np.flatnonzero(labels == c)[start:stop] for c in range(len(FASHION_MNIST_CLASSES))]
        rng = np.random.default_rng([seed, s])
        k = 0
        for a, top in enumerate(FASHION_MNIST_CLASSES):
            for b, bottom in enumerate(FASHION_MNIST_CLASSES):
                folder = tmp / split / f"{top}_over_{bottom}"
                folder.mkdir(parents=True, exist_ok=True)
                for _ in range(caps[split]):
                    i, j = int(rng.choice(pools[a])), int(rng.choice(pools[b]))
                    Image.fromarray(pair_image(images[i], images[j])).save(folder / f"{k:06d}.jpg", quality=quality)
                    k += 1
        log.info("wrote %d %s images", k, split)
    _finish_tree(tmp, out, want)
    return out
