"""Classification metrics shared by both stages: top-1/top-5 (percent), NLL and ECE.

ECE is the standard binned expected calibration error (Guo et al., ICML 2017) with 15 equal-width
confidence bins: sum_b |B_b|/N * |acc(B_b) - conf(B_b)|.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

import torch
import torch.nn.functional as F


class MetricAccumulator:
    """Accumulates sums over batches so metrics are exact over a whole split (and all-reducible)."""

    def __init__(self, num_bins: int = 15):
        self.num_bins = num_bins
        self.reset()

    def reset(self) -> None:
        self.n = 0
        self.correct1 = 0.0
        self.correct5 = 0.0
        self.nll = 0.0
        self.bin_count = torch.zeros(self.num_bins, dtype=torch.float64)
        self.bin_conf = torch.zeros(self.num_bins, dtype=torch.float64)
        self.bin_acc = torch.zeros(self.num_bins, dtype=torch.float64)

    @torch.no_grad()
    def update(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        """logits [B, C] (any float dtype), labels [B]."""
        logits = logits.detach().float().cpu()
        labels = labels.detach().cpu().long()
        k = min(5, logits.shape[1])
        top = logits.topk(k, dim=1).indices
        hit = top.eq(labels[:, None])
        self.correct1 += hit[:, 0].sum().item()
        self.correct5 += hit.any(dim=1).sum().item()
        logp = F.log_softmax(logits, dim=1)
        self.nll += -logp.gather(1, labels[:, None]).sum().item()
        conf, pred = logp.exp().max(dim=1)
        b = torch.clamp((conf * self.num_bins).long(), max=self.num_bins - 1)
        self.bin_count += torch.bincount(b, minlength=self.num_bins).double()
        self.bin_conf += torch.bincount(b, weights=conf.double(), minlength=self.num_bins)
        self.bin_acc += torch.bincount(b, weights=pred.eq(labels).double(), minlength=self.num_bins)
        self.n += labels.numel()

    def state(self) -> torch.Tensor:
        """All sums as one float64 vector (for all-reduce across ranks)."""
        head = torch.tensor([self.n, self.correct1, self.correct5, self.nll], dtype=torch.float64)
        return torch.cat([head, self.bin_count, self.bin_conf, self.bin_acc])

    def load_state(self, v: torch.Tensor) -> None:
        v = v.double().cpu()
        nb = self.num_bins
        self.n = int(round(v[0].item()))
        self.correct1, self.correct5, self.nll = (v[1].item(), v[2].item(), v[3].item())
        self.bin_count, self.bin_conf, self.bin_acc = v[4:4 + nb], v[4 + nb:4 + 2 * nb], v[4 + 2 * nb:4 + 3 * nb]

    def compute(self) -> dict[str, float]:
        n = max(self.n, 1)
        ece = (self.bin_acc - self.bin_conf).abs().sum().item() / n
        return {
            "top1": 100.0 * self.correct1 / n,
            "top5": 100.0 * self.correct5 / n,
            "nll": self.nll / n,
            "ece": ece,
            "n": self.n,
        }

    def reliability(self) -> dict[str, list[float]]:
        """Per-bin accuracy, confidence and count (for reliability diagrams)."""
        c = self.bin_count.clamp(min=1)
        return {"acc": (self.bin_acc / c).tolist(), "conf": (self.bin_conf / c).tolist(),
                "count": self.bin_count.tolist()}


def classification_metrics(logits: torch.Tensor, labels: torch.Tensor, num_bins: int = 15) -> dict[str, float]:
    """Metrics of logits [N, C] against labels [N]."""
    acc = MetricAccumulator(num_bins)
    acc.update(logits, labels)
    return acc.compute()


def teacher_metrics_of(g: Any, teachers: list[dict], rows: Callable[[int, int], np.ndarray]) -> dict[str, dict[str, float]]:
    """Top-1/top-5/NLL/ECE of each teacher of a bank group ``g`` (and of their mean-logit ensemble), its rows read
    one row chunk at a time by ``rows(start, stop)`` -> logits [r, T, C] (view 0 of a dense bank, a map's mean
    over its cells); skipped rows are left out. -> {``"<t>:<name>"`` or ``"ensemble"``: metrics}."""
    n, t = int(g["labels"].shape[0]), len(teachers)
    step = int(g["labels"].chunks[0])
    accs = [MetricAccumulator() for _ in range(t + (1 if t > 1 else 0))]
    for s in range(0, n, step):
        z = torch.from_numpy(np.asarray(rows(s, min(n, s + step)), np.float32))
        labels = torch.from_numpy(np.asarray(g["labels"][s:s + step]).astype(np.int64))
        keep = ~torch.from_numpy(np.asarray(g["skipped"][s:s + step]))
        z, labels = z[keep], labels[keep]
        for k in range(t):
            accs[k].update(z[:, k], labels)
        if t > 1:
            accs[t].update(z.mean(1), labels)
    names = [f"{k}:{tt['name']}" for k, tt in enumerate(teachers)] + (["ensemble"] if t > 1 else [])
    return {name: {k: round(v, 6) for k, v in a.compute().items()} for name, a in zip(names, accs)}

