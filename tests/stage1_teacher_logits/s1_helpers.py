"""Helpers of the stage-1 tests (imported by the test modules of this folder; not a test module)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def done_files(bank: Path) -> int:
    """How many chunk done flags the dump has written so far."""
    d = bank / "done" / "c"
    return len([f for f in os.listdir(d) if not f.endswith(".partial")]) if d.is_dir() else 0


def kill_dump_after_chunks(args: list[str], bank: Path, env: dict, chunks: int = 3) -> int:
    """Run ``python -m pipeline.dump_logits ARGS`` and SIGKILL it once ``chunks`` done flags exist in ``bank``;
    -> its return code (-SIGKILL unless it finished first)."""
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.dump_logits", *args], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while done_files(bank) < chunks and proc.poll() is None and time.time() < deadline:
            time.sleep(0.002)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    return proc.returncode
