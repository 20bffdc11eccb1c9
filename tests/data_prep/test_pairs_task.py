"""The 100-class task (issue 27, point 1): two Fashion-MNIST items stacked vertically, class = (top, bottom),
written by ``python -m pipeline.data prepare-demo --task pairs100`` as train / heldout / val folders."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.data.embedded import (FASHION_MNIST_CLASSES, FASHION_MNIST_DIR, PAIR_ITEM, load_fashion_mnist,
                                    pair_class_names, pair_image)


def test_pair_image_layout_and_flip():
    rng = np.random.default_rng(0)
    top, bottom = rng.integers(1, 255, (28, 28), dtype=np.uint8), rng.integers(1, 255, (28, 28), dtype=np.uint8)
    img = pair_image(top, bottom)
    assert img.shape == (32, 32, 3) and (img[..., 0] == img[..., 2]).all()
    lo = PAIR_ITEM // 2
    want_top = np.asarray(Image.fromarray(top).resize((PAIR_ITEM, PAIR_ITEM), Image.BOX))
    assert np.array_equal(img[:PAIR_ITEM, lo:lo + PAIR_ITEM, 0], want_top)
    assert (img[:, :lo] == 0).all() and (img[:, lo + PAIR_ITEM:] == 0).all()  # black margins
    flipped = img[:, ::-1]  # the demo augmentation: a horizontal flip keeps which item is on top
    assert np.array_equal(flipped[:PAIR_ITEM, lo:lo + PAIR_ITEM, 0], want_top[:, ::-1])


@pytest.mark.skipif(not (FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz").is_file(), reason="needs Fashion-MNIST")
def test_prepare_pairs_task(tmp_path: Path):
    from pipeline.data import build_manifest
    from pipeline.data.__main__ import main

    out = tmp_path / "pairs"
    assert main(["prepare-demo", "--task", "pairs100", "--out", str(out), "--train-per-class", "2",
                 "--heldout-per-class", "1", "--val-per-class", "1"]) == 0
    names = pair_class_names()
    assert len(names) == 100 and names == sorted(names)
    for split, per in (("train", 2), ("heldout", 1), ("val", 1)):
        m = build_manifest(out, split)
        assert list(m.classes) == names and len(m) == 100 * per
        assert np.bincount(m.labels, minlength=100).tolist() == [per] * 100
    before = {p.name: p.read_bytes() for p in (out / "train" / names[17]).iterdir()}
    assert main(["prepare-demo", "--task", "pairs100", "--out", str(out), "--train-per-class", "2",
                 "--heldout-per-class", "1", "--val-per-class", "1"]) == 0  # idempotent, deterministic
    assert {p.name: p.read_bytes() for p in (out / "train" / names[17]).iterdir()} == before
    # each image's top item is an item of its class's top class; heldout's come from training images 5000+ of that
    # class, train's from the first 5000 (disjoint: the held-out choice never sees a training image)
    images, labels = load_fashion_mnist("train")
    lo = PAIR_ITEM // 2
    for split, ranks in (("train", (0, 5000)), ("heldout", (5000, 6000))):
        for name in names[::23]:
            a = FASHION_MNIST_CLASSES.index(name.split("_over_")[0])
            pool = np.flatnonzero(labels == a)
            small = np.stack([np.asarray(Image.fromarray(images[i]).resize((PAIR_ITEM, PAIR_ITEM), Image.BOX))
                              for i in pool]).astype(np.float32)
            for f in sorted((out / split / name).iterdir()):
                top = np.asarray(Image.open(f).convert("L"), np.float32)[:PAIR_ITEM, lo:lo + PAIR_ITEM]
                rank = int(np.abs(small - top).mean(axis=(1, 2)).argmin())
                assert ranks[0] <= rank < ranks[1], (split, name, rank)
                assert np.abs(small[rank] - top).mean() < 3.0  # JPEG noise only
