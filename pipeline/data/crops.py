"""Random-resized-crop boxes, torchvision's algorithm, drawn from a numpy generator (so a box depends only on the
generator's seed: stage 1's stored views and the torch loader's training crops are reproducible across workers,
ranks and resumes)."""

from __future__ import annotations

import math

import numpy as np


def rrc_box(rng: np.random.Generator, h: int, w: int, scale: tuple[float, float],
            ratio: tuple[float, float]) -> tuple[float, float, float, float]:
    """One random-resized-crop box (y, x, h, w) in fractions, torchvision's algorithm (10 tries, then center)."""
    area = h * w
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        ar = math.exp(rng.uniform(*log_ratio))
        cw = int(round(math.sqrt(target * ar)))
        ch = int(round(math.sqrt(target / ar)))
        if 0 < cw <= w and 0 < ch <= h:
            y = int(rng.integers(0, h - ch + 1))
            x = int(rng.integers(0, w - cw + 1))
            return y / h, x / w, ch / h, cw / w
    in_ratio = w / h
    if in_ratio < min(ratio):
        cw, ch = w, int(round(w / min(ratio)))
    elif in_ratio > max(ratio):
        ch, cw = h, int(round(h * max(ratio)))
    else:
        cw, ch = w, h
    return (h - ch) // 2 / h, (w - cw) // 2 / w, ch / h, cw / w
