"""The dump's plan without a model: chunk order and batches (ChunkPlan), undecodable files found, named or skipped
with stand-ins, and the recovery after a loader's decode error (ChunkRecovery driving a recording stretch)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.data import build_manifest
from pipeline.data.batch import DecodeError
from pipeline.errors import BankError
from stage1_teacher_logits.plan import ChunkPlan, ChunkRecovery


def _folder(root: Path, n: int = 12, truncated: tuple[int, ...] = ()) -> Path:
    """root/train/<class>/<k>.jpg: n small JPEGs in 2 classes (sorted by name: k-th file = sample k); the files
    ``truncated`` lose their second half."""
    rng = np.random.default_rng(0)
    for k in range(n):
        d = root / "train" / f"c{k * 2 // n}"
        d.mkdir(parents=True, exist_ok=True)
        p = d / f"{k:03d}.jpg"
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), np.uint8)).save(p, quality=90)
        if k in truncated:
            p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    return root


class Recorder:
    """A stretch that records what it was asked to run and 'writes' everything."""

    def __init__(self, rec: ChunkRecovery):
        self.rec, self.calls = rec, []

    def __call__(self, start: int, stop: int, sub: np.ndarray) -> int | None:
        self.calls.append((start, stop, sub.tolist(), self.rec.skipped(start, stop).tolist()))
        return None


def test_clean_plan_runs_in_one_stretch(tmp_path: Path):
    m = build_manifest(_folder(tmp_path), "train")
    plan = ChunkPlan([0, 1, 2], 4, len(m), 3)  # chunks of 4 rows, batches of 3: each chunk padded to 6
    rec = ChunkRecovery(plan, m, skip_corrupt=False)
    run = Recorder(rec)
    rec.run(run)
    assert run.calls == [(0, 18, plan.order.tolist(), [False] * 18)]


def test_truncated_file_is_named_or_skipped_with_a_stand_in(tmp_path: Path):
    m = build_manifest(_folder(tmp_path, truncated=(5,)), "train")
    plan = ChunkPlan([0, 1, 2], 4, len(m), 4)
    with pytest.raises(BankError, match=r"005\.jpg \(sample 5\).*truncated JPEG.*--skip-corrupt"):
        ChunkRecovery(plan, m, skip_corrupt=False).run(lambda a, b, s: None)
    rec = ChunkRecovery(plan, m, skip_corrupt=True)
    run = Recorder(rec)
    rec.run(run)
    # chunk 0 first (clean), then from the bad file's chunk on, with sample 5 replaced by its neighbour 4
    assert [c[:2] for c in run.calls] == [(0, 4), (4, 12)]
    assert run.calls[1][2][:4] == [4, 4, 6, 7] and run.calls[1][3][:4] == [False, True, False, False]
    assert rec.skip == {5}


def test_decode_error_resumes_at_the_chunk_start(tmp_path: Path):
    m = build_manifest(_folder(tmp_path), "train")
    plan = ChunkPlan([0, 1, 2], 4, len(m), 2)
    rec = ChunkRecovery(plan, m, skip_corrupt=True)
    # the loader named sample 6 (in chunk 1, positions 4-7) while position 6 was being read
    assert rec.after_decode_error(6, DecodeError("bad", sample=6), "torch") == 4
    assert 6 in rec.suspect
    run = Recorder(rec)
    rec.run(run)
    assert rec.skip == {6} and [c[:2] for c in run.calls] == [(0, 4), (4, 12)]
    # a loader error that no file explains is a one-line error, not a loop
    clean = ChunkRecovery(plan, m, skip_corrupt=True)
    with pytest.raises(BankError, match="every file from there decodes"):
        clean.after_decode_error(0, DecodeError("flaky"), "dali")


@pytest.mark.parametrize("n, rows, bs", [(97, 4096, 128), (300, 64, 32), (300, 64, 50), (10, 3, 4)])
def test_chunk_plan_keeps_the_batch_size(n: int, rows: int, bs: int):
    """Batches never straddle chunks, every sample appears once (plus padding), and the batch size is the
    requested one: each chunk is padded to a multiple of it by repeating its last sample."""
    chunks = list(range(-(-n // rows)))
    plan = ChunkPlan(chunks, rows, n, bs)
    assert len(plan) % bs == 0 and plan.num_real == n
    assert plan.order[plan.real].tolist() == list(range(n))
    for b in range(0, len(plan), bs):
        assert len(set(plan.chunk[b:b + bs].tolist())) == 1  # one chunk per batch
    for j in chunks:
        pos = np.flatnonzero(plan.chunk == j)
        pad = plan.order[pos][~plan.real[pos]]
        assert (pad == min(n, (j + 1) * rows) - 1).all()  # padding repeats the chunk's last sample
        assert (plan.chunk_start[pos] == pos[0]).all() and (plan.chunk_end[pos] == pos[-1] + 1).all()
    # a rank's share (every other chunk) is planned the same way
    odd = ChunkPlan(chunks[1::2], rows, n, bs)
    assert sorted(odd.order[odd.real].tolist()) == [i for j in chunks[1::2] for i in range(j * rows, min(n, (j + 1) * rows))]
