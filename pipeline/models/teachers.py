"""Teachers for stage 1: one or several models (an ensemble on the T axis), any checkpoint allowed.

The ensemble itself (:class:`pipeline.models.ensemble.TeacherEnsemble`, eval mode, inference mode) is shared
with stage 2's live-teacher mode.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pipeline.errors import UsageError
from pipeline.models import weights_identity
from pipeline.models.ensemble import TeacherEnsemble, build_ensemble


@dataclass(frozen=True)
class TeacherSpec:
    """``arch`` from the model registry; ``weights``: DEFAULT | enum name | none | checkpoint path."""

    arch: str
    weights: str | None = "DEFAULT"
    init_seed: int | None = None  # random-init seed when weights are none (part of the identity then)

    def identity(self) -> dict[str, Any]:
        """Name, arch and weights identity (checkpoint sha256; init seed for random weights) as stored in bank
        attrs and the cache key."""
        ident = {"name": self.arch, "arch": self.arch, **weights_identity(self.weights)}
        if ident["weights"] == "none" and self.init_seed is not None:
            ident["init_seed"] = self.init_seed
        return ident


def parse_teachers(names: tuple[str, ...] | list[str], weights: tuple[str, ...] | list[str],
                   seed: int = 0) -> list[TeacherSpec]:
    """Pair ``--teacher`` and ``--weights`` flags (one weights per teacher, or none for all-DEFAULT).

    Teacher i with weights ``none`` is initialised from ``seed + i`` (as :func:`build_teachers` does)."""
    if not names:
        raise UsageError("no teacher given: use --teacher NAME (repeatable)")
    if weights and len(weights) != len(names):
        raise UsageError(f"{len(names)} --teacher flags but {len(weights)} --weights flags: give one per teacher")
    ws = list(weights) if weights else ["DEFAULT"] * len(names)
    return [TeacherSpec(n, w, seed + i) for i, (n, w) in enumerate(zip(names, ws))]


def build_teachers(specs: list[TeacherSpec], num_classes: int, device: str = "cpu", seed: int = 0) -> TeacherEnsemble:
    """Create every teacher (random init seeded by ``seed + i`` when weights are none) in eval mode on ``device``."""
    return build_ensemble([s.arch for s in specs], [s.weights for s in specs], num_classes, device, seed)
