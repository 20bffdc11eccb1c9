"""Invariants: limits, scalings, gradients, multi-teacher conventions, low precision and extremes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import kd_losses

ALL = [name for name in kd_losses.available_losses() if not kd_losses.needs_features(name)]  # embedding: own file
NO_TEACHER = {"ce", "ls", "tfkd_reg"}
SINGLE_TEACHER = ["kd", "wsld", "tfkd_self", "sl", "dkd", "dist", "sl_enc"]


def _call(name: str, z: torch.Tensor, batch: dict, **hp) -> dict[str, torch.Tensor]:
    """Call loss ``name``; sl_enc gets fixed weights (seed 0) and fixed noise (seed 1)."""
    if name != "sl_enc":
        return kd_losses.get_loss(name)(z, batch, **hp)
    torch.manual_seed(0)
    module = kd_losses.build_loss("sl_enc", num_classes=z.shape[1], noise_dim=6, hidden=5, **hp)
    if z.dtype == torch.float64:
        module = module.double()
    return module(z, batch, generator=torch.Generator().manual_seed(1))


def _inputs(b: int = 3, c: int = 4, t: int = 1, seed: int = 0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(b, c, generator=g, dtype=torch.float64).to(dtype)
    zt = (2.0 * torch.randn(b, t, c, generator=g, dtype=torch.float64)).to(dtype)
    y = torch.randint(0, c, (b,), generator=g)
    return z, {"label": y, "teacher_logits": zt}


def _np_kl_batchmean(zt: np.ndarray, zs: np.ndarray, t: float) -> float:
    def log_softmax(z):
        z = z / t - (z / t).max(1, keepdims=True)
        return z - np.log(np.exp(z).sum(1, keepdims=True))

    lt, ls = log_softmax(zt), log_softmax(zs)
    return float((np.exp(lt) * (lt - ls)).sum(1).mean())


# --- KD -------------------------------------------------------------------------------------------


def test_kd_one_hot_teacher_at_T1_is_ce() -> None:
    z, batch = _inputs()
    z.requires_grad_(True)
    batch["teacher_logits"] = 50.0 * F.one_hot(batch["label"], 4).double()[:, None, :]
    loss = _call("kd", z, batch, alpha=1.0, T=1.0)["loss"]
    (grad_kd,) = torch.autograd.grad(loss, z)
    ce = F.cross_entropy(z, batch["label"])
    (grad_ce,) = torch.autograd.grad(ce, z)
    torch.testing.assert_close(loss, ce, atol=1e-12, rtol=0)
    torch.testing.assert_close(grad_kd, grad_ce, atol=1e-12, rtol=0)


@pytest.mark.parametrize("t", [1.0, 2.0, 4.0, 8.0])
def test_kd_part_is_T_squared_times_batchmean_kl(t: float) -> None:
    z, batch = _inputs()
    kd_part = float(_call("kd", z, batch, T=t)["kd"])
    kl = _np_kl_batchmean(batch["teacher_logits"][:, 0].numpy(), z.numpy(), t)
    assert kd_part / (t * t) == pytest.approx(kl, rel=1e-12)


# --- WSLD -----------------------------------------------------------------------------------------


def test_wsld_weights_in_unit_interval() -> None:
    for seed in range(8):
        z, batch = _inputs(b=1, seed=seed)
        w = float(_call("wsld", z, batch)["weight_mean"])
        assert 0.0 <= w < 1.0
    z, batch = _inputs(b=1)
    batch["teacher_logits"] = z[:, None, :].clone()  # same CE for both: w = 1 - exp(-1)
    assert float(_call("wsld", z, batch)["weight_mean"]) == pytest.approx(1 - np.exp(-1), rel=1e-6)


def test_wsld_gradient_treats_weight_as_constant() -> None:
    alpha, t = 2.5, 2.0
    z, batch = _inputs(b=4)
    z.requires_grad_(True)
    out = _call("wsld", z, batch, alpha=alpha, T=t)
    assert out["weight_mean"].grad_fn is None
    (grad,) = torch.autograd.grad(out["loss"], z)

    # Closed form with w constant: (p_s - onehot)/B + alpha·T·w_i·(p_s^T - p_t^T)/B.
    zs, zt, y = z.detach().numpy(), batch["teacher_logits"][:, 0].numpy(), batch["label"].numpy()
    sm = lambda v: np.exp(v - v.max(1, keepdims=True)) / np.exp(v - v.max(1, keepdims=True)).sum(1, keepdims=True)  # noqa: E731
    b = len(y)
    ce_s = -np.log(sm(zs)[np.arange(b), y])
    ce_t = -np.log(sm(zt)[np.arange(b), y])
    w = 1 - np.exp(-np.maximum(ce_s / (ce_t + 1e-7), 0))
    expected = (sm(zs) - np.eye(4)[y]) / b + alpha * t * w[:, None] * (sm(zs / t) - sm(zt / t)) / b
    np.testing.assert_allclose(grad.numpy(), expected, atol=1e-12)

    # Sensitivity: a weight that is *not* detached gives a different gradient.
    log_ps = F.log_softmax(z, 1)
    w_live = 1 - torch.exp(-(-log_ps.gather(1, batch["label"][:, None]).squeeze(1)) / torch.from_numpy(ce_t + 1e-7))
    h = -(F.softmax(batch["teacher_logits"][:, 0] / t, 1) * F.log_softmax(z / t, 1)).sum(1)
    live = F.cross_entropy(z, batch["label"]) + alpha * t * t * (w_live * h).mean()
    (grad_live,) = torch.autograd.grad(live, z)
    assert not torch.allclose(grad_live, grad, atol=1e-6)


# --- label-only losses --------------------------------------------------------------------------


def test_tfkd_reg_needs_no_teacher() -> None:
    z, batch = _inputs()
    with_teacher = _call("tfkd_reg", z, batch)
    del batch["teacher_logits"]
    for form in ("paper", "reference"):
        out = kd_losses.build_loss("tfkd_reg", form=form)(z, batch)
        assert torch.isfinite(out["loss"])
    torch.testing.assert_close(_call("tfkd_reg", z, batch)["loss"], with_teacher["loss"])


def test_ls_conventions_differ() -> None:
    z, batch = _inputs()
    uniform = float(_call("ls", z, batch, convention="uniform")["loss"])
    tfkd = float(_call("ls", z, batch, convention="tfkd")["loss"])
    assert uniform != pytest.approx(tfkd, rel=1e-6)
    assert float(_call("ls", z, batch, eps=0.0)["loss"]) == pytest.approx(float(F.cross_entropy(z, batch["label"])))


# --- multi-teacher conventions ------------------------------------------------------------------


@pytest.mark.parametrize("name", SINGLE_TEACHER)
def test_single_teacher_methods_average_teacher_logits(name: str) -> None:
    z, batch = _inputs(t=2)
    hp = {"epoch": 3} if name == "dkd" else {}
    both = _call(name, z, batch, **hp)["loss"]
    merged = dict(batch, teacher_logits=batch["teacher_logits"].mean(dim=1, keepdim=True))
    torch.testing.assert_close(both, _call(name, z, merged, **hp)["loss"], atol=1e-12, rtol=0)
    one = dict(batch, teacher_logits=batch["teacher_logits"][:, :1])
    twice = dict(batch, teacher_logits=one["teacher_logits"].repeat(1, 2, 1))
    torch.testing.assert_close(_call(name, z, one, **hp)["loss"], _call(name, z, twice, **hp)["loss"])
    assert not torch.allclose(both, _call(name, z, one, **hp)["loss"])


@pytest.mark.parametrize("use_gt", [False, True])
def test_sl_ens_identical_teachers_is_sl_and_sl_kd_is_n_times_sl(use_gt: bool) -> None:
    z, batch = _inputs(t=1)
    three = dict(batch, teacher_logits=batch["teacher_logits"].repeat(1, 3, 1))
    sl = _call("sl", z, batch, use_gt=use_gt)["loss"]
    torch.testing.assert_close(_call("sl_ens", z, three, use_gt=use_gt)["loss"], sl)
    torch.testing.assert_close(_call("sl_kd", z, three, use_gt=use_gt)["loss"], 3 * sl)


def test_sl_ens_averages_probabilities_not_logits() -> None:
    z, batch = _inputs(t=2)
    ens = _call("sl_ens", z, batch)["loss"]
    mean_logits = _call("sl", z, batch)["loss"]  # sl averages logits
    assert not torch.allclose(ens, mean_logits)


# --- SL-Enc ---------------------------------------------------------------------------------------


def test_sl_enc_parameters_get_gradients() -> None:
    torch.manual_seed(0)
    module = kd_losses.build_loss("sl_enc", num_classes=4)
    z, batch = _inputs(dtype=torch.float32)
    z.requires_grad_(True)
    module(z, batch, generator=torch.Generator().manual_seed(0))["loss"].backward()
    assert z.grad is not None and z.grad.abs().sum() > 0
    for name, p in module.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_sl_enc_noise_is_seeded_by_generator() -> None:
    torch.manual_seed(0)
    module = kd_losses.build_loss("sl_enc", num_classes=4)
    z, batch = _inputs(dtype=torch.float32)
    run = lambda seed: module(z, batch, generator=torch.Generator().manual_seed(seed))["loss"]  # noqa: E731
    torch.testing.assert_close(run(3), run(3), atol=0, rtol=0)
    assert not torch.equal(run(3), run(4))


# --- DKD warm-up ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("batch_epoch", "hp_epoch", "factor"),
    [(0, None, 1 / 20), (9, None, 0.5), (19, None, 1.0), (50, None, 1.0), (None, 4, 0.25), (9, 0, 0.5), (None, None, 1.0)],
)
def test_dkd_warmup_scales_kd_part(batch_epoch, hp_epoch, factor: float) -> None:
    z, batch = _inputs()
    if batch_epoch is not None:
        batch["epoch"] = batch_epoch
    out = _call("dkd", z, batch, epoch=hp_epoch, alpha=1.0, beta=8.0)
    assert float(out["warmup"]) == pytest.approx(factor)
    kd_part = out["tckd"] + 8.0 * out["nckd"]
    torch.testing.assert_close(out["loss"], out["ce"] + factor * kd_part)
    assert float(kd_part) > 0


def test_dkd_no_warmup_when_disabled() -> None:
    z, batch = _inputs()
    assert float(_call("dkd", z, dict(batch, epoch=0), warmup_epochs=0)["warmup"]) == 1.0


# --- gradcheck, precision, extremes ------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(set(ALL) - {"wsld"}))
def test_gradcheck_float64(name: str) -> None:
    z, batch = _inputs(t=2)
    hp = {"epoch": 4} if name == "dkd" else {}
    zt, y = batch["teacher_logits"], batch["label"]
    z.requires_grad_(True)
    if name in NO_TEACHER:
        fn = lambda z: _call(name, z, {"label": y}, **hp)["loss"]  # noqa: E731
        assert torch.autograd.gradcheck(fn, (z,))
    else:
        zt.requires_grad_(True)
        fn = lambda z, zt: _call(name, z, {"label": y, "teacher_logits": zt}, **hp)["loss"]  # noqa: E731
        assert torch.autograd.gradcheck(fn, (z, zt))


def test_gradcheck_wsld_saturated_weight() -> None:
    """WSLD's weight is detached, so finite differences see it move unless it saturates: with a teacher
    sure of the label (CE_t ~ 1e-20) every w_i == 1 exactly, and the rest must be differentiable."""
    z, batch = _inputs()
    y = batch["label"]
    zt = (60.0 * F.one_hot(y, 4).double() + 0.1 * batch["teacher_logits"][:, 0])[:, None, :]
    assert float(_call("wsld", z, dict(batch, teacher_logits=zt))["weight_mean"]) == 1.0
    z.requires_grad_(True)
    zt.requires_grad_(True)
    fn = lambda z, zt: _call("wsld", z, {"label": y, "teacher_logits": zt})["loss"]  # noqa: E731
    assert torch.autograd.gradcheck(fn, (z, zt))


def _extreme(dtype: torch.dtype) -> tuple[torch.Tensor, dict]:
    z = torch.tensor([[1e4, -1e4, 0.0, 5e3], [-1e4, 1e4, -1e4, 1e4], [0.0, 0.0, 1e4, -1e4]], dtype=dtype)
    zt = torch.tensor([[-1e4, 1e4, 0.0, 0.0], [1e4, -1e4, 1e4, -1e4], [0.0, 1e4, -1e4, 1e4]], dtype=dtype)
    return z, {"label": torch.tensor([0, 2, 3]), "teacher_logits": torch.stack([zt, zt.flip(1)], dim=1)}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("extreme", [False, True], ids=["moderate", "extreme"])
@pytest.mark.parametrize("name", ALL)
def test_low_precision_and_extreme_logits(name: str, dtype: torch.dtype, extreme: bool) -> None:
    if extreme:
        z, batch = _extreme(dtype)
    else:
        z, batch = _inputs(t=2, dtype=dtype)
    z32, batch32 = z.float(), dict(batch, teacher_logits=batch["teacher_logits"].float())
    hp = {"epoch": 2} if name == "dkd" else {}
    z.requires_grad_(True)
    z32.requires_grad_(True)
    out, ref = _call(name, z, batch, **hp), _call(name, z32, batch32, **hp)
    for key in out:
        assert out[key].dtype == torch.float32, key  # computed in float32, not fp16/bf16
        assert torch.isfinite(out[key]), key
        torch.testing.assert_close(out[key], ref[key], atol=0, rtol=0)
    out["loss"].backward()
    ref["loss"].backward()
    assert z.grad.dtype == dtype
    assert torch.isfinite(z.grad).all()
    torch.testing.assert_close(z.grad, z32.grad.to(dtype), atol=0, rtol=0)


def test_dkd_nckd_ignores_target_logits_even_when_extreme() -> None:
    """NCKD only sees non-target classes; mdistiller's "- 1000" mask would leak a target logit > 4000·T."""
    z, batch = _inputs()
    y = batch["label"]
    base = _call("dkd", z, batch)
    bumped = z + 1e4 * F.one_hot(y, 4).double()
    bumped_t = batch["teacher_logits"] - 1e4 * F.one_hot(y, 4).double()[:, None, :]
    out = _call("dkd", bumped, dict(batch, teacher_logits=bumped_t))
    torch.testing.assert_close(out["nckd"], base["nckd"], atol=1e-12, rtol=0)
    assert torch.isfinite(out["tckd"]) and float(out["tckd"]) > float(base["tckd"])
