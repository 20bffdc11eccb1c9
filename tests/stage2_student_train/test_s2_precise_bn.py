"""Precise BN (``--precise-bn N``) and the evaluation cadence (``--eval-every``, ``--eval-last``): batch-norm
statistics re-estimated on the same training batches before each evaluation, so evaluations of the same weights
agree whatever batches training saw last; training itself is unchanged."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn as nn

from pipeline.data.batch import Batch
from s2_helpers import read_metrics


def _batches(n: int, seed: int) -> list[Batch]:
    g = torch.Generator().manual_seed(seed)
    return [Batch(images=torch.randn(6, 3, 5, 5, generator=g) * 2 + 1, index=torch.arange(6)) for _ in range(n)]


def test_recalibrate_bn_is_the_equal_weight_mean_of_the_batches_statistics():
    from stage2_student_train.loop import recalibrate_bn

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 1), nn.BatchNorm2d(2))
    other = copy.deepcopy(model)
    other.train()
    with torch.no_grad():
        for b in _batches(5, 1):  # other running statistics: what training's last batches left
            other(b.images)
    assert not torch.allclose(other[1].running_mean, model[1].running_mean)
    batches = _batches(3, 2)
    targets = torch.zeros(6, dtype=torch.long)
    for m in (model, other):
        m.eval()
        assert recalibrate_bn(m, batches, targets) == 3
        assert not m.training  # the mode is restored
    for k, v in model.state_dict().items():
        if "running" in k:
            torch.testing.assert_close(v, other.state_dict()[k], msg=k)
    # the first layer's statistics by hand: the mean over batches of each batch's mean and unbiased variance
    with torch.no_grad():
        feats = [model[0](b.images) for b in batches]
    mean = torch.stack([f.mean(dim=(0, 2, 3)) for f in feats]).mean(0)
    var = torch.stack([f.transpose(0, 1).reshape(4, -1).var(dim=1, unbiased=True) for f in feats]).mean(0)
    torch.testing.assert_close(model[1].running_mean, mean)
    torch.testing.assert_close(model[1].running_var, var)
    assert recalibrate_bn(nn.Linear(3, 2), batches, targets) == 0  # no batch norm: nothing to do


def test_precise_bn_changes_evaluation_not_training(train, tmp_path, demo_bank):
    """The same run with and without --precise-bn trains identically (train loss, weights); only the BN
    statistics evaluated (and saved) differ, and --test-only of last.pt reproduces the last evaluation."""
    common = ("--method", "kd", "max_steps_per_epoch=4", "--lr", "0.05")
    plain, precise = tmp_path / "plain", tmp_path / "precise"
    assert train(plain, *common, epochs=2, labels=(demo_bank,)) == 0
    assert train(precise, *common, "--precise-bn", "2", epochs=2, labels=(demo_bank,)) == 0
    ra, rb = read_metrics(plain), read_metrics(precise)
    assert [r["train_loss"] for r in ra] == [r["train_loss"] for r in rb]
    sa = torch.load(plain / "last.pt", map_location="cpu", weights_only=True)["model"]
    sb = torch.load(precise / "last.pt", map_location="cpu", weights_only=True)["model"]
    assert all(torch.equal(sa[k], sb[k]) for k in sa if "running" not in k and "num_batches" not in k)
    assert any(not torch.allclose(sa[k], sb[k]) for k in sa if "running_var" in k)
    assert train(precise, "--method", "ce", "--test-only") == 0
    test = json.loads((precise / "test.json").read_text())
    assert test["top1"] == pytest.approx(rb[-1]["top1"]) and test["nll"] == pytest.approx(rb[-1]["nll"], rel=1e-5)


def test_eval_every_and_eval_last_choose_the_evaluated_epochs(train, tmp_path, demo_bank):
    """Epochs 0-6 with --eval-every 3 --eval-last 2: epochs 2 and 5 (every 3rd) and 5, 6 (the last 2); each row's
    train_time_s covers every epoch since the previous row, so the rows sum to the run's training time."""
    out = tmp_path / "run"
    assert train(out, "--method", "ce", "max_steps_per_epoch=1", "--eval-every", "3", "--eval-last", "2",
                 epochs=7) == 0
    rows = read_metrics(out)
    assert [r["epoch"] for r in rows] == [2, 5, 6]
    final = json.loads((out / "final.json").read_text())
    assert final["train_time_s"] == pytest.approx(sum(r["train_time_s"] for r in rows))
    assert train(tmp_path / "bad", "--method", "ce", "--eval-last", "0") == 2


def test_precise_bn_reads_only_images_the_run_trains_on(demo_root):
    """With train_subset (the label-efficiency suite's few-labels arm) the statistics come from the subset alone:
    precise BN must not give a run the images it is meant not to see; the same images every evaluation."""
    from types import SimpleNamespace

    import numpy as np

    from pipeline.config import from_dict
    from pipeline.data import build_manifest
    from pipeline.data.presets import resolve_preset
    from pipeline.distributed import DistInfo
    from stage2_student_train.config import TrainConfig
    from stage2_student_train.run import _precise_bn_batches, train_pool

    m = build_manifest(str(demo_root), "train")
    cfg = from_dict(TrainConfig, {"data": str(demo_root), "train_subset": 40, "precise_bn": 50, "batch_size": 16,
                                  "workers": 1, "preset": "demo"})
    run = SimpleNamespace(cfg=cfg, info=DistInfo(), train_m=m, excluded=np.zeros(len(m), bool),
                          preset=resolve_preset("demo", m))
    seen = [np.concatenate([b.index.numpy() for b in _precise_bn_batches(run)]) for _ in range(2)]
    pool = train_pool(cfg, len(m), run.excluded)
    assert len(pool) == 40 < len(m) and sorted(seen[0]) == sorted(pool.tolist())
    assert np.array_equal(seen[0], seen[1])
