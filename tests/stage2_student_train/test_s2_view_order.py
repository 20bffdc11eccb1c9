"""Views per epoch (issue 25, point 4): ``view_order`` ``cycle`` gives every sample a fresh stored view each epoch
(all V in V consecutive epochs, from a per-sample offset), ``hash`` keeps the order from before the key; a run
with fewer views than epochs warns once, naming ``--append-views``."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.bank.reader import LabelBank
from pipeline.dump_logits import main as dump_main
from pipeline.errors import UsageError
from stage2_student_train.label_sources import BankLabelSource, _view_hash, view_choice


@pytest.fixture(scope="module")
def bank3(demo_root: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("vo") / "v3.zarr"
    assert dump_main(["--teacher", "democnn_s", "--weights", "none", "--data", str(demo_root), "--preset",
                      "demo_rrc", "--batch-size", "32", "--rows-per-chunk", "64", "--views", "3", "--view-policy",
                      "rrc+flip", "--out", str(out)]) == 0
    return out


def test_cycle_gives_a_fresh_view_every_epoch():
    idx = torch.arange(1000)
    v = 5
    per_epoch = torch.stack([view_choice(idx, e, 7, v) for e in range(2 * v)], 1)  # [N, E]
    for row in per_epoch[:, :v]:
        assert sorted(row.tolist()) == list(range(v))  # all V views in the first V epochs
    assert torch.equal(per_epoch[:, v:], per_epoch[:, :v])  # then the same cycle again
    assert torch.equal(per_epoch[:, 1], (per_epoch[:, 0] + 1) % v)  # the documented order: (e + offset(i)) mod V
    assert set(per_epoch[:, 0].tolist()) == set(range(v))  # offsets differ between samples: a batch mixes views
    assert not torch.equal(view_choice(idx, 0, 7, v), view_choice(idx, 0, 8, v))  # seeded


def test_hash_is_the_order_before_the_key():
    idx = torch.arange(3000)
    for epoch, seed, k in ((0, 0, 8), (3, 11, 7)):
        assert torch.equal(view_choice(idx, epoch, seed, k, "hash"), _view_hash(idx, epoch, seed, k))
    with pytest.raises(UsageError):
        view_choice(idx, 0, 0, 4, "random")


def test_bank_source_boxes_and_rows_follow_view_order(bank3: Path):
    bank = LabelBank(bank3)
    views, logits = bank.views(), bank.read_logits()
    order = np.random.default_rng(0).permutation(bank.num_samples)[:50]
    index = torch.from_numpy(order)
    for view_order in ("cycle", "hash"):
        src = BankLabelSource([bank], replay_seed=3, view_order=view_order)
        for epoch in (0, 1, 4):
            v = view_choice(index, epoch, 3, 3, view_order).numpy()
            np.testing.assert_array_equal(src.boxes(order, epoch)[:, 0], views[order, v])
            got = src({"index": index, "epoch": epoch})["teacher_logits"][:, 0]
            np.testing.assert_array_equal(got.numpy(), logits[order, 0, v].astype(np.float32))


def test_fewer_views_than_epochs_warns_once(train, bank3: Path, tmp_path: Path, caplog):
    with caplog.at_level(logging.WARNING):
        rc = train(tmp_path / "run", "--replay-views", "--view-order", "cycle", "max_steps_per_epoch=1",
                   "eval_every=4", epochs=4, labels=(bank3,))
    assert rc == 0
    warned = [r.getMessage() for r in caplog.records if "stored views for" in r.getMessage()]
    assert len(warned) == 1 and "3 stored views for 4 epochs" in warned[0] and "--append-views" in warned[0]


def test_view_order_is_run_defining_and_older_checkpoints_resume_with_their_order():
    from pipeline.config import to_dict
    from stage2_student_train.checkpoint import check_resumable
    from stage2_student_train.config import TrainConfig

    cfg = to_dict(TrainConfig(method="kd", student="democnn_s", data="d"))
    older = {k: v for k, v in cfg.items() if k != "view_order"}  # written before the key existed
    check_resumable(older, cfg, "last.pt")  # a missing key means its default ...
    replayed = {**older, "replay_views": True}  # ... but a run that replayed views used the hash order then
    with pytest.raises(UsageError, match="view_order 'hash' -> 'cycle'"):
        check_resumable(replayed, {**cfg, "replay_views": True}, "last.pt")
    check_resumable(replayed, {**cfg, "replay_views": True, "view_order": "hash"}, "last.pt")
    with pytest.raises(UsageError, match="view_order 'hash' -> 'cycle'"):
        check_resumable({**cfg, "view_order": "hash"}, cfg, "last.pt")
