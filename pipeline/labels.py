"""Label-bank tools: ``python -m pipeline.labels {info,verify,check,map-check,ensemble,compact,stats,plan} ...``.

- ``info``: shape, format, classes, each teacher's weights, preprocessing (and its source) and the output
  feeding each class, views, loader, embeddings, metrics, size on disk, bytes per sample and per view; for compact
  banks the fidelity to the dense teacher measured when they were written, on the targets stage 2 builds: at
  T = 1, 2, 4 the KL and total variation, and the tail's share of the target beside the teacher's own share; a
  ``DAMAGED`` line for each array of a complete bank missing chunk files (existence only: ``verify`` decodes).
- ``verify``: reads everything, checks checksums, shapes and completeness; exit 1 on any problem.
- ``check``: for K sampled rows, rebuilds the inputs (manifest, preprocessing, stored views) and the teachers
  (the bank's own records), runs them live and compares with the stored rows in the stored format's terms
  (:mod:`pipeline.bank.check`); exit 1 beyond tolerance, 2 on bad input.
- ``map-check``: a label-map bank's pooled labels against its teachers' real outputs on K random crops
  (:func:`stage1_teacher_logits.label_maps.map_check`).
- ``ensemble``, ``compact``, ``stats``: dask jobs over the bank chunks (see :mod:`pipeline.bank.tools`).

- ``plan``: bytes, memory, encoding time and fidelity of every format for a dataset size (measured on ``--bank``).
"""
# Subcommands live in ``COMMANDS`` (name -> (add_arguments, run, help)); the bank-tools commands (``ensemble``,
# ``compact``, ``stats``) come from pipeline.bank.tools, ``plan`` from pipeline.bank.plan.

from __future__ import annotations

import argparse
import json
import sys
from typing import Callable, Sequence

from pipeline import storage
from pipeline.errors import CliParser, cli_entry, setup_logging

COMMANDS: dict[str, tuple[Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int], str]] = {}


def bank_info(path: str) -> dict:
    """Summary of a bank as a dict (what ``labels info`` prints): shape, format, dataset and its classes, each
    teacher with its weights, preprocessing (and where it came from) and the output feeding each class, views,
    loader, embeddings, metrics, size, and for compact banks their fidelity."""
    from pipeline.bank.reader import LabelBank, class_index, missing_chunk_files, teacher_preprocessing

    bank = LabelBank(path)
    n, t, v, c = bank.shape
    size = storage.size(path)
    a = bank.attrs
    ds = a.get("dataset", {})
    classes = list(ds.get("classes") or [])
    index = class_index(a)
    pres = teacher_preprocessing(a)
    teachers = [{**rec, "preprocessing": pres[k], "class_index": index[k],
                 "one_to_one": index[k] == list(range(c))} for k, rec in enumerate(a.get("teachers") or [])]
    info = {
        "path": path,
        "format": bank.format,
        "shape": {"N": n, "T": t, "V": v, "C": c},
        "dtype": a.get("dtype"),
        "complete": bank.complete,
        "teachers": teachers,
        "dataset": {k: ds.get(k) for k in ("name", "split", "layout", "num_samples", "num_classes", "fingerprint")},
        "classes": classes,
        "views": a.get("views"),
        "preprocessing": (a.get("preprocessing") or {}).get("name"),
        "loader": a.get("loader", "dali"),
        "embeddings": a.get("features"),
        "metrics": a.get("metrics"),
        "rows_per_chunk": a.get("rows_per_chunk"),
        "bytes_on_disk": size,
        "bytes_per_sample": round(size / max(n, 1), 2),
        "bytes_per_view": round(size / max(n * v, 1), 2),
        "skipped": int(bank.skipped().sum()),
        "missing_chunks": missing_chunk_files(bank),
    }
    if bank.format == "labelmap":
        info["label_map"] = {k: v for k, v in a["label_map"].items() if k not in ("cells", "region_box")}
    elif bank.format != "dense":
        info["compact"] = {k: a[k] for k in ("topk", "samples", "sample_seed", "tail", "raw_bytes_per_vector")
                           if k in a}
    if "fidelity" in a:
        info["fidelity"] = a["fidelity"]
    if "source_metrics" in a:
        info["source_metrics"] = a["source_metrics"]
    if "sources" in a:
        info["sources"] = a["sources"]
    return info


def _abbreviate(items: list[str], show: int = 8) -> str:
    """``a, b, c`` or, for many, the first ``show - 2``, ``...``, the last 2 and the count."""
    if len(items) <= show:
        return ", ".join(items)
    return ", ".join(items[:show - 2]) + ", ..., " + ", ".join(items[-2:]) + f" ({len(items)})"


def _describe_pre(p: dict) -> str:
    mean = "/".join(f"{x:.3g}" for x in p.get("mean", []))
    std = "/".join(f"{x:.3g}" for x in p.get("std", []))
    text = (f"'{p.get('name')}': resize {p.get('resize')}, crop {p.get('crop')}, {p.get('interpolation', 'bilinear')}, "
            f"{p.get('crop_mode', 'center')} crop, mean {mean}, std {std}")
    return text + (f"  (from {p['source']})" if p.get("source") else "")


def _add_info(p: argparse.ArgumentParser) -> None:
    p.add_argument("bank")
    p.add_argument("--json", action="store_true", help="print JSON")


def _run_info(args: argparse.Namespace) -> int:
    info = bank_info(args.bank)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    s = info["shape"]
    print(f"bank        {info['path']}")
    damage = " (but chunk files are missing: see DAMAGED below)" if info["missing_chunks"] else ""
    print(f"format      {info['format']}  dtype {info['dtype']}  complete {info['complete']}{damage}")
    print(f"shape       N={s['N']} T={s['T']} V={s['V']} C={s['C']}  rows/chunk {info['rows_per_chunk']}")
    ds = info["dataset"]
    print(f"dataset     {ds['name']} / {ds['split']} ({ds['layout']})  fingerprint {str(ds['fingerprint'])[:16]}")
    print(f"classes     {_abbreviate(info['classes'])}")
    views = info["views"] or {}
    extra = ", ".join(f"{k} {views[k]}" for k in ("seed", "scale", "ratio") if k in views)
    print(f"views       {views.get('policy')}, {views.get('num_views')} per image" + (f" ({extra})" if extra else ""))
    print(f"loader      {info['loader']}")
    emb = info["embeddings"]
    print("embeddings  " + (f"{emb.get('format')}, D per teacher {emb.get('dims')}" if emb else "none (dump with "
                                                                                             "--features to store them)"))
    for k, t in enumerate(info["teachers"] or []):
        w = t.get("weights")
        print(f"teacher {k}   {t['arch']}  weights {w}" + (f"  sha256 {t['sha256'][:12]}" if "sha256" in t else ""))
        print(f"            preprocessing {_describe_pre(t['preprocessing'])}")
        if t["one_to_one"]:
            print("            outputs     one to one with the classes")
        else:
            pairs = [f"{c} -> {i}" for c, i in zip(info["classes"], t["class_index"])]
            print(f"            outputs     class -> teacher output: {_abbreviate(pairs, 6)}")
    def metric_line(head: str, name: str, m: dict, what: str) -> None:
        print(f"{head:<12}{name}{what}: top1 {m['top1']:.2f}  top5 {m['top5']:.2f}  nll {m['nll']:.4f}  "
              f"ece {m['ece']:.4f}")

    # what each line measures: a compact bank's metrics are of its reconstruction (a top-k tail spreads its mass
    # evenly, so top-5 is not the teacher's), shown beside the teacher's own before encoding
    stored = {"dense": "", "labelmap": " (each map's mean over its cells)"}.get(
        info["format"], f" (the stored {info['format']} soft labels, as stage 2 reads them)")
    for name, m in (info.get("source_metrics") or {}).items():
        metric_line("metrics", name, m, " (the teacher, before encoding)")
    for name, m in (info["metrics"] or {}).items():
        metric_line("metrics" if not info.get("source_metrics") else "", name, m, stored)
    print(f"size        {info['bytes_on_disk'] / 1e6:.2f} MB  {info['bytes_per_sample']} B/sample  "
          f"{info['bytes_per_view']} B/view  skipped {info['skipped']}")
    for name, keys in info["missing_chunks"].items():
        print(f"DAMAGED     array '{name}' misses {len(keys)} chunk file(s) ({_abbreviate(keys, 4)}); run "
              f"python -m pipeline.labels verify {info['path']}, then remove the bank and dump it again")
    if "compact" in info:
        cmp = info["compact"]
        kept = f"top {cmp['topk']} + true class, tail {cmp.get('tail')}" if "topk" in cmp else "int8 + per-vector scale"
        if "samples" in cmp:
            kept += f", {cmp['samples']} classes importance-sampled (seed {cmp.get('sample_seed')})"
        if cmp.get("tail") == "uniform":
            kept += " (first layout: stage 2 refuses it; rebuild with python -m pipeline.labels compact)"
        print(f"compact     {kept}  {cmp.get('raw_bytes_per_vector')} B/vector raw")
    if "label_map" in info:
        lm = info["label_map"]
        form = f"top-{lm['topk']} logits + tail per cell" if lm.get("topk") else f"{lm['map_dtype']} logits"
        print(f"label map   {lm['size']}x{lm['size']} cells, region {lm['region']}, {form}; native "
              f"{lm.get('native')}, kinds {lm.get('kinds')} (labels map-check BANK measures pooled labels)")
    if "fidelity" in info:
        from pipeline.bank.compact import format_fidelity

        print(f"fidelity    {format_fidelity(info['fidelity'], info['format'])}")
    return 0


def _add_verify(p: argparse.ArgumentParser) -> None:
    p.add_argument("bank")


def _run_verify(args: argparse.Namespace) -> int:
    from pipeline.bank.reader import verify_bank

    problems = verify_bank(args.bank)
    if problems:
        for pr in problems:
            print(f"FAIL {args.bank}: {pr}", file=sys.stderr)
        print(f"fix: remove {args.bank} and rerun the dump that wrote it (its config: labels info {args.bank}); a "
              "dump resumes an incomplete bank but never rewrites a complete one (with --overwrite it does when "
              "chunk files are missing)", file=sys.stderr)
        return 1
    print(f"OK {args.bank}")
    return 0


def _add_check(p: argparse.ArgumentParser) -> None:
    p.add_argument("bank")
    p.add_argument("--rows", type=int, default=64, help="rows sampled and checked (default 64)")
    p.add_argument("--seed", type=int, default=0, help="seed of the row sample (default 0)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="where the teachers run (default cpu)")
    p.add_argument("--loader", default="auto", choices=("auto", "dali", "torch"),
                   help="image loader (default: the one that made the bank; another one loosens the tolerance)")
    p.add_argument("--data", default=None, help="dataset root (default: the one recorded in the bank)")
    p.add_argument("--json", action="store_true", help="print JSON")


def _run_check(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from pipeline.bank.check import check_bank

    report = check_bank(args.bank, args.rows, args.seed, args.device, args.loader, args.data)
    if args.json:
        print(json.dumps({**asdict(report), "ok": report.ok}, indent=2))
    else:
        print("\n".join(report.lines()))
    return 0 if report.ok else 1


COMMANDS["info"] = (_add_info, _run_info, "classes, teachers (weights, preprocessing, outputs), views, loader, "
                                          "embeddings, metrics, size of a bank")
COMMANDS["verify"] = (_add_verify, _run_verify, "read every chunk; exit 1 on any problem")
COMMANDS["check"] = (_add_check, _run_check, "rebuild sampled rows' inputs and teachers from the bank's records, run "
                                             "them live, compare; exit 1 beyond the stored format's tolerance")


def _load_tools() -> None:
    """Register the bank-tools commands (ensemble, compact, stats) into this module's ``COMMANDS``.

    Registration is explicit (not an import side effect) because under ``python -m pipeline.labels`` this
    module runs as ``__main__``, a second copy with its own ``COMMANDS``."""
    from pipeline.bank.plan import register as register_plan
    from pipeline.bank.tools import register

    register(COMMANDS)
    register_plan(COMMANDS)
    from stage1_teacher_logits.label_maps import register as register_map_check

    register_map_check(COMMANDS)


@cli_entry
def main(argv: Sequence[str] | None = None) -> int:
    _load_tools()
    parser = CliParser(prog="python -m pipeline.labels", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    for name, (add, _, help_) in COMMANDS.items():
        add(sub.add_parser(name, help=help_))
    args = parser.parse_args(argv)
    setup_logging()
    return COMMANDS[args.cmd][1](args)


if __name__ == "__main__":
    sys.exit(main())
