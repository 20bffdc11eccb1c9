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

from pipeline.config import default_of, resolve
from pipeline.errors import CliParser, cli_entry, setup_logging


def build_parser() -> argparse.ArgumentParser:
    from pipeline.data.presets import PRESETS
    from stage1_teacher_logits.dump import DumpConfig

    def d(key: str) -> str:
        return f"(default: {default_of(DumpConfig, key)})"

    p = CliParser(prog="python -m pipeline.dump_logits", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", action="append",
                   help="model name (repeatable: ensemble on the T axis); python -c 'import pipeline.models as m; "
                        "print(m.available_models())' lists them (default: none, required)")
    p.add_argument("--weights", action="append",
                   help="per teacher: DEFAULT, a torchvision weights enum name, none, or a checkpoint path "
                        "(default: DEFAULT)")
    p.add_argument("--data", "--data-path", dest="data",
                   help="dataset root (ImageNet folders, *_list.txt, CIFAR pickles, packed shards; `make demo` "
                        "prepares data/fashion-mnist) (default: none, required)")
    p.add_argument("--split", choices=["train", "val", "test"], help=f"{d('split')}")
    p.add_argument("--layout", help=f"dataset layout: auto, imagefolder, filelist, cifar, shards {d('layout')}")
    p.add_argument("--preset", help=f"preprocessing: auto (each teacher's own: a timm tag's pretrained config or a torchvision "
                                    f"enum's transforms; else cifar for CIFAR pickles, else imagenet), "
                                    f"{', '.join(sorted(PRESETS))} {d('preset')}")
    p.add_argument("--device", choices=["cpu", "cuda"], help=f"cpu (DALI CPU-only) or cuda (mixed decoding) "
                                                            f"{d('device')}")
    p.add_argument("--loader", choices=["auto", "dali", "torch"],
                   help=f"image loader: dali (NVIDIA DALI, the default where installed) or torch {d('loader')}")
    p.add_argument("--batch-size", "-b", type=int, dest="batch_size", help=f"{d('batch_size')}")
    p.add_argument("--workers", "-j", type=int, help=f"loader threads/processes {d('workers')}")
    p.add_argument("--out", help="bank path or fsspec URL (default: $KD_CACHE, else ~/.cache/offline-kd/label_banks, "
                                 "/<dataset>-<split>/<teachers>-<key8>.zarr)")
    p.add_argument("--overwrite", action="store_true", default=None, help="replace a different bank at --out")
    p.add_argument("--dtype", choices=["float16", "float32"],
                   help=f"stored logits; float32 for logits beyond +-65504 {d('dtype')}")
    p.add_argument("--format", help=f"dense, topk (with --topk K), sampled (with --topk K --samples S) or int8: "
                                    f"compact banks are written directly, chunk by chunk {d('format')}")
    p.add_argument("--topk", type=int, help=f"K classes kept per vector with --format topk or sampled (plus the true "
                                            f"class) {d('topk')}")
    p.add_argument("--samples", type=int, help=f"S classes importance-sampled per vector from the rest of the "
                                               f"teacher's distribution with --format sampled {d('samples')}")
    p.add_argument("--sample-seed", type=int, dest="sample_seed", help=f"seed of the sampled classes "
                                                                       f"{d('sample_seed')}")
    p.add_argument("--rows-per-chunk", type=int, dest="rows_per_chunk", help=f"{d('rows_per_chunk')}")
    p.add_argument("--skip-corrupt", action="store_true", default=None, dest="skip_corrupt",
                   help="record undecodable images as skipped instead of failing")
    p.add_argument("--views", type=int, help=f"views per image (K) {d('views')}")
    p.add_argument("--view-policy", dest="view_policy", help=f"center, rrc, rrc+flip {d('view_policy')}")
    p.add_argument("--view-seed", type=int, dest="view_seed", help=f"seed of the view boxes {d('view_seed')}")
    p.add_argument("--seed", type=int, help=f"init seed for teachers with --weights none {d('seed')}")
    p.add_argument("--amp", action="store_true", default=None, help="autocast the teachers (CUDA only)")
    p.add_argument("--features", action="store_true", default=None,
                   help="also store each teacher's pooled penultimate embedding (for rkd, pkt, sp, crd, fitnet)")
    p.add_argument("--class-map", dest="class_map",
                   help="file of 'class_name teacher_index' lines (or JSON): dataset class -> teacher output "
                        "(default: one to one, or by ImageNet wnid for 1000-class teachers)")
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
