"""Stage 1 entry point: ``python -m pipeline.dump_logits --teacher resnet34 --data ROOT [--split train]``.

Writes (or resumes, or reuses) a label bank and prints its path. ``--teacher``/``--weights`` repeat for an
ensemble; ``--config FILE`` gives YAML defaults; trailing ``key=value`` items override any config key.
Launch with ``torchrun --nproc_per_node N -m pipeline.dump_logits ...`` to shard over ranks.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

from pipeline.config import add_arguments, resolve
from pipeline.errors import CliParser, cli_entry, setup_logging


def build_parser() -> argparse.ArgumentParser:
    """Every flag of a key declared in :class:`~stage1_teacher_logits.dump.DumpConfig`, plus ``--config`` and
    ``-v``."""
    from pipeline.data.presets import PRESETS
    from stage1_teacher_logits.dump import DumpConfig

    p = CliParser(prog="python -m pipeline.dump_logits", description=__doc__,
                  formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p, DumpConfig, names={"presets": ", ".join(sorted(PRESETS))})
    p.add_argument("--config", help="YAML file of defaults (keys of DumpConfig)")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    p.add_argument("overrides", nargs="*", help="key=value config overrides")
    return p


@cli_entry
def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose, int(os.environ.get("RANK", "0")))
    from stage1_teacher_logits.dump import DumpConfig, run_dump

    cli = {k: v for k, v in vars(args).items() if k not in ("config", "overrides", "verbose")}
    cfg = resolve(DumpConfig, args.config, cli, args.overrides)
    path = run_dump(cfg)
    if int(os.environ.get("RANK", "0")) == 0:  # one line per command, also under torchrun
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
