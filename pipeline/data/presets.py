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

    def eval_transform(self) -> tuple:
        """What the eval transform depends on (resize, crop, crop mode, interpolation, normalization): presets equal
        here see val images alike, whatever their training augmentation (``demo`` and ``demo_rrc``)."""
        return self.resize, self.crop, self.crop_mode, self.interpolation, self.mean, self.std

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
    """The preset called ``name`` (UsageError naming the valid ones)."""
    if name not in PRESETS:
        raise UsageError(f"unknown preprocessing preset '{name}'; valid: auto, {TRAIN_SIZE} (stage 1), "
                         f"{', '.join(sorted(PRESETS))}")
    return PRESETS[name]


TRAIN_SIZE = "train-size"  # --preset train-size: auto, but timm models at their training input size


def weights_preprocess(arch: str, weights: str | None, test_size: bool = True) -> Preprocess | None:
    """The eval preprocessing a model's weights were trained with, or None when the weights do not say.

    timm models (``timm/<name>``): the pretrained config of the name's tag, as ``timm.data.resolve_data_config``
    gives it for evaluation (timm's ``validate.py``): the test-time input size and ``crop_pct`` where the tag
    registers them (``test_input_size``, ``test_crop_pct``), else the training ones; ``test_size=False`` keeps
    the training ones (``--preset train-size``). Resize = floor(size / crop_pct); crop mode, interpolation, mean
    and std as configured; whatever the weights (timm's own scripts do the same). torchvision models with named
    weights: the enum's ``transforms()`` (resize, crop, interpolation, mean, std).
    """
    import math

    if arch.startswith("timm/"):
        import timm
        from timm.data import resolve_data_config

        cfg = timm.models.get_pretrained_cfg(arch[len("timm/"):])
        if cfg is None:
            return None
        data = resolve_data_config({}, pretrained_cfg=cfg.to_dict(), use_test_size=test_size)
        size = int(data["input_size"][-1])
        interpolation = data["interpolation"] if data["interpolation"] in INTERPOLATIONS else "bicubic"
        return Preprocess(arch, math.floor(size / data["crop_pct"]), size, tuple(data["mean"]), tuple(data["std"]),
                          interpolation=interpolation, crop_mode=data["crop_mode"])
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


def checkpoint_preprocess(path: str) -> Preprocess | None:
    """The preprocessing a checkpoint of this project was trained with: its ``preprocessing`` record (stage 2
    writes one into ``last.pt`` and ``best.pt``), else, for older checkpoints, the preset its ``config`` names;
    None for other files (a torchvision or timm checkpoint says nothing usable)."""
    from pipeline.models.registry import read_checkpoint

    obj = read_checkpoint(path)
    if not isinstance(obj, dict):
        return None
    rec = obj.get("preprocessing")
    if isinstance(rec, dict) and "crop" in rec:
        return Preprocess.from_record(rec)
    config = obj.get("config")
    name = config.get("preset") if isinstance(config, dict) else None
    return PRESETS.get(name) if isinstance(name, str) else None


def teacher_preprocess(arch: str, weights: str | None, preset: str, manifest: Any) -> tuple[Preprocess, str]:
    """A teacher's preprocessing in stage 1, and where it came from (recorded in the bank): ``--preset NAME``;
    else (``auto``, ``train-size``) the checkpoint's own (a checkpoint of this project records what it was trained
    with), else the weights' own (:func:`weights_preprocess`), else the dataset layout's default."""
    if preset not in ("auto", TRAIN_SIZE):
        return get_preset(preset), f"--preset {preset}"
    from pipeline.models.registry import weights_kind

    if weights_kind(weights) == "path":
        pre = checkpoint_preprocess(str(weights))
        if pre is not None:
            return pre, f"checkpoint {weights} (trained with preprocessing '{pre.name}')"
    pre = weights_preprocess(arch, weights, test_size=preset != TRAIN_SIZE)
    if pre is not None:
        if arch.startswith("timm/"):
            size = "training" if preset == TRAIN_SIZE else "test-time"
            return pre, f"timm pretrained config of {arch[len('timm/'):]} ({size} input size)"
        return pre, f"torchvision weights {weights} (transforms())"
    from pipeline.data.layouts import layout_of

    name = layout_of(manifest).default_preset
    return get_preset(name), f"the {manifest.layout} layout's default ({name})"


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


def typical_side(manifest: Any, sample: int = 64) -> int | None:
    """The median shorter side (pixels) of up to ``sample`` images spread evenly over ``manifest`` (read from
    their headers, no decode), or None when none could be read."""
    import numpy as np

    from pipeline.data.layouts import layout_of

    layout = layout_of(manifest)
    sides = []
    for i in np.unique(np.linspace(0, len(manifest) - 1, min(sample, len(manifest))).astype(int)):
        try:
            sides.append(min(layout.image_size(manifest, int(i))))
        except Exception:  # noqa: BLE001  (an unreadable file: the pre-scan names it)
            continue
    return int(np.median(sides)) if sides else None


def upscale_warning(choices: list[tuple[Preprocess, str]], side: int | None, factor: float = 2.0) -> str | None:
    """A one-line warning when a preprocessing chosen automatically crops more than ``factor`` times the images'
    typical side ``side`` (28 px Fashion-MNIST through ImageNet's 224 px: 8x the pixels to decode and run, and
    unlike what a small-image teacher saw), naming the sizes and the presets that fit; None otherwise.
    ``choices``: each teacher's (preprocessing, source) from :func:`teacher_preprocess`."""
    if side is None:
        return None
    big = [(p, src) for p, src in dict.fromkeys(choices) if not src.startswith("--preset") and p.crop > factor * side]
    if not big:
        return None
    fit = [f"{n} ({p.crop} px)" for n, p in sorted(PRESETS.items()) if p.crop <= factor * side]
    what = "; ".join(f"'{p.name}' crops {p.crop} px (from {src})" for p, src in big)
    return (f"the images are about {side} px (median shorter side of a sample) but {what}: each image is upscaled "
            f"{max(p.crop for p, _ in big) / side:.1f}x, which is slow and unlike small-image training; if the "
            f"models are meant for images this small, pass --preset NAME; presets that fit: "
            f"{', '.join(fit) if fit else 'none (add one in pipeline/data/presets.py)'}")
