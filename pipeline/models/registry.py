"""One model registry for teachers and students. Four name forms:

- a registered name (CIFAR ResNets, MobileNetV1, the demo CNNs: :mod:`pipeline.models.cifar`);
- a torchvision classification model (``resnet34``, ``efficientnet_b0``, ``vit_b_16``, ...);
- ``timm/<name>`` with timm's names and pretrained tags (``timm/resnet50.a1_in1k``,
  ``timm/convnext_tiny.fb_in22k_ft_in1k``);
- ``module.path:function``, a user's callable returning an ``nn.Module`` (called with ``num_classes=C`` when it
  takes that argument), so nobody has to edit the registry.

``create_model(name, num_classes, weights)``: ``weights`` is ``None``/``"none"`` (random init, seeded by the
caller), ``"DEFAULT"`` (torchvision's or timm's pretrained weights, downloaded by their own loaders where a
network exists), a torchvision weights enum name (``IMAGENET1K_V1`` or ``ResNet34_Weights.IMAGENET1K_V1``), or a
checkpoint path: a bare ``state_dict`` or a ``{"model": ...}`` / ``{"state_dict": ...}`` wrapper, with
``module.`` prefixes (DDP) stripped. Any checkpoint of the right architecture is a valid teacher (Tf-KD
self-teachers, De-KD's poorly trained teachers). ``num_classes=None`` keeps the weights' own classes (a
pretrained model's, or a checkpoint's, read from its classifier): teachers keep theirs and are mapped onto the
dataset's classes afterwards (:mod:`pipeline.models.teachers`).
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn

from pipeline.errors import UsageError, one_line

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


def torchvision_names() -> list[str]:
    import torchvision.models as tvm

    return sorted(tvm.list_models(module=tvm))


def available_models() -> list[str]:
    return sorted(set(_MODELS) | set(torchvision_names()))


def check_model_name(name: str) -> None:
    """UsageError naming the valid models unless ``name`` is one this registry builds: a registered or torchvision
    name, ``timm/<name>`` or ``module.path:function`` (those two are checked when built)."""
    if not (name.startswith("timm/") or ":" in name or name in _MODELS or name in torchvision_names()):
        raise UsageError(f"unknown model '{name}'; valid: {', '.join(available_models())}, timm/<name> "
                         "(timm.list_models()) or module.path:function")


def _strip_prefixes(sd: dict) -> dict:
    out = {}
    for k, v in sd.items():
        for p in ("module.", "_orig_mod."):
            while k.startswith(p):
                k = k[len(p):]
        out[k] = v
    return out


class _Unread:
    """Stands in for an object of a class ``torch.load(weights_only=True)`` does not allow (a torchvision reference
    checkpoint's ``args``, an ``argparse.Namespace``): takes any arguments and state and keeps none, so no code of
    that class runs. A state dict holding one is refused."""

    def __new__(cls, *args: Any, **kwargs: Any) -> "_Unread":
        return object.__new__(cls)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        pass


_STATE_KEYS = ("model", "state_dict", "model_state_dict")


def _resave_hint(p: Path, entry: str = "model") -> str:
    return (f"if you trust the file, re-save its weights: python -c \"import torch; torch.save(torch.load('{p}', "
            f"weights_only=False)['{entry}'], '{p.with_suffix('')}.weights.pt')\" and pass that file")


def _unsafe_globals(p: Path) -> list[str]:
    """The globals a checkpoint needs that ``weights_only`` loading does not allow ([] when torch cannot tell)."""
    try:
        return list(torch.serialization.get_unsafe_globals_in_checkpoint(str(p)))
    except Exception:  # not a zip checkpoint, or unreadable: the first load's error says why
        return []


def _read_checkpoint(p: Path) -> Any:
    """``torch.load(weights_only=True)`` of ``p``. Objects of classes it does not allow (e.g. a torchvision
    reference checkpoint's ``args``) are read as :class:`_Unread` stand-ins, so the state dict beside them loads;
    anything else is a one-line UsageError naming the cause and a fix."""
    if not p.is_file():
        raise UsageError(f"weights file not found: {p}")
    try:
        return torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt, not a torch file, or a class weights_only does not load
        first = e
    names = _unsafe_globals(p)
    if names:
        try:
            with torch.serialization.safe_globals([(_Unread, n) for n in names]):
                return torch.load(p, map_location="cpu", weights_only=True)
        except Exception as e:  # a blocked module (os, subprocess, ...): would run code
            log.debug("checkpoint %s with stand-ins for %s: %s", p, names, e)
        raise UsageError(f"cannot read checkpoint {p}: it needs {', '.join(names)}, which torch.load(weights_only="
                         f"True) does not run (code from the file); {_resave_hint(p)}") from None
    log.debug("torch.load(%s) failed", p, exc_info=first)
    raise UsageError(f"cannot read checkpoint {p}: {_load_cause(p, first)}; give a file written by torch.save "
                     "(copy it again if it was cut short)") from None


def _load_cause(p: Path, e: Exception) -> str:
    """Why ``torch.load`` could not read ``p``, in a few words (torch's own messages are paragraphs)."""
    import re
    import zipfile

    if p.stat().st_size == 0:
        return "the file is empty"
    text = one_line(e)
    m = re.search(r"WeightsUnpickler error:\s*(.*?)\s*(?:Check the documentation|$)", text)
    detail = m.group(1) if m else text.split(". ")[0]
    what = "a truncated or damaged torch.save archive" if zipfile.is_zipfile(p) or "zip archive" in text else \
        "not a PyTorch checkpoint"
    return f"{what} ({type(e).__name__}: {one_line(detail, 120)})"


def read_checkpoint(path: str | Path) -> Any:
    """What a checkpoint file holds, loaded as :func:`load_checkpoint_state` loads it (``weights_only``; objects
    of other classes as inert stand-ins); one-line UsageError when it cannot be read."""
    return _read_checkpoint(Path(path))


def checkpoint_arch(path: str | Path) -> str | None:
    """The model name a stage-2 checkpoint records (``best.pt``'s ``arch``, ``last.pt``'s ``config.student``),
    or None for other files."""
    obj = _read_checkpoint(Path(path))
    if not isinstance(obj, dict):
        return None
    config = obj.get("config")
    arch = obj.get("arch") or (config.get("student") if isinstance(config, dict) else None)
    return arch if isinstance(arch, str) else None


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


def load_checkpoint_state(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a checkpoint file -> state_dict: a bare state dict, or the ``model`` / ``state_dict`` /
    ``model_state_dict`` entry of a dict (torchvision's references, timm, Lightning-style and this project's
    checkpoints; their other entries are not needed and need not load). A UsageError names what the file holds
    instead, and how to re-save it."""
    p = Path(path)
    obj = _read_checkpoint(p)
    if _is_state_dict(obj):
        return _strip_prefixes(obj)
    if isinstance(obj, dict):
        for key in _STATE_KEYS:
            entry = obj.get(key)
            if _is_state_dict(entry):
                return _strip_prefixes(entry)
            if isinstance(entry, dict) and entry:
                odd = sorted({type(v).__name__ if not isinstance(v, _Unread) else "an object of a class torch.load("
                              "weights_only=True) does not load" for v in entry.values()
                              if not isinstance(v, torch.Tensor)})
                raise UsageError(f"checkpoint {p}: its '{key}' entry is not a state dict of tensors (it holds "
                                 f"{', '.join(odd)}); {_resave_hint(p, key)}")
        keys = ", ".join(repr(k) for k in list(obj)[:8]) + (", ..." if len(obj) > 8 else "")
        raise UsageError(f"checkpoint {p} holds no state dict: a dict with keys {keys} and none of "
                         f"{', '.join(_STATE_KEYS)}; save the model's weights with torch.save(model.state_dict(), "
                         "PATH), or {'model': model.state_dict()}")
    raise UsageError(f"checkpoint {p} holds no state dict but a {type(obj).__name__}; save the model's weights with "
                     "torch.save(model.state_dict(), PATH)")


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


def has_named_weights(name: str) -> bool:
    """Whether ``--weights DEFAULT`` means something for model ``name``: a ``timm/`` name with a pretrained tag, or
    a torchvision model with a weights enum (the project's own models and callables have none)."""
    if name.startswith("timm/"):
        import timm

        try:
            return timm.models.get_pretrained_cfg(name[len("timm/"):]) is not None
        except RuntimeError:
            return False
    if name not in torchvision_names():
        return False
    import torchvision.models as tvm

    try:
        tvm.get_model_weights(name)
        return True
    except (ValueError, KeyError):
        return False


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


def weights_kind(weights: str | None) -> str:
    """``none`` (random init), ``path`` (a checkpoint file) or ``named`` (DEFAULT or an enum name)."""
    if weights is None or str(weights).lower() == "none":
        return "none"
    return "path" if weights_identity(weights).get("sha256") else "named"


def create_model(name: str, num_classes: int | None, weights: str | None = None) -> nn.Module:
    """Build model ``name`` with ``num_classes`` outputs (None: the weights' own) and load ``weights`` (see the
    module docstring). Raises UsageError for unknown names, weights that do not exist or do not fit."""
    kind = weights_kind(weights)
    if name.startswith("timm/"):
        return _timm_model(name[len("timm/"):], num_classes, weights, kind)
    if ":" in name:
        build = _callable_builder(name)
    elif name in _MODELS:
        def build(c: int) -> nn.Module:
            return _MODELS[name](num_classes=c)
    elif name in torchvision_names():
        if kind == "named":
            return _torchvision_pretrained(name, str(weights), num_classes)
        import torchvision.models as tvm

        def build(c: int) -> nn.Module:
            return tvm.get_model(name, weights=None, num_classes=c)
    else:
        check_model_name(name)  # raises: no builder above takes this name
    if kind == "named":
        raise UsageError(f"model '{name}' has no named weights; give a checkpoint path or none")
    if kind == "path":
        return _from_checkpoint(build, name, str(weights), num_classes)
    if num_classes is None:
        raise UsageError(f"model '{name}' with random weights needs a number of classes")
    return build(num_classes)


def _torchvision_pretrained(name: str, weights: str, num_classes: int | None) -> nn.Module:
    import torchvision.models as tvm

    w = _torchvision_weights(name, weights)
    n_w = len(w.meta.get("categories", [])) or num_classes
    if num_classes is not None and n_w != num_classes:
        raise UsageError(f"weights {w} predict {n_w} classes but the dataset has {num_classes}")
    try:
        return tvm.get_model(name, weights=w)
    except Exception as e:  # no network here: say so in one line
        raise UsageError(f"cannot load torchvision weights {w}: {' '.join(str(e).split())[:200]}") from None


def _timm_model(tname: str, num_classes: int | None, weights: str | None, kind: str) -> nn.Module:
    """``timm.create_model``: pretrained (``DEFAULT``, timm's own download), random, or a checkpoint."""
    import timm

    if not timm.is_model(tname):
        raise UsageError(f"unknown timm model '{tname}' (see timm.list_models('{tname.split('.')[0]}*'))")
    try:
        native = timm.models.get_pretrained_cfg(tname).num_classes
    except RuntimeError as e:  # an invalid pretrained tag
        raise UsageError(f"timm model '{tname}': {e}") from None

    def build(c: int) -> nn.Module:
        return timm.create_model(tname, pretrained=False, num_classes=c)

    if kind == "path":
        return _from_checkpoint(build, f"timm/{tname}", str(weights), num_classes)
    if kind == "named":
        if str(weights) != "DEFAULT":
            raise UsageError(f"timm model '{tname}' takes --weights DEFAULT (timm's pretrained weights of its tag), "
                             "none or a checkpoint path; choose other weights with the tag: timm/<arch>.<tag>")
        try:
            return timm.create_model(tname, pretrained=True,
                                     **({} if num_classes is None else {"num_classes": num_classes}))
        except Exception as e:  # no network, no cached file
            raise UsageError(f"cannot load timm pretrained weights of {tname}: {' '.join(str(e).split())[:200]} "
                             "(no network? give a local checkpoint file)") from None
    return build(native if num_classes is None else num_classes)


def _callable_builder(name: str) -> Callable[[int], nn.Module]:
    """``module.path:function`` -> a builder calling it (with ``num_classes`` when it takes it)."""
    import importlib
    import inspect

    mod_name, _, fn_name = name.partition(":")
    try:
        fn = getattr(importlib.import_module(mod_name), fn_name)
    except ImportError as e:
        raise UsageError(f"cannot import module '{mod_name}' of model '{name}': {e}") from None
    except AttributeError:
        raise UsageError(f"module '{mod_name}' has no '{fn_name}' (model '{name}')") from None
    takes = "num_classes" in inspect.signature(fn).parameters

    def build(c: int) -> nn.Module:
        model = fn(num_classes=c) if takes else fn()
        if not isinstance(model, nn.Module):
            raise UsageError(f"model '{name}' returned {type(model).__name__}, not an nn.Module")
        return model

    return build


def _from_checkpoint(build: Callable[[int], nn.Module], name: str, path: str, num_classes: int | None) -> nn.Module:
    """Build with ``num_classes`` (None: the checkpoint's, read from its classifier) and load it strictly."""
    sd = load_checkpoint_state(path)
    n = num_classes if num_classes is not None else _checkpoint_classes(build, sd)
    model = build(n)
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        log.debug("load_state_dict(%s) into %s", path, name, exc_info=e)
        arch = checkpoint_arch(path)
        if arch and arch != name:
            raise UsageError(f"checkpoint {path} holds a '{arch}' model, not '{name}': name {arch} as the model "
                             "(--student or --teacher)") from None
        raise UsageError(f"checkpoint {path} does not fit {name} with {n} classes: "
                         f"{state_dict_mismatch(model.state_dict(), sd)}; name the architecture the checkpoint "
                         "was trained as (--teacher / --student), with the dataset it was trained on") from None
    return model


def state_dict_mismatch(want: dict[str, torch.Tensor], have: dict[str, torch.Tensor], show: int = 3) -> str:
    """What differs between a model's state dict (``want``) and a checkpoint's (``have``), in a few words: missing
    and unexpected keys (the first ``show`` of each) and tensors of another shape."""
    missing = [k for k in want if k not in have]
    unexpected = [k for k in have if k not in want]
    shapes = [k for k in want if k in have and tuple(want[k].shape) != tuple(have[k].shape)]

    def first(keys: list[str]) -> str:
        return ", ".join(keys[:show]) + (", ..." if len(keys) > show else "")

    parts = []
    if missing:
        parts.append(f"{len(missing)} key(s) of the model missing from the checkpoint ({first(missing)})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected key(s) in the checkpoint ({first(unexpected)})")
    if shapes:
        k = shapes[0]
        parts.append(f"{len(shapes)} tensor(s) of another shape ({k}: checkpoint {list(have[k].shape)}, model "
                     f"{list(want[k].shape)})")
    return "; ".join(parts) or "the state dicts differ"


def _checkpoint_classes(build: Callable[[int], nn.Module], sd: dict[str, torch.Tensor], probe: int = 7) -> int:
    """The class count a checkpoint was trained with: build a probe with ``probe`` classes and read the sizes of
    the tensors whose first dimension is that count (the classifier's weight and bias) from the checkpoint."""
    shapes = {k: tuple(v.shape) for k, v in build(probe).state_dict().items()}
    found = {sd[k].shape[0] for k, s in shapes.items() if k in sd and s and s[0] == probe and tuple(sd[k].shape) != s}
    if len(found) == 1:
        return int(found.pop())
    if not found:  # the checkpoint has `probe` classes itself (a wrong guess fails the strict load, named)
        return probe
    raise UsageError(f"cannot tell the number of classes of this checkpoint (classifier sizes {sorted(found)})")
