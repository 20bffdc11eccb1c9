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
    ("logits", "c/3/0/0/0", "3/0/0/0", "delete"),
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
    assert f"labels verify {bank}" in msg and "remove the bank and dump it again" in msg
    if how == "delete" and array in ("logits", "labels"):  # the cause named: a lost file, not bad values
        assert "chunk file" in msg and "is missing" in msg and "non-finite" not in msg, msg
    assert not (out / "last.pt").exists() and not (out / "metrics.jsonl").exists()


def test_undamaged_copy_trains(demo_bank: Path, demo_root: Path, tmp_path: Path):
    """Control: the refusals above come from the damage, not from copying the bank."""
    bank = tmp_path / "bank.zarr"
    shutil.copytree(demo_bank, bank)
    assert labels_main(["verify", str(bank)]) == 0
    assert train_main(train_args(demo_root, tmp_path / "run", labels=[bank])) == 0


def test_dump_onto_a_damaged_complete_bank(demo_bank: Path, demo_root: Path, tmp_path: Path, capsys):
    """A dump finds a complete bank of its key with a lost chunk file: it refuses to reuse it (exit 2, naming the
    array and --overwrite) and, with --overwrite, dumps it again whole."""
    from pipeline.dump_logits import main as dump_main

    bank = tmp_path / "bank.zarr"
    shutil.copytree(demo_bank, bank)
    (bank / "logits" / "c" / "3" / "0" / "0" / "0").unlink()
    args = ["--teacher", "democnn_s", "--weights", "none", "--data", str(demo_root), "--split", "train",
            "--preset", "demo", "--batch-size", "32", "--rows-per-chunk", "64", "--out", str(bank)]
    capsys.readouterr()
    assert dump_main(args) == 2
    assert_one_line_error(capsys.readouterr().err, "complete but damaged", "'logits'", "3/0/0/0", "--overwrite")
    assert labels_main(["verify", str(bank)]) == 1  # refused, not repaired behind the user's back
    assert dump_main([*args, "--overwrite"]) == 0
    assert labels_main(["verify", str(bank)]) == 0


@pytest.mark.parametrize("what", ["missing", "empty folder", "other zarr group"])
def test_verify_of_a_path_that_holds_no_bank(what, tmp_path: Path, capsys):
    """verify on a path that is not a bank is a usage error (exit 2), never "damaged: remove it"."""
    import zarr

    path = tmp_path / "x.zarr"
    if what == "empty folder":
        path.mkdir()
    elif what == "other zarr group":
        zarr.open_group(str(path), mode="w").attrs["note"] = "not a bank"
    assert labels_main(["verify", str(path)]) == 2
    msg = assert_one_line_error(capsys.readouterr().err, str(path))
    assert ("not found" if what == "missing" else "is not a label bank") in msg and "remove" not in msg
    assert path.exists() == (what != "missing")
