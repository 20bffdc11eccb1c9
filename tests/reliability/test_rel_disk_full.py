"""Fault 7: disk full and write errors.

A dump that hits ENOSPC or EROFS (a small tmpfs, filled or mounted read-only) or a folder that cannot be
created exits 2 with one line (no traceback) and leaves no bank marked complete; once space is freed the same
command completes a bank equal to an uninterrupted one. A checkpoint that cannot be written is a one-line
error, the previous checkpoint stays intact and no temp file is left; ``train_student`` exits 2.

The tmpfs tests need ``mount`` (root with CAP_SYS_ADMIN); elsewhere they skip, and the "parent is a file"
variant still runs."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import torch
import zarr

from pipeline.bank.reader import verify_bank
from pipeline.dump_logits import main
from pipeline.errors import UsageError
from pipeline.train_student import main as train_main
from rel_helpers import N_CHUNKS, assert_one_line_error, assert_same_bank, done_files, dump_args, train_args
from stage2_student_train.checkpoint import load, save_atomic


def _mount(where: Path, *opts: str) -> None:
    where.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", ",".join(("size=4m", *opts)), "tmpfs", str(where)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip() or r.returncode}")


@pytest.fixture
def small_fs(tmp_path: Path):
    """A 4 MB tmpfs (unmounted afterwards)."""
    where = tmp_path / "fs"
    _mount(where)
    yield where
    subprocess.run(["umount", "-l", str(where)], capture_output=True)


def _fill(fs: Path, leave: int) -> Path:
    """Fill ``fs`` with one file so that about ``leave`` bytes stay free."""
    st = os.statvfs(fs)
    free = st.f_bavail * st.f_frsize
    filler = fs / "filler"
    with open(filler, "wb") as f:
        f.write(b"\0" * max(0, free - leave))
    return filler


@pytest.mark.parametrize("leave", [8 * 1024, 160 * 1024], ids=["full-at-creation", "full-mid-dump"])
def test_dump_disk_full_then_free_space(leave: int, small_fs: Path, demo_root: Path, rel_reference: Path,
                                        capsys):
    out = small_fs / "bank.zarr"
    filler = _fill(small_fs, leave)
    capsys.readouterr()
    assert main(dump_args(demo_root, out)) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert_one_line_error(captured.err, "No space left on device", str(out), "rerun")
    if leave > 100 * 1024:  # room for the bank's metadata and a few chunks: it failed half way
        assert 0 < done_files(out) < N_CHUNKS
    if (out / "zarr.json").is_file():
        assert zarr.open_group(str(out), mode="r").attrs["complete"] is False
        assert verify_bank(out) != []
    filler.unlink()  # free space: the same command resumes and completes
    assert main(dump_args(demo_root, out)) == 0, capsys.readouterr().err[-2000:]
    assert capsys.readouterr().out.strip() == str(out)
    assert_same_bank(out, rel_reference)
    assert not list(small_fs.glob(".bank.zarr.creating-*")) and not list(out.rglob("*.partial"))


def test_dump_on_read_only_fs_then_writable(small_fs: Path, demo_root: Path, rel_reference: Path, capsys):
    out = small_fs / "bank.zarr"
    filler = _fill(small_fs, 160 * 1024)
    assert main(dump_args(demo_root, out)) == 2  # disk full half way: some chunks done, bank incomplete
    filler.unlink()
    done_before = sorted(p.name for p in (out / "done" / "c").iterdir())
    assert 0 < len(done_before) < N_CHUNKS
    r = subprocess.run(["mount", "-o", "remount,ro", str(small_fs)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    try:
        capsys.readouterr()
        assert main(dump_args(demo_root, out)) == 2
        assert_one_line_error(capsys.readouterr().err, "Read-only file system", str(out))
    finally:
        assert subprocess.run(["mount", "-o", "remount,rw", str(small_fs)]).returncode == 0
    assert zarr.open_group(str(out), mode="r").attrs["complete"] is False
    assert sorted(p.name for p in (out / "done" / "c").iterdir()) == done_before
    assert main(dump_args(demo_root, out)) == 0
    assert_same_bank(out, rel_reference)


def test_dump_out_under_a_regular_file(demo_root: Path, tmp_path: Path, capsys):
    """No mount needed: the bank's parent folder cannot be created because it is a file."""
    (tmp_path / "not_a_dir").write_text("x")
    out = tmp_path / "not_a_dir" / "bank.zarr"
    capsys.readouterr()
    assert main(dump_args(demo_root, out)) == 2
    assert_one_line_error(capsys.readouterr().err, str(out))
    assert (tmp_path / "not_a_dir").read_text() == "x"


def test_checkpoint_disk_full_keeps_previous(small_fs: Path):
    path = small_fs / "last.pt"
    save_atomic({"epoch": 0, "w": torch.arange(1000.0)}, path)
    _fill(small_fs, 16 * 1024)
    with pytest.raises(UsageError, match="cannot write checkpoint .*last.pt") as e:
        save_atomic({"epoch": 1, "w": torch.zeros(500_000)}, path)  # 2 MB: does not fit
    assert "\n" not in str(e.value)
    state = load(path)
    assert state["epoch"] == 0 and torch.equal(state["w"], torch.arange(1000.0))
    assert sorted(p.name for p in small_fs.iterdir()) == ["filler", "last.pt"]  # no temp file left


def test_train_student_disk_full_exits_2(small_fs: Path, demo_root: Path, demo_bank: Path, capsys):
    out = small_fs / "run"
    filler = _fill(small_fs, 24 * 1024)
    capsys.readouterr()
    assert train_main(train_args(demo_root, out, labels=[demo_bank])) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert_one_line_error(captured.err)
    assert "No space left" in captured.err or "cannot write checkpoint" in captured.err
    filler.unlink()
    assert train_main(train_args(demo_root, out, "--overwrite", labels=[demo_bank])) == 0
    assert load(out / "last.pt")["epoch"] == 0
