"""Benchmark of dataset preparation: pack throughput and stage-1 dump speed from folders vs shards.

    .venv/bin/python bench/data_prep.py [--train-per-class 300] [--threads 2] [--repeats 3] [--write BENCHMARKS.md]

Uses the embedded demo data (Fashion-MNIST JPEGs, 28x28, ~1 KB each: reading overhead per sample is at its most
visible next to decoding). Optionally (``--imagenet-copies K``) a tree of K copies of the 20 real ImageNet JPEGs
shipped in tests/.data/foolbox (decode-bound). Prints a markdown section; ``--write FILE`` replaces this
benchmark's section in FILE (or appends it).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import platform
import resource
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

BEGIN = "<!-- bench/data_prep.py begin -->"
END = "<!-- bench/data_prep.py end -->"


def _dir_bytes(d: Path) -> int:
    return sum(p.stat().st_size for p in d.rglob("*") if p.is_file())


def bench_packs(root: Path, work: Path, workers: list[int], shard_size: str, repeats: int) -> dict:
    """Pack ``root`` train with each worker count, interleaved, ``repeats`` times (fresh output each time)."""
    from pipeline.data.prepare import pack

    src = _dir_bytes(root / "train")
    times: dict[int, list[float]] = {w: [] for w in workers}
    res = {}
    for r in range(repeats):
        for w in workers:
            out = work / f"pack-w{w}"
            shutil.rmtree(out, ignore_errors=True)
            t0, c0 = time.perf_counter(), _cpu()
            s = pack(root, out, "train", shard_size=shard_size, workers=w, progress=False)
            times[w].append((time.perf_counter() - t0, _cpu() - c0))
            res[w] = {"shards": s["shards"], "out": out, "pack_mb": s["bytes"] / 1e6, "n": s["num_samples"]}
    for w in workers:
        st = _stats(times[w], res[w]["n"])
        res[w].update(st, workers=w, source_mb=src / 1e6, mb_s=src / 1e6 / st["seconds"],
                      mb_s_median=src / 1e6 / st["median_s"])
    return res


def bench_dumps(sources: dict[str, Path], work: Path, threads: int, batch: int, repeats: int) -> dict:
    """Time full stage-1 dumps (a fresh bank each time) of every source, interleaved, after one warm-up dump."""
    from pipeline.data import build_manifest
    from pipeline.dump_logits import main as dump

    def one(data: Path, out: Path) -> float:
        args = ["--teacher", "democnn_s", "--weights", "none", "--data", str(data), "--split", "train",
                "--preset", "demo", "--batch-size", str(batch), "--rows-per-chunk", "1024", "--workers", str(threads),
                "--out", str(out)]
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            t0, c0 = time.perf_counter(), _cpu()
            rc = dump(args)
            dt = (time.perf_counter() - t0, _cpu() - c0)
        if rc != 0:
            raise SystemExit(f"dump failed on {data}")
        return dt

    one(next(iter(sources.values())), work / "bank-warmup.zarr")
    times: dict[str, list[float]] = {k: [] for k in sources}
    for r in range(repeats):
        for tag, data in sources.items():
            times[tag].append(one(data, work / f"bank-{tag}-{r}.zarr"))
    res = {}
    for tag, data in sources.items():
        res[tag] = {**_stats(times[tag], len(build_manifest(data, "train"))),
                    "bank": work / f"bank-{tag}-{repeats - 1}.zarr"}
    return res


def reader_run(data: Path, threads: int, batch: int, mode: str, preset: str, min_samples: int, seed: int) -> tuple:
    """One timed read (decode + eval transform, no teacher) of whole epochs, at least ``min_samples`` samples:
    ``sequential`` / ``shuffled`` order through the stages' reader (readers.file for folders, the exact-order
    external source for shards), or ``webdataset``: DALI's own sequential tar reader over the same shards.
    Returns (seconds, samples)."""
    from nvidia.dali import fn, pipeline_def, types

    from pipeline.data.dali import build_pipeline, iterate
    from pipeline.data import build_manifest
    from pipeline.data.presets import get_preset
    from pipeline.data.shards import webdataset_reader

    m = build_manifest(data, "train")
    epochs = max(1, -(-min_samples // len(m)))
    n = len(m) * epochs
    p = get_preset(preset)
    t0, c0 = time.perf_counter(), _cpu()
    if mode == "webdataset":
        @pipeline_def
        def _wds():
            img, idx = webdataset_reader(data, "train")
            img = fn.decoders.image(img, output_type=types.RGB)
            img = fn.resize(img, resize_shorter=p.resize, antialias=True)
            img = fn.crop(img, crop=(p.crop, p.crop), out_of_bounds_policy="pad")
            img = fn.crop_mirror_normalize(img, dtype=types.FLOAT, output_layout="CHW",
                                           mean=[255 * x for x in p.mean], std=[255 * x for x in p.std])
            return img, idx

        pipe = _wds(batch_size=batch, num_threads=threads, device_id=None, prefetch_queue_depth=2,
                    exec_dynamic=True)
        pipe.build()
        seen = 0
        while seen < n:
            pipe.run()
            seen += batch
    else:
        rng = np.random.default_rng(seed)
        order = np.concatenate([np.arange(len(m)) if mode == "sequential" else rng.permutation(len(m))
                                for _ in range(epochs)])
        pipe = build_pipeline(m, order, p, "eval", batch, threads, "cpu", 0)
        for _ in iterate(pipe, n, batch):
            pass
    dt = (time.perf_counter() - t0, _cpu() - c0)
    del pipe
    return dt, n


def bench_readers(configs: dict[str, tuple[Path, str]], threads: int, batch: int, repeats: int, preset: str,
                  min_samples: int) -> dict:
    """Every config once untimed (warm-up), then ``repeats`` rounds, configs interleaved within a round (the
    machine is shared: interleaving spreads load changes evenly). Reports best and median."""
    for data, mode in configs.values():
        reader_run(data, threads, batch, mode, preset, min(min_samples, 1), 0)
    times: dict[str, list[float]] = {k: [] for k in configs}
    n = {}
    for r in range(repeats):
        for label, (data, mode) in configs.items():
            dt, n[label] = reader_run(data, threads, batch, mode, preset, min_samples, r)
            times[label].append(dt)
    return {k: _stats(times[k], n[k]) for k in configs}


def _cpu() -> float:
    """CPU seconds of this process (all threads) plus its reaped children (pack's worker processes)."""
    ch = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + ch.ru_utime + ch.ru_stime


def _stats(times: list[tuple[float, float]], n: int) -> dict:
    """Best and median wall time, median CPU time per image (less sensitive to other jobs on shared cores)."""
    walls = [w for w, _ in times]
    best, med = min(walls), statistics.median(walls)
    cpu = statistics.median(c for _, c in times)
    return {"seconds": best, "median_s": med, "img_s": n / best, "img_s_median": n / med, "n": n,
            "cpu_ms": 1000 * cpu / n}


def _imagenet_tree(dst: Path, copies: int) -> Path | None:
    src = REPO / "tests" / ".data" / "foolbox"
    jpgs = sorted(src.glob("imagenet_*.jpg"))
    if not jpgs:
        return None
    for k, j in enumerate(jpgs):
        d = dst / "train" / f"c{k:02d}"
        d.mkdir(parents=True, exist_ok=True)
        for c in range(copies):
            shutil.copyfile(j, d / f"{c:04d}.jpg")
    return dst


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train-per-class", type=int, default=300, help="demo images per class (10 classes)")
    ap.add_argument("--threads", type=int, default=2, help="DALI threads for dump and reader runs")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--shard-size", default="4MB", help="shard size for the pack runs (several shards -> parallel)")
    ap.add_argument("--imagenet-copies", type=int, default=0, help="also a tree of K x 20 real ImageNet JPEGs")
    ap.add_argument("--work", default=None, help="scratch directory (default: a temporary one, removed)")
    ap.add_argument("--write", default=None, help="update this benchmark's section in this markdown file")
    args = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    import logging

    logging.basicConfig(level=logging.WARNING)
    from pipeline.data.embedded import prepare_default_dataset

    tmp = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="bench-data-prep-"))
    tmp.mkdir(parents=True, exist_ok=True)
    load0 = os.getloadavg()[0]
    try:
        root = prepare_default_dataset(tmp / "fmnist", {"train": args.train_per_class, "val": 50})
        packs = bench_packs(root, tmp, [1, 2], args.shard_size, args.repeats)
        shards = packs[2]["out"]
        dumps = bench_dumps({"folder": root, "shards": shards}, tmp, args.threads, args.batch_size, args.repeats)
        import zarr

        same = np.array_equal(np.asarray(zarr.open_group(str(dumps["folder"]["bank"]), mode="r")["logits"][:]),
                              np.asarray(zarr.open_group(str(dumps["shards"]["bank"]), mode="r")["logits"][:]))
        readers = bench_readers({
            "folder, sequential (readers.file)": (root, "sequential"),
            "folder, shuffled (readers.file)": (root, "shuffled"),
            "shards, sequential (external_source, exact order)": (shards, "sequential"),
            "shards, shuffled (external_source, exact order)": (shards, "shuffled"),
            "shards, sequential (readers.webdataset)": (shards, "webdataset"),
        }, args.threads, args.batch_size, args.repeats, "demo", 20000)
        big = None
        if args.imagenet_copies:
            tree = _imagenet_tree(tmp / "inet", args.imagenet_copies)
            if tree is not None:
                (tmp / "inet-packs").mkdir(exist_ok=True)
                bp = bench_packs(tree, tmp / "inet-packs", [2], "8MB", args.repeats)[2]
                big = {"pack": bp, "n": 20 * args.imagenet_copies, "readers": bench_readers({
                    "folder, shuffled (readers.file)": (tree, "shuffled"),
                    "shards, shuffled (external_source, exact order)": (bp["out"], "shuffled"),
                    "shards, sequential (readers.webdataset)": (bp["out"], "webdataset"),
                }, args.threads, 32, args.repeats, "imagenet", 2000)}
    finally:
        if not args.work:
            shutil.rmtree(tmp, ignore_errors=True)
    load1 = os.getloadavg()[0]

    n = dumps["folder"]["n"]
    cmd = "python bench/data_prep.py " + " ".join(sys.argv[1:])

    def row(what: str, st: dict, mb: str = "") -> str:
        return (f"| {what} | {st['seconds']:.2f} | {st['img_s']:.0f} | {st['img_s_median']:.0f} | "
                f"{st['cpu_ms']:.3f} | {mb} |")

    lines = [BEGIN, "## Dataset preparation: pack throughput, stage-1 dump from folders vs shards", "",
             f"Command: `{cmd.strip()}`  ",
             f"Machine: {platform.machine()}, {os.cpu_count()} cores shared with other jobs (load average "
             f"{load0:.1f} at start, {load1:.1f} at end), no GPU; DALI CPU-only, {args.threads} DALI threads, "
             f"batch {args.batch_size}; best and median of {args.repeats} interleaved runs after a warm-up.  ",
             f"Data: embedded demo set, {n} train JPEGs (28x28 Fashion-MNIST, {packs[1]['source_mb']:.1f} MB), "
             f"packed into {packs[2]['shards']} shards of <= {args.shard_size} ({packs[2]['pack_mb']:.1f} MB: "
             "three 512-byte tar headers per sample dominate for 1 KB images).", "",
             "| what | best s | images/s (best) | images/s (median) | CPU ms/image (median) "
             "| MB/s (source bytes, best) |",
             "|---|---:|---:|---:|---:|---:|"]
    for w in (1, 2):
        lines.append(row(f"pack, {w} process(es), {packs[w]['shards']} shards", packs[w], f"{packs[w]['mb_s']:.1f}"))
    lines.append(row("stage-1 dump `democnn_s --weights none --preset demo` from the folder", dumps["folder"]))
    lines.append(row("stage-1 dump `democnn_s --weights none --preset demo` from the shards", dumps["shards"]))
    for k, v in readers.items():
        lines.append(row(f"reader + decode + eval transform, {v['n']} samples: {k}", v))
    if big:
        bp = big["pack"]
        lines.append(row(f"ImageNet JPEGs ({big['n']} = 20 real x {args.imagenet_copies}, {bp['source_mb']:.1f} MB): "
                         f"pack, 2 processes, {bp['shards']} shards", bp, f"{bp['mb_s']:.1f}"))
        for k, v in big["readers"].items():
            lines.append(row(f"ImageNet JPEGs, imagenet eval transform, batch 32: {k}", v))
    sh, fo = "shards, shuffled (external_source, exact order)", "folder, shuffled (readers.file)"
    lines += ["", f"Banks dumped from the folder and from the shards are bit-identical: {same}.", "",
              "Reading: wall times on these shared cores vary by up to 3x between interleaved runs; CPU time per "
              "image (all threads of the process, plus pack's worker processes) is the steadier comparison. "
              f"Shards / folder, CPU per image: dump {dumps['shards']['cpu_ms'] / dumps['folder']['cpu_ms']:.2f}, "
              f"shuffled reader on 1 KB images {readers[sh]['cpu_ms'] / readers[fo]['cpu_ms']:.2f}"
              + (f", shuffled reader on ImageNet JPEGs {big['readers'][sh]['cpu_ms'] / big['readers'][fo]['cpu_ms']:.2f}"
                 if big else "") + ". "
              "The exact-order shard reader is a Python callback (pread + crc32 + wrap, ~7 us per sample measured "
              "alone) feeding the same decoder: it follows the trainer's per-epoch order, which DALI's sequential "
              "readers.webdataset (offered as `pipeline.data.shards.webdataset_reader` for tools) cannot. "
              "On 1 KB images the pack is bound by per-file work and 2 spawned processes (~0.5 s start) do not "
              "pay off on 3.5 MB; the ImageNet-sized row shows the copy + crc32 rate.", END, ""]
    text = "\n".join(lines)
    print(text)
    if args.write:
        p = Path(args.write)
        old = p.read_text() if p.exists() else ""
        if BEGIN in old and END in old:
            new = old[:old.index(BEGIN)] + text.rstrip("\n") + old[old.index(END) + len(END):]
        else:
            new = old + ("\n" if old and not old.endswith("\n\n") else "") + text
        p.write_text(new)
    return 0


if __name__ == "__main__":
    sys.exit(main())
