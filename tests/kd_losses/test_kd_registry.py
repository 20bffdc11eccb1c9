"""Registry and build_loss: names, errors, hparam validation, the nn.Module contract."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torch import nn

import kd_losses
from kd_losses import registry

ALL = ["ce", "dist", "dkd", "kd", "ls", "sl", "sl_enc", "sl_ens", "sl_kd", "tfkd_reg", "tfkd_self", "wsld"]
NO_TEACHER = {"ce", "ls", "tfkd_reg"}
EMBEDDING = ["crd", "fitnet", "pkt", "rkd", "sp"]  # need features: tested in test_kd_embedding.py
REGISTERED = sorted(ALL + EMBEDDING)


def _batch(b: int = 2, c: int = 3, t: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "label": torch.randint(0, c, (b,), generator=g),
        "teacher_logits": torch.randn(b, t, c, generator=g),
    }


def test_available_losses_sorted_and_complete() -> None:
    assert kd_losses.available_losses() == REGISTERED


def test_import_from_fresh_interpreter() -> None:
    out = subprocess.run(
        [sys.executable, "-c", "import kd_losses; print(kd_losses.available_losses())"],
        capture_output=True, text=True, check=True,
    )
    assert out.stdout.strip() == repr(REGISTERED)


def test_needs_teacher() -> None:
    for name in ALL:
        assert kd_losses.needs_teacher(name) is (name not in NO_TEACHER)
        assert kd_losses.get_loss(name).needs_teacher is (name not in NO_TEACHER)


def test_duplicate_registration_raises() -> None:
    with pytest.raises(ValueError, match="'kd' is already registered"):
        kd_losses.register_loss("kd")(lambda student_logits, batch: {})
    assert kd_losses.get_loss("kd").__name__ == "kd"  # the original survives


def test_register_new_loss(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))

    @kd_losses.register_loss("double_ce", needs_teacher=False)
    def double_ce(student_logits, batch, scale: float = 2.0):
        loss = scale * torch.nn.functional.cross_entropy(student_logits, batch["label"])
        return {"loss": loss}

    assert "double_ce" in kd_losses.available_losses()
    assert kd_losses.build_loss("double_ce", scale=3.0).hparams == {"scale": 3.0}


def test_unknown_loss_one_line_lists_valid() -> None:
    with pytest.raises(kd_losses.UnknownLossError) as info:
        kd_losses.get_loss("foo")
    assert isinstance(info.value, KeyError) and isinstance(info.value, ValueError)
    assert str(info.value) == "unknown loss 'foo'; valid: " + ", ".join(REGISTERED)
    for fn in (kd_losses.build_loss, kd_losses.needs_teacher):
        with pytest.raises(KeyError, match="unknown loss 'foo'"):
            fn("foo")


def test_build_rejects_unknown_hparam() -> None:
    with pytest.raises(TypeError) as info:
        kd_losses.build_loss("kd", alpha=0.5, temperature=4.0)
    msg = str(info.value)
    assert "\n" not in msg
    assert msg == "unknown hparam(s) for loss 'kd': temperature; valid: alpha, T"
    with pytest.raises(TypeError, match="valid: noise_dim, hidden, T, alpha"):
        kd_losses.build_loss("sl_enc", num_classes=3, beta=1.0)
    with pytest.raises(TypeError, match=r"valid: \(none\)"):
        kd_losses.build_loss("ce", T=1.0)


@pytest.mark.parametrize(
    ("name", "hp", "msg"),
    [
        ("ls", {"convention": "pytorch"}, "convention must be one of 'uniform', 'tfkd'; got 'pytorch'"),
        ("tfkd_reg", {"form": "code"}, "form must be one of 'paper', 'reference'; got 'code'"),
    ],
)
def test_invalid_choice_one_line(name: str, hp: dict, msg: str) -> None:
    with pytest.raises(ValueError, match=msg):
        kd_losses.build_loss(name, **hp)
    with pytest.raises(ValueError, match=msg):  # direct calls validate too
        kd_losses.get_loss(name)(torch.zeros(2, 3), _batch(), **hp)


@pytest.mark.parametrize("name", ALL)
def test_build_returns_module_with_same_result(name: str) -> None:
    loss_fn = kd_losses.build_loss(name, num_classes=3).to("cpu")
    assert isinstance(loss_fn, nn.Module)
    assert loss_fn.needs_teacher is kd_losses.needs_teacher(name)
    z = torch.randn(2, 3, generator=torch.Generator().manual_seed(1))
    batch = _batch()
    if name == "sl_enc":
        assert isinstance(loss_fn, kd_losses.get_loss("sl_enc"))
        assert len(list(loss_fn.parameters())) == 4
        out = loss_fn(z, batch, generator=torch.Generator().manual_seed(0))
    else:
        assert list(loss_fn.parameters()) == []
        out = loss_fn(z, batch)
        ref = kd_losses.get_loss(name)(z, batch)
        assert set(out) == set(ref)
        for key in out:
            torch.testing.assert_close(out[key], ref[key])
    assert out["loss"].ndim == 0
    for key, value in out.items():
        assert value.ndim == 0, key
        if key != "loss":
            assert value.grad_fn is None and not value.requires_grad, key


def test_build_binds_hparams() -> None:
    z, batch = torch.randn(2, 3), _batch()
    built = kd_losses.build_loss("kd", num_classes=3, T=2.0, alpha=0.3)
    direct = kd_losses.get_loss("kd")(z, batch, T=2.0, alpha=0.3)
    torch.testing.assert_close(built(z, batch)["loss"], direct["loss"])
    assert "T=2.0" in repr(built)


def test_build_checks_num_classes() -> None:
    with pytest.raises(ValueError, match="num_classes=5"):
        kd_losses.build_loss("kd", num_classes=5)(torch.zeros(2, 3), _batch())
    with pytest.raises(ValueError, match="num_classes=5"):
        kd_losses.build_loss("sl_enc", num_classes=5)(torch.zeros(2, 3), _batch())
    with pytest.raises(TypeError, match="needs num_classes"):
        kd_losses.build_loss("sl_enc")


@pytest.mark.parametrize("name", sorted(set(ALL) - NO_TEACHER))
def test_missing_or_misshaped_teacher(name: str) -> None:
    loss_fn = kd_losses.build_loss(name, num_classes=3)
    with pytest.raises(ValueError, match=r"needs batch\['teacher_logits'\]"):
        loss_fn(torch.zeros(2, 3), {"label": torch.tensor([0, 1])})
    with pytest.raises(ValueError, match=r"must be \[B, T, C\]"):
        loss_fn(torch.zeros(2, 3), {"label": torch.tensor([0, 1]), "teacher_logits": torch.zeros(2, 3)})


# Values no loss accepts for an hparam of that name (a temperature of 0, a negative weight, eps of 1, a size 0).
_BAD = {"T": [0, -1.0, float("nan"), "4"], "nce_t": [0.0], "eps": [1.0, -0.1], "a": [1.5, 1, 0], "momentum": [-0.5],
        "feat_dim": [0, 12.5], "nce_k": [0], "noise_dim": [0], "noise_std": [-1.0, float("inf")], "hidden": [0], "warmup_epochs": [-1],
        "alpha": [-0.1, float("inf")], "beta": [-1.0], "gamma": [-1.0], "weight": [-1.0], "multiplier": [-2.0],
        "ce_weight": [-1.0], "kd_weight": [-0.5], "distance_weight": [-1.0], "angle_weight": [-1.0],
        "use_gt": ["yes"]}


@pytest.mark.parametrize("name", REGISTERED)
def test_hparams_outside_their_range_are_refused(name: str) -> None:
    """Every numeric hparam of every loss has a range: defaults pass, out-of-range or mistyped values are a one-line
    ValueError naming the loss and the hparam (the CLI turns it into exit code 2 before training)."""
    spec = registry.get_spec(name)
    defaults = spec.resolved_hparams({})
    kd_losses.check_hparams(name, {k: v for k, v in defaults.items() if k != "epoch"})
    numeric = [k for k, v in defaults.items() if isinstance(v, (int, float)) and k != "epoch"]
    assert set(numeric) <= set(_BAD), f"{name}: no out-of-range case for {set(numeric) - set(_BAD)}"
    for key in [k for k in defaults if k in _BAD]:
        for bad in _BAD[key]:
            with pytest.raises(ValueError, match=rf"{name}.*{key}") as info:
                kd_losses.check_hparams(name, {key: bad})
            assert "\n" not in str(info.value)
    if name in ("kd", "tfkd_self", "tfkd_reg"):  # (1 - alpha) * CE + alpha * KD: above 1 CE would be maximised
        kd_losses.check_hparams(name, {"alpha": 1.0})
        with pytest.raises(ValueError, match=rf"{name}.*alpha=1.5 is outside \[0, 1\]"):
            kd_losses.check_hparams(name, {"alpha": 1.5})
    elif "alpha" in defaults:  # a weight elsewhere (WSLD's 2.25, the SL family's)
        kd_losses.check_hparams(name, {"alpha": 2.5})
