"""Compact label-bank formats: encoding, decoding, fidelity, and transparent reconstruction for the reader.

A compact bank has the same attrs and the same ``labels``/``views``/``skipped``/``done`` arrays as a dense one,
a ``format`` attr, no ``logits`` array, and the arrays listed in ``attrs['compact_arrays']`` instead.
:func:`reconstruct` turns rows of it back into dense float32 **logits** [n, T, V, C], so
``LabelBank.read_logits``/``load`` (and every stage-2 method) read compact banks unchanged.

Formats (one vector = one (sample, teacher, view)):

``topk`` (``attrs['topk'] = K``)
    ``topk_values`` (N, T, V, K) float16: the K largest **log-probabilities at T = 1** (log_softmax of the
    teacher logits), sorted in decreasing order; ``topk_indices`` (N, T, V, K) int16 (int32 when C > 32767):
    their classes. Log-probabilities rather than probabilities because fp16 keeps the same *relative*
    precision at every magnitude (probabilities below 6e-5 would fall into fp16 subnormals), so K = C
    reproduces the dense distribution to fp16 rounding at every temperature. Reconstruction (as FKD does):
    kept classes get their stored probability, the remaining mass ``1 - sum(p_k)`` is spread uniformly over
    the C - K other classes (floored at 1e-30 and capped at the smallest kept probability), returned as
    log-probabilities (valid logits: softmax is shift-invariant). Raw size 4K bytes per vector.

``int8`` (no parameter)
    ``q`` (N, T, V, C) int8 and ``scale`` (N, T, V) float16: the logits shifted so that their maximum is 0
    (``z = x - max x``, i.e. the log-probabilities up to a per-vector constant, so the full 256-level range
    covers [min z, 0] whatever the entropy) quantized linearly with a per-vector step
    ``scale = -min(z) / 255``: ``q = round(-z / scale) - 128``; decoded ``z = -(q + 128) * scale``.
    The rounding error (at most scale / 2 per class) is uniform in log space, so it perturbs every probability
    by the same relative factor (KL ~ scale^2 / 24). Classes that would round onto the maximum's level are
    moved one level down, so the argmax (first index on ties, as ``argmax``) is always preserved.
    Raw size C + 2 bytes per vector.

Rows whose source logits are not finite (skipped samples) decode to NaN, exactly like dense banks.

``attrs['fidelity']`` = {kl_t1, kl_t4, top1_agreement, vectors}: mean KL(p || p^) of the softmax at T = 1 and
T = 4 and the fraction of vectors whose argmax is unchanged, measured at compaction time over ``vectors``
(sample, teacher, view) vectors: every row of chunks up to 511 rows, a stride sample of about 256 rows of
larger chunks (``pipeline.bank.jobs.FIDELITY_ROWS``).
"""

from __future__ import annotations

import numpy as np

FORMATS = ("topk", "int8")
TOPK_REST_FLOOR = 1e-30  # smallest probability given to a non-kept class (log = -69, finite in fp16)
FIDELITY_TEMPERATURES = (1.0, 4.0)


def _log_softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    x = x.astype(np.float32, copy=False)
    m = np.max(x, axis=axis, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    z = x - m
    return z - np.log(np.sum(np.exp(z), axis=axis, keepdims=True))


def index_dtype(num_classes: int) -> str:
    return "int16" if num_classes <= np.iinfo(np.int16).max else "int32"


# --- top-k ------------------------------------------------------------------------------------------------
def encode_topk(logits: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """logits [..., C] -> (values [..., K] float16 log-probs, sorted decreasing; indices [..., K] int)."""
    c = logits.shape[-1]
    x = logits.astype(np.float32, copy=False)
    finite = np.isfinite(x).all(axis=-1)
    if not finite.all():
        x = np.where(finite[..., None], x, 0.0).astype(np.float32)
    m = x.max(axis=-1, keepdims=True)
    lse = m + np.log(np.exp(x - m).sum(axis=-1, keepdims=True))
    if k < c:
        part = np.argpartition(x, c - k, axis=-1)[..., c - k:]
    else:
        part = np.broadcast_to(np.arange(c), x.shape).copy()
    vals = np.take_along_axis(x, part, axis=-1)
    order = np.argsort(-vals, axis=-1, kind="stable")
    idx = np.take_along_axis(part, order, axis=-1)
    vals = (np.take_along_axis(vals, order, axis=-1) - lse).astype(np.float16)
    vals[~finite] = np.nan
    return vals, idx.astype(index_dtype(c))


def decode_topk(values: np.ndarray, indices: np.ndarray, num_classes: int) -> np.ndarray:
    """(values [..., K] log-probs, indices [..., K]) -> logits [..., C] float32 (log-probabilities)."""
    lp_k = values.astype(np.float32)
    k = lp_k.shape[-1]
    rest_n = num_classes - k
    if rest_n > 0:
        with np.errstate(invalid="ignore"):
            p_k = np.exp(lp_k)
            rest = np.clip(1.0 - p_k.sum(axis=-1, keepdims=True), TOPK_REST_FLOOR * rest_n, None) / rest_n
            rest = np.minimum(rest, p_k.min(axis=-1, keepdims=True))
            fill = np.log(np.maximum(rest, TOPK_REST_FLOOR))
    else:
        fill = np.zeros(lp_k.shape[:-1] + (1,), np.float32)
    out = np.broadcast_to(fill, lp_k.shape[:-1] + (num_classes,)).astype(np.float32)
    np.put_along_axis(out, indices.astype(np.int64), lp_k, axis=-1)
    bad = ~np.isfinite(lp_k).all(axis=-1)
    if bad.any():
        out[bad] = np.nan
    return out


# --- int8 -------------------------------------------------------------------------------------------------
def encode_int8(logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """logits [..., C] -> (q [..., C] int8, scale [...] float16)."""
    x = logits.astype(np.float32, copy=False)
    finite = np.isfinite(x).all(axis=-1)
    z = np.where(finite[..., None], x, 0.0)
    z = z - z.max(axis=-1, keepdims=True)
    span = -z.min(axis=-1)
    scale = (span / 255.0).astype(np.float16)
    scale = np.where(scale > 0, scale, np.float16(1.0)).astype(np.float16)  # constant vector: any step
    s32 = scale.astype(np.float32)[..., None]
    q = np.clip(np.rint(-z / s32), 0, 255)
    # Keep the argmax: a class below the maximum that rounds onto its level 0 moves to level 1 (only classes
    # within scale/2 of the maximum are touched; exact ties stay tied, and argmax takes the first of them).
    q[(q == 0) & (z < 0)] = 1
    q -= 128
    scale = np.where(finite, scale, np.float16(np.nan)).astype(np.float16)
    return q.astype(np.int8), scale


def decode_int8(q: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """(q [..., C] int8, scale [...] float16) -> logits [..., C] float32 (max-shifted logits)."""
    return -(q.astype(np.float32) + 128.0) * scale.astype(np.float32)[..., None]


# --- packing (one dask block computes both arrays of a format once) ------------------------------------------
def encode_packed(logits: np.ndarray, fmt: str, k: int | None = None) -> np.ndarray:
    """Both arrays of ``fmt`` packed into one float32 array [..., W] (values exact in float32)."""
    if fmt == "topk":
        v, i = encode_topk(logits, int(k))
        return np.concatenate([v.astype(np.float32), i.astype(np.float32)], axis=-1)
    if fmt == "int8":
        q, s = encode_int8(logits)
        return np.concatenate([q.astype(np.float32), s.astype(np.float32)[..., None]], axis=-1)
    raise ValueError(fmt)


def unpack(packed: np.ndarray, fmt: str, num_classes: int, k: int | None = None) -> dict[str, np.ndarray]:
    """Inverse of :func:`encode_packed`: {array name: stored array}."""
    if fmt == "topk":
        return {"topk_values": packed[..., :k].astype(np.float16),
                "topk_indices": packed[..., k:].astype(index_dtype(num_classes))}
    return {"q": packed[..., :num_classes].astype(np.int8), "scale": packed[..., num_classes].astype(np.float16)}


def decode(arrays: dict[str, np.ndarray], fmt: str, num_classes: int) -> np.ndarray:
    if fmt == "topk":
        return decode_topk(arrays["topk_values"], arrays["topk_indices"], num_classes)
    if fmt == "int8":
        return decode_int8(arrays["q"], arrays["scale"])
    raise ValueError(f"unknown compact format {fmt!r}")


def array_specs(fmt: str, shape: tuple[int, int, int, int], k: int | None = None) -> dict[str, tuple[tuple, str]]:
    """{name: (shape, dtype)} of the arrays of a compact format."""
    n, t, v, c = shape
    if fmt == "topk":
        return {"topk_values": ((n, t, v, k), "float16"), "topk_indices": ((n, t, v, k), index_dtype(c))}
    if fmt == "int8":
        return {"q": ((n, t, v, c), "int8"), "scale": ((n, t, v), "float16")}
    raise ValueError(fmt)


def packed_width(fmt: str, num_classes: int, k: int | None = None) -> int:
    return 2 * int(k) if fmt == "topk" else num_classes + 1


# --- fidelity -----------------------------------------------------------------------------------------------
def fidelity_sums(source: np.ndarray, approx: np.ndarray) -> np.ndarray:
    """[count, sum KL(p||p^) at T=1, at T=4, sum top-1 agreement] over the finite vectors of [..., C] arrays.

    KL(p || q) = sum p (zp - zq) - log Sp + log Sq with z = (x - max x) / T, S = sum exp z (two exp passes per T).
    """
    c = source.shape[-1]
    x = source.reshape(-1, c).astype(np.float32, copy=False)
    y = approx.reshape(-1, c).astype(np.float32, copy=False)
    keep = np.isfinite(x).all(axis=1) & np.isfinite(y).all(axis=1)
    if not keep.all():
        x, y = x[keep], y[keep]
    zx0 = x - x.max(axis=1, keepdims=True)
    zy0 = y - y.max(axis=1, keepdims=True)
    out = [float(len(x))]
    for tau in FIDELITY_TEMPERATURES:
        zx, zy = (zx0, zy0) if tau == 1.0 else (zx0 / np.float32(tau), zy0 / np.float32(tau))
        ex = np.exp(zx)
        sx = ex.sum(axis=1)
        sy = np.exp(zy).sum(axis=1)
        kl = (ex * (zx - zy)).sum(axis=1) / sx - np.log(sx) + np.log(sy)
        out.append(float(np.maximum(kl, 0.0).astype(np.float64).sum()))
    out.append(float((zx0.argmax(axis=1) == zy0.argmax(axis=1)).sum()))
    return np.asarray(out, np.float64)


def fidelity_from_sums(s: np.ndarray) -> dict[str, float]:
    n = max(float(s[0]), 1.0)
    return {"kl_t1": float(s[1] / n), "kl_t4": float(s[2] / n), "top1_agreement": float(s[3] / n),
            "vectors": int(s[0])}


# --- reader hook ---------------------------------------------------------------------------------------------
def reconstruct(bank, start: int, stop: int) -> np.ndarray:
    """Rows [start, stop) of a compact ``bank`` (a :class:`pipeline.bank.reader.LabelBank`) as float32 logits
    [n, T, V, C]."""
    from pipeline.errors import BankError

    fmt = bank.format
    if fmt not in FORMATS:
        raise BankError(f"label bank {bank.path} has unknown format {fmt!r} (this version reads dense, "
                        f"{', '.join(FORMATS)})")
    names = bank.attrs.get("compact_arrays") or list(array_specs(fmt, bank.shape, 1))
    missing = [nm for nm in names if nm not in bank.group]
    if missing:
        raise BankError(f"label bank {bank.path} (format {fmt}) lacks array '{missing[0]}'")
    arrays = {nm: np.asarray(bank.group[nm][start:stop]) for nm in names}
    return decode(arrays, fmt, bank.num_classes)
