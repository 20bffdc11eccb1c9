"""``--mix-labels blend`` (issue 25, point 5): Mixup/CutMix in stage 2 with the two images' stored soft labels
blended by λ (FKD / ReLabel), from any dense bank, with a warning that it is approximate."""

from __future__ import annotations

import logging

import numpy as np
import torch

from pipeline.bank.reader import LabelBank
from pipeline.data import build_manifest
from pipeline.data.loaders import load_blended_batches
from pipeline.data.policy import blend_rows, parse_mix_policy
from pipeline.data.presets import get_preset
from pipeline.train_student import main as train_main
from stage2_student_train.label_sources import BankLabelSource, blend_logits
from stage2_student_train.loop import make_batch


def test_blend_logits_hand_built():
    z1 = torch.tensor([[[0.0, 0.0, 0.0]]])
    z2 = torch.tensor([[[0.0, float(np.log(2.0)), 0.0]]])
    out = blend_logits(z1, z2, torch.tensor([0.25]))
    expect = 0.25 * np.array([1 / 3, 1 / 3, 1 / 3]) + 0.75 * np.array([0.25, 0.5, 0.25])
    np.testing.assert_allclose(out.exp().numpy()[0, 0], expect, rtol=1e-6)
    torch.testing.assert_close(blend_logits(z1, z2, torch.tensor([1.0])), torch.log_softmax(z1, -1))


def test_blended_batches_and_targets(demo_bank, demo_root):
    """Partners and λ come from (seed, index, epoch), not from the batch; the batch gets the partners' classes
    and λ, and the label source the blend of the two stored rows."""
    m = build_manifest(demo_root, "train")
    order = np.arange(40)
    policy = parse_mix_policy("mixup(0.8)+cutmix(1.0)")
    partners, rows = blend_rows(policy, 0, order, 1, 32, len(m))
    p2, r2 = blend_rows(policy, 0, order[::-1], 1, 32, len(m))
    np.testing.assert_array_equal(partners, p2[::-1])
    np.testing.assert_array_equal(rows, r2[::-1])
    targets = torch.from_numpy(m.labels.astype(np.int64))
    src = BankLabelSource([LabelBank(demo_bank)])
    stored = torch.from_numpy(LabelBank(demo_bank).read_logits()[:, :, 0].astype(np.float32))
    for b in load_blended_batches("torch", m, order, get_preset("demo"), "train", 16, 1, "cpu", 0, partners, rows):
        batch = make_batch(b, targets, "cpu", 1, False)
        k = b.index.numpy()
        np.testing.assert_array_equal(batch["label_mix"].numpy(), m.labels[partners[k]])
        np.testing.assert_array_equal(batch["lam"].numpy(), rows[k, 5])
        got = src(batch)["teacher_logits"]
        torch.testing.assert_close(got, blend_logits(stored[b.index], stored[batch["index_mix"]], batch["lam"]))


def test_blend_training_run_warns(demo_bank, demo_root, tmp_path, caplog):
    args = ["--method", "kd", "--student", "democnn_s", "--labels", str(demo_bank), "--data", str(demo_root),
            "--preset", "demo", "--epochs", "1", "--batch-size", "32", "--workers", "1", "--loader", "torch",
            "--mix-labels", "blend", "--mix-policy", "cutmix(1.0)", "max_steps_per_epoch=3"]
    with caplog.at_level(logging.WARNING):
        assert train_main(args + ["--output-dir", str(tmp_path / "run")]) == 0
    assert any("approximate" in r.getMessage() for r in caplog.records)
    assert train_main(args + ["--output-dir", str(tmp_path / "bad"), "--mix-policy", "randaug"]) == 2
    assert train_main(args + ["--output-dir", str(tmp_path / "bad2"), "--mix-labels", "exact"]) == 2
