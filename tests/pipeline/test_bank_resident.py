"""Resident label banks (issue 16): compact banks held compact, gathered rows densified bit for bit as the reader
reconstructs them; dense banks in their own dtype; the memory budget; damaged and outdated banks refused."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from pipeline.bank.reader import LabelBank
from pipeline.bank.resident import (BUDGET_ENV, RESIDENTS, dense_nbytes, load_residents, resident_nbytes)
from pipeline.bank.writer import create_bank, mark_complete, write_chunk
from pipeline.errors import BankError

N, T, V, C, ROWS = 70, 2, 3, 12, 16


def make_bank(path: Path, fmt: str = "dense", k: int | None = None, dtype: str = "float16", n: int = N, t: int = T,
              v: int = V, c: int = C, skipped=(5,), seed: int = 0, scale: float = 3.0) -> tuple[Path, np.ndarray]:
    """A complete bank written chunk by chunk through the writer (compact banks: encoded on write, as the dump
    does); returns (path, labels)."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, c, n).astype(np.int32)
    attrs = {"key": f"k-{path.name}", "teachers": [{"name": f"t{i}", "arch": f"t{i}", "weights": "none"} for i in range(t)],
             "dataset": {"name": "synth", "split": "train", "num_samples": n, "num_classes": c,
                         "classes": [f"c{i}" for i in range(c)], "fingerprint": "fp"},
             "views": {"policy": "rrc", "num_views": v}, "metrics": {}}
    g = create_bank(path, attrs, (n, t, v, c), dtype, ROWS, fmt, k)
    sk = np.zeros(n, bool)
    sk[list(skipped)] = True
    for j in range(math.ceil(n / ROWS)):
        s, e = j * ROWS, min(n, (j + 1) * ROWS)
        x = (rng.standard_normal((e - s, t, v, c)) * scale).astype(np.float32)
        x[np.arange(e - s), :, :, labels[s:e]] += 1.0  # some peaks on the true class, most true classes elsewhere
        x[sk[s:e]] = np.nan
        write_chunk(g, j, x, labels[s:e], rng.random((e - s, v, 5)).astype(np.float32), sk[s:e])
    mark_complete(g, {})
    return path, labels


def _expected(bank: LabelBank, index: np.ndarray, view: np.ndarray | None) -> np.ndarray:
    full = bank.read_logits().astype(np.float32)  # the reader's reconstruction
    return full[index, :, 0 if view is None else view]


@pytest.mark.parametrize("fmt, k, dtype", [("dense", None, "float16"), ("dense", None, "float32"), ("topk", 3, "float16"),
                                           ("topk", C, "float16"), ("int8", None, "float16")])
def test_gather_equals_the_readers_reconstruction_bit_for_bit(tmp_path: Path, fmt, k, dtype):
    path, _ = make_bank(tmp_path / "b.zarr", fmt, k, dtype)
    bank = LabelBank(path)
    (res,) = load_residents([bank])
    assert isinstance(res, RESIDENTS[fmt]) and res.shape == (N, T, V, C)
    rng = np.random.default_rng(1)
    for _ in range(4):
        index = rng.integers(0, N, 33)
        index[:3] = [0, N - 1, 5]  # first row, last row, the skipped row
        view = rng.integers(0, V, 33)
        for vw in (view, None):
            out = res.gather(torch.from_numpy(index), None if vw is None else torch.from_numpy(vw))
            assert out.shape == (33, T, C) and out.dtype == torch.float32
            want = _expected(bank, index, vw)
            assert np.array_equal(out.numpy(), want, equal_nan=True)
            assert np.isnan(out[index == 5].numpy()).all() and np.isfinite(out[index != 5].numpy()).all()


def test_float32_bank_is_not_narrowed(tmp_path: Path):
    path, _ = make_bank(tmp_path / "f32.zarr", dtype="float32", skipped=(), scale=1e5)  # beyond fp16's 65504
    (res,) = load_residents([LabelBank(path)])
    assert res.arrays["logits"].dtype == torch.float32
    out = res.gather(torch.arange(N))
    assert torch.isfinite(out).all() and out.abs().max() > 65504
    assert np.array_equal(out.numpy(), LabelBank(path).read_logits()[:, :, 0])


def test_resident_memory_is_the_compact_size(tmp_path: Path):
    """A top-10 bank of 1000 classes holds 48 B per vector (top 10 + the true class, their indices, the tail fill),
    not 2000: no array over the class axis exists."""
    path, _ = make_bank(tmp_path / "k10.zarr", "topk", 10, n=40, t=1, v=2, c=1000)
    bank = LabelBank(path)
    (res,) = load_residents([bank])
    assert res.nbytes == resident_nbytes(bank) == 40 * 2 * (11 * 4 + 4 + 2 * 6)  # + the tail statistics
    assert dense_nbytes(bank) == 40 * 2 * 1000 * 2 and res.nbytes < dense_nbytes(bank) / 30
    assert all(1000 not in a.shape for a in res.arrays.values())
    stored = sum(np.asarray(bank.group[n][:]).nbytes for n in bank.attrs["compact_arrays"])
    assert res.nbytes <= 1.2 * stored  # ~ the compact payload (+1 slot and a float32 fill per vector)


def test_true_class_probability_exact_outside_the_top_k(tmp_path: Path):
    path, labels = make_bank(tmp_path / "k2.zarr", "topk", 2, skipped=())
    bank = LabelBank(path)
    (res,) = load_residents([bank])
    out = res.gather(torch.arange(N), torch.full((N,), 1)).numpy()  # view 1
    target = np.asarray(bank.group["target_logprob"][:, :, 1]).astype(np.float32)  # [N, T]
    top = np.asarray(bank.group["topk_indices"][:, :, 1])  # [N, T, 2]
    outside = ~(top == labels[:, None, None]).any(-1)
    assert outside.mean() > 0.5
    got = np.take_along_axis(out, np.broadcast_to(labels[:, None, None], (N, T, 1)).astype(np.int64), -1)[..., 0]
    assert np.array_equal(got, target)  # the stored fp16 log-probability, exactly
    lp = torch.log_softmax(torch.from_numpy(out), -1).numpy()  # what a loss sees at T = 1
    lpt = np.take_along_axis(lp, np.broadcast_to(labels[:, None, None], (N, T, 1)).astype(np.int64), -1)[..., 0]
    np.testing.assert_allclose(lpt[outside], target[outside], atol=2e-3)


def test_dense_bank_over_the_memory_budget_is_refused_in_one_line(tmp_path: Path, monkeypatch):
    path, _ = make_bank(tmp_path / "d.zarr", c=60)
    kpath, _ = make_bank(tmp_path / "k.zarr", "topk", 2, c=60)
    dense, topk = LabelBank(path), LabelBank(kpath)
    budget = (resident_nbytes(topk) + dense_nbytes(dense)) / 2  # between the compact and the dense size
    monkeypatch.setenv(BUDGET_ENV, str(budget / 1e9))
    with pytest.raises(BankError) as e:
        load_residents([dense])
    msg = str(e.value)
    assert "\n" not in msg and str(path) in msg and "--format topk --topk 10" in msg and "labels compact" in msg
    assert f"{dense_nbytes(dense) / 1e9:.3g} GB" in msg and BUDGET_ENV in msg
    (res,) = load_residents([topk])  # the compact form of the same shape fits
    assert res.nbytes <= budget
    with pytest.raises(BankError, match="need"):  # several banks: their sum counts
        load_residents([topk, topk, topk, topk, topk, topk])


def test_damaged_and_outdated_compact_banks_are_refused(tmp_path: Path):
    for fmt, k, arr, key in (("topk", 3, "topk_indices", "1/0/0/0"), ("topk", 3, "target_logprob", "2/0/0"),
                             ("int8", None, "q", "3/0/0/0"), ("int8", None, "scale", "0/0/0")):
        path, _ = make_bank(tmp_path / f"{arr}.zarr", fmt, k)
        (path / arr / "c" / key).unlink()  # a lost chunk file reads back as the fill value
        with pytest.raises(BankError, match=f"damaged.*({arr}|topk_values)"):
            load_residents([LabelBank(path)])
    path, _ = make_bank(tmp_path / "v1.zarr", "topk", 3)
    g = zarr.open_group(str(path), mode="r+")
    g.attrs["compact_arrays"] = ["topk_values", "topk_indices"]  # a top-k bank of the first layout
    g.attrs["sources"] = [{"path": "/banks/dense.zarr"}]
    with pytest.raises(BankError) as e:
        LabelBank(path)
    assert "target_logprob" in str(e.value) and "labels compact /banks/dense.zarr" in str(e.value)


def test_several_formats_on_the_teacher_axis(tmp_path: Path):
    """Views x compact x several banks: a dense and an int8 bank gathered together on T as logits; two top-k banks
    as one sparse target; a top-k bank beside a dense one refused in one line (their targets differ in kind)."""
    from pipeline.errors import UsageError
    from stage2_student_train.label_sources import BankLabelSource, view_choice

    paths = {f"{f}{s}": make_bank(tmp_path / f"{f}{s}.zarr", f, k, seed=s)[0]
             for f, k, s in (("dense", None, 0), ("topk", 4, 1), ("int8", None, 2), ("topk", 4, 3))}
    banks = [LabelBank(paths[n]) for n in ("dense0", "int82")]
    src = BankLabelSource(banks, replay_seed=3)
    index = torch.tensor([0, 7, 69, 16, 15])
    out = src({"index": index, "epoch": 2})["teacher_logits"]
    assert out.shape == (5, 2 * T, C) and len(src.teachers) == 2 * T
    view = view_choice(index, 2, 3, V).numpy()
    for j, b in enumerate(banks):
        assert np.array_equal(out[:, j * T:(j + 1) * T].numpy(), _expected(b, index.numpy(), view), equal_nan=True)
    sparse = [LabelBank(paths[n]) for n in ("topk1", "topk3")]
    tgt = BankLabelSource(sparse, replay_seed=3)({"index": index, "epoch": 2})["teacher_target"]
    assert tgt.kind == "topk" and tgt.kept_index.shape == (5, 2 * T, 5) and tgt.tail_lse.shape == (5, 2 * T, 6)
    for j, b in enumerate(sparse):  # the kept classes and their log-probabilities are the stored ones
        want = _expected(b, index.numpy(), view)
        got = np.take_along_axis(want, tgt.kept_index[:, j * T:(j + 1) * T].numpy(), axis=-1)
        assert np.array_equal(tgt.kept_logprob[:, j * T:(j + 1) * T].numpy(), got, equal_nan=True)
    with pytest.raises(UsageError, match="different kinds"):
        BankLabelSource([LabelBank(paths["dense0"]), sparse[0]])


def test_topk_with_int32_indices(tmp_path: Path):
    """C > 32767: int32 indices in the packed rows (another alignment of the row layout)."""
    path, _ = make_bank(tmp_path / "wide.zarr", "topk", 4, n=20, t=2, v=2, c=40000, skipped=(3,))
    bank = LabelBank(path)
    assert bank.group["topk_indices"].dtype == np.int32
    (res,) = load_residents([bank])
    assert res.nbytes == resident_nbytes(bank) == 20 * 2 * 2 * 48  # fill 4 + 5 indices x 4 + 5 values x 2 + tail 12, padded
    index, view = np.array([0, 19, 3, 7]), np.array([1, 0, 1, 1])
    out = res.gather(torch.from_numpy(index), torch.from_numpy(view)).numpy()
    assert np.array_equal(out, _expected(bank, index, view), equal_nan=True)
