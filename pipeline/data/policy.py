"""View policies: the syntax of ``--view-policy`` and the per-view parameters a bank stores.

Syntax: parts joined by ``+``, geometry first::

    center | rrc[+flip] [+randaug(N,M) | +trivialaug | +autoaug] [+erasing(P)] [+mixup(A)] [+cutmix(A)]

- ``rrc``: a random-resized crop (the preset's scale and ratio), ``flip``: a random horizontal flip;
- ``randaug(N,M)`` (default 2, 9), ``trivialaug``, ``autoaug``: torchvision's ``RandAugment`` (31 magnitude
  bins), ``TrivialAugmentWide`` and ``AutoAugment`` (ImageNet policy): their op tables and magnitudes;
- ``erasing(P)`` (default 0.25): torchvision's ``RandomErasing`` with probability P (scale 0.02-0.33, ratio
  0.3-3.3, value 0 on the normalized image);
- ``mixup(A)`` / ``cutmix(A)`` (defaults 0.8, 1.0): timm's ``Mixup`` with Beta(A, A) (switch probability 0.5
  when both, mix probability 1, λ corrected to the clipped CutMix box's area).

Every random choice is drawn, per (seed, sample index, view), from ``np.random.default_rng([seed, index, view,
k])`` (k = 1 ops, 2 erasing, 3 mixing; the crop boxes keep their ``[seed, index]`` stream), and the mixing
partner of sample i in view v is ``perm_v[i]``, ``perm_v = default_rng([seed, 2, view]).permutation(N)``:
nothing depends on the batch, the rank, the number of workers or the loader. The draws are stored explicitly
(``view_params`` [N, V, A] float32, ``view_partner`` [N, V] int32), so a replay needs no RNG at all.

``view_params`` columns (:data:`PARAM_COLUMNS`, then ``op{k}``, ``mag{k}`` per op slot; A = 10 + 2·slots):
``erase_y, erase_x, erase_h, erase_w`` the erased box in fractions of the view (NaN: not erased);
``mix_kind`` 0 none, 1 mixup, 2 cutmix; ``lam`` the weight of the sample's own image and label (1 unmixed);
``cut_y, cut_x, cut_h, cut_w`` the pasted partner box in fractions of the view (NaN unless CutMix);
``op{k}`` the index in :data:`OP_NAMES` of the k-th operation applied (-1: none), ``mag{k}`` its signed
magnitude as torchvision passes it to the op.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from pipeline.errors import UsageError

SYNTAX = ("center | rrc[+flip][+randaug(N,M)|+trivialaug|+autoaug][+erasing(P)][+mixup(A)][+cutmix(A)], "
          "e.g. rrc+flip+randaug(2,9)+erasing(0.25)+mixup(0.8)+cutmix(1.0)")
OP_NAMES = ("Identity", "ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate", "Brightness", "Color", "Contrast",
            "Sharpness", "Posterize", "Solarize", "AutoContrast", "Equalize", "Invert")
PARAM_COLUMNS = ("erase_y", "erase_x", "erase_h", "erase_w", "mix_kind", "lam", "cut_y", "cut_x", "cut_h", "cut_w")
MIX_NONE, MIX_MIXUP, MIX_CUTMIX = 0, 1, 2
AUGMENTS = ("randaug", "trivialaug", "autoaug")
# timm Mixup's defaults: switch_prob between mixup and cutmix when both are on; torchvision RandomErasing's.
SWITCH_PROB = 0.5
ERASE_SCALE, ERASE_RATIO = (0.02, 0.33), (0.3, 3.3)
RANDAUG_BINS = 31


@dataclass(frozen=True)
class ViewPolicy:
    """A parsed ``--view-policy``: geometry (``center``, ``rrc``, ``rrc+flip``), one augmentation family
    (``augment`` with ``num_ops``, ``magnitude`` for randaug), ``erasing`` probability, Mixup / CutMix α (0 = off)."""

    geometry: str = "center"
    augment: str = ""
    num_ops: int = 2
    magnitude: int = 9
    erasing: float = 0.0
    mixup: float = 0.0
    cutmix: float = 0.0

    @property
    def stores_params(self) -> bool:
        """Whether views carry parameters beyond the crop box and flip (``view_params``, ``view_partner``)."""
        return bool(self.augment or self.erasing or self.mixup or self.cutmix)

    @property
    def mixes(self) -> bool:
        return self.mixup > 0 or self.cutmix > 0

    @property
    def op_slots(self) -> int:
        """Operations per view: N for randaug, 1 for trivialaug, 2 for autoaug (a sub-policy), else 0."""
        return {"randaug": self.num_ops, "trivialaug": 1, "autoaug": 2}.get(self.augment, 0)

    @property
    def num_params(self) -> int:
        """A, the width of ``view_params``."""
        return len(PARAM_COLUMNS) + 2 * self.op_slots

    def columns(self) -> list[str]:
        """Names of the A ``view_params`` columns."""
        return list(PARAM_COLUMNS) + [f"{c}{k}" for k in range(self.op_slots) for c in ("op", "mag")]

    def __str__(self) -> str:
        parts = [self.geometry]
        if self.augment == "randaug":
            parts.append(f"randaug({self.num_ops},{self.magnitude})")
        elif self.augment:
            parts.append(self.augment)
        for name in ("erasing", "mixup", "cutmix"):
            if getattr(self, name):
                parts.append(f"{name}({getattr(self, name):g})")
        return "+".join(parts)


_PART = re.compile(r"^([a-z]+)(?:\(([^()]*)\))?$")


def _numbers(name: str, args: str | None, defaults: tuple[float, ...]) -> tuple[float, ...]:
    if args is None:
        return defaults
    try:
        vals = tuple(float(a) for a in args.split(","))
    except ValueError:
        vals = ()
    if len(vals) != len(defaults):
        raise UsageError(f"view policy part '{name}({args})' takes {len(defaults)} number(s); syntax: {SYNTAX}")
    return vals


def parse_view_policy(text: str) -> ViewPolicy:
    """``"rrc+flip+randaug(2,9)+erasing(0.25)+mixup(0.8)+cutmix(1.0)"`` -> :class:`ViewPolicy`.

    Raises:
        UsageError: an unknown or misplaced part, a bad argument (one line listing the syntax).
    """
    parts = [p.strip() for p in str(text).strip().lower().split("+")]
    if not parts or parts[0] not in ("center", "rrc"):
        raise UsageError(f"view policy '{text}' must start with center or rrc; syntax: {SYNTAX}")
    fields: dict = {"geometry": parts[0]}
    for part in parts[1:]:
        m = _PART.match(part)
        name, args = (m.group(1), m.group(2)) if m else (part, None)
        if name == "flip" and args is None and fields["geometry"] == "rrc" and len(fields) == 1:
            fields["geometry"] = "rrc+flip"
        elif name in AUGMENTS and "augment" not in fields and not {"erasing", "mixup", "cutmix"} & set(fields):
            fields["augment"] = name
            if name == "randaug":
                n, mag = _numbers(name, args, (2, 9))
                if n != int(n) or mag != int(mag) or not 1 <= n <= 16 or not 0 <= mag < RANDAUG_BINS:
                    raise UsageError(f"randaug(N,M) needs 1 <= N <= 16 and 0 <= M <= 30; syntax: {SYNTAX}")
                fields.update(num_ops=int(n), magnitude=int(mag))
            elif args is not None:
                raise UsageError(f"view policy part '{part}' takes no arguments; syntax: {SYNTAX}")
        elif name in ("erasing", "mixup", "cutmix") and name not in fields and not (
                name == "erasing" and {"mixup", "cutmix"} & set(fields)) and not (
                name == "mixup" and "cutmix" in fields):
            (value,) = _numbers(name, args, {"erasing": (0.25,), "mixup": (0.8,), "cutmix": (1.0,)}[name])
            if not (0 < value <= 1 if name == "erasing" else value > 0):
                raise UsageError(f"{name}({value:g}) is out of range (erasing: 0 < P <= 1; mixup, cutmix: α > 0)")
            fields[name] = value
        else:
            raise UsageError(f"view policy part '{part}' is unknown or out of place in '{text}'; syntax: {SYNTAX}")
    policy = ViewPolicy(**fields)
    if policy.geometry == "center" and policy.stores_params:
        raise UsageError(f"view policy '{text}': augmentations need random views (start with rrc); syntax: {SYNTAX}")
    return policy


def parse_mix_policy(text: str) -> ViewPolicy:
    """``"mixup(0.8)+cutmix(1.0)"`` (stage 2's ``--mix-policy``) -> a :class:`ViewPolicy` that only mixes.

    Raises:
        UsageError: anything but mixup / cutmix parts, or neither."""
    bad = f"--mix-policy '{text}' must be mixup(A), cutmix(A) or mixup(A)+cutmix(A)"
    if not text.strip() or not all(p.strip().startswith(("mixup(", "cutmix(")) for p in text.split("+")):
        raise UsageError(bad)  # checked here: the view-policy parser would quote a policy the user never typed
    policy = parse_view_policy(f"rrc+{text}")
    if not policy.mixes or policy.augment or policy.erasing:
        raise UsageError(bad)
    return policy


def blend_rows(policy: ViewPolicy, seed: int, order: np.ndarray, epoch: int, size: int,
               num_samples: int) -> tuple[np.ndarray, np.ndarray]:
    """Stage 2's approximate mixing (``--mix-labels blend``) of samples ``order`` in ``epoch``: partners
    [len(order)] int64 (:func:`partner_permutation` with the epoch as the view) and rows [len(order), A] drawn as
    :func:`draw_params` with view = epoch; independent of batches and ranks, like the stored ones."""
    order = np.asarray(order, np.int64)
    partners = partner_permutation(seed, epoch, num_samples)[order].astype(np.int64)
    rows = np.stack([draw_params(policy, seed, int(i), epoch, size) for i in order]) if len(order) else \
        np.zeros((0, policy.num_params), np.float32)
    return partners, rows


# --- drawing ----------------------------------------------------------------------------------------------
@lru_cache(maxsize=1)
def _autoaug_policies() -> list:
    """torchvision's AutoAugment ImageNet sub-policies: ((op, probability, magnitude bin), (op, ...)) x 25."""
    import torchvision.transforms.v2 as T

    return T.AutoAugment()._policies


def _space(augment: str) -> dict:
    import torchvision.transforms.v2 as T

    return {"randaug": T.RandAugment, "trivialaug": T.TrivialAugmentWide,
            "autoaug": T.AutoAugment}[augment]._AUGMENTATION_SPACE


@lru_cache(maxsize=256)
def _bins(augment: str, name: str, bins: int, size: int) -> tuple[tuple[float, ...] | None, bool]:
    """torchvision's magnitude table of op ``name`` (``bins`` bins, a ``size`` x ``size`` image) and whether the
    op is signed; cached (the table is a function of these only)."""
    fn, signed = _space(augment)[name]
    mags = fn(bins, size, size)
    return (None if mags is None else tuple(float(m) for m in mags)), bool(signed)


def _magnitude(rng: np.random.Generator, augment: str, name: str, bins: int, index: int, size: int) -> float:
    """torchvision's magnitude of op ``name`` at bin ``index`` of ``bins`` for a ``size`` x ``size`` image, negated
    with probability 1/2 for signed ops (as its ``forward`` does)."""
    mags, signed = _bins(augment, name, bins, size)
    if mags is None:
        return 0.0
    mag = mags[index]
    return -mag if signed and rng.random() <= 0.5 else mag


def draw_ops(policy: ViewPolicy, rng: np.random.Generator, size: int) -> list[tuple[int, float]]:
    """The (op index in :data:`OP_NAMES`, signed magnitude) pairs of one view, ``op_slots`` long (-1: none),
    drawn as torchvision's ``RandAugment`` / ``TrivialAugmentWide`` / ``AutoAugment.forward`` draw them."""
    if not policy.augment:
        return []
    aug = policy.augment
    names = list(_space(aug))
    if aug == "randaug":
        out = []
        for _ in range(policy.num_ops):
            name = names[int(rng.integers(len(names)))]
            out.append((OP_NAMES.index(name), _magnitude(rng, aug, name, RANDAUG_BINS, policy.magnitude, size)))
        return out
    if aug == "trivialaug":
        name = names[int(rng.integers(len(names)))]
        return [(OP_NAMES.index(name), _magnitude(rng, aug, name, RANDAUG_BINS, int(rng.integers(RANDAUG_BINS)),
                                                  size))]
    policies = _autoaug_policies()
    out = []
    for name, prob, idx in policies[int(rng.integers(len(policies)))]:
        if rng.random() <= prob:
            out.append((OP_NAMES.index(name), _magnitude(rng, aug, name, 10, idx if idx is not None else 0, size)))
        else:
            out.append((-1, 0.0))
    return out


def draw_erasing(p: float, rng: np.random.Generator, size: int) -> tuple[float, float, float, float]:
    """torchvision ``RandomErasing.make_params`` (10 tries) with probability ``p`` on a ``size`` x ``size`` view:
    the box (y, x, h, w) in fractions, or NaNs when not erased."""
    nan = (math.nan,) * 4
    if p <= 0 or rng.random() >= p:
        return nan
    area = size * size
    log_ratio = (math.log(ERASE_RATIO[0]), math.log(ERASE_RATIO[1]))
    for _ in range(10):
        erase_area = area * rng.uniform(*ERASE_SCALE)
        aspect = math.exp(rng.uniform(*log_ratio))
        h, w = int(round(math.sqrt(erase_area * aspect))), int(round(math.sqrt(erase_area / aspect)))
        if h < size and w < size:
            i, j = int(rng.integers(0, size - h + 1)), int(rng.integers(0, size - w + 1))
            return i / size, j / size, h / size, w / size
    return nan


def draw_mixing(policy: ViewPolicy, rng: np.random.Generator, size: int) -> tuple[float, ...]:
    """timm ``Mixup._params_per_elem`` then ``cutmix_bbox_and_lam`` (correct_lam) for one view of ``size`` pixels:
    (kind, λ, cut_y, cut_x, cut_h, cut_w), box in fractions (NaN unless CutMix)."""
    nan = (math.nan,) * 4
    if not policy.mixes:
        return (MIX_NONE, 1.0, *nan)
    if policy.mixup > 0 and policy.cutmix > 0:
        cut = rng.random() < SWITCH_PROB
    else:
        cut = policy.cutmix > 0
    lam = float(rng.beta(policy.cutmix, policy.cutmix) if cut else rng.beta(policy.mixup, policy.mixup))
    if not cut:
        return (MIX_MIXUP, lam, *nan)
    ratio = math.sqrt(1 - lam)
    cut_h, cut_w = int(size * ratio), int(size * ratio)
    cy, cx = int(rng.integers(0, size)), int(rng.integers(0, size))
    yl, yh = int(np.clip(cy - cut_h // 2, 0, size)), int(np.clip(cy + cut_h // 2, 0, size))
    xl, xh = int(np.clip(cx - cut_w // 2, 0, size)), int(np.clip(cx + cut_w // 2, 0, size))
    lam = 1.0 - (yh - yl) * (xh - xl) / float(size * size)
    return (MIX_CUTMIX, lam, yl / size, xl / size, (yh - yl) / size, (xh - xl) / size)


def draw_params(policy: ViewPolicy, seed: int, index: int, view: int, size: int) -> np.ndarray:
    """One view's ``view_params`` row [A] float32 for sample ``index``: ops from ``default_rng([seed, index, view,
    1])``, erasing from ``[..., 2]``, mixing from ``[..., 3]``; ``size``: the view's side in pixels (the preset's
    crop)."""
    row = np.full(policy.num_params, np.nan, np.float32)
    row[0:4] = draw_erasing(policy.erasing, np.random.default_rng([seed, index, view, 2]), size)
    row[4:10] = draw_mixing(policy, np.random.default_rng([seed, index, view, 3]), size)
    for k, (op, mag) in enumerate(draw_ops(policy, np.random.default_rng([seed, index, view, 1]), size)):
        row[10 + 2 * k: 12 + 2 * k] = (op, mag)
    return row


def partner_permutation(seed: int, view: int, num_samples: int) -> np.ndarray:
    """[N] int32: the mixing partner of each sample in ``view`` (``default_rng([seed, 2, view]).permutation(N)``):
    a function of the seed, the view and the dataset size only."""
    return np.random.default_rng([seed, 2, view]).permutation(num_samples).astype(np.int32)
