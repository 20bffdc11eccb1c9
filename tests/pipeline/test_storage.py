"""pipeline.storage: one module for local paths and fsspec URLs (exists / remove / rename / size / open)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import zarr

from pipeline import storage


def _tree(root: Path) -> int:
    (root / "a").mkdir(parents=True)
    (root / "a" / "x.bin").write_bytes(b"1" * 100)
    (root / "y.bin").write_bytes(b"2" * 23)
    return 123


@pytest.mark.parametrize("scheme", ["local", "file"])
def test_local_and_file_urls(tmp_path: Path, scheme: str):
    src = tmp_path / "src"
    nbytes = _tree(src)
    p = str(src) if scheme == "local" else f"file://{src}"
    assert storage.is_url(p) is (scheme == "file")
    assert storage.exists(p) and storage.size(p) == nbytes
    dst = str(tmp_path / "dst") if scheme == "local" else f"file://{tmp_path / 'dst'}"
    storage.rename(p, dst)
    assert not storage.exists(p) and storage.exists(dst) and storage.size(dst) == nbytes
    storage.remove(dst)
    assert not storage.exists(dst) and storage.size(dst) == 0
    storage.remove(dst)  # nothing there: not an error


def test_memory_url_zarr_roundtrip():
    url = "memory://storage-test/bank.zarr"
    g = storage.open_zarr_group(url, "w")
    g.create_array("a", shape=(4,), dtype="int32")
    g["a"][:] = np.arange(4)
    assert storage.exists(url) and storage.size(url) > 0
    assert np.array_equal(zarr.open_group(url, mode="r")["a"][:], np.arange(4))
    storage.remove(url)
    assert not storage.exists(url)
    assert storage.absolute(url) == url and storage.parent_exists(url)


def test_symlink_is_unlinked_not_followed(tmp_path: Path):
    target = tmp_path / "target"
    _tree(target)
    link = tmp_path / "link"
    os.symlink(target, link)
    assert storage.exists(link)
    storage.remove(link)
    assert not os.path.lexists(link) and (target / "y.bin").is_file()
    dangling = tmp_path / "dangling"
    os.symlink(tmp_path / "nowhere", dangling)
    assert storage.exists(dangling)  # would be overwritten otherwise


def test_absolute_and_parent(tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert storage.absolute("rel/x.zarr") == str(tmp_path / "rel" / "x.zarr")
    assert not storage.parent_exists("rel/x.zarr")
    (tmp_path / "rel").mkdir()
    assert storage.parent_exists("rel/x.zarr")


def test_model_names_become_one_path_component():
    """Bank file names and default run directories: a timm name or a callable never nests directories."""
    from pipeline.bank.identity import teacher_id
    from stage2_student_train.config import TrainConfig
    from stage2_student_train.inputs import check_config

    assert storage.name_for_path("timm/resnet50.a1_in1k") == "timm-resnet50.a1_in1k"
    assert storage.name_for_path("my.models:small") == "my.models-small"
    assert teacher_id([{"arch": "timm/vit_tiny_patch16_224"}, {"arch": "resnet8"}]) == "timm-vit_tiny_patch16_224+resnet8"
    cfg = check_config(TrainConfig(method="ce", student="timm/resnet18.a1_in1k", data="data", output_dir=""))
    assert cfg.output_dir == "runs/ce-timm-resnet18.a1_in1k-seed0"
