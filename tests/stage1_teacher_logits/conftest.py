"""Fixtures of the stage-1 tests: teacher checkpoints with known in-memory models, bank readers, file mtimes."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
import torch.nn as nn
import zarr

ARRAY_NAMES = ("logits", "labels", "views", "skipped", "done")


def _peaked(arch: str, num_classes: int, seed: int) -> nn.Module:
    """A random model with non-default BN statistics and a scaled classifier: peaked, sample-dependent logits,
    and outputs that differ between eval mode and batch-statistics mode."""
    from pipeline.models import create_model

    torch.manual_seed(seed)
    m = create_model(arch, num_classes, "none")
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.running_mean.uniform_(-0.2, 0.2)
                mod.running_var.uniform_(0.05, 0.3)
        fc = m.fc
        fc.weight.mul_(20)
        fc.bias.uniform_(-1, 1)
    return m.eval()


@pytest.fixture(scope="session")
def make_ckpt(tmp_path_factory) -> Callable[..., tuple[Path, nn.Module]]:
    """``make_ckpt(arch="democnn_s", num_classes=3, seed=1, wrap="model", prefix="module.")`` -> (path, model).

    ``wrap``: ``bare`` (a state_dict), ``model`` or ``state_dict`` (the usual wrappers). Cached per arguments.
    """
    root = tmp_path_factory.mktemp("ckpts")
    cache: dict[tuple, tuple[Path, nn.Module]] = {}

    def make(arch: str = "democnn_s", num_classes: int = 3, seed: int = 1, wrap: str = "model",
             prefix: str = "module.") -> tuple[Path, nn.Module]:
        key = (arch, num_classes, seed, wrap, prefix)
        if key not in cache:
            model = _peaked(arch, num_classes, seed)
            sd = {prefix + k: v.clone() for k, v in model.state_dict().items()}
            obj = sd if wrap == "bare" else {wrap: sd, "epoch": 3}
            path = root / f"{arch}-c{num_classes}-s{seed}-{wrap}-{prefix.strip('.') or 'noprefix'}.pth"
            torch.save(obj, path)
            cache[key] = (path, model)
        return cache[key]

    return make


def _read_arrays(path: str | Path) -> dict[str, np.ndarray]:
    g = zarr.open_group(str(path), mode="r")
    return {name: np.asarray(g[name][:]) for name in ARRAY_NAMES}


def _mtimes(path: Path) -> dict[str, int]:
    return {str(p.relative_to(path)): p.stat().st_mtime_ns for p in Path(path).rglob("*") if p.is_file()}


@pytest.fixture(scope="session")
def read_arrays() -> Callable[[str | Path], dict[str, np.ndarray]]:
    """``read_arrays(bank) -> {name: array}`` for every array of the bank contract."""
    return _read_arrays


@pytest.fixture(scope="session")
def file_mtimes() -> Callable[[Path], dict[str, int]]:
    """``file_mtimes(dir) -> {relative path: st_mtime_ns}`` of every file below ``dir``."""
    return _mtimes


@pytest.fixture(scope="session")
def assert_banks_equal() -> Callable[..., None]:
    """Every array byte for byte (NaN == NaN in float arrays, raw bytes of logits); optionally the metrics."""

    def check(a: str | Path, b: str | Path, metrics: bool = True) -> None:
        ra, rb = _read_arrays(a), _read_arrays(b)
        for name in ARRAY_NAMES:
            x, y = ra[name], rb[name]
            assert x.dtype == y.dtype and x.shape == y.shape, name
            assert np.array_equal(x, y, equal_nan=x.dtype.kind == "f"), name
        assert ra["logits"].tobytes() == rb["logits"].tobytes()
        if metrics:
            ma = dict(zarr.open_group(str(a), mode="r").attrs)
            mb = dict(zarr.open_group(str(b), mode="r").attrs)
            assert ma["metrics"] == mb["metrics"] and ma["key"] == mb["key"]

    return check
