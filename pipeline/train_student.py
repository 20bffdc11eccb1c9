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

from pipeline.config import add_arguments, default_of, keys_where, resolve
from pipeline.errors import CliParser, UsageError, cli_entry, setup_logging

log = logging.getLogger("pipeline.train_student")
_LR_SCHEDULERS = {"steplr": "step", "multisteplr": "multistep", "cosineannealinglr": "cosine", "constant": "constant",
                  "step": "step", "multistep": "multistep", "cosine": "cosine"}


def build_parser() -> argparse.ArgumentParser:
    """Every flag of a key declared in :class:`~stage2_student_train.config.TrainConfig`, plus the flags that are
    not one key: ``--resume [PATH]``, ``--label-smoothing``, ``--lr-scheduler``, ``--config``, ``-v``."""
    from kd_losses import available_losses
    from pipeline.data.presets import PRESETS
    from stage2_student_train.config import TrainConfig

    p = CliParser(prog="python -m pipeline.train_student", description=__doc__,
                  formatter_class=argparse.RawDescriptionHelpFormatter)
    names = ("method and models", "soft labels", "data", "optimisation", "run")
    groups = add_arguments(p, TrainConfig, {n: p.add_argument_group(n) for n in names},
                           {"losses": ", ".join(available_losses()), "presets": ", ".join(sorted(PRESETS))})
    groups["method and models"].add_argument(
        "--label-smoothing", type=float, dest="label_smoothing",
        help="torchvision's flag: method ls with this eps (uniform convention) (default: none)")
    groups["optimisation"].add_argument(
        "--lr-scheduler", dest="lr_scheduler", help=f"cosine, step, multistep, constant (torchvision names steplr, "
        f"multisteplr, cosineannealinglr too) (default: {default_of(TrainConfig, 'sched.name')})")
    g = groups["run"]
    g.add_argument("--resume", nargs="?", const=True, default=None,
                   help="continue the run in --output-dir (bare flag), or from this checkpoint file")
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


def _warn_unused_with_test_only(cli: dict[str, Any], overrides: Sequence[str]) -> None:
    """--test-only evaluates a checkpoint: name the training flags given with it (they change nothing). What it
    reads is declared per key (``test_only`` in stage2_student_train/config.py)."""
    from stage2_student_train.config import TrainConfig

    used = set(keys_where(TrainConfig, test_only=True))
    given = [k for k, v in cli.items() if v is not None and k not in used]
    given += [o.split("=", 1)[0] for o in overrides if o.split("=", 1)[0] not in used]
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
