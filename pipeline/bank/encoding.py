"""The one encoder of the compact formats (top-k, sampled, int8), in torch, on the device of the logits.

Stage 1 calls it on the device tensors of each teacher batch, so only the compact payload crosses to the host;
``labels compact``, ``labels plan`` and the numpy API of :mod:`pipeline.bank.compact` call it on CPU tensors
(thin wrappers: the math lives here only). Every value is computed per vector (one (sample, teacher, view)), so
a batch gives the bytes its rows give in a whole chunk: a compact dump is bit for bit ``labels compact`` of the
dense dump on the same device (see :mod:`pipeline.bank.compact` for the formats and the notation: l the
log-probabilities at T = 1, kept = top K + the true class, F(beta) the tail's log-partition).

What a chunk stores besides its payload (``chunk_sums``) is reduced on the host from small per-row records
computed here (:func:`metric_rows`, :func:`fidelity_rows`), in row order, so the sums do not depend on how the
rows were batched (a resumed dump, another batch size and ``labels compact`` store the same bytes).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from pipeline.bank.schema import TAIL_TEMPERATURES, index_dtype

TOPK_REST_FLOOR = 1e-30  # smallest probability given to a class in a T = 1 reconstruction (log = -69)
TAIL_EMPTY = float(np.finfo(np.float16).min)  # tail_lse of an empty tail (no class outside the kept ones)
FIDELITY_TEMPERATURES = (1.0, 2.0, 4.0)
FIDELITY_STATS = ("kl", "tv", "tail", "tail_dense")  # per temperature (see pipeline.bank.compact)
FIDELITY_WIDTH = 2 + len(FIDELITY_STATS) * len(FIDELITY_TEMPERATURES)  # [count, stats per T, top-1 agreements]
SAMPLE_TEMPERATURE = 1.0  # temperature of the importance-sampling proposal (pipeline.bank.compact)
NUM_BINS = 15  # calibration bins (pipeline.metrics.MetricAccumulator's default)
METRIC_COLUMNS = ("valid", "correct1", "correct5", "nll", "conf", "bin")  # per row and entry (metric_rows)

_TORCH_INDEX = {np.dtype(np.int16): torch.int16, np.dtype(np.int32): torch.int32}


def tail_betas() -> np.ndarray:
    """Inverse temperatures ``1 / T_g`` of the stored tail statistics, in ``tail_lse`` order ([G] float64)."""
    return 1.0 / np.asarray(TAIL_TEMPERATURES, np.float64)


def _lse(a: torch.Tensor) -> torch.Tensor:
    """log sum exp over the last axis, -inf for an all -inf vector (no NaN)."""
    m = a.amax(-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    return (m + torch.log(torch.exp(a - m).sum(-1, keepdim=True)))[..., 0]


def _finite_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(x with non-finite vectors zeroed, finite [...] bool) of x [..., C] float32."""
    finite = torch.isfinite(x).all(-1)
    return torch.where(finite[..., None], x, torch.zeros_like(x)), finite


def per_vector(labels: torch.Tensor, shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
    """Labels [r] (one per sample) or shape-shaped -> int64 broadcast to ``shape`` (= x.shape[:-1])."""
    lab = labels.long()
    return lab.reshape(lab.shape + (1,) * (len(shape) - lab.ndim)).expand(shape)


def kept_mask(idx: torch.Tensor, lab: torch.Tensor, c: int) -> torch.Tensor:
    """[..., C] bool: the classes ``idx`` [..., K] and the true class ``lab`` [...]."""
    kept = torch.zeros(lab.shape + (c,), dtype=torch.bool, device=lab.device)
    kept.scatter_(-1, idx.long().clamp(min=0), True)
    return kept.scatter_(-1, lab[..., None], True)


def tail_stats(lp: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """F(1/T_g) = log sum_{j not kept} exp(l_j / T_g) for every grid temperature: lp [..., C] float32
    log-probabilities at T = 1, kept [..., C] bool -> [..., G] float32 (:data:`TAIL_EMPTY` for an empty tail)."""
    rest = lp.masked_fill(kept, -math.inf)
    out = torch.stack([_lse(rest * float(np.float32(b))) for b in tail_betas()], -1)
    return torch.where(torch.isfinite(out), out.clamp(min=TAIL_EMPTY), torch.full_like(out, TAIL_EMPTY))


def encode_topk(x: torch.Tensor, k: int, labels: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """x [..., C] float32 logits, labels [r] or [...] -> ({topk_values [..., K] float16 log-probs sorted
    decreasing, topk_indices [..., K] int16/int32, target_logprob [...] float16, tail_lse [..., G] float16},
    log-probabilities [..., C] float32). Non-finite vectors: NaN values."""
    c = x.shape[-1]
    x, finite = _finite_rows(x.float())
    lp = torch.log_softmax(x, -1)
    vals, idx = torch.topk(lp, k, dim=-1, largest=True, sorted=True)
    lab = per_vector(labels.to(x.device), x.shape[:-1])
    target = lp.gather(-1, lab[..., None])[..., 0]
    tail = tail_stats(lp, kept_mask(idx, lab, c))
    nan = ~finite
    out = {"topk_values": vals.half().masked_fill(nan[..., None], math.nan),
           "topk_indices": idx.to(_TORCH_INDEX[np.dtype(index_dtype(c))]),
           "target_logprob": target.half().masked_fill(nan, math.nan),
           "tail_lse": tail.half().masked_fill(nan[..., None], math.nan)}
    return out, lp


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
    seed, the bank row and the position, so that every writer of a row draws the same classes (computed on the
    host: a few integers per row, and torch has no unsigned 64-bit arithmetic)."""
    with np.errstate(over="ignore"):
        base = _mix(_mix(np.uint64(seed)) + np.asarray(rows, np.uint64))[:, None, None, None]
        lin = np.arange(t * v * s, dtype=np.uint64).reshape(1, t, v, s)
        z = _mix(base ^ _mix(lin))
    return (z >> np.uint64(11)).astype(np.float64) * 2.0 ** -53


def draw(lp: torch.Tensor, kept: torch.Tensor, u: torch.Tensor, tq: float) -> torch.Tensor:
    """Classes drawn from softmax(lp / tq) restricted to ~kept by inverse CDF: lp [n, C], kept [n, C], u [n, S]
    float64 -> [n, S] int64 (the first kept class where nothing is left to draw)."""
    c = lp.shape[1]
    rest = torch.where(kept, -math.inf, lp.double() / tq)
    top = rest.amax(1, keepdim=True)
    p = torch.exp(rest - torch.where(torch.isfinite(top), top, torch.zeros_like(top)))
    cdf = torch.cumsum(p, 1)
    total = cdf[:, -1:]
    cdf = cdf / torch.where(total > 0, total, torch.ones_like(total))
    cls = torch.searchsorted(cdf, u.contiguous(), right=True).clamp(max=c - 1)
    return torch.where(total > 0, cls, kept.int().argmax(1, keepdim=True))


def encode_sampled(x: torch.Tensor, k: int, s: int, labels: torch.Tensor, seed: int, rows: np.ndarray,
                   tq: float = SAMPLE_TEMPERATURE) -> dict[str, torch.Tensor]:
    """x [r, T, V, C] float32 logits of bank rows ``rows`` [r] -> the top-k arrays plus ``sample_indices``
    [r, T, V, S] (sorted), ``sample_logprob`` [r, T, V, S] float16, ``logsumexp`` [r, T, V] float32."""
    out, lp = encode_topk(x, k, labels)
    r, t, v, c = lp.shape
    lab = per_vector(labels.to(x.device), lp.shape[:-1])
    kept = kept_mask(out["topk_indices"], lab, c).reshape(-1, c)
    u = torch.from_numpy(sample_uniforms(seed, rows, t, v, s).reshape(-1, s)).to(x.device)
    cls = draw(lp.reshape(-1, c), kept, u, tq).sort(1).values
    nan = ~torch.isfinite(out["target_logprob"]).reshape(-1)
    slp = lp.reshape(-1, c).gather(1, cls).masked_fill(nan[:, None], math.nan)
    z, _ = _finite_rows(x.float())
    lse = _lse(z).masked_fill(nan.reshape(r, t, v), math.nan)
    out.update({"sample_indices": cls.reshape(r, t, v, s).to(out["topk_indices"].dtype),
                "sample_logprob": slp.reshape(r, t, v, s).half(), "logsumexp": lse})
    return out


# --- int8 -------------------------------------------------------------------------------------------------
def encode_int8(x: torch.Tensor) -> dict[str, torch.Tensor]:
    """x [..., C] -> {q [..., C] int8, scale [...] float16} (max-shifted logits, a per-vector step; the argmax
    kept: see :mod:`pipeline.bank.compact`)."""
    z, finite = _finite_rows(x.float())
    z = z - z.amax(-1, keepdim=True)
    scale = (-z.amin(-1) / 255.0).half()
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # constant vector: any step
    q = torch.round(-z / scale.float()[..., None]).clamp(0, 255)
    q = torch.where((q == 0) & (z < 0), torch.ones_like(q), q) - 128
    return {"q": q.to(torch.int8), "scale": scale.masked_fill(~finite, math.nan)}


def encode(x: torch.Tensor, fmt: str, k: int | None, labels: torch.Tensor, samples: int | None = None,
           seed: int = 0, rows: np.ndarray | None = None) -> dict[str, torch.Tensor]:
    """x [r, T, V, C] float32 on any device (labels [r]; ``rows`` [r]: their bank rows, which seed a sampled
    bank's draws) -> {array name: stored array} of ``fmt``, on x's device."""
    if fmt == "topk":
        return encode_topk(x, int(k), labels)[0]
    if fmt == "sampled":
        rows = np.arange(len(x)) if rows is None else rows
        return encode_sampled(x, int(k), int(samples), labels, seed, rows)
    if fmt == "int8":
        return encode_int8(x)
    raise ValueError(f"unknown compact format {fmt!r}")


# --- decoding (the T = 1 reconstruction) ---------------------------------------------------------------------
def topk_fill(values: torch.Tensor, indices: torch.Tensor, target: torch.Tensor, labels: torch.Tensor,
              num_classes: int, tail_lse: torch.Tensor | None = None) -> torch.Tensor:
    """The T = 1 log-probability of every non-kept class ([...] float32; NaN for a non-finite vector): the tail's
    mass at T = 1 (``tail_lse``'s F(1)) over its m classes; without ``tail_lse`` (the old ``uniform`` layout) one
    minus the kept mass, capped at the smallest top-K probability. Floored at :data:`TOPK_REST_FLOOR`."""
    lp_k, lp_t = values.float(), target.float()
    lab = per_vector(labels.to(values.device), lp_t.shape)
    k = lp_k.shape[-1]
    in_top = (indices.long() == lab[..., None]).any(-1)
    n = (num_classes - k - (~in_top).long()).float().clamp(min=1.0)
    if tail_lse is not None:
        rest = torch.exp(tail_lse[..., 0].float()) / n
    else:
        p_k = torch.exp(lp_k)
        mass = p_k.sum(-1) + torch.where(in_top, torch.zeros_like(lp_t), torch.exp(lp_t))
        low = p_k.amin(-1).clamp(max=1.0) if k else torch.ones_like(lp_t)
        rest = torch.minimum(torch.maximum(1.0 - mass, TOPK_REST_FLOOR * n) / n, low)
    fill = torch.log(rest.clamp(min=float(np.float32(TOPK_REST_FLOOR))))
    bad = ~(torch.isfinite(lp_k).all(-1) & torch.isfinite(lp_t))
    return fill.masked_fill(bad, math.nan)


def decode_topk(values: torch.Tensor, indices: torch.Tensor, target: torch.Tensor, labels: torch.Tensor,
                num_classes: int, tail_lse: torch.Tensor | None = None) -> torch.Tensor:
    """Logits at T = 1 [..., C] float32 (log-probabilities): the kept classes exact, the rest :func:`topk_fill`."""
    fill = topk_fill(values, indices, target, labels, num_classes, tail_lse)
    lab = per_vector(labels.to(values.device), fill.shape)
    out = fill[..., None].expand(fill.shape + (num_classes,)).clone()
    out.scatter_(-1, lab[..., None], target.float()[..., None])
    return out.scatter_(-1, indices.long().clamp(min=0), values.float())


def sampled_fill(arrays: dict[str, torch.Tensor], labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """The T = 1 log-probability of every class a sampled vector stores neither kept nor drawn ([...] float32):
    the tail's mass (``exp(F(1))``) minus the drawn classes', over the classes never drawn."""
    sidx = arrays["sample_indices"].long()
    lp_t = arrays["target_logprob"]
    lab = per_vector(labels.to(lp_t.device), lp_t.shape)
    stored = kept_mask(torch.cat([arrays["topk_indices"].long().clamp(min=0), sidx], -1), lab, num_classes)
    drawn = torch.zeros(stored.shape, dtype=torch.float32, device=lp_t.device)
    drawn.scatter_(-1, sidx, torch.exp(arrays["sample_logprob"].float()))
    n_rest = (~stored).sum(-1).float()
    tail = torch.exp(arrays["tail_lse"][..., 0].float())
    rest = torch.maximum(tail - drawn.sum(-1), TOPK_REST_FLOOR * n_rest) / n_rest.clamp(min=1.0)
    fill = torch.log(rest.clamp(min=float(np.float32(TOPK_REST_FLOOR))))
    bad = ~(torch.isfinite(arrays["topk_values"].float()).all(-1) & torch.isfinite(lp_t.float()))
    return fill.masked_fill(bad, math.nan)


def decode_sampled(arrays: dict[str, torch.Tensor], labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Logits at T = 1 [..., C] float32 of a sampled bank: every stored class exact, the rest :func:`sampled_fill`."""
    out = decode_topk(arrays["topk_values"], arrays["topk_indices"], arrays["target_logprob"], labels, num_classes,
                      arrays["tail_lse"])
    fill = sampled_fill(arrays, labels, num_classes)
    lab = per_vector(labels.to(fill.device), fill.shape)
    stored = kept_mask(arrays["topk_indices"].long().clamp(min=0), lab, num_classes)
    out = torch.where(stored, out, fill[..., None])
    return out.scatter_(-1, arrays["sample_indices"].long(), arrays["sample_logprob"].float())


def decode_int8(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """(q [..., C] int8, scale [...] float16) -> logits [..., C] float32 (max-shifted logits)."""
    return -(q.float() + 128.0) * scale.float()[..., None]


def decode(arrays: dict[str, torch.Tensor], fmt: str, num_classes: int, labels: torch.Tensor | None) -> torch.Tensor:
    """Stored arrays -> logits at T = 1 [r, T, V, C] float32 (the reader's reconstruction)."""
    if fmt == "topk":
        return decode_topk(arrays["topk_values"], arrays["topk_indices"], arrays["target_logprob"], labels,
                           num_classes, arrays.get("tail_lse"))
    if fmt == "sampled":
        return decode_sampled(arrays, labels, num_classes)
    if fmt == "int8":
        return decode_int8(arrays["q"], arrays["scale"])
    raise ValueError(f"unknown compact format {fmt!r}")


# --- targets at a temperature, fidelity -------------------------------------------------------------------------
def tail_log_partition(tail_lse: torch.Tensor, count: torch.Tensor, beta: float) -> torch.Tensor:
    """F(beta) from the stored grid: tail_lse [..., G], count [...] (m) -> [...] float64; exact on the grid,
    linear in beta between grid points (F(0) = log m), extrapolated from the last segment above beta = 1;
    -inf for an empty tail."""
    b = tail_betas()
    order = np.argsort(b)
    xs = np.concatenate([[0.0], b[order]])
    ys = torch.cat([torch.log(count.double().clamp(min=0.0))[..., None],
                    tail_lse.double()[..., torch.from_numpy(order).to(tail_lse.device)]], -1)
    i = int(np.clip(np.searchsorted(xs, beta, side="right") - 1, 0, len(xs) - 2))
    w = (beta - xs[i]) / (xs[i + 1] - xs[i])
    f = ys[..., i] * (1.0 - w) + ys[..., i + 1] * w if w != 0.0 else ys[..., i]
    empty = (count <= 0) | (tail_lse[..., 0].float() <= TAIL_EMPTY)
    return f.masked_fill(empty, -math.inf)


def target_probs(arrays: dict[str, torch.Tensor], fmt: str, labels: torch.Tensor, c: int,
                 tau: float | tuple[float, ...], tq: float = SAMPLE_TEMPERATURE) -> tuple[torch.Tensor, torch.Tensor]:
    """The target stage 2 builds at temperature ``tau``, densified: (probs [..., C] float64, stored [..., C] bool:
    classes the target knows one by one). ``topk``: kept classes exact, the tail bucket spread evenly over its
    classes; ``sampled``: the self-normalized importance-sampling estimate (zero on unsampled classes);
    ``int8``: the decoded softmax. Vectors of skipped samples are NaN. A tuple of temperatures gives probs
    [len(tau), ..., C] (one pass for all of them)."""
    many = isinstance(tau, (tuple, list))
    taus = list(tau) if many else [tau]
    if fmt == "int8":
        z = decode_int8(arrays["q"], arrays["scale"]).double()
        z = z / torch.tensor(taus, dtype=torch.float64, device=z.device).reshape((-1,) + (1,) * z.dim())
        p = torch.exp(z - _lse(z)[..., None])
        return (p if many else p[0]), torch.ones(p.shape[1:], dtype=torch.bool, device=p.device)
    vals, idx = arrays["topk_values"].double(), arrays["topk_indices"].long()
    lp_y = arrays["target_logprob"].double()
    lab = per_vector(labels.to(vals.device), lp_y.shape)
    in_top = (idx == lab[..., None]).any(-1)
    stored = kept_mask(idx.clamp(min=0), lab, c)
    count = (c - vals.shape[-1] - (~in_top).long()).double()
    f = torch.stack([tail_log_partition(arrays["tail_lse"], count, 1.0 / t) for t in taus])  # [n_tau, ...]
    tv = torch.tensor(taus, dtype=torch.float64, device=vals.device).reshape((-1,) + (1,) * lp_y.dim())
    kept_terms = torch.cat([vals / tv[..., None], torch.where(in_top, -math.inf, lp_y / tv)[..., None]], -1)
    log_z = torch.logaddexp(_lse(kept_terms), f)
    p = torch.zeros((len(taus),) + lp_y.shape + (c,), dtype=torch.float64, device=vals.device)
    if fmt == "topk":
        p += torch.exp(f - torch.log(count.clamp(min=1.0)) - log_z)[..., None]
    p.scatter_(-1, lab[..., None].expand(p.shape[:-1] + (1,)), torch.exp(lp_y / tv - log_z)[..., None])
    p.scatter_(-1, idx.clamp(min=0).expand(p.shape[:-1] + idx.shape[-1:]), torch.exp(vals / tv[..., None] - log_z[..., None]))
    if fmt == "sampled":
        sidx, slp = arrays["sample_indices"].long(), arrays["sample_logprob"].double()
        rel = slp * (1.0 / tv[..., None] - 1.0 / tq)  # self-normalized: the draws share the exact tail mass at tau
        p.scatter_add_(-1, sidx.expand(p.shape[:-1] + sidx.shape[-1:]),
                       torch.exp((f - log_z)[..., None] + rel - _lse(rel)[..., None]))
        stored = stored.scatter(-1, sidx, True)
    bad = ~(torch.isfinite(vals).all(-1) & torch.isfinite(lp_y))
    p = p.masked_fill(bad[..., None], math.nan)
    return (p if many else p[0]), stored


def fidelity_rows(source: torch.Tensor, arrays: dict[str, torch.Tensor], fmt: str, labels: torch.Tensor,
                  c: int) -> torch.Tensor:
    """Per vector of ``source`` [..., C] (the teacher's logits) against the targets of its stored ``arrays``:
    [..., FIDELITY_WIDTH] float64 = [counted, (KL, TV, tail share, dense tail share) at each of
    :data:`FIDELITY_TEMPERATURES`, top-1 agreement], zeros for a non-finite vector. Summed over vectors this is
    what ``attrs['fidelity']`` reports (KL 0 for ``sampled``, whose target is 0 on unsampled classes). All
    temperatures in one pass (a leading axis)."""
    x = source.double()
    keep = torch.isfinite(x).all(-1)
    q, stored = target_probs(arrays, fmt, labels, c, FIDELITY_TEMPERATURES)  # [n_tau, ..., C]
    ok = keep & torch.isfinite(q).all(-1)
    tv = torch.tensor(FIDELITY_TEMPERATURES, dtype=torch.float64, device=x.device).reshape((-1,) + (1,) * x.dim())
    z = torch.where(ok[..., None], x / tv, torch.zeros_like(q))
    lp = z - _lse(z)[..., None]
    p, q = torch.exp(lp), torch.where(ok[..., None], q, torch.zeros_like(q))
    kls = torch.where(p > 0, p * (lp - torch.log(q.clamp(min=1e-300))), torch.zeros_like(p)).sum(-1)
    stats = torch.stack([kls.clamp(min=0.0) if fmt != "sampled" else torch.zeros_like(kls),
                         0.5 * (p - q).abs().sum(-1), torch.where(stored, 0.0, q).sum(-1),
                         torch.where(stored, 0.0, p).sum(-1)], -1)  # [n_tau, ..., 4]
    stats = torch.where(ok[..., None], stats, 0.0)
    one = FIDELITY_TEMPERATURES.index(1.0)
    agree = (ok[one] & (p[one].argmax(-1) == q[one].argmax(-1))).double()
    return torch.cat([ok[one].double()[..., None], stats.movedim(0, -2).flatten(-2), agree[..., None]], -1)


# --- metric states --------------------------------------------------------------------------------------------
def metric_rows(x: torch.Tensor, labels: torch.Tensor, skipped: torch.Tensor) -> torch.Tensor:
    """Per sample and entry (each teacher, then their mean-logit ensemble when T > 1) of view-0 logits x [r, T, C]:
    [r, E, 6] float32 (the values are float32 computations) with :data:`METRIC_COLUMNS` (valid: not skipped and finite; top-1 and top-5 hits; NLL;
    confidence = max softmax; its calibration bin of 15). Same definitions as
    :func:`pipeline.bank.stats.metric_state` (ties: the smaller index ranks first); :func:`metric_sums` reduces
    them to ``MetricAccumulator(15).state()`` per entry."""
    r, t = x.shape[:2]
    keep = ~skipped.to(x.device) & torch.isfinite(x.reshape(r, -1)).all(1)
    x = torch.where(keep[:, None, None], x.float(), torch.zeros_like(x, dtype=torch.float32))
    entries = [x[:, k] for k in range(t)] + ([x.mean(1)] if t > 1 else [])
    y = labels.to(x.device).long()
    cls = torch.arange(x.shape[-1], device=x.device)
    out = []
    for e in entries:
        z = e - e.amax(1, keepdim=True)
        s = torch.exp(z).sum(1)
        zl = z.gather(1, y[:, None])
        rank = (z > zl).sum(1) + ((z == zl) & (cls < y[:, None])).sum(1)
        conf = 1.0 / s
        cols = [keep, rank == 0, rank < 5, torch.log(s) - zl[:, 0], conf,
                (conf * NUM_BINS).long().clamp(max=NUM_BINS - 1)]
        out.append(torch.stack([c.float() for c in cols], 1))
    return torch.stack(out, 1)


def metric_sums(rows: np.ndarray) -> np.ndarray:
    """[r, E, 6] :func:`metric_rows` -> ``MetricAccumulator(15).state()`` of every entry, concatenated
    ([E * 49] float64), reduced in row order (the same bytes however the rows were batched)."""
    out = []
    for e in range(rows.shape[1]):
        m = rows[:, e]
        v = m[:, 0] > 0
        m = m[v]
        b = m[:, 5].astype(np.int64)
        m = m.astype(np.float64)
        out += [np.array([v.sum(), m[:, 1].sum(), m[:, 2].sum(), m[:, 3].sum()], np.float64),
                np.bincount(b, minlength=NUM_BINS).astype(np.float64),
                np.bincount(b, weights=m[:, 4], minlength=NUM_BINS),
                np.bincount(b, weights=m[:, 1], minlength=NUM_BINS)]
    return np.concatenate(out)


# --- one batch of rows, one chunk's sums -----------------------------------------------------------------------
def metric_width(t: int) -> int:
    """Width of the metric states of T teachers (and their ensemble when T > 1): 49 per entry
    (``MetricAccumulator(15).state()``, :func:`metric_sums`); a dense bank's ``metric_sums`` row."""
    return (4 + 3 * NUM_BINS) * (t + (1 if t > 1 else 0))


def sums_layout(t: int) -> dict[str, tuple[int, int]]:
    """Columns of a ``chunk_sums`` row: fidelity sums, metric states of the source logits and of the
    reconstruction (view 0; 49 per entry: ``MetricAccumulator(15).state()``)."""
    m = metric_width(t)
    return {"fidelity": (0, FIDELITY_WIDTH), "source_metrics": (FIDELITY_WIDTH, FIDELITY_WIDTH + m),
            "metrics": (FIDELITY_WIDTH + m, FIDELITY_WIDTH + 2 * m)}


def sums_width(t: int) -> int:
    return sums_layout(t)["metrics"][1]


def encode_rows(x: torch.Tensor, labels: torch.Tensor, skipped: torch.Tensor, fmt: str, k: int | None,
                dtype: str, fidelity: torch.Tensor, *, samples: int | None = None, seed: int = 0,
                rows: np.ndarray | None = None) -> dict[str, torch.Tensor]:
    """Rows of one chunk, on x's device: x [b, T, V, C] logits (any float dtype), labels [b], skipped [b] bool
    (their vectors become NaN), ``fidelity`` [b] bool (the rows of the chunk's fidelity sample), ``rows`` [b] their
    bank rows. x is rounded to the bank ``dtype`` first (what a dense bank stores). Returns the stored arrays of
    ``fmt`` and the per-row records that :func:`chunk_sums` reduces: ``_fidelity`` [b, T, V, W]
    (:func:`fidelity_rows`, zero outside the sample), ``_fidelity_rows`` [b], ``_source_metrics`` and ``_metrics``
    [b, E, 6] (:func:`metric_rows` of the logits and of the T = 1 reconstruction, view 0)."""
    tdt = torch.float16 if dtype == "float16" else torch.float32
    skipped = skipped.to(x.device)
    x = x.to(tdt).float().masked_fill(skipped[:, None, None, None], math.nan)
    labels = labels.to(x.device).long()
    out = encode(x, fmt, k, labels, samples, seed, rows)
    c = x.shape[-1]
    fidelity = fidelity.to(x.device)
    sel = fidelity.nonzero()[:, 0]
    fid = torch.zeros(x.shape[:-1] + (FIDELITY_WIDTH,), dtype=torch.float64, device=x.device)
    if len(sel):
        fid[sel] = fidelity_rows(x[sel], {n: a[sel] for n, a in out.items()}, fmt, labels[sel], c)
    view0 = decode({n: a[:, :, :1] for n, a in out.items()}, fmt, c, labels)
    out.update({"_fidelity": fid, "_fidelity_rows": fidelity, "_source_metrics": metric_rows(x[:, :, 0], labels,
                skipped), "_metrics": metric_rows(view0[:, :, 0], labels, skipped)})
    return out


def chunk_sums(records: dict[str, np.ndarray], t: int) -> np.ndarray:
    """One ``chunk_sums`` row ([W] float64, :func:`sums_layout`) from a whole chunk's per-row records of
    :func:`encode_rows` (host arrays in row order)."""
    lay = sums_layout(t)
    sums = np.zeros(sums_width(t), np.float64)
    fid = records["_fidelity"][records["_fidelity_rows"]]
    sums[slice(*lay["fidelity"])] = fid.reshape(-1, FIDELITY_WIDTH).sum(0)
    sums[slice(*lay["source_metrics"])] = metric_sums(records["_source_metrics"])
    sums[slice(*lay["metrics"])] = metric_sums(records["_metrics"])
    return sums
