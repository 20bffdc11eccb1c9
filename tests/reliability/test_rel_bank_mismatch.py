"""Fault 4: a bank that does not describe the dataset is refused before training, with one line naming the
field: extra files, files moved between classes, a different class count with the same N, another dataset,
a group that is not a bank, a bank of an unknown schema version, an incomplete (killed) bank.

Also covered elsewhere: renamed file (fingerprint), dropped file (num_samples), renamed class (classes),
tampered num_classes / complete / schema_version attrs: tests/stage2_student_train/test_s2_bank_validation.py;
an existing bank of another dataset at ``--out`` of a dump: tests/stage1_teacher_logits/test_dump.py::
test_out_with_different_key_refused_unless_overwrite; an incomplete bank after a kill: test_rel_kill_dump.py."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import zarr

from pipeline.train_student import main as train_main
from rel_helpers import assert_one_line_error, train_args


def _extra_file(root: Path) -> None:
    f = sorted((root / "train").glob("*/*.jpg"))[5]
    shutil.copy(f, f.with_name("extra_" + f.name))


def _move_between_classes(root: Path) -> None:
    """Same N, same class list, same file names: one file of class A and one of class B trade folders."""
    a, b = sorted(p for p in (root / "train").iterdir() if p.is_dir())[:2]
    fa, fb = sorted(a.glob("*.jpg"))[0], sorted(b.glob("*.jpg"))[0]
    fa.rename(b / ("a_" + fa.name))
    fb.rename(a / ("b_" + fb.name))


def _reorder(root: Path) -> None:
    """Same N, classes and set of contents; two files swap names, so sorted order (sample identity) changes."""
    f1, f2 = sorted((root / "train").glob("*/*.jpg"))[:2]
    tmp = f1.with_name("swap.tmp")
    f1.rename(tmp)
    f2.rename(f1)
    tmp.rename(f2)


def _new_class_same_n(root: Path) -> None:
    """An eleventh class made of one moved file per split: same number of training samples, C = 11."""
    for split in ("train", "val"):
        src = sorted((root / split).glob("*/*.jpg"))[0]
        (root / split / "zz_new_class").mkdir()
        src.rename(root / split / "zz_new_class" / src.name)


def _copy(demo_root: Path, dst: Path, edit) -> Path:
    shutil.copytree(demo_root, dst)
    edit(dst)
    return dst


@pytest.mark.parametrize(("edit", "field"), [
    (_extra_file, "'num_samples'"),
    (_move_between_classes, "'fingerprint'"),
    (_new_class_same_n, "'num_classes'"),
])
def test_dataset_changed_since_the_dump(edit, field, demo_root: Path, demo_bank: Path, tmp_path: Path, capsys):
    data = _copy(demo_root, tmp_path / "data", edit)
    out = tmp_path / "run"
    capsys.readouterr()
    assert train_main(train_args(data, out, labels=[demo_bank])) == 2
    assert_one_line_error(capsys.readouterr().err, field, str(demo_bank), "does not match",
                          f"the bank was dumped from {demo_root} (train): give that --data")  # cause and fix
    assert not (out / "last.pt").exists()


def test_swapped_file_contents_are_not_detected(demo_root: Path, demo_bank: Path, tmp_path: Path):
    """Known limit (RELIABILITY.md): the fingerprint covers names and classes, not file contents. Two files of
    the same class swapping contents under unchanged names are accepted."""
    data = _copy(demo_root, tmp_path / "data", _reorder)
    assert train_main(train_args(data, tmp_path / "run", labels=[demo_bank])) == 0


def test_bank_of_another_dataset(image_tree: Path, demo_bank: Path, tmp_path: Path, capsys):
    capsys.readouterr()
    rc = train_main(train_args(image_tree, tmp_path / "run", labels=[demo_bank], ) + ["--preset", "tiny"])
    assert rc == 2
    assert_one_line_error(capsys.readouterr().err, "'num_samples'", str(image_tree))


def test_not_a_bank_and_unknown_schema(demo_root: Path, demo_bank: Path, tmp_path: Path, capsys):
    plain = tmp_path / "plain.zarr"
    zarr.open_group(str(plain), mode="w").attrs["hello"] = 1
    capsys.readouterr()
    assert train_main(train_args(demo_root, tmp_path / "r1", labels=[plain])) == 2
    assert_one_line_error(capsys.readouterr().err, "not a label bank", "schema_version")

    future = tmp_path / "future.zarr"
    shutil.copytree(demo_bank, future)
    zarr.open_group(str(future), mode="r+").attrs["schema_version"] = 2
    assert train_main(train_args(demo_root, tmp_path / "r2", labels=[future])) == 2
    assert_one_line_error(capsys.readouterr().err, "schema_version", "2")

    nodir = tmp_path / "not_zarr"
    nodir.mkdir()
    (nodir / "notes.txt").write_text("hello")
    assert train_main(train_args(demo_root, tmp_path / "r3", labels=[nodir])) == 2
    assert_one_line_error(capsys.readouterr().err, str(nodir))
