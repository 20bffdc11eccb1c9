"""Golden values: each loss against an independent float64 numpy reimplementation on B=2, C=3
(plus a few values small enough to check by hand)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import kd_losses

ZS = np.array([[1.0, -0.5, 0.3], [0.2, 0.8, -1.0]])
ZT = np.array([[2.0, 0.1, -0.7], [-0.3, 1.5, 0.4]])  # teacher wrong on sample 1 (label 2)
ZT2 = np.array([[0.5, 1.2, -0.2], [0.9, -0.4, 0.6]])  # a second teacher
Y = np.array([0, 2])


def np_log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def np_softmax(z: np.ndarray) -> np.ndarray:
    return np.exp(np_log_softmax(z))


def np_ce(z: np.ndarray, y: np.ndarray) -> float:
    return float(-np_log_softmax(z)[np.arange(len(y)), y].mean())


def np_kl_batchmean(p: np.ndarray, q: np.ndarray) -> float:
    return float((p * (np.log(p) - np.log(q))).sum(axis=1).mean())


def np_soft_ce(p: np.ndarray, log_q: np.ndarray) -> np.ndarray:
    return -(p * log_q).sum(axis=-1)


def run(name: str, teachers: list[np.ndarray] | None = None, **hp) -> dict[str, float]:
    batch = {"label": torch.from_numpy(Y)}
    if teachers is not None:
        batch["teacher_logits"] = torch.from_numpy(np.stack(teachers, axis=1))
    out = kd_losses.get_loss(name)(torch.from_numpy(ZS), batch, **hp)
    return {k: float(v) for k, v in out.items()}


def test_ce_hand_values() -> None:
    out = kd_losses.get_loss("ce")(torch.zeros(2, 3), {"label": torch.tensor([0, 2])})
    assert float(out["loss"]) == pytest.approx(math.log(3))
    assert run("ce")["loss"] == pytest.approx(np_ce(ZS, Y), abs=1e-12)


@pytest.mark.parametrize("convention", ["uniform", "tfkd"])
def test_ls_matches_numpy(convention: str) -> None:
    eps, k = 0.2, 3
    onehot = np.eye(k)[Y]
    if convention == "uniform":
        q = (1 - eps) * onehot + eps / k
    else:
        q = np.where(onehot == 1, 1 - eps, eps / (k - 1))
    expected = float(np_soft_ce(q, np_log_softmax(ZS)).mean())
    out = run("ls", eps=eps, convention=convention)
    assert out["loss"] == pytest.approx(expected, abs=1e-12)
    assert out["ce"] == pytest.approx(np_ce(ZS, Y), abs=1e-12)


def test_ls_uniform_equals_torch_label_smoothing() -> None:
    zs, y = torch.from_numpy(ZS), torch.from_numpy(Y)
    ref = torch.nn.functional.cross_entropy(zs, y, label_smoothing=0.1)
    assert run("ls")["loss"] == pytest.approx(float(ref), abs=1e-12)


def test_kd_hand_value() -> None:
    # p_t = [3/4, 1/4], p_s = [1/2, 1/2]: KL = 3/4·ln(3/2) + 1/4·ln(1/2).
    out = kd_losses.get_loss("kd")(
        torch.zeros(1, 2, dtype=torch.float64),
        {"label": torch.tensor([0]), "teacher_logits": torch.tensor([[[math.log(3.0), 0.0]]], dtype=torch.float64)},
        alpha=1.0,
        T=1.0,
    )
    assert float(out["loss"]) == pytest.approx(0.75 * math.log(1.5) + 0.25 * math.log(0.5), abs=1e-12)


def test_kd_matches_numpy() -> None:
    alpha, t = 0.7, 3.0
    kl = np_kl_batchmean(np_softmax(ZT / t), np_softmax(ZS / t))
    out = run("kd", [ZT], alpha=alpha, T=t)
    assert out["kd"] == pytest.approx(t * t * kl, abs=1e-12)
    assert out["ce"] == pytest.approx(np_ce(ZS, Y), abs=1e-12)
    assert out["loss"] == pytest.approx((1 - alpha) * np_ce(ZS, Y) + alpha * t * t * kl, abs=1e-12)


def test_wsld_matches_numpy() -> None:
    alpha, t = 2.5, 2.0
    ce_s = -np_log_softmax(ZS)[np.arange(2), Y]
    ce_t = -np_log_softmax(ZT)[np.arange(2), Y]
    w = 1 - np.exp(-np.maximum(ce_s / (ce_t + 1e-7), 0))
    h = np_soft_ce(np_softmax(ZT / t), np_log_softmax(ZS / t))
    kd = t * t * float((w * h).mean())
    out = run("wsld", [ZT], alpha=alpha, T=t)
    assert out["weight_mean"] == pytest.approx(float(w.mean()), abs=1e-12)
    assert out["kd"] == pytest.approx(kd, abs=1e-12)
    assert out["loss"] == pytest.approx(np_ce(ZS, Y) + alpha * kd, abs=1e-12)


def test_tfkd_self_matches_numpy() -> None:
    alpha, t, m = 0.9, 6.0, 3.0
    kl = np_kl_batchmean(np_softmax(ZT / t), np_softmax(ZS / t))
    out = run("tfkd_self", [ZT], alpha=alpha, T=t, multiplier=m)
    assert out["loss"] == pytest.approx((1 - alpha) * np_ce(ZS, Y) + alpha * m * t * t * kl, abs=1e-12)


def _designed_teacher(a: float, k: int = 3) -> np.ndarray:
    return np.where(np.eye(k)[Y] == 1, a, (1 - a) / (k - 1))


def test_tfkd_reg_paper_matches_numpy() -> None:
    alpha, t, a = 0.1, 20.0, 0.99
    pd_t = np_softmax(np.log(_designed_teacher(a)) / t)
    kd = t * t * np_kl_batchmean(pd_t, np_softmax(ZS / t))
    out = run("tfkd_reg", alpha=alpha, T=t, a=a)
    assert out["kd"] == pytest.approx(kd, abs=1e-12)
    assert out["loss"] == pytest.approx((1 - alpha) * np_ce(ZS, Y) + alpha * kd, abs=1e-12)


def test_tfkd_reg_reference_matches_numpy() -> None:
    alpha, t, a, m = 0.1, 20.0, 0.99, 50.0
    target = np_softmax(_designed_teacher(a) / t)  # softmax of probabilities
    kd = float((target * (np.log(target) - np_log_softmax(ZS))).sum() / ZS.size)  # KLDivLoss 'mean'
    out = run("tfkd_reg", alpha=alpha, T=t, a=a, multiplier=m, form="reference")
    assert out["kd"] == pytest.approx(kd, abs=1e-12)
    assert out["loss"] == pytest.approx((1 - alpha) * np_ce(ZS, Y) + alpha * m * kd, abs=1e-12)
    # The forms differ: the reference target is nearly uniform.
    assert out["kd"] != pytest.approx(run("tfkd_reg", alpha=alpha, T=t, a=a)["kd"], rel=1e-3)


@pytest.mark.parametrize("use_gt", [False, True])
def test_sl_matches_numpy(use_gt: bool) -> None:
    alpha, t = 0.1, 3.0
    zt = ZT + np.eye(3)[Y] if use_gt else ZT
    kd = t * t * float(np_soft_ce(np_softmax(zt / t), np_log_softmax(ZS / t)).mean())
    out = run("sl", [ZT], alpha=alpha, T=t, use_gt=use_gt)
    assert out["kd"] == pytest.approx(kd, abs=1e-12)
    assert out["loss"] == pytest.approx(alpha * kd, abs=1e-12)


def test_sl_ens_matches_numpy() -> None:
    alpha, t = 0.1, 3.0
    p = (np_softmax(ZT / t) + np_softmax(ZT2 / t)) / 2
    kd = t * t * float(np_soft_ce(p, np_log_softmax(ZS / t)).mean())
    assert run("sl_ens", [ZT, ZT2], alpha=alpha, T=t)["loss"] == pytest.approx(alpha * kd, abs=1e-12)


def test_sl_kd_matches_numpy() -> None:
    alpha, t = 0.1, 3.0
    log_ps = np_log_softmax(ZS / t)
    kd = sum(t * t * float(np_soft_ce(np_softmax(z / t), log_ps).mean()) for z in (ZT, ZT2))
    assert run("sl_kd", [ZT, ZT2], alpha=alpha, T=t)["loss"] == pytest.approx(alpha * kd, abs=1e-12)


def test_sl_enc_matches_numpy() -> None:
    alpha, t = 0.1, 3.0
    torch.manual_seed(0)
    module = kd_losses.build_loss("sl_enc", num_classes=3, noise_dim=4, hidden=5, T=t, alpha=alpha)
    module = module.double()
    noise = np.array([[0.3, -1.2, 0.5, 2.0], [-0.7, 0.1, 1.1, -0.4]])
    w1, b1, w2, b2 = (p.detach().numpy() for p in module.parameters())
    pert = np_softmax(np.maximum(noise @ w1.T + b1, 0) @ w2.T + b2)
    kd = t * t * float(np_soft_ce(np_softmax((ZT + pert) / t), np_log_softmax(ZS / t)).mean())
    batch = {"label": torch.from_numpy(Y), "teacher_logits": torch.from_numpy(ZT[:, None, :])}
    out = module(torch.from_numpy(ZS), batch, noise=torch.from_numpy(noise))
    assert float(out["loss"].detach()) == pytest.approx(alpha * kd, abs=1e-12)


def test_dkd_matches_numpy_mdistiller_masking() -> None:
    """Reference = mdistiller's formulation (softmax, cat_mask, log, target logit - 1000)."""
    alpha, beta, t = 1.0, 8.0, 4.0
    gt = np.eye(3)[Y]
    ps, pt = np_softmax(ZS / t), np_softmax(ZT / t)
    bs = np.stack([(ps * gt).sum(1), (ps * (1 - gt)).sum(1)], axis=1)
    bt = np.stack([(pt * gt).sum(1), (pt * (1 - gt)).sum(1)], axis=1)
    tckd = float((bt * (np.log(bt) - np.log(bs))).sum()) * t * t / 2
    qt = np_softmax(ZT / t - 1000.0 * gt)
    log_qs = np_log_softmax(ZS / t - 1000.0 * gt)
    mask = qt > 0  # kl_div uses xlogy: 0·log 0 = 0
    nckd = float((qt[mask] * (np.log(qt[mask]) - log_qs[mask])).sum()) * t * t / 2
    out = run("dkd", [ZT], alpha=alpha, beta=beta, T=t)
    assert out["tckd"] == pytest.approx(tckd, abs=1e-12)
    assert out["nckd"] == pytest.approx(nckd, abs=1e-12)
    assert out["loss"] == pytest.approx(np_ce(ZS, Y) + alpha * tckd + beta * nckd, abs=1e-12)


def _np_pearson_rows(a: np.ndarray, b: np.ndarray, eps: float = 1e-8) -> np.ndarray:
    a = a - a.mean(1, keepdims=True)
    b = b - b.mean(1, keepdims=True)
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + eps)


def test_dist_matches_numpy() -> None:
    beta, gamma, t = 2.0, 0.5, 4.0
    ps, pt = np_softmax(ZS / t), np_softmax(ZT / t)
    inter = t * t * (1 - _np_pearson_rows(ps, pt).mean())
    intra = t * t * (1 - _np_pearson_rows(ps.T, pt.T).mean())
    out = run("dist", [ZT], beta=beta, gamma=gamma, T=t)
    assert out["inter"] == pytest.approx(inter, abs=1e-12)
    assert out["intra"] == pytest.approx(intra, abs=1e-12)
    assert out["loss"] == pytest.approx(np_ce(ZS, Y) + beta * inter + gamma * intra, abs=1e-12)


def test_dist_perfect_match_is_zero() -> None:
    out = run("dist", [ZS])  # teacher == student: both correlations are 1
    assert out["inter"] == pytest.approx(0.0, abs=1e-6)  # not exact: eps=1e-8 in the denominator
    assert out["intra"] == pytest.approx(0.0, abs=1e-5)
