"""``python -m pipeline.labels plan``: which bank formats fit a dataset, a budget and the methods' temperatures.

    python -m pipeline.labels plan --images 1281167 --classes 1000 --teachers 1 --views 1 --budget 20GB
    python -m pipeline.labels plan --images 1281167 --classes 1000 --views 16 --bank BANK --budget 64GB

For each format (dense float16, int8, top-k 5 / 10 / 20, sampled 5+5 and 10+10) it prints the bytes stage 2 holds
in memory (exact: the resident layout of :mod:`pipeline.bank.resident`, once per node), the bytes on disk and
whether both fit ``--budget``. Without ``--bank`` the disk figure is the uncompressed payload (an upper bound);
with ``--bank`` (a dense bank of your teachers, e.g. dumped on a sample of the data) every format is encoded from
up to ``--rows`` of its rows exactly as stage 1 and ``labels compact`` encode them
(:func:`pipeline.bank.compact.encode_chunk`), compressed with the bank codecs to measure bytes on disk, timed to
give the encoding time of the whole set on this machine (one thread), and measured for fidelity: KL and total
variation to the teacher at T = 1, 2, 4 on the targets stage 2 builds, the tail share, top-1 agreement.
"""

from __future__ import annotations

import argparse
import json
import re
import time
from typing import Any

import numpy as np

from pipeline.errors import UsageError

# (label, format, K, S)
CANDIDATES: tuple[tuple[str, str, int | None, int | None], ...] = (
    ("dense fp16", "dense", None, None), ("int8", "int8", None, None), ("top-k 5", "topk", 5, None),
    ("top-k 10", "topk", 10, None), ("top-k 20", "topk", 20, None), ("sampled 5+5", "sampled", 5, 5),
    ("sampled 10+10", "sampled", 10, 10))


def parse_bytes(text: str) -> int:
    """``20GB``, ``512MiB``, ``1.5e9`` -> bytes; UsageError naming the value otherwise."""
    m = re.fullmatch(r"\s*([0-9.]+(?:e[0-9]+)?)\s*([kmgt]?i?b?)\s*", text.lower())
    if not m:
        raise UsageError(f"--budget {text!r} is not a size: give e.g. 20GB, 512MiB or 1.5e9")
    unit = m.group(2).rstrip("b")
    scale = {"": 1, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12, "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}
    return int(float(m.group(1)) * scale[unit])


def resident_bytes_per_vector(fmt: str, classes: int, k: int | None, s: int | None) -> int:
    """Stage 2's resident bytes per (sample, teacher, view) vector (pipeline.bank.resident's layout)."""
    from pipeline.bank.resident import bytes_per_vector

    return bytes_per_vector(fmt, classes, k, s)


def raw_bytes_per_vector(fmt: str, classes: int, k: int | None, s: int | None) -> int:
    from pipeline.bank import compact as cp

    return 2 * classes if fmt == "dense" else cp.raw_bytes_per_vector(fmt, classes, k, s)


def _compressed(arrays: dict[str, np.ndarray]) -> int:
    """Bytes of ``arrays`` under the bank codecs (Blosc zstd level 3 with byte shuffle, as every bank chunk)."""
    from numcodecs import Blosc

    total = 0
    for a in arrays.values():
        codec = Blosc(cname="zstd", clevel=3, shuffle=Blosc.SHUFFLE if a.dtype.itemsize > 1 else Blosc.NOSHUFFLE)
        total += len(codec.encode(np.ascontiguousarray(a)))
    return total


def measure(bank_path: str, rows: int, classes: int | None = None) -> dict[str, dict[str, Any]]:
    """Per candidate, on up to ``rows`` rows of the dense bank spread over it: compressed bytes per vector,
    encoding CPU seconds per vector, fidelity (:func:`pipeline.bank.compact.fidelity_from_sums`). UsageError for
    a compact bank, or one of another class count than ``classes`` (bytes and fidelity per vector depend on C)."""
    from pipeline.bank import compact as cp
    from pipeline.bank.reader import LabelBank

    bank = LabelBank(bank_path)
    if bank.format != "dense":
        raise UsageError(f"--bank {bank_path} is a {bank.format} bank: give a dense bank (plan measures every format "
                         "from the full logits)")
    if classes is not None and bank.num_classes != classes:
        raise UsageError(f"--classes {classes} but --bank {bank_path} has {bank.num_classes} classes: give a sample "
                         f"bank of the task you plan for, or --classes {bank.num_classes}")
    n = bank.num_samples
    take = np.unique(np.linspace(0, n - 1, min(rows, n)).astype(np.int64))
    logits = np.concatenate([bank.read_logits(int(i), int(i) + 1) for i in take]).astype(np.float32)
    labels = bank.labels()[take]
    keep = np.isfinite(logits.reshape(len(logits), -1)).all(axis=1)
    logits, labels, take = logits[keep], labels[keep], take[keep]
    vectors = int(np.prod(logits.shape[:3]))
    out: dict[str, dict[str, Any]] = {}
    for label, fmt, k, s in CANDIDATES:
        if fmt == "dense":
            stored = {"logits": logits.astype(bank.attrs.get("dtype", "float16"))}
            out[label] = {"disk_per_vector": _compressed(stored) / vectors, "encode_s_per_vector": 0.0}
            continue
        if k is not None and k >= logits.shape[-1]:
            continue
        t0 = time.process_time()
        arrays, sums = cp.encode_chunk(logits, labels, np.zeros(len(labels), bool), fmt, k, "float16", samples=s)
        spent = time.process_time() - t0
        fid = cp.fidelity_from_sums(sums[slice(*cp.sums_layout(logits.shape[1])["fidelity"])], fmt)
        out[label] = {"disk_per_vector": _compressed(arrays) / vectors, "encode_s_per_vector": spent / vectors,
                      "fidelity": fid}
    return out


def plan(images: int, classes: int, teachers: int = 1, views: int = 1, budget: int | None = None,
         bank: str | None = None, rows: int = 2048) -> list[dict[str, Any]]:
    """One row per candidate format: ``format``, ``resident_bytes`` (stage 2, once per node), ``disk_bytes``
    (measured with ``bank``, else the uncompressed payload: ``disk_measured`` says which), ``encode_s`` (the whole
    set's encoding, one thread, with ``bank``), ``fits`` (both within ``budget``), ``fidelity`` (with ``bank``)."""
    if min(images, classes, teachers, views) < 1:
        raise UsageError("--images, --classes, --teachers and --views must be >= 1")
    vectors = images * teachers * views
    measured = measure(bank, rows, classes) if bank else {}
    out = []
    for label, fmt, k, s in CANDIDATES:
        if k is not None and k >= classes:
            continue
        m = measured.get(label)
        disk = (m["disk_per_vector"] if m else raw_bytes_per_vector(fmt, classes, k, s)) * vectors
        resident = resident_bytes_per_vector(fmt, classes, k, s) * vectors
        out.append({"format": label, "resident_bytes": resident, "disk_bytes": int(disk), "disk_measured": bool(m),
                    "encode_s": m["encode_s_per_vector"] * vectors if m else None,
                    "fits": None if budget is None else bool(resident <= budget and disk <= budget),
                    "fidelity": (m or {}).get("fidelity")})
    return out


def _gb(x: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if x >= scale:
            return f"{x / scale:.3g} {unit}"
    return f"{x:.0f} B"


def format_table(rows: list[dict[str, Any]]) -> str:
    head = ["format", "in memory (stage 2)", "on disk", "encode (1 thread)", "fits", "KL T=1/2/4", "tail T=4 "
            "(teacher)", "top-1 agree"]
    lines = [" | ".join(head), " | ".join("---" for _ in head)]
    for r in rows:
        f = r["fidelity"] or {}
        kl = "/".join(f"{f[f'kl_t{t}']:.3g}" for t in ("1", "2", "4")) if "kl_t1" in f else "-"
        tail = f"{f['tail_t4']:.3g} ({f['tail_dense_t4']:.3g})" if "tail_t4" in f else "-"
        agree = f"{f['top1_agreement']:.4f}" if "top1_agreement" in f else "-"
        if r["format"].startswith("sampled") and "tail_t4" in f:  # one draw; the sampled classes carry the tail
            tail, agree = f"sampled ({f['tail_dense_t4']:.3g})", f"{agree} (one draw)"
        lines.append(" | ".join([
            r["format"], _gb(r["resident_bytes"]), ("" if r["disk_measured"] else "<= ") + _gb(r["disk_bytes"]),
            "-" if r["encode_s"] is None else f"{r['encode_s'] / 60:.1f} min",
            "-" if r["fits"] is None else ("yes" if r["fits"] else "no"), kl, tail, agree]))
    return "\n".join(lines)


def _add(p: argparse.ArgumentParser) -> None:
    p.add_argument("--images", type=int, required=True, help="samples in the set (N)")
    p.add_argument("--classes", type=int, required=True, help="classes (C)")
    p.add_argument("--teachers", type=int, default=1, help="teachers in the bank (T, default 1)")
    p.add_argument("--views", type=int, default=1, help="views per image (V, default 1)")
    p.add_argument("--budget", default=None, help="memory / disk budget, e.g. 20GB (default: none)")
    p.add_argument("--bank", default=None, help="a dense bank of the teachers to measure disk bytes, encoding time "
                                                "and fidelity on (default: sizes only)")
    p.add_argument("--rows", type=int, default=2048, help="rows of --bank measured (default 2048)")
    p.add_argument("--json", action="store_true", help="print the rows as JSON")


def _run(args: argparse.Namespace) -> int:
    budget = parse_bytes(args.budget) if args.budget else None
    rows = plan(args.images, args.classes, args.teachers, args.views, budget, args.bank, args.rows)
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print(f"N={args.images:,} T={args.teachers} V={args.views} C={args.classes}: "
              f"{args.images * args.teachers * args.views:,} vectors"
              + (f", budget {_gb(budget)}" if budget else "")
              + ("" if args.bank else " (disk: uncompressed payload; give --bank for measured bytes and fidelity)"))
        print(format_table(rows))
    return 0


def register(commands: dict) -> None:
    commands["plan"] = (_add, _run, "formats that fit a set and a budget, with measured fidelity (--bank)")

