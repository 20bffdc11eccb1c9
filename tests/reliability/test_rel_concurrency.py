"""Fault 6: two dumps of the same cache key at once, and concurrent readers.

The first dump holds ``<bank>.lock`` from before it touches the bank until it returns; a second one with the same
key (same default cache path) exits 2 at once with one line naming the lock, without touching the bank; the first
finishes a bank equal to an uninterrupted one. A bank being written is refused by stage 2. Several processes
loading a complete bank at the same time all read the same bytes."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from pipeline.bank.reader import LabelBank, verify_bank
from pipeline.dump_logits import main
from pipeline.train_student import main as train_main
from rel_helpers import (REPO, assert_one_line_error, assert_same_bank, chunk_files, driver_cmd, dump_args, env,
                         train_args, wait_for)


def test_second_dump_on_same_key_exits_2(demo_root: Path, tmp_path: Path, rel_reference: Path, monkeypatch,
                                         capsys):
    cache = tmp_path / "cache"
    monkeypatch.setenv("KD_CACHE", str(cache))
    pause = tmp_path / "release"
    point = dict(module="pipeline.bank.writer", func="write_rows", line='g["done"][j] = True', hit=3,
                 action="pause")
    first = subprocess.Popen(driver_cmd("pipeline.dump_logits", *dump_args(demo_root, None)), cwd=REPO,
                             env=env(KD_CACHE=str(cache), REL_POINT=json.dumps(point), REL_PAUSE=str(pause)),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(Path(str(pause) + ".paused").exists, what="the first dump to hold the lock mid-dump", proc=first)
        banks = list(cache.glob("*/*.zarr"))
        assert len(banks) == 1
        bank = banks[0]
        before = chunk_files(bank)
        capsys.readouterr()
        # the second dump of the same key (no --out: the same content-addressed path) is refused at once
        assert main(dump_args(demo_root, None)) == 2
        captured = capsys.readouterr()
        msg = assert_one_line_error(captured.err, "another dump is writing", str(bank) + ".lock")
        assert captured.out == "" and "stale lock" in msg
        assert chunk_files(bank) == before  # untouched
        # stage 2 refuses the bank being written
        assert train_main(train_args(demo_root, tmp_path / "run", labels=[bank])) == 2
        assert_one_line_error(capsys.readouterr().err, "incomplete", "'complete'")
    finally:
        pause.touch()
        out, err = first.communicate(timeout=300)
    assert first.returncode == 0, err[-3000:]
    assert out.strip() == str(bank)
    assert_same_bank(bank, rel_reference)
    # the lock is free again: the same command now just prints the finished bank
    assert main(dump_args(demo_root, None)) == 0
    assert capsys.readouterr().out.strip() == str(bank)


_READER = r"""
import hashlib, os, sys, time
from pipeline.bank.reader import LabelBank
go = sys.argv[2]
while not os.path.exists(go):
    time.sleep(0.002)
digests = set()
for _ in range(5):
    t = LabelBank(sys.argv[1]).load()
    digests.add(hashlib.sha256(t.numpy().tobytes()).hexdigest())
print(" ".join(sorted(digests)))
"""


def test_concurrent_readers_of_a_complete_bank(demo_bank: Path, tmp_path: Path):
    want = hashlib.sha256(LabelBank(demo_bank).load().numpy().tobytes()).hexdigest()
    go = tmp_path / "go"
    procs = [subprocess.Popen([sys.executable, "-c", _READER, str(demo_bank), str(go)], cwd=REPO, env=env(),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(3)]
    try:
        go.touch()  # all start reading at once
        for _ in range(3):  # and this process verifies the bank meanwhile
            assert verify_bank(demo_bank) == []
        results = [p.communicate(timeout=300) for p in procs]
    finally:
        for p in procs:
            p.kill()
    for p, (out, err) in zip(procs, results):
        assert p.returncode == 0, err[-2000:]
        assert out.split() == [want]
    # reading never writes: the bank is still complete and healthy
    assert verify_bank(demo_bank) == []
    assert torch.equal(LabelBank(demo_bank).load(), torch.from_numpy(np.asarray(LabelBank(demo_bank).read_logits())))
