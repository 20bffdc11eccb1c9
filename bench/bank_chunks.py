"""Label-bank chunking: write time, sequential read MB/s, random 256-row batch reads, compression, per rows/chunk.

Justifies ``DEFAULT_ROWS_PER_CHUNK`` in ``pipeline/bank/schema.py``. A synthetic bank of realistic, peaked fp16
logits (N rows x C classes, one teacher, one view) is written through the real writer (``create_bank`` +
``write_chunk``: Blosc-zstd + CRC32C, one ``done`` flag per chunk) and read back through ``LabelBank``.

    .venv/bin/python bench/bank_chunks.py                      # N=100,000, C=1000, rows/chunk 256 1024 4096
    .venv/bin/python bench/bank_chunks.py --rows 50000 --no-md # quicker, without touching BENCHMARKS.md

Prints a table and writes it (with the command) to the "Label-bank chunking" section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline.bank.reader import LabelBank  # noqa: E402
from pipeline.bank.schema import DEFAULT_ROWS_PER_CHUNK  # noqa: E402
from pipeline.bank.writer import create_bank, mark_complete, write_chunk  # noqa: E402
from benchmd import write_section  # noqa: E402  (bench/ is on sys.path when run as a script)

SECTION = "Label-bank chunking (bench/bank_chunks.py)"
IMAGENET_TRAIN = 1_281_167


def synthetic_logits(n: int, c: int, seed: int = 0, block: int = 16384) -> tuple[np.ndarray, np.ndarray]:
    """Teacher-like logits [n, c] fp16 and labels [n]: a class prior, low-rank class similarity, noise and a
    peak at the predicted class (softmax top-1 mostly 0.3-0.95, as for an ImageNet ResNet)."""
    rng = np.random.default_rng(seed)
    prior = rng.normal(0, 0.5, c).astype(np.float32)
    basis = rng.normal(0, 1.0, (16, c)).astype(np.float32)
    labels = rng.integers(0, c, n).astype(np.int32)
    out = np.empty((n, c), np.float16)
    for s in range(0, n, block):
        e = min(n, s + block)
        z = rng.normal(0, 1.5, (e - s, c)).astype(np.float32) + prior
        z += rng.normal(0, 0.8, (e - s, 16)).astype(np.float32) @ basis
        pred = np.where(rng.random(e - s) < 0.75, labels[s:e], rng.integers(0, c, e - s))
        z[np.arange(e - s), pred] += rng.uniform(8, 16, e - s).astype(np.float32)
        out[s:e] = z.astype(np.float16)
    return out, labels


def dir_bytes(path: Path) -> tuple[int, int]:
    files = [p for p in path.rglob("*") if p.is_file()]
    return sum(p.stat().st_size for p in files), len(files)


def measure(logits: np.ndarray, labels: np.ndarray, rows: int, root: Path, read_budget_s: float,
            repeat: int = 2, batch: int = 256, seed: int = 0) -> dict:
    n, c = logits.shape
    path = root / f"bank-r{rows}.zarr"
    shutil.rmtree(path, ignore_errors=True)
    views = np.full((rows, 1, 5), np.nan, np.float32)
    skipped = np.zeros(rows, bool)

    t0 = time.perf_counter()
    g = create_bank(path, {"key": "bench", "metrics": {}}, (n, 1, 1, c), "float16", rows)
    for j, s in enumerate(range(0, n, rows)):
        e = min(n, s + rows)
        write_chunk(g, j, logits[s:e, None, None, :], labels[s:e], views[: e - s], skipped[: e - s])
    mark_complete(g, {})
    write_s = time.perf_counter() - t0

    stored, _ = dir_bytes(path / "logits")
    raw = logits.nbytes

    bank = LabelBank(path)
    arr = bank.group["logits"]
    seq_s = bulk_s = float("inf")
    for _ in range(repeat):  # best of `repeat`: the machine is shared
        t0 = time.perf_counter()
        loaded = bank.load()
        seq_s = min(seq_s, time.perf_counter() - t0)
        t0 = time.perf_counter()
        bulk = arr[:]
        bulk_s = min(bulk_s, time.perf_counter() - t0)
        del bulk
    if not np.array_equal(loaded.numpy()[:, 0, 0], logits):
        raise SystemExit(f"rows/chunk {rows}: read-back differs from what was written")

    rng = np.random.default_rng(seed)
    done_rows, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < read_budget_s or done_rows == 0:
        idx = np.sort(rng.choice(n, batch, replace=False))
        out = arr.oindex[idx]
        done_rows += len(out)
    rand_s = time.perf_counter() - t0

    in_ram = loaded.numpy().reshape(n, c)
    t0, gathered = time.perf_counter(), 0
    while time.perf_counter() - t0 < 0.5:
        gathered += len(in_ram[rng.integers(0, n, batch)])
    mem_s = time.perf_counter() - t0
    shutil.rmtree(path, ignore_errors=True)
    return {
        "rows": rows,
        "files_imagenet": -(-IMAGENET_TRAIN // rows),
        "chunk_mb": rows * c * 2 / 1e6,
        "write_s": write_s,
        "write_mbs": raw / 1e6 / write_s,
        "seq_mbs": raw / 1e6 / seq_s,
        "bulk_mbs": raw / 1e6 / bulk_s,
        "rand_rows_s": done_rows / rand_s,
        "mem_rows_s": gathered / mem_s,
        "ratio": raw / stored,
    }


def table(results: list[dict]) -> str:
    head = ("| rows/chunk | chunk (MB raw) | files/array, ImageNet train | write s (MB/s) | sequential read "
            "`LabelBank.load()` MB/s | one-call read `logits[:]` MB/s | random 256-row batches rows/s "
            "| compression |")
    lines = [head, "|" + "---|" * 8]
    for r in results:
        lines.append(f"| {r['rows']} | {r['chunk_mb']:.2f} | {r['files_imagenet']:,} | {r['write_s']:.1f} "
                     f"({r['write_mbs']:.0f}) | {r['seq_mbs']:.0f} | {r['bulk_mbs']:.0f} | {r['rand_rows_s']:,.0f} | "
                     f"{r['ratio']:.3f}x |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=100_000, help="N: bank rows")
    p.add_argument("--classes", type=int, default=1000, help="C: classes")
    p.add_argument("--chunks", type=int, nargs="+", default=[256, 1024, 4096], help="rows per chunk to compare")
    p.add_argument("--read-budget", type=float, default=1.5, help="seconds of random batch reads per round")
    p.add_argument("--repeat", type=int, default=2, help="sequential reads per setting and round (best kept)")
    p.add_argument("--rounds", type=int, default=3, help="rounds over all settings (best of each figure kept)")
    p.add_argument("--dir", default=None, help="scratch folder (default: a temp folder)")
    p.add_argument("--no-md", action="store_true", help="do not write BENCHMARKS.md")
    args = p.parse_args(argv)

    root = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="bank_chunks_"))
    root.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    logits, labels = synthetic_logits(args.rows, args.classes)
    p1 = np.exp(logits.max(1).astype(np.float64) - np.log(np.exp(logits.astype(np.float64)).sum(1)))
    print(f"synthetic logits {logits.shape} fp16 ({logits.nbytes / 1e6:.0f} MB) in {time.perf_counter() - t0:.1f}s; "
          f"median top-1 softmax {np.median(p1):.2f}", flush=True)
    best: dict[int, dict] = {}
    try:
        for rep in range(args.rounds):  # settings interleaved per round, so load bursts hit all of them alike
            for rows in args.chunks:
                r = measure(logits, labels, rows, root, args.read_budget, args.repeat, seed=rep)
                print(f"round {rep + 1} rows/chunk {rows}: write {r['write_s']:.1f}s, seq {r['seq_mbs']:.0f} MB/s, "
                      f"one-call {r['bulk_mbs']:.0f} MB/s, random {r['rand_rows_s']:,.0f} rows/s, "
                      f"ratio {r['ratio']:.3f}", flush=True)
                if rows not in best:
                    best[rows] = r
                else:  # keep the best of every figure (the machine is shared)
                    b = best[rows]
                    b["write_s"] = min(b["write_s"], r["write_s"])
                    for k in ("write_mbs", "seq_mbs", "bulk_mbs", "rand_rows_s", "mem_rows_s"):
                        b[k] = max(b[k], r[k])
        results = [best[rows] for rows in args.chunks]
    finally:
        if not args.dir:
            shutil.rmtree(root, ignore_errors=True)
    tab = table(results)
    print()
    print(tab)
    best_seq = max(results, key=lambda r: r["seq_mbs"])
    best_write = max(results, key=lambda r: r["write_mbs"])
    default = next((r for r in results if r["rows"] == DEFAULT_ROWS_PER_CHUNK), None)
    choice = ""
    if default is not None:
        choice = (f"- The schema default, {DEFAULT_ROWS_PER_CHUNK} rows/chunk ({default['files_imagenet']:,} files per "
                  f"array for ImageNet train), reaches\n  {100 * default['seq_mbs'] / best_seq['seq_mbs']:.0f}% of the "
                  f"best sequential load and {100 * default['write_mbs'] / best_write['write_mbs']:.0f}% of the best "
                  f"write rate measured here.")
    cmd = " ".join(["python bench/bank_chunks.py", *map(shlex.quote, argv if argv is not None else sys.argv[1:])])
    body = f"""Command: `{cmd}` (N={args.rows:,} rows x C={args.classes} classes, fp16, T=V=1; {platform.machine()},
{os.cpu_count()} CPU cores shared with other jobs, no GPU; chunks read back from the page cache; best of {args.rounds}
interleaved rounds for every figure).

Synthetic teacher-like logits (class prior + low-rank class similarity + noise + a peak of +8..16 at the
predicted class; median top-1 softmax {np.median(p1):.2f}), written through `create_bank`/`write_chunk` (Blosc-zstd
level 3 with byte shuffle + CRC32C on every chunk) and read through `LabelBank.load()` (sequential, chunk by chunk)
and in one call (`logits[:]`), and `logits.oindex[sorted random 256 indices]` (per-batch random reads);
the in-RAM gather is numpy fancy indexing of 256 random rows of the loaded array.

{tab}

- Best sequential `LabelBank.load()` here: {best_seq['rows']} rows/chunk ({best_seq['seq_mbs']:.0f} MB/s); best write:
  {best_write['rows']} rows/chunk ({best_write['write_mbs']:.0f} MB/s). Small chunks pay a per-call cost in every
  chunk-by-chunk loop (the writer's five arrays per chunk, the loader's one read per chunk).
{choice}
- Random per-batch zarr reads: {min(r['rand_rows_s'] for r in results):,.0f}-{max(r['rand_rows_s'] for r in results):,.0f}
  rows/s across the settings (each touched chunk is decompressed whole for one or a few rows), against
  {np.median([r['mem_rows_s'] for r in results]):,.0f} rows/s for a numpy gather of 256 random rows of the loaded array:
  stage 2 loads the bank once and gathers in RAM, so the chunk size is chosen for writing and loading.
- Lossless compression of fp16 logits gains little, whatever the chunking (the size comes from lossy compact forms).
"""
    if not args.no_md:
        write_section(SECTION, body)
        print(f"\nwrote section '{SECTION}' of {REPO / 'BENCHMARKS.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
