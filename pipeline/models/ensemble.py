"""A frozen teacher ensemble: T models -> logits [B, T, C]. Shared by stage 1 and stage 2's live-teacher mode.

Teachers run in eval mode under ``torch.inference_mode`` (BN uses running statistics and is never updated).
The WSLD released code ran its teacher in train mode (batch-statistics BN); this project does not.

Each teacher may read its own input branch (teachers that want different preprocessing get differently
preprocessed copies of the same decoded image) and may have a class map (a teacher of 1000 ImageNet classes on a
subset of them: its logits of exactly the dataset's classes, in the dataset's order).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn

from pipeline.models.registry import create_model


class TeacherEnsemble(nn.Module):
    """T teachers -> logits [B, T, C] float32.

    ``class_maps[t]``: [C] int64 teacher-output index of each dataset class, or None (outputs are the classes).
    ``branch_of[t]``: which input branch teacher t reads (default: all read branch 0).
    """

    def __init__(self, models: list[nn.Module], class_maps: Sequence[torch.Tensor | None] | None = None,
                 branch_of: Sequence[int] | None = None):
        super().__init__()
        self.models = nn.ModuleList(models)
        self.branch_of = list(branch_of) if branch_of is not None else [0] * len(models)
        maps = list(class_maps) if class_maps is not None else [None] * len(models)
        self.mapped = [m is not None for m in maps]
        for t, m in enumerate(maps):
            self.register_buffer(f"class_map_{t}", m if m is not None else torch.zeros(0, dtype=torch.long))
        self.taps: list | None = None
        self.feature_dims: list[int] = []
        self.features: torch.Tensor | None = None
        self.eval()

    def enable_features(self, crops: Sequence[int]) -> list[int]:
        """From now on every forward also records each teacher's pooled penultimate embedding (its classifier's
        input, :class:`pipeline.models.features.FeatureTap`) in ``self.features`` [B, T, D] float32, zero-padded
        to the widest teacher's D. ``crops``: each teacher's input size (to probe its embedding width). Returns
        the widths."""
        from pipeline.models.features import FeatureTap, embedding_dim

        self.feature_dims = [embedding_dim(m, c) for m, c in zip(self.models, crops)]
        self.taps = [FeatureTap(m) for m in self.models]
        return self.feature_dims

    def train(self, mode: bool = True) -> "TeacherEnsemble":
        # Teachers never leave eval mode: BN statistics must stay frozen.
        return super().train(False)

    @torch.inference_mode()
    def forward(self, images: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
        """images [B, 3, H, W], or one such tensor per branch -> logits [B, T, C]."""
        inputs = [images] if torch.is_tensor(images) else list(images)
        outs, feats = [], []
        for t, m in enumerate(self.models):
            z = m(inputs[self.branch_of[t]]).float()
            if self.mapped[t]:
                z = z.index_select(1, getattr(self, f"class_map_{t}"))
            outs.append(z)
            if self.taps is not None:
                f = self.taps[t].pop().float()
                feats.append(torch.nn.functional.pad(f, (0, max(self.feature_dims) - f.shape[1])))
        self.features = torch.stack(feats, dim=1) if feats else None
        return torch.stack(outs, dim=1)


def build_ensemble(archs: list[str], weights: list[str | None], num_classes: int | Sequence[int | None],
                   device: str = "cpu", seed: int = 0, class_maps: Sequence[torch.Tensor | None] | None = None,
                   branch_of: Sequence[int] | None = None) -> TeacherEnsemble:
    """Create every teacher (random init seeded by ``seed + i`` when weights are none) in eval mode on ``device``.

    ``num_classes``: the outputs of every teacher, or one per teacher (None: the weights' own classes)."""
    counts = list(num_classes) if isinstance(num_classes, (list, tuple)) else [num_classes] * len(archs)
    models = []
    for i, (a, w, c) in enumerate(zip(archs, weights, counts)):
        torch.manual_seed(seed + i)
        models.append(create_model(a, c, w))
    ens = TeacherEnsemble(models, class_maps, branch_of).to(device)
    if device == "cuda":
        ens = ens.to(memory_format=torch.channels_last)
    return ens
