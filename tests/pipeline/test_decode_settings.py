"""Loader settings of issue 24: stage 1's loader threads default to the cores available per local rank (an
explicit -j wins), and ``--hw-decoder-load`` reaches DALI, checked to [0, 1] in one line."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import zarr

from pipeline.distributed import cores_per_local_rank
from pipeline.dump_logits import main as dump
from pipeline.train_student import main as train


def test_cores_per_local_rank(monkeypatch):
    cores = len(os.sched_getaffinity(0))
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert cores_per_local_rank() == cores
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert cores_per_local_rank() == max(1, cores // 2)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(4 * cores))
    assert cores_per_local_rank() == 1


def test_dump_threads_default_and_hw_decoder_load_are_recorded(image_tree: Path, tmp_path: Path, capsys):
    """Without -j the bank's config records the resolved thread count; -j 1 is kept; --hw-decoder-load is
    passed to the decoder (DALI's CPU decoder accepts and ignores it) and recorded."""
    common = ["--teacher", "democnn_s", "--weights", "none", "--data", str(image_tree), "--preset", "tiny",
              "--batch-size", "8"]
    assert dump([*common, "--hw-decoder-load", "0.3", "--out", str(tmp_path / "a.zarr")]) == 0
    cfg = dict(zarr.open_group(str(tmp_path / "a.zarr"), mode="r").attrs)["config"]
    assert cfg["workers"] == cores_per_local_rank() and cfg["hw_decoder_load"] == 0.3
    assert dump([*common, "-j", "1", "--out", str(tmp_path / "b.zarr")]) == 0
    cfg = dict(zarr.open_group(str(tmp_path / "b.zarr"), mode="r").attrs)["config"]
    assert cfg["workers"] == 1 and cfg["hw_decoder_load"] == 0.65


@pytest.mark.parametrize("value", ["1.5", "-0.1", "nan"])
def test_hw_decoder_load_out_of_range_is_one_line(value: str, tmp_path: Path, capsys):
    assert dump(["--teacher", "democnn_s", "--data", str(tmp_path), "--hw-decoder-load", value]) == 2
    err = capsys.readouterr().err
    assert "--hw-decoder-load" in err and "[0, 1]" in err and err.count("\n") == 1
    assert train(["--method", "ce", "--student", "democnn_s", "--data", str(tmp_path), "--hw-decoder-load", value,
                  "--output-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "hw_decoder_load" in err and "[0, 1]" in err and err.count("\n") == 1
