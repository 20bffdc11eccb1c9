"""Stage 2 entry point: train a student from images plus stored soft labels.

    python -m pipeline.train_student --method wsld --student resnet18 --teacher resnet34 --data ROOT
    python -m pipeline.train_student --config configs/imagenet_r34_r18_wsld.yaml --data ROOT optim.lr=0.05

``--teacher`` finds the cached bank by key; ``--labels PATH`` (repeatable: ensemble on the T axis) names banks.
Methods without a teacher (ce, ls, tfkd_reg) need no bank. ``--live-teacher`` runs a teacher every step instead
(comparisons only). Trailing ``key=value`` items override any config key (``loss.T=4``, ``sched.name=step``).
Launch with ``torchrun --nproc_per_node N -m pipeline.train_student ...`` for DDP.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Sequence

from pipeline.config import resolve
from pipeline.errors import cli_entry, setup_logging


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pipeline.train_student", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--method", help="loss name (python -c 'import kd_losses; print(kd_losses.available_losses())')")
    p.add_argument("--student", help="model name from the registry")
    p.add_argument("--student-weights", dest="student_weights", help="initial weights of the student")
    p.add_argument("--teacher", action="append", help="find the cached bank of this teacher (repeatable)")
    p.add_argument("--teacher-weights", action="append", dest="teacher_weights",
                   help="weights the bank's teacher was dumped with (default DEFAULT)")
    p.add_argument("--labels", action="append", dest="banks",
                   help="label bank path or URL (repeatable: ensemble on T)")
    p.add_argument("--live-teacher", action="append", dest="live_teacher", help="run this teacher every step")
    p.add_argument("--live-teacher-weights", action="append", dest="live_teacher_weights")
    p.add_argument("--data", help="dataset root")
    p.add_argument("--preset", help="preprocessing preset: imagenet, cifar, demo, tiny")
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int, dest="batch_size")
    p.add_argument("--lr", type=float, dest="optim.lr")
    p.add_argument("--workers", type=int, help="DALI threads")
    p.add_argument("--output-dir", dest="output_dir", help="run directory (default runs/<method>-<student>-seed<seed>)")
    p.add_argument("--resume", action="store_true", default=None, help="continue the run in --output-dir")
    p.add_argument("--overwrite", action="store_true", default=None, help="replace an existing --output-dir")
    p.add_argument("--seed", type=int)
    p.add_argument("--device", choices=["cpu", "cuda"])
    p.add_argument("--amp", choices=["none", "bf16", "fp16"])
    p.add_argument("--channels-last", action="store_true", default=None, dest="channels_last")
    p.add_argument("--loader", choices=["auto", "dali", "torch"],
                   help="image loader: dali (NVIDIA DALI, the default where installed) or torch (torchvision)")
    p.add_argument("--replay-views", action="store_true", default=None, dest="replay_views",
                   help="replay the bank's stored crops and flips (multi-view banks)")
    p.add_argument("--no-augment", action="store_false", default=None, dest="augment",
                   help="train on the eval transform (deterministic views)")
    p.add_argument("--config", help="YAML recipe (keys of TrainConfig)")
    p.add_argument("-v", "--verbose", action="store_true")
    p.add_argument("overrides", nargs="*", help="key=value config overrides")
    return p


@cli_entry
def main(argv: Sequence[str] | None = None) -> int:
    # intermixed: key=value overrides may sit between flags (argparse otherwise takes only the first run of them)
    args = build_parser().parse_intermixed_args(argv)
    setup_logging(args.verbose)
    from stage2_student_train import TrainConfig, run_training

    cli = {k: v for k, v in vars(args).items() if k not in ("config", "overrides", "verbose")}
    cfg = resolve(TrainConfig, args.config, cli, args.overrides)
    final = run_training(cfg)
    print(json.dumps(final))
    return 0


if __name__ == "__main__":
    sys.exit(main())
