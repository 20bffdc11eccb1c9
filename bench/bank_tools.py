"""Benchmark of the label-bank tools (issue 6) on a bank of ImageNet shape with synthetic peaked logits.

    .venv/bin/python bench/bank_tools.py [--rows 262144] [--classes 1000] [--dir /tmp/bank_tools_bench]
                                         [--markdown BENCHMARKS.md]

Measures (1) GB/s of ``ensemble`` (2 inputs, mean-logits) and ``compact`` (top-k) with the threaded scheduler
and with a 2-worker ``LocalCluster(processes=True)``; GB/s = uncompressed fp16 logits read / wall time;
(2) a table of compact formats: bytes/sample on disk, KL(p || p^) at T = 1 and T = 4, top-1 agreement.

Synthetic logits: N(0, 1.2^2) per class, plus a peak U(7, 15) on the true class (on another class for 20% of
rows) and 3 confusable classes boosted by U(0, 6): mean top-1 probability ~0.85, mean entropy ~1.1 nats, top-1
~79%, like an ImageNet ResNet on its training set.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def synth_chunk(seed: int, j: int, rows: int, c: int, labels: np.ndarray) -> np.ndarray:
    rng = np.random.default_rng([seed, j])
    r = len(labels)
    x = rng.standard_normal((r, c), dtype=np.float32) * 1.2
    wrong = rng.random(r) < 0.2
    target = np.where(wrong, (labels + rng.integers(1, c, r)) % c, labels)
    x[np.arange(r), target] += rng.uniform(7.0, 15.0, r).astype(np.float32)
    for _ in range(3):
        x[np.arange(r), rng.integers(0, c, r)] += rng.uniform(0.0, 6.0, r).astype(np.float32)
    return x.astype(np.float16)[:, None, None, :]


def make_bank(path: Path, n: int, c: int, rows: int, seed: int) -> float:
    """A complete synthetic dense bank (written chunk by chunk on 2 threads); returns seconds."""
    from concurrent.futures import ThreadPoolExecutor

    from pipeline.bank.writer import create_bank, mark_complete, write_chunk

    t0 = time.perf_counter()
    labels_all = (np.arange(n) * 7919) % c
    attrs = {
        "key": f"synthetic-{seed}",
        "teachers": [{"name": f"synth{seed}", "arch": f"synth{seed}", "weights": "none"}],
        "dataset": {"name": "synthetic-imagenet", "split": "train", "layout": "synthetic", "num_samples": n,
                    "num_classes": c, "classes": [f"n{i:08d}" for i in range(c)], "fingerprint": f"synthetic-{n}-{c}"},
        "preprocessing": {"name": "imagenet"}, "views": {"policy": "center", "num_views": 1}, "metrics": {},
    }
    g = create_bank(path, attrs, (n, 1, 1, c), "float16", rows)

    def one(j: int) -> None:
        s, e = j * rows, min(n, (j + 1) * rows)
        lab = labels_all[s:e]
        write_chunk(g, j, synth_chunk(seed, j, rows, c, lab), lab, np.full((e - s, 1, 5), np.nan, np.float32),
                    np.zeros(e - s, bool))

    with ThreadPoolExecutor(2) as ex:
        list(ex.map(one, range(math.ceil(n / rows))))
    mark_complete(g, {"metrics": {}})
    return time.perf_counter() - t0


def disk_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def timed(fn, *a, **kw) -> float:
    t0 = time.perf_counter()
    fn(*a, **kw)
    return time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=262_144, help="N (ImageNet train: 1281167)")
    ap.add_argument("--classes", type=int, default=1000)
    ap.add_argument("--rows-per-chunk", type=int, default=1024)
    ap.add_argument("--dir", default="/tmp/bank_tools_bench")
    ap.add_argument("--topk", type=int, nargs="+", default=[1, 5, 10, 16, 32])
    ap.add_argument("--bench-k", type=int, default=16, help="K of the top-k throughput runs")
    ap.add_argument("--no-cluster", action="store_true", help="threaded scheduler only")
    ap.add_argument("--markdown", default=None, help="append the section to this file (e.g. BENCHMARKS.md)")
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()

    from pipeline.bank.reader import LabelBank
    from pipeline.bank.tools import compact_bank, ensemble_banks

    d = Path(args.dir)
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    n, c, rows = args.rows, args.classes, args.rows_per_chunk
    gb = n * c * 2 / 1e9  # one dense fp16 bank, uncompressed
    print(f"N={n} C={c} rows/chunk={rows}: {gb:.3f} GB of fp16 logits per bank; cpu count {os.cpu_count()}")
    a, b = d / "a.zarr", d / "b.zarr"
    for p, seed in ((a, 0), (b, 1)):
        print(f"writing {p.name}: {make_bank(p, n, c, rows, seed):.1f}s, {disk_bytes(p) / n:.1f} B/sample on disk",
              flush=True)
    lp = LabelBank(a).read_logits(0, 4096)[:, 0, 0].astype(np.float32)
    pr = np.exp(lp - lp.max(1, keepdims=True))
    pr /= pr.sum(1, keepdims=True)
    ent = -(pr * np.log(np.maximum(pr, 1e-30))).sum(1)
    shape_note = (f"mean top-1 prob {pr.max(1).mean():.2f}, mean entropy {ent.mean():.2f} nats, "
                  f"top-1 {100 * (lp.argmax(1) == LabelBank(a).labels()[:4096]).mean():.0f}%")
    print("synthetic distribution:", shape_note)

    thr = []
    cluster_start = None

    def run_jobs(sch: str, label: str) -> None:
        for job in ("ensemble", "compact"):
            out = d / f"{job}-{label}.zarr"
            if job == "ensemble":
                s = timed(ensemble_banks, [str(a), str(b)], str(out), "mean-logits", scheduler=sch, progress=False)
                gbr = 2 * gb
            else:
                s = timed(compact_bank, str(a), str(out), "topk", args.bench_k, scheduler=sch, progress=False)
                gbr = gb
            thr.append((job, label, s, gbr / s))
            print(f"{job:9s} {label:14s} {s:7.1f}s  {gbr / s:.3f} GB/s", flush=True)
            shutil.rmtree(out)

    run_jobs("threads", "threads")
    if not args.no_cluster:
        from distributed import LocalCluster

        t0 = time.perf_counter()
        with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
            cluster_start = time.perf_counter() - t0
            print(f"LocalCluster(2 processes) started in {cluster_start:.1f}s: {cluster.scheduler_address}")
            run_jobs(cluster.scheduler_address, "local-cluster")

    fmts = [("dense fp16 (source)", None, None)] + [(f"topk K={k}", "topk", k) for k in args.topk] + \
           [("int8 (per-vector scale)", "int8", None)]
    table = []
    for label, fmt, k in fmts:
        if fmt is None:
            table.append((label, disk_bytes(a) / n, 2 * c, 0.0, 0.0, 1.0, None))
            continue
        out = d / f"fmt-{fmt}-{k}.zarr"
        s = timed(compact_bank, str(a), str(out), fmt, k, progress=False)
        f = LabelBank(out).attrs["fidelity"]
        raw = LabelBank(out).attrs["raw_bytes_per_vector"]
        table.append((label, disk_bytes(out) / n, raw, f["kl_t1"], f["kl_t4"], f["top1_agreement"], s))
        print(f"{label:24s} {disk_bytes(out) / n:8.1f} B/sample  raw {raw:5d} B  KL1 {f['kl_t1']:.3g}  "
              f"KL4 {f['kl_t4']:.3g}  agree {f['top1_agreement']:.4f}  {s:.1f}s", flush=True)
        shutil.rmtree(out)

    cmd = "python bench/bank_tools.py " + " ".join(sys.argv[1:])
    md = [f"## Label-bank tools: ensemble, compact (issue 6)", "",
          f"Command: `{cmd.strip()}`  ", f"Machine: {os.cpu_count()} CPU cores (shared), no GPU. "
          f"Bank: N = {n:,} x C = {c} fp16, 1 teacher, 1 view, {rows} rows/chunk "
          f"({gb:.2f} GB of logits per bank{'; ImageNet train is 1,281,167 rows: 5x this' if n < 1_000_000 else ''}), "
          f"synthetic peaked logits ({shape_note}).", "",
          "Throughput (GB/s = uncompressed fp16 logits read / wall time; ensemble reads 2 banks and writes one, "
          f"compact is top-k K={args.bench_k} and also computes its fidelity and metrics in the same pass):", "",
          "| job | scheduler | wall s | GB/s |", "|---|---|---:|---:|"]
    md += [f"| {j} | {'threaded (default, 2 threads)' if s == 'threads' else 'LocalCluster, 2 worker processes'} | "
           f"{t:.1f} | {r:.3f} |" for j, s, t, r in thr]
    if cluster_start is not None:
        md += ["", f"Cluster jobs connect with `--scheduler tcp://…` to a LocalCluster started beforehand "
               f"({cluster_start:.1f} s to start, not included above; `--scheduler local-cluster` pays it per "
               "command)."]
    md += ["", "Formats (bytes/sample = whole bank on disk / N, labels and views included; raw = payload per "
           "teacher-view vector; KL(p || p^) mean over samples; student top-1 on the demo: see RESULTS.md):", "",
           "| format | bytes/sample on disk | raw B/vector | KL T=1 | KL T=4 | top-1 agreement | compact s "
           "| student top-1 (demo) |",
           "|---|---:|---:|---:|---:|---:|---:|---|"]
    for label, bps, raw, k1, k4, ag, s in table:
        md.append(f"| {label} | {bps:.1f} | {raw} | {k1:.3g} | {k4:.3g} | {ag:.4f} | "
                  f"{'' if s is None else f'{s:.1f}'} | see RESULTS |")
    text = "\n".join(md) + "\n"
    print()
    print(text)
    if args.markdown:
        with open(args.markdown, "a") as f:
            f.write("\n" + text)
    if not args.keep:
        shutil.rmtree(d, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
