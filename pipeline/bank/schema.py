"""The label-bank contract (zarr v3 group, schema_version 1). See docs/DESIGN.md, "The label bank".

| node     | shape, dtype                     | meaning                                             |
|----------|----------------------------------|-----------------------------------------------------|
| logits   | (N, T, V, C) float16 / float32   | raw logits of T teachers on V views (dense banks)   |
| labels   | (N,) int32                       | true class                                          |
| views    | (N, V, 5) float32                | crop box (y, x, h, w normalized) and flip           |
| view_params  | (N, V, A) float32            | augmenting policies only: ops, erasing box, λ, cut box (``pipeline.data.policy``) |
| view_partner | (N, V) int32                 | augmenting policies only: the mixing partner's row (-1: none) |
| skipped  | (N,) bool                        | samples skipped as corrupt (``--skip-corrupt``)      |
| done     | (N / rows_per_chunk,) bool       | chunk completion, for resume (one zarr chunk each)  |

Label-map banks (``format`` ``labelmap``) store the arrays of :func:`labelmap_array_specs` instead of ``logits``
(``map`` (N, T, S, S, C), or int8 / per-cell top-k forms, and ``image_size``): :mod:`pipeline.bank.labelmap`.

Compact banks (``format`` ``topk``, ``sampled`` or ``int8``) store the arrays of :func:`compact_array_specs` instead of
``logits``, plus ``chunk_sums`` (n_chunks, W) float64: per row chunk, the fidelity and metric sums measured when
the chunk was encoded (:func:`pipeline.bank.compact.encode_chunk`), written with the chunk before its done flag
so that they survive a kill and a resume.

Row chunks of every per-row array coincide, so a writer that owns a row chunk owns every file it touches: ranks
never write inside each other's chunks.
"""

from __future__ import annotations

import math

import numpy as np
import zarr
from zarr.codecs import BloscCodec, Crc32cCodec

SCHEMA_VERSION = 1
ARRAYS = ("logits", "labels", "views", "skipped", "done")
FORMATS = ("dense", "topk", "int8", "sampled", "labelmap")
COMPACT_FORMATS = ("topk", "int8", "sampled")
# What a top-k (or sampled) bank knows of its non-kept classes (attr ``tail``): "stats" (written now) stores the
# tail's log-partition at the grid TAIL_TEMPERATURES (``tail_lse``), so stage 2 gets the tail's mass right at any
# temperature; "uniform" (the first layout) stored nothing and spread the rest evenly at T = 1, which the losses
# then re-softened (refused by stage 2; readable by the tools). Kept = the top K and the true class.
TOPK_TAILS = ("stats", "uniform")
# Temperatures at which a compact bank stores the tail's log-partition F(1/T): every published default of the
# methods here (DIST 1, WSLD 2, SL 3, KD and DKD 4, Tf-KD 6 and 20); other temperatures interpolate in 1/T.
TAIL_TEMPERATURES = (1.0, 2.0, 3.0, 4.0, 6.0, 20.0)
# Chosen by bench/bank_chunks.py (BENCHMARKS.md): 4096 rows wrote ~1.5x and loaded ~1.6x faster than 1024
# (100k x 1000 fp16); ImageNet gets 313 files per array, and resume granularity stays a few seconds of GPU work.
DEFAULT_ROWS_PER_CHUNK = 4096


def compressors(dtype: str) -> list:
    """Blosc(zstd, byte-shuffle) then a CRC32C checksum on every chunk."""
    typesize = np.dtype(dtype).itemsize
    return [BloscCodec(cname="zstd", clevel=3, shuffle="shuffle" if typesize > 1 else "noshuffle", typesize=typesize),
            Crc32cCodec()]


def index_dtype(num_classes: int) -> str:
    """Class indices of a top-k bank: int16, int32 beyond 32767 classes."""
    return "int16" if num_classes <= np.iinfo(np.int16).max else "int32"


def compact_array_specs(fmt: str, shape: tuple[int, int, int, int], k: int | None = None,
                        samples: int | None = None) -> dict[str, tuple[tuple[int, ...], str, float | int]]:
    """{name: (shape, dtype, fill value)} of the payload arrays of compact format ``fmt``.

    Fill values flag a chunk that was never written: NaN for floats, -1 for top-k indices (no class). ``q`` has
    no free value; a missing ``q`` chunk is found by its missing file (``verify``, the stage-2 loader).
    """
    n, t, v, c = shape
    if fmt in ("topk", "sampled"):
        out = {"topk_values": ((n, t, v, int(k)), "float16", float("nan")),
               "topk_indices": ((n, t, v, int(k)), index_dtype(c), -1),
               "target_logprob": ((n, t, v), "float16", float("nan")),
               "tail_lse": ((n, t, v, len(TAIL_TEMPERATURES)), "float16", float("nan"))}
        if fmt == "sampled":
            out.update({"sample_indices": ((n, t, v, int(samples)), index_dtype(c), -1),
                        "sample_logprob": ((n, t, v, int(samples)), "float16", float("nan")),
                        "logsumexp": ((n, t, v), "float32", float("nan"))})
        return out
    if fmt == "int8":
        return {"q": ((n, t, v, c), "int8", 0), "scale": ((n, t, v), "float16", float("nan"))}
    raise ValueError(f"unknown compact format {fmt!r}")


def labelmap_array_specs(n: int, t: int, s: int, c: int, map_dtype: str,
                         k: int | None) -> dict[str, tuple[tuple[int, ...], str, float | int]]:
    """{name: (shape, dtype, fill)} of a map bank's payload and ``image_size``; NaN / -1 fills flag unwritten
    chunks (``map_q`` has no free value: its missing chunk file is found)."""
    cells = (n, t, s, s)
    if k is not None:
        out = {"map_topk_values": (cells + (k,), "float16", float("nan")),
               "map_topk_indices": (cells + (k,), index_dtype(c), -1),
               "map_tail": (cells, "float16", float("nan"))}
    elif map_dtype == "float16":
        out = {"map": (cells + (c,), "float16", float("nan"))}
    else:
        out = {"map_q": (cells + (c,), "int8", 0), "map_center": (cells, "float32", float("nan")),
               "map_scale": (cells, "float32", float("nan"))}
    out["image_size"] = ((n, 2), "int32", -1)
    return out


def create_bank_arrays(group: zarr.Group, n: int, t: int, v: int, c: int, dtype: str, rows_per_chunk: int,
                       fmt: str = "dense", k: int | None = None, sums_width: int = 0,
                       samples: int | None = None, num_params: int = 0, label_map: dict | None = None) -> None:
    """Create the (empty) arrays of a bank in ``group``: ``logits`` (dense), the compact arrays of ``fmt`` and
    ``chunk_sums`` [n_chunks, sums_width] (dense with ``sums_width`` > 0: ``metric_sums`` [n_chunks, sums_width],
    the teachers' metric states per chunk), or a map bank's arrays (``label_map``: its ``size``, ``map_dtype``,
    ``topk``), then labels, views, skipped, done; with ``num_params`` A > 0 (a view policy with stored parameters)
    ``view_params`` [N, V, A] float32 (fill NaN) and ``view_partner`` [N, V] int32 (fill -1)."""
    r = max(1, min(rows_per_chunk, n))
    if fmt == "labelmap":
        specs = labelmap_array_specs(n, t, int(label_map["size"]), c, label_map["map_dtype"], label_map["topk"])
        for name, (shape, dt, fill) in specs.items():
            group.create_array(name, shape=shape, chunks=(r,) + tuple(shape[1:]), dtype=dt,
                               compressors=compressors(dt), fill_value=fill)
    elif fmt == "dense":
        group.create_array("logits", shape=(n, t, v, c), chunks=(r, t, v, c), dtype=dtype,
                           compressors=compressors(dtype), fill_value=float("nan"))
        if sums_width:  # the dump's per-chunk teacher metric states
            group.create_array("metric_sums", shape=(math.ceil(n / r), sums_width), chunks=(1, sums_width),
                               dtype="float64", compressors=compressors("float64"), fill_value=float("nan"))
    else:
        for name, (shape, dt, fill) in compact_array_specs(fmt, (n, t, v, c), k, samples).items():
            group.create_array(name, shape=shape, chunks=(r,) + tuple(shape[1:]), dtype=dt,
                               compressors=compressors(dt), fill_value=fill)
        group.create_array("chunk_sums", shape=(math.ceil(n / r), sums_width), chunks=(1, sums_width),
                           dtype="float64", compressors=compressors("float64"), fill_value=float("nan"))
    group.create_array("labels", shape=(n,), chunks=(r,), dtype="int32", compressors=compressors("int32"),
                       fill_value=-1)
    group.create_array("views", shape=(n, v, 5), chunks=(r, v, 5), dtype="float32",
                       compressors=compressors("float32"), fill_value=float("nan"))
    if num_params:
        group.create_array("view_params", shape=(n, v, num_params), chunks=(r, v, num_params), dtype="float32",
                           compressors=compressors("float32"), fill_value=float("nan"))
        group.create_array("view_partner", shape=(n, v), chunks=(r, v), dtype="int32",
                           compressors=compressors("int32"), fill_value=-1)
    group.create_array("skipped", shape=(n,), chunks=(r,), dtype="bool", compressors=compressors("bool"),
                       fill_value=False)
    group.create_array("done", shape=(math.ceil(n / r),), chunks=(1,), dtype="bool",
                       compressors=compressors("bool"), fill_value=False)
