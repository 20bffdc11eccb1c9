"""``python -m pipeline.experiments SUITE`` (``make results``): the seeds' experiments on the embedded data, on CPU.

Each suite trains its teachers, dumps their banks once (content-addressed, shared across suites), trains the
students with 3 seeds, and rewrites its own section of RESULTS.md (mean ± std of top-1 and ECE) plus a PNG
plot. Finished runs are reused and interrupted runs resumed, so re-running a suite continues where it stopped.

Suites: methods, tfkd, label-opt, label-efficiency, offline-vs-live, formats, views. ``--scale tiny`` runs each in a
few steps (what the tests use); nothing in RESULTS.md is edited by hand.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Sequence

from pipeline.config import from_dict, to_dict
from pipeline.errors import UsageError, cli_entry, setup_logging

log = logging.getLogger("pipeline.experiments")


@dataclass(frozen=True)
class Scale:
    """How big a suite runs. ``max_steps`` > 0 caps steps per epoch (tiny scale)."""

    train_per_class: int = 300
    val_per_class: int = 200
    teacher_epochs: int = 6
    student_epochs: int = 5
    seeds: tuple[int, ...] = (0, 1, 2)
    batch_size: int = 128
    max_steps: int = 0
    labeled: int = 500
    lr: float = 0.05


SCALES = {
    "full": Scale(),
    "tiny": Scale(train_per_class=20, val_per_class=10, teacher_epochs=1, student_epochs=1, seeds=(0,),
                  batch_size=32, max_steps=2, labeled=60),
}


@dataclass(frozen=True)
class Arm:
    """One row of a suite's table: a student recipe run over every seed."""

    label: str
    method: str
    student: str = "democnn_s"
    teachers: tuple[str, ...] = ()  # names of the suite's teachers whose banks are stacked on T
    loss: dict[str, Any] = field(default_factory=dict)
    live: str | None = None  # run this teacher live instead of reading its bank
    views: int = 1  # > 1: a K-view rrc+flip bank replayed in stage 2
    fmt: str | None = None  # compact form of the bank: "topk" (with ``k``) or "int8"
    k: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    note: str = ""


@dataclass(frozen=True)
class TeacherJob:
    name: str
    arch: str
    epochs: int | None = None  # None: the scale's teacher_epochs
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Suite:
    name: str
    title: str
    claim: str
    teachers: tuple[TeacherJob, ...]
    arms: tuple[Arm, ...]
    preset: str = "demo"
    reading: Callable[[dict[str, dict]], str] | None = None


def _dkd(scale: Scale) -> dict:
    return {"warmup_epochs": max(1, scale.student_epochs // 4)}


def suites(scale: Scale) -> dict[str, Suite]:
    big, small = "democnn", "democnn_s"
    t_big = TeacherJob("big", big)
    return {s.name: s for s in [
        Suite("methods", "Methods from one bank", "every logit method from one teacher bank (one bank serves many students)",
              (t_big,), (
                  Arm("ce", "ce"), Arm("ls", "ls"), Arm("kd", "kd", teachers=("big",)),
                  Arm("wsld", "wsld", teachers=("big",)), Arm("tfkd_reg", "tfkd_reg"),
                  Arm("dkd", "dkd", teachers=("big",), loss=_dkd(scale)), Arm("dist", "dist", teachers=("big",)),
              )),
        Suite("tfkd", "Tf-KD: self-teacher, normal teacher, manual teacher, Re-KD, De-KD",
              "Tf-KD (Yuan et al. 2020): self-training and a manually designed teacher help like KD; a weaker "
              "teacher (Re-KD) and a poorly trained one (De-KD) still help",
              (TeacherJob("self", small), t_big, TeacherJob("poor", big, epochs=1)), (
                  Arm("student ce", "ce"),
                  Arm("tfkd_self (self-teacher)", "tfkd_self", teachers=("self",)),
                  Arm("tfkd_self (normal teacher)", "tfkd_self", teachers=("big",)),
                  Arm("tfkd_reg (manual teacher)", "tfkd_reg"),
                  Arm("De-KD: kd from 1-epoch teacher", "kd", teachers=("poor",)),
                  Arm("big ce", "ce", student=big),
                  Arm("Re-KD: big student, kd from small teacher", "kd", student=big, teachers=("self",)),
              )),
        Suite("label-opt", "Label optimization: SL, SL-Ens, SL-KD, SL-Enc vs vanilla, LS, KD",
              "SL-family students are better calibrated (lower ECE) and at least as accurate as KD",
              (t_big, TeacherJob("r8", "resnet8"), TeacherJob("r14", "resnet14")), (
                  Arm("vanilla", "ce"), Arm("ls", "ls"), Arm("kd", "kd", teachers=("big",)),
                  Arm("sl", "sl", teachers=("big",)), Arm("sl_enc", "sl_enc", teachers=("big",)),
                  Arm("sl_ens (3 teachers)", "sl_ens", teachers=("big", "r8", "r14")),
                  Arm("sl_kd (3 teachers)", "sl_kd", teachers=("big", "r8", "r14")),
              )),
        Suite("label-efficiency", "Label efficiency: few labels plus a bank over all images",
              "teacher labels on unlabelled images beat training on the few labels alone",
              (t_big,), (
                  Arm(f"ce, {scale.labeled} labels (same steps)", "ce", extra={
                      "train_subset": scale.labeled,
                      "epochs": scale.student_epochs * 10 * scale.train_per_class // scale.labeled}),
                  Arm("teacher labels only (kd alpha=1), all images", "kd", teachers=("big",), loss={"alpha": 1.0}),
                  Arm("ce, all labels", "ce"),
              )),
        Suite("offline-vs-live", "Offline bank vs live teacher",
              "a bank gives the accuracy of a live teacher without its cost",
              (t_big,), (
                  Arm("kd, bank", "kd", teachers=("big",)), Arm("kd, live", "kd", live="big"),
                  Arm("wsld, bank", "wsld", teachers=("big",)), Arm("wsld, live", "wsld", live="big"),
              )),
        Suite("formats", "Bank formats: dense vs top-k vs int8",
              "a compact bank (top-k with the rest spread uniformly, as FKD; or int8) trains students as well as the dense one",
              (t_big,), (
                  Arm("dense fp16", "kd", teachers=("big",)),
                  Arm("top-1", "kd", teachers=("big",), fmt="topk", k=1),
                  Arm("top-2", "kd", teachers=("big",), fmt="topk", k=2),
                  Arm("top-4", "kd", teachers=("big",), fmt="topk", k=4),
                  Arm("int8", "kd", teachers=("big",), fmt="int8"),
              )),
        Suite("views", "Consistent views: center bank vs K replayed views vs live teacher (random crops)",
              "replaying the teacher's view (FKD, Beyer et al.) closes the gap between a single precomputed label and a live teacher",
              (TeacherJob("big", big, extra={"preset": "demo_rrc"}),), tuple(
                  a for m in ("kd", "wsld") for a in (
                      Arm(f"{m}, center bank", m, teachers=("big",)),
                      *[Arm(f"{m}, {k} views", m, teachers=("big",), views=k) for k in (4, 8, 16)],
                      Arm(f"{m}, live", m, live="big"),
                  )), preset="demo_rrc"),
    ]}


class Runner:
    """Runs jobs of one suite under ``root``; every step is skipped when its output exists."""

    def __init__(self, root: Path, scale: Scale, data: Path, device: str):
        self.root, self.scale, self.data, self.device = root, scale, data, device

    def _train(self, out: Path, overrides: dict[str, Any]) -> dict:
        from stage2_student_train import TrainConfig, run_training

        if (out / "final.json").is_file():
            return json.loads((out / "final.json").read_text())
        resume = (out / "last.pt").is_file()
        base = {"data": str(self.data), "device": self.device, "output_dir": str(out), "batch_size": self.scale.batch_size,
                "workers": 2, "max_steps_per_epoch": self.scale.max_steps, "log_every": 1000,
                "optim": {"name": "sgd", "lr": self.scale.lr, "momentum": 0.9, "nesterov": True, "weight_decay": 5e-4},
                "sched": {"name": "cosine", "warmup_epochs": 0.5}, "resume": resume, "overwrite": not resume}
        cfg = from_dict(TrainConfig, _merge(base, overrides))
        return run_training(cfg)

    def teacher(self, job: TeacherJob, preset: str) -> str:
        out = self.root / "teachers" / f"{job.name}-{job.arch}-e{job.epochs or self.scale.teacher_epochs}"
        self._train(out, {"method": "ce", "student": job.arch, "preset": preset, "seed": 100,
                          "epochs": job.epochs or self.scale.teacher_epochs, **job.extra})
        return str(out / "last.pt")

    def bank(self, arch: str, ckpt: str, preset: str, views: int = 1) -> str:
        from stage1_teacher_logits import DumpConfig, run_dump

        policy = {"views": views, "view_policy": "rrc+flip"} if views > 1 else {}
        return run_dump(from_dict(DumpConfig, {"teacher": [arch], "weights": [ckpt], "data": str(self.data),
                                               "split": "train", "preset": preset, "device": self.device,
                                               "batch_size": 256, "rows_per_chunk": 1024, **policy}))

    def compact(self, bank: str, fmt: str, k: int | None) -> str:
        from pipeline.bank.tools import compact_bank

        out = f"{bank[:-len('.zarr')]}-{fmt}{k or ''}.zarr"
        if Path(out).exists():
            return out
        return compact_bank(bank, out, fmt, k, progress=False)

    def arm(self, suite: Suite, arm: Arm, teachers: dict[str, tuple[str, str]], seed: int) -> dict:
        over: dict[str, Any] = {"method": arm.method, "student": arm.student, "preset": suite.preset, "seed": seed,
                                "epochs": self.scale.student_epochs, "loss": dict(arm.loss), **arm.extra}
        if arm.live:
            arch, ck = teachers[arm.live]
            over.update({"live_teacher": [arch], "live_teacher_weights": [ck]})
        elif arm.teachers:
            over["banks"] = [self.bank(*teachers[t], suite.preset, arm.views) for t in arm.teachers]
            if arm.fmt:
                over["banks"] = [self.compact(b, arm.fmt, arm.k) for b in over["banks"]]
            if arm.views > 1:
                over["replay_views"] = True
        slug = "".join(c if c.isalnum() else "_" for c in arm.label).strip("_")
        return self._train(self.root / suite.name / slug / f"seed{seed}", over)


def _bank_bytes_per_sample(banks: str | None) -> float | None:
    """Bytes on disk per sample of the bank(s) a run read (None for live teachers / no bank)."""
    if not banks or banks == "live":
        return None
    from pipeline.bank.reader import LabelBank
    from pipeline import storage

    paths = banks.split(",")
    return sum(storage.size(p) for p in paths) / LabelBank(paths[0]).num_samples


def _merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _mean_std(xs: list[float], digits: int = 2) -> str:
    if not xs:
        return "-"
    if len(xs) == 1:
        return f"{xs[0]:.{digits}f}"
    return f"{statistics.mean(xs):.{digits}f} ± {statistics.stdev(xs):.{digits}f}"


def run_suite(name: str, scale: Scale, root: Path, data_root: Path, device: str, results_md: Path | None) -> dict:
    """Run suite ``name`` and (if ``results_md``) rewrite its section. Returns {arm label: summary}."""
    from pipeline.data.embedded import prepare_default_dataset

    all_suites = suites(scale)
    if name not in all_suites:
        raise UsageError(f"unknown suite '{name}'; valid: {', '.join(all_suites)}")
    suite = all_suites[name]
    data = prepare_default_dataset(data_root / f"fmnist-{scale.train_per_class}-{scale.val_per_class}",
                                   {"train": scale.train_per_class, "val": scale.val_per_class})
    runner = Runner(root, scale, data, device)
    t0 = time.time()
    teachers: dict[str, tuple[str, str]] = {}
    teacher_rows = []
    for job in suite.teachers:
        ck = runner.teacher(job, job.extra.get("preset", suite.preset))
        teachers[job.name] = (job.arch, ck)
        fin = json.loads((Path(ck).parent / "final.json").read_text())
        teacher_rows.append((job, fin))
    summary: dict[str, dict] = {}
    for arm in suite.arms:
        finals = [runner.arm(suite, arm, teachers, s) for s in scale.seeds]
        summary[arm.label] = {
            "method": arm.method, "student": arm.student,
            "top1": [f["top1"] for f in finals], "ece": [f["ece"] for f in finals],
            "time_s": [f["train_time_s"] for f in finals],
            "step_ms": [1000 * scale.batch_size / f["train_images_per_s"] for f in finals if f.get("train_images_per_s")],
            "bank_bytes": _bank_bytes_per_sample(finals[0].get("bank")),
        }
    elapsed = time.time() - t0
    if results_md is not None:
        plot = _plot(suite, summary, results_md.parent / "results")
        _write_section(results_md, suite, scale, teacher_rows, summary, plot, elapsed)
    return summary


def _plot(suite: Suite, summary: dict, plot_dir: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(summary)
    means = [statistics.mean(summary[l]["top1"]) for l in labels]
    errs = [statistics.stdev(summary[l]["top1"]) if len(summary[l]["top1"]) > 1 else 0 for l in labels]
    eces = [statistics.mean(summary[l]["ece"]) for l in labels]
    fig, axes = plt.subplots(1, 2, figsize=(11, 0.45 * len(labels) + 1.5))
    axes[0].barh(labels, means, xerr=errs, color="tab:blue")
    axes[0].set_xlim(min(means) - 3 * max(errs + [0.5]) - 1, max(means) + 3 * max(errs + [0.5]) + 1)
    axes[0].set_xlabel("val top-1 (%)")
    axes[0].invert_yaxis()
    axes[1].barh(labels, eces, color="tab:orange")
    axes[1].set_xlabel("val ECE")
    axes[1].invert_yaxis()
    axes[1].set_yticklabels([])
    fig.suptitle(suite.title)
    fig.tight_layout()
    plot_dir.mkdir(parents=True, exist_ok=True)
    path = plot_dir / f"{suite.name}.png"
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def _write_section(md: Path, suite: Suite, scale: Scale, teacher_rows, summary: dict, plot: Path | None,
                   elapsed: float) -> None:
    lines = [f"## {suite.title}", "",
             f"Command: `python -m pipeline.experiments {suite.name}` (scale: {scale.train_per_class} train / "
             f"{scale.val_per_class} val images per class, teachers {scale.teacher_epochs} epochs, students "
             f"{scale.student_epochs} epochs, seeds {list(scale.seeds)}, batch {scale.batch_size}, SGD lr {scale.lr} cosine, CPU; suite wall time "
             f"{elapsed / 60:.1f} min including reused steps).", "",
             f"Published claim under test: {suite.claim}.", "", "Teachers:", ""]
    for job, fin in teacher_rows:
        lines.append(f"- `{job.name}`: {job.arch}, {job.epochs or scale.teacher_epochs} epochs of CE → top-1 {fin['top1']:.2f}, ECE {fin['ece']:.4f}")
    lines += ["", "| arm | method | student | top-1 (%) | ECE | train time (s) | step (ms) | bank B/sample |",
              "|---|---|---|---|---|---|---|---|"]
    for label, s in summary.items():
        step = f"{statistics.mean(s['step_ms']):.1f}" if s["step_ms"] else "-"
        bank = "-" if s["bank_bytes"] is None else f"{s['bank_bytes']:.1f}"
        lines.append(f"| {label} | {s['method']} | {s['student']} | {_mean_std(s['top1'])} | {_mean_std(s['ece'], 4)} | "
                     f"{statistics.mean(s['time_s']):.1f} | {step} | {bank} |")
    if plot is not None:
        lines += ["", f"![{suite.name}]({plot.relative_to(md.parent).as_posix()})"]
    lines += ["", "Reading: " + _reading(suite, summary), ""]
    begin, end = f"<!-- suite:{suite.name} -->", f"<!-- /suite:{suite.name} -->"
    text = md.read_text() if md.is_file() else _HEADER
    body = begin + "\n" + "\n".join(lines) + end
    if begin in text and end in text:
        pre, rest = text.split(begin, 1)
        _, post = rest.split(end, 1)
        text = pre + body + post
    else:
        text = text.rstrip("\n") + "\n\n" + body + "\n"
    md.write_text(text)


_HEADER = """# Results

Generated by `python -m pipeline.experiments SUITE` (`make results`); no number here is edited by hand.
All runs are on CPU on the embedded Fashion-MNIST subset, so absolute numbers are far from the papers'
ImageNet/CIFAR settings; what can be checked is the direction of each published effect. Each section states
the claim, the table (mean ± std over seeds), a plot, and an automatic reading of whether the effect shows
beyond seed noise (difference of means > the larger std).

Caveats that apply to every table: students train for only a few epochs with one shared recipe (SGD, lr 0.05,
cosine) and each method's default hyperparameters (ImageNet/CIFAR values, not tuned for this set), which
penalises methods whose loss scales the gradient down (KD with alpha 0.9 at T 4, the SL family with alpha 0.1).
The time columns were measured while other jobs shared the 2 cores, so they are not comparable across arms;
step-time ratios come from `bench/stage2.py` (BENCHMARKS.md), measured in one run.
"""


def _reading(suite: Suite, summary: dict) -> str:
    """An automatic, literal reading: each arm vs the first arm, significant only beyond the larger std."""
    items = list(summary.items())
    base_label, base = items[0]
    out = []
    for label, s in items[1:]:
        if s["student"] != base["student"]:
            continue
        d = statistics.mean(s["top1"]) - statistics.mean(base["top1"])
        noise = max([statistics.stdev(x) if len(x) > 1 else 0.0 for x in (s["top1"], base["top1"])])
        verdict = "within seed noise" if abs(d) <= noise else ("better" if d > 0 else "worse")
        de = 100 * (statistics.mean(s["ece"]) - statistics.mean(base["ece"]))
        out.append(f"{label}: {d:+.2f} pt top-1 vs {base_label} ({verdict}), ECE {de:+.2f}e-2")
    return "; ".join(out) + "."


@cli_entry
def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pipeline.experiments", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("suite", nargs="+", help="suite name(s) or 'all'")
    p.add_argument("--scale", default="full", choices=sorted(SCALES))
    p.add_argument("--root", default="results/runs", help="where runs go")
    p.add_argument("--data-root", default="data", help="where the embedded dataset is written")
    p.add_argument("--results", default="RESULTS.md", help="file whose sections are rewritten ('' = none)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--cache", default=None, help="label-bank cache directory (sets KD_CACHE; default ./label_banks)")
    args = p.parse_args(argv)
    setup_logging()
    old = os.environ.get("KD_CACHE")
    if args.cache:
        os.environ["KD_CACHE"] = args.cache
    try:
        return _run_suites(args)
    finally:
        if args.cache:
            if old is None:
                os.environ.pop("KD_CACHE", None)
            else:
                os.environ["KD_CACHE"] = old


def _run_suites(args: argparse.Namespace) -> int:
    scale = SCALES[args.scale]
    names = list(suites(scale)) if args.suite == ["all"] else args.suite
    for n in names:
        if n not in suites(scale):
            raise UsageError(f"unknown suite '{n}'; valid: {', '.join(suites(scale))}, all")
    for n in names:
        summary = run_suite(n, scale, Path(args.root) / args.scale, Path(args.data_root), args.device,
                            Path(args.results) if args.results else None)
        for label, s in summary.items():
            print(f"{n:18s} {label:45s} top1 {_mean_std(s['top1']):>14s}  ece {_mean_std(s['ece'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
