"""Embedding-level losses (RKD, PKT, SP, CRD, FitNet) and the registry's feature support."""

from __future__ import annotations

import pytest
from torch import nn

import kd_losses
from kd_losses import registry

EMBEDDING: set[str] = set()

# --- registry -------------------------------------------------------------------------------------


def test_needs_features_flags() -> None:
    for name in kd_losses.available_losses():
        assert kd_losses.needs_features(name) is (name in EMBEDDING), name
        assert kd_losses.get_loss(name).needs_features is (name in EMBEDDING), name
        assert kd_losses.get_spec(name).needs_features is (name in EMBEDDING), name
    for name in EMBEDDING:
        assert kd_losses.needs_teacher(name)
    with pytest.raises(KeyError, match="unknown loss 'foo'"):
        kd_losses.needs_features("foo")


def test_build_args_are_filled_and_required(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))

    @kd_losses.register_loss("probe", needs_features=True)
    class Probe(nn.Module):
        def __init__(self, num_samples: int, student_dim: int, teacher_dim: int, num_teachers: int = 1,
                     scale: float = 1.0) -> None:
            super().__init__()
            self.args = (num_samples, student_dim, teacher_dim, num_teachers, scale)

    assert kd_losses.get_spec("probe").hparam_names() == ["scale"]
    built = kd_losses.build_loss("probe", num_classes=3, num_samples=10, student_dim=4, teacher_dim=5, scale=2.0)
    assert built.args == (10, 4, 5, 1, 2.0)  # num_teachers keeps its default; num_classes is not taken
    assert kd_losses.build_loss("probe", num_samples=1, student_dim=2, teacher_dim=3, num_teachers=2).args[3] == 2
    with pytest.raises(TypeError, match="^loss 'probe' needs student_dim$"):
        kd_losses.build_loss("probe", num_samples=10, teacher_dim=5)
    with pytest.raises(TypeError, match="^unknown hparam"):  # a build argument is not an hparam
        kd_losses.build_loss("probe", num_samples=10, student_dim=4, teacher_dim=5, dims=3)


def test_function_losses_ignore_feature_build_args() -> None:
    built = kd_losses.build_loss("kd", num_classes=3, num_samples=10, student_dim=4, teacher_dim=5, num_teachers=2)
    assert built.hparams == {} and built.needs_features is False
