"""Stage 1's plan: which rows one rank feeds to its teachers, in which batches, and what happens to undecodable
files (found, named, or skipped with a stand-in). No model, no bank: :class:`ChunkRecovery` drives any
``stretch`` function (the producer, or a test's) over a :class:`ChunkPlan`.
"""

from __future__ import annotations

import logging
from typing import Callable

import numpy as np

from pipeline.data import Manifest, layout_of
from pipeline.data.batch import DecodeError
from pipeline.errors import BankError

log = logging.getLogger(__name__)


class ChunkPlan:
    """The order in which one rank feeds its chunks to the teachers.

    Each chunk's rows, in index order, padded to a multiple of the batch size by repeating the chunk's last
    sample: batches never straddle chunks, so a chunk's logits depend only on the chunk (a resumed dump is bit
    for bit an uninterrupted one) and the requested batch size is kept (the padding rows are dropped).

    Attributes: ``order`` [P] sample indices; ``real`` [P] bool (False for padding); ``chunk`` [P] the row chunk
    of each position; ``chunk_start`` / ``chunk_end`` [P] that chunk's first position and one past its last;
    ``rows`` rows per chunk; ``n`` rows of the bank.
    """

    def __init__(self, chunks: list[int], rows: int, n: int, batch_size: int):
        sizes = [min(n, (j + 1) * rows) - j * rows for j in chunks]
        padded = [s + (-s % batch_size) for s in sizes]
        self.order = np.concatenate([np.zeros(0, np.int64)] + [
            np.minimum(np.arange(j * rows, j * rows + p), j * rows + s - 1) for j, s, p in zip(chunks, sizes, padded)])
        self.real = np.concatenate([np.zeros(0, bool)] + [np.arange(p) < s for s, p in zip(sizes, padded)])
        starts = np.cumsum([0] + padded)[:-1].astype(np.int64)
        self.chunk = np.repeat(np.asarray(chunks, np.int64), padded)
        self.chunk_start = np.repeat(starts, padded)
        self.chunk_end = np.repeat(starts + np.asarray(padded, np.int64), padded)
        self.rows, self.n = rows, n

    def __len__(self) -> int:
        return len(self.order)

    @property
    def num_real(self) -> int:
        return int(self.real.sum())

    def chunk_rows(self, j: int) -> tuple[int, int]:
        """(first bank row, number of rows) of row chunk ``j``."""
        return j * self.rows, min(self.n, (j + 1) * self.rows) - j * self.rows


Stretch = Callable[[int, int, np.ndarray], "int | None"]


class ChunkRecovery:
    """Runs a :class:`ChunkPlan` stretch by stretch and handles undecodable files: they are found (structural
    pre-scan, or a full decode after a loader error), the clean chunks before one are finished, and then the dump
    stops naming it or, with ``skip_corrupt``, records it as skipped and restarts at its chunk. Skipped samples
    get a stand-in (a neighbour) so batches keep their composition; the producer stores NaN and ``skipped`` for
    them.

    ``stretch(start, stop, sub)`` runs positions [start, stop) of the plan whose samples are ``sub`` (stand-ins
    in place of skipped samples) and returns None when all were written, or the chunk start to resume from
    (what :meth:`after_decode_error` returned)."""

    def __init__(self, plan: ChunkPlan, manifest: Manifest, skip_corrupt: bool):
        self.plan, self.manifest, self.skip_corrupt = plan, manifest, skip_corrupt
        self.layout = layout_of(manifest)
        self.skip: set[int] = set()
        real_order = plan.order[plan.real]
        # sample -> why it cannot be decoded: from the pre-scan, then from decode errors
        self.suspect = {int(real_order[p]): r for p, r in self.layout.scan(manifest, real_order).items()}

    def run(self, stretch: Stretch) -> None:
        """Every chunk of the plan (one stretch per run of positions free of known bad files)."""
        plan, pos = self.plan, 0
        while pos < len(plan):
            bad = self._next_bad(pos)
            stop = int(plan.chunk_start[bad]) if bad is not None else len(plan)
            if stop > pos:
                reached = stretch(pos, stop, self.stand_ins(pos, stop))
                pos = stop if reached is None else reached
                continue
            idx = int(plan.order[bad])  # pos is the start of the bad file's chunk: all before it is written
            where = self.layout.describe_sample(self.manifest, idx)
            if not self.skip_corrupt:
                raise BankError(f"cannot decode {where} (sample {idx}): {self.suspect[idx]}; "
                                "fix or remove it, or pass --skip-corrupt")
            log.warning("skipping undecodable file %s (sample %d): %s", where, idx, self.suspect[idx])
            self.skip.add(idx)

    def _next_bad(self, pos: int) -> int | None:
        """The first position at or after ``pos`` holding a suspect not yet skipped."""
        bad = [i for i in self.suspect if i not in self.skip]
        if not bad:
            return None
        hits = np.flatnonzero(np.isin(self.plan.order[pos:], np.asarray(bad, np.int64)))
        return pos + int(hits[0]) if len(hits) else None

    def skipped(self, start: int, stop: int) -> np.ndarray:
        """[stop - start] bool: the positions whose sample is skipped."""
        order = self.plan.order[start:stop]
        return np.isin(order, np.fromiter(self.skip, np.int64, len(self.skip)))

    def stand_ins(self, start: int, stop: int) -> np.ndarray:
        """The samples of positions [start, stop), each skipped one replaced by its nearest kept neighbour."""
        sub = self.plan.order[start:stop].copy()
        for k in np.flatnonzero(self.skipped(start, stop)):
            sub[k] = _stand_in(sub, int(k), self.skip)
        return sub

    def after_decode_error(self, pos: int, e: DecodeError, loader: str) -> int:
        """Find the file behind a loader's decode error at position ``pos`` (the loader names it, or a full decode
        from ``pos`` finds it), make it a suspect, and return the start of the unfinished chunk (the producer drops
        its buffered rows). BankError when no file from ``pos`` on fails to decode."""
        plan = self.plan
        chunk_start = int(plan.chunk_start[min(pos, len(plan) - 1)])
        found = self.layout.find_corrupt(self.manifest, plan.order, pos, self.skip)
        if e.sample is not None and (found is None or int(plan.order[found[0]]) != e.sample):
            found = (next(p for p in range(pos, len(plan)) if int(plan.order[p]) == e.sample), str(e))
        if found is None:
            raise BankError(f"the {loader} loader failed on the batch after sample {int(plan.order[pos])} "
                            f"but every file from there decodes with PIL: {e}") from None
        self.suspect[int(plan.order[found[0]])] = found[1]
        return chunk_start


def _stand_in(sub: np.ndarray, k: int, skip: set[int]) -> int:
    for d in range(1, len(sub)):
        for q in (k - d, k + d):
            if 0 <= q < len(sub) and int(sub[q]) not in skip:
                return int(sub[q])
    raise BankError("every sample is corrupt")
