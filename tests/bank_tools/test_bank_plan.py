"""``python -m pipeline.labels plan`` (issue 22, point 5): its in-memory sizes are those of real resident banks,
its measured disk bytes those of real compact banks' payload, its fidelity that of ``labels compact``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.bank.reader import LabelBank
from pipeline.bank.resident import load_residents
from pipeline.labels import main as labels


def _payload_bytes(path: Path, names: list[str]) -> int:
    return sum(f.stat().st_size for n in names for f in (path / n).rglob("*") if f.is_file() and f.name != "zarr.json")


@pytest.fixture(scope="module")
def one_chunk_bank(demo_root: Path, tmp_path_factory) -> Path:
    """The demo teacher's bank in one row chunk (the plan measures compression on whole arrays, as a bank's
    4096-row chunks are at scale; the demo bank's 64-row chunks would add per-chunk headers)."""
    from pipeline.dump_logits import main as dump

    out = tmp_path_factory.mktemp("plan") / "dense.zarr"
    assert dump(["--teacher", "democnn_s", "--weights", "none", "--data", str(demo_root), "--split", "train",
                 "--preset", "demo", "--batch-size", "64", "--rows-per-chunk", "512", "--out", str(out)]) == 0
    return out


def test_plan_matches_real_banks(one_chunk_bank: Path, tmp_path: Path, capsys):
    demo_bank = one_chunk_bank
    made = {"int8": ["--format", "int8"], "top-k 5": ["--topk", "5"], "sampled 5+5": ["--topk", "5", "--samples", "5"]}
    paths = {}
    for label, flags in made.items():
        paths[label] = tmp_path / f"{label.replace(' ', '')}.zarr"
        assert labels(["compact", str(demo_bank), "-o", str(paths[label]), "--no-progress", *flags]) == 0
    capsys.readouterr()
    assert labels(["plan", "--images", "300", "--classes", "10", "--bank", str(demo_bank), "--rows", "300",
                   "--budget", "5kB", "--json"]) == 0
    rows = {r["format"]: r for r in json.loads(capsys.readouterr().out)}
    assert set(rows) == {"dense fp16", "int8", "top-k 5", "sampled 5+5"}  # K >= C candidates are left out
    for label, path in paths.items():
        bank = LabelBank(path)
        (res,) = load_residents([bank])
        assert rows[label]["resident_bytes"] == res.nbytes, label  # exact
        stored = _payload_bytes(path, bank.payload_arrays)
        assert rows[label]["disk_measured"] and rows[label]["disk_bytes"] == pytest.approx(stored, rel=0.15), label
        # the fidelity the plan measures on all 300 rows is what labels compact measured on its own sample
        want, got = bank.attrs["fidelity"], rows[label]["fidelity"]
        assert got["top1_agreement"] == pytest.approx(want["top1_agreement"], abs=0.05)
        assert got["tv_t4"] == pytest.approx(want["tv_t4"], rel=0.3, abs=1e-3)
    (dense,) = load_residents([LabelBank(demo_bank)])
    assert rows["dense fp16"]["resident_bytes"] == dense.nbytes
    # 10 classes: dense 20 B per vector, int8 12 B, top-k 5 40 B (6 kept + the tail statistics): a 5 kB budget
    assert [rows[f]["fits"] for f in ("dense fp16", "int8", "top-k 5")] == [False, True, False]
    # a sample bank of another class count would scale its bytes to the wrong C: refused, naming both
    assert labels(["plan", "--images", "300", "--classes", "1000", "--bank", str(demo_bank)]) == 2
    assert "--classes 1000 but --bank" in capsys.readouterr().err


def test_plan_without_a_bank_and_bad_input(capsys):
    assert labels(["plan", "--images", "1281167", "--classes", "1000", "--views", "16", "--budget", "20GB"]) == 0
    out = capsys.readouterr().out
    assert "20,498,672 vectors" in out and "top-k 10" in out and "<= " in out
    line = next(x for x in out.splitlines() if x.startswith("dense fp16"))
    assert "41 GB" in line and line.split(" | ")[4] == "no"  # 20.5M vectors x 2000 B
    assert labels(["plan", "--images", "10", "--classes", "10", "--budget", "lots"]) == 2
    assert "--budget 'lots' is not a size" in capsys.readouterr().err
