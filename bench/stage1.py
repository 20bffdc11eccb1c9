"""Stage-1 throughput: the DALI CPU dump against a torchvision ImageFolder + DataLoader dump of the same teacher at
equal threads, on an ImageNet-like JPEG set; decode-only throughput both ways; bank bytes per sample.

    .venv/bin/python bench/stage1.py                 # 1500 train + 200 val JPEGs of ~400x350 px, 2 threads
    .venv/bin/python bench/stage1.py --images 300 --val-images 100 --repeats 1 --no-md   # quick look

The data set is made once from the 20 real ImageNet photographs of the foolbox wheel (``make setup`` installs them
in tests/.data/foolbox): random crops resized to 380-420 x 330-370 px, JPEG quality 90, spread over 1000 class
folders (so the bank has ImageNet's C = 1000). Teachers: the project's tiny ``democnn_s`` (the cheapest teacher
here) and torchvision ``resnet18``, both random-init (``--weights none``). Equal threads: DALI ``num_threads=T``
vs DataLoader ``num_workers=T``; the teacher runs with ``torch.set_num_threads(T)`` in both. Every measurement is
cold-start to last batch (DALI pipeline build / DataLoader worker start included), in wall and CPU seconds; the
best of ``--repeats`` interleaved runs is kept, so both paths see the same machine load. Writes its figures to the
"Stage 1" section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import platform
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline.bank.writer import create_bank, mark_complete, write_chunk  # noqa: E402
from pipeline.data.dali import build_pipeline, iterate  # noqa: E402
from pipeline.data import build_manifest  # noqa: E402
from pipeline.data.presets import get_preset  # noqa: E402
from pipeline.models.teachers import build_teachers, parse_teachers  # noqa: E402
from benchmd import write_section  # noqa: E402  (bench/ is on sys.path when run as a script)

SECTION = "Stage 1: DALI CPU dump vs torchvision DataLoader (bench/stage1.py)"
FOOLBOX = REPO / "tests" / ".data" / "foolbox"


def make_dataset(root: Path, n_train: int, n_val: int, classes: int = 1000, seed: int = 0) -> Path:
    """``root/{train,val}/n%08d/*.jpg``: ImageNet-sized JPEGs cut from the foolbox photographs. Idempotent."""
    from PIL import Image

    marker = root / ".complete"
    want = f"{n_train} {n_val} {classes} {seed}"
    if marker.is_file() and marker.read_text() == want:
        return root
    sources = sorted(FOOLBOX.glob("imagenet_*.jpg"))
    if not sources:
        raise SystemExit(f"no foolbox JPEGs in {FOOLBOX}: run make setup")
    photos = [Image.open(p).convert("RGB") for p in sources]
    shutil.rmtree(root, ignore_errors=True)
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("val", n_val)):
        for k in range(n):
            im = photos[int(rng.integers(len(photos)))]
            w, h = int(rng.integers(380, 421)), int(rng.integers(330, 371))
            frac = rng.uniform(0.55, 1.0)
            cw = min(im.width, int(im.width * frac))
            ch = min(im.height, int(cw * h / w))
            x, y = int(rng.integers(0, im.width - cw + 1)), int(rng.integers(0, im.height - ch + 1))
            out = im.crop((x, y, x + cw, y + ch)).resize((w, h), Image.BILINEAR)
            if rng.random() < 0.5:
                out = out.transpose(Image.FLIP_LEFT_RIGHT)
            d = root / split / f"n{k % classes:08d}"
            d.mkdir(parents=True, exist_ok=True)
            out.save(d / f"{split}_{k:06d}.jpg", quality=90)
    marker.write_text(want)
    return root


def cpu_seconds() -> float:
    """User + system CPU time of this process and its reaped children (the DataLoader workers once joined)."""
    import resource

    a, b = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return a.ru_utime + a.ru_stime + b.ru_utime + b.ru_stime


def timed(fn) -> tuple[float, float]:
    """(wall seconds, CPU seconds) of ``fn()``."""
    c0, t0 = cpu_seconds(), time.perf_counter()
    fn()
    return time.perf_counter() - t0, cpu_seconds() - c0


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


# --- the two paths ---------------------------------------------------------------------------------------------


def dali_decode(root: Path, split: str, threads: int, batch: int) -> tuple[float, int]:
    m = build_manifest(root, split)
    t0 = time.perf_counter()
    pipe = build_pipeline(m, np.arange(len(m)), get_preset("imagenet"), "eval", batch, threads, "cpu")
    n = sum(len(b.index) for b in iterate(pipe, len(m), batch))
    return time.perf_counter() - t0, n


def _tv_loader(root: Path, split: str, threads: int, batch: int):
    import torchvision.datasets as D
    import torchvision.transforms as T

    p = get_preset("imagenet")
    tf = T.Compose([T.Resize(p.resize), T.CenterCrop(p.crop), T.ToTensor(), T.Normalize(p.mean, p.std)])
    ds = D.ImageFolder(str(root / split), transform=tf)
    return ds, torch.utils.data.DataLoader(ds, batch_size=batch, shuffle=False, num_workers=threads)


def tv_decode(root: Path, split: str, threads: int, batch: int) -> tuple[float, int]:
    t0 = time.perf_counter()
    _, loader = _tv_loader(root, split, threads, batch)
    n = sum(len(y) for _, y in loader)
    return time.perf_counter() - t0, n


def dali_dump(root: Path, split: str, teacher: str, threads: int, batch: int, out: Path) -> float:
    """The real command, ``python -m pipeline.dump_logits`` (in process): manifest, teacher, DALI, bank, metrics."""
    from pipeline.dump_logits import main

    shutil.rmtree(out, ignore_errors=True)
    argv = ["--teacher", teacher, "--weights", "none", "--data", str(root), "--split", split, "--preset", "imagenet",
            "--device", "cpu", "--batch-size", str(batch), "--workers", str(threads), "--out", str(out)]
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        rc = main(argv)
    if rc != 0:
        raise SystemExit(f"dump failed: {argv}")
    return time.perf_counter() - t0


def tv_dump(root: Path, split: str, teacher: str, threads: int, batch: int, out: Path,
            rows_per_chunk: int = 1024) -> float:
    """The same teacher (same seed) on ImageFolder + DataLoader batches, written with the same bank writer."""
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    m = build_manifest(root, split)
    model = build_teachers(parse_teachers([teacher], ["none"]), m.num_classes, "cpu")
    ds, loader = _tv_loader(root, split, threads, batch)
    assert [Path(p).relative_to(root).as_posix() for p, _ in ds.samples] == list(m.files)  # same row order
    logits = np.empty((len(m), m.num_classes), np.float32)
    pos = 0
    for x, _ in loader:
        logits[pos:pos + len(x)] = model(x)[:, 0].numpy()
        pos += len(x)
    g = create_bank(out, {"key": "tv", "metrics": {}}, (len(m), 1, 1, m.num_classes), "float16", rows_per_chunk)
    r = g["logits"].chunks[0]
    for j, s in enumerate(range(0, len(m), r)):
        e = min(len(m), s + r)
        write_chunk(g, j, logits[s:e, None, None], m.labels[s:e], np.full((e - s, 1, 5), np.nan), np.zeros(e - s, bool))
    mark_complete(g, {})
    return time.perf_counter() - t0


def compare(dali_bank: Path, tv_bank: Path) -> dict:
    import zarr

    a = np.asarray(zarr.open_group(str(dali_bank), mode="r")["logits"][:, 0, 0], np.float32)
    b = np.asarray(zarr.open_group(str(tv_bank), mode="r")["logits"][:, 0, 0], np.float32)
    return {"mean_abs": float(np.abs(a - b).mean()), "scale": float(np.abs(b).mean()),
            "top1_agree": float((a.argmax(1) == b.argmax(1)).mean())}


# --- report ----------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=1500, help="train JPEGs (decode-only and the cheap teacher)")
    p.add_argument("--val-images", type=int, default=200, help="val JPEGs (the heavier teacher)")
    p.add_argument("--teachers", nargs=2, default=["democnn_s", "resnet18"],
                   help="cheap teacher (train split), heavier teacher (val split)")
    p.add_argument("--threads", type=int, default=2, help="DALI threads = DataLoader workers = torch threads")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3, help="interleaved runs per measurement (best kept)")
    p.add_argument("--data", default=str(REPO / "data" / "bench-imagenet-like"))
    p.add_argument("--no-md", action="store_true", help="do not write BENCHMARKS.md")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    import logging

    logging.basicConfig(level=logging.WARNING)

    load_before = os.getloadavg()[0]
    t0 = time.perf_counter()
    root = make_dataset(Path(args.data), args.images, args.val_images)
    jpeg_kb = dir_bytes(root / "train") / args.images / 1e3
    print(f"data set {root}: {args.images} + {args.val_images} JPEGs, {jpeg_kb:.0f} KB each on average "
          f"({time.perf_counter() - t0:.1f}s)", flush=True)
    tmp = Path(tempfile.mkdtemp(prefix="bench_stage1_"))
    cheap, heavy = args.teachers
    T, B = args.threads, args.batch_size
    cases = {
        "decode": ("train", None, lambda: dali_decode(root, "train", T, B)[0],
                   lambda: tv_decode(root, "train", T, B)[0]),
        cheap: ("train", cheap, lambda: dali_dump(root, "train", cheap, T, B, tmp / "dali_cheap.zarr"),
                lambda: tv_dump(root, "train", cheap, T, B, tmp / "tv_cheap.zarr")),
        heavy: ("val", heavy, lambda: dali_dump(root, "val", heavy, T, B, tmp / "dali_heavy.zarr"),
                lambda: tv_dump(root, "val", heavy, T, B, tmp / "tv_heavy.zarr")),
    }
    inf = float("inf")
    best = {k: {"dali": inf, "tv": inf} for k in cases}  # wall seconds
    best_cpu = {k: {"dali": inf, "tv": inf} for k in cases}  # CPU seconds
    runs: list[tuple[int, str, str, float, float]] = []  # (run, case, path, wall, cpu) for the spread
    try:
        dali_decode(root, "val", T, B)  # warm-up: imports, DALI plugin loading, page cache
        tv_decode(root, "val", T, B)
        for rep in range(args.repeats):
            for name, (_, _, run_dali, run_tv) in cases.items():
                order = (("dali", run_dali), ("tv", run_tv))
                for path, fn in order if rep % 2 == 0 else order[::-1]:  # alternate who goes first
                    wall, cpu = timed(fn)
                    best[name][path] = min(best[name][path], wall)
                    best_cpu[name][path] = min(best_cpu[name][path], cpu)
                    runs.append((rep + 1, name, path, wall, cpu))
                    print(f"  run {rep + 1} {name:20s} {path:4s} {wall:6.2f}s wall {cpu:6.2f}s CPU", flush=True)
        sanity = {cheap: compare(tmp / "dali_cheap.zarr", tmp / "tv_cheap.zarr"),
                  heavy: compare(tmp / "dali_heavy.zarr", tmp / "tv_heavy.zarr")}
        bank_bytes = dir_bytes(tmp / "dali_cheap.zarr") / args.images
        logit_bytes = dir_bytes(tmp / "dali_cheap.zarr" / "logits") / args.images
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    load_after = os.getloadavg()[0]
    rows = []
    for name, (split, teacher, _, _) in cases.items():
        n = args.images if split == "train" else args.val_images
        d, t = n / best[name]["dali"], n / best[name]["tv"]
        dc, tc = n / best_cpu[name]["dali"], n / best_cpu[name]["tv"]
        what = "decode + resize 256 + crop 224 + normalize only" if teacher is None else f"full dump, teacher {teacher}"
        rows.append((what, n, d, t, d / t, dc, tc, dc / tc))
    tab = ["| measurement | images | DALI img/s | torchvision img/s | DALI / torchvision (wall) "
           "| DALI img per CPU-s | torchvision img per CPU-s | DALI / torchvision (CPU) |", "|---" * 8 + "|"]
    tab += [f"| {w} | {n} | {d:.0f} | {t:.0f} | **{r:.2f}x** | {dc:.0f} | {tc:.0f} | {rc:.2f}x |"
            for w, n, d, t, r, dc, tc, rc in rows]
    tab = "\n".join(tab)
    print()
    print(tab)
    for k, v in sanity.items():
        print(f"{k}: DALI vs torchvision logits mean |diff| {v['mean_abs']:.4f} (mean |logit| {v['scale']:.4f}), "
              f"top-1 agreement {100 * v['top1_agree']:.1f}%")
    print(f"bank bytes/sample (C=1000, fp16, all arrays): {bank_bytes:.0f}; logits only: {logit_bytes:.0f}")

    cmd = " ".join(["python bench/stage1.py", *map(shlex.quote, argv if argv is not None else sys.argv[1:])])
    runs_tab = ["| run | " + " | ".join(f"{c} {pth}" for c in cases for pth in ("dali", "tv")) + " |",
                "|---|" + "---|" * (2 * len(cases))]
    for rep in range(1, args.repeats + 1):
        cell = {(c, pth): (w, cp) for r, c, pth, w, cp in runs if r == rep}
        runs_tab.append(f"| {rep} | " + " | ".join(f"{cell[c, pth][0]:.1f} / {cell[c, pth][1]:.1f}"
                                                   for c in cases for pth in ("dali", "tv")) + " |")
    runs_tab = "\n".join(runs_tab)
    cheap_ratio, cheap_cpu_ratio = rows[1][4], rows[1][7]
    verdict = "meets" if cheap_ratio >= 1.3 else "misses"
    # per-image CPU milliseconds: decoding on each path, and what the teacher adds on top (same on both paths)
    dec_d = 1e3 * best_cpu["decode"]["dali"] / args.images
    dec_t = 1e3 * best_cpu["decode"]["tv"] / args.images
    teach = {name: max(0.0, 1e3 * best_cpu[name]["dali"] / (args.images if cases[name][0] == "train"
                                                             else args.val_images) - dec_d) for name in (cheap, heavy)}
    bound = {name: (teach[name] + dec_t) / (teach[name] + dec_d) for name in (cheap, heavy)}
    needed = max(0.0, (dec_t - 1.3 * dec_d) / 0.3)  # teacher ms/image below which 1.3x is reachable on CPU
    import nvidia.dali

    body = f"""Command: `{cmd}` ({platform.machine()}, {os.cpu_count()} CPU cores shared with other jobs, no GPU;
1-minute load average {load_before:.1f} at the start and {load_after:.1f} at the end, so absolute figures are low and
noisy: the ratios, measured interleaved in one run, are the result; DALI {nvidia.dali.__version__},
torch {torch.__version__}).

Data: {args.images} train + {args.val_images} val JPEGs of 380-420 x 330-370 px ({jpeg_kb:.0f} KB on average), cut
from the 20 foolbox ImageNet photographs, in 1000 class folders. Preset `imagenet` (resize 256, center crop 224,
normalize). Equal threads: DALI `num_threads={T}` vs `DataLoader(num_workers={T})` (PIL decoding, torchvision
transforms), `torch.set_num_threads({T})` for the teacher in both; batch {B}; random-init teachers
(`--weights none`, the same seeded weights on both paths). Cold start to last batch, best of {args.repeats}
interleaved runs. The DALI figure is the real command (`pipeline.dump_logits`: manifest, teacher, bank writing,
metrics); the torchvision path writes its logits with the same bank writer.

{tab}

- Target of issue 2 (DALI path >= 1.3x the torchvision path): **{verdict}** on the full dump with {cheap}
  ({cheap_ratio:.2f}x wall, {cheap_cpu_ratio:.2f}x per CPU-second); decoding alone is {rows[0][4]:.2f}x wall,
  {rows[0][7]:.2f}x per CPU-second.
- Why, from the CPU figures: decoding + preprocessing costs {dec_d:.1f} ms of CPU per image with DALI and
  {dec_t:.1f} ms with PIL/torchvision; the teacher adds about {teach[cheap]:.1f} ms ({cheap}) and {teach[heavy]:.0f} ms
  ({heavy}) per image on both paths, so on a CPU-only machine the dump ratio is bounded near
  {bound[cheap]:.2f}x and {bound[heavy]:.2f}x (Amdahl). 1.3x needs a teacher under {needed:.1f} ms of CPU per image,
  or the teacher off the CPU (`--device cuda`, where DALI also decodes on the GPU with `mixed`).
- Wall-time ratios swing from run to run with the other jobs' load (every run below); the CPU columns (images
  per CPU-second of the process and its DataLoader workers, from `getrusage`) are stable across runs and are what
  the wall ratio approaches on an idle machine where both paths saturate {T} cores. Spinning OpenMP threads count
  as CPU time on both paths.
- Same logits both ways up to resampling detail: mean |DALI - torchvision| {sanity[cheap]['mean_abs']:.2e} for
  {cheap} (mean |logit| {sanity[cheap]['scale']:.2e}), top-1 agreement {100 * sanity[cheap]['top1_agree']:.1f}%;
  {heavy}: {sanity[heavy]['mean_abs']:.2e} ({sanity[heavy]['scale']:.2e}), {100 * sanity[heavy]['top1_agree']:.1f}%.
- Bank size: {bank_bytes:.0f} bytes/sample on disk for C = 1000 fp16 (logits {logit_bytes:.0f}; labels, views,
  flags and metadata the rest), i.e. {bank_bytes * 1_281_167 / 1e9:.2f} GB for ImageNet train. Random-init
  logits; see the chunking section for compression of teacher-like logits.
- For comparison, docs/DESIGN.md's figures on a quiet machine (DALI 2.4 CPU decode 1,306 img/s with 2 threads, PIL
  decode + crop about 330 img/s per core) put the decode-only ratio near 2x.

Every run (wall s / CPU s):

{runs_tab}
"""
    if not args.no_md:
        write_section(SECTION, body)
        print(f"\nwrote section '{SECTION}' of {REPO / 'BENCHMARKS.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
