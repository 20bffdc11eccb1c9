"""Preprocessing presets: the exact eval and train transforms per dataset family.

The preset is part of a bank's cache key and attrs: a bank dumped with one preset is only exact for
students evaluated with the same eval transform.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

from pipeline.errors import UsageError


@dataclass(frozen=True)
class Preprocess:
    """Eval: resize shorter side to ``resize`` then center-crop ``crop``. Train: ``train`` augmentation.

    ``mean``/``std`` are in [0, 1] pixel units (multiplied by 255 for DALI).
    ``train``: ``rrc`` = random-resized-crop(crop, scale, ratio) + flip (ImageNet);
    ``pad_crop`` = pad ``pad`` pixels, random crop ``crop`` + flip (CIFAR).
    ``interpolation``: ``bilinear``, ``bicubic`` or ``nearest`` (every resize, both loaders).
    ``crop_mode``: ``center`` (resize the shorter side, center crop) or ``squash`` (resize both sides to
    ``resize``, then center crop), timm's two eval modes.
    """

    name: str
    resize: int
    crop: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    train: str = "rrc"
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    pad: int = 4
    interpolation: str = "bilinear"
    crop_mode: str = "center"

    def __post_init__(self) -> None:
        if self.interpolation not in INTERPOLATIONS:
            raise UsageError(f"preprocessing '{self.name}': interpolation '{self.interpolation}' is not supported; "
                             f"valid: {', '.join(INTERPOLATIONS)}")
        if self.crop_mode not in CROP_MODES:
            raise UsageError(f"preprocessing '{self.name}': crop mode '{self.crop_mode}' is not supported; valid: "
                             f"{', '.join(CROP_MODES)}")

    def to_dict(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}

    @classmethod
    def from_record(cls, rec: dict) -> "Preprocess":
        """The preprocessing a bank's ``preprocessing`` attr records (its other keys, e.g. ``teacher_amp``, are
        not preprocessing and are ignored)."""
        kwargs = {f.name: rec[f.name] for f in fields(cls) if f.name in rec}
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()})


INTERPOLATIONS = ("bilinear", "bicubic", "nearest")
CROP_MODES = ("center", "squash")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

PRESETS: dict[str, Preprocess] = {
    "imagenet": Preprocess("imagenet", 256, 224, IMAGENET_MEAN, IMAGENET_STD, "rrc"),
    "cifar": Preprocess("cifar", 32, 32, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762), "pad_crop"),
    # Fashion-MNIST (28 px) resized to 32 px so the CIFAR-style models apply unchanged.
    "demo": Preprocess("demo", 32, 32, (0.286, 0.286, 0.286), (0.353, 0.353, 0.353), "pad_crop"),
    # The demo set with ImageNet-style random-resized-crop training (view-replay experiments).
    "demo_rrc": Preprocess("demo_rrc", 32, 32, (0.286, 0.286, 0.286), (0.353, 0.353, 0.353), "rrc", (0.25, 1.0)),
    # Tiny images for fast tests on generated trees.
    "tiny": Preprocess("tiny", 20, 16, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), "rrc", (0.25, 1.0)),
}


def get_preset(name: str) -> Preprocess:
    if name not in PRESETS:
        raise UsageError(f"unknown preprocessing preset '{name}'; valid: auto, {', '.join(sorted(PRESETS))}")
    return PRESETS[name]


def weights_preprocess(arch: str, weights: str | None) -> Preprocess | None:
    """The eval preprocessing a model's weights were trained with, or None when the weights do not say.

    timm models (``timm/<name>``): the pretrained config of the name's tag, as
    ``timm.data.resolve_data_config`` gives it (input size, ``crop_pct`` -> resize = floor(size / crop_pct),
    crop mode, interpolation, mean, std), whatever the weights (timm's own scripts do the same). torchvision
    models with named weights: the enum's ``transforms()`` (resize, crop, interpolation, mean, std).
    """
    import math

    if arch.startswith("timm/"):
        import timm

        cfg = timm.models.get_pretrained_cfg(arch[len("timm/"):])
        if cfg is None:
            return None
        size = int(cfg.input_size[-1])
        return Preprocess(arch, math.floor(size / cfg.crop_pct), size, tuple(cfg.mean), tuple(cfg.std),
                          interpolation=cfg.interpolation if cfg.interpolation in INTERPOLATIONS else "bicubic",
                          crop_mode=cfg.crop_mode)
    from pipeline.models.registry import torchvision_names, weights_kind

    if weights is None or str(weights).lower() == "none" or arch not in torchvision_names():
        return None
    if weights_kind(weights) != "named":
        return None
    import torchvision.models as tvm

    enum = tvm.get_model_weights(arch)
    w = enum.DEFAULT if weights == "DEFAULT" else enum[str(weights).split(".")[-1]]
    t = w.transforms()
    return Preprocess(f"torchvision/{w}", int(t.resize_size[0]), int(t.crop_size[0]), tuple(t.mean), tuple(t.std),
                      interpolation=t.interpolation.value)


def resolve_preset(name: str, manifest: Any, bank_preprocessing: dict | None = None) -> Preprocess:
    """The preprocessing of a run: ``name`` when given; with ``auto``, the bank's (a student sees the images as
    its teacher saw them) when there is one, else the dataset layout's default (``cifar`` for CIFAR pickles,
    ``imagenet`` otherwise). ``manifest``: a :class:`pipeline.data.Manifest`."""
    if name != "auto":
        return get_preset(name)
    if bank_preprocessing and bank_preprocessing.get("name") in PRESETS:
        return PRESETS[bank_preprocessing["name"]]
    if bank_preprocessing and "crop" in bank_preprocessing:
        return Preprocess.from_record(bank_preprocessing)
    from pipeline.data.layouts import layout_of

    return get_preset(layout_of(manifest).default_preset)
