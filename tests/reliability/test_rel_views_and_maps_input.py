"""Faults found by a new user trying view policies, labels check, appended views and label maps (one test per
kind): a lost or corrupt chunk of a per-view array is refused before anything reads it as data (training,
labels check, --append-views), a cross-loader check of augmented views is refused instead of failing a correct
bank, and flags that would be ignored or are out of range exit 2 with one line."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from pipeline.dump_logits import main as dump_main
from pipeline.labels import main as labels_main
from pipeline.train_student import main as train_main
from rel_helpers import assert_one_line_error, train_args

POLICY = "rrc+flip+randaug(2,9)+erasing(0.25)+mixup(0.8)+cutmix(1.0)"


def _dump(root: Path, out: Path, *extra: str) -> Path:
    assert dump_main(["--teacher", "democnn_s", "--weights", "none", "--data", str(root), "--split", "train",
                      "--preset", "demo_rrc", "--batch-size", "32", "--rows-per-chunk", "64", "--views", "2",
                      "--out", str(out), *extra]) == 0
    return out


@pytest.fixture(scope="module")
def policy_bank(demo_root: Path, tmp_path_factory) -> Path:
    return _dump(demo_root, tmp_path_factory.mktemp("policy") / "p.zarr", "--view-policy", POLICY, "--loader", "dali")


def _without_chunk(src: Path, tmp_path: Path, array: str, how: str = "delete") -> Path:
    dst = tmp_path / f"{array}-{how}.zarr"
    shutil.copytree(src, dst)
    victim = sorted(p for p in (dst / array / "c").rglob("*") if p.is_file())[0]
    if how == "delete":
        victim.unlink()
    else:
        data = bytearray(victim.read_bytes())
        data[len(data) // 2] ^= 0x10
        victim.write_bytes(bytes(data))
    return dst


@pytest.mark.parametrize("array", ["view_partner", "view_params", "views"])
def test_training_refuses_a_lost_per_view_chunk(policy_bank: Path, demo_root: Path, tmp_path: Path, capsys, array):
    bank = _without_chunk(policy_bank, tmp_path, array)
    rc = train_main(train_args(demo_root, tmp_path / "run", "--replay-views", "--preset", "demo_rrc",
                               labels=[bank]))
    assert rc == 2
    assert_one_line_error(capsys.readouterr().err, "is damaged", f"array '{array}'", "labels verify")
    assert not (tmp_path / "run" / "last.pt").exists()


@pytest.mark.parametrize("array,how", [("logits", "delete"), ("view_params", "delete"), ("view_params", "flip"),
                                       ("view_partner", "flip")])
def test_labels_check_calls_a_damaged_bank_damaged(policy_bank: Path, tmp_path: Path, capsys, array, how):
    rc = labels_main(["check", str(_without_chunk(policy_bank, tmp_path, array, how)), "--rows", "8"])
    assert rc == 2
    assert_one_line_error(capsys.readouterr().err, "is damaged", f"'{array}'", "labels verify")


def test_append_refuses_a_damaged_source(demo_root: Path, tmp_path: Path, capsys):
    src = _without_chunk(_dump(demo_root, tmp_path / "v2.zarr", "--view-policy", "rrc+flip"), tmp_path, "logits")
    rc = dump_main(["--append-views", str(src), "--views", "3", "--out", str(tmp_path / "v3.zarr")])
    assert rc == 2
    assert_one_line_error(capsys.readouterr().err, "is damaged", "'logits'")


def test_augmented_views_are_checked_with_their_own_loader(policy_bank: Path, capsys, caplog):
    assert labels_main(["check", str(policy_bank), "--rows", "8"]) == 0
    capsys.readouterr()
    caplog.clear()
    assert labels_main(["check", str(policy_bank), "--rows", "8", "--loader", "torch"]) == 2
    assert_one_line_error(capsys.readouterr().err, "dumped with the dali loader", "--loader auto")
    assert "allows rtol" not in caplog.text  # no "checking with a looser tolerance" before the refusal


@pytest.mark.parametrize("extra,words", [
    (["--cutmix", "nan"], ["--cutmix nan"]),
    (["--mix-policy", "mixup(0.2)"], ["--mix-policy", "add --mix-labels blend"]),
    (["--mix-policy", "mixup(0.2)", "--cutmix", "1"], ["drop --mix-policy"]),  # never "add blend" (refused next)
    (["--mix-labels", "blend", "--mix-policy", "rrc+flip"], ["--mix-policy 'rrc+flip' must be mixup(A)"]),
    (["--mix-labels", "blend", "--mix-policy", ""], ["--mix-policy '' must be mixup(A)"]),
    (["--view-order", "hash"], ["--view-order hash", "add --replay-views"]),
])
def test_ignored_or_bad_stage2_flags_exit_2(demo_root: Path, demo_bank: Path, tmp_path: Path, capsys, extra, words):
    rc = train_main(train_args(demo_root, tmp_path / "run", *extra, labels=[demo_bank]))
    assert rc == 2
    assert_one_line_error(capsys.readouterr().err, *words)


def test_bad_seed_and_missing_cuda_exit_2(demo_bank: Path, capsys):
    for argv, words in ((["check", str(demo_bank), "--seed", "-1"], ["--seed -1"]),
                        (["map-check", str(demo_bank), "--seed", "-1"], ["--seed -1"])):
        assert labels_main(argv) == 2
        assert_one_line_error(capsys.readouterr().err, *words)


def test_blend_on_a_label_map_is_refused_before_training(demo_root: Path, tmp_path: Path, capsys):
    bank = tmp_path / "map.zarr"
    assert dump_main(["--teacher", "democnn_s", "--weights", "none", "--data", str(demo_root), "--split", "train",
                      "--preset", "demo", "--format", "labelmap", "--out", str(bank)]) == 0
    rc = train_main(train_args(demo_root, tmp_path / "run", "--preset", "demo_rrc", "--mix-labels", "blend",
                               labels=[bank]))
    assert rc == 2
    assert_one_line_error(capsys.readouterr().err, "label-map bank mixes region-exact with --cutmix")
    assert not (tmp_path / "run" / "config.yaml").exists()
