"""Fault 3: a flipped byte, a truncated or a deleted chunk file in a bank. ``labels verify`` names the array and
the chunk and exits 1; stage 2 refuses to start (exit 2, one line naming the array) and trains nothing.

(More verify cases: tests/pipeline/test_labels_cli.py; non-finite rows: tests/stage2_student_train/
test_s2_bank_validation.py.)"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from pipeline.labels import main as labels_main
from pipeline.train_student import main as train_main
from rel_helpers import assert_one_line_error, train_args

# demo_bank: 300 rows in chunks of 64 -> row chunks 0..4; (array, chunk file, chunk key as verify prints it)
CASES = [
    ("logits", "c/2/0/0/0", "2/0/0/0", "flip"),
    ("logits", "c/2/0/0/0", "2/0/0/0", "truncate"),
    ("logits", "c/4/0/0/0", "4/0/0/0", "empty"),
    ("labels", "c/3", "3", "flip"),
    ("labels", "c/3", "3", "truncate"),
    ("labels", "c/1", "1", "delete"),
    ("skipped", "c/1", "1", "flip"),
    ("skipped", "c/0", "0", "truncate"),
    ("views", "c/4/0/0", "4/0/0", "flip"),
    ("done", "c/2", "2", "flip"),
    ("done", "c/2", "2", "delete"),
]


def _damage(f: Path, how: str) -> None:
    data = bytearray(f.read_bytes())
    if how == "flip":
        data[len(data) // 2] ^= 0x10
        f.write_bytes(bytes(data))
    elif how == "truncate":
        f.write_bytes(bytes(data[: len(data) // 2]))
    elif how == "empty":
        f.write_bytes(b"")
    else:
        f.unlink()


@pytest.mark.parametrize(("array", "chunk_file", "key", "how"), CASES,
                         ids=[f"{a}-{k}-{h}" for a, _, k, h in CASES])
def test_damaged_chunk_verify_and_stage2(array, chunk_file, key, how, demo_bank: Path, demo_root: Path,
                                         tmp_path: Path, capsys):
    bank = tmp_path / "bank.zarr"
    shutil.copytree(demo_bank, bank)
    _damage(bank / array / chunk_file, how)
    capsys.readouterr()

    assert labels_main(["verify", str(bank)]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    if array == "done" and how == "delete":  # a missing flag reads back as "not done"
        assert f"chunks not done: [{key}]" in err
    else:
        assert f"array '{array}' chunk {key} is" in err, err
        assert ("missing" if how == "delete" else "corrupt") in err

    out = tmp_path / "run"
    assert train_main(train_args(demo_root, out, labels=[bank])) == 2
    msg = assert_one_line_error(capsys.readouterr().err, "damaged", f"'{array}'", str(bank))
    assert "verify" in msg
    assert not (out / "last.pt").exists() and not (out / "metrics.jsonl").exists()


def test_undamaged_copy_trains(demo_bank: Path, demo_root: Path, tmp_path: Path):
    """Control: the refusals above come from the damage, not from copying the bank."""
    bank = tmp_path / "bank.zarr"
    shutil.copytree(demo_bank, bank)
    assert labels_main(["verify", str(bank)]) == 0
    assert train_main(train_args(demo_root, tmp_path / "run", labels=[bank])) == 0
