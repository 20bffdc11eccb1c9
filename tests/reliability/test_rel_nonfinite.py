"""Fault 9: non-finite teacher logits are caught at dump time.

A teacher whose logits are NaN (a NaN in the classifier bias) or overflow the bank's float16 (finite in float32,
|x| > 65504: stored they would be inf) stops the dump with exit 2 and one line naming the sample; no chunk holding
such a sample is marked done and the bank is not complete. ``--skip-corrupt`` does not hide it (it is about
undecodable files). The overflowing teacher dumps fine with ``--dtype float32``.

The student side (a non-finite loss stops the run with exit 1 and keeps the last good checkpoint) is
tests/stage2_student_train/test_s2_methods.py::test_non_finite_loss_stops_and_keeps_last_good_checkpoint and
::test_huge_lr_diverges_with_exit_code_1."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from pipeline.bank.reader import LabelBank, verify_bank
from pipeline.data import build_manifest
from pipeline.dump_logits import main
from pipeline.models import create_model
from rel_helpers import assert_one_line_error


def _teacher(tmp_path: Path, name: str, edit) -> Path:
    torch.manual_seed(0)
    m = create_model("democnn_s", 10, "none")
    with torch.no_grad():
        edit(m)
    path = tmp_path / f"{name}.pt"
    torch.save({"model": m.state_dict()}, path)
    return path


def _args(data: Path, weights: Path, out: Path, *extra: str) -> list[str]:
    return ["--teacher", "democnn_s", "--weights", str(weights), "--data", str(data), "--split", "train",
            "--preset", "demo", "--rows-per-chunk", "16", "--batch-size", "8", "--workers", "1", "--out", str(out),
            *extra]


def _nan_bias(m) -> None:
    m.fc.bias[3] = float("nan")


def _huge_bias(m) -> None:
    m.fc.bias[7] = 1e5  # finite in float32, inf in float16


@pytest.mark.parametrize(("edit", "words"), [
    (_nan_bias, ["non-finite logits", "sample 0"]),
    (_huge_bias, ["sample 0", "float16", "--dtype float32"]),
], ids=["nan", "fp16-overflow"])
@pytest.mark.parametrize("skip_corrupt", [False, True], ids=["plain", "skip-corrupt"])
def test_non_finite_teacher_stops_the_dump(edit, words, skip_corrupt, demo_root: Path, tmp_path: Path, capsys):
    weights = _teacher(tmp_path, edit.__name__, edit)
    out = tmp_path / "bank.zarr"
    first = build_manifest(demo_root, "train").files[0]
    capsys.readouterr()
    assert main(_args(demo_root, weights, out, *(["--skip-corrupt"] if skip_corrupt else []))) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert_one_line_error(captured.err, *words, first, "nothing was marked done")
    g = zarr.open_group(str(out), mode="r")
    assert not np.asarray(g["done"][:]).any() and dict(g.attrs)["complete"] is False
    assert verify_bank(out) != []


def test_fp16_overflow_teacher_dumps_as_float32(demo_root: Path, tmp_path: Path):
    weights = _teacher(tmp_path, "huge", _huge_bias)
    out = tmp_path / "bank32.zarr"
    assert main(_args(demo_root, weights, out, "--dtype", "float32")) == 0
    logits = LabelBank(out).read_logits()
    assert logits.dtype == np.float32 and np.isfinite(logits).all() and np.abs(logits).max() > 65504
    assert verify_bank(out) == []
    # stage 2 keeps the bank's precision (issue 14, point 9): the gathered rows are the stored float32 values, and
    # a student trains from them with finite losses (before: the bank was loaded as float16, logits became inf
    # and the first step stopped the run)
    from pipeline.train_student import main as train
    from stage2_student_train.label_sources import BankLabelSource

    rows = BankLabelSource([LabelBank(out)])({"index": torch.arange(5), "epoch": 0})["teacher_logits"]
    assert torch.equal(rows, torch.from_numpy(logits[:5, :, 0])) and rows.abs().max() > 65504
    run = tmp_path / "run"
    assert train(["--method", "kd", "--student", "democnn_s", "--labels", str(out), "--data", str(demo_root),
                  "--batch-size", "32", "--epochs", "1", "--workers", "1", "--output-dir", str(run),
                  "max_steps_per_epoch=2"]) == 0
    rows = [__import__("json").loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert np.isfinite(rows[0]["train_loss"])


def test_overflow_in_a_later_chunk_keeps_earlier_chunks_only(demo_root: Path, tmp_path: Path, capsys):
    """A teacher whose logit 0 is one feature, scaled so that only samples after the first 32 overflow float16:
    the dump stops at the first of them; the chunks before its chunk are done (a rerun with a fixed teacher is a
    new bank: the key holds the weights' sha256), its own chunk and the later ones are not."""
    from pipeline.data.dali import build_pipeline, iterate
    from pipeline.data.presets import get_preset

    torch.manual_seed(0)
    m = create_model("democnn_s", 10, "none").eval()
    fc, m.fc = m.fc, torch.nn.Identity()
    manifest = build_manifest(demo_root, "train")
    order = np.arange(len(manifest))
    with torch.no_grad():
        feats = np.concatenate([m(b.images).numpy() for b in iterate(
            build_pipeline(manifest, order, get_preset("demo"), "eval", 50, 1), len(order), 50)])
    k = int(np.argmax(feats[32:].max(0) / np.maximum(feats[:32].max(0), 1e-6)))  # the feature that stands out most
    t = float(feats[:32, k].max()) * 1.02
    assert t > 0 and (feats[32:, k] > t * 1.02).any(), "no sample after the first 32 stands out"
    scale = 65600.0 / t  # feature * scale > 65520 (-> inf in float16) only for samples well above t
    m.fc = fc

    def _one_feature(model) -> None:
        model.fc.weight.zero_()
        model.fc.bias.zero_()
        model.fc.weight[0, k] = scale

    weights = _teacher(tmp_path, "scaled", _one_feature)
    out = tmp_path / "bank.zarr"
    capsys.readouterr()
    assert main(_args(demo_root, weights, out)) == 2
    msg = assert_one_line_error(capsys.readouterr().err, "float16", "--dtype float32")
    first_bad = int(msg.split("sample ")[1].split()[0])
    assert manifest.files[first_bad] in msg
    assert feats[first_bad, k] * scale > 65000 and first_bad >= 32
    assert (feats[:first_bad, k] * scale < 65600).all()  # it is the first one in dump order
    done = np.asarray(zarr.open_group(str(out), mode="r")["done"][:])
    j = first_bad // 16
    assert j >= 2 and done[:j].all() and not done[j:].any()
