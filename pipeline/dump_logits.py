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

from pipeline.config import resolve
from pipeline.errors import cli_entry, setup_logging


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pipeline.dump_logits", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", action="append", help="model name (repeatable: ensemble on the T axis)")
    p.add_argument("--weights", action="append",
                   help="per teacher: DEFAULT, a torchvision weights enum name, none, or a checkpoint path")
    p.add_argument("--data", help="dataset root (ImageNet folders, *_list.txt, CIFAR pickles, packed shards)")
    p.add_argument("--split", choices=["train", "val", "test"])
    p.add_argument("--preset", help="preprocessing preset: imagenet, cifar, demo, tiny")
    p.add_argument("--device", choices=["cpu", "cuda"])
    p.add_argument("--batch-size", type=int, dest="batch_size")
    p.add_argument("--workers", type=int, help="DALI threads")
    p.add_argument("--out", help="bank path or fsspec URL (default: $KD_CACHE/<dataset>-<split>/<teachers>-<key8>.zarr)")
    p.add_argument("--overwrite", action="store_true", default=None, help="replace a different bank at --out")
    p.add_argument("--dtype", choices=["float16", "float32"])
    p.add_argument("--format", help="dense (default), topk (with --topk K) or int8: compact banks are written "
                                    "directly, chunk by chunk")
    p.add_argument("--topk", type=int, help="K classes kept per vector with --format topk (plus the true class)")
    p.add_argument("--rows-per-chunk", type=int, dest="rows_per_chunk")
    p.add_argument("--skip-corrupt", action="store_true", default=None, dest="skip_corrupt",
                   help="record undecodable images as skipped instead of failing")
    p.add_argument("--views", type=int, help="views per image (K)")
    p.add_argument("--view-policy", dest="view_policy", help="center, rrc, rrc+flip")
    p.add_argument("--view-seed", type=int, dest="view_seed")
    p.add_argument("--seed", type=int, help="init seed for teachers with --weights none")
    p.add_argument("--amp", action="store_true", default=None, help="autocast the teachers on CUDA")
    p.add_argument("--config", help="YAML file of defaults (keys of DumpConfig)")
    p.add_argument("-v", "--verbose", action="store_true")
    p.add_argument("overrides", nargs="*", help="key=value config overrides")
    return p


@cli_entry
def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    from stage1_teacher_logits.dump import DumpConfig, run_dump

    cli = {k: v for k, v in vars(args).items() if k not in ("config", "overrides", "verbose")}
    cfg = resolve(DumpConfig, args.config, cli, args.overrides)
    path = run_dump(cfg)
    if int(os.environ.get("RANK", "0")) == 0:  # one line per command, also under torchrun
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
