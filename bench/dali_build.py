"""What it costs to build stage 2's DALI pipeline once per epoch (issue 24, point 3), against the epoch it serves.

    python bench/dali_build.py --data DIR      # an ImageNet-style tree (default: the demo tree, prepared if absent)

Stage 2 builds its DALI pipelines at the start of every epoch: the reader is given that epoch's sample order
(a seeded permutation, sharded by rank), and DALI's random augmentation is seeded from (seed, epoch), so an epoch
resumed after a kill draws the same crops and flips as an uninterrupted run. This script measures that build
for the train mode (random-resized crop + flip) and the views mode (stored boxes), for sample lists of
1,000 to 1,281,167 entries (ImageNet-1k's training set; the tree's files repeated): the build itself, the first
batch (DALI's first-run set-up and the prefetch queue filling), and one steady batch for scale; CPU and wall
seconds (1 DALI thread). It prints a table and, unless ``--no-md``, writes its section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import resource
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

SECTION = "Stage 2: one DALI pipeline build per epoch (bench/dali_build.py)"
SIZES = (1_000, 10_000, 100_000, 1_281_167)


def cpu_seconds() -> float:
    s = resource.getrusage(resource.RUSAGE_SELF)
    return s.ru_utime + s.ru_stime


def measure(manifest, n: int, mode: str, batch: int, lists: bool = False) -> dict[str, float]:
    """Build the ``mode`` pipeline over ``n`` samples (the tree's files repeated) for a first epoch and, from the
    same manifest, for the next epoch (another order: the per-epoch rebuild), running the next one's first batch
    and one more; -> CPU and wall seconds of each. ``lists``: hand DALI the order as ``files=``/``labels=`` lists
    (what every build did before the file list), for the comparison."""
    from pipeline.data import layouts
    from pipeline.data.dali import build_pipeline

    reps = -(-n // len(manifest))
    m = dataclasses.replace(manifest, files=(manifest.files * reps)[:n],
                            labels=np.tile(manifest.labels, reps)[:n])
    boxes = None
    if mode == "views":
        boxes = np.tile(np.array([[0.1, 0.1, 0.8, 0.8, 1.0]], np.float32), (n, 1, 1))
    out: dict[str, float] = {}
    saved = layouts._file_list
    if lists:
        layouts._file_list = lambda *a: None
    try:
        _epochs(m, n, mode, batch, boxes, out, build_pipeline)
    finally:
        layouts._file_list = saved
    return out


def _epochs(m, n: int, mode: str, batch: int, boxes: np.ndarray | None, out: dict[str, float],
            build_pipeline) -> None:
    from pipeline.data.presets import get_preset

    for epoch, what in ((0, "first"), (1, "next")):
        order = np.random.default_rng(epoch).permutation(n)
        c0, w0 = cpu_seconds(), time.perf_counter()
        pipe = build_pipeline(m, order, get_preset("demo_rrc"), mode, batch, 1, "cpu", seed=1 + epoch,
                              boxes=boxes)
        out[f"{what}_cpu"], out[f"{what}_wall"] = cpu_seconds() - c0, time.perf_counter() - w0
        if epoch == 1:
            w0 = time.perf_counter()
            pipe.run()
            out["batch1_wall"] = time.perf_counter() - w0
            w0 = time.perf_counter()
            pipe.run()
            out["batch_wall"] = time.perf_counter() - w0
        del pipe


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=None, help="an ImageNet-style tree (default: the demo tree)")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--sizes", type=int, nargs="*", default=list(SIZES))
    p.add_argument("--no-md", action="store_true", help="print only; leave BENCHMARKS.md alone")
    a = p.parse_args(argv)

    from pipeline.data import build_manifest

    if a.data is None:
        from pipeline.data.embedded import prepare_default_dataset

        a.data = str(prepare_default_dataset())
    manifest = build_manifest(a.data, "train")
    rows = []
    for mode in ("train", "views"):  # warm-up: DALI's import and first-pipeline set-up are not a rebuild's
        measure(manifest, 256, mode, a.batch)
    for mode in ("train", "views"):
        for n in a.sizes:
            r = measure(manifest, n, mode, a.batch)
            r["lists_cpu"] = measure(manifest, n, mode, a.batch, lists=True)["next_cpu"]
            rows.append((mode, n, r))
            print(f"{mode:6s} n={n:>9,}  first build {r['first_cpu'] * 1e3:8.1f} ms CPU  next epoch's build "
                  f"{r['next_cpu'] * 1e3:8.1f} ms CPU {r['next_wall'] * 1e3:8.1f} ms wall (with lists "
                  f"{r['lists_cpu'] * 1e3:8.1f} ms CPU)", flush=True)
    lines = ["| mode | samples in the epoch | first build, CPU ms | an epoch's rebuild, CPU ms | the rebuild with "
             "files=/labels= lists, CPU ms | rebuild, wall ms | first batch after it, wall ms | a steady batch, "
             "wall ms |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for mode, n, r in rows:
        lines.append(f"| {mode} | {n:,} | {r['first_cpu'] * 1e3:.1f} | {r['next_cpu'] * 1e3:.1f} | "
                     f"{r['lists_cpu'] * 1e3:.1f} | "
                     f"{r['next_wall'] * 1e3:.1f} | {r['batch1_wall'] * 1e3:.1f} | {r['batch_wall'] * 1e3:.1f} |")
    table = "\n".join(lines)
    print(table)
    if not a.no_md:
        from benchmd import write_section

        write_section(SECTION, f"Command: `python bench/dali_build.py` (tree {a.data}, {len(manifest):,} files "
                      f"repeated to each size, batch {a.batch}, 1 DALI thread, CPU).\n\n{table}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
