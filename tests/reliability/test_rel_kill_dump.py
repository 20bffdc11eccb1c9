"""Fault 1: SIGKILL of ``dump_logits`` at random moments and at chosen lines (single process and 2-rank torchrun).

The same command again completes the bank, bit for bit equal to an uninterrupted dump; the bank is marked
complete only at the very end; finished chunks are never lost or rewritten; the lock file a killed process
leaves behind does not block the rerun (the OS releases the flock when the process dies)."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import zarr

from pipeline.bank.reader import LabelBank, verify_bank
from pipeline.bank.writer import done_flags
from pipeline.dump_logits import main
from pipeline.train_student import main as train_main
from rel_helpers import (N_CHUNKS, REPO, assert_one_line_error, assert_same_bank, attrs, chunk_files, done_files,
                         dump_args, env, free_port, run_point, train_args, wait_for)

SEED = int(os.environ.get("REL_SEED", "20240607"))


def _state(bank: Path) -> tuple[np.ndarray, bool]:
    g = zarr.open_group(str(bank), mode="r")
    return done_flags(g), bool(dict(g.attrs).get("complete"))


def _kill_after(cmd: list[str], bank: Path, k: int, delay: float, new_session: bool = False) -> int:
    """Start ``cmd``; once ``k`` chunks are done, wait ``delay`` s and SIGKILL it (its whole session if asked).
    While it runs, check that the bank never says complete before every chunk is done."""
    proc = subprocess.Popen(cmd, cwd=REPO, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=new_session)
    try:
        def reached() -> bool:
            if (bank / "zarr.json").is_file():
                try:
                    done, complete = _state(bank)
                    assert not complete or done.all(), "complete before every chunk was done"
                except (KeyError, ValueError, OSError):
                    pass  # metadata being replaced at this very moment
            return done_files(bank) >= k

        wait_for(reached, what=f"{k} done chunks", proc=proc)
        if delay:
            time.sleep(delay)
    finally:
        if new_session:  # torchrun starts each worker in a session of its own: kill every descendant too
            for pid in [*_descendants(proc.pid), proc.pid]:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        else:
            proc.kill()
        proc.wait(timeout=60)
    return proc.returncode


def _descendants(pid: int) -> list[int]:
    """Every live descendant of ``pid`` (from /proc), deepest last."""
    parents = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                stat = Path(f"/proc/{d}/stat").read_text()
                parents[int(d)] = int(stat.rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                pass
    out, frontier = [], [pid]
    while frontier:
        kids = [c for c, p in parents.items() if p in frontier]
        out += kids
        frontier = kids
    return out


def test_sigkill_at_random_points_then_rerun(demo_root: Path, tmp_path: Path, rel_reference: Path, capsys):
    """Three kills at seeded random points (after k done chunks plus a random delay), then the same command."""
    rng = random.Random(SEED)
    out = tmp_path / "bank.zarr"
    cmd = [sys.executable, "-m", "pipeline.dump_logits", *dump_args(demo_root, out)]
    kept: dict[str, bytes] = {}
    for k in sorted(rng.sample(range(1, N_CHUNKS - 1), 3)):
        rc = _kill_after(cmd, out, k, rng.uniform(0.0, 0.03))
        assert rc == -signal.SIGKILL, f"the dump finished before the kill after {k} chunks"
        done, complete = _state(out)
        # on an idle machine every chunk may be done before the kill lands (killed while finalizing)
        assert not complete and k <= done.sum() <= N_CHUNKS
        files = chunk_files(out)
        # finished chunks are never lost nor rewritten by a later run
        assert {p: b for p, b in files.items() if p in kept} == kept
        kept = {p: b for p, b in files.items() if done[int(p.split("/")[2])]}
    assert Path(str(out) + ".lock").exists()  # left behind by the killed process: must not block the rerun
    # a killed, incomplete bank is refused by stage 2 and by verify
    assert "bank is not marked complete" in verify_bank(out)
    capsys.readouterr()
    assert train_main(train_args(demo_root, tmp_path / "run", labels=[out])) == 2
    assert_one_line_error(capsys.readouterr().err, "'complete'")

    assert main(dump_args(demo_root, out)) == 0
    assert capsys.readouterr().out.strip() == str(out)
    assert {p: b for p, b in chunk_files(out).items() if p in kept} == kept
    assert_same_bank(out, rel_reference)
    assert verify_bank(out) == []


# Chosen lines of the writer: SIGKILL just before they run (the process gets no chance to clean up).
POINTS = {
    "creating the bank (arrays made, attrs not yet written)":
        dict(module="pipeline.bank.writer", func="create_bank", line="g.attrs.update(full)", hit=1),
    "inside chunk 2 (logits and labels written, views not)":
        dict(module="pipeline.bank.writer", func="write_rows", line='g["views"][s:e]', hit=3),
    "after chunk 4's data, before its done flag":
        dict(module="pipeline.bank.writer", func="write_rows", line='g["done"][j] = True', hit=5),
    "every chunk done, complete not yet set":
        dict(module="pipeline.bank.writer", func="mark_complete", line='g.attrs.update({**extra', hit=1),
}


@pytest.mark.parametrize("where", list(POINTS))
def test_sigkill_at_chosen_lines_then_rerun(where: str, demo_root: Path, tmp_path: Path, rel_reference: Path,
                                           capsys):
    out = tmp_path / "bank.zarr"
    r = run_point({**POINTS[where], "action": "kill"}, "pipeline.dump_logits", dump_args(demo_root, out))
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    if (out / "zarr.json").is_file():
        done, complete = _state(out)
        assert not complete
        hit = POINTS[where]["hit"]
        if POINTS[where]["func"] == "write_rows":
            assert done[: hit - 1].all() and not done[hit - 1:].any()
        if POINTS[where]["func"] == "mark_complete":
            assert done.all()
            with pytest.raises(Exception, match="incomplete"):
                LabelBank(out).require_complete()
    else:  # killed while creating: nothing at --out (the bank is built aside and renamed into place)
        assert POINTS[where]["func"] == "create_bank"
    capsys.readouterr()
    assert main(dump_args(demo_root, out)) == 0, capsys.readouterr().err[-2000:]
    assert_same_bank(out, rel_reference)
    assert not list(tmp_path.glob(".bank.zarr.creating-*"))  # a killed creator's leftovers are cleaned up


def test_torchrun_two_ranks_sigkill_then_rerun(demo_root: Path, tmp_path: Path, rel_reference: Path):
    """Both ranks and the launcher SIGKILLed at a random point; the same torchrun command completes the bank."""
    rng = random.Random(SEED + 1)
    out = tmp_path / "dist.zarr"

    def cmd() -> list[str]:
        return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--nnodes", "1",
                "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
                "-m", "pipeline.dump_logits", *dump_args(demo_root, out)]

    k = rng.randint(2, N_CHUNKS - 4)
    rc = _kill_after(cmd(), out, k, rng.uniform(0.0, 0.03), new_session=True)
    assert rc == -signal.SIGKILL, "torchrun finished before the kill"
    done, complete = _state(out)
    # on an idle machine the ranks may finish every chunk before the kill lands (killed while finalizing)
    assert not complete and k <= done.sum() <= N_CHUNKS
    r = subprocess.run(cmd(), cwd=REPO, env=env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip().splitlines() == [str(out)]
    assert_same_bank(out, rel_reference)
    assert attrs(out)["complete"] is True


@pytest.mark.slow
def test_torchrun_one_rank_killed_then_rerun(demo_root: Path, tmp_path: Path, rel_reference: Path):
    """Rank 1 SIGKILLed just before its second chunk's done flag: torchrun fails the job, nothing is marked
    complete, and the same torchrun command completes the bank bit for bit."""
    out = tmp_path / "dist.zarr"
    args = ["-m", "torch.distributed.run", "--nproc_per_node", "2", "--nnodes", "1", "--master_addr", "127.0.0.1"]
    point = dict(module="pipeline.bank.writer", func="write_rows", line='g["done"][j] = True', hit=2,
                 action="kill", ranks=[1])
    e = env(REL_POINT=json.dumps(point))
    r = subprocess.run([sys.executable, *args, "--master_port", str(free_port()), str(REPO / "tests" / "reliability"
                        / "rel_driver.py"), "pipeline.dump_logits", *dump_args(demo_root, out)],
                       cwd=REPO, env=e, capture_output=True, text=True, timeout=300)
    assert r.returncode != 0
    done, complete = _state(out)
    assert not complete and not done.all()
    assert not done[3]  # rank 1 owns the odd chunks; its second one (chunk 3) never got its flag
    r = subprocess.run([sys.executable, *args, "--master_port", str(free_port()), "-m", "pipeline.dump_logits",
                        *dump_args(demo_root, out)], cwd=REPO, env=env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert_same_bank(out, rel_reference)
