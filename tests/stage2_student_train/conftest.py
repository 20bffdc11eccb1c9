"""Fixtures of the stage-2 tests: real DALI (CPU), real zarr banks, the demo subset (no mocks).

- ``train(out, *args, method=..., epochs=..., labels=...)``: ``pipeline.train_student.main`` in-process with the
  demo defaults (democnn_s, batch 32, preset demo, 1 DALI thread); returns the exit code.
- ``teacher_ckpt`` / ``ckpt_bank``: a saved random ``democnn_s`` checkpoint and the bank dumped with it.
- ``reference_run``: an uninterrupted 3-epoch sl_enc run that the resume tests compare against.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from s2_helpers import RESUME_ARGS, demo_args  # noqa: E402


@pytest.fixture(scope="session")
def train(demo_root):
    from pipeline.train_student import main

    def run(out: Path, *extra: str, method: str = "kd", epochs: int = 1, labels: tuple = (),
            data: Path | None = None) -> int:
        args = demo_args(data or demo_root, out, *extra, epochs=epochs, labels=labels)
        if "--method" not in extra:
            args = ["--method", method] + args
        return main(args)

    return run


@pytest.fixture(scope="session")
def teacher_ckpt(tmp_path_factory) -> Path:
    """A random-init democnn_s saved as a checkpoint (the bank and the live teacher use the same weights)."""
    from pipeline.models import create_model

    torch.manual_seed(1234)
    m = create_model("democnn_s", 10, None)
    with torch.no_grad():  # non-trivial BN running statistics, so eval-mode BN is not the identity
        for mod in m.modules():
            if isinstance(mod, torch.nn.modules.batchnorm._BatchNorm):
                mod.running_mean.uniform_(-0.2, 0.2)
                mod.running_var.uniform_(0.5, 2.0)
    path = tmp_path_factory.mktemp("teacher") / "teacher.pt"
    torch.save({"model": m.state_dict()}, path)
    return path


@pytest.fixture(scope="session")
def ckpt_bank(demo_root, teacher_ckpt, tmp_path_factory) -> Path:
    """Bank of ``teacher_ckpt`` over demo train (dumped through the stage-1 CLI)."""
    from pipeline.dump_logits import main

    out = tmp_path_factory.mktemp("ckbank") / "ckpt.zarr"
    rc = main(["--teacher", "democnn_s", "--weights", str(teacher_ckpt), "--data", str(demo_root), "--split",
               "train", "--preset", "demo", "--batch-size", "32", "--rows-per-chunk", "64", "--out", str(out)])
    assert rc == 0
    return out


@pytest.fixture(scope="session")
def reference_run(train, demo_bank, tmp_path_factory) -> Path:
    """Uninterrupted run of 3 epochs (RESUME_ARGS)."""
    out = tmp_path_factory.mktemp("ref") / "ref"
    assert train(out, *RESUME_ARGS, epochs=3, labels=(demo_bank,)) == 0
    return out
