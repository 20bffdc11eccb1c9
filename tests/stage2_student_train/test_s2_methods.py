"""One loop for every method (issue 4, point 4): every registered loss trains through the same CLI and loop for
1 epoch x 2 steps and everything it returns is logged; SL-Enc's parameters are optimized; a non-finite loss stops
the run with exit code 1 and keeps the last good checkpoint."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import kd_losses
from pipeline.bank.reader import LabelBank
from pipeline.data import build_manifest
from pipeline.data.presets import get_preset
from pipeline.models import create_model
from s2_helpers import read_metrics
from stage2_student_train.config import OptimConfig, TrainConfig
from stage2_student_train.label_sources import BankLabelSource
from stage2_student_train.loop import train_one_epoch
from stage2_student_train.step import TrainModule, TrainStep
from stage2_student_train.optim import build_optimizer, build_scheduler
from stage2_student_train.run import _batches, build_criterion

MULTI_TEACHER = {"sl_ens", "sl_kd"}


def _parts(method: str) -> set[str]:
    """The keys loss ``method`` returns (computed on random inputs, independently of the loop)."""
    crit = kd_losses.build_loss(method, num_classes=10)
    batch = {"label": torch.tensor([0, 3]), "teacher_logits": torch.randn(2, 2, 10), "index": torch.tensor([0, 1]),
             "epoch": 0}
    return set(crit(torch.randn(2, 10), batch))


# Embedding-level methods need a bank with stored embeddings: tests/stage2_student_train/test_s2_embedding.py.
LOGIT_METHODS = [m for m in kd_losses.available_losses() if not kd_losses.needs_features(m)]


@pytest.mark.parametrize("method", LOGIT_METHODS)
def test_every_method_trains_through_one_loop(train, tmp_path, demo_bank, ckpt_bank, method):
    needs = kd_losses.needs_teacher(method)
    labels = (demo_bank, ckpt_bank) if method in MULTI_TEACHER else (demo_bank,) if needs else ()
    out = tmp_path / method
    assert train(out, "max_steps_per_epoch=2", method=method, labels=labels) == 0
    rows = read_metrics(out)
    assert [r["epoch"] for r in rows] == [0]
    for part in _parts(method):  # everything the loss returns is logged
        assert np.isfinite(rows[0][f"train_{part}"]), part
    final = json.loads((out / "final.json").read_text())
    assert final["method"] == method
    if needs:
        assert final["bank"] == ",".join(str(b) for b in labels)
    else:
        assert final["bank"] is None  # ce / ls / tfkd_reg: no bank given, none needed


def test_teacher_method_without_bank_is_a_usage_error(train, tmp_path, capsys):
    assert train(tmp_path / "r", method="wsld") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "needs soft labels" in err[0] and "--labels" in err[0]


def test_sl_enc_parameters_are_optimized(demo_root, demo_bank):
    manifest = build_manifest(demo_root, "train")
    cfg = TrainConfig(method="sl_enc", batch_size=32, workers=1, data=str(demo_root), preset="demo",
                      optim=OptimConfig(name="adamw", lr=0.01))
    crit = build_criterion(cfg, 10)
    model = create_model("democnn_s", 10)
    opt = build_optimizer([model, crit], cfg.optim)
    assert isinstance(opt, torch.optim.AdamW)
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    crit_params = list(crit.parameters())
    assert crit_params and all(id(p) in in_opt for p in crit_params)
    assert all(id(p) in in_opt for p in model.parameters())
    before = [p.detach().clone() for p in crit_params]
    sched = build_scheduler(opt, 1, 1, cfg.sched, cfg.optim.lr)
    labels = torch.from_numpy(manifest.labels.astype(np.int64))
    order = np.arange(32)
    step = TrainStep(TrainModule(model, crit), opt, labels, scheduler=sched,
                     label_source=BankLabelSource([LabelBank(demo_bank)]))
    train_one_epoch(step, _batches(manifest, order, get_preset("demo"), "train", cfg, 0), 0)
    # (gradients are freed after each update: the parameters having moved is the evidence)
    assert all(not torch.equal(a, p.detach()) for a, p in zip(before, crit_params))


def test_sl_enc_state_is_checkpointed(train, tmp_path, demo_bank):
    out = tmp_path / "enc"
    assert train(out, "max_steps_per_epoch=2", method="sl_enc", labels=(demo_bank,)) == 0
    state = torch.load(out / "last.pt", map_location="cpu", weights_only=True)
    assert any(k.startswith("g.") for k in state["criterion"])
    n_model = len(list(create_model("democnn_s", 10).parameters()))
    n_crit = len(state["criterion"])  # all of g's tensors are parameters
    opt_params = sum(len(g["params"]) for g in state["optimizer"]["param_groups"])
    assert opt_params == n_model + n_crit


def test_amp_bf16_and_channels_last_on_cpu(train, tmp_path, demo_bank):
    out = tmp_path / "amp"
    assert train(out, "--amp", "bf16", "--channels-last", "max_steps_per_epoch=2", labels=(demo_bank,)) == 0
    row = read_metrics(out)[0]
    assert np.isfinite(row["train_loss"]) and np.isfinite(row["nll"])


def _error_lines(stderr: str) -> list[str]:
    """``error:`` lines of stderr (a progress bar left open may precede one after a carriage return)."""
    return [l for l in stderr.replace("\r", "\n").splitlines() if l.startswith("error:")]


# --- non-finite loss ------------------------------------------------------------------------------------------

def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(train, tmp_path, demo_bank, capsys):
    out = tmp_path / "run"
    assert train(out, "max_steps_per_epoch=2", labels=(demo_bank,), method="wsld") == 0
    # the second epoch overflows: an alpha of 1e39 makes WSLD's alpha * term inf in float32 (WSLD's alpha is an
    # unbounded weight; KD's is a mixing coefficient in [0, 1]). --resume refuses another loss
    # than the checkpoint's, so the checkpoint is made to say this run was configured with it
    state = torch.load(out / "last.pt", map_location="cpu", weights_only=True)
    state["config"]["loss"]["alpha"] = 1e39
    torch.save(state, out / "last.pt")
    good = (out / "last.pt").read_bytes()
    capsys.readouterr()
    assert train(out, "--resume", "max_steps_per_epoch=2", "loss.alpha=1e39", epochs=2, labels=(demo_bank,),
                 method="wsld") == 1
    err = _error_lines(capsys.readouterr().err)
    assert len(err) == 1 and "non-finite" in err[0] and "epoch 1" in err[0] and "last.pt of epoch 0 is kept" in err[0]
    assert (out / "last.pt").read_bytes() == good  # the last good checkpoint is kept untouched
    assert (out / "best.pt").is_file()
    assert [r["epoch"] for r in read_metrics(out)] == [0]
    assert json.loads((out / "final.json").read_text())["epochs"] == 1  # the finished 1-epoch run's summary


def test_non_finite_loss_in_the_first_epoch_says_there_is_no_checkpoint(train, tmp_path, demo_bank, capsys):
    out = tmp_path / "run"
    capsys.readouterr()
    assert train(out, "max_steps_per_epoch=2", "loss.alpha=1e39", labels=(demo_bank,), method="wsld") == 1
    err = _error_lines(capsys.readouterr().err)
    assert len(err) == 1 and "epoch 0" in err[0] and "no epoch had finished, so there is no checkpoint" in err[0]
    assert not (out / "last.pt").exists()


def test_huge_lr_diverges_with_exit_code_1(train, tmp_path, capsys):
    assert train(tmp_path / "lr", "optim.lr=1e30", "max_steps_per_epoch=4", method="ce") == 1
    err = _error_lines(capsys.readouterr().err)
    assert len(err) == 1 and "non-finite" in err[0]
    assert not (tmp_path / "lr" / "last.pt").exists() and not (tmp_path / "lr" / "final.json").exists()
