"""Soft-label / distillation losses, built by name.

Every loss is called as ``loss_fn(student_logits [B, C], batch) -> {"loss": scalar, **detached parts}``
where ``batch`` holds ``label`` [B] int64 and, for methods with ``needs_teacher(name)``,
``teacher_logits`` [B, T, C] (raw logits of T teachers) or, from a top-k or sampled bank, ``teacher_target``
(a :class:`kd_losses.targets.SparseTarget`, turned into the target at each loss's temperature by
:func:`kd_losses.targets.teacher_log_probs`; ``check_teacher_format`` says which methods read which formats). Single-teacher methods given T > 1 teachers
average the teachers' logits. Methods with ``needs_features(name)`` (``kd_losses.embedding``: rkd, pkt,
sp, crd, fitnet) also read ``student_features`` [B, D_s], ``teacher_features`` [B, T, D_t] and, for crd,
``index`` [B]. Inputs in fp16/bf16 are upcast; losses are computed in float32 (float64 stays float64).

    >>> import kd_losses
    >>> loss_fn = kd_losses.build_loss("kd", num_classes=100, T=4.0, alpha=0.9)
"""

from kd_losses.registry import (
    LossSpec,
    UnknownLossError,
    available_losses,
    build_loss,
    check_hparams,
    get_loss,
    get_spec,
    needs_features,
    needs_teacher,
    register_loss,
)
from kd_losses.targets import SparseTarget, check_teacher_format

# Importing the modules registers their losses.
from kd_losses import classic, dist, dkd, embedding, soft_label, tfkd, wsld  # noqa: E402,F401  isort: skip

__all__ = [
    "LossSpec",
    "SparseTarget",
    "check_teacher_format",
    "UnknownLossError",
    "available_losses",
    "build_loss",
    "check_hparams",
    "get_loss",
    "get_spec",
    "needs_features",
    "needs_teacher",
    "register_loss",
]
