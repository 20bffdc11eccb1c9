"""``python -m pipeline.labels info|verify`` (issue 2, point 8): summary figures, and exit 1 with the array and
chunk named on a flipped byte, a deleted chunk file or an incomplete bank."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import zarr

from pipeline.labels import main

REPO = Path(__file__).resolve().parents[2]


def _disk_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


@pytest.fixture
def bank_copy(demo_bank: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "copy.zarr"
    shutil.copytree(demo_bank, dst)
    return dst


def test_info_text(demo_bank: Path, capsys):
    assert main(["info", str(demo_bank)]) == 0
    out = capsys.readouterr().out
    attrs = dict(zarr.open_group(str(demo_bank), mode="r").attrs)
    m = attrs["metrics"]["0:democnn_s"]
    assert "N=300 T=1 V=1 C=10" in out and "rows/chunk 64" in out
    assert "democnn_s" in out and "weights none" in out
    assert f"top1 {m['top1']:.2f}" in out and f"nll {m['nll']:.4f}" in out and f"ece {m['ece']:.4f}" in out
    size = _disk_bytes(demo_bank)
    assert f"{round(size / 300, 2)} B/sample" in out
    assert "complete True" in out and "float16" in out


def test_info_json(demo_bank: Path, capsys):
    assert main(["info", str(demo_bank), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    size = _disk_bytes(demo_bank)
    assert info["shape"] == {"N": 300, "T": 1, "V": 1, "C": 10}
    assert info["bytes_on_disk"] == size and info["bytes_per_sample"] == round(size / 300, 2)
    assert info["teachers"][0]["arch"] == "democnn_s" and info["complete"] is True
    assert set(info["metrics"]["0:democnn_s"]) >= {"top1", "top5", "nll", "ece"}
    # compressed fp16 logits of 10 classes: well under 2 bytes x 10 classes + overheads per sample, above 0
    assert 5 < info["bytes_per_sample"] < 200


def test_verify_ok(bank_copy: Path, capsys):
    assert main(["verify", str(bank_copy)]) == 0
    assert "OK" in capsys.readouterr().out


def test_verify_flipped_byte(bank_copy: Path, capsys):
    chunk = bank_copy / "logits" / "c" / "2" / "0" / "0" / "0"
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0x01
    chunk.write_bytes(bytes(data))
    assert main(["verify", str(bank_copy)]) == 1
    err = capsys.readouterr().err
    assert "'logits'" in err and "chunk 2/0/0/0" in err and "corrupt" in err


def test_verify_flipped_byte_in_labels_checksum(bank_copy: Path, capsys):
    chunk = bank_copy / "labels" / "c" / "4"
    data = bytearray(chunk.read_bytes())
    data[-1] ^= 0x80  # the stored CRC32C itself
    chunk.write_bytes(bytes(data))
    assert main(["verify", str(bank_copy)]) == 1
    err = capsys.readouterr().err
    assert "'labels'" in err and "chunk 4" in err


def test_verify_deleted_chunk(bank_copy: Path, capsys):
    os.remove(bank_copy / "logits" / "c" / "3" / "0" / "0" / "0")
    assert main(["verify", str(bank_copy)]) == 1
    err = capsys.readouterr().err
    assert "'logits'" in err and "chunk 3/0/0/0" in err and "missing" in err
    assert f"fix: remove {bank_copy} and rerun the dump" in err  # a complete bank is never rewritten by a dump


def test_verify_incomplete(bank_copy: Path, capsys):
    zarr.open_group(str(bank_copy), mode="r+").attrs["complete"] = False
    assert main(["verify", str(bank_copy)]) == 1
    assert "not marked complete" in capsys.readouterr().err


def test_verify_chunk_not_done(bank_copy: Path, capsys):
    g = zarr.open_group(str(bank_copy), mode="r+")
    g["done"][1] = False
    assert main(["verify", str(bank_copy)]) == 1
    assert "chunks not done: [1]" in capsys.readouterr().err


def test_verify_subprocess_exit_code(bank_copy: Path):
    os.remove(bank_copy / "labels" / "c" / "0")
    r = subprocess.run([sys.executable, "-m", "pipeline.labels", "verify", str(bank_copy)], cwd=REPO,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "'labels' chunk 0 is missing" in r.stderr


def test_info_names_missing_chunk_files(bank_copy: Path, capsys):
    """A complete bank with a lost chunk file: ``info`` (which decodes nothing) still says it is damaged, naming the
    array and chunk, and points to ``verify``; a healthy bank has no such line."""
    assert main(["info", str(bank_copy)]) == 0
    assert "DAMAGED" not in capsys.readouterr().out
    os.remove(bank_copy / "logits" / "c" / "3" / "0" / "0" / "0")
    os.remove(bank_copy / "labels" / "c" / "1")
    assert main(["info", str(bank_copy)]) == 0
    out = capsys.readouterr().out
    assert "DAMAGED     array 'logits' misses 1 chunk file(s) (3/0/0/0)" in out
    assert "complete True (but chunk files are missing" in out  # the flag alone would read as healthy
    assert "array 'labels' misses 1 chunk file(s) (1)" in out and f"labels verify {bank_copy}" in out
    assert main(["info", str(bank_copy), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["missing_chunks"] == {"logits": ["3/0/0/0"], "labels": ["1"]}
