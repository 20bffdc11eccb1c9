"""Dataset layouts -> manifests (issue 2, point 1): sorted classes and files, file lists, CIFAR pickles,
fingerprints, and the errors for missing roots and empty class folders."""

from __future__ import annotations

import hashlib
import os
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.data import build_manifest, fingerprint
from pipeline.errors import UsageError


def _jpeg(path: Path, value: int = 100, size=(12, 10)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((*size, 3), value, np.uint8)).save(path)


# --- ImageNet folder layout ---------------------------------------------------------------------------------


def test_imagefolder_sorted_classes_and_files(image_tree: Path):
    # the fixture creates class folders zebra, apple, mango (in that order); add files in reverse-name order
    extra = image_tree / "train" / "apple"
    for name in ("zz.jpg", "b_late.jpg", "a_early.JPEG"):
        _jpeg(extra / name)
    (extra / "notes.txt").write_text("not an image")
    listed = [e.name for e in os.scandir(image_tree / "train")]
    m = build_manifest(image_tree, "train")
    assert m.classes == ("apple", "mango", "zebra")
    assert m.layout == "imagefolder" and m.split == "train" and m.name == "tree"
    # within a class: sorted by name; classes contiguous in sorted order
    expected = []
    for k, c in enumerate(sorted(listed)):
        names = sorted(n for n in os.listdir(image_tree / "train" / c) if not n.endswith(".txt"))
        expected += [(f"train/{c}/{n}", k) for n in names]
    assert list(zip(m.files, m.labels.tolist())) == expected
    assert "train/apple/notes.txt" not in m.files
    assert m.labels.dtype == np.int32
    assert len(m) == 6 + 3 + 6 + 6 and m.num_classes == 3
    assert m.describe()["fingerprint"] == m.fingerprint
    val = build_manifest(image_tree, "val")
    assert val.classes == ("apple", "mango", "zebra") and len(val) == 9
    assert all(f.startswith("val/") for f in val.files)


def test_fingerprint_stable_and_sensitive(image_tree: Path, tmp_path: Path):
    a = build_manifest(image_tree, "train")
    b = build_manifest(image_tree, "train")
    assert a.fingerprint == b.fingerprint and len(a.fingerprint) == 64
    # the same tree elsewhere: identity is relative paths + labels + classes, not the absolute root
    copy = tmp_path / "elsewhere" / "tree"
    shutil.copytree(image_tree, copy)
    assert build_manifest(copy, "train").fingerprint == a.fingerprint
    # independent sha256 of the documented content
    h = hashlib.sha256(("\n".join(a.classes) + "\n\n").encode())
    for f, y in zip(a.files, a.labels.tolist()):
        h.update(f"{f}\t{y}\n".encode())
    assert a.fingerprint == h.hexdigest()
    files, labels, classes = list(a.files), a.labels.copy(), list(a.classes)
    swapped = files.copy()
    swapped[0], swapped[1] = swapped[1], swapped[0]
    relabeled = labels.copy()
    relabeled[3] = (relabeled[3] + 1) % 3
    renamed = classes.copy()
    renamed[2] = "zebra2"
    prints = {
        fingerprint(classes, files, labels),
        fingerprint(classes, swapped, labels),
        fingerprint(classes, files, relabeled),
        fingerprint(renamed, files, labels),
        fingerprint(classes, files[:-1], labels[:-1]),
    }
    assert len(prints) == 5
    # adding one file to the tree changes it
    _jpeg(image_tree / "train" / "mango" / "new.jpg")
    assert build_manifest(image_tree, "train").fingerprint != a.fingerprint


def test_empty_class_folder_names_path(image_tree: Path):
    empty = image_tree / "train" / "kiwi"
    empty.mkdir()
    (empty / "readme.txt").write_text("no images here")
    with pytest.raises(UsageError, match="kiwi"):
        build_manifest(image_tree, "train")


def test_missing_root_and_split_name_path(tmp_path: Path, image_tree: Path):
    missing = tmp_path / "does_not_exist"
    with pytest.raises(UsageError, match=str(missing)):
        build_manifest(missing, "train")
    with pytest.raises(UsageError, match="test"):
        build_manifest(image_tree, "test")  # no test/ folder
    with pytest.raises(UsageError, match="unknown split"):
        build_manifest(image_tree, "holdout")
    empty_split = tmp_path / "flat"
    (empty_split / "train").mkdir(parents=True)
    with pytest.raises(UsageError, match="no class folders"):
        build_manifest(empty_split, "train")


# --- file-list layout ---------------------------------------------------------------------------------------


def test_filelist_with_classes_txt(tmp_path: Path):
    root = tmp_path / "fl"
    rows = [("imgs/q/003.jpg", 2), ("imgs/a/001.jpg", 0), ("imgs/m/002.jpg", 1), ("imgs/a/000.jpg", 0)]
    for rel, y in rows:
        _jpeg(root / rel, 10 * y)
    (root / "train_list.txt").write_text("".join(f"{r} {y}\n" for r, y in rows) + "\n")
    (root / "classes.txt").write_text("n01\nn02\nn03\n")
    m = build_manifest(root, "train")
    assert m.layout == "filelist"
    assert m.classes == ("n01", "n02", "n03")  # line k = label k, not sorted from the paths
    assert m.files == ("imgs/a/000.jpg", "imgs/a/001.jpg", "imgs/m/002.jpg", "imgs/q/003.jpg")
    assert m.labels.tolist() == [0, 0, 1, 2]
    # order of the list file does not matter: same manifest, same fingerprint
    (root / "train_list.txt").write_text("".join(f"{r} {y}\n" for r, y in reversed(rows)))
    assert build_manifest(root, "train").fingerprint == m.fingerprint
    # a different label in the list changes it
    (root / "train_list.txt").write_text("".join(f"{r} {y if k else 1}\n" for k, (r, y) in enumerate(rows)))
    assert build_manifest(root, "train").fingerprint != m.fingerprint


def test_filelist_relative_to_split_and_folder_class_names(tmp_path: Path):
    root = tmp_path / "fl2"
    rows = [("dog/b.jpg", 1), ("cat/a.jpg", 0), ("dog/a.jpg", 1)]
    for rel, y in rows:
        _jpeg(root / "val" / rel, 50 * y)
    (root / "val_list.txt").write_text("".join(f"{r} {y}\n" for r, y in rows))
    m = build_manifest(root, "val")
    assert m.files == ("val/cat/a.jpg", "val/dog/a.jpg", "val/dog/b.jpg")
    assert m.classes == ("cat", "dog")
    assert m.labels.tolist() == [0, 1, 1]


def test_filelist_bad_line_names_file_and_line(tmp_path: Path):
    root = tmp_path / "fl3"
    root.mkdir()
    (root / "train_list.txt").write_text("a.jpg 0\nb.jpg zero\n")
    with pytest.raises(UsageError, match=r"train_list\.txt:2"):
        build_manifest(root, "train")
    (root / "train_list.txt").write_text("a.jpg 0\nb.jpg 3\n")
    (root / "classes.txt").write_text("only\n")
    with pytest.raises(UsageError, match="classes.txt"):
        build_manifest(root, "train")


# --- CIFAR pickles ------------------------------------------------------------------------------------------


def test_cifar10_pickles(tmp_path: Path, write_cifar10):
    root = tmp_path / "cifar-10-batches-py"
    w = write_cifar10(root)
    m = build_manifest(root, "train")
    assert m.layout == "cifar" and len(m) == 20
    assert m.classes == tuple(w["label_names"])
    assert m.files[:5] == ("data_batch_1#0", "data_batch_1#1", "data_batch_1#2", "data_batch_1#3", "data_batch_2#0")
    expected = sum((w[f"data_batch_{i}"]["labels"] for i in range(1, 6)), [])
    assert m.labels.tolist() == expected
    t = build_manifest(root, "val")
    assert len(t) == 5 and t.labels.tolist() == w["test_batch"]["labels"]
    assert t.files[0] == "test_batch#0"
    # pixels in manifest order, HWC, from the CHW-planar rows
    from pipeline.data.layouts import load_array_images

    imgs = load_array_images(t)
    assert imgs.shape == (5, 32, 32, 3) and imgs.dtype == np.uint8
    row = w["test_batch"]["data"][3]
    np.testing.assert_array_equal(imgs[3, :, :, 0], row[:1024].reshape(32, 32))
    np.testing.assert_array_equal(imgs[3, :, :, 2], row[2048:].reshape(32, 32))
    # a label change changes the fingerprint
    w2 = write_cifar10(tmp_path / "c2")
    assert build_manifest(tmp_path / "c2", "train").fingerprint == m.fingerprint
    d = pickle.loads((tmp_path / "c2" / "data_batch_3").read_bytes())
    d["labels"][0] = (d["labels"][0] + 1) % 10
    (tmp_path / "c2" / "data_batch_3").write_bytes(pickle.dumps(d))
    assert build_manifest(tmp_path / "c2", "train").fingerprint != m.fingerprint
    assert w2["label_names"] == w["label_names"]


def test_cifar100_pickles(tmp_path: Path, write_cifar100):
    root = tmp_path / "cifar-100-python"
    w = write_cifar100(root)
    m = build_manifest(root, "train")
    assert m.layout == "cifar" and m.num_classes == 100 and m.classes[7] == "class_007"
    assert m.labels.tolist() == w["train"]["fine_labels"]
    assert m.files == tuple(f"train#{k}" for k in range(6))
    assert build_manifest(root, "val").labels.tolist() == w["test"]["fine_labels"]
