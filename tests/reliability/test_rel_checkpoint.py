"""Fault 2: a checkpoint is never half-written. A process saving checkpoints in a tight loop with
``save_atomic`` is SIGKILLed at random moments; every time, ``last.pt`` loads and is one whole checkpoint.

The end-to-end kill of ``train_student`` mid-epoch and ``--resume`` (same final weights, each epoch once in
metrics.jsonl) is tests/stage2_student_train/test_s2_resume.py::test_kill_and_resume."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from rel_helpers import REPO, env

# Runs in a fresh interpreter (forking pytest itself, with zarr/DALI threads around, can deadlock the child):
# fork a saver, kill it after a random delay, check the file, repeat.
_SCRIPT = r"""
import json, os, random, signal, sys, time
import torch
from stage2_student_train.checkpoint import load, save_atomic

SIZES = (50_000, 600_000)  # float32 elements: 0.2 MB and 2.4 MB checkpoints, alternating
path, rng = sys.argv[1], random.Random(int(sys.argv[2]))
last_k, seen = -1, []
for _ in range(int(sys.argv[3])):
    pid = os.fork()
    if pid == 0:  # saver: k = last_k + 1, ... forever (k is in the payload and decides its size)
        k = last_k + 1
        while True:
            save_atomic({"k": k, "x": torch.full((SIZES[k % 2],), float(k))}, path)
            k += 1
    time.sleep(rng.uniform(0.02, 0.3))
    os.kill(pid, signal.SIGKILL)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    if not os.path.exists(path):  # killed before the first save completed: no file, never a torn one
        seen.append(None)
        continue
    state = load(path)  # raises on a torn file
    k = state["k"]
    whole = state["x"].numel() == SIZES[k % 2] and bool((state["x"] == k).all())
    seen.append({"k": k, "whole": whole})
    last_k = k
print(json.dumps(seen))
"""


def test_save_atomic_survives_sigkill_at_random_moments(tmp_path: Path):
    path = tmp_path / "last.pt"
    r = subprocess.run([sys.executable, "-c", _SCRIPT, str(path), "1234", "10"], cwd=REPO, env=env(),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    seen = json.loads(r.stdout.strip().splitlines()[-1])
    ks = [s["k"] for s in seen if s is not None]
    assert all(s["whole"] for s in seen if s is not None)
    assert ks == sorted(ks) and len(ks) >= 5 and ks[-1] >= 5  # saves were really happening around the kills
    # what a kill can leave besides last.pt: only the saver's own temp files, never a second checkpoint name
    assert {p.name for p in tmp_path.iterdir() if not p.name.startswith(".last.pt.tmp-")} == {"last.pt"}
    assert list(tmp_path.glob(".last.pt.tmp-*")), "no kill landed inside a save (nothing was tested)"
