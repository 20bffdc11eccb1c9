"""Stage 2 entry point: train a student from images plus stored soft labels.

    python -m pipeline.train_student --method wsld --student resnet18 --teacher resnet34 --data ROOT
    python -m pipeline.train_student --config configs/imagenet_r34_r18_wsld.yaml --data ROOT optim.lr=0.05
    python -m pipeline.train_student --test-only --resume runs/wsld/best.pt --data ROOT   # evaluate a checkpoint

``--teacher`` finds the cached bank by data fingerprint and teacher identity; ``--labels PATH`` (repeatable:
ensemble on the T axis) names banks. Methods without a teacher (ce, ls, tfkd_reg) need no bank. ``--live-teacher``
runs a teacher every step instead (comparisons only). Trailing ``key=value`` items override any config key
(``loss.T=4``, ``sched.name=step``). Flags of torchvision's reference scripts are accepted where they mean the same
(``--model``, ``--data-path``, ``-j``, ``-b``, ``--opt``, ``--wd``, ``--momentum``, ``--label-smoothing``,
``--lr-scheduler``, ``--lr-step-size``, ``--lr-gamma``, ``--lr-warmup-epochs``, ``--resume PATH``,
``--test-only``). Launch with ``torchrun --nproc_per_node N -m pipeline.train_student ...`` for DDP.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import Any, Sequence

from pipeline.config import default_of, resolve
from pipeline.errors import CliParser, UsageError, cli_entry, setup_logging

log = logging.getLogger("pipeline.train_student")
_LR_SCHEDULERS = {"steplr": "step", "multisteplr": "multistep", "cosineannealinglr": "cosine", "constant": "constant",
                  "step": "step", "multistep": "multistep", "cosine": "cosine"}


def build_parser() -> argparse.ArgumentParser:
    from kd_losses import available_losses
    from pipeline.data.presets import PRESETS
    from stage2_student_train.config import TrainConfig

    def d(key: str) -> str:
        return f"(default: {default_of(TrainConfig, key)})"

    p = CliParser(prog="python -m pipeline.train_student", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("method and models")
    g.add_argument("--method", help=f"loss: {', '.join(available_losses())} {d('method')}")
    g.add_argument("--student", "--model", dest="student", help=f"student model name {d('student')}")
    g.add_argument("--student-weights", dest="student_weights",
                   help=f"initial student weights: DEFAULT, an enum name or a checkpoint {d('student_weights')}")
    g.add_argument("--label-smoothing", type=float, dest="label_smoothing",
                   help="torchvision's flag: method ls with this eps (uniform convention) (default: none)")
    g = p.add_argument_group("soft labels")
    g.add_argument("--labels", action="append", dest="banks",
                   help="label bank path or URL (repeatable: ensemble on T) (default: found by --teacher)")
    g.add_argument("--teacher", action="append",
                   help="find the cached bank of this teacher (repeatable) (default: none: give --labels)")
    g.add_argument("--teacher-weights", action="append", dest="teacher_weights",
                   help="weights the bank's teacher was dumped with, one per --teacher (default: DEFAULT)")
    g.add_argument("--live-teacher", action="append", dest="live_teacher",
                   help="run this teacher every step instead of reading a bank (comparisons only) (default: none)")
    g.add_argument("--live-teacher-weights", action="append", dest="live_teacher_weights",
                   help="one per --live-teacher (default: DEFAULT)")
    g.add_argument("--replay-views", action="store_true", default=None, dest="replay_views",
                   help=f"replay the bank's stored crops and flips (multi-view banks) {d('replay_views')}")
    g = p.add_argument_group("data")
    g.add_argument("--data", "--data-path", dest="data", help="dataset root (folders, file lists, CIFAR pickles, "
                   "packed shards; `make demo` prepares data/fashion-mnist) (default: none, required)")
    g.add_argument("--layout", help=f"dataset layout: auto, imagefolder, filelist, cifar, shards {d('layout')}")
    g.add_argument("--preset", help=f"preprocessing: auto (the bank's, else by layout), {', '.join(sorted(PRESETS))} "
                   f"{d('preset')}")
    g.add_argument("--loader", choices=["auto", "dali", "torch"],
                   help=f"image loader: dali (NVIDIA DALI, default where installed) or torch {d('loader')}")
    g.add_argument("--workers", "-j", type=int, dest="workers", help=f"loader threads/processes {d('workers')}")
    g.add_argument("--hw-decoder-load", type=float, dest="hw_decoder_load",
                   help=f"share of JPEGs DALI's mixed decoding (--device cuda) gives the hardware decoder, in [0, 1] "
                        f"{d('hw_decoder_load')}")
    g.add_argument("--no-augment", action="store_false", default=None, dest="augment",
                   help="train on the eval transform (deterministic views)")
    g.add_argument("--skip-corrupt", action="store_true", default=None, dest="skip_corrupt",
                   help=f"leave out undecodable images (named in a warning) instead of stopping {d('skip_corrupt')}")
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, help=f"{d('epochs')}")
    g.add_argument("--batch-size", "-b", type=int, dest="batch_size", help=f"per process {d('batch_size')}")
    g.add_argument("--lr", type=float, dest="optim.lr", help=f"base learning rate {d('optim.lr')}")
    g.add_argument("--opt", dest="optim.name", help=f"sgd or adamw {d('optim.name')}")
    g.add_argument("--momentum", type=float, dest="optim.momentum", help=f"{d('optim.momentum')}")
    g.add_argument("--wd", "--weight-decay", type=float, dest="optim.weight_decay", help=f"{d('optim.weight_decay')}")
    g.add_argument("--lr-scheduler", dest="lr_scheduler", help=f"cosine, step, multistep, constant (torchvision "
                   f"names steplr, multisteplr, cosineannealinglr too) {d('sched.name')}")
    g.add_argument("--lr-step-size", type=int, dest="sched.step_size", help=f"{d('sched.step_size')}")
    g.add_argument("--lr-gamma", type=float, dest="sched.gamma", help=f"{d('sched.gamma')}")
    g.add_argument("--lr-warmup-epochs", type=float, dest="sched.warmup_epochs", help=f"{d('sched.warmup_epochs')}")
    g.add_argument("--amp", choices=["none", "bf16", "fp16"], help=f"autocast (fp16: CUDA only) {d('amp')}")
    g.add_argument("--channels-last", action="store_true", default=None, dest="channels_last",
                   help=f"{d('channels_last')}")
    g.add_argument("--seed", type=int, help=f"{d('seed')}")
    g.add_argument("--device", choices=["cpu", "cuda"], help=f"{d('device')}")
    g = p.add_argument_group("run")
    g.add_argument("--output-dir", dest="output_dir",
                   help="run directory (default: runs/<method>-<student>-seed<seed>, or the --resume file's folder)")
    g.add_argument("--resume", nargs="?", const=True, default=None,
                   help="continue the run in --output-dir (bare flag), or from this checkpoint file")
    g.add_argument("--test-only", action="store_true", default=None, dest="test_only",
                   help="evaluate a checkpoint (--resume PATH, --student-weights, or --output-dir's last.pt) on the "
                        "val split, print and write test.json; no training")
    g.add_argument("--overwrite", action="store_true", default=None, help="replace an existing --output-dir")
    g.add_argument("--config", help="YAML recipe (keys of TrainConfig; see configs/)")
    g.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    p.add_argument("overrides", nargs="*", help="key=value config overrides (loss.T=4, sched.milestones=[30,60])")
    return p


def _cli_values(args: argparse.Namespace) -> dict[str, Any]:
    """Parsed flags -> config keys (None = not given), with torchvision's flags mapped onto ours."""
    cli = {k: v for k, v in vars(args).items() if k not in ("config", "overrides", "verbose", "label_smoothing",
                                                             "lr_scheduler", "resume")}
    if args.resume is True:
        cli["resume"] = True
    elif isinstance(args.resume, str):
        cli["resume"], cli["resume_from"] = True, args.resume
    if args.lr_scheduler is not None:
        name = _LR_SCHEDULERS.get(args.lr_scheduler.lower())
        if name is None:
            raise UsageError(f"unknown --lr-scheduler '{args.lr_scheduler}'; valid: {', '.join(_LR_SCHEDULERS)}")
        cli["sched.name"] = name
    if args.label_smoothing is not None:
        if args.method not in (None, "ls"):
            raise UsageError(f"--label-smoothing means method ls; it conflicts with --method {args.method}")
        cli["method"], cli["loss.eps"] = "ls", args.label_smoothing
    return cli


# What --test-only reads: the model, the data and how it is decoded, where the checkpoint and test.json are.
_TEST_ONLY_KEYS = {"student", "student_weights", "data", "layout", "val_split", "preset", "loader", "workers",
                   "hw_decoder_load",
                   "batch_size", "device", "amp", "channels_last", "skip_corrupt", "output_dir", "resume",
                   "resume_from", "test_only", "seed"}


def _warn_unused_with_test_only(cli: dict[str, Any], overrides: Sequence[str]) -> None:
    """--test-only evaluates a checkpoint: name the training flags given with it (they change nothing)."""
    given = [k for k, v in cli.items() if v is not None and k not in _TEST_ONLY_KEYS]
    given += [o.split("=", 1)[0] for o in overrides if o.split("=", 1)[0].split(".")[0] not in _TEST_ONLY_KEYS]
    if given:
        log.warning("--test-only evaluates a checkpoint; these training settings change nothing: %s",
                    ", ".join(sorted(set(given))))


@cli_entry
def main(argv: Sequence[str] | None = None) -> int:
    # intermixed: key=value overrides may sit between flags (argparse otherwise takes only the first run of them)
    args = build_parser().parse_intermixed_args(argv)
    if isinstance(args.resume, str) and "=" in args.resume and not os.path.exists(args.resume):
        args.overrides.insert(0, args.resume)  # `--resume key=value`: the bare flag, then an override
        args.resume = True
    rank = int(os.environ.get("RANK", "0"))
    setup_logging(args.verbose, rank)
    from stage2_student_train import TrainConfig, run_training

    cli = _cli_values(args)
    cfg = resolve(TrainConfig, args.config, cli, args.overrides)
    if cfg.test_only:
        _warn_unused_with_test_only(cli, args.overrides)
    final = run_training(cfg)
    if rank == 0:  # one line per command, also under torchrun
        print(json.dumps(final))
    return 0


if __name__ == "__main__":
    sys.exit(main())
