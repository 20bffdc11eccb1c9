"""``--sync-bn`` layer conversion (stage2_student_train/sync_bn.py); the 2-rank equivalence it buys is tested in
test_s2_ddp_equivalence.py."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn as nn
from timm.layers import BatchNormAct2d

from pipeline.distributed import DistInfo
from pipeline.errors import UsageError
from stage2_student_train.sync_bn import GlobalBatchNorm, convert_sync_batchnorm

RANKS = DistInfo(rank=0, world_size=2, group=True)  # conversion itself runs no collective


def _trained_bn(layer: nn.Module) -> nn.Module:
    layer.train()
    for _ in range(3):
        layer(torch.randn(6, 4, 5, 5) * 3 + 1)
    return layer.eval()


def test_conversion_keeps_parameters_statistics_and_timm_activation():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), _trained_bn(nn.BatchNorm2d(4)), _trained_bn(BatchNormAct2d(4)))
    model[1].weight.data.uniform_(0.5, 2)
    x = torch.randn(2, 3, 7, 7)
    before = model(x)
    keys = model.state_dict().keys()
    out = convert_sync_batchnorm(model, RANKS).eval()
    assert isinstance(out[1], GlobalBatchNorm) and isinstance(out[2], GlobalBatchNorm)
    assert out.state_dict().keys() == keys  # checkpoints load with or without --sync-bn
    torch.testing.assert_close(out(x), before)  # eval: the running statistics, and BatchNormAct2d's ReLU
    assert bool((out(x) >= 0).all())  # the activation was kept


def test_without_a_process_group_nothing_changes_and_it_is_said(caplog):
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    with caplog.at_level(logging.WARNING):
        assert convert_sync_batchnorm(model, DistInfo()) is model and isinstance(model[1], nn.BatchNorm2d)
    assert "one process" in caplog.text


def test_a_student_without_batch_norm_is_named(caplog):
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
    with caplog.at_level(logging.WARNING):
        assert convert_sync_batchnorm(model, RANKS) is model
    assert "no batch-norm layer" in caplog.text


def test_an_unknown_batch_norm_subclass_on_cpu_is_a_usage_error():
    class OddNorm(nn.BatchNorm2d):
        pass

    with pytest.raises(UsageError, match="not the subclass OddNorm"):
        convert_sync_batchnorm(nn.Sequential(OddNorm(4)), RANKS)
