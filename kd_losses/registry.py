"""Loss registry: ``register_loss`` / ``get_loss`` / ``available_losses`` / ``build_loss``.

A loss is either a function ``fn(student_logits, batch, **hparams) -> dict[str, Tensor]`` or an
``nn.Module`` subclass whose ``forward(student_logits, batch)`` returns the same dict (SL-Enc, CRD, FitNet,
which have parameters or buffers). ``build_loss`` binds and validates hparams and always returns an
``nn.Module``, so the training loop can call ``.to(device)``, ``.parameters()`` and ``.state_dict()``
without knowing which kind it got.
"""

from __future__ import annotations

import inspect
import math
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from kd_losses._common import Batch, LossDict, check_choice

# Leading positional parameters of a loss function that are inputs, not hparams.
_INPUT_PARAMS = ("student_logits", "batch")
# Constructor arguments of module losses that build_loss fills in itself (never user hparams).
_BUILD_ARGS = ("num_classes", "num_samples", "student_dim", "teacher_dim", "num_teachers")


class UnknownLossError(KeyError, ValueError):
    """Unknown loss name. ``str`` is one line: ``unknown loss 'foo'; valid: ce, dist, ...``."""

    def __str__(self) -> str:  # KeyError.__str__ would repr() the message
        return str(self.args[0]) if self.args else ""


@dataclass(frozen=True)
class LossSpec:
    """One registry entry: the loss callable (function or ``nn.Module`` class) and its needs."""

    name: str
    fn: Callable[..., Any]
    needs_teacher: bool
    needs_features: bool = False
    sparse_formats: tuple[str, ...] = ("topk", "sampled")  # compact formats whose sparse target it reads correctly
    merge: str = "mean_logits"  # how it combines several teachers: mean_logits, mean_probs or each
    sparse_reason: str = ""  # why it refuses the others (one clause, for the refusal)

    @property
    def is_module(self) -> bool:
        return isinstance(self.fn, type) and issubclass(self.fn, nn.Module)

    def _signature_target(self) -> Callable[..., Any]:
        return self.fn.__init__ if self.is_module else self.fn

    def hparam_names(self) -> list[str]:
        """Names ``build_loss`` accepts as hparams, in signature order."""
        params = list(inspect.signature(self._signature_target()).parameters.values())
        skip = {"self", *_BUILD_ARGS} if self.is_module else set(_INPUT_PARAMS)
        return [
            p.name
            for p in params
            if p.name not in skip and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
        ]

    def accepts(self, arg: str) -> bool:
        return arg in inspect.signature(self._signature_target()).parameters

    def resolved_hparams(self, hparams: dict[str, Any]) -> dict[str, Any]:
        """Every hparam with its value: ``hparams`` where given, else the signature's default (what a run
        records in its config.yaml, so the run describes itself)."""
        params = inspect.signature(self._signature_target()).parameters
        return {name: hparams.get(name, params[name].default) for name in self.hparam_names()
                if name in hparams or params[name].default is not inspect.Parameter.empty}

    def requires(self, arg: str) -> bool:
        """Whether the signature takes ``arg`` without a default."""
        param = inspect.signature(self._signature_target()).parameters.get(arg)
        return param is not None and param.default is inspect.Parameter.empty

    def check_choices(self, hparams: dict[str, Any]) -> None:
        """Validate hparams annotated ``Literal[...]`` (e.g. ``convention``, ``form``)."""
        hints = typing.get_type_hints(self._signature_target())
        for key, value in hparams.items():
            hint = hints.get(key)
            if typing.get_origin(hint) is typing.Literal:
                check_choice(self.name, key, value, typing.get_args(hint))


# Admissible values of hparams by name, shared by every loss that takes them: (low, high, low open, high open,
# integer). A value outside (or of the wrong type) is a one-line ValueError before any training starts.
_RANGES: dict[str, tuple[float, float, bool, bool, bool]] = {
    "T": (0.0, math.inf, True, True, False), "nce_t": (0.0, math.inf, True, True, False),
    "eps": (0.0, 1.0, False, True, False), "a": (0.0, 1.0, True, True, False),
    "momentum": (0.0, 1.0, False, False, False),
    "feat_dim": (1, math.inf, False, True, True), "nce_k": (1, math.inf, False, True, True),
    "noise_dim": (1, math.inf, False, True, True), "hidden": (1, math.inf, False, True, True),
    "warmup_epochs": (0, math.inf, False, True, True), "noise_std": (0.0, math.inf, False, True, False),
}
_NONNEGATIVE = ("alpha", "beta", "gamma", "weight", "multiplier")  # and every "*_weight"
# Where a loss's own form bounds a key further: alpha mixes (1 - alpha) * CE + alpha * KD (above 1 the run would
# maximise the cross-entropy).
_LOSS_RANGES: dict[tuple[str, str], tuple[float, float, bool, bool, bool]] = {
    (name, "alpha"): (0.0, 1.0, False, False, False) for name in ("kd", "tfkd_self", "tfkd_reg")}


def _range_of(key: str, loss_name: str = "") -> tuple[float, float, bool, bool, bool] | None:
    if (loss_name, key) in _LOSS_RANGES:
        return _LOSS_RANGES[(loss_name, key)]
    if key in _RANGES:
        return _RANGES[key]
    if key in _NONNEGATIVE or key.endswith("_weight"):
        return (0.0, math.inf, False, True, False)
    return None


def check_range(loss_name: str, key: str, value: Any) -> None:
    """One-line ValueError when hparam ``key`` of ``loss_name`` is not a number in its admissible range (a
    temperature ``T`` > 0, weights and mixing coefficients >= 0, ``eps`` in [0, 1), Tf-KD's ``a`` in (0, 1), sizes
    integers >= 1; ``alpha`` of kd / tfkd_self / tfkd_reg, which weighs the cross-entropy by 1 - alpha, in [0, 1])."""
    rng = _range_of(key, loss_name)
    if rng is None:
        if key == "use_gt" and not isinstance(value, bool):
            raise ValueError(f"loss {loss_name!r}: {key} must be true or false, got {value!r}")
        return
    lo, hi, lo_open, hi_open, integer = rng
    kind = "an integer" if integer else "a number"
    ok_type = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok_type or (not integer and not math.isfinite(value)):
        raise ValueError(f"loss {loss_name!r}: {key} must be {kind}, got {value!r}")
    if (value < lo or (lo_open and value == lo)) or (value > hi or (hi_open and value == hi)):
        interval = f"{'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
        raise ValueError(f"loss {loss_name!r}: {key}={value!r} is outside {interval}; pass loss.{key}=VALUE in "
                         f"{interval}")


_REGISTRY: dict[str, LossSpec] = {}


def register_loss(
    name: str, *, needs_teacher: bool = True, needs_features: bool = False,
    sparse_formats: tuple[str, ...] = ("topk", "sampled"), merge: str = "mean_logits", sparse_reason: str = "",
) -> Callable[[Any], Any]:
    """Decorator registering a loss function or ``nn.Module`` class under ``name``.

    ``sparse_formats``: the compact formats (``topk``, ``sampled``) whose ``batch['teacher_target']`` the loss
    reads correctly through :mod:`kd_losses.targets` (stage 2 refuses the others in one line, giving
    ``sparse_reason``); ``merge``: how it combines several teachers (``mean_logits``, ``mean_probs``, ``each``).

    ``needs_teacher`` says whether the loss needs a teacher: ``batch['teacher_logits']`` or, with
    ``needs_features``, the teachers' stored embeddings. ``needs_features`` says whether the batch must
    carry ``student_features`` [B, D_s] and ``teacher_features`` [B, T, D_t]. Both are also set as
    attributes on the decorated object. Registering a name twice raises ``ValueError``.
    """

    def decorator(obj: Any) -> Any:
        if name in _REGISTRY:
            raise ValueError(f"loss {name!r} is already registered (by {_REGISTRY[name].fn!r})")
        _REGISTRY[name] = LossSpec(
            name=name, fn=obj, needs_teacher=needs_teacher, needs_features=needs_features,
            sparse_formats=tuple(sparse_formats), merge=merge, sparse_reason=sparse_reason,
        )
        obj.needs_teacher = needs_teacher
        obj.needs_features = needs_features
        return obj

    return decorator


def available_losses() -> list[str]:
    """Sorted names of all registered losses."""
    return sorted(_REGISTRY)


def get_spec(name: str) -> LossSpec:
    """Registry entry for ``name``; ``UnknownLossError`` (a ``KeyError``) listing valid names if absent."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UnknownLossError(
            f"unknown loss {name!r}; valid: {', '.join(available_losses())}"
        ) from None


def get_loss(name: str) -> Callable[..., Any]:
    """The registered function or ``nn.Module`` class (unbound hparams)."""
    return get_spec(name).fn


def needs_teacher(name: str) -> bool:
    """Whether loss ``name`` needs a teacher (``batch['teacher_logits']``, or its features)."""
    return get_spec(name).needs_teacher


def needs_features(name: str) -> bool:
    """Whether loss ``name`` reads ``batch['student_features']`` and ``batch['teacher_features']``."""
    return get_spec(name).needs_features


class BoundLoss(nn.Module):
    """A loss function with its hparams bound; ``forward(student_logits [B, C], batch) -> dict``.

    Holds no parameters; it exists so every built loss is an ``nn.Module``.
    """

    def __init__(
        self,
        spec: LossSpec,
        hparams: dict[str, Any],
        num_classes: int | None = None,
    ) -> None:
        super().__init__()
        self.name = spec.name
        self.fn = spec.fn
        self.hparams = dict(hparams)
        self.needs_teacher = spec.needs_teacher
        self.needs_features = spec.needs_features
        self.num_classes = num_classes

    def forward(self, student_logits: Tensor, batch: Batch) -> LossDict:
        if self.num_classes is not None and student_logits.shape[-1] != self.num_classes:
            raise ValueError(
                f"loss {self.name!r} built for num_classes={self.num_classes}, "
                f"got student_logits of shape {tuple(student_logits.shape)}"
            )
        return self.fn(student_logits, batch, **self.hparams)

    def extra_repr(self) -> str:
        return ", ".join([repr(self.name), *(f"{k}={v!r}" for k, v in self.hparams.items())])


def check_hparams(name: str, hparams: dict[str, Any]) -> LossSpec:
    """The spec of loss ``name`` after checking ``hparams`` against its signature: an unknown name raises
    ``TypeError`` listing the valid ones, a ``Literal`` hparam outside its choices or a value outside its range
    (:func:`check_range`) ``ValueError``."""
    spec = get_spec(name)
    valid = spec.hparam_names()
    unknown = sorted(set(hparams) - set(valid))
    if unknown:
        raise TypeError(
            f"unknown hparam(s) for loss {name!r}: {', '.join(unknown)}; "
            f"valid: {', '.join(valid) if valid else '(none)'}"
        )
    spec.check_choices(hparams)
    for key, value in hparams.items():
        if key != "epoch":
            check_range(name, key, value)
    return spec


def build_loss(
    name: str,
    *,
    num_classes: int | None = None,
    num_samples: int | None = None,
    student_dim: int | None = None,
    teacher_dim: int | None = None,
    num_teachers: int | None = None,
    **hparams: Any,
) -> nn.Module:
    """Build loss ``name`` with ``hparams`` bound; always returns an ``nn.Module``.

    - Unknown hparam names raise ``TypeError`` listing the valid ones (from the signature).
    - ``Literal`` hparams (``convention``, ``form``) are checked here, not at the first batch.
    - The build arguments (``num_classes``, ``num_samples`` = training-set size, ``student_dim`` = D_s,
      ``teacher_dim`` = D_t, ``num_teachers`` = T) go to module losses whose constructor takes them
      (``sl_enc``, ``crd``, ``fitnet``); one the constructor requires but that is ``None`` raises
      ``TypeError`` naming it. They are never hparams. For function losses ``num_classes`` only checks
      the class dimension of ``student_logits`` at call time and the others are ignored.
    """
    spec = check_hparams(name, hparams)
    if not spec.is_module:
        return BoundLoss(spec, hparams, num_classes)
    kwargs = dict(hparams)
    build_args = {
        "num_classes": num_classes,
        "num_samples": num_samples,
        "student_dim": student_dim,
        "teacher_dim": teacher_dim,
        "num_teachers": num_teachers,
    }
    for arg in _BUILD_ARGS:
        if not spec.accepts(arg):
            continue
        if build_args[arg] is not None:
            kwargs[arg] = build_args[arg]
        elif spec.requires(arg):
            raise TypeError(f"loss {name!r} needs {arg}")
    return spec.fn(**kwargs)
