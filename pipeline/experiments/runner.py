"""Turns the plan into work: data trees, teacher and student training jobs (run in parallel processes, resumable,
shared across suites by their config), bank dumps (content-addressed, shared), and the grid choice.

A job is a resolved TrainConfig written to ``<root>/jobs/<hash>.yaml`` and run as
``python -m pipeline.train_student --config <hash>.yaml`` into ``<root>/jobs/<hash>/`` (``--resume`` when its
``last.pt`` exists; the run's output beside it in ``<hash>.log``); the hash is
over the config, so the same run asked for by two suites runs once, and a finished one (``final.json``) is
never run again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from pipeline.config import from_dict
from pipeline.distributed import torchrun_args
from pipeline.errors import UsageError
from pipeline.experiments.plan import GRIDS, TASKS, TEACHERS, Arm, Scale, TeacherJob, fixed_loss

log = logging.getLogger(__name__)
REPO = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Job:
    """One training run: ``config`` (TrainConfig keys; output_dir is derived), its directory and its number of
    processes (``ranks`` > 1: torchrun)."""

    config: dict[str, Any]
    root: Path
    ranks: int = 1

    @property
    def key(self) -> str:
        what = self.config if self.ranks == 1 else {**self.config, "_ranks": self.ranks}
        return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:16]

    @property
    def dir(self) -> Path:
        return self.root / "jobs" / self.key

    @property
    def done(self) -> bool:
        return (self.dir / "final.json").is_file()

    def final(self) -> dict[str, Any]:
        return json.loads((self.dir / "final.json").read_text())

    def metrics(self) -> list[dict[str, Any]]:
        path = self.dir / "metrics.jsonl"
        return [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.is_file() else []


class Runner:
    """Runs the plan's jobs and dumps under ``root`` for ``scale`` on ``device``."""

    def __init__(self, root: Path, scale: Scale, device: str = "cpu"):
        self.root, self.scale, self.device = root, scale, device
        self.cache = root / "banks"
        self.trees: dict[str, Path] = {}

    # --- data -------------------------------------------------------------------------------------------------
    def prepare_data(self, data_root: Path, tasks: tuple[str, ...] = ("fmnist10",)) -> None:
        """Three trees from the embedded Fashion-MNIST: ``student`` (train: the student's images, val: test
        images), ``grid`` (the same train split; val: held-out training images, for the grid), ``teacher`` (every
        training image but the held-out ones; val: test images); with ``pairs100`` in ``tasks`` also ``pairs``
        (train, heldout, val: the 100-class task at the scale's images per class)."""
        from pipeline.data.embedded import prepare_pairs_dataset, write_tree

        s = self.scale
        if "pairs100" in tasks:
            a, b, c = s.pairs
            self.trees["pairs"] = prepare_pairs_dataset(data_root / f"pairs-{a}-{b}-{c}",
                                                        {"train": a, "heldout": b, "val": c})
        test = ("val", 0, s.val)
        self.trees |= {
            "student": write_tree(data_root / f"student-{s.student}-{s.val}", {"train": ("train", 0, s.student),
                                                                              "val": test}),
            "grid": write_tree(data_root / f"grid-{s.student}-{s.holdout}", {
                "train": ("train", 0, s.student), "val": ("train", s.student, s.holdout)}),
            "teacher": write_tree(data_root / f"teacher-{s.teacher}-{s.val}", {
                "train": ("train", s.student + s.holdout, max(0, s.teacher - s.student)) if s.teacher > s.student
                else ("train", 0, s.teacher), "val": test}),
        }
        if s.teacher > s.student:  # the big teacher also sees the student's images (never the held-out ones)
            self._merge_student_images()

    def _merge_student_images(self) -> None:
        import shutil

        dst = self.trees["teacher"] / "train"
        marker = self.trees["teacher"] / ".with-student"
        if marker.is_file():
            return
        for f in (self.trees["student"] / "train").rglob("*.jpg"):
            shutil.copy(f, dst / f.parent.name / f.name)
        marker.write_text("student images added\n")

    # --- jobs ---------------------------------------------------------------------------------------------------
    def job(self, overrides: dict[str, Any], ranks: int = 1) -> Job:
        """A training job: the common recipe (one optimizer and schedule for every method) plus ``overrides``,
        on ``ranks`` processes."""
        s = self.scale
        base = {"data": str(self.trees["student"]), "device": self.device, "batch_size": s.batch_size,
                "workers": 1, "epochs": s.student_epochs, "max_steps_per_epoch": s.max_steps, "log_every": 1000,
                "eval_every": s.eval_every, "eval_last": s.eval_last, "precise_bn": s.precise_bn,
                "loader": "dali", "optim": {"name": "sgd", "lr": s.lr, "momentum": 0.9, "nesterov": True,
                                            "weight_decay": 5e-4},
                "sched": {"name": "cosine", "warmup_epochs": 0.5}}
        cfg = _merge(base, overrides)
        from stage2_student_train.config import TrainConfig

        from_dict(TrainConfig, {**cfg, "output_dir": "x"})  # a bad key fails here, not in a worker
        return Job(cfg, self.root, ranks)

    def run_jobs(self, jobs: list[Job], what: str) -> None:
        """Run every unfinished job, ``scale.jobs`` at a time, each in its own process (1 thread); raise after
        all ended when one failed."""
        todo = list({j.key: j for j in jobs if not j.done}.values())
        if not todo:
            return
        log.info("%s: %d run(s) to do (%d already done), %s", what, len(todo), len(jobs) - len(todo),
                 f"{self.scale.jobs} at a time" if self.scale.jobs else "in this process")
        t0 = time.time()
        if self.scale.jobs == 0:  # tiny scale: in this thread (run_training may install signal handlers)
            failed = [j for j in todo if not self._run_locked(j)]
        else:
            with ThreadPoolExecutor(self.scale.jobs) as ex:
                failed = [j for j, ok in zip(todo, ex.map(self._run_locked, todo)) if not ok]
        log.info("%s: done in %.1f min", what, (time.time() - t0) / 60)
        if failed:
            log_file = failed[0].dir.with_suffix(".log")
            tail = log_file.read_text()[-600:] if log_file.is_file() else ""
            raise UsageError(f"{len(failed)} run(s) failed, first {failed[0].dir}: {' '.join(tail.split())}")

    def _run_locked(self, job: Job) -> bool:
        """Run ``job`` holding its lock (``<key>.lock`` beside its directory), unless it is done by then: two plan
        invocations at once (``make results`` and a suite rerun, say) share jobs, and each would otherwise train
        the other's run directory (``--overwrite`` or ``--resume`` while it is written). A job the other
        invocation is training is waited for, then found done."""
        from filelock import FileLock

        job.dir.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(job.dir.with_suffix(".lock"))):
            if job.done:
                return True
            if self.scale.jobs == 0 and job.ranks == 1:  # tiny scale: no process start-up per run
                return self._run_here(job)
            return self._run_one(job)

    def _run_here(self, job: Job) -> bool:
        from stage2_student_train import TrainConfig, run_training

        job.dir.mkdir(parents=True, exist_ok=True)
        resume = (job.dir / "last.pt").is_file()
        cfg = from_dict(TrainConfig, {**job.config, "output_dir": str(job.dir), "resume": resume,
                                      "overwrite": not resume})
        old = os.environ.get("KD_CACHE")
        os.environ["KD_CACHE"] = str(self.cache)
        try:
            run_training(cfg)
        except UsageError as e:
            job.dir.with_suffix(".log").write_text(f"error: {e}\n")
        finally:
            if old is None:
                os.environ.pop("KD_CACHE", None)
            else:
                os.environ["KD_CACHE"] = old
        return job.done

    def _run_one(self, job: Job) -> bool:
        # the job's files sit beside its run directory, which --overwrite may replace
        job.dir.parent.mkdir(parents=True, exist_ok=True)
        spec = job.dir.with_suffix(".yaml")
        spec.write_text(yaml.safe_dump({**job.config, "output_dir": str(job.dir)}))
        cmd = [sys.executable, "-m", "pipeline.train_student", "--config", str(spec)]
        if job.ranks > 1:
            cmd[1:1] = torchrun_args(job.ranks)
        cmd += ["--resume"] if (job.dir / "last.pt").is_file() else ["--overwrite"]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "KD_CACHE": str(self.cache)}
        with open(job.dir.with_suffix(".log"), "a") as out:
            rc = subprocess.run(cmd, env=env, stdout=out, stderr=out, cwd=REPO).returncode
        return rc == 0 and job.done

    # --- teachers and banks ---------------------------------------------------------------------------------------
    def teacher_job(self, t: TeacherJob) -> Job:
        s = self.scale
        epochs = t.epochs or {"teacher": s.teacher_epochs, "pairs": s.pairs_teacher_epochs}.get(
            t.data, s.small_teacher_epochs)
        return self.job({"method": "ce", "student": t.arch, "data": str(self.trees[t.data]), "seed": t.seed,
                         "epochs": epochs, "preset": "demo"})

    def teacher_ckpt(self, name: str) -> tuple[str, str]:
        """(arch, checkpoint) of teacher ``name`` (its job must be done)."""
        t = TEACHERS[name]
        job = self.teacher_job(t)
        return t.arch, str(job.dir / "last.pt")

    def bank(self, name: str, preset: str, opts: dict[str, Any], tree: str = "student", split: str = "train") -> str:
        """The bank of teacher ``name`` on ``tree``'s ``split`` (dumped once: content-addressed in the cache)."""
        from stage1_teacher_logits.dump import DumpConfig, run_dump

        arch, ckpt = self.teacher_ckpt(name)
        views = int(opts.get("views", 1))
        cfg = {"teacher": [arch], "weights": [ckpt], "data": str(self.trees[tree]), "split": split,
               "preset": preset, "device": self.device, "batch_size": 256, "workers": 2, "rows_per_chunk": 2048,
               "format": opts.get("format", "dense"), "topk": opts.get("topk"), "samples": opts.get("samples"),
               "features": bool(opts.get("features")), "loader": "dali",
               **({"views": views, "view_policy": opts.get("view_policy", "rrc+flip")} if views > 1 else {}),
               **{k: opts[k] for k in ("map_size", "map_region", "map_dtype") if k in opts}}
        old = os.environ.get("KD_CACHE")
        os.environ["KD_CACHE"] = str(self.cache)
        t0 = time.time()
        try:
            path = run_dump(from_dict(DumpConfig, cfg))
        finally:
            if old is None:
                os.environ.pop("KD_CACHE", None)
            else:
                os.environ["KD_CACHE"] = old
        self._record_dump_time(path, time.time() - t0)
        return path

    def _record_dump_time(self, bank: str, seconds: float) -> None:
        """Keep the wall time of the dump that made ``bank`` (its first call; later calls find it cached)."""
        f = self.root / "dump_times.json"
        times = json.loads(f.read_text()) if f.is_file() else {}
        if bank not in times:
            times[bank] = seconds
            f.parent.mkdir(parents=True, exist_ok=True)
            f.write_text(json.dumps(times, indent=1))

    def dump_time(self, bank: str) -> float | None:
        """Seconds the dump of ``bank`` took (None when it was not made by this runner)."""
        f = self.root / "dump_times.json"
        return json.loads(f.read_text()).get(bank) if f.is_file() else None

    # --- arms -----------------------------------------------------------------------------------------------------
    def arm_overrides(self, arm: Arm, loss: dict[str, Any], task: str = "fmnist10",
                      grid: bool = False) -> dict[str, Any]:
        """The config of ``arm`` (with loss hyperparameters ``loss``) on ``task``: its students' tree, or with
        ``grid`` its grid tree evaluated on the held-out split. Teachers with a bank also get a val bank (dense,
        center), so evaluation reports agreement and KL with the teacher."""
        t = TASKS[task]
        tree = t.grid_tree if grid else t.tree
        epochs = int(arm.extra.get("epochs", self.scale.grid_epochs(task) if grid else self.scale.epochs(task)))
        over: dict[str, Any] = {"method": arm.method, "student": arm.student, "preset": arm.preset,
                                "data": str(self.trees[tree]), "epochs": epochs,
                                "loss": {**fixed_loss(arm.method, self.scale, epochs), **loss, **arm.loss}}
        if grid:
            over.update(val_split=t.grid_val, eval_every=epochs, eval_last=1)  # a grid run is scored at its end
        over.update(arm.extra)
        if arm.live:
            arch, ck = self.teacher_ckpt(arm.live)
            over.update({"live_teacher": [arch], "live_teacher_weights": [ck]})
        elif arm.teachers:
            over["banks"] = [self.bank(n, arm.preset, arm.bank, tree) for n in arm.teachers]
            for n in arm.teachers:
                self.bank(n, arm.preset, {}, tree, over.get("val_split", "val"))
        return over

    def grid_jobs(self, method: str, task: str = "fmnist10") -> list[tuple[dict[str, Any], Job]]:
        """The grid of ``method`` on ``task``: (setting, job on the held-out split, seed 0) for each setting."""
        settings, teachers, bank = GRIDS[method]
        arm = Arm(method, method, teachers=tuple(TASKS[task].teacher(n) for n in teachers), bank=bank)
        return [(s, self.job({**self.arm_overrides(arm, s, task, grid=True), "seed": 0})) for s in settings]

    def choose(self, method: str, task: str = "fmnist10") -> tuple[dict[str, Any], list[tuple[dict[str, Any], float]]]:
        """The grid setting with the best held-out top-1 (ties: the earlier, i.e. the published one) and every
        setting's held-out top-1. Without a grid (or for methods that have none): the loss's defaults."""
        if method not in GRIDS or not self.scale.grid:
            return {}, []
        scored = [(s, j.final()["top1"]) for s, j in self.grid_jobs(method, task)]
        best = max(range(len(scored)), key=lambda i: (scored[i][1], -i))
        return scored[best][0], scored


def _merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out

