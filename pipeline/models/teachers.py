"""Teachers, in one place for both stages: pairing ``--teacher`` with ``--weights`` flags, the identity record of
a teacher (what bank attrs and the cache key store), and building the frozen ensemble.

Stage 1 runs the ensemble to dump a bank; stage 2 uses the same specs to find a bank by identity and, in
live-teacher mode, to run the same ensemble every step.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn as nn

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


def imagenet_wnids() -> list[str]:
    """The 1000 ImageNet-1k wnids in class-index order (sorted; ``n01440764`` is class 0), from timm."""
    from timm.data import ImageNetInfo

    return list(ImageNetInfo().label_names())


def read_class_map(path: str | Path) -> dict[str, int]:
    """``--class-map FILE``: dataset class name -> teacher output index, as ``name index`` lines or a JSON object.
    Raises UsageError naming the file (and line) on a missing file or a malformed entry."""
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"--class-map file not found: {p}")
    text = p.read_text()
    if p.suffix == ".json":
        try:
            data = json.loads(text)
        except ValueError as e:
            raise UsageError(f"--class-map {p} is not valid JSON: {e}") from None
        if not isinstance(data, dict) or not all(isinstance(v, int) for v in data.values()):
            raise UsageError(f"--class-map {p} must hold an object of class name -> teacher output index")
        return {str(k): int(v) for k, v in data.items()}
    out: dict[str, int] = {}
    for ln, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        parts = line.rsplit(None, 1)
        if len(parts) != 2 or not parts[1].isdigit():
            raise UsageError(f"{p}:{ln}: expected 'class_name teacher_index', got {line!r}")
        out[parts[0]] = int(parts[1])
    return out


def class_map_for(arch: str, teacher_classes: int, classes: Sequence[str],
                  class_map: dict[str, int] | None = None) -> list[int] | None:
    """Teacher-output index of each dataset class, or None when the teacher's outputs are the dataset's classes.

    With ``class_map`` (``--class-map``): every dataset class must be mapped to an output in range. Without: a
    teacher with as many outputs as the dataset has classes maps one to one; a 1000-class teacher on folders named
    by ImageNet-1k wnids (Imagenette, ImageNet-100, ...) maps each wnid to its ImageNet index. Anything else is a
    one-line UsageError naming the class or the counts.
    """
    if class_map is not None:
        missing = [c for c in classes if c not in class_map]
        if missing:
            raise UsageError(f"--class-map does not map dataset class '{missing[0]}' ({len(missing)} unmapped)")
        bad = [c for c in classes if not 0 <= class_map[c] < teacher_classes]
        if bad:
            raise UsageError(f"--class-map maps class '{bad[0]}' to output {class_map[bad[0]]}, but {arch} has "
                             f"{teacher_classes} outputs")
        return [class_map[c] for c in classes]
    if teacher_classes == 1000 and (len(classes) != 1000 or all(_is_wnid(c) for c in classes)):
        # by wnid, also when all 1000 are there: a file list (the WSLD release's) may number them in another order
        index = {w: k for k, w in enumerate(imagenet_wnids())}
        unknown = [c for c in classes if c not in index]
        if unknown:
            raise UsageError(f"{arch} predicts the 1000 ImageNet classes but class folder '{unknown[0]}' is not an "
                             "ImageNet-1k wnid: name the folders by wnid (n01440764, ...) or give --class-map FILE")
        idx = [index[c] for c in classes]
        return None if idx == list(range(teacher_classes)) else idx
    if teacher_classes == len(classes):
        return None
    raise UsageError(f"{arch} predicts {teacher_classes} classes but the dataset has {len(classes)}: give --class-map "
                     "FILE (dataset class -> teacher output index)")


def _is_wnid(name: str) -> bool:
    return len(name) == 9 and name[0] == "n" and name[1:].isdigit()


def output_classes(model: nn.Module, crop: int) -> int:
    """The number of outputs of ``model`` (one forward of a zero image at its input size)."""
    p = next(model.parameters(), None)
    x = torch.zeros(1, 3, crop, crop, device=p.device if p is not None else "cpu")
    with torch.inference_mode():
        return int(model.eval()(x).shape[-1])


def build_teachers(specs: Sequence[TeacherSpec], classes: Sequence[str] | int, device: str = "cpu", seed: int = 0,
                   crops: Sequence[int] | None = None, branch_of: Sequence[int] | None = None,
                   class_map: dict[str, int] | None = None) -> TeacherEnsemble:
    """Every teacher in eval mode on ``device``, mapped onto the dataset's ``classes``.

    Pretrained and checkpoint teachers keep their own classes and get a class map when those are not the
    dataset's (:func:`class_map_for`); random-init teachers (seeded by ``seed + i``) get the dataset's classes.
    ``classes``: the dataset's class names (or their number); ``crops``: each teacher's input size (to count
    its outputs); ``branch_of``: its input branch.
    """
    from pipeline.models.registry import weights_kind

    if isinstance(classes, int):
        classes = [str(k) for k in range(classes)]
    counts = [None if weights_kind(s.weights) != "none" else len(classes) for s in specs]
    ens = build_ensemble([s.arch for s in specs], [s.weights for s in specs], counts, device, seed,
                         branch_of=branch_of)
    maps = []
    for t, (s, m) in enumerate(zip(specs, ens.models)):
        n = len(classes) if counts[t] is not None else output_classes(m, (crops or [224] * len(specs))[t])
        idx = class_map_for(s.arch, n, classes, class_map)
        maps.append(torch.tensor(idx, dtype=torch.long, device=device) if idx is not None else None)
    if any(m is not None for m in maps):
        ens = TeacherEnsemble(list(ens.models), maps, ens.branch_of).to(device)
    return ens


def class_maps_record(ens: TeacherEnsemble) -> list[list[int] | None]:
    """The ensemble's class maps as bank attrs store them (one per teacher, None = one to one)."""
    return [getattr(ens, f"class_map_{t}").tolist() if ens.mapped[t] else None for t in range(len(ens.models))]


def teachers_from_records(records: Sequence[dict[str, Any]], num_classes: int,
                          class_maps: Sequence[Sequence[int] | None] | None = None, device: str = "cpu",
                          branch_of: Sequence[int] | None = None) -> TeacherEnsemble:
    """The teachers a bank's own records describe (``attrs["teachers"]``, ``attrs["class_maps"]``), rebuilt
    without the command line that dumped it: ``labels check`` runs them live against the stored rows.

    ``records``: identity records (``arch``, ``weights``: ``DEFAULT`` / an enum name / ``none`` / a checkpoint
    path, ``sha256`` of that checkpoint, ``init_seed`` of a random init); ``num_classes``: C of the bank;
    ``class_maps``: per teacher the teacher output of each dataset class, or None (one to one). A random init is
    seeded with its recorded ``init_seed`` (as :func:`pipeline.models.ensemble.build_ensemble` did), so the same
    weights come back. Raises UsageError (one line, exit 2) when a checkpoint is missing or its content differs
    from the recorded sha256, or when a model cannot be built or loaded.
    """
    from pipeline.models.registry import create_model, weights_identity, weights_kind

    maps = list(class_maps) if class_maps is not None else [None] * len(records)
    models, map_tensors = [], []
    for t, rec in enumerate(records):
        weights = rec.get("weights", "DEFAULT")
        kind = weights_kind(weights)  # a recorded checkpoint path that is gone: UsageError naming it
        if kind == "path" and rec.get("sha256") and weights_identity(weights).get("sha256") != rec["sha256"]:
            raise UsageError(f"teacher {t} ({rec.get('arch')}): checkpoint {weights} changed since the bank was dumped "
                             f"(sha256 {str(rec['sha256'])[:12]} recorded): restore that file to check this bank")
        torch.manual_seed(int(rec.get("init_seed", t)))
        models.append(create_model(rec["arch"], num_classes if kind == "none" else None, weights))
        m = maps[t]
        map_tensors.append(torch.tensor(list(m), dtype=torch.long) if m is not None else None)
    ens = TeacherEnsemble(models, map_tensors, branch_of).to(device)
    return ens.to(memory_format=torch.channels_last) if device == "cuda" else ens  # as build_ensemble
