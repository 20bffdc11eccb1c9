"""Compact label-bank formats: encoding, decoding, fidelity, and transparent reconstruction for the reader.

A compact bank has the same attrs and the same ``labels``/``views``/``skipped``/``done`` arrays as a dense one,
a ``format`` attr, no ``logits`` array, and the arrays listed in ``attrs['compact_arrays']`` instead
(:func:`pipeline.bank.schema.compact_array_specs`). It is written either directly by the dump
(``dump_logits --format topk --topk K`` / ``--format int8``, chunk by chunk, never a dense array) or by
``labels compact`` from a dense bank; both encode every row chunk with :func:`encode_chunk`, starting from the
logits rounded to the bank dtype (what a dense bank stores), so the two paths give the same bytes.
:func:`reconstruct` turns rows back into dense float32 **logits** [n, T, V, C] (``LabelBank.read_logits``);
stage 2 holds compact banks compact and densifies gathered rows only (:mod:`pipeline.bank.resident`).

Formats (one vector = one (sample, teacher, view)):

``topk`` (``attrs['topk'] = K``, ``attrs['tail'] = "uniform"``)
    ``topk_values`` (N, T, V, K) float16: the K largest **log-probabilities at T = 1** (log_softmax of the
    teacher logits), sorted in decreasing order; ``topk_indices`` (N, T, V, K) int16 (int32 when C > 32767):
    their classes; ``target_logprob`` (N, T, V) float16: the exact T = 1 log-probability of the sample's true
    class (``labels``), kept whether or not it is in the top K, so that methods which use p(true class) (WSLD's
    weight, DKD's target term, label optimization) see the teacher's value. Log-probabilities rather than
    probabilities because fp16 keeps the same *relative* precision at every magnitude. Reconstruction (FKD's rule
    for the tail): kept classes (top K and the true class) get their stored log-probability; the remaining mass
    ``1 - sum(p_kept)`` is spread uniformly over the other classes (floored at 1e-30 each and capped at the
    smallest top-K probability); returned as log-probabilities (valid logits: softmax is shift-invariant).
    Raw size 4K + 2 bytes per vector (int16 indices).

``int8`` (no parameter)
    ``q`` (N, T, V, C) int8 and ``scale`` (N, T, V) float16: the logits shifted so that their maximum is 0
    (``z = x - max x``) quantized linearly with a per-vector step ``scale = -min(z) / 255``:
    ``q = round(-z / scale) - 128``; decoded ``z = -(q + 128) * scale``. The rounding error (at most scale / 2
    per class) is uniform in log space (KL ~ scale^2 / 24). Classes that would round onto the maximum's level are
    moved one level down, so the argmax (first index on ties) is always preserved. Raw size C + 2 bytes.

Rows whose source logits are not finite (skipped samples) decode to NaN, exactly like dense banks.

Fidelity (``attrs['fidelity']`` = {kl_t1, kl_t2, kl_t4, top1_agreement, vectors}): mean KL(p || p^) of the
softmax at T = 1, 2, 4 (the temperatures the recipes use) and the fraction of vectors whose argmax is
unchanged, measured at encoding time over ``vectors`` (sample, teacher, view) vectors: every row of chunks up
to 511 rows, a stride sample of about 256 rows of larger chunks (:data:`FIDELITY_ROWS`), every view.
"""

from __future__ import annotations

import numpy as np

from pipeline.bank import stats as st
from pipeline.bank.schema import COMPACT_FORMATS, compact_array_specs, index_dtype

FORMATS = COMPACT_FORMATS
TOPK_REST_FLOOR = 1e-30  # smallest probability given to a non-kept class (log = -69, finite in fp16)
FIDELITY_TEMPERATURES = (1.0, 2.0, 4.0)
# Fidelity is measured on every (len // 256)-th row of each chunk: a stride sample over a class-sorted manifest
# (standard error far below the digits reported), every row of small banks. On every row it was 28% of the
# compaction time.
FIDELITY_ROWS = 256
FIDELITY_WIDTH = 2 + len(FIDELITY_TEMPERATURES)  # [count, KL at each T, top-1 agreements]
ENCODE_ELEMENTS = 1 << 24  # values encoded at once (64 MB of float32; encoding needs a few times that)


def _log_softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    x = x.astype(np.float32, copy=False)
    m = np.max(x, axis=axis, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    z = x - m
    return z - np.log(np.sum(np.exp(z), axis=axis, keepdims=True))


def _per_vector(labels: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Labels [r] (one per sample) or shape-shaped (one per vector) -> int64 broadcast to ``shape`` (= x.shape[:-1])."""
    lab = np.asarray(labels).astype(np.int64, copy=False)
    lab = lab.reshape(lab.shape + (1,) * (len(shape) - lab.ndim))
    return np.broadcast_to(lab, shape)


# --- top-k ------------------------------------------------------------------------------------------------
def encode_topk(logits: np.ndarray, k: int, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """logits [..., C], labels [r] or [...] -> (values [..., K] float16 log-probs sorted decreasing,
    indices [..., K] int16/int32, target [...] float16 = log-prob of the true class)."""
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
    lab = _per_vector(labels, x.shape[:-1])
    target = (np.take_along_axis(x, lab[..., None], axis=-1) - lse)[..., 0].astype(np.float16)
    vals[~finite] = np.nan
    target[~finite] = np.nan
    return vals, idx.astype(index_dtype(c)), target


def topk_fill(values: np.ndarray, indices: np.ndarray, target: np.ndarray, labels: np.ndarray,
              num_classes: int) -> np.ndarray:
    """The log-probability every non-kept class gets ([...] float32; NaN for a non-finite vector).

    values/indices [..., K], target [...], labels [r] or [...]. Kept = top K and the true class; the rest of the
    mass, ``1 - sum p_kept``, is spread uniformly over the ``C - |kept|`` other classes, floored at
    ``TOPK_REST_FLOOR`` each and capped at the smallest top-K probability (no non-kept class above a kept one).
    """
    lp_k = values.astype(np.float32)
    lp_t = target.astype(np.float32)
    lab = _per_vector(labels, lp_t.shape)
    k = lp_k.shape[-1]
    with np.errstate(invalid="ignore", over="ignore"):
        in_top = (indices == lab[..., None]).any(axis=-1)
        p_k = np.exp(lp_k)
        mass = p_k.sum(axis=-1) + np.where(in_top, np.float32(0.0), np.exp(lp_t))
        rest_n = (num_classes - k - (~in_top)).astype(np.float32)
        n = np.maximum(rest_n, 1.0)
        rest = np.maximum(1.0 - mass, TOPK_REST_FLOOR * n) / n
        rest = np.minimum(rest, p_k.min(axis=-1))
        fill = np.log(np.maximum(rest, np.float32(TOPK_REST_FLOOR))).astype(np.float32)
    bad = ~(np.isfinite(lp_k).all(axis=-1) & np.isfinite(lp_t))
    fill[bad] = np.nan
    return fill


def decode_topk(values: np.ndarray, indices: np.ndarray, target: np.ndarray, labels: np.ndarray,
                num_classes: int) -> np.ndarray:
    """(values [..., K] log-probs, indices [..., K], target [...], labels [r] or [...]) -> logits [..., C] float32
    (log-probabilities: the tail fill, then the true class's, then the top-K values)."""
    fill = topk_fill(values, indices, target, labels, num_classes)
    out = np.repeat(fill[..., None], num_classes, axis=-1)
    lab = _per_vector(labels, fill.shape)
    np.put_along_axis(out, lab[..., None], target.astype(np.float32)[..., None], axis=-1)
    np.put_along_axis(out, indices.astype(np.int64), values.astype(np.float32), axis=-1)
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


# --- one format, one chunk ------------------------------------------------------------------------------------
def encode(logits: np.ndarray, fmt: str, k: int | None, labels: np.ndarray) -> dict[str, np.ndarray]:
    """logits [r, T, V, C] (labels [r]) -> {array name: stored array} of ``fmt``."""
    if fmt == "topk":
        v, i, t = encode_topk(logits, int(k), labels)
        return {"topk_values": v, "topk_indices": i, "target_logprob": t}
    if fmt == "int8":
        q, s = encode_int8(logits)
        return {"q": q, "scale": s}
    raise ValueError(f"unknown compact format {fmt!r}")


def decode(arrays: dict[str, np.ndarray], fmt: str, num_classes: int, labels: np.ndarray) -> np.ndarray:
    """Inverse of :func:`encode` -> logits [r, T, V, C] float32."""
    if fmt == "topk":
        return decode_topk(arrays["topk_values"], arrays["topk_indices"], arrays["target_logprob"], labels,
                           num_classes)
    if fmt == "int8":
        return decode_int8(arrays["q"], arrays["scale"])
    raise ValueError(f"unknown compact format {fmt!r}")


def sums_layout(t: int) -> dict[str, tuple[int, int]]:
    """Columns of a ``chunk_sums`` row: fidelity sums, metric states of the source logits and of the
    reconstruction (view 0, :func:`pipeline.bank.stats.metric_states`)."""
    m = st.metric_state_width(t)
    return {"fidelity": (0, FIDELITY_WIDTH), "source_metrics": (FIDELITY_WIDTH, FIDELITY_WIDTH + m),
            "metrics": (FIDELITY_WIDTH + m, FIDELITY_WIDTH + 2 * m)}


def sums_width(t: int) -> int:
    return sums_layout(t)["metrics"][1]


def encode_chunk(x: np.ndarray, labels: np.ndarray, skipped: np.ndarray, fmt: str, k: int | None,
                 dtype: str = "float32") -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Encode one row chunk and measure it: the one encoding of both the dump and ``labels compact``.

    x [r, T, V, C]: the chunk's logits (NaN rows for skipped samples), rounded here to the bank ``dtype`` (what a
    dense bank stores) before encoding; labels [r]; skipped [r]. Returns ({array name: stored array}, sums [W]
    float64 laid out as :func:`sums_layout`). Rows are encoded in blocks of at most :data:`ENCODE_ELEMENTS`
    values (every operation is per vector, so the blocks change no value; they bound the temporaries of a
    chunk with many views: a 4096-row chunk of 100 views x 1000 classes is 1.6 GB in float32).
    """
    r, t = x.shape[:2]
    c = x.shape[-1]
    step = max(1, r // FIDELITY_ROWS)
    block = max(1, ENCODE_ELEMENTS // max(1, int(np.prod(x.shape[1:]))))
    parts: list[dict[str, np.ndarray]] = []
    lay = sums_layout(t)
    sums = np.zeros(sums_width(t), np.float64)
    for s in range(0, r, block):
        e = min(r, s + block)
        xb = np.asarray(x[s:e]).astype(dtype, copy=False).astype(np.float32, copy=False)
        lb, sb = labels[s:e], skipped[s:e]
        arrays = encode(xb, fmt, k, lb)
        first = -s % step  # the chunk's fidelity sample: rows 0, step, 2 step, ... of the chunk
        sample = decode({n: a[first::step] for n, a in arrays.items()}, fmt, c, lb[first::step])
        view0 = decode({n: a[:, :, :1] for n, a in arrays.items()}, fmt, c, lb)
        sums[slice(*lay["fidelity"])] += fidelity_sums(xb[first::step], sample)
        sums[slice(*lay["source_metrics"])] += st.metric_states(xb, lb, sb)
        sums[slice(*lay["metrics"])] += st.metric_states(view0, lb, sb)
        parts.append(arrays)
    return {n: np.concatenate([p[n] for p in parts]) for n in parts[0]}, sums


# --- fidelity -----------------------------------------------------------------------------------------------
def fidelity_sums(source: np.ndarray, approx: np.ndarray) -> np.ndarray:
    """[count, sum KL(p||p^) at each of FIDELITY_TEMPERATURES, sum top-1 agreement] over the finite vectors of
    [..., C] arrays.

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
    """{kl_t1, kl_t2, kl_t4, top1_agreement, vectors} from summed :func:`fidelity_sums`."""
    n = max(float(s[0]), 1.0)
    out = {f"kl_t{tau:g}": float(s[1 + i] / n) for i, tau in enumerate(FIDELITY_TEMPERATURES)}
    return {**out, "top1_agreement": float(s[-1] / n), "vectors": int(s[0])}


def format_fidelity(f: dict) -> str:
    """One line: ``KL(T=1) 0.0712  KL(T=2) ...  top-1 agreement 1.0000  (12,345 vectors)``; older banks' attrs
    may lack a temperature."""
    kls = "  ".join(f"KL(T={tau:g}) {f[f'kl_t{tau:g}']:.3g}" for tau in FIDELITY_TEMPERATURES if f"kl_t{tau:g}" in f)
    return f"{kls}  top-1 agreement {f['top1_agreement']:.4f}  ({f.get('vectors', 0):,} vectors)"


def raw_bytes_per_vector(fmt: str, num_classes: int, k: int | None) -> int:
    """Payload bytes of one (sample, teacher, view) vector."""
    if fmt == "topk":
        return int(k) * (2 + np.dtype(index_dtype(num_classes)).itemsize) + 2
    return num_classes + 2


# --- reader hook ---------------------------------------------------------------------------------------------
def reconstruct(bank, start: int, stop: int) -> np.ndarray:
    """Rows [start, stop) of a compact ``bank`` (a :class:`pipeline.bank.reader.LabelBank`) as float32 logits
    [n, T, V, C]."""
    from pipeline.errors import BankError

    names = bank.attrs.get("compact_arrays") or list(compact_array_specs(bank.format, bank.shape, 1))
    missing = [nm for nm in names if nm not in bank.group]
    if missing:
        raise BankError(f"label bank {bank.path} (format {bank.format}) lacks array '{missing[0]}'")
    arrays = {nm: np.asarray(bank.group[nm][start:stop]) for nm in names}
    labels = np.asarray(bank.group["labels"][start:stop]) if bank.format == "topk" else None
    return decode(arrays, bank.format, bank.num_classes, labels)
