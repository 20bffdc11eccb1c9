"""torchrun (issue 2, point 7): two gloo ranks on CPU shard the chunks and produce one complete bank equal to the
single-process bank; the store is an fsspec ``file://`` URL."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import zarr

from pipeline.bank.reader import LabelBank, verify_bank
from pipeline.dump_logits import main
from pipeline.labels import bank_info

REPO = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _args(demo_root: Path, out: str) -> list[str]:
    return ["--teacher", "democnn_s", "--weights", "none", "--data", str(demo_root), "--split", "train",
            "--preset", "demo", "--rows-per-chunk", "32", "--batch-size", "16", "--workers", "1", "--out", out]


def test_torchrun_two_ranks_fsspec_url(demo_root: Path, tmp_path: Path, assert_banks_equal):
    url = (tmp_path / "sub" / "dist.zarr").as_uri()  # file:///...; the parent folder does not exist yet
    assert url.startswith("file:///")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--nnodes", "1",
           "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
           "-m", "pipeline.dump_logits", *_args(demo_root, url), "-v"]
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    log = r.stdout + r.stderr
    assert "rank 0 dumped 160 samples" in log and "rank 1 dumped 140 samples" in log  # 10 chunks, 5 each
    assert r.stdout.strip().splitlines() == [url]  # printed once, by rank 0

    bank = LabelBank(url)
    assert bank.complete and bank.shape == (300, 1, 1, 10)
    assert verify_bank(url) == []
    info = bank_info(url)
    assert info["bytes_on_disk"] > 0 and info["shape"]["N"] == 300

    single = tmp_path / "single.zarr"
    assert main(_args(demo_root, str(single))) == 0
    assert_banks_equal(tmp_path / "sub" / "dist.zarr", single)  # logits bit-identical, metrics identical
    assert dict(zarr.open_group(url, mode="r").attrs)["dataset"]["num_samples"] == 300

    # the same command again through the URL: a no-op that prints the path
    assert main(_args(demo_root, url)) == 0


def test_a_failed_rank_ends_the_dump_within_seconds(demo_root: Path, tmp_path: Path):
    """Issue 21, point 5: an undecodable image in rank 1's share stops rank 1 with one line naming it; rank 0,
    waiting at the next barrier, is ended by torchrun at once (no hang), and its finished chunks stay."""
    import shutil
    import time

    data = tmp_path / "data"
    shutil.copytree(demo_root, data)
    victim = sorted(sorted((data / "train").iterdir())[-1].iterdir())[-1]  # the last sample: chunk 9, rank 1
    victim.write_bytes(b"not a jpeg")
    out = tmp_path / "bank.zarr"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), "-m", "pipeline.dump_logits", *_args(data, str(out))]
    t0 = time.time()
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert r.returncode != 0
    assert victim.name in r.stderr and "another process of this run stopped" in r.stderr
    assert "]: Traceback" not in r.stderr  # no rank prints a traceback ("[rank0]: Traceback ...")
    assert time.time() - t0 < 120
    done = zarr.open_group(str(out), mode="r")["done"][:] if out.exists() else None
    assert done is None or not done.all()
