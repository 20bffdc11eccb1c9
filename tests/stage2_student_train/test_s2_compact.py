"""Stage 2 from compact banks (issues 16, 22): a top-k multi-view bank with --replay-views teaches the dense
teacher's coarse-grained distribution at the method's temperature (the tail one bucket, not re-softened), sampled
banks train, methods refuse formats they cannot read and old uniform-tail banks are refused in one line, several
compact banks stack on T, and a dense bank over the memory budget is refused in one line."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import kd_losses
from pipeline.bank.reader import LabelBank
from pipeline.bank.resident import BUDGET_ENV
from s2_helpers import demo_args, read_metrics
from stage2_student_train.label_sources import BankLabelSource


def _dump(demo_root: Path, out: Path, *extra: str) -> Path:
    from pipeline.dump_logits import main

    rc = main(["--teacher", "democnn_s", "--weights", "none", "--data", str(demo_root), "--preset", "demo",
               "--batch-size", "30", "--rows-per-chunk", "60", "--views", "4", "--view-policy", "rrc+flip",
               "--view-seed", "5", "--workers", "1", *extra, "--out", str(out)])
    assert rc == 0
    return out


@pytest.fixture(scope="module")
def compact_views(demo_root: Path, tmp_path_factory) -> dict:
    d = tmp_path_factory.mktemp("s2c")
    topk = _dump(demo_root, d / "k3.zarr", "--format", "topk", "--topk", "3")
    int8 = _dump(demo_root, d / "q.zarr", "--format", "int8")
    sampled = _dump(demo_root, d / "s.zarr", "--format", "sampled", "--topk", "2", "--samples", "3")
    return {"topk": topk, "int8": int8, "sampled": sampled, "dense": _dump(demo_root, d / "dense.zarr")}


@pytest.mark.parametrize("method", ["kd", "wsld", "dkd"])
def test_replayed_views_of_a_top_k_bank_teach_the_dense_teachers_buckets(compact_views: dict, method: str):
    """Each gathered (sample, view) target of the top-k bank at the method's T > 1 is the dense teacher's own
    coarse-grained distribution: kept classes exact, one tail bucket holding the teacher's tail mass at T (by hand
    from the dense dump of the same teacher and views)."""
    compact = BankLabelSource([LabelBank(compact_views["topk"])], replay_seed=7)
    dense = BankLabelSource([LabelBank(compact_views["dense"])], replay_seed=7)
    T = {"kd": 4.0, "wsld": 2.0, "dkd": 4.0}[method]  # the methods' defaults
    labels = LabelBank(compact_views["topk"]).labels()
    order = np.random.default_rng(3).permutation(300)
    for epoch in range(2):
        assert np.array_equal(compact.boxes(order, epoch), dense.boxes(order, epoch))
        for s in range(0, 300, 100):
            index = torch.from_numpy(order[s:s + 100])
            batch = {"index": index, "epoch": epoch, "label": torch.from_numpy(labels[index.numpy()]).long()}
            tgt = compact(batch)["teacher_target"]
            lp, tail = tgt.log_probs(T)
            p = torch.softmax(dense(batch)["teacher_logits"] / T, dim=-1)  # [B, 1, C]
            kept = ~tail
            torch.testing.assert_close(lp.exp()[kept], p[kept], rtol=4e-3, atol=1e-5)
            torch.testing.assert_close(torch.where(tail, lp.exp(), 0).sum(-1), torch.where(tail, p, 0).sum(-1),
                                       rtol=4e-3, atol=1e-5)
            student = torch.randn(len(index), 10, generator=torch.Generator().manual_seed(epoch))
            out = kd_losses.build_loss(method, num_classes=10)(student, {**batch, "teacher_target": tgt})
            assert torch.isfinite(out["loss"])


def test_replay_views_training_runs_from_top_k_and_sampled_banks(compact_views: dict, train, tmp_path: Path):
    """End to end: --replay-views runs train from a top-k and a sampled bank (finite logged losses)."""
    for name in ("topk", "sampled"):
        assert train(tmp_path / name, "--replay-views", "max_steps_per_epoch=3", method="wsld",
                     labels=(compact_views[name],)) == 0
        r = read_metrics(tmp_path / name)[0]
        assert np.isfinite(r["train_loss"]) and np.isfinite(r["train_kd"])


def test_methods_refuse_formats_they_cannot_read_in_one_line(compact_views: dict, demo_root: Path, tmp_path: Path,
                                                               capsys):
    from pipeline.train_student import main

    for method, bank, word in (("dist", "sampled", "Pearson"), ("sl_enc", "topk", "perturbation")):
        rc = main(["--method", method, *demo_args(demo_root, tmp_path / method, labels=(compact_views[bank],))])
        assert rc == 2
        err = [ln for ln in capsys.readouterr().err.strip().splitlines() if ln.startswith("error:")]
        assert len(err) == 1 and word in err[0] and str(compact_views[bank]) in err[0], err


def test_a_top_k_bank_of_the_first_layout_is_refused_with_the_rebuild_command(compact_views: dict, tmp_path: Path):
    import shutil

    import zarr

    from pipeline.errors import BankError

    old = tmp_path / "old.zarr"
    shutil.copytree(compact_views["topk"], old)
    g = zarr.open_group(str(old), mode="r+")
    g.attrs.update({"compact_arrays": ["topk_values", "topk_indices", "target_logprob"], "tail": "uniform",
                    "sources": [{"path": "/banks/dense.zarr"}]})
    with pytest.raises(BankError) as e:
        BankLabelSource([LabelBank(old)])
    assert "uniform tail" in str(e.value) and "python -m pipeline.labels compact /banks/dense.zarr" in str(e.value)


def test_several_compact_banks_with_views_stack_on_the_teacher_axis(compact_views: dict):
    banks = [LabelBank(compact_views["topk"]), LabelBank(compact_views["topk"])]
    both = BankLabelSource(banks, replay_seed=1)
    single = BankLabelSource(banks[:1], replay_seed=1)
    batch = {"index": torch.tensor([0, 299, 60, 59, 17]), "epoch": 4}
    out = both(batch)["teacher_target"]
    assert out.num_teachers == 2 and both.num_views == 4 and len(both.teachers) == 2
    one = single(batch)["teacher_target"]
    for j in range(2):
        assert torch.equal(out.kept_index[:, j:j + 1], one.kept_index)
        assert torch.equal(out.tail_lse[:, j:j + 1], one.tail_lse)


def test_dense_bank_over_the_memory_budget_is_refused_by_train_student(demo_root: Path, demo_bank: Path,
                                                                         tmp_path: Path, monkeypatch, capsys):
    from pipeline.train_student import main

    monkeypatch.setenv(BUDGET_ENV, "1e-6")  # 1 kB: the demo bank holds 6 kB of fp16 logits
    rc = main(["--method", "kd", *demo_args(demo_root, tmp_path / "run", labels=(demo_bank,))])
    assert rc == 2
    err = [ln for ln in capsys.readouterr().err.strip().splitlines() if ln.startswith("error:")]
    assert len(err) == 1 and "--format topk --topk 10" in err[0] and "GB" in err[0] and str(demo_bank) in err[0]
