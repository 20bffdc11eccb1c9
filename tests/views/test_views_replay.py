"""Consistent views (issue 5): K stored views per image, replayed exactly in stage 2."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from pipeline.bank.reader import LabelBank
from pipeline.data import build_manifest
from pipeline.data.dali import build_pipeline, iterate
from pipeline.data.presets import get_preset
from pipeline.dump_logits import main as dump_main
from pipeline.labels import main as labels_main
from pipeline.models.ensemble import build_ensemble
from pipeline.data.crops import rrc_box
from stage1_teacher_logits.views import ViewSampler
from stage2_student_train.label_sources import BankLabelSource, view_choice


@pytest.fixture(scope="module")
def views_bank(demo_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("vb") / "views.zarr"
    rc = dump_main(["--teacher", "democnn_s", "--weights", "none", "--data", str(demo_root), "--split", "train",
                    "--preset", "demo", "--batch-size", "30", "--rows-per-chunk", "60", "--views", "4",
                    "--view-policy", "rrc+flip", "--view-seed", "5", "--out", str(out)])
    assert rc == 0
    return out


def test_bank_layout(views_bank, demo_root):
    bank = LabelBank(views_bank)
    n = len(build_manifest(demo_root, "train"))
    assert bank.shape == (n, 1, 4, 10)
    views = bank.views()
    assert views.shape == (n, 4, 5)
    assert np.isfinite(views).all()
    y, x, h, w, flip = (views[..., k] for k in range(5))
    assert ((y >= 0) & (x >= 0) & (h > 0) & (w > 0) & (y + h <= 1 + 1e-6) & (x + w <= 1 + 1e-6)).all()
    assert set(np.unique(flip)) == {0.0, 1.0}
    # Areas respect the preset's scale range (0.08-1 of the image).
    assert (h * w).min() >= 0.08 - 0.02 and (h * w).max() <= 1.0 + 1e-6
    # Different views of one image differ.
    assert not np.allclose(views[:, 0], views[:, 1])


def test_views_depend_only_on_seed_and_index(demo_root):
    m = build_manifest(demo_root, "train")
    s = ViewSampler("rrc+flip", 3, 7, get_preset("demo"))
    a = s.boxes(m, np.array([5, 9, 11]))
    b = s.boxes(m, np.array([11, 5]))
    np.testing.assert_array_equal(a[2], b[0])
    np.testing.assert_array_equal(a[0], b[1])
    other = ViewSampler("rrc+flip", 3, 8, get_preset("demo")).boxes(m, np.array([5]))
    assert not np.array_equal(a[0], other[0])


def test_rrc_box_matches_torchvision_constraints():
    rng = np.random.default_rng(0)
    for h, w in ((100, 300), (300, 100), (64, 64)):
        for _ in range(50):
            y, x, bh, bw = rrc_box(rng, h, w, (0.08, 1.0), (3 / 4, 4 / 3))
            assert 0 <= y and 0 <= x and y + bh <= 1 + 1e-9 and x + bw <= 1 + 1e-9


def test_replayed_crop_reproduces_stored_logits(views_bank, demo_root):
    """The replayed crop fed through the teacher gives the stored logits (fp16 tolerance): box convention,
    rounding and flip agree end to end between stage 1 and stage 2."""
    bank = LabelBank(views_bank)
    m = build_manifest(demo_root, "train")
    src = BankLabelSource([bank], replay_seed=11)
    teacher = build_ensemble(["democnn_s"], [None], 10)  # same seed-0 init as the dump's --weights none
    order = np.random.default_rng(1).permutation(len(m))[:60]
    for epoch in (0, 3):
        boxes = src.boxes(order, epoch)
        pipe = build_pipeline(m, order, get_preset("demo"), "views", 30, 2, "cpu", 0, boxes=boxes)
        for b in iterate(pipe, len(order), 30):
            live = teacher(b.images)
            stored = src({"index": b.index, "epoch": epoch, "image": b.images})["teacher_logits"]
            torch.testing.assert_close(stored, live, atol=2e-3, rtol=2e-3)


def test_view_choice_uses_all_views_and_is_reproducible():
    idx = torch.arange(2000)
    v0 = view_choice(idx, 0, 0, 8)
    assert torch.equal(v0, view_choice(idx, 0, 0, 8))
    assert set(v0.tolist()) == set(range(8))
    assert not torch.equal(v0, view_choice(idx, 1, 0, 8))
    # Across epochs a sample cycles through several views.
    per_sample = torch.stack([view_choice(idx[:50], e, 0, 4) for e in range(16)], 1)
    assert (torch.tensor([len(set(r.tolist())) for r in per_sample]) >= 3).all()


def test_replay_views_training_run(views_bank, demo_root, tmp_path):
    from pipeline.train_student import main as train_main

    rc = train_main(["--method", "kd", "--student", "democnn_s", "--labels", str(views_bank), "--data",
                     str(demo_root), "--preset", "demo", "--epochs", "1", "--batch-size", "32", "--replay-views",
                     "--output-dir", str(tmp_path / "run")])
    assert rc == 0
    rows = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 1 and np.isfinite(rows[0]["train_loss"])


def test_replay_views_refuses_center_bank(demo_bank, demo_root, tmp_path, capsys):
    from pipeline.train_student import main as train_main

    rc = train_main(["--method", "kd", "--student", "democnn_s", "--labels", str(demo_bank), "--data",
                     str(demo_root), "--preset", "demo", "--epochs", "1", "--replay-views",
                     "--output-dir", str(tmp_path / "run")])
    assert rc == 2
    assert "stored views" in capsys.readouterr().err


def test_info_reports_views_and_bytes_per_view(views_bank, capsys):
    assert labels_main(["info", str(views_bank), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["shape"]["V"] == 4
    assert info["views"]["policy"] == "rrc+flip"
    assert info["bytes_per_view"] == pytest.approx(info["bytes_per_sample"] / 4, rel=0.01)


def test_center_policy_rejects_multiple_views(demo_root, tmp_path, capsys):
    rc = dump_main(["--teacher", "democnn_s", "--weights", "none", "--data", str(demo_root), "--preset", "demo",
                    "--views", "3", "--out", str(tmp_path / "b.zarr")])
    assert rc == 2
    assert "center" in capsys.readouterr().err
    assert not (tmp_path / "b.zarr").exists()


def test_views_with_ensemble(demo_root, tmp_path):
    out = tmp_path / "ens.zarr"
    rc = dump_main(["--teacher", "democnn_s", "--weights", "none", "--teacher", "democnn_s", "--weights", "none",
                    "--data", str(demo_root), "--preset", "demo", "--batch-size", "30", "--rows-per-chunk", "60",
                    "--views", "2", "--view-policy", "rrc", "--out", str(out)])
    assert rc == 0
    bank = LabelBank(out)
    assert bank.shape[1:3] == (2, 2)
    logits = bank.load().float()
    # Teachers are seeded differently (seed + i), so the two T slices differ; views differ too.
    assert not torch.allclose(logits[:, 0], logits[:, 1])
    assert not torch.allclose(logits[:, :, 0], logits[:, :, 1])


def test_view_choice_is_the_same_hash_on_cpu_and_in_torch():
    """CPU indices are hashed through numpy; the torch path (accelerator indices) gives the same views."""
    from stage2_student_train.label_sources import _view_hash

    idx = torch.cat([torch.arange(5000), torch.randint(-2 ** 62, 2 ** 62, (5000,), generator=torch.Generator().manual_seed(0))])
    for epoch, seed, k in ((0, 0, 8), (3, 11, 7), (40, 2, 100)):
        for order, torch_path in (("hash", _view_hash(idx, epoch, seed, k)),
                                  ("cycle", (_view_hash(idx, -1, seed, k) + epoch) % k)):
            np_path = view_choice(idx, epoch, seed, k, order)
            assert torch.equal(np_path, torch_path) and np_path.dtype == torch.int64
            assert int(np_path.min()) >= 0 and int(np_path.max()) < k
