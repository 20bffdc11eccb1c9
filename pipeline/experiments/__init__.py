"""``python -m pipeline.experiments SUITE...`` (``make results``): the seeds' claims, tested on the embedded data.

Suites: methods, tfkd, label-opt, label-efficiency, offline-vs-live, views, formats, embedding, recipes, maps,
methods100, formats100, ranks, time-to-accuracy (or ``all``; the 100-class suites on ``pairs100``). A
run: write the data trees; train the teachers (shared by every suite); dump their banks (content-addressed,
shared); for every method, train its small hyperparameter grid on held-out training images and keep the best
setting; train every arm with the scale's seeds (3 at full scale) at that setting (one optimizer and schedule for
all); measure what training runs cannot (interleaved step times, bank-vs-live exactness); rewrite RESULTS.md
(claims table first) and the plots in ``results/``. Training runs go ``--jobs`` at a time in their own processes; finished runs are
reused and interrupted ones resumed, so a stopped suite continues where it stopped. ``--scale tiny`` runs every
suite in a few steps (what the tests use).
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Any, Sequence

from pipeline import storage
from pipeline.errors import CliParser, UsageError, cli_entry, setup_logging
from pipeline.experiments import measure, report
from pipeline.experiments.plan import BIG, GRIDS, SCALES, SMALL, TASKS, TEACHERS, Scale, Suite, suites
from pipeline.experiments.runner import Job, Runner

log = logging.getLogger("pipeline.experiments")

__all__ = ["SCALES", "main", "run_suites", "scale_name", "suites", "write_report"]


def run_suites(names: list[str], scale: Scale, root: Path, data_root: Path, results: Path | None,
               device: str = "cpu") -> dict[str, dict[str, Any]]:
    """Run the suites ``names`` (teachers, banks, grids, arms); write their summaries and RESULTS.md."""
    t0 = time.time()
    phases: dict[str, float] = {}  # wall minutes of each phase of this invocation (finished runs cost nothing)

    def phase(name: str) -> None:
        phases[name] = max(0.0, round((time.time() - t0) / 60 - sum(phases.values()), 2))

    plan = [suites(scale)[n] for n in names]
    runner = Runner(root, scale, device)
    runner.prepare_data(data_root, tuple(sorted({s.task for s in plan})))
    phase("data")
    methods = sorted({(a.method, s.task) for s in plan for a in s.arms})
    needed = {t for s in plan for a in s.arms for t in (*a.teachers, *([a.live] if a.live else []))}
    needed |= {TASKS[task].teacher(t) for m, task in methods if m in GRIDS and scale.grid for t in GRIDS[m][1]}
    runner.run_jobs([runner.teacher_job(TEACHERS[t]) for t in sorted(needed)], "teachers")
    phase("teachers")
    if scale.grid:
        runner.run_jobs([j for m, task in methods if m in GRIDS for _, j in runner.grid_jobs(m, task)],
                        "hyperparameter grids")
    phase("banks and grids")
    chosen = {(m, task): runner.choose(m, task) for m, task in methods}
    jobs = {(s.name, a.label, seed): runner.job({**runner.arm_overrides(a, chosen[a.method, s.task][0], s.task),
                                                 "seed": seed}, a.ranks)
            for s in plan for a in s.arms for seed in s.seeds_of(scale)}
    runner.run_jobs(list(jobs.values()), "students")
    phase("students")
    out = {}
    for s in plan:
        out[s.name] = summarize(s, runner, jobs, chosen)
        log.info("suite %s summarised", s.name)
    phase("measurements and summaries")
    timing = {"suites": names, "jobs": scale.jobs, "minutes": phases, "scale": scale_name(scale),
              **_plan_minutes(root, names, phases)}
    log.info("phases (wall minutes): %s", ", ".join(f"{k} {v:.1f}" for k, v in phases.items()))
    if results is not None:
        folder = results.parent / "results"
        folder.mkdir(parents=True, exist_ok=True)
        for name, summ in out.items():
            (folder / f"{name}.json").write_text(json.dumps({**summ, "timing": timing}, indent=1))
        write_report(results, scale)
    log.info("suites %s done in %.1f min", ", ".join(names), (time.time() - t0) / 60)
    return out


def _plan_minutes(root: Path, names: list[str], phases: dict[str, float]) -> dict[str, Any]:
    """Record this invocation's phases in ``<root>/timing.jsonl`` and return the sums over every invocation
    recorded there (``plan_minutes``, ``invocations``): a plan killed and resumed, or run suite by suite, is
    measured whole (an invocation's phases exclude runs an earlier one finished)."""
    f = root / "timing.jsonl"
    root.mkdir(parents=True, exist_ok=True)
    with open(f, "a") as out:
        out.write(json.dumps({"suites": names, "minutes": phases, "ended": time.strftime("%Y-%m-%d %H:%M")}) + "\n")
    total: dict[str, float] = {}
    n = 0
    for line in f.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:  # a line cut by a killed write: that invocation is not counted
            continue
        n += 1
        for k, v in rec.get("minutes", {}).items():
            total[k] = round(total.get(k, 0.0) + float(v), 2)
    return {"plan_minutes": total, "invocations": n}


def scale_name(scale: Scale) -> str:
    """The name in ``SCALES`` of ``scale`` (whatever its ``jobs``), else ``custom``."""
    from dataclasses import replace

    return next((k for k, v in SCALES.items() if replace(scale, jobs=v.jobs) == v), "custom")


def write_report(results: Path, scale: Scale, require: bool = False) -> int:
    """Rewrite ``results`` (RESULTS.md) and the plots from every suite summary in ``results/`` beside it (written
    by this and earlier invocations, here or elsewhere); -> how many suites it holds. UsageError when ``results``
    cannot be written, a summary is damaged or of another scale, or (``require``) there is no summary at all
    (RESULTS.md is then left as it is)."""
    if results.is_dir() or not results.parent.is_dir():
        raise UsageError(f"cannot write {results}: " + ("it is a folder" if results.is_dir() else
                         f"folder {results.parent} does not exist") + "; give --results a file in an existing folder")
    folder = results.parent / "results"
    summaries = report.load_summaries(folder, list(suites(scale))) if folder.is_dir() else {}
    if require and not summaries:
        raise UsageError(f"no suite summaries in {folder} (results/<suite>.json, written by a run); {results} left "
                         "as it is: run the suites first")
    want = scale_name(scale)
    other = sorted(n for n, summ in summaries.items() if summ.get("timing", {}).get("scale", "full") != want)
    if other:
        raise UsageError(f"summaries {', '.join(other)} in {folder} are of another scale than --scale {want}; "
                         "use their scale (--quick for tiny), or another --results folder")
    plots = {n: f"results/{report.plot(n, summ, folder)}" for n, summ in summaries.items()}
    report.write_results(results, scale, summaries, plots, list(suites(scale)))
    return len(summaries)


def summarize(suite: Suite, runner: Runner, jobs: dict[tuple[str, str, int], Job],
              chosen: dict[tuple[str, str], tuple[dict[str, Any], list]]) -> dict[str, Any]:
    """The suite's summary: per arm the seeds' metrics, chosen hyperparameters and grid; teachers' and baseline's
    convergence; measurements."""
    scale = runner.scale
    arms: dict[str, Any] = {}
    for a in suite.arms:
        runs = [jobs[(suite.name, a.label, s)] for s in suite.seeds_of(scale)]
        finals = [j.final() for j in runs]
        setting, grid = chosen[a.method, suite.task]
        banks = (finals[0].get("bank") or "").split(",") if a.teachers and not a.live else []  # live: no bank
        arms[a.label] = {
            "method": a.method, "student": a.student, "chosen": setting, "ranks": a.ranks,
            "loss": runs[0].config["loss"],
            "grid": grid, **{k: [f[k] for f in finals] for k in ("top1", "ece", "nll")},
            **{k: [f[k] for f in finals] for k in ("teacher_agreement", "teacher_kl") if finals[0].get(k) is not None},
            "time_s": [f["train_time_s"] for f in finals],
            "bank_bytes": sum(storage.size(b) for b in banks) / _train_size(runner, suite.task) if banks else None,
        }
        if suite.kind == "time":
            arms[a.label]["curves"] = [_time_curve(j.metrics()) for j in runs]
            arms[a.label]["dump_s"] = sum(runner.dump_time(b) or 0.0 for b in banks) if banks else None
    teachers = {}
    for name in sorted({t for a in suite.arms for t in (*a.teachers, *([a.live] if a.live else []))}):
        job = runner.teacher_job(TEACHERS[name])
        rows = job.metrics()
        teachers[name] = {"arch": TEACHERS[name].arch, "epochs": rows[-1]["epoch"] + 1, "train_images": _train_images(runner, name),
                          "last_top1": [r["top1"] for r in rows[-3:]], "train_loss": rows[-1]["train_loss"]}
    base = next((a for a in suite.arms if a.method == "ce" and a.student == SMALL and not a.extra), None)
    baseline = None
    if base is not None:
        rows = [jobs[(suite.name, base.label, s)].metrics() for s in suite.seeds_of(scale)]
        baseline = {"label": base.label, "last_top1": [[r["top1"] for r in rs[-3:]] for rs in rows],
                    "train_loss": [rs[-1]["train_loss"] for rs in rows]}
    return {"title": suite.title, "recipe": _recipe(scale, suite.task, suite.seeds_of(scale)),
            "setup": _setup(scale), "note": suite.note,
            "task": suite.task, "kind": suite.kind,
            "teachers": teachers, "baseline": baseline, "arms": arms,
            "measurements": _measure(suite, runner) if suite.name == "offline-vs-live" else {}}


def _time_curve(rows: list[dict[str, Any]]) -> list[tuple[float, float]]:
    """(training seconds so far, val top-1) after each epoch of a run's metrics rows."""
    out, t = [], 0.0
    for r in rows:
        t += r.get("train_time_s", 0.0)
        out.append((t, r["top1"]))
    return out


def _train_size(runner: Runner, task: str) -> int:
    from pipeline.data import build_manifest

    return len(build_manifest(runner.trees[TASKS[task].tree], "train"))


def _train_images(runner: Runner, name: str) -> int:
    t = TEACHERS[name]
    from pipeline.data import build_manifest

    return len(build_manifest(runner.trees[t.data], "train"))


def _recipe(scale: Scale, task: str = "fmnist10", seeds: tuple[int, ...] | None = None) -> str:
    seeds = scale.seeds if seeds is None else seeds
    noise = "differences have no noise estimate" if len(seeds) == 1 else f"the noise rests on {len(seeds)} seeds"
    cut = f" (cut from {len(scale.seeds)} to fit the plan's budget: {noise})" if len(seeds) < len(scale.seeds) else ""
    runs = f"{len(seeds)} seed(s) per arm ({', '.join(map(str, seeds))}){cut}"
    if task == "pairs100":
        a, b, c = scale.pairs
        return (f"Task pairs100 (100 classes; {100 * a} training images, {100 * b} held-out for the grid, "
                f"{100 * c} val). Student `{SMALL}`, {scale.pairs_student_epochs} epochs, {runs}; teacher `big100` "
                f"({BIG}, {scale.pairs_teacher_epochs} epochs, the same training images).")
    return f"Student `{SMALL}`, {scale.student_epochs} epochs, {runs}."


def _setup(scale: Scale) -> str:
    return (f"the student (`{SMALL}`, 0.1M parameters) trains on {10 * scale.student} training images "
            f"({scale.student} per class) for {_epochs(scale.student_epochs)}; the big teacher (`democnn`, 0.6M) on "
            f"{10 * scale.teacher} for {_epochs(scale.teacher_epochs)}; every method uses one recipe (SGD, nesterov, "
            f"lr {scale.lr}, weight decay 5e-4, batch {scale.batch_size}, cosine schedule with half an epoch of "
            "warm-up, pad-and-crop + flip augmentation; random-resized crops in the views suite); each method's "
            f"temperature and weights are chosen from at most 4 settings on {10 * scale.holdout} held-out training "
            f"images (never the test set), each grid run training {scale.grid_epochs('fmnist10')} of the arms' "
            f"{scale.student_epochs} epochs (to fit the budget) and scored once at its end; models are evaluated on "
            f"{10 * scale.val} test images {_eval_when(scale)}.")


def _epochs(n: int) -> str:
    return f"{n} epoch" if n == 1 else f"{n} epochs"


def _eval_when(scale: Scale) -> str:
    when = "after every epoch" if scale.eval_every == 1 else (
        f"every {scale.eval_every} epochs and after each of the last {scale.eval_last}")
    if scale.precise_bn:
        when += (f", each time with batch-norm statistics re-estimated on the same {scale.precise_bn} training "
                 "batches (precise BN: the running averages of the last batches made evaluations of near-identical "
                 "weights differ by up to 0.5 pt)")
    return when


def _measure(suite: Suite, runner: Runner) -> dict[str, str]:
    """Interleaved step times and bank-vs-live exactness (offline-vs-live suite)."""
    bank = runner.bank("big", "demo", {})
    teacher = runner.teacher_ckpt("big")
    t = measure.step_times(bank, teacher, SMALL, runner.scale.batch_size,
                           rounds=2 if runner.scale.max_steps else 5)
    e = measure.exactness(str(runner.trees["student"]), bank, teacher, "demo",
                          batches=1 if runner.scale.max_steps else 4, batch=runner.scale.batch_size)
    return {
        "Step time (one interleaved measurement, 1 thread, batch "
        f"{t['batch']}, {t['size']} px, median of {t['rounds']} rounds)":
            f"CE {t['ms']['ce']:.1f} ms, KD from the bank {t['ms']['bank']:.1f} ms ({t['bank_over_ce']:.3f}x CE), "
            f"KD from the live teacher {t['ms']['live']:.1f} ms ({t['live_over_bank']:.2f}x the bank)",
        "Exactness (the same eval-transform batches through the bank and the live teacher)":
            f"max |logit difference| {e['logits_abs']:.2e} (fp16 storage), max relative per-step loss difference "
            f"kd {e['kd_rel']:.2e}, wsld {e['wsld_rel']:.2e}",
    }


@cli_entry
def main(argv: Sequence[str] | None = None) -> int:
    p = CliParser(prog="python -m pipeline.experiments", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("suite", nargs="*", help="suite name(s) or 'all'")
    p.add_argument("--report-only", action="store_true",
                   help="rewrite --results and its plots from the summaries in results/ (written by earlier "
                        "invocations); nothing runs")
    p.add_argument("--scale", default="full", choices=sorted(SCALES), help="full (default) or tiny")
    p.add_argument("--quick", action="store_true", help="the tiny plan (--scale tiny): every step in seconds")
    p.add_argument("--root", default="results/runs", help="where runs and banks go (default: results/runs)")
    p.add_argument("--data-root", default="data/results", help="where the data trees are written (default: "
                   "data/results)")
    p.add_argument("--results", default=None,
                   help="the file rewritten; the suite summaries go to results/ beside it ('' = neither: the runs "
                        "are kept, a later run of the suite writes them) (default: RESULTS.md; with --quick or "
                        "--scale tiny results/runs/tiny/RESULTS.md, so a quick try never replaces the real results)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="(default: cpu)")
    p.add_argument("--jobs", type=int, default=None, help="training processes at once (default: the scale's)")
    args = p.parse_args(argv)
    setup_logging()
    scale = SCALES["tiny" if args.quick else args.scale]
    if args.results is None:
        args.results = "RESULTS.md" if scale_name(scale) == "full" else f"results/runs/{scale_name(scale)}/RESULTS.md"
        Path(args.results).parent.mkdir(parents=True, exist_ok=True)
    if args.report_only:
        if args.suite or not args.results:
            raise UsageError("--report-only rewrites --results from results/*.json: give no suite, and a --results file")
        ignored = [f for f, on in (("--jobs", args.jobs is not None), ("--device", args.device != "cpu"),
                                   ("--root", args.root != "results/runs"),
                                   ("--data-root", args.data_root != "data/results")) if on]
        if ignored:
            raise UsageError(f"--report-only runs nothing: drop {', '.join(ignored)}")
        log.info("%s rewritten from %d suite summaries", args.results,
                 write_report(Path(args.results), scale, require=True))
        return 0
    if args.jobs is not None:
        if args.jobs < 0:
            raise UsageError(f"--jobs {args.jobs}: give 1 or more training processes at once (0: in this process)")
        from dataclasses import replace

        scale = replace(scale, jobs=args.jobs)
    if not args.suite:
        raise UsageError("name the suite(s) to run, or all (or --report-only)")
    if "all" in args.suite and len(args.suite) > 1:
        raise UsageError("'all' stands alone: give all, or suite names")
    out_md = Path(args.results) if args.results else None
    if out_md is not None and (out_md.is_dir() or not out_md.parent.is_dir()):  # before hours of runs, not after
        raise UsageError(f"cannot write {out_md}: give --results a file in an existing folder")
    names = list(suites(scale)) if args.suite == ["all"] else args.suite
    for n in names:
        if n not in suites(scale):
            raise UsageError(f"unknown suite '{n}'; valid: {', '.join(suites(scale))}, all")
    out = run_suites(names, scale, Path(args.root) / ("tiny" if args.quick else args.scale), Path(args.data_root), Path(args.results)
                     if args.results else None, args.device)
    for n, s in out.items():
        for label, a in s["arms"].items():
            print(f"{n:18s} {label:50s} top1 {report.mean_std(a['top1']):>14s}  ece {report.mean_std(a['ece'], 4)}")
    return 0

