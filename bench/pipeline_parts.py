"""Each stage against its parts, in CPU time per image (issue 24, point 4): how close the whole stage comes to
what its loader and its model cost when run alone.

    python bench/pipeline_parts.py               # 10,000 demo images (Fashion-MNIST), democnn_s, 2 rounds
    python bench/pipeline_parts.py --quick --no-md   # 3,000 images, 2 rounds: under 2 minutes on 2 cores

Stage 1, per image: the loader alone (decode + preprocess, every batch consumed), the teacher alone (its forward
on pre-decoded batches), the whole dump (``run_dump``: manifest, teacher, device checks, background writer,
compact encoding; start-up measured with a 1-batch dump and subtracted) for ``dense`` and ``topk`` banks.
Stage 2, per image: the loader alone (train mode), the student's step alone (forward, loss, backward, SGD on
pre-decoded batches, labels gathered from the bank), and the whole epoch (``run_training`` for one epoch; its
start-up, a 1-step run, subtracted). CPU time is the process's user + system time (all threads: DALI's, torch's)
plus its children's (loader workers), from ``getrusage``; it is steadier than wall time on a shared machine.
Efficiency = (loader + model) / whole: 1.0 means the stage costs exactly its parts. Wall time per image is
reported next to it (the parts' walls add up only when nothing overlaps; the whole stage overlaps loader threads,
the teachers and the background writer, so its wall efficiency can exceed 1). One warm-up pass of every part
runs before the rounds (first-call costs of oneDNN and DALI are not the stage's).
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
from typing import Callable

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

SECTION = "Each stage against its parts, CPU time per image (bench/pipeline_parts.py)"


def cpu_seconds() -> float:
    s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime


def timed(fn: Callable[[], object]) -> tuple[float, float]:
    """(CPU seconds, wall seconds) of ``fn()``."""
    c0, w0 = cpu_seconds(), time.perf_counter()
    with contextlib.redirect_stderr(io.StringIO()):  # progress bars
        fn()
    return cpu_seconds() - c0, time.perf_counter() - w0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=10000, help="training images (default 10,000)")
    p.add_argument("--rounds", type=int, default=2, help="interleaved rounds; the best is kept (default 2)")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--no-md", action="store_true", help="do not write BENCHMARKS.md")
    p.add_argument("--quick", action="store_true", help="3,000 images, 2 rounds (under 2 minutes on 2 cores)")
    args = p.parse_args(argv)
    if args.quick:
        args.images, args.rounds = 3000, 2
    logging.disable(logging.INFO)
    torch.set_num_threads(args.workers)

    from pipeline.config import from_dict
    from pipeline.data import build_manifest
    from pipeline.data.embedded import prepare_default_dataset
    from pipeline.data.loaders import load_batches, resolve_loader
    from pipeline.data.presets import get_preset
    from pipeline.models import create_model
    from stage1_teacher_logits.dump import DumpConfig, run_dump
    from stage2_student_train import TrainConfig, run_training

    work = Path(tempfile.mkdtemp(prefix="pipeline_parts-"))
    os.environ["KD_CACHE"] = str(work / "cache")
    per_class = args.images // 10
    root = prepare_default_dataset(work / "fmnist", {"train": per_class, "val": 10})
    m = build_manifest(root, "train")
    n = len(m)
    preset, loader = get_preset("demo"), resolve_loader("auto")
    order = np.arange(n)
    torch.manual_seed(0)
    teacher = create_model("democnn_s", 10, "none").eval()
    weights = work / "teacher.pt"
    torch.save({"model": teacher.state_dict()}, weights)
    batches = [b.images for b in load_batches(loader, m, order, preset, "eval", args.batch, args.workers, "cpu")]

    def loader_only(mode: str) -> None:
        for _ in load_batches(loader, m, order, preset, mode, args.batch, args.workers, "cpu", 1):
            pass

    def teacher_only() -> None:
        with torch.inference_mode():
            for x in batches:
                teacher(x)

    def dump(fmt: str, k: int, tag: str, limit: int | None = None) -> None:
        extra = {"format": fmt, "topk": 5} if fmt == "topk" else {}
        cfg = from_dict(DumpConfig, {"teacher": ["democnn_s"], "weights": [str(weights)], "data": str(root),
                                     "preset": "demo", "batch_size": args.batch, "workers": args.workers,
                                     "loader": loader, "rows_per_chunk": 4096, **extra,
                                     "out": str(work / f"{tag}-{k}.zarr")})
        run_dump(cfg)

    bank = work / "bank.zarr"
    run_dump(from_dict(DumpConfig, {"teacher": ["democnn_s"], "weights": [str(weights)], "data": str(root),
                                    "preset": "demo", "batch_size": args.batch, "workers": args.workers,
                                    "loader": loader, "out": str(bank)}))

    def train(k: int, steps: int) -> None:
        cfg = from_dict(TrainConfig, {"method": "kd", "student": "democnn_s", "banks": [str(bank)], "data": str(root),
                                      "preset": "demo", "epochs": 1, "batch_size": args.batch,
                                      "workers": args.workers, "loader": loader, "max_steps_per_epoch": steps,
                                      "output_dir": str(work / f"run-{k}-{steps}"), "overwrite": True,
                                      "log_every": 10**6})
        run_training(cfg)

    import kd_losses
    from pipeline.bank.reader import LabelBank
    from stage2_student_train.label_sources import BankLabelSource

    src = BankLabelSource([LabelBank(bank)])
    student = create_model("democnn_s", 10)
    opt = torch.optim.SGD(student.parameters(), lr=0.01, momentum=0.9)
    kd = kd_losses.build_loss("kd", num_classes=10)
    labels = torch.from_numpy(m.labels.astype(np.int64))

    def step_only() -> None:
        for j, x in enumerate(batches):
            index = torch.arange(j * args.batch, j * args.batch + len(x))
            b = {"image": x, "label": labels[index], "index": index, "epoch": 0}
            b.update(src(b))
            loss = kd(student(x), b)["loss"]
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

    steps = -(-n // args.batch)
    best: dict[str, float] = {}
    wall: dict[str, float] = {}
    for warm in (lambda: loader_only("eval"), teacher_only, step_only):
        timed(warm)
    for r in range(args.rounds):
        runs = {
            "s1 loader": lambda: loader_only("eval"), "s1 teacher": teacher_only,
            "s1 dump dense": lambda: dump("dense", r, "dense"),
            "s1 dump topk": lambda: dump("topk", r, "topk"),
            "s2 loader": lambda: loader_only("train"), "s2 step": step_only,
            "s2 epoch": lambda: train(r, steps), "s2 start": lambda: train(r, 1),
        }
        for name, fn in runs.items():
            cpu, w = timed(fn)
            best[name] = min(best.get(name, float("inf")), cpu)
            wall[name] = min(wall.get(name, float("inf")), w)
    # stage 1's start-up (manifest, teacher build, bank creation, finalize, process start of the loader): the dump
    # of a one-batch dataset in the same format (a top-5 bank creates more arrays than a dense one)
    small = prepare_default_dataset(work / "small", {"train": max(1, args.batch // 10), "val": 1})
    start: dict[str, list[tuple[float, float]]] = {"dense": [], "topk": []}
    for r in range(args.rounds):
        for f in start:
            def small_dump(f: str = f) -> None:
                extra = {"format": "topk", "topk": 5} if f == "topk" else {}
                run_dump(from_dict(DumpConfig, {"teacher": ["democnn_s"], "weights": [str(weights)],
                                                "data": str(small), "preset": "demo", "batch_size": args.batch,
                                                "workers": args.workers, "loader": loader, **extra,
                                                "out": str(work / f"small-{f}-{r}.zarr")}))
            start[f].append(timed(small_dump))
    us = {k: 1e6 * v / n for k, v in best.items()}
    wus = {k: 1e6 * v / n for k, v in wall.items()}
    for f, runs in start.items():
        us[f"s1 dump {f}"] -= 1e6 * min(c for c, _ in runs) / n
        wus[f"s1 dump {f}"] -= 1e6 * min(w for _, w in runs) / n
    for d in (us, wus):
        d["s2 epoch"] -= d["s2 start"]
    s1_parts = (us["s1 loader"] + us["s1 teacher"], wus["s1 loader"] + wus["s1 teacher"])
    s2_parts = (us["s2 loader"] + us["s2 step"], wus["s2 loader"] + wus["s2 step"])

    def row(name: str, key: str, parts: tuple[float, float] | None = None) -> str:
        eff = f"{parts[0] / us[key]:.2f} | {parts[1] / wus[key]:.2f}" if parts else " | "
        return f"| {name} | {us[key]:.0f} | {wus[key]:.0f} | {eff} |"

    load = os.getloadavg()[0]
    cmd = "--quick" if args.quick else f"--images {args.images} --rounds {args.rounds}"
    text = "\n".join([
        f"Command: `python bench/pipeline_parts.py {cmd}` (x86_64, 2 CPU cores shared with other jobs, 1-minute "
        f"load {load:.1f} at the end; loader {loader}, {args.workers} threads/workers, batch {args.batch}; "
        f"democnn_s teacher and student on {n} Fashion-MNIST images, 28 px, preset demo). CPU and wall time per "
        f"image (CPU: user + system, all threads and worker processes), best of the rounds after one warm-up pass; "
        f"the whole stages with their start-up subtracted (stage 1: a {len(build_manifest(small, 'train'))}-image "
        f"dump of the same format; stage 2: a 1-step run). Efficiency = (loader + model alone) / whole stage (target >= 0.75).", "",
        "| measurement | CPU µs per image | wall µs per image | efficiency (CPU) | efficiency (wall) |",
        "|---|---:|---:|---:|---:|",
        row("stage 1: loader alone (eval)", "s1 loader"), row("stage 1: teacher alone", "s1 teacher"),
        row("stage 1: whole dump, dense", "s1 dump dense", s1_parts),
        row("stage 1: whole dump, top-5", "s1 dump topk", s1_parts),
        row("stage 2: loader alone (train)", "s2 loader"), row("stage 2: student step alone (KD, bank)", "s2 step"),
        row("stage 2: whole epoch (KD, bank)", "s2 epoch", s2_parts), "",
        f"Top-5 dump / dense dump, CPU per image: {us['s1 dump topk'] / us['s1 dump dense']:.2f} "
        f"(wall {wus['s1 dump topk'] / wus['s1 dump dense']:.2f}); target <= 1 (compact as fast as dense)."])
    print(text)
    if not args.no_md:
        from benchmd import write_section

        write_section(SECTION, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
