"""Label-map banks (``--format labelmap``): per image, each teacher's classifier at every cell of an S x S map.

Arrays (specs: :func:`pipeline.bank.schema.labelmap_array_specs`; one row chunk of every array per writer):

| map dtype | arrays | meaning |
|---|---|---|
| ``float16`` | ``map`` (N, T, S, S, C) float16 | raw logits per cell |
| ``int8`` | ``map_q`` (N, T, S, S, C) int8, ``map_center``, ``map_scale`` (N, T, S, S) float32 | z = center + scale·q, per cell (q in [-127, 127]: the cell's range over 254 steps) |
| ``--topk K`` | ``map_topk_values`` (N, T, S, S, K) float16, ``map_topk_indices`` (N, T, S, S, K) int16/int32, ``map_tail`` (N, T, S, S) float16 | the K largest logits per cell, sorted decreasing, their classes, and the log-mean-exp of the other C - K logits: densified, every other class gets ``map_tail``, so a cell's softmax at T = 1 gives the tail its exact total mass (spread evenly), as the compact top-k formats do |

plus ``labels``, ``skipped``, ``done``, ``views`` (N, 1, 5): the mapped region (y, x, h, w in fractions of the
decoded image, flip 0), and ``image_size`` (N, 2) int32 (decoded height, width: what stage 2 draws its random
crops in). Cells are row-major: ``map[i, t, y, x]`` is the cell whose centre is at ((x + 0.5)/S, (y + 0.5)/S) of
the region. ``attrs["label_map"]`` records ``size``, ``region`` (``eval``: the preset's eval resize + center
crop, as a center bank's view; ``full``: the whole image squashed to the input size, ReLabel's choice),
``map_dtype``, ``topk``, ``arrays``, each teacher's ``native`` size and ``kind`` (:mod:`pipeline.models.label_map`).
A map bank's ``shape`` attr is (N, T, 1, C): one labelled region per sample; its writer buffers the S·S cells as
views (:func:`buffer_shape`).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from pipeline.bank.schema import index_dtype, labelmap_array_specs  # noqa: F401  (the map arrays' specs)
from pipeline.errors import BankError, UsageError

MAP_DTYPES = ("float16", "int8")
MAP_REGIONS = ("eval", "full")
# the chunk buffer of a map dump holds rows x T x S² x C logits: cap it (a 4096-row chunk of 15 x 15 x 1000 fp16
# maps would be 1.8 GB)
MAX_CHUNK_BYTES = 256 << 20


def map_arrays(map_dtype: str, k: int | None) -> tuple[str, ...]:
    """The payload arrays of a map bank."""
    if k is not None:
        return ("map_topk_values", "map_topk_indices", "map_tail")
    return ("map",) if map_dtype == "float16" else ("map_q", "map_center", "map_scale")


def check_map_args(fmt: str, size: int | None, region: str, map_dtype: str, k: int | None,
                   num_classes: int | None = None) -> None:
    """One-line UsageError for map options that do not fit: they need ``--format labelmap``; K in [1, C - 1];
    a top-k map stores float16 values (no ``--map-dtype int8``)."""
    if fmt != "labelmap":
        if size is not None or region != "eval" or map_dtype != "float16":
            raise UsageError("--map-size, --map-region and --map-dtype apply to --format labelmap only")
        return
    if region not in MAP_REGIONS:
        raise UsageError(f"unknown --map-region '{region}'; valid: {', '.join(MAP_REGIONS)}")
    if map_dtype not in MAP_DTYPES:
        raise UsageError(f"unknown --map-dtype '{map_dtype}'; valid: {', '.join(MAP_DTYPES)}")
    if size is not None and size < 1:
        raise UsageError(f"--map-size {size}: give S >= 1 cells per side")
    if k is not None and map_dtype != "float16":
        raise UsageError("--topk with --format labelmap stores float16 values: drop --map-dtype int8 (or --topk)")
    if k is not None and num_classes is not None and not 1 <= k < num_classes:
        raise UsageError(f"--topk {k} out of range for a label map: 1 <= K <= {num_classes - 1} ({num_classes} "
                         "classes; all of them is the dense map: drop --topk)")


def map_record(size: int | None, region: str, map_dtype: str, k: int | None) -> dict[str, Any]:
    """What a map bank adds to the key (and its attrs): size, region, map dtype, K."""
    return {"size": size, "region": region, "map_dtype": map_dtype, "topk": k}


def map_suffix(rec: dict[str, Any]) -> str:
    """Bank file-name suffix: ``-map7``, ``-map7full``, ``-map15-top5``, ``-map7-int8``."""
    out = f"-map{rec['size']}" + ("full" if rec["region"] == "full" else "")
    if rec.get("topk"):
        return out + f"-top{rec['topk']}"
    return out + ("-int8" if rec["map_dtype"] == "int8" else "")


def buffer_shape(attrs: dict[str, Any]) -> tuple[int, int, int, int]:
    """(N, T, V, C) of the dump's chunk buffer: the bank's shape, with V = S·S cells for a map bank."""
    n, t, v, c = attrs["shape"]
    lm = attrs.get("label_map")
    return (n, t, int(lm["size"]) ** 2, c) if lm else (n, t, v, c)


def chunk_rows(requested: int, t: int, s: int, c: int) -> int:
    """Rows per chunk of a map bank: ``requested``, capped so that a chunk's float32 logits stay within
    :data:`MAX_CHUNK_BYTES`."""
    return max(1, min(requested, MAX_CHUNK_BYTES // max(1, 4 * t * s * s * c)))


def region_box(h: int, w: int, pre: Any, region: str) -> tuple[float, float, float, float]:
    """The mapped region (y, x, h, w) in fractions of an ``h`` x ``w`` decoded image: ``full`` -> the whole
    image; ``eval`` -> what the preset ``pre`` (a :class:`pipeline.data.presets.Preprocess`) shows after its eval
    resize (shorter side, longer one rounded half up; or ``squash``) and center crop (offsets rounded half up), as
    :func:`pipeline.data.transforms.eval_geometry` does (a crop larger than the resized image extends past it)."""
    if region == "full":
        return 0.0, 0.0, 1.0, 1.0
    if pre.crop_mode == "squash":
        hh = ww = pre.resize
    elif h <= w:
        hh, ww = pre.resize, math.floor(w * pre.resize / h + 0.5)
    else:
        hh, ww = math.floor(h * pre.resize / w + 0.5), pre.resize
    top, left = math.floor((hh - pre.crop) / 2 + 0.5), math.floor((ww - pre.crop) / 2 + 0.5)
    return top / hh, left / ww, pre.crop / hh, pre.crop / ww


def encode_chunk(logits: np.ndarray, skipped: np.ndarray, size: int, map_dtype: str,
                 k: int | None) -> dict[str, np.ndarray]:
    """[r, T, S·S, C] logits (rounded to the bank dtype; cells row-major) -> the payload arrays of one chunk
    (module table); skipped rows get the fill values."""
    r, t, _, c = logits.shape
    z = np.nan_to_num(logits.astype(np.float32).reshape(r, t, size, size, c), nan=0.0)
    if k is not None:
        idx = np.argsort(-z, axis=-1, kind="stable")[..., :k]
        vals = np.take_along_axis(z, idx, -1)
        rest = z.copy()
        np.put_along_axis(rest, idx, -np.inf, -1)
        m = rest.max(-1, keepdims=True)
        tail = (m[..., 0] + np.log(np.exp(rest - m).sum(-1) / (c - k))).astype(np.float16)
        out = {"map_topk_values": vals.astype(np.float16), "map_topk_indices": idx.astype(index_dtype(c)),
               "map_tail": tail}
    elif map_dtype == "float16":
        out = {"map": z.astype(np.float16)}
    else:
        hi, lo = z.max(-1), z.min(-1)
        center = (hi + lo) / 2
        scale = np.maximum((hi - lo) / 254, 1e-12).astype(np.float32)
        q = np.clip(np.rint((z - center[..., None]) / scale[..., None]), -127, 127).astype(np.int8)
        out = {"map_q": q, "map_center": center.astype(np.float32), "map_scale": scale}
    for name, a in out.items():  # the fill values of labelmap_array_specs
        a[skipped] = 0 if name == "map_q" else (-1 if a.dtype.kind in "iu" else np.nan)
    return out


def densify(arrays: dict[str, torch.Tensor], num_classes: int) -> torch.Tensor:
    """Payload rows (any leading shape ``[..., S, S]``, on any device) -> dense logits ``[..., S, S, C]`` float32
    with torch ops on the arrays' device (top-k: ``map_tail`` broadcast, then one ``scatter_`` of the K values)."""
    if "map" in arrays:
        return arrays["map"].float()
    if "map_q" in arrays:
        return arrays["map_center"].float()[..., None] + arrays["map_scale"].float()[..., None] * \
            arrays["map_q"].float()
    vals, idx, tail = arrays["map_topk_values"], arrays["map_topk_indices"], arrays["map_tail"]
    out = tail.float()[..., None].expand(*tail.shape, num_classes).contiguous()
    return out.scatter_(-1, idx.long(), vals.float())


def read_maps(g: Any, start: int, stop: int) -> np.ndarray:
    """Dense logits maps [rows, T, S, S, C] float32 of rows [start, stop) of a map bank (tools, checks, tests)."""
    names = g.attrs["label_map"]["arrays"]
    rows = {n: torch.from_numpy(np.asarray(g[n][start:stop])) for n in names}
    return densify(rows, int(g.attrs["shape"][3])).numpy()


def map_metrics(g: Any, teachers: list[dict]) -> dict[str, dict[str, float]]:
    """Top-1/top-5/NLL/ECE per teacher (and the mean-logit ensemble) of each map's mean over its cells: the
    teacher's logits on the region for ``pool_linear`` heads."""
    from pipeline.metrics import teacher_metrics_of

    return teacher_metrics_of(g, teachers, lambda s, e: read_maps(g, s, e).mean(axis=(2, 3)))


def require_map_bank(attrs: dict[str, Any], path: str) -> dict[str, Any]:
    """The ``label_map`` attr of a map bank (BankError naming the path otherwise)."""
    lm = attrs.get("label_map")
    if attrs.get("format") != "labelmap" or not lm:
        raise BankError(f"{path} is not a label-map bank (format {attrs.get('format', 'dense')}): dump one with "
                        "python -m pipeline.dump_logits ... --format labelmap")
    return lm
