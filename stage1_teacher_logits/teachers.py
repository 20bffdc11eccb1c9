"""Teachers for stage 1: one or several models (an ensemble on the T axis), any checkpoint allowed.

Teachers run in eval mode under ``torch.inference_mode`` (BN uses running statistics and is never updated).
The WSLD released code ran its teacher in train mode (batch-statistics BN); this project does not.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from pipeline.errors import UsageError
from pipeline.models import create_model, weights_identity


@dataclass(frozen=True)
class TeacherSpec:
    """``arch`` from the model registry; ``weights``: DEFAULT | enum name | none | checkpoint path."""

    arch: str
    weights: str | None = "DEFAULT"

    def identity(self) -> dict[str, Any]:
        """Name, arch and weights identity (checkpoint sha256) as stored in bank attrs and the cache key."""
        ident = {"name": self.arch, "arch": self.arch, **weights_identity(self.weights)}
        return ident


def parse_teachers(names: tuple[str, ...] | list[str], weights: tuple[str, ...] | list[str]) -> list[TeacherSpec]:
    """Pair ``--teacher`` and ``--weights`` flags (one weights per teacher, or none for all-DEFAULT)."""
    if not names:
        raise UsageError("no teacher given: use --teacher NAME (repeatable)")
    if weights and len(weights) != len(names):
        raise UsageError(f"{len(names)} --teacher flags but {len(weights)} --weights flags: give one per teacher")
    ws = list(weights) if weights else ["DEFAULT"] * len(names)
    return [TeacherSpec(n, w) for n, w in zip(names, ws)]


class TeacherEnsemble(nn.Module):
    """T teachers -> logits [B, T, C] for images [B, 3, H, W]."""

    def __init__(self, models: list[nn.Module]):
        super().__init__()
        self.models = nn.ModuleList(models)
        self.eval()

    def train(self, mode: bool = True) -> "TeacherEnsemble":
        # Teachers never leave eval mode: BN statistics must stay frozen.
        return super().train(False)

    @torch.inference_mode()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return torch.stack([m(images).float() for m in self.models], dim=1)


def build_teachers(specs: list[TeacherSpec], num_classes: int, device: str = "cpu", seed: int = 0) -> TeacherEnsemble:
    """Create every teacher (random init seeded by ``seed`` when weights are none) in eval mode on ``device``."""
    models = []
    for i, s in enumerate(specs):
        torch.manual_seed(seed + i)
        models.append(create_model(s.arch, num_classes, s.weights))
    ens = TeacherEnsemble(models).to(device)
    if device == "cuda":
        ens = ens.to(memory_format=torch.channels_last)
    return ens
