"""The per-row-chunk task bodies of the bank tools (run by dask threads or cluster workers).

Each takes the row range [start, stop) of one output chunk and the dask blocks of its inputs, writes every
output array of that range itself (through a picklable :class:`pipeline.bank.daskio.Output`), and returns a
float64 vector of sums (metrics, fidelity, statistics) that the job adds up. This module imports no torch, so
cluster workers stay light.
"""

from __future__ import annotations

import numpy as np

from pipeline.bank import compact as cp
from pipeline.bank import stats as st
from pipeline.bank.daskio import Output

FP16_MAX = float(np.finfo(np.float16).max)


def _combine(x: np.ndarray, mode: str) -> np.ndarray:
    """x [r, T, V, C] float32 -> combined logits."""
    if mode == "stack":
        return x
    if mode == "mean-logits":
        return x.mean(axis=1, keepdims=True)
    m = x.max(axis=-1, keepdims=True)  # mean-probs: log(mean_t softmax(x_t)), computed in log space
    lp = x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))
    top = lp.max(axis=1, keepdims=True)
    with np.errstate(invalid="ignore"):
        return top + np.log(np.exp(lp - top).mean(axis=1, keepdims=True))


def _write_view_params(out: Output, start: int, stop: int, view_params: np.ndarray | None,
                       view_partner: np.ndarray | None) -> None:
    """An augmenting view policy's stored parameters, copied as they are (absent: nothing to write)."""
    if view_params is not None:
        out.write("view_params", start, stop, view_params)
        out.write("view_partner", start, stop, view_partner)


def ensemble_block(start: int, stop: int, *, x: np.ndarray, labels: np.ndarray, views: np.ndarray,
                   skipped: np.ndarray, out: Output, mode: str, fp16: bool = True,
                   view_params: np.ndarray | None = None, view_partner: np.ndarray | None = None) -> np.ndarray:
    y = _combine(np.asarray(x, np.float32), mode)
    sk = np.asarray(skipped).reshape(len(y), -1).any(axis=1)
    y[sk] = np.nan
    if fp16:  # metrics below are measured on the stored values
        y = np.clip(y, -FP16_MAX, FP16_MAX).astype(np.float16).astype(np.float32)
    out.write("logits", start, stop, y)
    out.write("labels", start, stop, labels)
    out.write("views", start, stop, views)
    _write_view_params(out, start, stop, view_params, view_partner)
    out.write("skipped", start, stop, sk)
    return st.metric_states(y, labels, sk)


def compact_block(start: int, stop: int, *, x: np.ndarray, labels: np.ndarray, views: np.ndarray,
                  skipped: np.ndarray, out: Output, fmt: str, k: int | None, c: int, dtype: str,
                  samples: int | None = None, seed: int = 0, view_params: np.ndarray | None = None,
                  view_partner: np.ndarray | None = None) -> np.ndarray:
    """Encode one row chunk with the dump's encoder (:func:`pipeline.bank.compact.encode_chunk`) and write it
    with its ``chunk_sums`` row; returns the sums (fidelity, source and reconstruction metric states)."""
    labels, skipped = np.asarray(labels), np.asarray(skipped, bool)
    arrays, sums = cp.encode_chunk(np.asarray(x), labels, skipped, fmt, k, dtype, samples=samples, seed=seed,
                                   start=start)
    for name, a in arrays.items():
        out.write(name, start, stop, a)
    out.write("labels", start, stop, labels)
    out.write("views", start, stop, views)
    _write_view_params(out, start, stop, view_params, view_partner)
    out.write("skipped", start, stop, skipped)
    j = start // out.array("labels").chunks[0]
    out.write("chunk_sums", j, j + 1, sums[None])
    return sums


def stats_block(start: int, stop: int, *, x: np.ndarray, labels: np.ndarray, skipped: np.ndarray,
                view: int) -> np.ndarray:
    return st.block_stats(np.asarray(x, np.float32), labels, skipped, view)
