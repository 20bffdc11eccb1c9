"""Compact formats where they matter: students trained at 100 classes from dense, int8, top-k 5 / 10 and sampled
5+5 banks of one teacher, at the methods' default temperatures (issue 22, point 3).

    python bench/formats100.py                       # the full measurement (about an hour on 2 busy cores)
    python bench/formats100.py --quick --no-md       # a few minutes: tiny data, to check the flow

The task is ``prepare-demo --task pairs100`` (two Fashion-MNIST items stacked, class = (top, bottom): 20,000 train
/ 5,000 val images of 32 px). A ``democnn`` teacher is trained with cross-entropy; its train and val banks are
dumped once (dense float16), every compact bank is made from the dense one with ``labels compact``, and
``democnn_s`` students train from each with KD (T = 4, alpha 0.9) and WSLD (T = 2), plus a CE student. Reported per
student: top-1, ECE, NLL and agreement with the teacher on val (its val bank); per bank: bytes per sample on disk
and the fidelity ``labels info`` reports. Every step is resumable: a finished run or bank is reused (work folder
``--work``, default ``bench_work/formats100``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

SECTION = "Compact formats at 100 classes: students from each bank (bench/formats100.py)"
FORMATS = {"dense": [], "int8": ["--format", "int8"], "topk5": ["--topk", "5"], "topk10": ["--topk", "10"],
           "sampled5+5": ["--topk", "5", "--samples", "5"]}
METHODS = {"kd": ["loss.T=4", "loss.alpha=0.9"], "wsld": ["loss.T=2"]}


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default=str(REPO / "bench_work" / "formats100"))
    p.add_argument("--quick", action="store_true", help="tiny data and 1 epoch (checks the flow)")
    p.add_argument("--teacher-epochs", type=int, default=12)
    p.add_argument("--student-epochs", type=int, default=10)
    p.add_argument("--seeds", type=int, default=1)
    p.add_argument("--no-md", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    from pipeline.data.embedded import prepare_pairs_dataset
    from pipeline.dump_logits import main as dump
    from pipeline.labels import main as labels
    from pipeline.train_student import main as train

    work = Path(args.work) / ("quick" if args.quick else "full")
    work.mkdir(parents=True, exist_ok=True)
    os.environ["KD_CACHE"] = str(work / "cache")
    caps = {"train": 4, "heldout": 1, "val": 2} if args.quick else {"train": 200, "heldout": 20, "val": 50}
    t_epochs, s_epochs = (1, 1) if args.quick else (args.teacher_epochs, args.student_epochs)
    data = prepare_pairs_dataset(work / "pairs", caps)
    t0 = time.time()
    common = ["--data", str(data), "--preset", "demo", "--workers", "2", "--batch-size", "128"]
    teacher = work / "teacher"
    if not (teacher / "final.json").is_file():  # a killed teacher run continues from its last epoch
        again = ["--resume"] if (teacher / "last.pt").is_file() else ["--overwrite"]
        assert train(["--method", "ce", "--student", "democnn", "--epochs", str(t_epochs), *common, "--output-dir",
                      str(teacher), *again, "--lr", "0.1", "optim.nesterov=true", "--wd", "5e-4",
                      "sched.warmup_epochs=0.5"]) == 0
    t_teacher = time.time() - t0
    banks: dict[str, Path] = {"dense": work / "banks" / "dense.zarr"}
    tw = ["--teacher", "democnn", "--weights", str(teacher / "best.pt"), "--data", str(data), "--preset", "demo",
          "--batch-size", "256"]
    if dump([*tw, "--split", "train", "--out", str(banks["dense"])]) != 0 or dump([*tw, "--split", "val"]) != 0:
        raise SystemExit("dump failed")
    for name, flags in FORMATS.items():
        if name == "dense":
            continue
        banks[name] = work / "banks" / f"{name}.zarr"
        if not banks[name].exists():
            assert labels(["compact", str(banks["dense"]), "-o", str(banks[name]), "--no-progress", *flags]) == 0
    rows = []
    for seed in range(args.seeds):
        runs = [("ce", "-", None)] + [(m, f, b) for m in METHODS for f, b in banks.items()]
        for method, fmt, bank in runs:
            out = work / "runs" / f"{method}-{fmt}-s{seed}"
            if not (out / "final.json").is_file():
                extra = ["--labels", str(bank), *METHODS[method]] if bank is not None else []
                assert train(["--method", method, "--student", "democnn_s", "--epochs", str(s_epochs), *common,
                              "--seed", str(seed), "--output-dir", str(out), "--overwrite", "--lr", "0.1",
                              "optim.nesterov=true", "--wd", "5e-4", "sched.warmup_epochs=0.5", *extra]) == 0
            final = json.loads((out / "final.json").read_text())
            rows.append({"method": method, "format": fmt, "seed": seed, **{k: final.get(k) for k in (
                "top1", "ece", "nll", "teacher_agreement", "teacher_kl")}})
    teacher_top1 = json.loads((teacher / "final.json").read_text())["top1"]
    from pipeline.bank.reader import LabelBank

    n = LabelBank(banks["dense"]).num_samples
    size = {f: _size(b) / n for f, b in banks.items()}
    fid = {f: (LabelBank(b).attrs.get("fidelity") or {}) for f, b in banks.items()}
    lines = [f"Command: `python bench/formats100.py{' --quick' if args.quick else ''}` (x86_64, 2 CPU cores shared "
             f"with other jobs). Task: pairs100, {n} train images, 100 classes; teacher democnn ({t_epochs} epochs "
             f"CE, val top-1 {teacher_top1:.2f}%, {t_teacher / 60:.0f} min); students democnn_s, {s_epochs} epochs, "
             f"SGD lr 0.1 cosine, {args.seeds} seed(s). KD: T = 4, alpha = 0.9; WSLD: T = 2. Agreement / KL: with the "
             "teacher on val (its dense val bank).", "",
             "| method | bank | bytes / sample | fidelity KL at T=4 | top-1 | ECE | NLL | agreement % | KL(t‖s) |",
             "|---|---|---|---|---|---|---|---|---|"]
    def num(v, digits: int) -> str:
        return "n/a" if v is None else f"{v:.{digits}f}"

    for r in rows:
        f = r["format"]
        bank_cols = (f"{size[f]:.0f} | {num(fid.get(f, {}).get('kl_t4'), 4)}" if f in size else "- | -")
        lines.append(f"| {r['method']} | {f} | {bank_cols} | {r['top1']:.2f} | {r['ece']:.4f} | {r['nll']:.4f} | "
                     f"{num(r['teacher_agreement'], 2)} | {num(r['teacher_kl'], 4)} |")
    lines.append(f"\nTotal time {(time.time() - t0) / 60:.0f} min (finished steps reused).")
    text = "\n".join(lines)
    print(text)
    if not args.no_md:
        from benchmd import write_section

        write_section(SECTION, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
