"""Stage 2 from compact banks (issue 16): a compact multi-view bank with --replay-views trains exactly as the dense
bank reconstructed from it, several compact banks stack on T, and a dense bank over the memory budget is refused
in one line."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

import kd_losses
from pipeline.bank.reader import LabelBank
from pipeline.bank.resident import BUDGET_ENV
from pipeline.bank.writer import create_bank, mark_complete, write_chunk
from s2_helpers import demo_args, read_metrics
from stage2_student_train.label_sources import BankLabelSource


def _dump(demo_root: Path, out: Path, *extra: str) -> Path:
    from pipeline.dump_logits import main

    rc = main(["--teacher", "democnn_s", "--weights", "none", "--data", str(demo_root), "--preset", "demo",
               "--batch-size", "30", "--rows-per-chunk", "60", "--views", "4", "--view-policy", "rrc+flip",
               "--view-seed", "5", "--workers", "1", *extra, "--out", str(out)])
    assert rc == 0
    return out


def _reconstructed_dense(src: Path, out: Path) -> Path:
    """A float32 dense bank holding the reader's reconstruction of the compact bank ``src`` (same dataset,
    teachers, views): what stage 2 trained on before compact banks were held compact."""
    bank = LabelBank(src)
    n = bank.num_samples
    rows = bank.rows_per_chunk
    attrs = {k: bank.attrs[k] for k in ("teachers", "dataset", "preprocessing", "views")}
    g = create_bank(out, {**attrs, "key": "reconstructed", "metrics": {}}, bank.shape, "float32", rows)
    x, labels, views, skipped = bank.read_logits(), bank.labels(), bank.views(), bank.skipped()
    for j in range(math.ceil(n / rows)):
        s, e = j * rows, min(n, (j + 1) * rows)
        write_chunk(g, j, x[s:e], labels[s:e], views[s:e], skipped[s:e])
    mark_complete(g, {})
    return out


@pytest.fixture(scope="module")
def compact_views(demo_root: Path, tmp_path_factory) -> dict:
    d = tmp_path_factory.mktemp("s2c")
    topk = _dump(demo_root, d / "k3.zarr", "--format", "topk", "--topk", "3")
    int8 = _dump(demo_root, d / "q.zarr", "--format", "int8")
    return {"topk": topk, "int8": int8, "dense_topk": _reconstructed_dense(topk, d / "dense_k3.zarr")}


@pytest.mark.parametrize("method", ["kd", "wsld", "dkd"])
def test_replayed_views_of_a_compact_bank_give_the_dense_reconstructions_losses(compact_views: dict, method: str):
    compact = BankLabelSource([LabelBank(compact_views["topk"])], replay_seed=7)
    dense = BankLabelSource([LabelBank(compact_views["dense_topk"])], replay_seed=7)
    assert compact.residents[0].format == "topk" and dense.residents[0].format == "dense"
    crit = kd_losses.build_loss(method, num_classes=10)
    gen = torch.Generator().manual_seed(0)
    order = np.random.default_rng(3).permutation(300)
    for epoch in range(3):
        assert np.array_equal(compact.boxes(order, epoch), dense.boxes(order, epoch))
        for s in range(0, 300, 64):
            index = torch.from_numpy(order[s:s + 64])
            batch = {"index": index, "epoch": epoch, "label": torch.from_numpy(LabelBank(compact_views["topk"])
                                                                                .labels()[index.numpy()]).long()}
            zc, zd = compact(batch)["teacher_logits"], dense(batch)["teacher_logits"]
            assert zc.shape == (len(index), 1, 10) and torch.equal(zc, zd)
            student = torch.randn(len(index), 10, generator=gen)
            lc, ld = crit(student, {**batch, "teacher_logits": zc}), crit(student, {**batch, "teacher_logits": zd})
            for k in lc:
                assert torch.equal(lc[k], ld[k]), (method, k)


def test_replay_views_training_run_compact_equals_dense_reconstruction(compact_views: dict, train, tmp_path: Path):
    """End to end: the logged training losses of a --replay-views run are identical with either bank."""
    for name in ("topk", "dense_topk"):
        assert train(tmp_path / name, "--replay-views", "max_steps_per_epoch=3", method="wsld",
                     labels=(compact_views[name],)) == 0
    rc, rd = read_metrics(tmp_path / "topk")[0], read_metrics(tmp_path / "dense_topk")[0]
    assert rc.keys() == rd.keys() and np.isfinite(rc["train_loss"])
    for k in ("train_loss", "train_ce", "train_kd"):
        if k in rd:
            assert rc[k] == rd[k], k


def test_several_compact_banks_with_views_stack_on_the_teacher_axis(compact_views: dict):
    banks = [LabelBank(compact_views["topk"]), LabelBank(compact_views["int8"])]
    both = BankLabelSource(banks, replay_seed=1)
    singles = [BankLabelSource([b], replay_seed=1) for b in banks]
    batch = {"index": torch.tensor([0, 299, 60, 59, 17]), "epoch": 4}
    out = both(batch)["teacher_logits"]
    assert out.shape == (5, 2, 10) and both.num_views == 4 and len(both.teachers) == 2
    for j, s in enumerate(singles):
        assert torch.equal(out[:, j:j + 1], s(batch)["teacher_logits"])


def test_dense_bank_over_the_memory_budget_is_refused_by_train_student(demo_root: Path, demo_bank: Path,
                                                                         tmp_path: Path, monkeypatch, capsys):
    from pipeline.train_student import main

    monkeypatch.setenv(BUDGET_ENV, "1e-6")  # 1 kB: the demo bank holds 6 kB of fp16 logits
    rc = main(["--method", "kd", *demo_args(demo_root, tmp_path / "run", labels=(demo_bank,))])
    assert rc == 2
    err = [ln for ln in capsys.readouterr().err.strip().splitlines() if ln.startswith("error:")]
    assert len(err) == 1 and "--format topk --topk 10" in err[0] and "GB" in err[0] and str(demo_bank) in err[0]
