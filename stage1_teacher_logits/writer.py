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
    with labels [r], views [r, V, 5], skipped [r], when the bank stores them embeddings [r, T, V, D], view
    parameters [r, V, A] and partners [r, V] (``a`` > 0: a view policy with stored parameters), and the format's
    other per-row arrays ``extra`` (a map bank's ``image_size``). ``--append-views`` fills the first view slots
    of ``arrays["logits"]``, ``views`` and ``features`` before the first batch
    (:meth:`stage1_teacher_logits.append.ViewPrefix.fill`)."""

    def __init__(self, j: int, start: int, r: int, v: int, a: int = 0):
        self.j, self.start = j, start
        self.arrays: dict[str, np.ndarray] = {}
        self.labels = np.full(r, -1, np.int32)
        self.views = np.full((r, v, 5), np.nan, np.float32)
        self.skipped = np.zeros(r, bool)
        self.features: np.ndarray | None = None
        self.params = np.full((r, v, a), np.nan, np.float32) if a else None
        self.partners = np.full((r, v), -1, np.int32) if a else None
        self.extra: dict[str, np.ndarray] = {}

    def put(self, rows: np.ndarray, arrays: dict[str, np.ndarray], labels: np.ndarray, boxes: np.ndarray | None,
            skipped: np.ndarray, features: np.ndarray | None = None, params: np.ndarray | None = None,
            partners: np.ndarray | None = None, first_view: int = 0,
            extra: dict[str, np.ndarray] | None = None) -> None:
        """Bank rows ``rows`` [b] (in this chunk): the encoder's arrays {name: [b, ...]} (with ``first_view`` > 0,
        dense ``logits`` [b, T, V - first_view, C] of the views from first_view on: the earlier slots were
        filled), labels [b], boxes [b, V, 5] or None (center views: NaN), skipped [b], embeddings
        [b, T, V - first_view, D] float32 or None, view parameters [b, V, A] and partners [b, V] or None, ``extra``
        {name: [b, ...]}."""
        r = np.asarray(rows, np.int64) - self.start
        n = len(self.labels)
        for name, a in arrays.items():
            if name not in self.arrays:
                self.arrays[name] = _empty((n,) + a.shape[1:], a.dtype)
            if first_view:
                self.arrays[name][r, :, first_view:] = a
            else:
                self.arrays[name][r] = a
        for name, a in (extra or {}).items():
            if name not in self.extra:
                self.extra[name] = np.full((n,) + a.shape[1:], -1, a.dtype)
            self.extra[name][r] = a
        self.labels[r] = labels
        self.views[r] = boxes if boxes is not None else np.nan
        self.skipped[r] = skipped
        if features is not None:
            if self.features is None:
                self.features = np.full((n,) + features.shape[1:], np.nan, np.float32)
            self.features[r, :, first_view:] = features
        if self.params is not None:
            self.params[r], self.partners[r] = params, partners

    def flush(self, g, encoder: ChunkEncoder) -> None:
        """Write the chunk (:func:`pipeline.bank.writer.write_rows`: data, per-chunk arrays, view parameters,
        extra arrays, done flag last)."""
        if (self.labels < 0).any():
            raise BankError(f"internal error: chunk {self.j} incomplete at flush")
        per_chunk = encoder.finish(self.arrays, self.labels)
        stored = {n: a for n, a in self.arrays.items() if not n.startswith("_")}
        write_rows(g, self.j, stored, self.labels, self.views, self.skipped, self.features, per_chunk, self.params,
                   self.partners, self.extra)


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
