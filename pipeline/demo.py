"""``python -m pipeline.demo`` (``make demo``): the whole offline-KD flow on the embedded data, on CPU.

1. Write the embedded Fashion-MNIST subset as a JPEG tree (``data/fashion-mnist``).
2. Train a teacher with plain cross-entropy (``configs/demo_teacher.yaml``).
3. Dump its label bank once (stage 1, DALI CPU), and a bank of the val images (teacher agreement and KL).
4. Train students with ``ce``, ``kd`` and ``wsld`` from that one bank (stage 2).
5. Print the comparison table.

Steps whose outputs exist are reused, so a second run only prints the table; an interrupted training run resumes
from its last checkpoint. ``--device cuda`` runs on a GPU.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any, Sequence

from pipeline.config import resolve
from pipeline.errors import CliParser, cli_entry, setup_logging

log = logging.getLogger("pipeline.demo")

REPO = Path(__file__).resolve().parents[1]


def _train(config: str, out: Path, data: Path, device: str, extra: dict) -> None:
    from stage2_student_train import TrainConfig, run_training

    cli = {"data": str(data), "device": device, "output_dir": str(out), "overwrite": True, **extra}
    cfg = resolve(TrainConfig, REPO / "configs" / config, cli)
    if (out / "final.json").is_file() and _same_run(out, cfg):
        log.info("reusing finished run %s", out)
        return
    if (out / "last.pt").is_file() and _same_run(out, cfg):  # an interrupted demo: its epochs are not lost
        log.info("resuming interrupted run %s", out)
        cfg = resolve(TrainConfig, REPO / "configs" / config, {**cli, "overwrite": False, "resume": True})
    run_training(cfg)


def _same_run(out: Path, cfg: Any) -> bool:
    """Whether the finished run in ``out`` is this one (method, student, epochs, data and, for a method with a
    teacher, bank(s)): a run left by another demo (other data, an older bank) is trained again, not reused."""
    import yaml

    import kd_losses
    from pipeline import storage

    try:
        saved = yaml.safe_load((out / "config.yaml").read_text()) or {}
    except (OSError, yaml.YAMLError):
        return False

    def paths(v: Any) -> list[str]:
        return [storage.absolute(x) for x in (v or [])]

    return (saved.get("method"), saved.get("student"), saved.get("epochs")) == (cfg.method, cfg.student, cfg.epochs) \
        and storage.absolute(saved.get("data") or "") == storage.absolute(cfg.data) \
        and (not kd_losses.needs_teacher(cfg.method) or paths(saved.get("banks")) == paths(cfg.banks))


@cli_entry
def main(argv: Sequence[str] | None = None) -> int:
    p = CliParser(prog="python -m pipeline.demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="data/fashion-mnist", help="where to write the embedded dataset")
    p.add_argument("--out", default="runs/demo", help="run directories")
    p.add_argument("--train-per-class", type=int, default=1000)
    p.add_argument("--val-per-class", type=int, default=300)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--methods", default="ce,kd,wsld", help="student methods, comma-separated")
    p.add_argument("--epochs", type=int, default=None, help="override the recipes' epochs")
    args = p.parse_args(argv)
    setup_logging()
    import kd_losses
    from pipeline.data.embedded import prepare_default_dataset
    from pipeline.report import collect, format_table
    from stage1_teacher_logits import DumpConfig, run_dump

    log.info("step 1/5: the embedded data as a JPEG tree in %s", args.data)
    data = prepare_default_dataset(args.data, {"train": args.train_per_class, "val": args.val_per_class})
    out = Path(args.out)
    extra = {"epochs": args.epochs} if args.epochs else {}
    log.info("step 2/5: teacher (plain cross-entropy)")
    _train("demo_teacher.yaml", out / "teacher-ce", data, args.device, extra)
    log.info("step 3/5: dump the teacher's label bank (stage 1), and its val bank for the students' agreement and KL")
    dumps = {split: run_dump(DumpConfig(teacher=("democnn",), weights=(str(out / "teacher-ce" / "best.pt"),),
                                        data=str(data), split=split, preset="demo", device=args.device,
                                        batch_size=256, rows_per_chunk=1024)) for split in ("train", "val")}
    bank = dumps["train"]
    runs = [out / "teacher-ce"]
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    for i, m in enumerate(methods, 1):
        source = "soft labels from the bank" if kd_losses.needs_teacher(m) else "the dataset's labels only"
        log.info("step 4/5: student %d of %d, %s (%s)", i, len(methods), m, source)
        run = out / f"student-{m}"
        banks = {"banks": [bank]} if kd_losses.needs_teacher(m) else {}  # ce reads no bank (and would say so)
        _train("demo_student.yaml", run, data, args.device, {"method": m, **banks, **extra})
        runs.append(run)
    log.info("step 5/5: the comparison table")
    print()
    print(format_table(collect([str(r) for r in runs])))
    print(f"\nlabel bank: {bank} (val: {dumps['val']})")
    print(f"runs:       {out}/ ({', '.join(r.name for r in runs)})")
    print(f"again:      python -m pipeline.report {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
