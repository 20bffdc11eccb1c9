"""Run outputs and metrics (issue 4, points 6 and 7): resolved config.yaml that reproduces the run through
--config, metrics.jsonl rows (accuracies in percent) that match an independent numpy evaluation of the saved
model, final.json, TensorBoard events, PNG plots; metrics.py against an independent numpy implementation."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
import yaml

from pipeline.config import resolve
from pipeline.metrics import MetricAccumulator, classification_metrics
from s2_helpers import assert_metrics_match, assert_same_state, eval_numpy, model_state, np_metrics, read_metrics
from stage2_student_train.config import TrainConfig


@pytest.mark.parametrize(("n", "c", "scale", "seed"), [(500, 10, 1.0, 0), (400, 10, 6.0, 1), (300, 3, 2.0, 2),
                                                        (257, 100, 3.0, 3)])
def test_metrics_match_numpy(n, c, scale, seed):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, c, n)
    logits = rng.normal(size=(n, c)) * scale
    logits[np.arange(n), labels] += rng.normal(1.0, 1.0, n) * scale  # some signal: accuracies not at chance
    got = classification_metrics(torch.from_numpy(logits).float(), torch.from_numpy(labels))
    want = np_metrics(logits.astype(np.float32), labels)
    assert got["n"] == n
    assert got["top1"] == pytest.approx(want["top1"], abs=1e-9)
    assert got["top5"] == pytest.approx(want["top5"], abs=1e-9)
    assert got["nll"] == pytest.approx(want["nll"], rel=1e-5)
    assert got["ece"] == pytest.approx(want["ece"], abs=1e-6)
    assert 0 < got["top1"] <= 100 and got["top1"] <= got["top5"] <= 100  # percent
    if c <= 5:
        assert got["top5"] == 100.0


def test_metric_accumulator_batches_and_all_reduce_state():
    rng = np.random.default_rng(7)
    logits = torch.from_numpy(rng.normal(size=(300, 10)) * 3).float()
    labels = torch.from_numpy(rng.integers(0, 10, 300))
    whole = classification_metrics(logits, labels)
    # two "ranks", several batches each; summing their state vectors is what the all-reduce does
    a, b = MetricAccumulator(), MetricAccumulator()
    for s in range(0, 150, 40):
        a.update(logits[s:min(s + 40, 150)], labels[s:min(s + 40, 150)])
    b.update(logits[150:], labels[150:])
    merged = MetricAccumulator()
    merged.load_state(a.state() + b.state())
    got = merged.compute()
    assert got["n"] == 300
    for k in ("top1", "top5", "nll", "ece"):
        assert got[k] == pytest.approx(whole[k], rel=1e-6, abs=1e-9), k  # per-batch float32 sums
    rel = merged.reliability()
    assert sum(rel["count"]) == 300 and len(rel["acc"]) == 15


def test_run_outputs(reference_run, demo_root):
    out = reference_run
    for f in ("config.yaml", "metrics.jsonl", "final.json", "last.pt", "best.pt", "curves.png", "reliability.png"):
        assert (out / f).is_file() and (out / f).stat().st_size > 0, f
    for png in ("curves.png", "reliability.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = read_metrics(out)
    assert [r["epoch"] for r in rows] == [0, 1, 2]
    for r in rows:
        assert {"epoch", "top1", "top5", "nll", "ece", "train_loss", "lr_first", "lr_last"} <= set(r)
        assert 0.0 <= r["top1"] <= r["top5"] <= 100.0 and 0.0 <= r["ece"] <= 1.0 and r["nll"] > 0
        assert r["val_n"] == 100  # the whole val split (10 per class)
    # the last row is the evaluation of last.pt on the whole val set, accuracies in percent
    want = eval_numpy(out / "last.pt", demo_root)
    assert_metrics_match(rows[-1], want)
    final = json.loads((out / "final.json").read_text())
    assert {k: final[k] for k in ("top1", "top5", "nll", "ece")} == {k: rows[-1][k] for k in ("top1", "top5", "nll", "ece")}
    assert final["method"] == "sl_enc" and final["student"] == "democnn_s" and final["epochs"] == 3
    assert final["best_top1"] == max(r["top1"] for r in rows) and final["train_time_s"] > 0


def test_tensorboard_events(reference_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    files = list((reference_run / "tb").glob("events.out.tfevents.*"))
    assert len(files) == 1
    ea = EventAccumulator(str(reference_run / "tb"))
    ea.Reload()
    tags = set(ea.Tags()["scalars"])
    assert {"epoch/top1", "epoch/top5", "epoch/nll", "epoch/ece", "train_step/loss", "train_step/kd",
            "train_step/lr"} <= tags
    top1 = [e.value for e in ea.Scalars("epoch/top1")]
    assert top1 == pytest.approx([r["top1"] for r in read_metrics(reference_run)])


def test_config_yaml_is_resolved_and_reproduces_the_run(reference_run, tmp_path, demo_bank):
    """config.yaml holds every key (nothing left to defaults) and --config on it reproduces the run exactly."""
    from pipeline.train_student import main

    saved = yaml.safe_load((reference_run / "config.yaml").read_text())
    cfg = resolve(TrainConfig, reference_run / "config.yaml")
    assert cfg.method == "sl_enc" and cfg.banks == (str(demo_bank),) and cfg.epochs == 3
    assert cfg.sched.name == "step" and cfg.sched.gamma == 0.5 and cfg.optim.nesterov is True
    assert set(saved) == {f.name for f in dataclasses.fields(TrainConfig)}
    out = tmp_path / "again"
    assert main(["--config", str(reference_run / "config.yaml"), "--output-dir", str(out)]) == 0
    assert_same_state(model_state(reference_run / "last.pt"), model_state(out / "last.pt"))
    assert yaml.safe_load((out / "config.yaml").read_text()) == {**saved, "output_dir": str(out)}


def test_teacher_agreement_and_kl_on_val(train, tmp_path, demo_root, teacher_ckpt, monkeypatch, caplog):
    """Issue 22, point 4: a run with a teacher reports top-1 agreement with it and KL(teacher || student) at T = 1
    on val, from a val bank of the same teacher found in the cache (metrics.jsonl, final.json, the report); they
    equal a hand computation from the saved student and the val bank. Without a val bank: n/a and the command."""
    import logging

    from pipeline.bank.reader import LabelBank
    from pipeline.dump_logits import main as dump
    from pipeline.report import collect, format_table
    from s2_helpers import val_logits

    monkeypatch.setenv("KD_CACHE", str(tmp_path / "cache"))
    common = ["--teacher", "democnn_s", "--weights", str(teacher_ckpt), "--data", str(demo_root), "--preset", "demo",
              "--batch-size", "32", "--workers", "1"]
    assert dump([*common, "--split", "train"]) == 0
    out = tmp_path / "no-val-bank"
    with caplog.at_level(logging.INFO):
        assert train(out, "--teacher", "democnn_s", "--teacher-weights", str(teacher_ckpt),
                     "max_steps_per_epoch=2") == 0
    assert "teacher agreement and KL are n/a" in caplog.text and "--split val" in caplog.text
    assert "teacher_agreement" not in read_metrics(out)[0]
    assert dump([*common, "--split", "val"]) == 0
    out = tmp_path / "run"
    assert train(out, "--teacher", "democnn_s", "--teacher-weights", str(teacher_ckpt), "max_steps_per_epoch=3",
                 epochs=2) == 0
    row = read_metrics(out)[-1]
    student, _ = val_logits(out / "last.pt", demo_root)
    val_bank = next(p for p in (tmp_path / "cache").rglob("*.zarr") if LabelBank(p).attrs["dataset"]["split"] == "val")
    teacher = LabelBank(val_bank).read_logits()[:, 0, 0].astype(np.float64)
    log_pt = teacher - np.log(np.exp(teacher - teacher.max(1, keepdims=True)).sum(1, keepdims=True)) - \
        teacher.max(1, keepdims=True)
    s = student.astype(np.float64)
    log_ps = s - s.max(1, keepdims=True) - np.log(np.exp(s - s.max(1, keepdims=True)).sum(1, keepdims=True))
    kl = float((np.exp(log_pt) * (log_pt - log_ps)).sum(1).mean())
    agree = 100.0 * float((teacher.argmax(1) == student.argmax(1)).mean())
    assert row["teacher_agreement"] == pytest.approx(agree, abs=1e-9)
    assert row["teacher_kl"] == pytest.approx(kl, rel=1e-3, abs=1e-5) and kl > 0
    final = json.loads((out / "final.json").read_text())
    assert final["teacher_agreement"] == row["teacher_agreement"] and final["teacher_kl"] == row["teacher_kl"]
    table = format_table(collect([str(out), str(tmp_path / "no-val-bank")]))
    assert "agree" in table and f"{agree:.2f}" in table and "n/a" in table
