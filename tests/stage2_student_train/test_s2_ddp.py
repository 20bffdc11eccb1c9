"""torchrun DDP on CPU (issue 4, point 5; Acceptance): 2 processes with gloo complete a run; validation metrics
are all-reduced over the whole val split (val_n = 100 and they equal an independent single-process evaluation of
the saved model); the ranks end with bit-identical weights; only rank 0 writes outputs."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import torch

from s2_helpers import assert_metrics_match, assert_same_state, demo_args, eval_numpy, model_state, read_metrics, subprocess_env

DRIVER = Path(__file__).with_name("ddp_driver.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_two_processes(tmp_path, demo_root, demo_bank):
    out, spy = tmp_path / "ddp", tmp_path / "spy"
    spy.mkdir()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(_free_port()), str(DRIVER),
           *demo_args(demo_root, out, "--method", "wsld", epochs=2, labels=(demo_bank,))]
    proc = subprocess.run(cmd, cwd=tmp_path, env=subprocess_env(SPY_DIR=str(spy), OMP_NUM_THREADS="1"),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = read_metrics(out)
    assert [r["epoch"] for r in rows] == [0, 1]  # rank 1 writes no duplicate lines
    assert all(r["val_n"] == 100 for r in rows)  # 50 per rank, all-reduced
    # each rank trained on its half: 150 samples per rank -> 5 steps of 32 per epoch on each
    assert len(list((out / "tb").glob("events.out.tfevents.*"))) == 1
    # DDP keeps the replicas identical, and rank 0 saved that model
    r0, r1 = torch.load(spy / "rank0.pt", weights_only=True), torch.load(spy / "rank1.pt", weights_only=True)
    assert_same_state(r0, r1)
    assert_same_state(r0, model_state(out / "last.pt"))
    # the all-reduced metrics are those of the whole val split, evaluated here in one process with numpy
    want = eval_numpy(out / "last.pt", demo_root)
    assert_metrics_match(rows[-1], want)
    final = json.loads((out / "final.json").read_text())
    assert final["top1"] == rows[-1]["top1"] and final["epochs"] == 2
    assert final["world_size"] == 2 and final["global_batch_size"] == 64  # the effective batch is recorded
    # rank 0 alone prints the final JSON and the run's INFO messages (issue 14, point 6)
    printed = [json.loads(x) for x in proc.stdout.splitlines() if x.startswith("{")]
    assert printed == [final]
    assert "INFO" in proc.stderr and "[rank 1]" not in proc.stderr
    # the weights moved (training happened on both ranks' batches, not a no-op)
    from pipeline.models import create_model

    torch.manual_seed(0)
    init = create_model("democnn_s", 10).state_dict()
    assert not torch.equal(init["features.0.weight"], r0["features.0.weight"])
