"""What every image loader yields (:class:`Batch`) and raises (:class:`DecodeError`)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Batch:
    """One decoded batch: ``images`` [B, 3, H, W] float32 (or [B, V, 3, H, W] for multi-view), ``index`` [B] int64.

    ``branches``: with several preprocessing branches (teachers wanting different preprocessing), every branch's
    images in branch order (``images`` is branch 0); None with one branch."""

    images: torch.Tensor
    index: torch.Tensor
    branches: list[torch.Tensor] | None = None

    def inputs(self) -> list[torch.Tensor]:
        """Every branch's images (one element with one branch)."""
        return self.branches if self.branches is not None else [self.images]


class DecodeError(RuntimeError):
    """A batch could not be decoded. ``sample`` is the failing sample index when the loader knows it (torch),
    None when it does not (DALI reports the batch, not the file)."""

    def __init__(self, message: str, sample: int | None = None):
        super().__init__(message)
        self.sample = sample
