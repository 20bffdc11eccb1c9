"""Resume (issue 2, point 6): a dump killed with SIGKILL and re-run with the same command writes only the missing
chunks and ends bit for bit equal to an uninterrupted dump."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import numpy as np
import zarr

from pipeline.bank.writer import done_flags
from pipeline.dump_logits import main
from s1_helpers import kill_dump_after_chunks

REPO = Path(__file__).resolve().parents[2]
ROWS = 16  # 300 demo samples -> 19 chunks


def _args(demo_root: Path, out: Path) -> list[str]:
    return ["--teacher", "democnn_s", "--weights", "none", "--data", str(demo_root), "--split", "train",
            "--preset", "demo", "--rows-per-chunk", str(ROWS), "--batch-size", "8", "--workers", "1",
            "--out", str(out)]


def _chunk_files(bank: Path, chunks: set[int]) -> dict[str, int]:
    """mtimes of every stored chunk file of the given row chunks, across all arrays (not the ``*.partial`` files
    a killed zarr write leaves)."""
    out = {}
    for name in ("logits", "labels", "views", "skipped", "done"):
        for p in (bank / name / "c").rglob("*"):
            if p.is_file() and p.suffix != ".partial" and int(p.relative_to(bank / name / "c").parts[0]) in chunks:
                out[str(p.relative_to(bank))] = p.stat().st_mtime_ns
    return out


def test_sigkill_then_resume_equals_uninterrupted(demo_root: Path, tmp_path: Path, capsys, read_arrays,
                                                  assert_banks_equal):
    killed = tmp_path / "killed.zarr"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    rc = kill_dump_after_chunks(_args(demo_root, killed), killed, env)
    assert rc == -signal.SIGKILL, "the dump finished before it could be killed"

    g = zarr.open_group(str(killed), mode="r")
    n_chunks = g["done"].shape[0]
    done = done_flags(g)
    # chunks are written in order: when the third done file appeared the first two were finished (the third
    # may have been killed half-written; an unreadable flag counts as not done and is rewritten)
    assert n_chunks == 19 and 2 <= done.sum() < n_chunks and done[:2].all()
    assert dict(g.attrs)["complete"] is False
    done_chunks = set(np.flatnonzero(done).tolist())
    before = _chunk_files(killed, done_chunks)
    assert len(before) >= 5 * len(done_chunks)  # logits, labels, views, skipped, done files of every done chunk

    # what zarr's LocalStore leaves when killed inside a chunk write (it writes <key>.<uuid>.partial, then renames)
    (killed / "labels" / "c" / f"{n_chunks - 1}.0123456789abcdef0123456789abcdef.partial").write_bytes(b"torn")

    # the same command again: completes, printing the same path, without touching finished chunks
    assert main(_args(demo_root, killed)) == 0
    assert capsys.readouterr().out.strip() == str(killed)
    assert _chunk_files(killed, done_chunks) == before
    after = _chunk_files(killed, set(range(n_chunks)))
    assert len(after) == 5 * n_chunks
    g = zarr.open_group(str(killed), mode="r")
    assert dict(g.attrs)["complete"] is True and done_flags(g).all()
    assert not list(killed.rglob("*.partial")), "the resumed dump leaves no partial write of the killed one"

    # an uninterrupted dump of the same command elsewhere is identical bit for bit
    clean = tmp_path / "clean.zarr"
    assert main(_args(demo_root, clean)) == 0
    assert_banks_equal(killed, clean)
    arrays = read_arrays(killed)
    assert np.isfinite(arrays["logits"]).all() and np.isnan(arrays["views"]).all()
    assert arrays["labels"].min() >= 0 and not arrays["skipped"].any()
