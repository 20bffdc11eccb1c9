"""What an augmenting view policy costs (issue 25, point 5): bytes stored per view, the replay of the stored
parameters per view (ops, erasing, mixing) at ImageNet size, and the whole stage-1 dump per view on the demo data.

    python bench/view_policies.py              # < 2 minutes on 2 cores
    python bench/view_policies.py --no-md      # print only

Replay per view: :func:`pipeline.data.augment.augment_view` (+ :func:`mix_views` for mixing policies, which also
build the partner's view: counted as a second view) on random uint8 224 x 224 crops, CPU time per view. Dump per
view: ``python -m pipeline.dump_logits`` (torch loader, 1 worker, democnn_s on 28 px Fashion-MNIST, 2 views) in
CPU time (process + loader workers, ``getrusage``) per stored view, start-up included alike in every row; the
ratios to ``rrc+flip`` are what to read (a warm-up dump first pays the imports). Bytes per view: ``views`` (20 B) + ``view_params`` (4·A B) +
``view_partner`` (4 B), before compression.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

SECTION = "View policies: stored bytes and dump time per view (bench/view_policies.py)"
POLICIES = ("rrc+flip", "rrc+flip+randaug(2,9)", "rrc+flip+trivialaug", "rrc+flip+autoaug",
            "rrc+flip+randaug(2,9)+erasing(0.25)", "rrc+flip+randaug(2,9)+erasing(0.25)+mixup(0.8)+cutmix(1.0)")


def cpu_seconds() -> float:
    s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime


def replay_us(policy: str, views: int = 64, size: int = 224) -> float:
    """CPU µs to replay one stored view of ``policy`` on a ``size`` px uint8 crop (mixing: both views + mix)."""
    from pipeline.data.augment import augment_view, mix_views
    from pipeline.data.policy import draw_params, parse_view_policy
    from pipeline.data.presets import get_preset

    p, pre = parse_view_policy(policy), get_preset("imagenet")
    if not p.stores_params:
        return 0.0
    g = torch.Generator().manual_seed(0)
    imgs = torch.randint(0, 256, (views, 3, size, size), dtype=torch.uint8, generator=g)
    rows = [draw_params(p, 0, i, 0, size) for i in range(views)]
    c0 = cpu_seconds()
    for i in range(views):
        x = augment_view(imgs[i], rows[i], pre)
        if p.mixes:
            mix_views(x, augment_view(imgs[(i + 1) % views], rows[(i + 1) % views], pre), rows[i])
    return (cpu_seconds() - c0) / views * 1e6


def dump_ms(policy: str, root: Path, out: Path) -> tuple[float, float]:
    """(CPU ms, wall ms) per stored view of a 2-view dump of the demo val split (300 images)."""
    from pipeline.dump_logits import main as dump_main

    args = ["--teacher", "democnn_s", "--weights", "none", "--data", str(root), "--split", "val", "--preset", "demo",
            "--batch-size", "50", "--views", "2", "--view-policy", policy, "--loader", "torch", "--workers", "1",
            "--out", str(out)]
    c0, w0 = cpu_seconds(), time.perf_counter()
    with contextlib.redirect_stderr(io.StringIO()):
        assert dump_main(args) == 0
    return (cpu_seconds() - c0) / 600 * 1e3, (time.perf_counter() - w0) / 600 * 1e3


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--no-md", action="store_true", help="do not write BENCHMARKS.md")
    args = ap.parse_args(argv)
    logging.disable(logging.WARNING)
    torch.set_num_threads(1)
    from pipeline.data.embedded import prepare_default_dataset
    from pipeline.data.policy import parse_view_policy

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["KD_CACHE"] = str(Path(tmp) / "cache")
        root = prepare_default_dataset(Path(tmp) / "fmnist", {"train": 1, "val": 30})
        dump_ms(POLICIES[-1], root, Path(tmp) / "warm.zarr")  # imports and first-use costs, not recorded
        for k, policy in enumerate(POLICIES):
            p = parse_view_policy(policy)
            nbytes = 20 + (4 * p.num_params + 4 if p.stores_params else 0)
            cpu, wall = dump_ms(policy, root, Path(tmp) / f"b{k}.zarr")
            rows.append((str(p), nbytes, replay_us(policy), cpu, wall))
    base = rows[0][3]
    lines = ["| policy | bytes per view | replay at 224 px, CPU µs per view | dump, CPU ms per view | vs rrc+flip |",
             "|---|---|---|---|---|"]
    lines += [f"| `{p}` | {b} | {r:.0f} | {c:.2f} | {c / base:.2f}x |" for p, b, r, c, _ in rows]
    table = "\n".join(lines)
    print(table)
    if not args.no_md:
        from benchmd import write_section

        cmd = "python bench/view_policies.py"
        write_section(SECTION, f"Command: `{cmd}` (2 shared CPU cores; torch loader, 1 worker, torch 1 thread; "
                                f"demo val split, 300 images x 2 views, after a warm-up dump; start-up included in every row, democnn_s). CPU time = user + system of the "
                                f"process and its loader workers.\n\n{table}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
