"""Stage-2 label sources (issue 4, points 3 and 11, Exactness): gather-by-index from the in-memory bank, several
banks on the T axis, live-teacher mode equal to the bank within fp16 tolerance, and no teacher built with a bank."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import zarr

import kd_losses
from pipeline.bank.reader import LabelBank
from pipeline.data import build_manifest
from pipeline.data.presets import get_preset
from pipeline.errors import UsageError
from pipeline.models import create_model
from pipeline.models.teachers import parse_teachers
from s2_helpers import demo_args, read_metrics, subprocess_env
from stage2_student_train.config import TrainConfig
from stage2_student_train.label_sources import BankLabelSource, LiveTeacherLabelSource
from stage2_student_train.loop import make_batch, train_one_epoch
from stage2_student_train.step import TrainModule, TrainStep
from stage2_student_train.optim import build_optimizer, build_scheduler
from stage2_student_train.run import _batches


def _zarr_logits(bank: Path, index: np.ndarray) -> torch.Tensor:
    """Independent read: zarr orthogonal indexing of logits[index, :, 0, :] -> float32 [B, T, C]."""
    arr = zarr.open_group(str(bank), mode="r")["logits"]
    return torch.from_numpy(np.asarray(arr.oindex[index, :, 0, :]).astype(np.float32))


def test_bank_labels_gather_exact_rows(demo_bank):
    src = BankLabelSource([LabelBank(demo_bank)])
    (res,) = src.residents  # held as stored: dense fp16 [N * V, T, C]
    assert res.shape == (300, 1, 1, 10) and res.format == "dense" and src.num_samples == 300
    assert tuple(res.arrays["logits"].shape) == (300, 1, 10) and res.arrays["logits"].dtype == torch.float16
    idx = np.array([299, 0, 17, 17, 64, 63, 128, 5, 191, 192])  # chunk edges (64 rows), repeats, last row
    out = src({"index": torch.from_numpy(idx), "epoch": 0})["teacher_logits"]
    assert out.shape == (10, 1, 10) and out.dtype == torch.float32
    assert torch.equal(out, _zarr_logits(demo_bank, idx))
    # row i differs from row j: the gather is not returning one broadcast row
    assert not torch.equal(out[0], out[1])


def test_several_banks_stack_on_teacher_axis(demo_bank, ckpt_bank):
    src = BankLabelSource([LabelBank(demo_bank), LabelBank(ckpt_bank)])
    idx = np.array([3, 250, 64, 0])
    out = src({"index": torch.from_numpy(idx), "epoch": 0})["teacher_logits"]
    assert out.shape == (4, 2, 10)
    assert torch.equal(out[:, 0], _zarr_logits(demo_bank, idx)[:, 0])
    assert torch.equal(out[:, 1], _zarr_logits(ckpt_bank, idx)[:, 0])
    assert len(src.teachers) == 2 and src.paths == [str(demo_bank), str(ckpt_bank)]


class _Recorder(nn.Module):
    """Wraps a real loss and records what the loop handed it (a spy: the real loss still runs)."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner
        self.seen: list[dict] = []

    def forward(self, logits, batch):
        self.seen.append({k: (v.clone() if torch.is_tensor(v) else v) for k, v in batch.items()})
        return self.inner(logits, batch)


def test_loop_hands_the_loss_bank_rows_of_batch_index(demo_root, demo_bank):
    """Through the real loop and a real (augmenting) DALI pipeline over a shuffled order: every batch the loss
    receives holds exactly the bank rows (and manifest classes) of ``batch['index']``."""
    manifest = build_manifest(demo_root, "train")
    cfg = TrainConfig(batch_size=32, workers=1, data=str(demo_root), preset="demo")
    order = np.random.default_rng(5).permutation(len(manifest))[:100]  # 3 full batches + 4
    model = create_model("democnn_s", 10)
    crit = _Recorder(kd_losses.build_loss("kd", num_classes=10))
    opt = build_optimizer([model, crit], cfg.optim)
    sched = build_scheduler(opt, 4, 1, cfg.sched, cfg.optim.lr)
    labels = torch.from_numpy(manifest.labels.astype(np.int64))
    src = BankLabelSource([LabelBank(demo_bank)])
    step = TrainStep(TrainModule(model, crit), opt, labels, scheduler=sched, label_source=src)
    stats = train_one_epoch(step, _batches(manifest, order, get_preset("demo"), "train", cfg, 3), 0)
    seen_idx = np.concatenate([b["index"].numpy() for b in crit.seen])
    assert seen_idx.tolist() == order.tolist()  # in order, each once, no padding duplicates
    bank_labels = LabelBank(demo_bank).labels()
    for b in crit.seen:
        idx = b["index"].numpy()
        assert torch.equal(b["teacher_logits"], _zarr_logits(demo_bank, idx))
        assert b["label"].tolist() == manifest.labels[idx].tolist() == bank_labels[idx].tolist()
        assert b["image"].shape == (len(idx), 3, 32, 32)
    assert set(stats) >= {"train_loss", "train_ce", "train_kd", "train_images_per_s"}


# --- live teacher == bank (Exactness) ------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["kd", "wsld", "dkd", "dist", "sl", "tfkd_self"])
def test_live_teacher_equals_bank_per_batch(demo_root, ckpt_bank, teacher_ckpt, method):
    """Eval preprocessing for both (what --no-augment trains on): the live teacher's logits equal the stored
    fp16 ones up to fp16 rounding, and so does every per-batch loss."""
    manifest = build_manifest(demo_root, "train")
    cfg = TrainConfig(batch_size=32, workers=1, data=str(demo_root), preset="demo")
    order = np.random.default_rng(0).permutation(len(manifest))[:96]
    labels = torch.from_numpy(manifest.labels.astype(np.int64))
    bank = BankLabelSource([LabelBank(ckpt_bank)])
    live = LiveTeacherLabelSource(parse_teachers(["democnn_s"], [str(teacher_ckpt)]), 10, "cpu")
    torch.manual_seed(0)
    student = create_model("democnn_s", 10)
    crit = kd_losses.build_loss(method, num_classes=10)
    n = 0
    for b in _batches(manifest, order, get_preset("demo"), "eval", cfg, 0):
        batch = make_batch(b, labels, "cpu", 0, False)
        zb, zl = bank(batch)["teacher_logits"], live(batch)["teacher_logits"]
        assert zb.shape == zl.shape == (len(b.index), 1, 10)
        # the bank stores fp16: the live logits rounded to fp16 are the stored values
        torch.testing.assert_close(zb, zl, rtol=2.0 ** -10, atol=1e-5)
        assert torch.equal(zb, zl.half().float())
        s = student(batch["image"])
        lb = crit(s, {**batch, "teacher_logits": zb})
        ll = crit(s, {**batch, "teacher_logits": zl})
        assert lb.keys() == ll.keys()
        for k in lb:
            torch.testing.assert_close(lb[k], ll[k], rtol=2e-3, atol=1e-5)
        n += len(b.index)
    assert n == 96


def test_live_val_teacher_runs_once_per_image(demo_root, teacher_ckpt):
    """Evaluation's live teacher (agreement, KL) runs on each val image once: later evaluations gather the kept
    logits by index, equal to running it again; a batch with an image not seen yet runs the teacher."""
    from stage2_student_train.label_sources import val_teacher

    manifest = build_manifest(demo_root, "val")
    cfg = TrainConfig(batch_size=16, workers=1, data=str(demo_root), preset="demo")
    labels = torch.from_numpy(manifest.labels.astype(np.int64))
    live = LiveTeacherLabelSource(parse_teachers(["democnn_s"], [str(teacher_ckpt)]), 10, "cpu")
    calls = []
    live.model.register_forward_hook(lambda m, i, o: calls.append(len(i[0])))
    fn = val_teacher(live, manifest, "demo", "cpu")
    batches = [make_batch(b, labels, "cpu", 0, False)
               for b in _batches(manifest, np.arange(48), get_preset("demo"), "eval", cfg, 0)]
    first = [fn(b) for b in batches]
    assert calls == [16, 16, 16]
    again = [fn(b) for b in batches]
    assert calls == [16, 16, 16]  # kept: no teacher forward
    for a, b, batch in zip(first, again, batches):
        assert torch.equal(a, b) and torch.equal(b, live(batch)["teacher_logits"])
    calls.clear()
    mixed = next(iter(_batches(manifest, np.arange(40, 56), get_preset("demo"), "eval", cfg, 0)))
    fn(make_batch(mixed, labels, "cpu", 0, False))
    assert calls == [16]  # 8 images not seen yet: the teacher runs on the batch


@pytest.mark.parametrize("weights", ["checkpoint", "none"])
def test_live_teacher_run_matches_bank_run(train, tmp_path, demo_bank, ckpt_bank, teacher_ckpt, weights):
    """End to end with --no-augment: a bank run and a live-teacher run (same seed, same teacher weights) log the
    same training losses within fp16 tolerance. ``none`` = random init with the run's seed, as demo_bank was dumped."""
    w, bank = (str(teacher_ckpt), ckpt_bank) if weights == "checkpoint" else ("none", demo_bank)
    assert train(tmp_path / "bank", "--no-augment", "max_steps_per_epoch=4", labels=(bank,)) == 0
    assert train(tmp_path / "live", "--no-augment", "max_steps_per_epoch=4", "--live-teacher", "democnn_s",
                 "--live-teacher-weights", w) == 0
    rb, rl = read_metrics(tmp_path / "bank")[0], read_metrics(tmp_path / "live")[0]
    for k in ("train_loss", "train_kd", "train_ce"):
        assert rl[k] == pytest.approx(rb[k], rel=2e-3), k
    assert json.loads((tmp_path / "live" / "final.json").read_text())["bank"] == "live"


_SPY = r"""
import json, sys
import pipeline.models as pm, pipeline.models.ensemble as ens, pipeline.models.registry as reg
calls, ensembles = [], []
real_create, real_init = reg.create_model, ens.TeacherEnsemble.__init__
def create_spy(name, *a, **k):
    calls.append(name)
    return real_create(name, *a, **k)
def init_spy(self, models, *args, **kwargs):
    ensembles.append(len(models))
    real_init(self, models, *args, **kwargs)
reg.create_model = pm.create_model = ens.create_model = create_spy
ens.TeacherEnsemble.__init__ = init_spy
from pipeline.train_student import main
report = {}
for tag, args in (("bank", json.loads(sys.argv[1])), ("live", json.loads(sys.argv[2]))):
    del calls[:], ensembles[:]
    rc = main(args)
    report[tag] = {"rc": rc, "calls": list(calls), "ensembles": list(ensembles),
                   "stage1": sorted(m for m in sys.modules if m.split(".")[0] == "stage1_teacher_logits")}
print("SPY" + json.dumps(report))
"""


def test_bank_run_never_builds_a_teacher(tmp_path, demo_root, demo_bank):
    """A clean interpreter: with a bank only the student is built and stage 1 is never imported; the same spy
    in live-teacher mode does see the teacher being built (so the spy can fail)."""
    common = ["--method", "kd", "max_steps_per_epoch=1"]
    bank_args = demo_args(demo_root, tmp_path / "b", *common, labels=(demo_bank,))
    live_args = demo_args(demo_root, tmp_path / "l", *common, "--live-teacher", "democnn_s",
                          "--live-teacher-weights", "none")
    proc = subprocess.run([sys.executable, "-c", _SPY, json.dumps(bank_args), json.dumps(live_args)], cwd=tmp_path,
                          env=subprocess_env(), capture_output=True, text=True, timeout=300)
    line = [l for l in proc.stdout.splitlines() if l.startswith("SPY")]
    assert proc.returncode == 0 and line, proc.stderr[-3000:]
    rep = json.loads(line[0][3:])
    assert rep["bank"] == {"rc": 0, "calls": ["democnn_s"], "ensembles": [], "stage1": []}
    assert rep["live"]["rc"] == 0 and rep["live"]["calls"] == ["democnn_s", "democnn_s"]
    assert rep["live"]["ensembles"] == [1] and rep["live"]["stage1"] == []


def test_every_label_source_implements_the_protocol(demo_bank, teacher_ckpt):
    """Bank, live teacher and none all satisfy LabelSource; only the bank adds stored rows, none adds nothing."""
    from stage2_student_train.label_sources import LabelSource, NoLabelSource

    batch = {"index": torch.tensor([0, 5]), "epoch": 0, "image": torch.zeros(2, 3, 32, 32)}
    sources = [BankLabelSource([LabelBank(demo_bank)]),
               LiveTeacherLabelSource(parse_teachers(["democnn_s"], [str(teacher_ckpt)]), 10, "cpu"), NoLabelSource()]
    for src in sources:
        assert isinstance(src, LabelSource), type(src).__name__
        assert isinstance(src.teachers, list) and isinstance(src.paths, list) and src.num_views == 1
    assert sources[0](batch)["teacher_logits"].shape == (2, 1, 10)
    assert sources[1](batch)["teacher_logits"].shape == (2, 1, 10)
    assert sources[2](batch) == {}
    for src in sources:  # no stored views: replay is refused in one line
        with pytest.raises(UsageError, match="replay"):
            src.boxes(np.array([0, 1]), 0)


def test_training_with_the_other_loader_warns(train, tmp_path, demo_bank, caplog):
    """demo_bank was dumped with DALI; training from it with the torch loader works and says so once."""
    import logging

    assert LabelBank(demo_bank).attrs["loader"] == "dali"
    with caplog.at_level(logging.WARNING):
        assert train(tmp_path / "r", "--loader", "torch", "max_steps_per_epoch=2", labels=(demo_bank,)) == 0
    msgs = [r.getMessage() for r in caplog.records if "loader" in r.getMessage()]
    assert len(msgs) == 1 and "dumped with the dali loader" in msgs[0] and "decodes with torch" in msgs[0]


def test_fp16_autocast_on_cpu_is_refused_bf16_runs(train, tmp_path, demo_bank, capsys):
    assert train(tmp_path / "fp16", "--amp", "fp16", labels=(demo_bank,)) == 2
    err = capsys.readouterr().err
    assert "--amp bf16" in err and err.count("\n") == 1 and not (tmp_path / "fp16").exists()
    assert train(tmp_path / "bf16", "--amp", "bf16", "max_steps_per_epoch=2", labels=(demo_bank,)) == 0


def test_live_teacher_runs_under_the_runs_autocast(demo_root, teacher_ckpt):
    """Issue 24, point 3: with --amp bf16 the live teacher runs under autocast (its logits differ from float32 by
    bf16 rounding, not more) and hands float32 logits to the loss."""
    manifest = build_manifest(demo_root, "train")
    cfg = TrainConfig(batch_size=32, workers=1, data=str(demo_root), preset="demo")
    labels = torch.from_numpy(manifest.labels.astype(np.int64))
    specs = parse_teachers(["democnn_s"], [str(teacher_ckpt)])
    fp32, bf16 = LiveTeacherLabelSource(specs, 10, "cpu"), LiveTeacherLabelSource(specs, 10, "cpu", amp="bf16")
    b = next(iter(_batches(manifest, np.arange(32), get_preset("demo"), "eval", cfg, 0)))
    batch = make_batch(b, labels, "cpu", 0, False)
    za, zb = fp32(batch)["teacher_logits"], bf16(batch)["teacher_logits"]
    assert za.dtype == zb.dtype == torch.float32 and not torch.equal(za, zb)
    torch.testing.assert_close(zb, za, rtol=0.05, atol=0.05 * float(za.abs().max()))
