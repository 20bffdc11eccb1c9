"""Model registry: ``create_model(name, num_classes, weights)``; see :mod:`pipeline.models.registry`."""

from pipeline.models import cifar as _cifar  # noqa: F401  (registers CIFAR ResNets, MobileNetV1, demo CNNs)
from pipeline.models.registry import (
    available_models,
    create_model,
    file_sha256,
    load_checkpoint_state,
    register_model,
    weights_identity,
)

from pipeline.models.ensemble import TeacherEnsemble, build_ensemble  # noqa: E402

__all__ = ["TeacherEnsemble", "build_ensemble", "available_models", "create_model", "file_sha256", "load_checkpoint_state", "register_model",
           "weights_identity"]
