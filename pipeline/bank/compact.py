"""Compact label-bank formats: encoding, targets at a temperature, fidelity, and reconstruction for the reader.

A compact bank has the same attrs and the same ``labels``/``views``/``skipped``/``done`` arrays as a dense one,
a ``format`` attr, no ``logits`` array, and the arrays listed in ``attrs['compact_arrays']`` instead
(:func:`pipeline.bank.schema.compact_array_specs`). It is written either directly by the dump
(``dump_logits --format topk|sampled|int8``, batch by batch on the teachers' device, chunk by chunk, never a
dense array) or by ``labels compact`` from a dense bank (:func:`encode_chunk`); both encode with the one torch
encoder, :func:`pipeline.bank.encoding.encode_rows`, starting from the logits rounded to the bank dtype (what a
dense bank stores), so on one device the two paths give the same bytes. The math lives in
:mod:`pipeline.bank.encoding`; the numpy functions here are thin wrappers over it on CPU tensors.

Notation (one vector = one (sample, teacher, view)): ``l_k = z_k - logsumexp(z)`` the teacher's log-probabilities
at T = 1; ``S`` the kept classes (the top K and the true class y); ``R`` the other classes, ``m = |R|``; the
tail's log-partition at inverse temperature ``beta = 1/T``::

    F(beta) = log sum_{j in R} exp(beta * l_j)        (F(1) = log of the tail's mass at T = 1, F(0) = log m)

F is convex in beta (a cumulant-generating function). The teacher at temperature T is then, exactly,
``p^T_k = exp(l_k / T) / Z_T`` with ``Z_T = sum_{k in S} exp(l_k / T) + exp(F(1/T))``, and the tail's share of
it is ``exp(F(1/T)) / Z_T``. A top-k bank stores F at the grid :data:`TAIL_TEMPERATURES` (every published
default temperature of the methods here: DIST 1, WSLD 2, SL 3, KD/DKD 4, Tf-KD 6 and 20); between grid points
F is interpolated linearly in beta (with F(0) = log m): exact on the grid, and, F being convex, an upper bound
in between. What the old ``tail = "uniform"`` layout did instead -- spread ``exp(F(1))`` evenly over R at T = 1
and let the losses soften that -- gives ``m * (exp(F(1)) / m) ** (1/T)``, which grows like ``m ** (1 - 1/T)``:
with 95 tail classes at T = 4 it took 86% of the target where the teacher puts 76%.

Formats:

``topk`` (``attrs['topk'] = K``, ``attrs['tail'] = "stats"``)
    ``topk_values`` (N, T, V, K) float16: the K largest l_k, sorted decreasing; ``topk_indices`` (N, T, V, K)
    int16 (int32 when C > 32767); ``target_logprob`` (N, T, V) float16: l_y of the true class, top K or not;
    ``tail_lse`` (N, T, V, G) float16: F(1/T_g) for the G grid temperatures (:data:`TAIL_EMPTY` when R is empty).
    Stage 2 builds the target at the loss's T from these (:mod:`kd_losses.targets`): the kept classes exactly and
    the tail as ONE bucket of mass ``exp(F(1/T)) / Z_T``, matched by the student's summed tail probability; the
    tail is never spread and re-softened. Raw size 4K + 2 + 2G bytes per vector (int16 indices).

``sampled`` (``attrs['topk'] = K``, ``attrs['samples'] = S``, ``attrs['sample_seed']``): Sparse Logit Sampling
    (Anshumann et al., ACL 2025, arXiv 2503.16870): the top K exactly, plus S classes drawn with replacement from
    the rest by importance sampling with the teacher's own distribution as proposal,
    ``q_j = p_j / P_R`` (j in R, ``P_R = exp(F(1))``). Arrays: those of ``topk`` plus ``sample_indices``
    (N, T, V, S) (sorted), ``sample_logprob`` (N, T, V, S) float16 (their l_j) and ``logsumexp`` (N, T, V) float32
    (so stored logits are recoverable: ``z_j = l_j + logsumexp``). The draws are a counter-based hash of
    (seed, row, teacher, view, draw): the same in a dump, a resumed dump, on any rank and in ``labels compact``.
    The stored target at temperature T: the draws share the tail's exact mass at T (``exp(F(1/T)) / Z_T``, from the
    tail statistics) by self-normalized importance weights ``r_n / sum_m r_m``, ``r_n = exp(l_{j_n} (1/T - 1))``
    (proportional to p^T / q). At T = 1 every draw holds ``P_R / S``: the paper's unbiased random-sampling target
    (E[target] = p; losses linear in it get unbiased gradients). At T != 1 the plain importance weights
    ``(1/S) p^T / q`` would be unbiased as well but explode when the target is much flatter than the proposal
    (a KD student at T = 4 from such a 5+5 bank trained to chance on the 100-class pairs task); self-normalized, the
    target always sums to 1, with a ratio-estimator bias of O(1/S). DKD's NCKD renormalizes the non-target classes
    (a ratio estimate too); DIST and SL-Enc are nonlinear in the whole distribution and refuse this format
    (:mod:`kd_losses.targets`).
    Raw size 4K + 2 + 2G + 4S + 4 bytes per vector (int16 indices).

``int8`` (no parameter)
    ``q`` (N, T, V, C) int8 and ``scale`` (N, T, V) float16: the logits shifted so that their maximum is 0
    (``z = x - max x``) quantized linearly with a per-vector step ``scale = -min(z) / 255``:
    ``q = round(-z / scale) - 128``; decoded ``z = -(q + 128) * scale``. The rounding error (at most scale / 2
    per class) is uniform in log space (KL ~ scale^2 / 24). Classes that would round onto the maximum's level are
    moved one level down, so the argmax (first index on ties) is always preserved. Raw size C + 2 bytes.

:func:`reconstruct` returns dense float32 **logits at T = 1** (``LabelBank.read_logits``: tools, verify): every
stored class exact and the rest of the mass spread evenly over the unstored classes; these are right at T = 1
only, which is why stage 2 never softens them (it holds compact banks compact, :mod:`pipeline.bank.resident`).
Rows whose source logits are not finite (skipped samples) decode to NaN, exactly like dense banks.

Fidelity (``attrs['fidelity']``), measured at encoding time on the targets stage 2 builds, at T = 1, 2, 4
(:data:`FIDELITY_TEMPERATURES`) over ``vectors`` (sample, teacher, view) vectors (every row of chunks up to 511
rows, a stride sample of about 256 rows of larger chunks, every view): ``kl_tT`` mean KL(p^T || t^T) where t^T
is the target with the tail bucket spread evenly over its classes (what the student is not told: the tail's
shape; not reported for ``sampled``, whose estimate is zero on unsampled classes); ``tv_tT`` mean total variation
``1/2 sum |p^T - t^T|``; ``tail_tT`` the mean share of the target on the classes not stored one by one, and
``tail_dense_tT`` the teacher's own share on those classes (a target that inflates its tail shows
``tail_tT > tail_dense_tT``); ``top1_agreement``.
"""

from __future__ import annotations

import numpy as np
import torch

from pipeline.bank import encoding as en
from pipeline.bank.encoding import (FIDELITY_STATS, FIDELITY_TEMPERATURES, FIDELITY_WIDTH, SAMPLE_TEMPERATURE,
                                    TAIL_EMPTY, TOPK_REST_FLOOR, metric_width, sample_uniforms, sums_layout, sums_width,
                                    tail_betas)
from pipeline.bank.schema import COMPACT_FORMATS, TAIL_TEMPERATURES, compact_array_specs, index_dtype

__all__ = ["FIDELITY_STATS", "FIDELITY_TEMPERATURES", "FIDELITY_WIDTH", "SAMPLE_TEMPERATURE", "TAIL_EMPTY",
           "TOPK_REST_FLOOR", "metric_width", "sample_uniforms", "sums_layout", "sums_width", "tail_betas"]

FORMATS = COMPACT_FORMATS
# Fidelity is measured on every (len // 256)-th row of each chunk: a stride sample over a class-sorted manifest
# (standard error far below the digits reported), every row of small banks. On every row it was 28% of the
# compaction time.
FIDELITY_ROWS = 256
ENCODE_ELEMENTS = 1 << 24  # values encoded at once (64 MB of float32; encoding needs a few times that)


# The numpy API below wraps the torch encoder (pipeline.bank.encoding, where the math lives) on CPU tensors.
def _t(a: np.ndarray | None) -> torch.Tensor | None:
    return None if a is None else torch.from_numpy(np.ascontiguousarray(a))


def _ts(arrays: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    return {n: _t(a) for n, a in arrays.items()}


def _np(arrays: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    return {n: a.cpu().numpy() for n, a in arrays.items()}


def tail_stats(lp: np.ndarray, kept: np.ndarray) -> np.ndarray:
    """lp [..., C] float32 log-probabilities at T = 1, kept [..., C] bool -> F(1/T_g) [..., G] float32 for every
    grid temperature (:func:`pipeline.bank.encoding.tail_stats`; ``labels check`` recomputes a top-k tail)."""
    return en.tail_stats(_t(np.asarray(lp, np.float32)), _t(np.asarray(kept, bool))).numpy()


def encode_topk(logits: np.ndarray, k: int, labels: np.ndarray) -> dict[str, np.ndarray]:
    """logits [..., C], labels [r] or [...] -> {topk_values [..., K] float16 log-probs sorted decreasing,
    topk_indices [..., K] int16/int32, target_logprob [...] float16 (the true class's log-prob),
    tail_lse [..., G] float16 (F(1/T_g), :func:`pipeline.bank.encoding.tail_stats`)}."""
    return _np(en.encode_topk(_t(np.asarray(logits, np.float32)), k, _t(np.asarray(labels)))[0])


def encode_sampled(logits: np.ndarray, k: int, s: int, labels: np.ndarray, seed: int, rows: np.ndarray,
                   tq: float = SAMPLE_TEMPERATURE) -> dict[str, np.ndarray]:
    """logits [r, T, V, C] of bank rows ``rows`` [r] -> the top-k arrays plus ``sample_indices`` [r, T, V, S]
    (sorted), ``sample_logprob`` [r, T, V, S] float16, ``logsumexp`` [r, T, V] float32."""
    return _np(en.encode_sampled(_t(np.asarray(logits, np.float32)), k, s, _t(np.asarray(labels)), seed,
                                 np.asarray(rows), tq))


def encode_int8(logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """logits [..., C] -> (q [..., C] int8, scale [...] float16)."""
    out = _np(en.encode_int8(_t(np.asarray(logits, np.float32))))
    return out["q"], out["scale"]


def encode(logits: np.ndarray, fmt: str, k: int | None, labels: np.ndarray, samples: int | None = None,
           seed: int = 0, rows: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """logits [r, T, V, C] (labels [r]; ``rows`` [r]: their bank rows, which seed a sampled bank's draws) ->
    {array name: stored array} of ``fmt``."""
    lab = _t(np.asarray(labels)) if labels is not None else None
    return _np(en.encode(_t(np.asarray(logits, np.float32)), fmt, k, lab, samples, seed, rows))


def tail_log_partition(tail_lse: np.ndarray, count: np.ndarray, beta: float) -> np.ndarray:
    """F(beta) from the stored grid ([...] float64; :func:`pipeline.bank.encoding.tail_log_partition`)."""
    return en.tail_log_partition(_t(tail_lse), _t(np.asarray(count)), beta).numpy()


def target_probs(arrays: dict[str, np.ndarray], fmt: str, labels: np.ndarray, c: int,
                 tau: float, tq: float = SAMPLE_TEMPERATURE) -> tuple[np.ndarray, np.ndarray]:
    """The target stage 2 builds at temperature ``tau``, densified: (probs [..., C] float64, stored [..., C]
    bool); :func:`pipeline.bank.encoding.target_probs`."""
    p, stored = en.target_probs(_ts(arrays), fmt, _t(np.asarray(labels)), c, tau, tq)
    return p.numpy(), stored.numpy()


def topk_fill(values: np.ndarray, indices: np.ndarray, target: np.ndarray, labels: np.ndarray,
              num_classes: int, tail_lse: np.ndarray | None = None) -> np.ndarray:
    """The T = 1 log-probability of every non-kept class ([...] float32; :func:`pipeline.bank.encoding.topk_fill`)."""
    return en.topk_fill(_t(values), _t(indices), _t(target), _t(np.asarray(labels)), num_classes,
                        _t(tail_lse)).numpy()


def decode_topk(values: np.ndarray, indices: np.ndarray, target: np.ndarray, labels: np.ndarray,
                num_classes: int, tail_lse: np.ndarray | None = None) -> np.ndarray:
    """Logits at T = 1 [..., C] float32 (log-probabilities): the kept classes exact, the rest
    :func:`topk_fill`. Right at T = 1 only (see the module docstring)."""
    return en.decode_topk(_t(values), _t(indices), _t(target), _t(np.asarray(labels)), num_classes,
                          _t(tail_lse)).numpy()


def sampled_fill(arrays: dict[str, np.ndarray], labels: np.ndarray, num_classes: int) -> np.ndarray:
    """The T = 1 log-probability of every class a sampled vector stores neither kept nor drawn ([...] float32)."""
    return en.sampled_fill(_ts(arrays), _t(np.asarray(labels)), num_classes).numpy()


def decode_sampled(arrays: dict[str, np.ndarray], labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Logits at T = 1 [..., C] float32 of a sampled bank: every stored class exact, the rest :func:`sampled_fill`."""
    return en.decode_sampled(_ts(arrays), _t(np.asarray(labels)), num_classes).numpy()


def decode_int8(q: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """(q [..., C] int8, scale [...] float16) -> logits [..., C] float32 (max-shifted logits)."""
    return en.decode_int8(_t(q), _t(scale)).numpy()


def decode(arrays: dict[str, np.ndarray], fmt: str, num_classes: int, labels: np.ndarray | None) -> np.ndarray:
    """Stored arrays -> logits at T = 1 [r, T, V, C] float32 (the reader's reconstruction)."""
    return en.decode(_ts(arrays), fmt, num_classes, _t(np.asarray(labels)) if labels is not None else None).numpy()


def fidelity_rows_mask(rows: np.ndarray, chunk_start: int, chunk_rows: int) -> np.ndarray:
    """[len(rows)] bool: which bank ``rows`` belong to their chunk's fidelity sample (every
    ``max(1, chunk_rows // FIDELITY_ROWS)``-th row from the chunk's first, ``chunk_start``; ``chunk_rows``: the
    chunk's length)."""
    step = max(1, chunk_rows // FIDELITY_ROWS)
    return (np.asarray(rows, np.int64) - chunk_start) % step == 0


def encode_chunk(x: np.ndarray, labels: np.ndarray, skipped: np.ndarray, fmt: str, k: int | None,
                 dtype: str = "float32", *, samples: int | None = None, seed: int = 0,
                 start: int = 0) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Encode one row chunk and measure it: ``labels compact``'s (and ``labels plan``'s) use of the encoder the
    dump runs per batch on its device (:func:`pipeline.bank.encoding.encode_rows`, then
    :func:`pipeline.bank.encoding.chunk_sums`).

    x [r, T, V, C]: the chunk's logits (NaN rows for skipped samples), rounded to the bank ``dtype``; labels [r];
    skipped [r]; ``start``: the bank row of x[0] (a sampled bank's draws are seeded by row); ``samples``/``seed``:
    S and the seed of ``sampled``. Returns ({array name: stored array}, sums [W] float64 laid out as
    :func:`sums_layout`). Rows are encoded in blocks of at most :data:`ENCODE_ELEMENTS` values (every value is
    per vector and the sums are reduced from per-row records in row order, so the blocks change no byte; they
    bound the temporaries of a chunk with many views).
    """
    r, t = x.shape[:2]
    block = max(1, ENCODE_ELEMENTS // max(1, int(np.prod(x.shape[1:]))))
    fid = fidelity_rows_mask(np.arange(r), 0, r)
    parts: list[dict[str, np.ndarray]] = []
    for s in range(0, r, block):
        e = min(r, s + block)
        xb = _t(np.asarray(x[s:e]))
        parts.append(_np(en.encode_rows(xb, _t(np.asarray(labels[s:e])), _t(np.asarray(skipped[s:e], bool)), fmt,
                                        k, dtype, _t(fid[s:e]), samples=samples, seed=seed,
                                        rows=np.arange(start + s, start + e))))
    out = {n: np.concatenate([p[n] for p in parts]) for n in parts[0]}
    sums = en.chunk_sums(out, t)
    return {n: a for n, a in out.items() if not n.startswith("_")}, sums


def fidelity_from_sums(s: np.ndarray, fmt: str = "topk") -> dict[str, float]:
    """{kl_tT (not for ``sampled``), tv_tT, tail_tT, tail_dense_tT, top1_agreement, vectors} from summed
    :func:`fidelity_sums`."""
    n = max(float(s[0]), 1.0)
    out: dict[str, float] = {}
    for i, tau in enumerate(FIDELITY_TEMPERATURES):
        for j, stat in enumerate(FIDELITY_STATS):
            if stat == "kl" and fmt == "sampled":
                continue
            out[f"{stat}_t{tau:g}"] = float(s[1 + len(FIDELITY_STATS) * i + j] / n)
    return {**out, "top1_agreement": float(s[-1] / n), "vectors": int(s[0])}


def format_fidelity(f: dict, fmt: str = "topk") -> str:
    """One line per temperature: ``T=4: KL 0.0712  TV 0.031  tail 0.42 (teacher 0.42)``, then the top-1
    agreement; older banks' attrs may lack entries. ``sampled``: the figures are of one draw (the target is
    unbiased only in expectation; a draw's KL is infinite, so none is shown) and its uniform tail is 0 because
    the sampled classes carry the teacher's tail, which the line says."""
    sampled = fmt == "sampled"
    parts = []
    for tau in FIDELITY_TEMPERATURES:
        t = f"{tau:g}"
        items = [f"{name} {f[key]:.3g}" for name, key in (("KL", f"kl_t{t}"), ("TV", f"tv_t{t}")) if key in f]
        if f"tail_t{t}" in f:
            dense = f[f"tail_dense_t{t}"]
            items.append(f"teacher's tail {dense:.3g} carried by the sampled classes" if sampled else
                         f"tail {f[f'tail_t{t}']:.3g} (teacher {dense:.3g})")
        if items:
            parts.append(f"T={t}: " + "  ".join(items))
    draw = " of one draw (unbiased over draws; no KL: infinite for a single draw)" if sampled else ""
    return "; ".join(parts) + f"; top-1 agreement {f['top1_agreement']:.4f}{draw}  ({f.get('vectors', 0):,} vectors)"


def raw_bytes_per_vector(fmt: str, num_classes: int, k: int | None, samples: int | None = None) -> int:
    """Payload bytes of one (sample, teacher, view) vector."""
    isz = np.dtype(index_dtype(num_classes)).itemsize
    if fmt in ("topk", "sampled"):
        n = int(k) * (2 + isz) + 2 + 2 * len(TAIL_TEMPERATURES)
        return n + (int(samples) * (2 + isz) + 4 if fmt == "sampled" else 0)
    return num_classes + 2


# --- reader hook ---------------------------------------------------------------------------------------------
def reconstruct(bank, start: int, stop: int) -> np.ndarray:
    """Rows [start, stop) of a compact ``bank`` (a :class:`pipeline.bank.reader.LabelBank`) as float32 logits at
    T = 1 [n, T, V, C]."""
    from pipeline.errors import BankError

    names = bank.attrs.get("compact_arrays") or list(compact_array_specs(bank.format, bank.shape, 1))
    missing = [nm for nm in names if nm not in bank.group]
    if missing:
        raise BankError(f"label bank {bank.path} (format {bank.format}) lacks array '{missing[0]}'")
    arrays = {nm: np.asarray(bank.group[nm][start:stop]) for nm in names}
    labels = np.asarray(bank.group["labels"][start:stop]) if bank.format != "int8" else None
    return decode(arrays, bank.format, bank.num_classes, labels)


# --- format parameters ---------------------------------------------------------------------------------------
def check_format_args(fmt: str, k: int | None, samples: int | None, num_classes: int | None = None) -> None:
    """One-line UsageError unless (``--topk``, ``--samples``) fit ``fmt``: ``topk`` needs K in [1, C];
    ``sampled`` needs K in [0, C - 2] (so that every vector has a rest to draw from) and S >= 1; the others take
    neither. ``num_classes`` None: the ranges are checked later."""
    from pipeline.errors import UsageError

    if fmt in ("topk", "sampled") and k is None:
        raise UsageError(f"--format {fmt} needs --topk K (classes kept per vector, e.g. --topk 10"
                         f"{' --samples 10' if fmt == 'sampled' else ''})")
    if fmt not in ("topk", "sampled") and k is not None:
        raise UsageError(f"--topk applies to --format topk or sampled only, not {fmt}")
    if fmt == "sampled" and (samples is None or samples < 1):
        raise UsageError(f"--format sampled needs --samples S >= 1 (classes drawn per vector), got {samples}")
    if fmt != "sampled" and samples is not None:
        raise UsageError(f"--samples applies to --format sampled only, not {fmt}")
    if num_classes is None:
        return
    lo, hi = (1, num_classes) if fmt == "topk" else (0, num_classes - 2)
    if fmt in ("topk", "sampled") and not lo <= k <= hi:
        raise UsageError(f"--topk {k} out of range: {lo} <= K <= {hi} (--format {fmt}, {num_classes} classes)")
    if fmt in ("topk", "sampled"):
        size, dense = raw_bytes_per_vector(fmt, num_classes, k, samples), 2 * num_classes
        if size >= dense:  # a compact format that is not compact: said, not silently accepted
            import logging

            logging.getLogger(__name__).warning(
                "--format %s --topk %d%s stores %d B per vector, more than a dense fp16 vector of %d classes (%d B): "
                "use --format dense (or int8), or keep fewer classes", fmt, k,
                f" --samples {samples}" if fmt == "sampled" else "", size, num_classes, dense)
