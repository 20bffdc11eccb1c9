"""Statistics of a label bank: per-block sums (dask-reducible), their summary, and the plots.

Everything is measured on one view (``view``, default 0, as the teacher metrics of stage 1), skipped rows
excluded. Entries: each teacher ``"<k>:<name>"`` and, for T > 1, their mean-logit ``"ensemble"``.

Per entry: top-1/top-5 (%), NLL, ECE (15 bins, :mod:`pipeline.metrics`), the reliability diagram, the
distribution of the predictive entropy (nats, at T = 1), per-class accuracy and the confusion matrix.
For T > 1: pairwise top-1 agreement between teachers (fraction of samples with the same argmax).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import numpy as np

NUM_BINS = 15  # calibration bins (MetricAccumulator's default)
ENTROPY_BINS = 50
_STATE = 4 + 3 * NUM_BINS  # MetricAccumulator(15).state() length (torch is imported lazily: workers stay light)


def entry_names(teachers: list[dict[str, Any]], t: int) -> list[str]:
    names = [f"{k}:{teachers[k].get('name', teachers[k].get('arch', '?')) if k < len(teachers) else '?'}"
             for k in range(t)]
    return names + (["ensemble"] if t > 1 else [])


def _entries(logits: np.ndarray) -> list[np.ndarray]:
    """[r, T, C] -> the per-entry [r, C] logits (teachers, then the mean-logit ensemble when T > 1)."""
    t = logits.shape[1]
    out = [logits[:, k] for k in range(t)]
    if t > 1:
        out.append(logits.mean(axis=1))
    return out


def _select(logits: np.ndarray, labels: np.ndarray, skipped: np.ndarray, view: int):
    x = np.asarray(logits, np.float32)[:, :, view]
    keep = ~np.asarray(skipped, bool) & np.isfinite(x.reshape(len(x), -1)).all(axis=1)
    return x[keep], np.asarray(labels, np.int64)[keep]


# --- metrics only (ensemble / compact attrs) ------------------------------------------------------------------
def _softmax_parts(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """x [r, C] float32 -> (z = x - max, e = exp(z), s = sum e) (one exp pass, reused by every statistic)."""
    z = x - x.max(axis=1, keepdims=True)
    e = np.exp(z)
    return z, e, e.sum(axis=1)


def metric_state(x: np.ndarray, y: np.ndarray, parts=None) -> np.ndarray:
    """``MetricAccumulator(15).state()`` of logits x [r, C] and labels y [r], in numpy (~10x faster here).

    Same definitions: top-1 = argmax (first index on ties) is the label; top-5 = fewer than 5 classes rank
    before the label (greater logit, or equal logit and smaller index); NLL = -log_softmax at the label;
    confidence = max softmax, binned as ``min(int(conf * 15), 14)``.
    """
    r = len(y)
    head = np.zeros(4, np.float64)
    bins = np.zeros((3, NUM_BINS), np.float64)
    if r:
        z, e, s = parts if parts is not None else _softmax_parts(x)
        rows = np.arange(r)
        zl = z[rows, y]
        rank = (z > zl[:, None]).sum(axis=1) + ((z == zl[:, None]) & (np.arange(x.shape[1]) < y[:, None])).sum(axis=1)
        pred = z.argmax(axis=1)
        conf = (1.0 / s).astype(np.float32)  # exp(max - logsumexp) = 1 / sum exp(z)
        b = np.minimum((conf * NUM_BINS).astype(np.int64), NUM_BINS - 1)
        head[:] = [r, (rank == 0).sum(), (rank < 5).sum(), float((np.log(s) - zl).astype(np.float64).sum())]
        bins[0] = np.bincount(b, minlength=NUM_BINS)
        bins[1] = np.bincount(b, weights=conf.astype(np.float64), minlength=NUM_BINS)
        bins[2] = np.bincount(b, weights=(pred == y).astype(np.float64), minlength=NUM_BINS)
    return np.concatenate([head, bins.reshape(-1)])


def metric_states(logits: np.ndarray, labels: np.ndarray, skipped: np.ndarray, view: int = 0) -> np.ndarray:
    """Metric states (:func:`metric_state`) of every entry of a block (logits [r, T, V, C]), concatenated."""
    x, y = _select(logits, labels, skipped, view)
    return np.concatenate([metric_state(np.ascontiguousarray(e), y) for e in _entries(x)])


def metrics_from_states(vec: np.ndarray, names: list[str]) -> dict[str, dict[str, float]]:
    """The ``metrics`` attr (same form as stage 1's teacher_metrics) from summed :func:`metric_states`."""
    import torch

    from pipeline.metrics import MetricAccumulator

    out = {}
    for k, name in enumerate(names):
        acc = MetricAccumulator(NUM_BINS)
        acc.load_state(torch.from_numpy(np.asarray(vec[k * _STATE:(k + 1) * _STATE], np.float64)))
        out[name] = {key: round(v, 6) for key, v in acc.compute().items()}
    return out


def metric_state_width(t: int) -> int:
    return _STATE * (t + (1 if t > 1 else 0))


# --- full statistics -------------------------------------------------------------------------------------------
def _layout(t: int, c: int) -> dict[str, tuple[int, tuple[int, ...]]]:
    """name -> (offset, shape) inside the per-block stats vector."""
    e = t + (1 if t > 1 else 0)
    parts = [("metric", (e, _STATE)), ("entropy_hist", (e, ENTROPY_BINS)), ("entropy_sum", (e,)),
             ("class_correct", (e, c)), ("class_count", (c,)), ("confusion", (e, c, c)), ("agree", (t, t)),
             ("n", (1,))]
    out, off = {}, 0
    for name, shape in parts:
        out[name] = (off, shape)
        off += int(np.prod(shape))
    out["_width"] = (off, ())
    return out


def stats_width(t: int, c: int) -> int:
    return _layout(t, c)["_width"][0]


def block_stats(logits: np.ndarray, labels: np.ndarray, skipped: np.ndarray, view: int = 0) -> np.ndarray:
    """All statistics sums of one block (logits [r, T, V, C]) as one float64 vector (see :func:`_layout`)."""
    _, t, _, c = logits.shape
    lay = _layout(t, c)
    vec = np.zeros(lay["_width"][0], np.float64)

    def put(name, value):
        off, shape = lay[name]
        vec[off:off + int(np.prod(shape))] += np.asarray(value, np.float64).reshape(-1)

    x, y = _select(logits, labels, skipped, view)
    put("n", [len(y)])
    if not len(y):
        put("metric", metric_states(logits, labels, skipped, view))
        return vec
    edges = np.linspace(0.0, math.log(c), ENTROPY_BINS + 1)
    states, hist, esum, corr, conf = [], [], [], [], []
    preds = []
    for ent in _entries(x):
        ent = np.ascontiguousarray(ent)
        z, ex, sm = parts = _softmax_parts(ent)
        states.append(metric_state(ent, y, parts))
        h = np.log(sm) - (ex * z).sum(axis=1) / sm  # entropy: log S - sum(e^z z) / S
        hist.append(np.histogram(np.clip(h, 0, edges[-1]), bins=edges)[0])
        esum.append(h.sum())
        pred = z.argmax(axis=1)
        preds.append(pred)
        corr.append(np.bincount(y[pred == y], minlength=c))
        conf.append(np.bincount(y * c + pred, minlength=c * c))
    put("metric", np.concatenate(states))
    put("entropy_hist", hist)
    put("entropy_sum", esum)
    put("class_correct", corr)
    put("class_count", np.bincount(y, minlength=c))
    put("confusion", conf)
    put("agree", [[(preds[a] == preds[b]).sum() for b in range(t)] for a in range(t)])
    return vec


def summarize(vec: np.ndarray, names: list[str], t: int, c: int, class_names: list[str] | None = None,
              view: int = 0) -> dict[str, Any]:
    """The ``stats.json`` dict from summed :func:`block_stats`."""
    import torch

    from pipeline.metrics import MetricAccumulator

    lay = _layout(t, c)

    def get(name):
        off, shape = lay[name]
        return np.asarray(vec[off:off + int(np.prod(shape))]).reshape(shape)

    n = int(get("n")[0])
    edges = np.linspace(0.0, math.log(c), ENTROPY_BINS + 1)
    count = get("class_count")
    entries = {}
    for k, name in enumerate(names):
        acc = MetricAccumulator(NUM_BINS)
        acc.load_state(torch.from_numpy(get("metric")[k].copy()))
        m = {key: round(v, 6) for key, v in acc.compute().items()}
        entries[name] = {
            **m,
            "entropy_mean": float(get("entropy_sum")[k] / max(n, 1)),
            "entropy_hist": get("entropy_hist")[k].astype(int).tolist(),
            "per_class_accuracy": [float(100.0 * a / b) if b else None for a, b in zip(get("class_correct")[k], count)],
            "reliability": acc.reliability(),
            "confusion": get("confusion")[k].astype(int).tolist(),
        }
    out: dict[str, Any] = {"n": n, "num_teachers": t, "num_classes": c, "view": view,
                           "classes": list(class_names) if class_names else [str(i) for i in range(c)],
                           "class_count": count.astype(int).tolist(), "entropy_bin_edges": edges.tolist(),
                           "entries": entries}
    if t > 1:
        out["agreement"] = (get("agree") / max(n, 1)).round(6).tolist()
    return out


def format_summary(s: dict[str, Any]) -> str:
    lines = [f"samples {s['n']}  teachers {s['num_teachers']}  classes {s['num_classes']}  view {s['view']}"]
    for name, e in s["entries"].items():
        pc = [a for a in e["per_class_accuracy"] if a is not None]
        worst = min(pc) if pc else float("nan")
        lines.append(f"{name:24s} top1 {e['top1']:6.2f}  top5 {e['top5']:6.2f}  nll {e['nll']:.4f}  "
                     f"ece {e['ece']:.4f}  entropy {e['entropy_mean']:.3f} nats  worst class {worst:.1f}%")
    if "agreement" in s:
        lines.append("top-1 agreement between teachers:")
        for k, row in enumerate(s["agreement"]):
            lines.append(f"  {k}: " + "  ".join(f"{v:.3f}" for v in row))
    return "\n".join(lines)


# --- plots -----------------------------------------------------------------------------------------------------
def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "entry"


def plot_stats(s: dict[str, Any], out_dir: str | Path) -> list[str]:
    """Write the PNGs of summary ``s`` into ``out_dir`` (entropy, reliability, per-class accuracy, confusion per
    entry, teacher agreement); return their file names."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    files: list[str] = []

    def save(fig, name: str) -> None:
        fig.tight_layout()
        fig.savefig(out_dir / name, dpi=100)
        plt.close(fig)
        files.append(name)

    save(_plot_entropy(plt, s), "entropy.png")
    save(_plot_reliability(plt, s), "reliability.png")
    save(_plot_per_class(plt, s), "per_class_accuracy.png")
    for name in s["entries"]:
        save(_plot_confusion(plt, s, name), f"confusion_{_slug(name)}.png")
    if "agreement" in s:
        save(_plot_agreement(plt, s), "agreement.png")
    return files


def _plot_entropy(plt, s: dict[str, Any]):
    fig, ax = plt.subplots(figsize=(6, 4))
    edges = np.asarray(s["entropy_bin_edges"])
    for name, e in s["entries"].items():
        h = np.asarray(e["entropy_hist"], float)
        ax.stairs(h / max(h.sum(), 1), edges, label=name)
    ax.set_xlabel("predictive entropy (nats, T = 1)")
    ax.set_ylabel("fraction of samples")
    ax.axvline(math.log(s["num_classes"]), color="gray", ls=":", lw=1)
    ax.legend(fontsize=7)
    ax.set_title("entropy distribution")
    return fig


def _plot_reliability(plt, s: dict[str, Any]):
    names = list(s["entries"])
    fig, axes = plt.subplots(1, len(names), figsize=(4 * len(names), 4), squeeze=False)
    for ax, name in zip(axes[0], names):
        r = s["entries"][name]["reliability"]
        nb = len(r["acc"])
        centers = (np.arange(nb) + 0.5) / nb
        has = np.asarray(r["count"]) > 0
        ax.bar(centers[has], np.asarray(r["acc"])[has], width=1 / nb, edgecolor="k", alpha=0.7, label="accuracy")
        ax.plot(np.asarray(r["conf"])[has], np.asarray(r["acc"])[has], "o", ms=3, color="C1", label="(conf, acc)")
        ax.plot([0, 1], [0, 1], "k--", lw=1)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_xlabel("confidence")
        ax.set_ylabel("accuracy")
        ax.set_title(f"{name}  ECE {s['entries'][name]['ece']:.3f}", fontsize=9)
    axes[0][0].legend(fontsize=7)
    return fig


def _plot_per_class(plt, s: dict[str, Any]):
    c, names = s["num_classes"], list(s["entries"])
    fig, ax = plt.subplots(figsize=(max(6, min(20, 0.35 * c)), 4))
    for k, name in enumerate(names):
        acc = np.array([np.nan if a is None else a for a in s["entries"][name]["per_class_accuracy"]])
        if c <= 50:
            w = 0.8 / len(names)
            ax.bar(np.arange(c) + (k - (len(names) - 1) / 2) * w, acc, width=w, label=name)
        else:
            ax.plot(np.sort(acc), label=name)
    if c <= 50:
        ax.set_xticks(np.arange(c))
        ax.set_xticklabels(s["classes"], rotation=60, ha="right", fontsize=7)
    else:
        ax.set_xlabel("classes, sorted by accuracy")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_ylim(0, 100)
    ax.legend(fontsize=7)
    ax.set_title("per-class accuracy")
    return fig


def _plot_confusion(plt, s: dict[str, Any], name: str):
    """Row-normalised confusion matrix: P(predicted | true)."""
    c = s["num_classes"]
    m = np.asarray(s["entries"][name]["confusion"], float)
    m = m / np.maximum(m.sum(axis=1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(6, 5))
    im = ax.imshow(m, cmap="viridis", vmin=0, vmax=1, interpolation="nearest")
    fig.colorbar(im, ax=ax, label="P(predicted | true)")
    if c <= 30:
        ax.set_xticks(np.arange(c))
        ax.set_yticks(np.arange(c))
        ax.set_xticklabels(s["classes"], rotation=60, ha="right", fontsize=7)
        ax.set_yticklabels(s["classes"], fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"confusion  {name}", fontsize=9)
    return fig


def _plot_agreement(plt, s: dict[str, Any]):
    a = np.asarray(s["agreement"])
    t = len(a)
    names = list(s["entries"])[:t]
    fig, ax = plt.subplots(figsize=(1.2 * t + 3, 1.2 * t + 2))
    im = ax.imshow(a, vmin=0, vmax=1, cmap="magma")
    for i in range(t):
        for j in range(t):
            ax.text(j, i, f"{a[i, j]:.2f}", ha="center", va="center", color="w" if a[i, j] < 0.6 else "k")
    ax.set_xticks(range(t))
    ax.set_yticks(range(t))
    ax.set_xticklabels(names, rotation=45, ha="right", fontsize=7)
    ax.set_yticklabels(names, fontsize=7)
    fig.colorbar(im, ax=ax)
    ax.set_title("top-1 agreement between teachers")
    return fig


def write_json(s: dict[str, Any], path: str | Path) -> None:
    Path(path).write_text(json.dumps(s, indent=1))
