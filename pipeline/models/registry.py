"""One model registry for teachers and students: torchvision classification models by name, plus the
architectures the recipes need that torchvision lacks (CIFAR ResNets, MobileNetV1, a small demo CNN).

``create_model(name, num_classes, weights)``: ``weights`` is ``None``/``"none"`` (random init, seeded by the
caller), ``"DEFAULT"`` or a torchvision weights enum name (``IMAGENET1K_V1`` or ``ResNet34_Weights.IMAGENET1K_V1``),
or a checkpoint path: a bare ``state_dict`` or a ``{"model": ...}`` / ``{"state_dict": ...}`` wrapper, with
``module.`` prefixes (DDP) stripped. Any checkpoint of the right architecture is a valid teacher (Tf-KD
self-teachers, De-KD's poorly trained teachers).
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn

from pipeline.errors import UsageError

log = logging.getLogger(__name__)

_MODELS: dict[str, Callable[..., nn.Module]] = {}


def register_model(name: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator: register ``fn(num_classes) -> nn.Module`` under ``name`` (a duplicate name raises)."""

    def deco(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _MODELS:
            raise ValueError(f"model '{name}' is already registered")
        _MODELS[name] = fn
        return fn

    return deco


def _torchvision_names() -> list[str]:
    import torchvision.models as tvm

    return sorted(tvm.list_models(module=tvm))


def available_models() -> list[str]:
    return sorted(set(_MODELS) | set(_torchvision_names()))


def _strip_prefixes(sd: dict) -> dict:
    out = {}
    for k, v in sd.items():
        for p in ("module.", "_orig_mod."):
            while k.startswith(p):
                k = k[len(p):]
        out[k] = v
    return out


def load_checkpoint_state(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a checkpoint file -> state_dict (accepts bare, ``model`` and ``state_dict`` wrappers)."""
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"weights file not found: {p}")
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt or not a torch file
        raise UsageError(f"cannot read checkpoint {p}: {type(e).__name__}: {' '.join(str(e).split())[:200]}") from None
    if isinstance(obj, dict):
        for key in ("model", "state_dict", "model_state_dict"):
            if key in obj and isinstance(obj[key], dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise UsageError(f"checkpoint {p} holds no state_dict")
    return _strip_prefixes(obj)


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _torchvision_weights(name: str, weights: str):
    import torchvision.models as tvm

    try:
        enum = tvm.get_model_weights(name)
    except (ValueError, KeyError):
        raise UsageError(f"model '{name}' has no torchvision weights") from None
    if weights == "DEFAULT":
        return enum.DEFAULT
    member = weights.split(".")[-1]
    if member not in enum.__members__:
        raise UsageError(
            f"unknown weights '{weights}' for {name}; valid: DEFAULT, none, a checkpoint path, "
            + ", ".join(m for m in enum.__members__ if m != "DEFAULT")
        )
    return enum[member]


def weights_identity(weights: str | None) -> dict:
    """What identifies a weights choice in a cache key: enum name, or a checkpoint's sha256."""
    if weights is None or str(weights).lower() == "none":
        return {"weights": "none"}
    p = Path(weights)
    if p.suffix in (".pt", ".pth", ".ckpt", ".bin") or p.exists():
        if not p.is_file():
            raise UsageError(f"weights file not found: {p}")
        return {"weights": str(p), "sha256": file_sha256(p)}
    return {"weights": weights}


def create_model(name: str, num_classes: int, weights: str | None = None) -> nn.Module:
    """Build model ``name`` with ``num_classes`` outputs and load ``weights`` (see module docstring)."""
    import torchvision.models as tvm

    is_path = weights is not None and str(weights).lower() != "none" and weights_identity(weights).get("sha256")
    if name in _MODELS:
        model = _MODELS[name](num_classes=num_classes)
        if weights is not None and str(weights).lower() != "none" and not is_path:
            raise UsageError(f"model '{name}' has no named weights; give a checkpoint path or none")
    elif name in _torchvision_names():
        if weights is not None and str(weights).lower() != "none" and not is_path:
            w = _torchvision_weights(name, str(weights))
            n_w = len(w.meta.get("categories", [])) or num_classes
            if n_w != num_classes:
                raise UsageError(f"weights {w} predict {n_w} classes but the dataset has {num_classes}")
            try:
                model = tvm.get_model(name, weights=w)
            except Exception as e:  # no network here: say so in one line
                raise UsageError(f"cannot load torchvision weights {w}: {' '.join(str(e).split())[:200]}") from None
            return model
        model = tvm.get_model(name, weights=None, num_classes=num_classes)
    else:
        raise UsageError(f"unknown model '{name}'; valid: {', '.join(available_models())}")
    if is_path:
        sd = load_checkpoint_state(weights)
        try:
            model.load_state_dict(sd, strict=True)
        except RuntimeError as e:
            first = str(e).split("\n")[0] + " " + " ".join(str(e).split("\n")[1:2])
            raise UsageError(f"checkpoint {weights} does not fit {name} with {num_classes} classes: {first.strip()[:300]}") from None
    return model
