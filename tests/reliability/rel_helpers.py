"""Helpers of the reliability tests (imported by the test modules of this folder; not a test module)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import zarr

REPO = Path(__file__).resolve().parents[2]
DRIVER = Path(__file__).parent / "rel_driver.py"
ROWS = 16          # 300 demo train samples -> 19 row chunks
N_CHUNKS = 19
ARRAYS = ("logits", "labels", "views", "skipped", "done")


def dump_args(data: Path, out: Path | str | None, *extra: str) -> list[str]:
    """The dump of the reliability tests: random-init democnn_s, small chunks and batches, one DALI thread."""
    args = ["--teacher", "democnn_s", "--weights", "none", "--data", str(data), "--split", "train",
            "--preset", "demo", "--rows-per-chunk", str(ROWS), "--batch-size", "8", "--workers", "1"]
    if out is not None:
        args += ["--out", str(out)]
    return args + list(extra)


def train_args(data: Path, out: Path, *extra: str, labels: Sequence[Path] = (), method: str = "kd") -> list[str]:
    args = ["--method", method, "--student", "democnn_s", "--data", str(data), "--preset", "demo",
            "--batch-size", "32", "--epochs", "1", "--output-dir", str(out), "--workers", "1",
            "max_steps_per_epoch=1"]
    for b in labels:
        args += ["--labels", str(b)]
    return args + list(extra)


def env(**extra: str) -> dict:
    e = dict(os.environ)
    e["PYTHONPATH"] = str(REPO) + (os.pathsep + e["PYTHONPATH"] if e.get("PYTHONPATH") else "")
    e["OMP_NUM_THREADS"] = "1"
    e.pop("WORLD_SIZE", None)
    e.pop("RANK", None)
    e.update(extra)
    return e


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def driver_cmd(module: str, *args: str) -> list[str]:
    return [sys.executable, str(DRIVER), module, *args]


def run_point(point: dict | None, module: str, args: Sequence[str], timeout: float = 300, **env_extra: str):
    """Run ``module`` through the driver with a kill/pause point; returns the CompletedProcess."""
    e = env(**env_extra)
    if point is not None:
        e["REL_POINT"] = json.dumps(point)
    return subprocess.run(driver_cmd(module, *args), cwd=REPO, env=e, capture_output=True, text=True,
                          timeout=timeout)


def done_files(bank: Path) -> int:
    """How many chunks are flagged done (a done flag is a stored chunk file of the ``done`` array)."""
    d = Path(bank) / "done" / "c"
    try:
        return sum(1 for n in os.listdir(d) if n.isdigit())
    except FileNotFoundError:
        return 0


def attrs(bank: Path | str) -> dict:
    return dict(zarr.open_group(str(bank), mode="r").attrs)


def chunk_files(bank: Path) -> dict[str, bytes]:
    """Every stored chunk file of the contract arrays, by relative path (stray ``*.partial`` files excluded)."""
    out = {}
    for name in ARRAYS:
        for p in sorted((Path(bank) / name / "c").rglob("*")):
            if p.is_file() and not p.name.endswith(".partial"):
                out[str(p.relative_to(bank))] = p.read_bytes()
    return out


def assert_same_bank(a: Path | str, b: Path | str) -> None:
    """Bit-identical: every array equal (NaN == NaN), every chunk file byte for byte, same key, metrics and state."""
    ga, gb = zarr.open_group(str(a), mode="r"), zarr.open_group(str(b), mode="r")
    for name in ARRAYS:
        x, y = np.asarray(ga[name][:]), np.asarray(gb[name][:])
        assert x.dtype == y.dtype and x.shape == y.shape, name
        assert np.array_equal(x, y, equal_nan=x.dtype.kind == "f"), name
        assert x.tobytes() == y.tobytes(), name
    fa, fb = chunk_files(Path(a)), chunk_files(Path(b))
    assert fa.keys() == fb.keys()
    assert [k for k in fa if fa[k] != fb[k]] == []
    aa, ab = dict(ga.attrs), dict(gb.attrs)
    for k in ("key", "metrics", "complete", "shape", "dataset", "teachers", "preprocessing", "views"):
        assert aa.get(k) == ab.get(k), k


def error_lines(stderr: str) -> list[str]:
    """``error:`` lines of stderr (a progress bar may precede one after a carriage return)."""
    return [ln for ln in stderr.replace("\r", "\n").splitlines() if ln.startswith("error:")]


def assert_one_line_error(stderr: str, *words: str) -> str:
    assert "Traceback" not in stderr, stderr[-3000:]
    errs = error_lines(stderr)
    assert len(errs) == 1, stderr[-3000:]
    for w in words:
        assert w in errs[0], errs[0]
    return errs[0]


def wait_for(cond, timeout: float = 240, what: str = "condition", proc: subprocess.Popen | None = None) -> None:
    deadline = time.time() + timeout
    while not cond():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"process ended (rc {proc.returncode}) before {what}")
        if time.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.005)
