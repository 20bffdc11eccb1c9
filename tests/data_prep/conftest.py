"""Fixtures for the dataset-preparation tests: packed variants of the demo set and of a generated tree."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def demo_shards(demo_root: Path, tmp_path_factory) -> Path:
    """The demo subset (300 train / 100 val) packed into small shards (several per split), original bytes."""
    from pipeline.data.prepare import pack

    out = tmp_path_factory.mktemp("packs") / "demo-shards"
    pack(demo_root, out, "train", shard_size="64KB", workers=2, progress=False)
    pack(demo_root, out, "val", shard_size="64KB", workers=1, progress=False)
    return out


@pytest.fixture
def tree_shards(image_tree: Path, tmp_path: Path) -> Path:
    """The generated tree (JPEG, grayscale JPEG and PNG members) packed into 4-sample-ish shards."""
    from pipeline.data.prepare import pack

    out = tmp_path / "tree-shards"
    pack(image_tree, out, "train", shard_size="12KB", workers=1, progress=False)
    return out
