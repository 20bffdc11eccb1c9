"""Fixtures of the reliability tests (issue 7): an uninterrupted reference bank that every fault test's
recovered bank must equal bit for bit, and the helpers module on ``sys.path``."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from rel_helpers import dump_args  # noqa: E402


@pytest.fixture(scope="session")
def rel_reference(demo_root: Path, tmp_path_factory) -> Path:
    """Uninterrupted dump of demo train with the reliability settings (19 chunks of 16 rows)."""
    from pipeline.dump_logits import main

    out = tmp_path_factory.mktemp("rel_ref") / "ref.zarr"
    assert main(dump_args(demo_root, out)) == 0
    return out
