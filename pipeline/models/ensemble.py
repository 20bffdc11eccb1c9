"""A frozen teacher ensemble: T models -> logits [B, T, C]. Shared by stage 1 and stage 2's live-teacher mode.

Teachers run in eval mode under ``torch.inference_mode`` (BN uses running statistics and is never updated).
The WSLD released code ran its teacher in train mode (batch-statistics BN); this project does not.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from pipeline.models.registry import create_model


class TeacherEnsemble(nn.Module):
    """T teachers -> logits [B, T, C] for images [B, 3, H, W] (float32 output)."""

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


def build_ensemble(archs: list[str], weights: list[str | None], num_classes: int, device: str = "cpu",
                   seed: int = 0) -> TeacherEnsemble:
    """Create every teacher (random init seeded by ``seed + i`` when weights are none) in eval mode on ``device``."""
    models = []
    for i, (a, w) in enumerate(zip(archs, weights)):
        torch.manual_seed(seed + i)
        models.append(create_model(a, num_classes, w))
    ens = TeacherEnsemble(models).to(device)
    if device == "cuda":
        ens = ens.to(memory_format=torch.channels_last)
    return ens
