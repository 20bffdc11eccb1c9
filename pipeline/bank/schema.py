"""The label-bank contract (zarr v3 group, schema_version 1). See docs/DESIGN.md, "The label bank".

| node     | shape, dtype                     | meaning                                             |
|----------|----------------------------------|-----------------------------------------------------|
| logits   | (N, T, V, C) float16 / float32   | raw logits of T teachers on V views                 |
| labels   | (N,) int32                       | true class                                          |
| views    | (N, V, 5) float32                | crop box (y, x, h, w normalized) and flip           |
| skipped  | (N,) bool                        | samples skipped as corrupt (``--skip-corrupt``)      |
| done     | (N / rows_per_chunk,) bool       | chunk completion, for resume (one zarr chunk each)  |

Row chunks of ``logits``, ``labels``, ``views`` and ``skipped`` coincide, so a writer that owns a row chunk
owns every file it touches: ranks never write inside each other's chunks.
"""

from __future__ import annotations

import math

import numpy as np
import zarr
from zarr.codecs import BloscCodec, Crc32cCodec

SCHEMA_VERSION = 1
ARRAYS = ("logits", "labels", "views", "skipped", "done")
# Chosen by bench/bank_chunks.py (BENCHMARKS.md): 4096 rows wrote ~1.5x and loaded ~1.6x faster than 1024
# (100k x 1000 fp16); ImageNet gets 313 files per array, and resume granularity stays a few seconds of GPU work.
DEFAULT_ROWS_PER_CHUNK = 4096


def compressors(dtype: str) -> list:
    """Blosc(zstd, byte-shuffle) then a CRC32C checksum on every chunk."""
    typesize = np.dtype(dtype).itemsize
    return [BloscCodec(cname="zstd", clevel=3, shuffle="shuffle" if typesize > 1 else "noshuffle", typesize=typesize),
            Crc32cCodec()]


def create_bank_arrays(group: zarr.Group, n: int, t: int, v: int, c: int, dtype: str, rows_per_chunk: int) -> None:
    """Create the (empty) arrays of a bank in ``group``."""
    r = max(1, min(rows_per_chunk, n))
    group.create_array("logits", shape=(n, t, v, c), chunks=(r, t, v, c), dtype=dtype,
                       compressors=compressors(dtype), fill_value=float("nan"))
    group.create_array("labels", shape=(n,), chunks=(r,), dtype="int32", compressors=compressors("int32"),
                       fill_value=-1)
    group.create_array("views", shape=(n, v, 5), chunks=(r, v, 5), dtype="float32",
                       compressors=compressors("float32"), fill_value=float("nan"))
    group.create_array("skipped", shape=(n,), chunks=(r,), dtype="bool", compressors=compressors("bool"),
                       fill_value=False)
    group.create_array("done", shape=(math.ceil(n / r),), chunks=(1,), dtype="bool",
                       compressors=compressors("bool"), fill_value=False)
