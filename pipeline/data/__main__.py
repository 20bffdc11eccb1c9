"""``python -m pipeline.data prepare-demo [--out DIR]``: write the embedded dataset as a JPEG tree."""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from pipeline.errors import cli_entry, setup_logging


@cli_entry
def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pipeline.data", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("prepare-demo", help="write Fashion-MNIST as train/<class>/*.jpg, val/<class>/*.jpg")
    d.add_argument("--out", default="data/fashion-mnist")
    d.add_argument("--train-per-class", type=int, default=None, help="cap of train images per class")
    d.add_argument("--val-per-class", type=int, default=None, help="cap of val images per class")
    args = p.parse_args(argv)
    setup_logging()
    if args.cmd == "prepare-demo":
        from pipeline.data.embedded import prepare_default_dataset

        caps = {k: v for k, v in (("train", args.train_per_class), ("val", args.val_per_class)) if v}
        print(prepare_default_dataset(args.out, caps or None))
    return 0


if __name__ == "__main__":
    sys.exit(main())
