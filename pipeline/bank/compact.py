"""Compact label-bank formats: encoding, targets at a temperature, fidelity, and reconstruction for the reader.

A compact bank has the same attrs and the same ``labels``/``views``/``skipped``/``done`` arrays as a dense one,
a ``format`` attr, no ``logits`` array, and the arrays listed in ``attrs['compact_arrays']`` instead
(:func:`pipeline.bank.schema.compact_array_specs`). It is written either directly by the dump
(``dump_logits --format topk|sampled|int8``, chunk by chunk, never a dense array) or by ``labels compact`` from a
dense bank; both encode every row chunk with :func:`encode_chunk`, starting from the logits rounded to the bank
dtype (what a dense bank stores), so the two paths give the same bytes.

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

from pipeline.bank import stats as st
from pipeline.bank.schema import COMPACT_FORMATS, TAIL_TEMPERATURES, compact_array_specs, index_dtype

FORMATS = COMPACT_FORMATS
TOPK_REST_FLOOR = 1e-30  # smallest probability given to a class in a T = 1 reconstruction (log = -69)
TAIL_EMPTY = float(np.finfo(np.float16).min)  # tail_lse of an empty tail (no class outside the kept ones)
FIDELITY_TEMPERATURES = (1.0, 2.0, 4.0)
FIDELITY_STATS = ("kl", "tv", "tail", "tail_dense")  # per temperature (see the module docstring)
# Fidelity is measured on every (len // 256)-th row of each chunk: a stride sample over a class-sorted manifest
# (standard error far below the digits reported), every row of small banks. On every row it was 28% of the
# compaction time.
FIDELITY_ROWS = 256
FIDELITY_WIDTH = 2 + len(FIDELITY_STATS) * len(FIDELITY_TEMPERATURES)  # [count, stats per T, top-1 agreements]
# Temperature of the importance-sampling proposal q ∝ p^(1/T_q) of ``sampled`` (on the grid, so that its
# normalizer exp(F(1/T_q)) is stored exactly): 1, the teacher's own distribution, as in Sparse Logit Sampling;
# the stored estimate at T = 1 then weighs every draw P_R / S. Proposals at 2-4 gave no lower error at T = 4 on a
# 100-class test (total variation of one bank's target, 5 + 5 classes).
SAMPLE_TEMPERATURE = 1.0
ENCODE_ELEMENTS = 1 << 24  # values encoded at once (64 MB of float32; encoding needs a few times that)


def tail_betas() -> np.ndarray:
    """Inverse temperatures ``1 / T_g`` of the stored tail statistics, in ``tail_lse`` order ([G] float64)."""
    return 1.0 / np.asarray(TAIL_TEMPERATURES, np.float64)


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


def _logsumexp(a: np.ndarray, axis: int = -1) -> np.ndarray:
    m = np.max(a, axis=axis, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    with np.errstate(divide="ignore"):
        return (m + np.log(np.sum(np.exp(a - m), axis=axis, keepdims=True)))[..., 0]


# --- top-k ------------------------------------------------------------------------------------------------
def _top_k(lp: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(indices [..., k] sorted by decreasing lp, their lp) of log-probabilities lp [..., C]."""
    c = lp.shape[-1]
    if k == 0:
        return np.zeros(lp.shape[:-1] + (0,), np.int64), np.zeros(lp.shape[:-1] + (0,), np.float32)
    part = np.argpartition(lp, c - k, axis=-1)[..., c - k:] if k < c else np.broadcast_to(np.arange(c), lp.shape).copy()
    vals = np.take_along_axis(lp, part, axis=-1)
    order = np.argsort(-vals, axis=-1, kind="stable")
    return np.take_along_axis(part, order, axis=-1), np.take_along_axis(vals, order, axis=-1)


def tail_stats(lp: np.ndarray, kept: np.ndarray) -> np.ndarray:
    """F(1/T_g) = log sum_{j not kept} exp(l_j / T_g) for every grid temperature: lp [..., C] float32
    log-probabilities at T = 1, kept [..., C] bool -> [..., G] float32 (:data:`TAIL_EMPTY` for an empty tail)."""
    rest = np.where(kept, -np.inf, lp)
    out = np.stack([_logsumexp(rest * np.float32(b)) for b in tail_betas()], axis=-1)
    return np.where(np.isfinite(out), np.maximum(out, TAIL_EMPTY), TAIL_EMPTY).astype(np.float32)


def _kept_mask(idx: np.ndarray, lab: np.ndarray, c: int) -> np.ndarray:
    kept = np.zeros(lab.shape + (c,), bool)
    np.put_along_axis(kept, idx.astype(np.int64), True, axis=-1)
    np.put_along_axis(kept, lab[..., None], True, axis=-1)
    return kept


def encode_topk(logits: np.ndarray, k: int, labels: np.ndarray) -> dict[str, np.ndarray]:
    """logits [..., C], labels [r] or [...] -> {topk_values [..., K] float16 log-probs sorted decreasing,
    topk_indices [..., K] int16/int32, target_logprob [...] float16 (the true class's log-prob),
    tail_lse [..., G] float16 (:func:`tail_stats`)}."""
    c = logits.shape[-1]
    x = logits.astype(np.float32, copy=False)
    finite = np.isfinite(x).all(axis=-1)
    if not finite.all():
        x = np.where(finite[..., None], x, 0.0).astype(np.float32)
    lp = _log_softmax(x)
    idx, vals = _top_k(lp, k)
    lab = _per_vector(labels, x.shape[:-1])
    target = np.take_along_axis(lp, lab[..., None], axis=-1)[..., 0]
    tail = tail_stats(lp, _kept_mask(idx, lab, c))
    out = {"topk_values": vals.astype(np.float16), "topk_indices": idx.astype(index_dtype(c)),
           "target_logprob": target.astype(np.float16), "tail_lse": tail.astype(np.float16)}
    for name in ("topk_values", "target_logprob", "tail_lse"):
        out[name][~finite] = np.nan
    out["_lp"], out["_x"] = lp, x  # for encode_sampled (dropped by encode)
    return out


# --- sampled (Sparse Logit Sampling) ----------------------------------------------------------------------
_M1, _M2, _GOLD = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB), np.uint64(0x9E3779B97F4A7C15)


def _mix(z: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer on uint64 (wrapping arithmetic)."""
    z = z + _GOLD
    z = (z ^ (z >> np.uint64(30))) * _M1
    z = (z ^ (z >> np.uint64(27))) * _M2
    return z ^ (z >> np.uint64(31))


def sample_uniforms(seed: int, rows: np.ndarray, t: int, v: int, s: int) -> np.ndarray:
    """Uniforms in [0, 1) for draws (row, teacher, view, draw) -> [len(rows), t, v, s] float64: a hash of the
    seed, the bank row and the position, so that every writer of a row draws the same classes."""
    with np.errstate(over="ignore"):
        base = _mix(_mix(np.uint64(seed)) + np.asarray(rows, np.uint64))[:, None, None, None]
        lin = np.arange(t * v * s, dtype=np.uint64).reshape(1, t, v, s)
        z = _mix(base ^ _mix(lin))
    return (z >> np.uint64(11)).astype(np.float64) * 2.0 ** -53


def _draw(lp: np.ndarray, kept: np.ndarray, u: np.ndarray, tq: float) -> np.ndarray:
    """Classes drawn from softmax(lp / tq) restricted to ~kept by inverse CDF: lp [n, C], kept [n, C], u [n, S]
    -> [n, S] int64 (the first kept class where nothing is left to draw)."""
    n, c = lp.shape
    rest = np.where(kept, -np.inf, lp.astype(np.float64) / tq)
    top = rest.max(axis=1, keepdims=True)
    p = np.exp(rest - np.where(np.isfinite(top), top, 0.0))  # proposal q up to its sum (no underflow)
    cdf = np.cumsum(p, axis=1)
    total = cdf[:, -1:]
    offs = np.arange(n, dtype=np.float64)[:, None]
    pos = np.searchsorted((cdf / np.where(total > 0, total, 1.0) + offs).ravel(), (u + offs).ravel(), side="right")
    cls = np.minimum(pos.reshape(n, -1) - np.arange(n)[:, None] * c, c - 1)
    return np.where(total > 0, cls, np.argmax(kept, axis=1)[:, None])


def encode_sampled(logits: np.ndarray, k: int, s: int, labels: np.ndarray, seed: int, rows: np.ndarray,
                   tq: float = SAMPLE_TEMPERATURE) -> dict[str, np.ndarray]:
    """logits [r, T, V, C] of bank rows ``rows`` [r] -> the top-k arrays plus ``sample_indices`` [r, T, V, S]
    (sorted), ``sample_logprob`` [r, T, V, S] float16, ``logsumexp`` [r, T, V] float32."""
    out = encode_topk(logits, k, labels)
    lp, x = out.pop("_lp"), out.pop("_x")
    r, t, v, c = lp.shape
    lab = _per_vector(labels, lp.shape[:-1])
    kept = _kept_mask(out["topk_indices"], lab, c).reshape(-1, c)
    u = sample_uniforms(seed, rows, t, v, s).reshape(-1, s)
    cls = np.sort(_draw(lp.reshape(-1, c), kept, u, tq), axis=1)
    slp = np.take_along_axis(lp.reshape(-1, c), cls, axis=1)
    finite = np.isfinite(out["target_logprob"]).reshape(-1)
    slp[~finite] = np.nan
    out["sample_indices"] = cls.reshape(r, t, v, s).astype(index_dtype(c))
    out["sample_logprob"] = slp.reshape(r, t, v, s).astype(np.float16)
    lse = _logsumexp(x).astype(np.float32)
    lse[~finite.reshape(r, t, v)] = np.nan
    out["logsumexp"] = lse
    return out


# --- targets at a temperature (numpy; stage 2's torch version: kd_losses.targets) ----------------------------
def tail_log_partition(tail_lse: np.ndarray, count: np.ndarray, beta: float) -> np.ndarray:
    """F(beta) from the stored grid: tail_lse [..., G], count [...] (m) -> [...] float64; exact on the grid,
    linear in beta between grid points (F(0) = log m), extrapolated from the last segment above beta = 1;
    -inf for an empty tail."""
    b = tail_betas()
    order = np.argsort(b)
    with np.errstate(divide="ignore"):
        xs = np.concatenate([[0.0], b[order]])
        ys = np.concatenate([np.log(np.maximum(count, 0.0))[..., None].astype(np.float64),
                             tail_lse.astype(np.float64)[..., order]], axis=-1)
    i = int(np.clip(np.searchsorted(xs, beta, side="right") - 1, 0, len(xs) - 2))
    w = (beta - xs[i]) / (xs[i + 1] - xs[i])
    f = ys[..., i] * (1.0 - w) + ys[..., i + 1] * w if w != 0.0 else ys[..., i]
    empty = (count <= 0) | (tail_lse[..., 0] <= TAIL_EMPTY)
    return np.where(empty, -np.inf, f)


def target_probs(arrays: dict[str, np.ndarray], fmt: str, labels: np.ndarray, c: int,
                 tau: float, tq: float = SAMPLE_TEMPERATURE) -> tuple[np.ndarray, np.ndarray]:
    """The target stage 2 builds at temperature ``tau``, densified: (probs [..., C] float64, stored [..., C] bool:
    classes the target knows one by one). ``topk``: kept classes exact, the tail bucket spread evenly over its
    classes; ``sampled``: the importance-sampling estimate (zero on unsampled classes); ``int8``: the decoded
    softmax. Rows of skipped samples are NaN."""
    if fmt == "int8":
        z = decode_int8(arrays["q"], arrays["scale"]).astype(np.float64) / tau
        p = np.exp(z - _logsumexp(z)[..., None])
        return p, np.ones(p.shape, bool)
    vals = arrays["topk_values"].astype(np.float64)
    idx = arrays["topk_indices"].astype(np.int64)
    lp_y = arrays["target_logprob"].astype(np.float64)
    lab = _per_vector(labels, lp_y.shape)
    in_top = (idx == lab[..., None]).any(axis=-1)
    kept = _kept_mask(np.maximum(idx, 0), lab, c)
    count = (c - vals.shape[-1] - (~in_top)).astype(np.float64)
    f = tail_log_partition(arrays["tail_lse"], count, 1.0 / tau)
    kept_terms = np.concatenate([vals / tau, np.where(in_top, -np.inf, lp_y / tau)[..., None]], axis=-1)
    with np.errstate(invalid="ignore"):
        log_z = np.logaddexp(_logsumexp(kept_terms), f)
        p = np.zeros(lp_y.shape + (c,))
        if fmt == "topk":
            p += np.exp(f - np.log(np.maximum(count, 1.0)) - log_z)[..., None]
        np.put_along_axis(p, lab[..., None], np.exp(lp_y / tau - log_z)[..., None], axis=-1)
        np.put_along_axis(p, np.maximum(idx, 0), np.exp(vals / tau - log_z[..., None]), axis=-1)
        stored = kept
        if fmt == "sampled":
            sidx = arrays["sample_indices"].astype(np.int64)
            slp = arrays["sample_logprob"].astype(np.float64)
            s = sidx.shape[-1]
            rel = slp * (1.0 / tau - 1.0 / tq)  # self-normalized: the draws share the exact tail mass at tau
            w = np.exp((f - log_z)[..., None] + rel - _logsumexp(rel)[..., None])
            flat = p.reshape(-1, c)
            np.add.at(flat, (np.repeat(np.arange(len(flat)), s), sidx.reshape(-1)), w.reshape(-1))
            p = flat.reshape(p.shape)
            stored = kept.copy()
            np.put_along_axis(stored, sidx, True, axis=-1)
    bad = ~(np.isfinite(vals).all(axis=-1) & np.isfinite(lp_y))
    p[bad] = np.nan
    return p, stored


def topk_fill(values: np.ndarray, indices: np.ndarray, target: np.ndarray, labels: np.ndarray,
              num_classes: int, tail_lse: np.ndarray | None = None) -> np.ndarray:
    """The T = 1 log-probability of every non-kept class ([...] float32; NaN for a non-finite vector): the tail's
    mass at T = 1 (``tail_lse``'s F(1)) over its m classes; without ``tail_lse`` (the old ``uniform`` layout) one
    minus the kept mass, capped at the smallest top-K probability. Floored at :data:`TOPK_REST_FLOOR`."""
    lp_k = values.astype(np.float32)
    lp_t = target.astype(np.float32)
    lab = _per_vector(labels, lp_t.shape)
    k = lp_k.shape[-1]
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        in_top = (indices == lab[..., None]).any(axis=-1)
        n = np.maximum((num_classes - k - (~in_top)).astype(np.float32), 1.0)
        if tail_lse is not None:
            rest = np.exp(tail_lse[..., 0].astype(np.float32)) / n
        else:
            p_k = np.exp(lp_k)
            mass = p_k.sum(axis=-1) + np.where(in_top, np.float32(0.0), np.exp(lp_t))
            rest = np.minimum(np.maximum(1.0 - mass, TOPK_REST_FLOOR * n) / n, p_k.min(axis=-1, initial=1.0))
        fill = np.log(np.maximum(rest, np.float32(TOPK_REST_FLOOR))).astype(np.float32)
    fill[~(np.isfinite(lp_k).all(axis=-1) & np.isfinite(lp_t))] = np.nan
    return fill


def decode_topk(values: np.ndarray, indices: np.ndarray, target: np.ndarray, labels: np.ndarray,
                num_classes: int, tail_lse: np.ndarray | None = None) -> np.ndarray:
    """Logits at T = 1 [..., C] float32 (log-probabilities): the kept classes exact, the rest
    :func:`topk_fill`. Right at T = 1 only (see the module docstring)."""
    fill = topk_fill(values, indices, target, labels, num_classes, tail_lse)
    lab = _per_vector(labels, fill.shape)
    lp_k, lp_t = values.astype(np.float32), target.astype(np.float32)
    out = np.repeat(fill[..., None], num_classes, axis=-1)
    np.put_along_axis(out, lab[..., None], lp_t[..., None], axis=-1)
    np.put_along_axis(out, np.maximum(indices.astype(np.int64), 0), lp_k, axis=-1)
    return out


def sampled_fill(arrays: dict[str, np.ndarray], labels: np.ndarray, num_classes: int) -> np.ndarray:
    """The T = 1 log-probability of every class a sampled vector stores neither kept nor drawn ([...] float32):
    the tail's mass (``exp(F(1))``) minus the drawn classes', over the classes never drawn."""
    sidx = arrays["sample_indices"].astype(np.int64)
    slp = arrays["sample_logprob"].astype(np.float32)
    lp_t = arrays["target_logprob"]
    lab = _per_vector(labels, lp_t.shape)
    c = num_classes
    stored = _kept_mask(np.concatenate([np.maximum(arrays["topk_indices"].astype(np.int64), 0), sidx], -1), lab, c)
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        drawn = np.zeros(stored.shape, np.float32)
        np.put_along_axis(drawn, sidx, np.exp(slp), axis=-1)
        n_rest = (~stored).sum(axis=-1).astype(np.float32)
        tail = np.exp(arrays["tail_lse"][..., 0].astype(np.float32))
        rest = np.maximum(tail - drawn.sum(axis=-1), TOPK_REST_FLOOR * n_rest) / np.maximum(n_rest, 1.0)
        fill = np.log(np.maximum(rest, TOPK_REST_FLOOR)).astype(np.float32)
    bad = ~(np.isfinite(arrays["topk_values"]).all(axis=-1) & np.isfinite(lp_t))
    fill[bad] = np.nan
    return fill


def decode_sampled(arrays: dict[str, np.ndarray], labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Logits at T = 1 [..., C] float32 of a sampled bank: every stored class (kept and drawn) exact, the rest
    :func:`sampled_fill`."""
    out = decode_topk(arrays["topk_values"], arrays["topk_indices"], arrays["target_logprob"], labels, num_classes,
                      arrays["tail_lse"])
    fill = sampled_fill(arrays, labels, num_classes)
    sidx = arrays["sample_indices"].astype(np.int64)
    lab = _per_vector(labels, fill.shape)
    stored = _kept_mask(np.maximum(arrays["topk_indices"].astype(np.int64), 0), lab, num_classes)
    out = np.where(stored, out, fill[..., None]).astype(np.float32)
    np.put_along_axis(out, sidx, arrays["sample_logprob"].astype(np.float32), axis=-1)
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
def encode(logits: np.ndarray, fmt: str, k: int | None, labels: np.ndarray, samples: int | None = None,
           seed: int = 0, rows: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """logits [r, T, V, C] (labels [r]; ``rows`` [r]: their bank rows, which seed a sampled bank's draws) ->
    {array name: stored array} of ``fmt``."""
    if fmt == "topk":
        out = encode_topk(logits, int(k), labels)
        del out["_lp"], out["_x"]
        return out
    if fmt == "sampled":
        rows = np.arange(len(logits)) if rows is None else rows
        return encode_sampled(logits, int(k), int(samples), labels, seed, rows)
    if fmt == "int8":
        q, s = encode_int8(logits)
        return {"q": q, "scale": s}
    raise ValueError(f"unknown compact format {fmt!r}")


def decode(arrays: dict[str, np.ndarray], fmt: str, num_classes: int, labels: np.ndarray) -> np.ndarray:
    """Stored arrays -> logits at T = 1 [r, T, V, C] float32 (the reader's reconstruction)."""
    if fmt == "topk":
        return decode_topk(arrays["topk_values"], arrays["topk_indices"], arrays["target_logprob"], labels,
                           num_classes, arrays.get("tail_lse"))
    if fmt == "sampled":
        return decode_sampled(arrays, labels, num_classes)
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
                 dtype: str = "float32", *, samples: int | None = None, seed: int = 0,
                 start: int = 0) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Encode one row chunk and measure it: the one encoding of both the dump and ``labels compact``.

    x [r, T, V, C]: the chunk's logits (NaN rows for skipped samples), rounded here to the bank ``dtype`` (what a
    dense bank stores) before encoding; labels [r]; skipped [r]; ``start``: the bank row of x[0] (a sampled
    bank's draws are seeded by row); ``samples``/``seed``: S and the seed of ``sampled``. Returns ({array name:
    stored array}, sums [W] float64 laid out as :func:`sums_layout`). Rows are encoded in blocks of at most
    :data:`ENCODE_ELEMENTS` values (every operation is per vector, so the blocks change no value; they bound the
    temporaries of a chunk with many views: a 4096-row chunk of 100 views x 1000 classes is 1.6 GB in float32).
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
        arrays = encode(xb, fmt, k, lb, samples, seed, np.arange(start + s, start + e))
        first = -s % step  # the chunk's fidelity sample: rows 0, step, 2 step, ... of the chunk
        sample = {n: a[first::step] for n, a in arrays.items()}
        view0 = decode({n: a[:, :, :1] for n, a in arrays.items()}, fmt, c, lb)
        sums[slice(*lay["fidelity"])] += fidelity_sums(
            xb[first::step], lambda tau: target_probs(sample, fmt, lb[first::step], c, tau), kl=fmt != "sampled")
        sums[slice(*lay["source_metrics"])] += st.metric_states(xb, lb, sb)
        sums[slice(*lay["metrics"])] += st.metric_states(view0, lb, sb)
        parts.append(arrays)
    return {n: np.concatenate([p[n] for p in parts]) for n in parts[0]}, sums


# --- fidelity -----------------------------------------------------------------------------------------------
def fidelity_sums(source: np.ndarray, target, kl: bool = True) -> np.ndarray:
    """[count, (sum KL, sum TV, sum tail share, sum dense tail share) at each of FIDELITY_TEMPERATURES, sum top-1
    agreement] over the finite vectors of ``source`` [..., C] (the teacher's logits).

    ``target(tau) -> (probs [..., C], stored [..., C] bool)``: the target stage 2 builds at temperature tau
    (:func:`target_probs`); the tail is the classes not stored one by one. ``kl=False``: the KL sums are 0 (a
    sampled target is zero on unsampled classes). Top-1 agreement: argmax of the T = 1 target vs the teacher's.
    """
    c = source.shape[-1]
    x = source.reshape(-1, c).astype(np.float64)
    keep = np.isfinite(x).all(axis=1)
    out = [0.0] * FIDELITY_WIDTH
    for i, tau in enumerate(FIDELITY_TEMPERATURES):
        q, stored = (a.reshape(-1, c) for a in target(tau))
        ok = keep & np.isfinite(q).all(axis=1)
        z = x[ok] / tau
        lp = z - _logsumexp(z)[:, None]
        p, q, tail = np.exp(lp), q[ok], ~stored[ok]
        with np.errstate(divide="ignore", invalid="ignore"):
            kls = np.where(p > 0, p * (lp - np.log(np.maximum(q, 1e-300))), 0.0).sum(axis=1)
        base = 1 + len(FIDELITY_STATS) * i
        out[base:base + 4] = [float(np.maximum(kls, 0.0).sum()) if kl else 0.0,
                              float(0.5 * np.abs(p - q).sum()), float(np.where(tail, q, 0.0).sum()),
                              float(np.where(tail, p, 0.0).sum())]
        if tau == 1.0:
            out[0] = float(ok.sum())
            out[-1] = float((p.argmax(axis=1) == q.argmax(axis=1)).sum())
    return np.asarray(out, np.float64)


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


def format_fidelity(f: dict) -> str:
    """One line per temperature: ``T=4: KL 0.0712  TV 0.031  tail 0.42 (teacher 0.42)``, then the top-1
    agreement; older banks' attrs may lack entries."""
    parts = []
    for tau in FIDELITY_TEMPERATURES:
        t = f"{tau:g}"
        items = [f"{name} {f[key]:.3g}" for name, key in (("KL", f"kl_t{t}"), ("TV", f"tv_t{t}")) if key in f]
        if f"tail_t{t}" in f:
            items.append(f"tail {f[f'tail_t{t}']:.3g} (teacher {f[f'tail_dense_t{t}']:.3g})")
        if items:
            parts.append(f"T={t}: " + "  ".join(items))
    return "; ".join(parts) + f"; top-1 agreement {f['top1_agreement']:.4f}  ({f.get('vectors', 0):,} vectors)"


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
