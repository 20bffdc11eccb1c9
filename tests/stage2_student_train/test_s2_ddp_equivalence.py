"""One correct run on many processes (issue 21): the student and the loss's parameters train as one module under
DDP, so 2 ranks with batch b train what 1 rank with batch 2b trains on the same samples (FitNet's regressors,
SL-Enc's encoder with its noise off); CRD's memories stay identical on every rank; random streams are distinct per
(seed, epoch, rank) for any world size; a val split smaller than the world size evaluates correctly; a failed rank
ends the whole run within seconds instead of leaving the others waiting in a collective."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from s2_helpers import demo_args, read_metrics, subprocess_env

DRIVER = Path(__file__).with_name("ddp_driver.py")
STUDENT = "s2_helpers:nobn_cnn"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(tmp_path: Path, args: list[str], nproc: int = 2, timeout: int = 300, **env: str):
    spy = tmp_path / f"spy{_free_port()}"
    spy.mkdir()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
           str(_free_port()), str(DRIVER), *args]
    proc = subprocess.run(cmd, cwd=tmp_path, env=subprocess_env(SPY_DIR=str(spy), **env), capture_output=True,
                          text=True, timeout=timeout)
    return proc, spy


@pytest.fixture(scope="module")
def feature_bank(demo_root, teacher_ckpt, tmp_path_factory) -> Path:
    from pipeline.dump_logits import main as dump

    out = tmp_path_factory.mktemp("fbank") / "f.zarr"
    assert dump(["--data", str(demo_root), "--split", "train", "--preset", "demo", "--batch-size", "32",
                 "--rows-per-chunk", "64", "--workers", "1", "--features", "--out", str(out), "--teacher",
                 "democnn_s", "--weights", str(teacher_ckpt)]) == 0
    return out


def _state(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def _initial_criterion(method: str, loss: dict, student_dim: int = 16) -> dict:
    """The loss state a run starts from (built from seed + 1, as stage 2 builds it)."""
    from pipeline.config import from_dict
    from stage2_student_train.config import TrainConfig
    from stage2_student_train.run import build_criterion, seed_everything

    seed_everything(1)
    cfg = from_dict(TrainConfig, {"method": method, "loss": loss})
    return build_criterion(cfg, 10, num_samples=300, student_dim=student_dim, teacher_dim=32,
                           num_teachers=1).state_dict()


@pytest.mark.parametrize("method,extra", [("fitnet", ()), ("sl_enc", ("loss.noise_std=0",))])
def test_two_ranks_train_what_one_rank_trains_with_the_global_batch(train, tmp_path, demo_root, feature_bank,
                                                                   method, extra):
    common = ["--method", method, "--student", STUDENT, "--no-augment", "max_steps_per_epoch=6", "--lr", "0.05",
              "sched.name=constant", *extra]
    one = tmp_path / "one"
    assert train(one, *common, "--batch-size", "8", labels=(feature_bank,)) == 0
    two = tmp_path / "two"
    args = demo_args(demo_root, two, *common, labels=(feature_bank,))
    args[args.index("--batch-size") + 1] = "4"  # 4 per rank: the same 8 samples per step
    proc, _ = _torchrun(tmp_path, args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = _state(one / "last.pt"), _state(two / "last.pt")
    for part in ("model", "criterion"):
        assert a[part].keys() == b[part].keys() and a[part]
        for k in a[part]:
            torch.testing.assert_close(a[part][k], b[part][k], rtol=1e-4, atol=1e-5, msg=f"{part}.{k}")
    # the loss's parameters moved: the comparison is not of two untouched initialisations
    init = _initial_criterion(method, {"noise_std": 0.0} if method == "sl_enc" else {})
    assert all(not torch.equal(v, b["criterion"][k]) for k, v in init.items() if v.is_floating_point())
    ra, rb = read_metrics(one), read_metrics(two)
    assert ra[0]["train_loss"] == pytest.approx(rb[0]["train_loss"], rel=1e-4)


def test_sync_bn_makes_two_ranks_train_what_one_rank_trains_with_the_global_batch(train, tmp_path, demo_root,
                                                                                  demo_bank):
    """A batch-norm student (democnn_s): with --sync-bn, 2 ranks x batch 4 train the 1-rank batch-8 model over 2
    epochs (each rank's share of every epoch's new order, soft labels gathered by index on each rank), running
    statistics included (re-estimated by --precise-bn over the same 2 global batches); without it each rank
    normalizes by its own 4 images and the models differ. (Over
    more steps float rounding grows in either case, as it does between GlobalBatchNorm and F.batch_norm in one
    process: 1e-7 after 12 steps, 1e-5 after 18.)"""
    common = ["--method", "kd", "--no-augment", "max_steps_per_epoch=3", "--lr", "0.05", "sched.name=constant",
              "--precise-bn", "2", "--sync-bn"]
    one = tmp_path / "one"
    # 1 process: --sync-bn changes nothing
    assert train(one, *common, "--batch-size", "8", epochs=2, labels=(demo_bank,)) == 0
    a = _state(one / "last.pt")["model"]
    states = {}
    for name, flags in (("sync", common), ("local", common[:-1])):
        args = demo_args(demo_root, tmp_path / name, *flags, epochs=2, labels=(demo_bank,))
        args[args.index("--batch-size") + 1] = "4"
        proc, _ = _torchrun(tmp_path, args)
        assert proc.returncode == 0, proc.stderr[-3000:]
        states[name] = _state(tmp_path / name / "last.pt")["model"]
    assert a.keys() == states["sync"].keys() and any("running_var" in k for k in a)  # plain BN keys: checkpoints load anywhere
    for k in a:
        torch.testing.assert_close(a[k], states["sync"][k], rtol=1e-4, atol=1e-5, msg=k)
    differs = [k for k in a if a[k].is_floating_point() and not torch.allclose(a[k], states["local"][k], rtol=1e-3,
                                                                                 atol=1e-4)]
    assert any("running" in k for k in differs) and any("running" not in k for k in differs), differs


def test_crd_memories_are_the_same_on_every_rank(tmp_path, demo_root, feature_bank):
    out = tmp_path / "crd"
    args = demo_args(demo_root, out, "--method", "crd", "loss.nce_k=64", "max_steps_per_epoch=3", "--batch-size",
                     "8", labels=(feature_bank,))
    proc, spy = _torchrun(tmp_path, args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    c0, c1 = _state(spy / "criterion0.pt"), _state(spy / "criterion1.pt")
    for k in ("memory_student", "memory_teacher", "z_student", "z_teacher"):
        assert torch.equal(c0[k], c1[k]), k
    assert bool((c0["z_student"] > 0).all())  # Z was set (from both ranks' batches)
    # both ranks updated the rows of both ranks' samples: 3 steps x 8 samples x 2 ranks
    init = _initial_criterion("crd", {"nce_k": 64}, student_dim=32)
    for k in ("memory_student", "memory_teacher"):
        assert int((init[k][0] != c0[k][0]).any(dim=1).sum()) == 3 * 8 * 2, k


def test_rank_seeds_are_distinct_and_collision_free():
    from pipeline.distributed import derive_seed
    from stage2_student_train.run import loader_seed, seed_epoch

    seeds = {derive_seed(s, p, e, r) for s in (0, 1, 1000) for p in (1, 2) for e in range(120) for r in range(64)}
    assert len(seeds) == 3 * 2 * 120 * 64
    # the old packing seed*1000 + epoch*10 + rank collided: (epoch 0, rank 10) and (epoch 1, rank 0)
    assert loader_seed(0, 0, 10) != loader_seed(0, 1, 0)
    draws = []
    for rank in range(4):
        seed_epoch(0, 3, rank)
        draws.append(torch.rand(8))
    assert all(not torch.equal(draws[i], draws[j]) for i in range(4) for j in range(i))
    seed_epoch(0, 3, 2)
    assert torch.equal(torch.rand(8), draws[2])  # reproducible per (seed, epoch, rank)


def test_val_split_smaller_than_the_world_size(tmp_path, demo_root, demo_bank):
    """3 ranks, 2 val images (2 classes of one image each): one rank has an empty share; the metrics are those
    of the 2 images."""
    import shutil

    from pipeline.data.embedded import prepare_default_dataset

    root = prepare_default_dataset(tmp_path / "tiny", {"train": 2, "val": 1})
    for split in ("train", "val"):
        for d in sorted((root / split).iterdir())[2:]:
            shutil.rmtree(d)
    out = tmp_path / "run"
    args = demo_args(root, out, "--method", "ce")
    args[args.index("--batch-size") + 1] = "1"
    proc, _ = _torchrun(tmp_path, args, nproc=3)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert read_metrics(out)[0]["val_n"] == 2


def test_a_failed_rank_ends_the_run_within_seconds(tmp_path, demo_root, demo_bank):
    out = tmp_path / "run"
    args = demo_args(demo_root, out, "--method", "kd", "--epochs", "3", labels=(demo_bank,))
    t0 = time.time()
    proc, _ = _torchrun(tmp_path, args, timeout=240, FAIL_RANK="1")
    assert proc.returncode != 0
    assert "fails on purpose" in proc.stderr
    assert time.time() - t0 < 120  # torchrun's start-up included; a hang would run into the timeout
    assert not (out / "final.json").exists()
