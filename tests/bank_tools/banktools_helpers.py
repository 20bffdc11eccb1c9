"""Small synthetic label banks for the bank-tools tests, written with the real writer (create_bank / write_chunk /
mark_complete), so they are ordinary banks in every respect."""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import numpy as np


def peaked_logits(rng: np.random.Generator, n: int, t: int, v: int, c: int, labels: np.ndarray,
                  acc: float = 0.7) -> np.ndarray:
    """Teacher-like logits: Gaussian noise plus a peak on the true class (or, with prob 1 - acc, another one)."""
    x = rng.standard_normal((n, t, v, c)).astype(np.float32) * 1.5
    for k in range(t):
        wrong = rng.random(n) > acc
        target = np.where(wrong, (labels + rng.integers(1, c, n)) % c, labels)
        x[np.arange(n), k, :, target] += rng.uniform(2.0, 8.0, (n, 1))  # indexed shape (n, v)
    return x


def write_bank(path: Path, logits: np.ndarray, labels: np.ndarray, *, rows: int = 32, skipped=None,
               fingerprint: str = "fp-a", classes=None, views_attr=None, teachers=None, dtype: str = "float16",
               complete: bool = True, key: str | None = None) -> Path:
    from pipeline.bank.writer import create_bank, mark_complete, write_chunk

    n, t, v, c = logits.shape
    classes = list(classes) if classes is not None else [f"class{i}" for i in range(c)]
    teachers = teachers or [{"name": f"synth{k}", "arch": f"synth{k}", "weights": "none"} for k in range(t)]
    attrs = {
        "key": key or hashlib.sha256(f"{path.name}{fingerprint}".encode()).hexdigest(),
        "teachers": teachers,
        "dataset": {"name": "synth", "split": "train", "layout": "imagefolder", "num_samples": n,
                    "num_classes": c, "classes": classes, "fingerprint": fingerprint},
        "preprocessing": {"name": "demo"},
        "views": views_attr or {"policy": "center", "num_views": v},
        "metrics": {},
    }
    g = create_bank(path, attrs, (n, t, v, c), dtype, rows)
    skipped = np.zeros(n, bool) if skipped is None else np.asarray(skipped, bool)
    data = logits.copy()
    data[skipped] = np.nan
    views = np.full((n, v, 5), np.nan, np.float32)
    for j in range(math.ceil(n / rows)):
        s, e = j * rows, min(n, (j + 1) * rows)
        write_chunk(g, j, data[s:e], labels[s:e], views[s:e], skipped[s:e])
    if complete:
        from stage1_teacher_logits.dump import teacher_metrics

        mark_complete(g, {"metrics": teacher_metrics(g, teachers)})
    return path


def synth_bank(path: Path, n: int = 150, t: int = 1, c: int = 7, v: int = 1, seed: int = 0,
               **kw) -> tuple[Path, np.ndarray, np.ndarray]:
    """(path, logits as stored (fp16 -> float32), labels)."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % c
    x = peaked_logits(rng, n, t, v, c, labels).astype(kw.get("dtype", "float16")).astype(np.float32)
    write_bank(path, x, labels, **kw)
    return path, x, labels


def corrupt_chunk(bank: Path, array: str = "logits", chunk: str = "2/0/0/0") -> Path:
    """Flip bytes in the middle of a stored chunk so its CRC32C check fails on read."""
    f = Path(bank) / array / "c" / chunk
    raw = bytearray(f.read_bytes())
    for i in range(len(raw) // 3, len(raw) // 3 + 8):
        raw[i] ^= 0xFF
    f.write_bytes(bytes(raw))
    return f


def softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    z = x - x.max(axis=axis, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=axis, keepdims=True)
