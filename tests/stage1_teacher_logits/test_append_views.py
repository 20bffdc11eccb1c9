"""Appending views (issue 25, point 4): ``dump_logits --append-views SRC --views V'`` copies SRC's V views and
computes the others; the result is bit for bit the direct V'-view dump (key, logits, boxes, embeddings, metrics),
SRC is left untouched, a SIGKILL mid-append resumes to the same bytes, and bad requests exit 2 in one line."""

from __future__ import annotations

import os
import shutil
import signal
from pathlib import Path

import numpy as np
import pytest
import zarr

from pipeline.dump_logits import main
from pipeline.labels import main as labels_main
from s1_helpers import kill_dump_after_chunks

ROWS = 16  # 300 demo samples -> 19 chunks


def _args(root: Path, out: Path, views: int, *extra: str) -> list[str]:
    return ["--teacher", "democnn_s", "--weights", "none", "--data", str(root), "--split", "train", "--preset",
            "demo_rrc", "--rows-per-chunk", str(ROWS), "--batch-size", "8", "--workers", "1", "--views", str(views),
            "--view-policy", "rrc+flip", "--view-seed", "3", "--features", "--out", str(out), *extra]


def _append(src: Path, out: Path, views: int, *extra: str) -> list[str]:
    return ["--append-views", str(src), "--views", str(views), "--workers", "1", "--out", str(out), *extra]


@pytest.fixture(scope="module")
def src_and_direct(demo_root: Path, tmp_path_factory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("append")
    assert main(_args(demo_root, d / "v2.zarr", 2)) == 0
    assert main(_args(demo_root, d / "v4.zarr", 4)) == 0
    return d / "v2.zarr", d / "v4.zarr"


def _features(path: Path) -> np.ndarray:
    return np.asarray(zarr.open_group(str(path), mode="r")["features"][:])


def test_append_equals_a_direct_dump_and_leaves_src_alone(src_and_direct, tmp_path: Path, file_mtimes,
                                                         assert_banks_equal, capsys):
    src, direct = src_and_direct
    before = file_mtimes(src)
    out = tmp_path / "a4.zarr"
    assert main(_append(src, out, 4)) == 0
    assert capsys.readouterr().out.strip() == str(out)
    assert_banks_equal(out, direct)  # every array byte for byte, key and metrics
    assert np.array_equal(_features(out), _features(direct), equal_nan=True)
    assert file_mtimes(src) == before
    # the same command again: a no-op printing the path; and the appended bank passes labels check
    assert main(_append(src, out, 4)) == 0 and capsys.readouterr().out.strip() == str(out)
    assert labels_main(["check", str(out), "--rows", "16"]) == 0


def test_sigkill_mid_append_then_rerun_equals_uninterrupted(src_and_direct, tmp_path: Path, assert_banks_equal):
    src, direct = src_and_direct
    out = tmp_path / "killed.zarr"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    rc = kill_dump_after_chunks(_append(src, out, 4), out, env)
    assert rc == -signal.SIGKILL, "the append finished before it could be killed"
    assert dict(zarr.open_group(str(out), mode="r").attrs)["complete"] is False
    assert main(_append(src, out, 4)) == 0
    assert_banks_equal(out, direct)
    assert np.array_equal(_features(out), _features(direct), equal_nan=True)


def test_append_of_an_augmenting_mixing_policy_equals_a_direct_dump(demo_root: Path, tmp_path: Path,
                                                                    assert_banks_equal):
    """Policies with stored parameters and partners append too: the new views' parameters, partners and the
    teacher's logits on the new mixed views are the direct dump's, byte for byte."""
    policy = ["--view-policy", "rrc+flip+randaug(2,9)+erasing(0.25)+mixup(0.8)+cutmix(1.0)", "--loader", "torch"]
    src, direct, out = tmp_path / "p2.zarr", tmp_path / "p3.zarr", tmp_path / "a3.zarr"
    assert main(_args(demo_root, src, 2, *policy)) == 0
    assert main(_args(demo_root, direct, 3, *policy)) == 0
    assert main(_append(src, out, 3)) == 0
    assert_banks_equal(out, direct)
    a, b = zarr.open_group(str(out), mode="r"), zarr.open_group(str(direct), mode="r")
    for name in ("view_params", "view_partner"):
        assert np.array_equal(np.asarray(a[name][:]), np.asarray(b[name][:]), equal_nan=True), name


def test_bad_appends_exit_2(src_and_direct, demo_bank: Path, tmp_path: Path, capsys):
    src, _ = src_and_direct
    tampered = tmp_path / "tampered.zarr"
    shutil.copytree(src, tampered)
    g = zarr.open_group(str(tampered), mode="r+")
    views = np.asarray(g["views"][0:ROWS])
    views[3, 1, 2] = views[3, 1, 2] / 2  # the crop height
    g["views"][0:ROWS] = views
    cases = [
        (_append(src, tmp_path / "a.zarr", 2), "give --views V' > 2"),
        (_append(src, src, 4), "is SRC itself"),
        (_append(demo_bank, tmp_path / "b.zarr", 4), "view policy is 'center'"),
        (_append(src, tmp_path / "c.zarr", 4, "--dtype", "float32"), "field 'dtype'"),
        (_append(tampered, tmp_path / "d.zarr", 4), "partners) of sample 3 are not the first views"),
        (_append(tmp_path / "missing.zarr", tmp_path / "e.zarr", 4), "not found"),
        (_append(src, tmp_path / "f.zarr", 4, "--format", "topk", "--topk", "3"), "drop --format topk"),
        (_append(src, tmp_path / "g.zarr", 4, "--format", "int8"), "drop --format int8"),
        (_append(src, tmp_path / "h.zarr", 4, "--teacher", "resnet8"), "--teacher resnet8 is not the bank's"),
    ]
    for argv, message in cases:
        rc = main(argv)
        last = capsys.readouterr().err.strip().splitlines()[-1]  # after the progress bar, when there is one
        assert rc == 2 and last.startswith("error: ") and message in last, (argv, last)
    assert not (tmp_path / "f.zarr").exists() and not (tmp_path / "g.zarr").exists()  # refused before writing
