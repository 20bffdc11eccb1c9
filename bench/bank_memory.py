"""Resident memory of a bank in a multi-process run: one copy per node (issue 21, point 4).

    python bench/bank_memory.py                      # 200,000 x 1000 fp16 dense bank (400 MB), 1 vs 2 processes
    python bench/bank_memory.py --n 20000 --write    # smaller; --write records the section in BENCHMARKS.md
    python bench/bank_memory.py --worker BANK        # (internal) one process of the torchrun measurement

Each configuration is a real ``torchrun --nproc_per_node P`` (gloo, CPU) whose processes load the bank with
``pipeline.bank.resident.load_residents`` (as stage 2 does), gather 50 random batches of 256 rows, and report
their proportional set size (PSS, ``/proc/self/smaps_rollup``: a page shared by k processes counts 1/k in each,
so the sum over processes is the node's real memory) before and after. Compared: 1 process; 2 processes sharing
one copy (the default); 2 processes with private copies (``KD_NODE_SHARE=0``, what every rank held before).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

SECTION = "Bank memory per node: one copy shared by a node's processes (bench/bank_memory.py)"


def pss_bytes() -> int:
    """This process's proportional set size (Linux)."""
    with open("/proc/self/smaps_rollup") as f:
        for line in f:
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no Pss in /proc/self/smaps_rollup")


def worker(bank: str) -> int:
    import torch

    from pipeline.bank.reader import LabelBank
    from pipeline.bank.resident import load_residents
    from pipeline.distributed import cleanup, gather_objects, init_distributed

    info = init_distributed("cpu")
    before = pss_bytes()
    (res,) = load_residents([LabelBank(bank)])
    rng = np.random.default_rng(info.rank)
    for _ in range(50):
        res.gather(torch.from_numpy(rng.integers(0, res.shape[0], 256)))
    after = pss_bytes()
    s = int(rng.integers(0, max(1, res.shape[0] - 256)))  # the gathered rows are the bank's
    want = LabelBank(bank).read_logits(s, s + 256)[:, :, 0].astype(np.float32)
    exact = bool(np.array_equal(res.gather(torch.arange(s, min(s + 256, res.shape[0]))).numpy(), want))
    rows = gather_objects({"rank": info.rank, "before": before, "after": after, "shared": res.shared,
                           "nbytes": res.nbytes, "exact": exact}, info)
    if info.is_main:
        print("RESULT " + json.dumps(rows))
    cleanup(info)
    return 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure(bank: Path, nproc: int, share: bool) -> list[dict]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "KD_NODE_SHARE": "1" if share else "0",
           "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
           str(_free_port()), str(Path(__file__).resolve()), "--worker", str(bank)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
    if proc.returncode:
        raise RuntimeError(proc.stderr[-3000:])
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--n", type=int, default=200_000, help="samples (default 200,000)")
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument("--write", action="store_true", help="record the section in BENCHMARKS.md")
    args = p.parse_args(argv)
    if args.worker:
        return worker(args.worker)
    from bank_scale import write_bank

    with tempfile.TemporaryDirectory(prefix="bank_memory-") as work:
        bank = Path(work) / "bank.zarr"
        write_bank(bank, args.n, 1, 1, args.classes, "dense", None, 4096)
        runs = {"1 process": measure(bank, 1, True), "2 processes, one shared copy": measure(bank, 2, True),
                "2 processes, private copies (KD_NODE_SHARE=0)": measure(bank, 2, False)}
    nbytes = runs["1 process"][0]["nbytes"]
    base = sum(r["after"] - r["before"] for r in runs["1 process"])
    lines = [f"Command: `python bench/bank_memory.py --n {args.n} --classes {args.classes}` (x86_64, 2 CPU cores "
             f"shared with other jobs, torchrun on gloo). Dense fp16 bank [N, T, V, C] = [{args.n}, 1, 1, "
             f"{args.classes}], {nbytes / 1e6:.0f} MB resident. PSS added by loading the bank and gathering 50 "
             "batches of 256 rows, summed over the node's processes:", "",
             "| configuration | PSS added per process (MB) | node total (MB) | vs 1 process |", "|---|---|---|---|"]
    for name, rows in runs.items():
        added = [r["after"] - r["before"] for r in rows]
        lines.append(f"| {name} | {' / '.join(f'{a / 1e6:.0f}' for a in added)} | {sum(added) / 1e6:.0f} | "
                     f"{sum(added) / base:.2f}x |")
    text = "\n".join(lines)
    print(text)
    if args.write:
        from benchmd import write_section

        write_section(SECTION, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
