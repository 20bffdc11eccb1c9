"""Banks at ImageNet scale (issue 16): compact on write, compact in memory.

    python bench/bank_scale.py --rows 1281167 --views 16 --topk 10 --classes 1000 [--write BENCHMARKS.md]

1. Builds a synthetic teacher-like top-K bank of shape [rows, teachers, views, classes] through the dump's
   compact-on-write path (``create_bank(fmt="topk")`` + ``write_chunk`` per row chunk: rounding to fp16,
   :func:`pipeline.bank.compact.encode_chunk`, the chunk's sums, its done flag), timing the writes alone.
2. Times the same writer on ``--rate-rows`` rows for a dense bank and a compact one (rows/s written, the
   teacher's forward excluded: what the bank adds to a dump).
3. In a fresh process, loads the bank through stage 2's ``BankLabelSource`` and times gather + densify of random
   ``--batch``-row batches (random samples, the replayed view of each: ``replay_seed``), measuring the resident
   memory the label source adds (VmRSS after - before).

Prints a table and, last, one machine-readable line:
``RESULT rss_gb=... compact_gb=... dense_gb=... gather_rows_per_s=...`` (compact_gb = N·T·V·(4K + 2) / 1e9, the
stored payload; dense_gb = N·T·V·C·2 / 1e9). ``--write FILE`` adds or replaces this shape's row in the
"Banks at ImageNet scale" section of FILE (the rows of other shapes are kept).

Synthetic logits: see :class:`Synth` (the generator of bench/bank_tools.py, with per-view variation: views of
one sample agree on the top classes but not on the tail, like crops).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

SECTION = "Banks at ImageNet scale: compact on write, compact in memory (bench/bank_scale.py)"
POOL = 32768  # noise rows drawn by every vector (drawing N*V*C normals would dominate the build)


class Synth:
    """Teacher-like logits, generated chunk by chunk in the bank dtype (what the dump's chunk buffer holds).

    As bench/bank_tools.py (BENCHMARKS.md, "Label-bank tools"): per vector N(0, 1.2^2) noise on every class, a peak
    U(7, 15) on the predicted class (the true class for 80% of samples) and 3 confusable classes boosted by
    U(0, 6); per sample the predicted and confusable classes are shared by its views and the noise, the peak
    height (x U(0.8, 1.1)) and the boosts (x U(0.6, 1.2)) vary per view. The noise rows come from a fixed pool
    of 32,768 (drawing N x V x C normals would dominate the build).
    """

    def __init__(self, t: int, v: int, c: int, seed: int = 0):
        self.t, self.v, self.c = t, v, c
        self.rng = np.random.default_rng(seed)
        self.pool = self.rng.normal(0, 1.2, (POOL, c)).astype(np.float32)

    def chunk(self, labels: np.ndarray, dtype: str = "float16") -> np.ndarray:
        r, (t, v, c), rng = len(labels), (self.t, self.v, self.c), self.rng
        out = np.empty((r, t, v, c), dtype)
        rows = np.arange(r)[:, None]
        for k in range(t):
            pred = np.where(rng.random(r) < 0.8, labels, rng.integers(0, c, r))
            peak = rng.uniform(7, 15, r).astype(np.float32)
            conf = rng.integers(0, c, (r, 3))
            boost = rng.uniform(0, 6, (r, 3)).astype(np.float32)
            for j in range(v):
                x = self.pool[rng.integers(0, POOL, r)]
                x[rows, conf] += boost * rng.uniform(0.6, 1.2, (r, 1)).astype(np.float32)
                x[rows[:, 0], pred] += peak * rng.uniform(0.8, 1.1, r).astype(np.float32)
                out[:, k, j] = x
        return out


def _attrs(n: int, t: int, v: int, c: int) -> dict:
    return {"key": f"synthetic-{n}-{t}-{v}-{c}",
            "teachers": [{"name": f"synthetic{k}", "arch": "resnet50", "weights": "none"} for k in range(t)],
            "dataset": {"name": "synthetic", "split": "train", "num_samples": n, "num_classes": c,
                        "classes": [f"c{i}" for i in range(c)], "fingerprint": "synthetic"},
            "views": {"policy": "rrc+flip", "num_views": v}, "metrics": {}}


def write_bank(path: Path, n: int, t: int, v: int, c: int, fmt: str, k: int | None, rows: int,
               progress: bool = True) -> dict:
    """A complete bank through the dump's writer; returns {write_s (writer calls only), gen_s, bytes}."""
    from tqdm import tqdm

    from pipeline.bank.stats import entry_names
    from pipeline.bank.writer import chunk_sums_attrs, create_bank, mark_complete, write_chunk

    synth = Synth(t, v, c)
    labels = np.random.default_rng(1).integers(0, c, n).astype(np.int32)
    attrs = _attrs(n, t, v, c)
    g = create_bank(path, attrs, (n, t, v, c), "float16", rows, fmt, k)
    write_s = gen_s = 0.0
    views = np.zeros((rows, v, 5), np.float32)
    for j in tqdm(range(math.ceil(n / rows)), desc=f"write {fmt} {n}x{t}x{v}x{c}", unit="chunk",
                  disable=not progress, mininterval=5.0):
        s, e = j * rows, min(n, (j + 1) * rows)
        t0 = time.perf_counter()
        x = synth.chunk(labels[s:e])
        t1 = time.perf_counter()
        write_chunk(g, j, x, labels[s:e], views[:e - s], np.zeros(e - s, bool))
        gen_s += t1 - t0
        write_s += time.perf_counter() - t1
    extra = chunk_sums_attrs(g, entry_names(attrs["teachers"], t)) if fmt != "dense" else {}
    size = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    built = {"write_s": write_s, "gen_s": gen_s, "bytes": size, "fidelity": extra.get("fidelity")}
    mark_complete(g, {**extra, "bench_build": built})  # kept with the bank: --work DIR reuses it
    return built


def _reusable(bank: Path) -> dict | None:
    """The build figures of a complete bank left by an earlier run (``--keep``), else None."""
    try:
        from pipeline.bank.reader import LabelBank

        b = LabelBank(bank)
        return b.attrs["bench_build"] if b.complete and "rates" in b.attrs.get("bench_build", {}) else None
    except Exception:
        return None


def _store(bank: Path, built: dict) -> None:
    import zarr

    zarr.open_group(str(bank), mode="r+").attrs["bench_build"] = built


def _vm(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def measure(path: str, batch: int, iters: int, threads: int) -> dict:
    """In this (fresh) process: resident memory and gather + densify rate of stage 2's label source."""
    import torch

    torch.set_num_threads(threads)
    from pipeline.bank.reader import LabelBank
    from pipeline.bank.resident import resident_nbytes
    from stage2_student_train.label_sources import BankLabelSource

    bank = LabelBank(path)
    rss0 = _vm("VmRSS")
    t0 = time.perf_counter()
    src = BankLabelSource([bank], replay_seed=0, progress=True)
    load_s = time.perf_counter() - t0
    rss1, hwm = _vm("VmRSS"), _vm("VmHWM")
    n = src.num_samples
    gen = torch.Generator().manual_seed(0)
    idx = [torch.randint(0, n, (batch,), generator=gen) for _ in range(iters)]
    out = src({"index": idx[0], "epoch": 0})["teacher_logits"]
    assert out.shape == (batch, bank.num_teachers, bank.num_classes) and out.dtype == torch.float32
    assert torch.isfinite(out).all()

    def rate(fn) -> float:
        for e, i in enumerate(idx[:20]):
            fn(i, e)
        passes = []
        for _ in range(3):
            t = time.perf_counter()
            for e, i in enumerate(idx):
                fn(i, e)
            passes.append(len(idx) * batch / (time.perf_counter() - t))
        return statistics.median(passes)

    res = src.residents[0]
    via_source = rate(lambda i, e: src({"index": i, "epoch": e}))
    view = torch.zeros(batch, dtype=torch.int64)
    resident_only = rate(lambda i, e: res.gather(i, view))
    return {"rss_gb": (rss1 - rss0) / 1e9, "hwm_gb": hwm / 1e9, "rss0_gb": rss0 / 1e9, "load_s": load_s,
            "resident_gb": res.nbytes / 1e9, "expected_resident_gb": resident_nbytes(bank) / 1e9,
            "gather_rows_per_s": via_source, "resident_gather_rows_per_s": resident_only, "threads": threads}


def _row_key(args) -> str:
    return f"| {args.rows:,} | {args.teachers} | {args.views} | {args.classes} | {args.topk} |"


def section(rows: list[str], cmds: list[str]) -> str:
    head = [
        "Commands (one per row; each row replaced when its shape is rerun):", "",
        *[f"- `{c}`" for c in cmds], "",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPUs shared with other jobs, no GPU; torch 1 thread for the "
        "gather. Synthetic teacher-like logits (see the script's docstring), fp16, 4096 rows/chunk. *write* = the "
        "dump's writer alone (`write_chunk`: rounding, top-k encoding, the chunk's fidelity/metric sums, zstd + CRC32C, "
        "done flag), the teacher excluded; *dense write* on the rate sample, same data. *RSS* = resident memory "
        "`BankLabelSource` adds (VmRSS after - before loading), *target* = 1.5 x compact + 0.3 GB. *gather* = "
        "`BankLabelSource` calls on random 256-row batches with `replay_seed` (random sample, its replayed view), "
        "densified to [256, T, C] float32 (target >= 1M rows/s), median of 3 passes of 2,000 batches, with the load "
        "average before / after the run (other jobs share the 2 cores: writing the 1 MB float32 output of a batch "
        "alone took 47-73 us as the load varied).", "",
        "| N | T | V | C | K | compact GB | dense GB | on disk GB | write rows/s (compact) | rate sample: compact / dense "
        "rows/s | load s | RSS GB (target) | gather rows/s (load avg before / after) | KL T=1 / 2 / 4 | top-1 agr. |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---|---:|---|---:|",
    ]
    tail = [
        "",
        "Reading: compact on write costs CPU in the dump (top-k selection, log-softmax and the fidelity/metric sums "
        "per chunk, single-threaded numpy: the *rate sample* column compares it with writing the dense chunk), but "
        "writes and holds ~50x fewer bytes; in a real dump it overlaps nothing yet, so a GPU teacher producing more "
        "vectors/s than the encoder's rate waits for it (a thread pool over `encode_chunk`'s row blocks is the "
        "next step if that matters). Stage 2's resident memory is the compact payload plus one slot (the true class) "
        "and a float32 tail fill per vector (48 B vs 42 B stored at K = 10); the crop boxes are read per epoch, not "
        "held. The gather densifies only the batch rows; its rate is bound by writing the [256, T, C] float32 output "
        "and by cache misses on the random rows.",
    ]
    return "\n".join(head + rows + tail)


def update_markdown(path: Path, row: str, key: str, cmd: str) -> None:
    from benchmd import write_section

    text = path.read_text() if path.exists() else ""
    m = re.search(rf"^## {re.escape(SECTION)}\n(.*?)(?=^## |^<!-- |\Z)", text, re.S | re.M)
    rows, cmds = [], []
    if m:
        rows = [ln for ln in m.group(1).splitlines() if ln.startswith("| ") and ln[2].isdigit()]
        cmds = [ln[3:-1] for ln in m.group(1).splitlines() if ln.startswith("- `")]
    rows = [r for r in rows if not r.startswith(key)] + [row]
    cmds = [c for c in cmds if c != cmd] + [cmd]
    write_section(SECTION, section(rows, cmds), path)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=1_281_167)
    ap.add_argument("--views", type=int, default=16)
    ap.add_argument("--topk", type=int, default=10)
    ap.add_argument("--classes", type=int, default=1000)
    ap.add_argument("--teachers", type=int, default=1)
    ap.add_argument("--rows-per-chunk", type=int, default=4096)
    ap.add_argument("--rate-rows", type=int, default=16384, help="rows of the dense-vs-compact write-rate sample")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--iters", type=int, default=2000)
    ap.add_argument("--threads", type=int, default=1, help="torch threads of the gather")
    ap.add_argument("--work", default=None, help="folder for the banks (default: a temp dir under /tmp, removed); "
                                                 "a complete bank of this shape left there by --keep is reused")
    ap.add_argument("--keep", action="store_true", help="keep the banks")
    ap.add_argument("--write", default=None, help="add this run's row to BENCHMARKS.md-style FILE")
    ap.add_argument("--measure", default=None, help=argparse.SUPPRESS)  # the fresh-process half
    args = ap.parse_args()
    if args.measure:
        print("MEASURE " + json.dumps(measure(args.measure, args.batch, args.iters, args.threads)))
        return 0
    import logging

    logging.basicConfig(level=logging.WARNING)
    n, t, v, c, k = args.rows, args.teachers, args.views, args.classes, args.topk
    work = Path(args.work or tempfile.mkdtemp(prefix="bench-bank-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    bank = work / f"bank-{n}x{t}x{v}x{c}-top{k}.zarr"
    try:
        built = _reusable(bank)
        if built is None:
            rate_n = min(n, args.rate_rows)
            rates = {}
            for fmt in ("dense", "topk"):
                p = work / f"rate-{fmt}.zarr"
                r = write_bank(p, rate_n, t, v, c, fmt, k if fmt == "topk" else None, args.rows_per_chunk, False)
                rates[fmt] = rate_n / r["write_s"]
                shutil.rmtree(p)
            print(f"write rate on {rate_n} rows: dense {rates['dense']:,.0f} rows/s, top-{k} {rates['topk']:,.0f} "
                  "rows/s", file=sys.stderr)
            shutil.rmtree(bank, ignore_errors=True)
            built = write_bank(bank, n, t, v, c, "topk", k, args.rows_per_chunk)
            built["rates"] = rates
            _store(bank, built)
            print(f"built {bank} in {built['write_s']:.0f}s of writes (+{built['gen_s']:.0f}s synthetic generation)",
                  file=sys.stderr)
        else:
            print(f"reusing {bank} (built earlier; its write figures are in its attrs)", file=sys.stderr)
        rates = built["rates"]
        load0 = os.getloadavg()[0]
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONPATH": str(REPO)}
        proc = subprocess.run([sys.executable, __file__, "--measure", str(bank), "--batch", str(args.batch),
                               "--iters", str(args.iters), "--threads", str(args.threads)], env=env,
                              capture_output=True, text=True)
        line = [ln for ln in proc.stdout.splitlines() if ln.startswith("MEASURE ")]
        if proc.returncode or not line:
            print(proc.stderr[-3000:], file=sys.stderr)
            return 1
        m = json.loads(line[0][len("MEASURE "):])
        m["load"] = (load0, os.getloadavg()[0])
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    from pipeline.bank.compact import raw_bytes_per_vector

    vectors = n * t * v
    compact_gb = vectors * raw_bytes_per_vector("topk", c, k) / 1e9
    dense_gb = vectors * c * 2 / 1e9
    f = built["fidelity"]
    target = 1.5 * compact_gb + 0.3
    row = (f"{_row_key(args)} {compact_gb:.3f} | {dense_gb:.1f} | {built['bytes'] / 1e9:.3f} | "
           f"{n / built['write_s']:,.0f} | {rates['topk']:,.0f} / {rates['dense']:,.0f} | {m['load_s']:.0f} | "
           f"{m['rss_gb']:.3f} ({target:.2f}{', met' if m['rss_gb'] <= target else ', **not met**'}) | "
           f"{m['gather_rows_per_s']:,.0f} ({m['load'][0]:.1f} / {m['load'][1]:.1f}) | "
           f"{f['kl_t1']:.3g} / {f['kl_t2']:.3g} / {f['kl_t4']:.3g} | {f['top1_agreement']:.4f} |")
    print(f"bank [N, T, V, C] = [{n}, {t}, {v}, {c}], top-{k}: compact {compact_gb:.3f} GB, dense {dense_gb:.1f} GB, "
          f"{built['bytes'] / 1e9:.3f} GB on disk")
    print(f"write (compact on write, writer only): {n / built['write_s']:,.0f} rows/s = "
          f"{vectors / built['write_s']:,.0f} vectors/s; rate sample ({min(n, args.rate_rows)} rows): compact "
          f"{rates['topk']:,.0f} rows/s, dense {rates['dense']:,.0f} rows/s")
    print(f"load through BankLabelSource: {m['load_s']:.1f} s; resident arrays {m['resident_gb']:.3f} GB; RSS added "
          f"{m['rss_gb']:.3f} GB (target <= {target:.2f}); peak RSS {m['hwm_gb']:.2f} GB")
    print(f"gather + densify of {args.batch}-row batches: {m['gather_rows_per_s']:,.0f} rows/s through "
          f"BankLabelSource (replayed views), {m['resident_gather_rows_per_s']:,.0f} rows/s ResidentBank.gather alone "
          f"(load average {m['load'][0]:.1f} before / {m['load'][1]:.1f} after, {os.cpu_count()} CPUs)")
    print(f"fidelity: KL T=1 {f['kl_t1']:.4g}, T=2 {f['kl_t2']:.4g}, T=4 {f['kl_t4']:.4g}, top-1 agreement "
          f"{f['top1_agreement']:.4f} ({f['vectors']:,} vectors)")
    if args.write:
        cmd = "python bench/bank_scale.py " + " ".join(shlex.quote(a) for a in sys.argv[1:] if a != "--write"
                                                      and a != args.write)
        update_markdown(Path(args.write), row, _row_key(args), cmd)
    print(f"RESULT rss_gb={m['rss_gb']:.3f} compact_gb={compact_gb:.3f} dense_gb={dense_gb:.3f} "
          f"gather_rows_per_s={m['gather_rows_per_s']:.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
