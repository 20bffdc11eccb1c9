"""Bank validation before training (issue 4, point 2): a bank of another dataset (fingerprint), of another size
(N), other classes (C, class names), an incomplete bank or an unknown schema version is refused with exit code 2
and one line naming the field; nothing is trained."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import zarr

from pipeline.bank.writer import create_bank, mark_complete, write_chunk
from pipeline.bank.reader import LabelBank


def _copy_bank(src: Path, dst: Path, **attrs) -> Path:
    shutil.copytree(src, dst)
    g = zarr.open_group(str(dst), mode="r+")
    for k, v in attrs.items():
        if "." in k:
            top, sub = k.split(".")
            d = dict(g.attrs[top])
            d[sub] = v
            g.attrs[top] = d
        else:
            g.attrs[k] = v
    return dst


def _copy_data(src: Path, dst: Path, edit) -> Path:
    shutil.copytree(src, dst)
    edit(dst)
    return dst


def _rename_one_file(root: Path) -> None:
    f = sorted((root / "train").glob("*/*.jpg"))[3]
    f.rename(f.with_name("zz_" + f.name))  # same N, same classes, another file list


def _drop_one_file(root: Path) -> None:
    sorted((root / "train").glob("*/*.jpg"))[0].unlink()


def _rename_class(root: Path) -> None:
    first = sorted(p.name for p in (root / "train").iterdir() if p.is_dir())[0]
    for split in ("train", "val"):
        (root / split / first).rename(root / split / (first + "_renamed"))


def _run(train, tmp_path, capsys, bank, data=None) -> str:
    capsys.readouterr()
    out = tmp_path / "run"
    rc = train(out, labels=(bank,), data=data)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2, err
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert not (out / "last.pt").exists() and not (out / "metrics.jsonl").exists()
    return err[0]


@pytest.mark.parametrize(("case", "edit", "field"), [
    ("other dataset", _rename_one_file, "'fingerprint'"),
    ("other N", _drop_one_file, "'num_samples'"),
    ("other class names", _rename_class, "'classes'"),
])
def test_bank_of_another_dataset_is_refused(train, tmp_path, capsys, demo_root, demo_bank, case, edit, field):
    data = _copy_data(demo_root, tmp_path / "data", edit)
    msg = _run(train, tmp_path, capsys, demo_bank, data=data)
    assert field in msg and str(demo_bank) in msg, (case, msg)


@pytest.mark.parametrize(("attrs", "words"), [
    ({"dataset.num_classes": 12}, ["'num_classes'", "12"]),
    ({"complete": False}, ["incomplete", "'complete'"]),
    ({"schema_version": 99}, ["schema_version", "99"]),
])
def test_tampered_bank_is_refused(train, tmp_path, capsys, demo_bank, attrs, words):
    bank = _copy_bank(demo_bank, tmp_path / "bank.zarr", **attrs)
    msg = _run(train, tmp_path, capsys, bank)
    for w in words:
        assert w in msg, msg


def test_untampered_copy_is_accepted(train, tmp_path, demo_bank):
    """The refusals above come from the edits, not from copying."""
    bank = _copy_bank(demo_bank, tmp_path / "bank.zarr")
    assert train(tmp_path / "ok", "max_steps_per_epoch=1", labels=(bank,)) == 0


def test_bank_with_non_finite_rows_is_refused(train, tmp_path, capsys, demo_bank):
    """A complete bank whose logits hold +inf rows (written with the bank writer) never reaches the loss."""
    src = LabelBank(demo_bank)
    n, t, v, c = src.shape
    logits = src.read_logits().astype(np.float16)
    logits[::7] = np.inf
    g = create_bank(tmp_path / "inf.zarr", {k: x for k, x in src.attrs.items() if k != "complete"}, (n, t, v, c),
                    "float16", 64)
    labels, views, skipped = src.labels(), src.views(), src.skipped()
    for j, s in enumerate(range(0, n, 64)):
        write_chunk(g, j, logits[s:s + 64], labels[s:s + 64], views[s:s + 64], skipped[s:s + 64])
    mark_complete(g, {})
    msg = _run(train, tmp_path, capsys, tmp_path / "inf.zarr")
    assert "non-finite" in msg


def test_missing_bank_path_is_refused(train, tmp_path, capsys):
    msg = _run(train, tmp_path, capsys, tmp_path / "nope.zarr")
    assert "nope.zarr" in msg and "not found" in msg
