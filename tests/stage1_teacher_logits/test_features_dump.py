"""Stored embeddings keep the logits' guarantees (issue 17): a dump missing chunks (killed) is resumed to the same
bytes, features and logits alike; a bank with embeddings is another bank than one without (its key differs)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import zarr

from pipeline.bank.reader import LabelBank
from pipeline.bank.writer import done_flags
from pipeline.dump_logits import main as dump


def _args(root: Path, out: Path, *extra: str) -> list[str]:
    return ["--teacher", "democnn_s", "--weights", "none", "--data", str(root), "--split", "train", "--preset",
            "demo", "--batch-size", "32", "--rows-per-chunk", "64", "--workers", "1", "--out", str(out), *extra]


def test_resumed_feature_dump_equals_uninterrupted(demo_root: Path, tmp_path: Path):
    ref = tmp_path / "ref.zarr"
    assert dump(_args(demo_root, ref, "--features")) == 0
    cut = tmp_path / "cut.zarr"
    shutil.copytree(ref, cut)
    g = zarr.open_group(str(cut), mode="r+")
    g.attrs["complete"] = False
    for j in (1, 3):  # as if killed before these chunks' done flags: their files gone
        g["done"][j] = False
        for name in ("features", "logits"):
            for f in (cut / name / "c" / str(j)).rglob("*"):
                if f.is_file():
                    f.unlink()
    assert done_flags(g).sum() == len(done_flags(g)) - 2
    assert dump(_args(demo_root, cut, "--features")) == 0
    a, b = LabelBank(ref), LabelBank(cut)
    assert b.complete
    assert np.array_equal(a.read_features(), b.read_features())
    assert np.array_equal(a.read_logits(), b.read_logits())


def test_embeddings_are_part_of_the_identity(demo_root: Path, tmp_path: Path, demo_bank: Path, capsys):
    """Dumping --features to a bank made without them is a different bank: refused without --overwrite (it would
    otherwise be reported complete, without embeddings)."""
    out = tmp_path / "b.zarr"
    assert dump(_args(demo_root, out)) == 0
    capsys.readouterr()
    assert dump(_args(demo_root, out, "--features")) == 2
    assert "holds a different bank" in capsys.readouterr().err
    assert LabelBank(out).feature_meta is None


def test_derived_banks_drop_embeddings(demo_root: Path, tmp_path: Path, caplog):
    """``labels compact`` / ``labels ensemble`` copy soft labels only: a derived bank must not claim embeddings it
    does not hold (attrs["features"] without the array would fail at stage 2's first read)."""
    from pipeline.bank.tools import compact_bank, ensemble_banks

    src = tmp_path / "f.zarr"
    assert dump(_args(demo_root, src, "--features")) == 0
    assert LabelBank(src).feature_meta is not None
    with caplog.at_level("WARNING"):
        outs = [compact_bank(str(src), str(tmp_path / "k.zarr"), fmt="int8", progress=False, scheduler="sync"),
                ensemble_banks([str(src)], str(tmp_path / "e.zarr"), progress=False, scheduler="sync")]
    assert sum("keeps soft labels only" in r.getMessage() for r in caplog.records) == 2
    for out in outs:
        b = LabelBank(out)
        assert b.complete and b.feature_meta is None
        assert "features" not in zarr.open_group(out, mode="r")
        assert np.isfinite(b.read_logits()).all()


def test_lost_embedding_chunk_is_refused_not_read_as_zeros(demo_root: Path, tmp_path: Path):
    """A chunk file of the stored embeddings lost after the dump (disk, copy, sync) must not read back as the fill
    value: stage 2 refuses the bank in one line naming the array, for float and int8 embeddings alike."""
    import pytest

    from pipeline.bank.resident import FeatureResident, load_residents
    from pipeline.errors import BankError

    for fmt, array, says in (("dense", "features", "damaged: array 'features' chunk file 0 (rows 0-"),
                             ("int8", "features_q", "damaged: array 'features_q' chunk file 0 is missing")):
        path = tmp_path / f"{fmt}.zarr"
        assert dump(_args(demo_root, path, "--features", "--format", fmt)) == 0
        assert array in LabelBank(path).feature_meta["arrays"]
        load_residents([LabelBank(path)], kind=FeatureResident)  # intact: loads
        victim = next(f for f in sorted((path / array / "c").rglob("*")) if f.is_file())
        victim.unlink()
        with pytest.raises(BankError) as e:
            load_residents([LabelBank(path)], kind=FeatureResident)
        assert says in str(e.value) and "\n" not in str(e.value), str(e.value)
