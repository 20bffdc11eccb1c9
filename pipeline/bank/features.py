"""Stored embeddings (``dump_logits --features``): each teacher's pooled penultimate embedding next to its logits.

Arrays (chunked like the logits, one row chunk per writer, written before the chunk's done flag):

| feature format | arrays | bytes per (sample, teacher, view) |
|---|---|---|
| ``float16`` (dense and top-k banks) | ``features`` (N, T, V, D) float16 | 2 D |
| ``float32`` (``--dtype float32``) | ``features`` (N, T, V, D) float32 | 4 D |
| ``int8`` (``--format int8``) | ``features_q`` (N, T, V, D) int8, ``features_scale`` (N, T, V) float16 | D + 2 |

``D`` is the widest teacher's embedding; a teacher with a narrower one is zero-padded to D (zeros change no
distance, angle, cosine or Gram matrix, so the relational losses are unaffected; a learned head sees zero
inputs). ``attrs["features"]`` = ``{"format", "dims": [D_0, ..., D_{T-1}], "arrays"}``. int8 is symmetric per
vector: ``scale = max|x| / 127``, ``q = round(x / scale)``, decoded ``q * scale`` (error at most scale / 2 per
value). Rows of skipped samples are NaN (int8: a NaN scale), like their logits.

A ResNet-50 embedding is 2048 values: 4 KB per view in float16, 5.2 GB for ImageNet (1.28M images); a ViT-B one
1.5 KB. Map-level methods (attention transfer, FitNet on feature maps, VID, AB, FT) stay live-only: a ResNet-50
layer-4 map is 2048x7x7 = 196 KB per view, about 257 GB per ImageNet pass.
"""

from __future__ import annotations

from typing import Any

import numpy as np

FEATURE_FORMATS = ("float16", "float32", "int8")


def feature_format(bank_format: str, dtype: str) -> str:
    """The embeddings' format of a bank: int8 in an int8 bank, else the bank's logits dtype."""
    return "int8" if bank_format == "int8" else dtype


def feature_array_specs(fmt: str, n: int, t: int, v: int, d: int) -> dict[str, tuple[tuple[int, ...], str, Any]]:
    """{name: (shape, dtype, fill value)} of the embedding arrays of format ``fmt``."""
    if fmt == "int8":
        return {"features_q": ((n, t, v, d), "int8", 0), "features_scale": ((n, t, v), "float16", float("nan"))}
    if fmt in ("float16", "float32"):
        return {"features": ((n, t, v, d), fmt, float("nan"))}
    raise ValueError(f"unknown feature format {fmt!r}; valid: {', '.join(FEATURE_FORMATS)}")


def features_attr(fmt: str, dims: list[int], n: int, t: int, v: int) -> dict[str, Any]:
    """``attrs["features"]`` of a bank storing embeddings of widths ``dims`` (one per teacher)."""
    return {"format": fmt, "dims": [int(x) for x in dims],
            "arrays": list(feature_array_specs(fmt, n, t, v, max(dims)))}


def encode_features(x: np.ndarray, fmt: str) -> dict[str, np.ndarray]:
    """Embeddings [r, T, V, D] float32 (NaN rows: skipped samples) -> the stored arrays of ``fmt``."""
    if fmt != "int8":
        return {"features": x.astype(fmt, copy=False)}
    finite = np.isfinite(x).all(axis=-1)
    z = np.where(finite[..., None], x, 0.0).astype(np.float32)
    scale = (np.abs(z).max(axis=-1) / 127.0).astype(np.float16)
    scale = np.where(scale > 0, scale, np.float16(1.0)).astype(np.float16)
    q = np.clip(np.rint(z / scale.astype(np.float32)[..., None]), -127, 127).astype(np.int8)
    return {"features_q": q, "features_scale": np.where(finite, scale, np.float16(np.nan)).astype(np.float16)}


def decode_features(arrays: dict[str, np.ndarray], fmt: str) -> np.ndarray:
    """Stored arrays -> embeddings [..., D] float32."""
    if fmt != "int8":
        return np.asarray(arrays["features"], np.float32)
    return arrays["features_q"].astype(np.float32) * arrays["features_scale"].astype(np.float32)[..., None]
