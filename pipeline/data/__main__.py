"""``python -m pipeline.data COMMAND``: dataset preparation.

  prepare-demo [--task fashion10|pairs100] [--out DIR]   write the embedded dataset (or the 100-class pairs task)
  list ROOT [--split S] [-o DIR]                 <split>_list.txt + classes.txt (file-list layout; -o ROOT is usual)
  pack ROOT [--split S] -o SHARDS [--shard-size 1GB] [--resize-shorter N] [--quality Q] [--workers P]
                                                 webdataset tar shards + shards.json (resumable: re-run to finish)
  verify SHARDS [--split S] [--source ROOT] [--no-decode] [--workers P]
                                                 check every member; exit 1 naming shard and member on a problem
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Sequence

from pipeline.data.layouts import SPLITS
from pipeline.errors import CliParser, UsageError, cli_entry, setup_logging


def _prepare_demo(args: argparse.Namespace) -> str:
    from pipeline.data.embedded import prepare_default_dataset, prepare_pairs_dataset

    for flag, v in (("--train-per-class", args.train_per_class), ("--val-per-class", args.val_per_class),
                    ("--heldout-per-class", args.heldout_per_class)):
        if v is not None and v < 1:
            raise UsageError(f"{flag} must be at least 1 (leave it out for the default), got {v}")
    caps = {k: v for k, v in (("train", args.train_per_class), ("val", args.val_per_class),
                              ("heldout", args.heldout_per_class)) if v}
    if args.task == "pairs100":
        return str(prepare_pairs_dataset(args.out or "data/fashion-pairs", caps or None))
    if args.heldout_per_class is not None:
        raise UsageError("--heldout-per-class applies to --task pairs100 only")
    return str(prepare_default_dataset(args.out or "data/fashion-mnist", caps or None))


@cli_entry
def main(argv: Sequence[str] | None = None) -> int:
    p = CliParser(prog="python -m pipeline.data", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("prepare-demo", help="write Fashion-MNIST as train/<class>/*.jpg, val/<class>/*.jpg (--task "
                                            "pairs100: the 100-class task of two stacked items)")
    d.add_argument("--task", default="fashion10", choices=["fashion10", "pairs100"],
                   help="fashion10: Fashion-MNIST's 10 classes (default); pairs100: two items stacked vertically, class "
                        "= (top, bottom), train / heldout / val")
    d.add_argument("--out", default=None, help="default: data/fashion-mnist (fashion10), data/fashion-pairs (pairs100)")
    d.add_argument("--train-per-class", type=int, default=None,
                   help="images per class in train, >= 1 (default: all 6000; pairs100: 200)")
    d.add_argument("--val-per-class", type=int, default=None,
                   help="images per class in val, >= 1 (default: all 1000; pairs100: 50)")
    d.add_argument("--heldout-per-class", type=int, default=None,
                   help="pairs100 only: images per class in heldout, >= 1 (default 20)")

    ls = sub.add_parser("list", help="write <split>_list.txt (relpath label) and classes.txt "
                                     "from ROOT/<split>/<class>/*")
    ls.add_argument("root")
    ls.add_argument("--split", default="train", choices=list(SPLITS))
    ls.add_argument("-o", "--out", default=None, help="output directory (default ROOT: paths are relative to ROOT)")

    pk = sub.add_parser("pack", help="pack a split into webdataset tar shards (resumable)")
    pk.add_argument("root")
    pk.add_argument("--split", default="train", choices=list(SPLITS))
    pk.add_argument("-o", "--out", required=True, help="shard directory (several splits may share one)")
    pk.add_argument("--shard-size", default="1GB", help="target tar size, e.g. 1GB, 256MiB (default 1GB)")
    pk.add_argument("--resize-shorter", type=int, default=None,
                    help="shrink the shorter side to N px and re-encode as JPEG (own fingerprint)")
    pk.add_argument("--quality", type=int, default=None,
                    help="re-encode as JPEG at quality Q (default 90 with resizing)")
    pk.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    pk.add_argument("--overwrite", action="store_true", help="replace a different pack of this split")
    pk.add_argument("-q", "--quiet", action="store_true", help="no progress bar")

    vf = sub.add_parser("verify", help="check every member of a pack (exit 1 on any problem)")
    vf.add_argument("root")
    vf.add_argument("--split", action="append", choices=list(SPLITS), help="default: all packed splits")
    vf.add_argument("--source", default=None, help="also check that the pack was made from this dataset root: the same file names, order "
                    "and labels (its fingerprint; image bytes are checked against the pack's own crc32, not the source)")
    vf.add_argument("--no-decode", action="store_true", help="skip decoding (headers, sizes and crc32 only)")
    vf.add_argument("--workers", type=int, default=1, help="processes")
    args = p.parse_args(argv)
    setup_logging()
    if args.cmd == "prepare-demo":
        print(_prepare_demo(args))
    elif args.cmd == "list":
        from pipeline.data.prepare import write_list

        print(json.dumps(write_list(args.root, args.split, args.out)))
    elif args.cmd == "pack":
        from pipeline.data.prepare import pack

        s = pack(args.root, args.out, args.split, args.shard_size, args.resize_shorter, args.quality, args.workers,
                 args.overwrite, progress=not args.quiet)
        mb = s["source_bytes_written"] / 1e6
        print(f"{s['out']}: split {s['split']}, {s['num_samples']} samples in {s['shards']} shards "
              f"({s['written_shards']} written, {s['kept_shards']} kept), {s['bytes'] / 1e6:.1f} MB, "
              f"{mb / max(s['seconds'], 1e-9):.1f} MB/s read, fingerprint {s['fingerprint'][:16]}")
    elif args.cmd == "verify":
        from pipeline.data.prepare import verify

        errs, summary = verify(args.root, args.split, not args.no_decode, args.source, args.workers)
        for e in errs:
            print(f"error: {e}", file=sys.stderr)
        if errs:
            print(f"verify: {len(errs)} problem(s) in {args.root}", file=sys.stderr)
            return 1
        for split, s in summary.items():
            print(f"ok {args.root} {split}: {s['num_samples']} samples in {s['shards']} shards, "
                  f"fingerprint {s['fingerprint'][:16]}{' (re-encoded)' if s['transform'] else ''}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
