"""``python -m pipeline.data list``: image lists with the same samples, order and fingerprint as the folders."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from pipeline.data.__main__ import main
from pipeline.data import build_manifest


def test_list_roundtrip_same_fingerprint(image_tree: Path, capsys):
    folder = build_manifest(image_tree, "train")
    assert folder.layout == "imagefolder"
    assert main(["list", str(image_tree), "--split", "train"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["same_fingerprint"] and summary["fingerprint"] == folder.fingerprint
    lines = (image_tree / "train_list.txt").read_text().splitlines()
    assert lines[0] == f"{folder.files[0]} 0" and len(lines) == len(folder)
    assert (image_tree / "classes.txt").read_text().split() == ["apple", "mango", "zebra"]
    listed = build_manifest(image_tree, "train")
    assert listed.layout == "filelist"
    assert listed.files == folder.files and listed.classes == folder.classes
    np.testing.assert_array_equal(listed.labels, folder.labels)
    assert listed.fingerprint == folder.fingerprint
    # val next to train: same classes.txt, its own list
    assert main(["list", str(image_tree), "--split", "val"]) == 0
    assert build_manifest(image_tree, "val").fingerprint == json.loads(capsys.readouterr().out)["fingerprint"]


def test_list_to_other_dir(image_tree: Path, tmp_path: Path, capsys):
    out = tmp_path / "lists"
    assert main(["list", str(image_tree), "-o", str(out)]) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["same_fingerprint"] and (out / "train_list.txt").is_file() and (out / "classes.txt").is_file()
    assert not (image_tree / "train_list.txt").exists()  # the source tree is untouched


def test_list_class_prefix_order_is_reported(tmp_path: Path, capsys):
    from PIL import Image

    for c in ("a", "a-b"):  # "train/a-b/..." sorts before "train/a/..." as a path, after it as a class name
        (tmp_path / "t" / "train" / c).mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(tmp_path / "t" / "train" / c / "x.jpg")
    assert main(["list", str(tmp_path / "t")]) == 0
    assert json.loads(capsys.readouterr().out)["same_fingerprint"] is False


def test_list_refuses_missing_split(tmp_path: Path, capsys):
    assert main(["list", str(tmp_path), "--split", "val"]) == 2
    assert "is not a folder" in capsys.readouterr().err


def test_prepare_demo_caps_below_one_are_refused(tmp_path: Path, capsys):
    """``prepare-demo --train-per-class 0`` used to mean "every image" (60000 written for a typo); a cap < 1 is now
    one line and exit 2, nothing written; a real cap writes exactly that many per class."""
    from pipeline.data.embedded import FASHION_MNIST_DIR

    if not (FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip("embedded Fashion-MNIST not installed (make setup installs it)")
    for flag, v in (("--train-per-class", "0"), ("--val-per-class", "-3")):
        assert main(["prepare-demo", "--out", str(tmp_path / "d"), flag, v]) == 2
        assert f"{flag} must be at least 1" in capsys.readouterr().err
        assert not (tmp_path / "d").exists()
    assert main(["prepare-demo", "--out", str(tmp_path / "d"), "--train-per-class", "2", "--val-per-class", "1"]) == 0
    err = capsys.readouterr().err
    assert "20/20" in err and "10/10" in err and "60000" not in err  # the progress counts what is written
    m = build_manifest(tmp_path / "d", "train")
    assert len(m) == 20 and np.bincount(m.labels).tolist() == [2] * 10
    assert len(build_manifest(tmp_path / "d", "val")) == 10
