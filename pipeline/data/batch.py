"""What every image loader yields (:class:`Batch`) and raises (:class:`DecodeError`)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from pipeline.errors import UsageError

MODES = ("eval", "train", "views")


@dataclass
class Batch:
    """One decoded batch: ``images`` [B, 3, H, W] float32 (or [B, V, 3, H, W] for multi-view), ``index`` [B] int64.

    ``branches``: with several preprocessing branches (teachers wanting different preprocessing), every branch's
    images in branch order (``images`` is branch 0); None with one branch. ``mix``: images mixed in the loader
    (stage 2's ``--mix-labels blend``): ``{"index_mix": [B] int64 partner samples, "lam": [B] float32 weight of
    the own image}``; None otherwise."""

    images: torch.Tensor
    index: torch.Tensor
    branches: list[torch.Tensor] | None = None
    mix: dict[str, torch.Tensor] | None = None

    def inputs(self) -> list[torch.Tensor]:
        """Every branch's images (one element with one branch)."""
        return self.branches if self.branches is not None else [self.images]


class DecodeError(RuntimeError):
    """A batch could not be decoded. ``sample`` is the failing sample index when the loader knows it (torch),
    None when it does not (DALI reports the batch, not the file)."""

    def __init__(self, message: str, sample: int | None = None):
        super().__init__(message)
        self.sample = sample


def check_request(order: np.ndarray, mode: str, boxes: np.ndarray | None, device: str, branches: int = 1) -> None:
    """What both loaders refuse, in one line: an unknown device or mode, an empty order, boxes of the wrong shape
    for ``views``, several preprocessing branches in ``train`` mode."""
    if device not in ("cpu", "cuda"):
        raise UsageError(f"unknown device '{device}'; valid: cpu, cuda")
    if len(order) == 0:
        raise UsageError("empty sample list")
    if mode not in MODES:
        raise UsageError(f"unknown pipeline mode '{mode}'")
    if mode == "views" and (boxes is None or boxes.ndim != 3 or boxes.shape[0] != len(order) or boxes.shape[2] != 5):
        raise UsageError("views mode needs boxes of shape [len(order), V, 5]")
    if mode == "train" and branches > 1:
        raise UsageError("train mode takes one preprocessing")
