"""Stage 1's writer: encoded rows collected per row chunk on the host, and one background thread that compresses,
checksums and writes complete chunks (zarr's codecs), each chunk's ``done`` flag last.
"""

from __future__ import annotations

import queue
import sys
import threading

import numpy as np

from pipeline.bank.writer import write_rows
from pipeline.errors import BankError
from stage1_teacher_logits.encoders import ChunkEncoder


def _empty(shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    fill = np.nan if np.issubdtype(dtype, np.floating) else 0
    return np.full(shape, fill, dtype)


class ChunkBuffer:
    """The rows of one row chunk as the encoder made them (host arrays [r, ...], allocated at the first batch),
    with labels [r], views [r, V, 5], skipped [r] and, when the bank stores them, embeddings [r, T, V, D]."""

    def __init__(self, j: int, start: int, r: int, v: int):
        self.j, self.start = j, start
        self.arrays: dict[str, np.ndarray] = {}
        self.labels = np.full(r, -1, np.int32)
        self.views = np.full((r, v, 5), np.nan, np.float32)
        self.skipped = np.zeros(r, bool)
        self.features: np.ndarray | None = None

    def put(self, rows: np.ndarray, arrays: dict[str, np.ndarray], labels: np.ndarray, boxes: np.ndarray | None,
            skipped: np.ndarray, features: np.ndarray | None = None) -> None:
        """Bank rows ``rows`` [b] (in this chunk): the encoder's arrays {name: [b, ...]}, labels [b], boxes
        [b, V, 5] or None (center views: NaN), skipped [b], embeddings [b, T, V, D] float32 or None."""
        r = np.asarray(rows, np.int64) - self.start
        for name, a in arrays.items():
            if name not in self.arrays:
                self.arrays[name] = _empty((len(self.labels),) + a.shape[1:], a.dtype)
            self.arrays[name][r] = a
        self.labels[r] = labels
        self.views[r] = boxes if boxes is not None else np.nan
        self.skipped[r] = skipped
        if features is not None:
            if self.features is None:
                self.features = np.full((len(self.labels),) + features.shape[1:], np.nan, np.float32)
            self.features[r] = features

    def flush(self, g, encoder: ChunkEncoder) -> None:
        """Write the chunk (:func:`pipeline.bank.writer.write_rows`: data, per-chunk arrays, done flag last)."""
        if (self.labels < 0).any():
            raise BankError(f"internal error: chunk {self.j} incomplete at flush")
        per_chunk = encoder.finish(self.arrays)
        stored = {n: a for n, a in self.arrays.items() if not n.startswith("_")}
        write_rows(g, self.j, stored, self.labels, self.views, self.skipped, self.features, per_chunk)


class ChunkWriter:
    """The dump's background writer: complete chunks reach one thread through a bounded queue (``depth``
    chunks), which compresses and writes them, so the teachers never wait for zstd and zarr. Chunks are written
    in the order they were queued; a chunk still queued when the process is killed has no done flag, and a rerun
    writes it (resume stays bit for bit). The writer's error (an OSError, a BankError) is raised in the dump's
    thread at the next :meth:`submit` or at :meth:`close`."""

    def __init__(self, g, encoder: ChunkEncoder, depth: int = 2):
        self.g, self.encoder = g, encoder
        self.queue: queue.Queue = queue.Queue(maxsize=depth)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="bank-writer", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while True:
            buf = self.queue.get()
            if buf is None:
                return
            if self.error is None:
                try:
                    buf.flush(self.g, self.encoder)
                except BaseException as e:  # noqa: BLE001  (handed to the dump's thread)
                    self.error = e

    def submit(self, buf: ChunkBuffer) -> None:
        self._raise()
        self.queue.put(buf)

    def close(self) -> None:
        """Write what is queued, stop the thread; raise the writer's error unless the dump is already failing."""
        if self.thread.is_alive():
            self.queue.put(None)
            self.thread.join()
        if sys.exc_info()[0] is None:
            self._raise()

    def _raise(self) -> None:
        if self.error is not None:
            error, self.error = self.error, None
            raise error
