"""Offline embedding-level distillation (issue 17): stage 1 stores each teacher's pooled penultimate embedding,
stage 2 puts ``student_features`` and ``teacher_features`` into the batch of the methods that read them, the
losses from the bank equal the losses with a live teacher, and a CRD run killed and resumed is bit-identical."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import kd_losses
from pipeline.bank.reader import LabelBank, verify_bank
from pipeline.data import build_manifest
from pipeline.data.dali import build_pipeline, iterate
from pipeline.data.presets import get_preset
from pipeline.dump_logits import main as dump
from pipeline.models import create_model
from pipeline.models.features import FeatureTap, embedding_dim
from pipeline.models.teachers import parse_teachers
from s2_helpers import assert_same_state, demo_args, kill_once_started, read_metrics, subprocess_env
from stage2_student_train.config import TrainConfig
from stage2_student_train.label_sources import BankLabelSource, LiveTeacherLabelSource
from stage2_student_train.loop import make_batch
from stage2_student_train.run import _batches, build_criterion

EMBEDDING = ("rkd", "pkt", "sp", "crd", "fitnet")


def _dump(root: Path, out: Path, *extra: str) -> None:
    assert dump(["--data", str(root), "--split", "train", "--preset", "demo", "--batch-size", "32",
                 "--rows-per-chunk", "64", "--workers", "1", "--features", "--out", str(out), *extra]) == 0


@pytest.fixture(scope="module")
def feature_bank(demo_root, teacher_ckpt, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("fbank") / "f.zarr"
    _dump(demo_root, out, "--teacher", "democnn_s", "--weights", str(teacher_ckpt))
    return out


def test_stored_embeddings_are_the_classifier_inputs(demo_root, feature_bank, teacher_ckpt):
    """Rows of ``features`` [N, T, V, D] are the teacher's classifier input on the same eval batches (fp16)."""
    bank = LabelBank(feature_bank)
    assert bank.feature_meta == {"format": "float16", "dims": [32], "arrays": ["features"]}
    assert verify_bank(feature_bank) == []
    teacher = create_model("democnn_s", 10, str(teacher_ckpt)).eval()
    tap = FeatureTap(teacher)
    m = build_manifest(demo_root, "train")
    (b,) = iterate(build_pipeline(m, np.arange(40, 72), get_preset("demo"), "eval", 32, 1), 32, 32)
    with torch.no_grad():
        teacher(b.images)
    want = tap.pop().numpy()
    got = bank.read_features(40, 72)[:, 0, 0]
    np.testing.assert_allclose(got, want, rtol=2.0 ** -10, atol=1e-4)
    assert np.array_equal(got, want.astype(np.float16).astype(np.float32))


def test_two_teachers_different_widths_views_and_int8(demo_root, tmp_path):
    """democnn_s (D=32) and resnet8 (D=64) on 2 rrc views in an int8 bank: D padded to 64 (zeros past 32 for the
    first teacher), views stored per view, int8 within its rounding bound of the float16 bank's values."""
    common = ["--teacher", "democnn_s", "--weights", "none", "--teacher", "resnet8", "--weights", "none",
              "--views", "2", "--view-policy", "rrc+flip"]
    _dump(demo_root, tmp_path / "f16.zarr", *common)
    _dump(demo_root, tmp_path / "i8.zarr", *common, "--format", "int8")
    a, q = LabelBank(tmp_path / "f16.zarr"), LabelBank(tmp_path / "i8.zarr")
    assert a.feature_meta["dims"] == [32, 64] and q.feature_meta["format"] == "int8"
    fa, fq = a.read_features(), q.read_features()
    assert fa.shape == fq.shape == (300, 2, 2, 64)
    assert (fa[:, 0, :, 32:] == 0).all() and not (fa[:, 1, :, 32:] == 0).all()
    assert not np.array_equal(fa[:, :, 0], fa[:, :, 1])  # two views, two embeddings
    bound = np.abs(fa).max(axis=-1, keepdims=True) / 127 / 2 * 1.01 + 2e-3
    assert (np.abs(fa - fq) <= bound).all()
    assert verify_bank(tmp_path / "i8.zarr") == []


def test_only_methods_that_read_embeddings_get_them(feature_bank):
    idx = torch.tensor([0, 5, 299])
    plain = BankLabelSource([LabelBank(feature_bank)])({"index": idx, "epoch": 0})
    feat = BankLabelSource([LabelBank(feature_bank)], features=True)({"index": idx, "epoch": 0})
    assert set(plain) == {"teacher_logits"} and set(feat) == {"teacher_logits", "teacher_features"}
    assert feat["teacher_features"].shape == (3, 1, 32) and feat["teacher_features"].dtype == torch.float32
    assert [kd_losses.needs_features(m) for m in EMBEDDING] == [True] * 5 and not kd_losses.needs_features("kd")


def test_bank_without_embeddings_is_refused_in_one_line(train, tmp_path, demo_bank, capsys):
    assert train(tmp_path / "r", "--method", "rkd", labels=(demo_bank,)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "dump it again with --features" in err[0]


@pytest.mark.parametrize("method", EMBEDDING)
def test_bank_equals_live_teacher_per_batch(demo_root, feature_bank, teacher_ckpt, method):
    """Eval preprocessing for both: stored embeddings equal the live teacher's up to fp16 rounding, and so does
    every per-batch loss (the learned heads and CRD's memories built identically for both)."""
    manifest = build_manifest(demo_root, "train")
    cfg = TrainConfig(method=method, batch_size=32, workers=1, data=str(demo_root), preset="demo",
                      loss={"nce_k": 64} if method == "crd" else {})
    targets = torch.from_numpy(manifest.labels.astype(np.int64))
    bank = BankLabelSource([LabelBank(feature_bank)], features=True)
    live = LiveTeacherLabelSource(parse_teachers(["democnn_s"], [str(teacher_ckpt)]), 10, "cpu", crop=32,
                                  features=True)
    assert bank.feature_dim == live.feature_dim == 32
    torch.manual_seed(0)
    student = create_model("democnn_s", 10)
    tap = FeatureTap(student)
    dims = {"num_samples": len(manifest), "student_dim": embedding_dim(student, 32), "teacher_dim": 32,
            "num_teachers": 1}
    torch.manual_seed(1)
    crit_b = build_criterion(cfg, 10, **dims)
    torch.manual_seed(1)
    crit_l = build_criterion(cfg, 10, **dims)
    order = np.random.default_rng(0).permutation(len(manifest))[:64]
    for b in _batches(manifest, order, get_preset("demo"), "eval", cfg, 0):
        batch = make_batch(b, targets, "cpu", 0, False)
        eb, el = bank(batch), live(batch)
        torch.testing.assert_close(eb["teacher_features"], el["teacher_features"], rtol=2.0 ** -10, atol=1e-4)
        s = student(batch["image"])
        batch["student_features"] = tap.pop()
        torch.manual_seed(2)  # CRD draws its negatives from the global generator
        lb = crit_b(s, {**batch, **eb})
        torch.manual_seed(2)
        ll = crit_l(s, {**batch, **el})
        for k in lb:
            torch.testing.assert_close(lb[k], ll[k], rtol=2e-3, atol=1e-5)
        assert lb[method].item() >= 0


@pytest.mark.parametrize("method", EMBEDDING)
def test_embedding_methods_train_end_to_end(train, tmp_path, feature_bank, method):
    """Through the one loop: the method's part is logged; learned heads (fitnet, crd) are in the checkpoint."""
    out = tmp_path / method
    extra = ["loss.nce_k=64"] if method == "crd" else []
    assert train(out, "--method", method, "max_steps_per_epoch=3", *extra, labels=(feature_bank,)) == 0
    row = read_metrics(out)[0]
    assert np.isfinite(row["train_loss"]) and np.isfinite(row[f"train_{method}"]) and "train_ce" in row
    state = torch.load(out / "last.pt", weights_only=True)
    assert bool(state["criterion"]) is (method in ("fitnet", "crd"))


def test_crd_kill_and_resume_is_bit_identical(tmp_path, demo_root, feature_bank):
    """CRD's heads, memories and normalisation constants are checkpointed: SIGKILL in epoch 2, --resume, and the
    result equals an uninterrupted run (both in fresh processes)."""
    args = ["--method", "crd", "loss.nce_k=64", "max_steps_per_epoch=3", "sched.name=step", "sched.step_size=1"]
    env = subprocess_env(OMP_NUM_THREADS=str(torch.get_num_threads()))

    def cmd(out: Path) -> list[str]:
        return [sys.executable, "-m", "pipeline.train_student",
                *demo_args(demo_root, out, *args, epochs=3, labels=(feature_bank,))]

    killed = tmp_path / "killed"
    assert kill_once_started(cmd(killed), env, tmp_path, tmp_path / "stderr.txt") == -signal.SIGKILL
    assert not (killed / "final.json").exists()
    resumed = subprocess.run(cmd(killed) + ["--resume"], env=env, capture_output=True, text=True, cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    ref = tmp_path / "ref"
    done = subprocess.run(cmd(ref), env=env, capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    a, b = (torch.load(p / "last.pt", weights_only=True) for p in (killed, ref))
    assert_same_state(a["model"], b["model"])
    assert_same_state(a["criterion"], b["criterion"])
    assert any("memory" in k for k in a["criterion"])
    assert [r["train_loss"] for r in read_metrics(killed)] == [r["train_loss"] for r in read_metrics(ref)]


def test_timm_teacher_embedding_is_pre_logits(demo_root, tmp_path):
    """For a timm teacher the stored embedding is ``forward_head(forward_features(x), pre_logits=True)``."""
    out = tmp_path / "t.zarr"
    _dump(demo_root, out, "--teacher", "timm/resnet10t", "--weights", "none", "--batch-size", "50")
    bank = LabelBank(out)
    torch.manual_seed(0)  # the dump's random init of teacher 0 (seed + 0)
    model = create_model("timm/resnet10t", 10, "none").eval()
    m = build_manifest(demo_root, "train")
    (b,) = iterate(build_pipeline(m, np.arange(10), get_preset("demo"), "eval", 10, 1), 10, 10)
    with torch.no_grad():
        want = model.forward_head(model.forward_features(b.images), pre_logits=True).numpy()
    assert bank.feature_meta["dims"] == [want.shape[1]]
    np.testing.assert_allclose(bank.read_features(0, 10)[:, 0, 0], want, rtol=2.0 ** -10, atol=1e-4)
