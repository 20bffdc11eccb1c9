"""Embedding-level losses (RKD, PKT, SP, CRD, FitNet): golden values against independent float64 numpy,
invariants, gradients, CRD's memories / RNG / resume, and the registry's feature support."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

import kd_losses
from kd_losses import registry
from kd_losses.embedding import CRDLoss

EMBEDDING = ["crd", "fitnet", "pkt", "rkd", "sp"]
RELATIONAL = ["pkt", "rkd", "sp"]
MODULES = ["crd", "fitnet"]
N = 12  # CRD's num_samples in these tests

# B=4 samples, D_s=3, two teachers with D_t=5 (golden inputs).
S = np.array([[0.5, -1.2, 0.3], [1.1, 0.4, -0.7], [-0.3, 0.9, 1.5], [0.8, -0.2, -1.1]])
TF = np.stack(
    [
        np.array([[1.0, 0.2, -0.5, 0.7, 0.0], [0.3, -1.4, 0.8, 0.1, 0.6], [-0.9, 0.5, 0.4, -1.2, 1.1],
                  [0.6, 0.9, -0.3, 0.2, -0.8]]),
        np.array([[-0.4, 1.3, 0.2, -0.6, 0.5], [0.9, 0.1, -1.0, 0.7, -0.2], [0.2, -0.7, 1.2, 0.4, 0.3],
                  [-1.1, 0.6, 0.5, -0.3, 0.9]]),
    ],
    axis=1,
)  # [4, 2, 5]
ZS = np.array([[1.0, -0.5, 0.3], [0.2, 0.8, -1.0], [-0.4, 0.1, 0.6], [0.9, 0.3, -0.2]])
ZT = np.array([[[2.0, 0.1, -0.7], [0.5, 1.2, -0.2]], [[-0.3, 1.5, 0.4], [0.9, -0.4, 0.6]],
               [[0.1, -0.2, 1.3], [0.4, 0.4, 0.2]], [[1.4, 0.0, -0.6], [-0.5, 0.8, 0.1]]])
Y = np.array([0, 2, 2, 1])
IDX = np.array([7, 2, 11, 4])


def golden_batch() -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    return torch.from_numpy(ZS), {
        "label": torch.from_numpy(Y),
        "student_features": torch.from_numpy(S),
        "teacher_features": torch.from_numpy(TF),
        "teacher_logits": torch.from_numpy(ZT),
        "index": torch.from_numpy(IDX),
    }


def np_ce(z: np.ndarray, y: np.ndarray) -> float:
    z = z - z.max(axis=1, keepdims=True)
    log_p = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    return float(-log_p[np.arange(len(y)), y].mean())


def np_normalize(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def np_smooth_l1(x: np.ndarray) -> np.ndarray:
    a = np.abs(x)
    return np.where(a < 1.0, 0.5 * a * a, a - 0.5)


def np_rkd(s: np.ndarray, t: np.ndarray, wd: float = 25.0, wa: float = 50.0) -> float:
    """Paper notation: d_ij over pairs (explicit differences), a_ijk with the vertex at j."""

    def dist(e):
        b = len(e)
        d = np.array([[np.sqrt(max(((e[i] - e[j]) ** 2).sum(), 1e-12)) if i != j else 0.0 for j in range(b)]
                      for i in range(b)])
        return d / d[d > 0].mean()

    def angle(e):
        b = len(e)
        a = np.zeros((b, b, b))
        for i in range(b):
            for j in range(b):
                for k in range(b):
                    if i != j and k != j:
                        a[i, j, k] = np_normalize(e[i] - e[j]) @ np_normalize(e[k] - e[j])
        return a

    terms = [wd * np_smooth_l1(dist(s) - dist(t[:, k])).mean() + wa * np_smooth_l1(angle(s) - angle(t[:, k])).mean()
             for k in range(t.shape[1])]
    return float(np.mean(terms))


def np_pkt(s: np.ndarray, t: np.ndarray, eps: float = 1e-7) -> float:
    def probs(x):
        x = x / (np.sqrt((x * x).sum(axis=1, keepdims=True)) + eps)
        k = (x @ x.T + 1.0) / 2.0
        return k / k.sum(axis=1, keepdims=True)

    p_s = probs(s)
    return float(np.mean([(probs(t[:, k]) * np.log((probs(t[:, k]) + eps) / (p_s + eps))).mean()
                          for k in range(t.shape[1])]))


def np_sp(s: np.ndarray, t: np.ndarray) -> float:
    def gram(a):
        return np_normalize(a @ a.T)

    return float(np.mean([((gram(s) - gram(t[:, k])) ** 2).sum() / len(s) ** 2 for k in range(t.shape[1])]))


def np_nce(x: np.ndarray, n: int, eps: float = 1e-7) -> float:
    m_pn = (x.shape[1] - 1) / n
    return float(-(np.log(x[:, 0] / (x[:, 0] + m_pn + eps)).sum() + np.log(m_pn / (x[:, 1:] + m_pn + eps)).sum())
                 / len(x))


def _inputs(b: int = 5, c: int = 4, d_s: int = 3, d_t: int = 6, t: int = 2, seed: int = 0,
            dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64)  # noqa: E731
    z = rand(b, c).to(dtype)
    return z, {
        "label": torch.randint(0, c, (b,), generator=g),
        "student_features": rand(b, d_s).to(dtype),
        "teacher_features": (2.0 * rand(b, t, d_t)).to(dtype),
        "teacher_logits": (2.0 * rand(b, t, c)).to(dtype),
        "index": torch.randperm(N, generator=g)[:b],
    }


def _build(name: str, batch: dict, **hp) -> nn.Module:
    """Loss ``name`` built for ``batch``'s dims; module weights from seed 0, float64 when the batch is."""
    s, t = batch["student_features"], batch["teacher_features"]
    if name == "crd":
        hp = {"nce_k": 5, "feat_dim": 8, **hp}
    torch.manual_seed(0)
    fn = kd_losses.build_loss(name, num_samples=N, student_dim=s.shape[1], teacher_dim=t.shape[2],
                              num_teachers=t.shape[1], **hp)
    return fn.double() if s.dtype == torch.float64 else fn


def _call(fn: nn.Module, z: torch.Tensor, batch: dict) -> dict[str, torch.Tensor]:
    """Call a built loss; CRD gets a fixed negative draw (seed 1)."""
    if isinstance(fn, CRDLoss):
        g = torch.Generator().manual_seed(1)
        negatives = torch.randint(0, N, (fn.num_teachers, z.shape[0], fn.nce_k), generator=g)
        return fn(z, batch, negatives=negatives)
    return fn(z, batch)


# --- golden values ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "reference"), [("rkd", np_rkd), ("pkt", np_pkt), ("sp", np_sp)])
def test_relational_terms_match_numpy(name: str, reference) -> None:
    z, batch = golden_batch()
    out = kd_losses.get_loss(name)(z, batch, weight=2.0, ce_weight=0.5)
    assert set(out) == {"loss", "ce", name}
    expected = reference(S, TF)
    assert float(out[name]) == pytest.approx(expected, rel=1e-10, abs=1e-14)
    assert float(out["ce"]) == pytest.approx(np_ce(ZS, Y), abs=1e-12)
    assert float(out["loss"]) == pytest.approx(0.5 * np_ce(ZS, Y) + 2.0 * expected, rel=1e-10)
    one = kd_losses.get_loss(name)(z, dict(batch, teacher_features=batch["teacher_features"][:, :1]))
    assert float(one[name]) == pytest.approx(reference(S, TF[:, :1]), rel=1e-10, abs=1e-14)


def test_rkd_weights_split_distance_and_angle() -> None:
    z, batch = golden_batch()
    dist = float(kd_losses.get_loss("rkd")(z, batch, angle_weight=0.0)["rkd"])
    angle = float(kd_losses.get_loss("rkd")(z, batch, distance_weight=0.0)["rkd"])
    assert dist == pytest.approx(np_rkd(S, TF, 25.0, 0.0), rel=1e-10)
    assert angle == pytest.approx(np_rkd(S, TF, 0.0, 50.0), rel=1e-10)
    assert dist > 0 and angle > 0


def test_fitnet_matches_numpy() -> None:
    z, batch = golden_batch()
    module = _build("fitnet", batch, weight=3.0)
    rng = np.random.default_rng(0)
    ws, bs = rng.normal(size=(2, 5, 3)), rng.normal(size=(2, 5))
    with torch.no_grad():
        for k, reg in enumerate(module.regressors):
            reg.weight.copy_(torch.from_numpy(ws[k]))
            reg.bias.copy_(torch.from_numpy(bs[k]))
    term = np.mean([((S @ ws[k].T + bs[k] - TF[:, k]) ** 2).mean() for k in range(2)])
    out = module(z, batch)
    assert set(out) == {"loss", "ce", "fitnet"}
    assert float(out["fitnet"]) == pytest.approx(term, rel=1e-12)
    assert float(out["loss"].detach()) == pytest.approx(np_ce(ZS, Y) + 3.0 * term, rel=1e-12)


def _set_crd(module: CRDLoss, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Explicit head weights and memories (float64), returned for the numpy reference."""
    t, n, f = module.memory_student.shape
    p = {"ws": rng.normal(size=(t, f, 3)), "bs": rng.normal(size=(t, f)), "wt": rng.normal(size=(t, f, 5)),
         "bt": rng.normal(size=(t, f)), "mem_s": rng.uniform(-0.6, 0.6, (t, n, f)),
         "mem_t": rng.uniform(-0.6, 0.6, (t, n, f))}
    with torch.no_grad():
        for k in range(t):
            module.embed_student[k].weight.copy_(torch.from_numpy(p["ws"][k]))
            module.embed_student[k].bias.copy_(torch.from_numpy(p["bs"][k]))
            module.embed_teacher[k].weight.copy_(torch.from_numpy(p["wt"][k]))
            module.embed_teacher[k].bias.copy_(torch.from_numpy(p["bt"][k]))
        module.memory_student.copy_(torch.from_numpy(p["mem_s"]))
        module.memory_teacher.copy_(torch.from_numpy(p["mem_t"]))
    return p


def np_crd(p: dict, s: np.ndarray, t: np.ndarray, idx: np.ndarray, neg: np.ndarray, n: int, tau: float,
           momentum: float, z: tuple[np.ndarray, np.ndarray] | None = None):
    """RepDistiller's CRD per teacher (v1 = student, v2 = teacher). Returns term, (Z_s, Z_t), new memories."""
    terms, zs, zt = [], np.zeros(t.shape[1]), np.zeros(t.shape[1])
    mem_s, mem_t = p["mem_s"].copy(), p["mem_t"].copy()
    for k in range(t.shape[1]):
        v_s = np_normalize(s @ p["ws"][k].T + p["bs"][k])
        v_t = np_normalize(t[:, k] @ p["wt"][k].T + p["bt"][k])
        cidx = np.concatenate([idx[:, None], neg[k]], axis=1)  # [B, K+1], positive first
        out_s = np.exp(np.einsum("bjf,bf->bj", p["mem_t"][k][cidx], v_s) / tau)
        out_t = np.exp(np.einsum("bjf,bf->bj", p["mem_s"][k][cidx], v_t) / tau)
        zs[k], zt[k] = (out_s.mean() * n, out_t.mean() * n) if z is None else (z[0][k], z[1][k])
        terms.append(np_nce(out_s / zs[k], n) + np_nce(out_t / zt[k], n))
        mem_s[k][idx] = np_normalize(momentum * p["mem_s"][k][idx] + (1 - momentum) * v_s)
        mem_t[k][idx] = np_normalize(momentum * p["mem_t"][k][idx] + (1 - momentum) * v_t)
    return float(np.mean(terms)), (zs, zt), mem_s, mem_t


def test_crd_matches_numpy_and_updates_memories() -> None:
    z, batch = golden_batch()
    module = _build("crd", batch, nce_k=3, feat_dim=4, nce_t=0.5, momentum=0.5)
    p = _set_crd(module, np.random.default_rng(0))
    neg = np.array([[[0, 5, 7], [1, 1, 3], [9, 2, 10], [4, 8, 6]],  # 7 and 4 repeat the positive: allowed
                    [[3, 3, 3], [0, 11, 6], [5, 8, 1], [2, 9, 10]]])
    out = module(z, batch, negatives=torch.from_numpy(neg))
    term, (zs, zt), mem_s, mem_t = np_crd(p, S, TF, IDX, neg, N, 0.5, 0.5)
    assert set(out) == {"loss", "ce", "crd"}
    assert float(out["crd"]) == pytest.approx(term, rel=1e-12)
    assert float(out["loss"].detach()) == pytest.approx(np_ce(ZS, Y) + 0.8 * term, rel=1e-12)
    np.testing.assert_allclose(module.z_student.numpy(), zs, rtol=1e-12)
    np.testing.assert_allclose(module.z_teacher.numpy(), zt, rtol=1e-12)
    # Momentum 0.5 + renormalise on the batch's rows only; every other row is untouched.
    np.testing.assert_allclose(module.memory_student.numpy(), mem_s, rtol=0, atol=1e-14)
    np.testing.assert_allclose(module.memory_teacher.numpy(), mem_t, rtol=0, atol=1e-14)
    np.testing.assert_allclose(np.linalg.norm(module.memory_student.numpy()[:, IDX], axis=2), 1.0, atol=1e-14)
    others = np.setdiff1d(np.arange(N), IDX)
    assert np.array_equal(module.memory_teacher.numpy()[:, others], p["mem_t"][:, others])

    # Second batch: Z is kept from the first, the memories read are the updated ones.
    p2 = dict(p, mem_s=mem_s, mem_t=mem_t)
    s2, t2 = S[::-1] * 1.5, TF[::-1] + 0.3
    batch2 = dict(batch, student_features=torch.from_numpy(s2.copy()), teacher_features=torch.from_numpy(t2.copy()))
    out2 = module(z, batch2, negatives=torch.from_numpy(neg[:, ::-1].copy()))
    term2 = np_crd(p2, s2, t2, IDX, neg[:, ::-1], N, 0.5, 0.5, z=(zs, zt))[0]
    assert float(out2["crd"]) == pytest.approx(term2, rel=1e-12)
    np.testing.assert_allclose(module.z_student.numpy(), zs, rtol=1e-12)


def test_crd_eval_mode_leaves_memories() -> None:
    z, batch = _inputs()
    module = _build("crd", batch).eval()
    before = (module.memory_student.clone(), module.memory_teacher.clone())
    _call(module, z, batch)
    assert torch.equal(before[0], module.memory_student) and torch.equal(before[1], module.memory_teacher)
    assert bool((module.z_student > 0).all())  # Z is set on the first call in either mode


def test_crd_init_and_buffers() -> None:
    torch.manual_seed(0)
    module = kd_losses.build_loss("crd", num_samples=20000, student_dim=6, teacher_dim=10, num_teachers=2)
    assert module.memory_student.shape == module.memory_teacher.shape == (2, 20000, 128)
    stdv = 1.0 / np.sqrt(128 / 3)
    for memory in (module.memory_student, module.memory_teacher):
        assert float(memory.abs().max()) <= stdv
        assert float(memory.pow(2).sum(-1).mean()) == pytest.approx(1.0, abs=0.02)  # rows ~unit norm
    assert module.z_student.tolist() == module.z_teacher.tolist() == [-1.0, -1.0]
    assert {name for name, _ in module.named_buffers()} == {"memory_student", "memory_teacher", "z_student",
                                                            "z_teacher"}
    assert all("memory" not in name for name, _ in module.named_parameters())
    assert [m.in_features for m in module.embed_student] == [6, 6]
    assert [m.in_features for m in module.embed_teacher] == [10, 10]
    assert {m.out_features for m in [*module.embed_student, *module.embed_teacher]} == {128}
    assert (module.weight, module.ce_weight, module.nce_k, module.nce_t, module.momentum, module.kd_weight) == (
        0.8, 1.0, 16384, 0.07, 0.5, 0.0)


def test_crd_draws_negatives_from_global_rng() -> None:
    z, batch = _inputs(dtype=torch.float32)
    module = _build("crd", batch)
    twin = copy.deepcopy(module)
    torch.manual_seed(123)
    out = module(z, batch)
    torch.manual_seed(123)
    negatives = torch.randint(0, N, (2, z.shape[0], 5))
    ref = twin(z, batch, negatives=negatives)
    for key in out:
        assert torch.equal(out[key], ref[key]), key
    assert torch.equal(module.memory_student, twin.memory_student)


def test_crd_nce_k_must_be_below_num_samples() -> None:
    for k in (N, N + 5):
        with pytest.raises(ValueError, match="pass loss.nce_k=K with K at most") as info:
            kd_losses.build_loss("crd", num_samples=N, student_dim=3, teacher_dim=5, nce_k=k)
        assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match="at most 11"):  # the default 16384 on a small set
        kd_losses.build_loss("crd", num_samples=N, student_dim=3, teacher_dim=5)


def test_crd_state_dict_resume_is_bit_exact() -> None:
    """Train a tiny student with CRD, save loss/model/optimizer/RNG state mid-way, restore into freshly built
    objects (other seed) and continue: the losses, memories and Z match bit for bit."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, 6, generator=g)
    labels = torch.randint(0, 3, (N,), generator=g)
    teacher = torch.randn(N, 2, 5, generator=g)
    order = [torch.randperm(N, generator=g)[:4] for _ in range(6)]

    def make(seed: int):
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Linear(6, 4), nn.Tanh())
        head = nn.Linear(4, 3)
        crit = kd_losses.build_loss("crd", num_samples=N, student_dim=4, teacher_dim=5, num_teachers=2, nce_k=7,
                                    feat_dim=8)
        opt = torch.optim.SGD([*model.parameters(), *head.parameters(), *crit.parameters()], lr=0.5, momentum=0.9)
        return model, head, crit, opt

    def step(objs, idx: torch.Tensor) -> torch.Tensor:
        model, head, crit, opt = objs
        feats = model(x[idx])
        out = crit(head(feats), {"label": labels[idx], "student_features": feats, "teacher_features": teacher[idx],
                                 "index": idx})
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        return out["loss"].detach()

    run = make(0)
    for idx in order[:3]:
        step(run, idx)
    saved = copy.deepcopy({"model": run[0].state_dict(), "head": run[1].state_dict(), "crit": run[2].state_dict(),
                           "opt": run[3].state_dict(), "rng": torch.get_rng_state()})
    assert bool((saved["crit"]["z_student"] > 0).all()) and bool((saved["crit"]["z_teacher"] > 0).all())
    expected = [step(run, idx) for idx in order[3:]]

    def resume(crit_state: dict):
        fresh = make(1)
        fresh[0].load_state_dict(saved["model"])
        fresh[1].load_state_dict(saved["head"])
        fresh[2].load_state_dict(crit_state)
        fresh[3].load_state_dict(saved["opt"])
        torch.set_rng_state(saved["rng"])
        return fresh, [step(fresh, idx) for idx in order[3:]]

    fresh, got = resume(saved["crit"])
    assert all(torch.equal(a, b) for a, b in zip(got, expected)), (got, expected)
    for key, value in run[2].state_dict().items():
        assert torch.equal(value, fresh[2].state_dict()[key]), key
    # Sensitivity: without the saved Z constants the resumed run recomputes them and diverges.
    no_z = dict(saved["crit"], z_student=torch.full((2,), -1.0), z_teacher=torch.full((2,), -1.0))
    assert not torch.equal(resume(no_z)[1][0], expected[0])


# --- invariants --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", RELATIONAL)
def test_relational_zero_when_student_equals_teacher(name: str) -> None:
    z, batch = _inputs(d_s=4, d_t=4, t=1)
    same = dict(batch, teacher_features=batch["student_features"][:, None, :].clone())
    assert float(kd_losses.get_loss(name)(z, same)[name]) == pytest.approx(0.0, abs=1e-12)
    assert float(kd_losses.get_loss(name)(z, batch)[name]) > 1e-4


@pytest.mark.parametrize("name", RELATIONAL)
def test_relational_zero_for_scaled_isometry_with_other_dim(name: str) -> None:
    """t = c·s·Q, Q [D_s, D_t] with orthonormal rows: same angles, relative distances and cosines."""
    z, batch = _inputs(d_s=3, d_t=7, t=2)
    s = batch["student_features"]
    q, _ = torch.linalg.qr(torch.randn(7, 3, generator=torch.Generator().manual_seed(5), dtype=torch.float64))
    teachers = torch.stack([2.5 * s @ q.T, 0.3 * s @ q.T], dim=1)  # [B, 2, 7]
    if name == "rkd":  # RKD is also translation-invariant
        teachers = teachers + torch.linspace(-1.0, 1.0, 7, dtype=torch.float64)
    out = kd_losses.get_loss(name)(z, dict(batch, teacher_features=teachers))
    assert float(out[name]) == pytest.approx(0.0, abs=1e-10)


@pytest.mark.parametrize("name", RELATIONAL)
def test_relational_invariant_to_batch_permutation(name: str) -> None:
    z, batch = _inputs(b=6)
    perm = torch.tensor([3, 0, 5, 1, 4, 2])
    permuted = {k: v[perm] for k, v in batch.items()}
    ref = kd_losses.get_loss(name)(z, batch, kd_weight=0.5)
    out = kd_losses.get_loss(name)(z[perm], permuted, kd_weight=0.5)
    for key in ref:
        torch.testing.assert_close(out[key], ref[key], atol=1e-12, rtol=0)


@pytest.mark.parametrize("name", EMBEDDING)
def test_gradients_reach_student_and_heads_only(name: str) -> None:
    z, batch = _inputs(dtype=torch.float32)
    fn = _build(name, batch)
    z.requires_grad_(True)
    s = batch["student_features"].requires_grad_(True)
    t = batch["teacher_features"].requires_grad_(True)
    out = _call(fn, z, batch)
    out["loss"].backward()
    assert t.grad is None
    for g in (z.grad, s.grad):
        assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0
    for key, value in out.items():
        assert value.ndim == 0, key
        if key != "loss":
            assert value.grad_fn is None and not value.requires_grad, key
    params = dict(fn.named_parameters())
    assert bool(params) is (name in MODULES)
    for pname, p in params.items():
        assert p.grad is not None and p.grad.abs().sum() > 0, pname
    for bname, buf in fn.named_buffers():
        assert not buf.requires_grad and buf.grad is None, bname


@pytest.mark.parametrize("name", EMBEDDING)
def test_loss_is_weighted_sum_of_parts(name: str) -> None:
    z, batch = _inputs()
    out = _call(_build(name, batch, ce_weight=0.3, weight=2.0), z, batch)
    assert set(out) == {"loss", "ce", name}
    torch.testing.assert_close(out["loss"].detach(), 0.3 * out["ce"] + 2.0 * out[name], atol=1e-12, rtol=0)


@pytest.mark.parametrize("name", EMBEDDING)
def test_kd_weight_adds_kd_term(name: str) -> None:
    """kd_weight > 0 adds exactly kd_weight × the ``kd`` loss's term (T², batchmean, mean of 2 teachers' logits)."""
    z, batch = _inputs(t=2)
    fn = _build(name, batch, kd_weight=0.0, T=2.0).eval()
    with_kd = _build(name, batch, kd_weight=0.7, T=2.0).eval()
    base, out = _call(fn, z, batch), _call(with_kd, z, batch)
    kd = kd_losses.get_loss("kd")(z, batch, alpha=1.0, T=2.0)["kd"]
    assert "kd" not in base
    assert torch.equal(out["kd"], kd)
    torch.testing.assert_close(out[name], base[name], atol=0, rtol=0)
    torch.testing.assert_close(out["loss"].detach(), base["loss"].detach() + 0.7 * kd, atol=1e-12, rtol=0)
    with pytest.raises(ValueError, match=r"needs batch\['teacher_logits'\]"):
        _call(with_kd, z, {k: v for k, v in batch.items() if k != "teacher_logits"})
    _call(fn, z, {k: v for k, v in batch.items() if k != "teacher_logits"})  # not needed without KD


@pytest.mark.parametrize("name", EMBEDDING)
def test_gradcheck_float64(name: str) -> None:
    z, batch = _inputs(b=4, d_s=3, d_t=5, t=2)
    fn = _build(name, batch, kd_weight=0.5, **({"feat_dim": 3, "nce_k": 3} if name == "crd" else {}))
    if name == "crd":
        fn.eval()
        _call(fn, z, batch)  # sets Z; in eval mode the memories stay fixed, so the loss is a function
    s = batch["student_features"].requires_grad_(True)
    z.requires_grad_(True)
    params = dict(fn.named_parameters())
    names = sorted(params)

    def loss(z, s, *weights):
        b = dict(batch, student_features=s)
        if not weights:
            return _call(fn, z, b)["loss"]
        return torch.func.functional_call(fn, dict(zip(names, weights)), (z, b),
                                          {"negatives": _negatives(fn, z)} if name == "crd" else {})["loss"]

    inputs = (z, s, *(params[n].detach().clone().requires_grad_(True) for n in names))
    assert torch.autograd.gradcheck(loss, inputs)


def _negatives(fn: CRDLoss, z: torch.Tensor) -> torch.Tensor:
    return torch.randint(0, N, (fn.num_teachers, z.shape[0], fn.nce_k), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", EMBEDDING)
def test_low_precision_inputs_computed_in_float32(name: str, dtype: torch.dtype) -> None:
    z, batch = _inputs(dtype=dtype)
    z32 = z.float()
    batch32 = {k: v.float() if v.is_floating_point() else v for k, v in batch.items()}
    fn = _build(name, batch32, kd_weight=0.5)
    twin = copy.deepcopy(fn)
    s = batch["student_features"].requires_grad_(True)
    s32 = batch32["student_features"].requires_grad_(True)
    out, ref = _call(fn, z, batch), _call(twin, z32, batch32)
    for key in out:
        assert out[key].dtype == torch.float32, key
        assert torch.isfinite(out[key]), key
        torch.testing.assert_close(out[key], ref[key], atol=0, rtol=0)
    out["loss"].backward()
    ref["loss"].backward()
    assert s.grad.dtype == dtype and torch.isfinite(s.grad).all()
    torch.testing.assert_close(s.grad, s32.grad.to(dtype), atol=0, rtol=0)


def test_rkd_single_sample_batch_is_zero_not_nan() -> None:
    z, batch = _inputs(b=1)
    out = kd_losses.get_loss("rkd")(z, batch)
    assert float(out["rkd"]) == 0.0 and torch.isfinite(out["loss"])


# --- input validation --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", EMBEDDING)
def test_missing_or_misshaped_features_one_line(name: str) -> None:
    z, batch = _inputs()
    fn = _build(name, batch)
    cases = [
        ({"student_features": None}, r"needs batch\['student_features'\] of shape \[B, D_s\]"),
        ({"student_features": torch.zeros(4, 3)}, r"batch\['student_features'\] must be \[B, D_s\] = \[5, D_s\]"),
        ({"teacher_features": None}, r"needs batch\['teacher_features'\] of shape \[B, T, D_t\]"),
        ({"teacher_features": torch.zeros(5, 6)}, r"batch\['teacher_features'\] must be \[B, T, D_t\] = \[5, T, D_t\]"),
    ]
    if name in MODULES:
        cases += [({"student_features": torch.zeros(5, 4)}, "built for student_dim=3"),
                  ({"teacher_features": torch.zeros(5, 3, 6)}, "built for num_teachers=2, teacher_dim=6"),
                  ({"teacher_features": torch.zeros(5, 2, 7)}, "built for num_teachers=2, teacher_dim=6")]
    if name == "crd":
        cases += [({"index": None}, r"needs batch\['index'\]"),
                  ({"index": torch.zeros(5, 1, dtype=torch.long)}, r"batch\['index'\] must be integer \[B\]"),
                  ({"index": torch.zeros(5)}, r"batch\['index'\] must be integer \[B\]")]
    for change, msg in cases:
        bad = {k: v for k, v in {**batch, **change}.items() if v is not None}
        with pytest.raises(ValueError, match=msg) as info:
            _call(fn, z, bad)
        assert "\n" not in str(info.value)


def test_crd_negatives_shape_checked() -> None:
    z, batch = _inputs()
    fn = _build("crd", batch)
    with pytest.raises(ValueError, match=r"negatives must be \[T, B, nce_k\] = \[2, 5, 5\]"):
        fn(z, batch, negatives=torch.zeros(5, 5, dtype=torch.long))


# --- registry ----------------------------------------------------------------------------------------


def test_needs_features_flags() -> None:
    for name in kd_losses.available_losses():
        assert kd_losses.needs_features(name) is (name in EMBEDDING), name
        assert kd_losses.get_loss(name).needs_features is (name in EMBEDDING), name
        assert kd_losses.get_spec(name).needs_features is (name in EMBEDDING), name
    for name in EMBEDDING:
        assert kd_losses.needs_teacher(name)
        assert _build(name, _inputs()[1]).needs_features
    with pytest.raises(KeyError, match="unknown loss 'foo'"):
        kd_losses.needs_features("foo")


@pytest.mark.parametrize("name", EMBEDDING)
def test_build_args_are_not_hparams(name: str) -> None:
    hparams = kd_losses.get_spec(name).hparam_names()
    assert not {"num_classes", "num_samples", "student_dim", "teacher_dim", "num_teachers"} & set(hparams)
    assert hparams[0] == "weight" and {"ce_weight", "kd_weight", "T"} <= set(hparams)


def test_build_fills_dims_and_requires_them() -> None:
    crd = kd_losses.build_loss("crd", num_classes=3, num_samples=40, student_dim=3, teacher_dim=5, num_teachers=3,
                               nce_k=8, feat_dim=16)
    assert crd.memory_teacher.shape == (3, 40, 16) and crd.num_samples == 40 and crd.nce_k == 8
    assert len(crd.embed_student) == 3 and crd.embed_teacher[2].in_features == 5
    fitnet = kd_losses.build_loss("fitnet", student_dim=3, teacher_dim=5, num_teachers=2)
    assert [(r.in_features, r.out_features) for r in fitnet.regressors] == [(3, 5), (3, 5)]
    assert len(kd_losses.build_loss("fitnet", student_dim=3, teacher_dim=5).regressors) == 1  # num_teachers=1
    with pytest.raises(TypeError, match="^loss 'crd' needs num_samples$"):
        kd_losses.build_loss("crd", student_dim=3, teacher_dim=5)
    with pytest.raises(TypeError, match="^loss 'fitnet' needs teacher_dim$"):
        kd_losses.build_loss("fitnet", student_dim=3)


def test_unknown_hparam_lists_valid() -> None:
    with pytest.raises(TypeError) as info:
        kd_losses.build_loss("crd", num_samples=N, student_dim=3, teacher_dim=5, tau=0.1)
    assert str(info.value) == ("unknown hparam(s) for loss 'crd': tau; "
                               "valid: weight, ce_weight, feat_dim, nce_k, nce_t, momentum, kd_weight, T")
    with pytest.raises(TypeError, match="^unknown hparam.*'rkd': alpha; valid: weight, distance_weight, angle_weight"):
        kd_losses.build_loss("rkd", alpha=0.1)


@pytest.mark.parametrize("name", RELATIONAL)
def test_built_function_loss_matches_direct_call(name: str) -> None:
    z, batch = _inputs()
    built = kd_losses.build_loss(name, num_classes=4, num_samples=N, student_dim=3, teacher_dim=6, weight=2.0)
    assert isinstance(built, nn.Module) and list(built.parameters()) == []
    out, ref = built(z, batch), kd_losses.get_loss(name)(z, batch, weight=2.0)
    for key in ref:
        assert torch.equal(out[key], ref[key]), key


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
