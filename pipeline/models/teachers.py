"""Teachers, in one place for both stages: pairing ``--teacher`` with ``--weights`` flags, the identity record of
a teacher (what bank attrs and the cache key store), and building the frozen ensemble.

Stage 1 runs the ensemble to dump a bank; stage 2 uses the same specs to find a bank by identity and, in
live-teacher mode, to run the same ensemble every step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from pipeline.errors import UsageError
from pipeline.models.ensemble import TeacherEnsemble, build_ensemble
from pipeline.models.registry import weights_identity


@dataclass(frozen=True)
class TeacherSpec:
    """``arch`` from the model registry; ``weights``: DEFAULT | enum name | none | checkpoint path."""

    arch: str
    weights: str | None = "DEFAULT"
    init_seed: int | None = None  # random-init seed when weights are none (part of the identity then)

    def identity(self) -> dict[str, Any]:
        """Name, arch and weights identity (checkpoint sha256; init seed for random weights) as stored in bank
        attrs and hashed into the cache key."""
        ident = {"name": self.arch, "arch": self.arch, **weights_identity(self.weights)}
        if ident["weights"] == "none" and self.init_seed is not None:
            ident["init_seed"] = self.init_seed
        return ident


def parse_teachers(names: Sequence[str], weights: Sequence[str], seed: int = 0,
                   flags: tuple[str, str] = ("--teacher", "--weights")) -> list[TeacherSpec]:
    """Pair teacher names with weights (one weights per teacher, or none at all for all-DEFAULT).

    Teacher i with weights ``none`` is initialised from ``seed + i`` (as :func:`build_teachers` does).
    ``flags`` names the command-line flags in error messages. Raises UsageError on a count mismatch.
    """
    if not names:
        raise UsageError(f"no teacher given: use {flags[0]} NAME (repeatable)")
    if weights and len(weights) != len(names):
        raise UsageError(f"{len(names)} {flags[0]} flags but {len(weights)} {flags[1]} flags: give one per teacher")
    ws = list(weights) if weights else ["DEFAULT"] * len(names)
    return [TeacherSpec(n, w, seed + i) for i, (n, w) in enumerate(zip(names, ws))]


def build_teachers(specs: Sequence[TeacherSpec], num_classes: int, device: str = "cpu",
                   seed: int = 0) -> TeacherEnsemble:
    """Create every teacher (random init seeded by ``seed + i`` when weights are none) in eval mode on ``device``."""
    return build_ensemble([s.arch for s in specs], [s.weights for s in specs], num_classes, device, seed)
