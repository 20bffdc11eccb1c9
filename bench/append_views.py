"""Appending views vs dumping them all: CPU time of ``dump_logits --append-views SRC --views V'`` against a direct
V'-view dump, in one run (ratios within one run; CPU time of this process, the loader threads included).

A V-view bank of the demo teacher's architecture (random init) over the embedded Fashion-MNIST subset is dumped
first (SRC); then the V'-view bank is written both ways, and the two results are compared byte for byte.

    .venv/bin/python bench/append_views.py                   # 300 images, V = 2 -> V' = 8
    .venv/bin/python bench/append_views.py --views 4 8 --no-md

Prints a table and writes it (with the command) to the "Appending views" section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmd import write_section  # noqa: E402  (bench/ is on sys.path when run as a script)

SECTION = "Appending views (bench/append_views.py)"


def _dump(argv: list[str]) -> float:
    """CPU seconds of one ``dump_logits`` call in this process."""
    from pipeline.dump_logits import main

    t0 = time.process_time()
    assert main(argv) == 0
    return time.process_time() - t0


def run(per_class: int, v: int, v2: int, workdir: Path) -> dict[str, float]:
    from pipeline.data.embedded import prepare_default_dataset

    root = prepare_default_dataset(workdir / "fmnist", {"train": per_class})
    common = ["--teacher", "democnn", "--weights", "none", "--data", str(root), "--split", "train", "--preset",
              "demo_rrc", "--batch-size", "64", "--rows-per-chunk", "256", "--workers", "1", "--view-policy",
              "rrc+flip"]
    src, appended, direct = workdir / "src.zarr", workdir / "appended.zarr", workdir / "direct.zarr"
    t_src = _dump(common + ["--views", str(v), "--out", str(src)])
    t_direct = _dump(common + ["--views", str(v2), "--out", str(direct)])
    t_append = _dump(["--append-views", str(src), "--views", str(v2), "--workers", "1", "--out", str(appended)])
    import zarr

    a, b = zarr.open_group(str(appended), mode="r"), zarr.open_group(str(direct), mode="r")
    same = all(np.array_equal(np.asarray(a[n][:]), np.asarray(b[n][:]), equal_nan=True) for n in ("logits", "views"))
    return {"images": 10 * per_class, "src": t_src, "direct": t_direct, "append": t_append, "same": same}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--per-class", type=int, default=30, help="training images per class (10 classes)")
    p.add_argument("--views", type=int, nargs=2, default=(2, 8), metavar=("V", "V2"))
    p.add_argument("--no-md", action="store_true", help="do not write BENCHMARKS.md")
    args = p.parse_args()
    os.environ.setdefault("KD_CACHE", tempfile.mkdtemp(prefix="kd_cache_"))
    v, v2 = args.views
    with tempfile.TemporaryDirectory() as d:
        r = run(args.per_class, v, v2, Path(d))
    n = r["images"]
    rows = [f"| {v}-view SRC dump | {r['src']:.2f} | {1e3 * r['src'] / n:.2f} |",
            f"| direct {v2}-view dump | {r['direct']:.2f} | {1e3 * r['direct'] / n:.2f} |",
            f"| `--append-views SRC --views {v2}` | {r['append']:.2f} | {1e3 * r['append'] / n:.2f} |"]
    body = "\n".join([
        f"Command: `{shlex.join(['.venv/bin/python', 'bench/append_views.py', *sys.argv[1:]])}`",
        "",
        f"{n} demo images (28 px, `democnn`, random init), CPU time of the process (loader threads included), one run. "
        f"Append / direct = {r['append'] / r['direct']:.2f} (the {v2 - v} new views of {v2} are "
        f"{(v2 - v) / v2:.2f} of the teacher work); the two banks are identical: {r['same']}.",
        "",
        "| dump | CPU s | CPU ms / image |",
        "|---|---|---|",
        *rows,
    ])
    print(body)
    if not args.no_md:
        write_section(SECTION, body)


if __name__ == "__main__":
    main()
