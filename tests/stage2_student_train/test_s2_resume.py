"""Checkpoints and --resume (issue 4, point 5): model, criterion (SL-Enc's network), optimizer, scheduler, epoch and
RNG state are restored, so 2 epochs + ``--resume --epochs 3`` and a run SIGKILLed in epoch 2 then resumed both
end bit-for-bit where an uninterrupted 3-epoch run ends; best.pt / last.pt are usable as teacher weights."""

from __future__ import annotations

import json
import logging
import shutil
import signal
import subprocess
import sys

import pytest
import torch
import yaml

from pipeline.bank.reader import LabelBank
from pipeline.models import file_sha256
from s2_helpers import (RESUME_ARGS, assert_same_state, demo_args, kill_once_started, model_state, read_metrics,
                        subprocess_env)

SAME_KEYS = ("epoch", "top1", "top5", "nll", "ece", "train_loss", "train_kd", "train_ce", "lr_first", "lr_last")


def _full_state(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def _assert_same_run(a, b) -> None:
    """Same final weights (model and loss network), optimizer state and per-epoch metrics."""
    sa, sb = _full_state(a / "last.pt"), _full_state(b / "last.pt")
    assert_same_state(sa["model"], sb["model"])
    assert_same_state(sa["criterion"], sb["criterion"])
    # the schedule's position: the lr every group holds for the next update
    assert [g["lr"] for g in sa["optimizer"]["param_groups"]] == [g["lr"] for g in sb["optimizer"]["param_groups"]]
    mom_a = [s["momentum_buffer"] for _, s in sorted(sa["optimizer"]["state"].items())]
    mom_b = [s["momentum_buffer"] for _, s in sorted(sb["optimizer"]["state"].items())]
    assert len(mom_a) == len(mom_b) and all(torch.equal(x, y) for x, y in zip(mom_a, mom_b))
    ra, rb = read_metrics(a), read_metrics(b)
    assert [{k: r[k] for k in SAME_KEYS} for r in ra] == [{k: r[k] for k in SAME_KEYS} for r in rb]


def test_same_seed_same_run(train, tmp_path, demo_bank, reference_run):
    """Seeds make a run reproducible: the same command again (same process, RNG already used) is bit-identical."""
    torch.rand(7)  # consume global RNG state: the run must not depend on it
    out = tmp_path / "again"
    assert train(out, *RESUME_ARGS, epochs=3, labels=(demo_bank,)) == 0
    _assert_same_run(reference_run, out)


def test_resume_continues_bit_for_bit(train, tmp_path, demo_bank, reference_run):
    out = tmp_path / "resumed"
    assert train(out, *RESUME_ARGS, epochs=2, labels=(demo_bank,)) == 0
    assert _full_state(out / "last.pt")["epoch"] == 1
    torch.rand(3)
    assert train(out, *RESUME_ARGS, "--resume", epochs=3, labels=(demo_bank,)) == 0
    assert [r["epoch"] for r in read_metrics(out)] == [0, 1, 2]
    _assert_same_run(reference_run, out)
    final = json.loads((out / "final.json").read_text())
    assert final["epochs"] == 3 and final["top1"] == read_metrics(out)[-1]["top1"]


def test_kill_and_resume(tmp_path, demo_root, demo_bank):
    """SIGKILL the CLI process once epoch 2 (index 1) has started; --resume completes the run with each epoch
    exactly once in metrics.jsonl and the same final weights as the uninterrupted run."""
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "pipeline.train_student",
           *demo_args(demo_root, out, *RESUME_ARGS, epochs=3, labels=(demo_bank,))]
    log = tmp_path / "stderr.txt"
    # same intra-op thread count as this process: float reductions (hence bits) depend on it
    env = subprocess_env(OMP_NUM_THREADS=str(torch.get_num_threads()))
    assert kill_once_started(cmd, env, tmp_path, log) == -signal.SIGKILL
    assert not (out / "final.json").exists()  # it really died before finishing
    killed_at = _full_state(out / "last.pt")["epoch"]
    assert killed_at in (0, 1)
    # Resume and reference both in fresh processes: in-process state left by other tests (thread pools, oneDNN
    # caches) can change float bits, so the bit-for-bit comparison is made between identical processes.
    resume = subprocess.run(cmd + ["--resume"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, cwd=tmp_path)
    assert resume.returncode == 0, resume.stderr[-2000:]
    assert [r["epoch"] for r in read_metrics(out)] == [0, 1, 2]  # no duplicate or missing epoch
    ref = tmp_path / "uninterrupted"
    ref_cmd = [sys.executable, "-m", "pipeline.train_student",
               *demo_args(demo_root, ref, *RESUME_ARGS, epochs=3, labels=(demo_bank,))]
    done = subprocess.run(ref_cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    _assert_same_run(ref, out)


def test_kill_between_evaluations_and_resume(tmp_path, demo_root, demo_bank):
    """--eval-every 3 with --precise-bn: killed in epoch 1 (epoch 0 trained, not evaluated), resumed, the run ends
    bit for bit as the uninterrupted one (precise-BN statistics included) and its one metrics row counts the
    training time of all 3 epochs, the killed run's epoch 0 among them (kept in last.pt)."""
    flags = (*RESUME_ARGS, "--eval-every", "3", "--precise-bn", "2")
    env = subprocess_env(OMP_NUM_THREADS=str(torch.get_num_threads()))
    runs = {}
    for name in ("killed", "uninterrupted"):
        runs[name] = [sys.executable, "-m", "pipeline.train_student",
                      *demo_args(demo_root, tmp_path / name, *flags, epochs=3, labels=(demo_bank,))]
    assert kill_once_started(runs["killed"], env, tmp_path, tmp_path / "stderr.txt") == -signal.SIGKILL
    state = _full_state(tmp_path / "killed" / "last.pt")
    assert state["epoch"] in (0, 1) and state["pending_train_s"] > 0
    assert not (tmp_path / "killed" / "metrics.jsonl").exists() or not read_metrics(tmp_path / "killed")
    for cmd in (runs["killed"] + ["--resume"], runs["uninterrupted"]):
        done = subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                              cwd=tmp_path)
        assert done.returncode == 0, done.stderr[-2000:]
    rows = read_metrics(tmp_path / "killed")
    assert [r["epoch"] for r in rows] == [2] and rows[0]["train_time_s"] > state["pending_train_s"]
    _assert_same_run(tmp_path / "uninterrupted", tmp_path / "killed")
    a = _full_state(tmp_path / "killed" / "last.pt")["model"]
    b = _full_state(tmp_path / "uninterrupted" / "last.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_stop_between_training_and_evaluation_evaluates_that_epoch_on_resume(tmp_path, demo_root, demo_bank,
                                                                           monkeypatch, caplog):
    """A run stopped after an epoch's last.pt but before its evaluation (a kill in that window: here the evaluation
    raises) evaluates that epoch first when resumed: no metrics row and no best.pt candidate is lost, and the run
    ends as the uninterrupted one, rows included."""
    import stage2_student_train.run as run_mod
    from pipeline.train_student import main

    flags = (*RESUME_ARGS, "--precise-bn", "2")
    assert main(demo_args(demo_root, tmp_path / "ref", *flags, epochs=3, labels=(demo_bank,))) == 0
    real, calls = run_mod._evaluate, []

    def stop_at_second(run):
        calls.append(1)
        if len(calls) == 2:  # epoch 1 trained and saved, not evaluated
            raise KeyboardInterrupt
        return real(run)

    monkeypatch.setattr(run_mod, "_evaluate", stop_at_second)
    assert main(demo_args(demo_root, tmp_path / "cut", *flags, epochs=3, labels=(demo_bank,))) == 130  # Ctrl-C
    monkeypatch.setattr(run_mod, "_evaluate", real)
    state = _full_state(tmp_path / "cut" / "last.pt")
    assert state["epoch"] == 1 and state["pending_stats"]["train_loss"] > 0
    assert [r["epoch"] for r in read_metrics(tmp_path / "cut")] == [0]
    with caplog.at_level(logging.INFO, logger="stage2_student_train.run"):
        assert main(demo_args(demo_root, tmp_path / "cut", *flags, "--resume", epochs=3, labels=(demo_bank,))) == 0
    assert "epoch 1 was trained but not evaluated before the run stopped: evaluating it now" in caplog.text
    _assert_same_run(tmp_path / "ref", tmp_path / "cut")
    assert _full_state(tmp_path / "cut" / "best.pt")["top1"] == _full_state(tmp_path / "ref" / "best.pt")["top1"]


def test_best_and_last_checkpoints(reference_run):
    rows = read_metrics(reference_run)
    best = _full_state(reference_run / "best.pt")
    last = _full_state(reference_run / "last.pt")
    assert last["epoch"] == 2 and last["arch"] == "democnn_s" and last["num_classes"] == 10
    assert set(last) >= {"model", "criterion", "optimizer", "scheduler", "scaler", "epoch", "rng", "config"}
    assert best["top1"] == max(r["top1"] for r in rows)
    assert rows[best["epoch"]]["top1"] == best["top1"]
    assert best["config"]["method"] == "sl_enc"


def test_checkpoints_are_teacher_weights(tmp_path, demo_root, reference_run):
    """A stage-2 checkpoint is a valid stage-1 teacher (Tf-KD self-teachers, Re-KD, De-KD)."""
    from pipeline.dump_logits import main

    best = reference_run / "best.pt"
    out = tmp_path / "self.zarr"
    rc = main(["--teacher", "democnn_s", "--weights", str(best), "--data", str(demo_root), "--split", "train",
               "--preset", "demo", "--batch-size", "64", "--out", str(out)])
    assert rc == 0
    bank = LabelBank(out)
    assert bank.complete and bank.shape == (300, 1, 1, 10)
    assert bank.teachers[0]["sha256"] == file_sha256(best)
    # the bank holds this checkpoint's logits, not a random init's: compare with the model itself
    from pipeline.data.dali import build_pipeline, iterate
    from pipeline.data import build_manifest
    from pipeline.data.presets import get_preset
    from pipeline.models import create_model

    m = create_model("democnn_s", 10, str(best)).eval()
    assert_same_state(m.state_dict(), model_state(best))
    manifest = build_manifest(demo_root, "train")
    import numpy as np

    order = np.arange(16)
    b = next(iterate(build_pipeline(manifest, order, get_preset("demo"), "eval", 16, 1), 16, 16))
    with torch.no_grad():
        want = m(b.images).half().float()
    got = torch.from_numpy(bank.read_logits(0, 16)[:, 0, 0].astype("float32"))
    torch.testing.assert_close(got, want, rtol=2e-3, atol=2e-3)


def test_resume_without_checkpoint_is_refused(train, tmp_path, capsys):
    out = tmp_path / "junk"
    out.mkdir()
    (out / "notes.txt").write_text("x")
    assert train(out, "--resume", method="ce") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "last.pt" in err[0]


def test_resume_refuses_another_run(train, tmp_path, demo_bank, capsys, caplog):
    """--resume continues the run of its checkpoint: a changed method, loss hyperparameter, student or batch size
    is refused with one line naming the key (exit 2) and the checkpoint is left as it was; epochs may grow."""
    out = tmp_path / "run"
    assert train(out, "--method", "kd", "loss.T=4", labels=(demo_bank,)) == 0
    before = (out / "last.pt").read_bytes()
    capsys.readouterr()
    changes = {"method": ("--method", "wsld"), "loss": ("--method", "kd", "loss.T=2"),
               "student": ("--method", "kd", "loss.T=4", "--student", "democnn"),
               "batch_size": ("--method", "kd", "loss.T=4", "--batch-size", "16")}
    for key, extra in changes.items():
        assert train(out, *extra, "--resume", labels=(demo_bank,)) == 2, key
        err = capsys.readouterr().err.strip()
        assert "trained with another configuration" in err and f"{key} " in err and len(err.splitlines()) == 1, err
        assert (out / "last.pt").read_bytes() == before
    assert train(out, "--method", "kd", "loss.T=4", "--resume", "--overwrite", labels=(demo_bank,)) == 2
    assert "--resume continues the run in --output-dir and --overwrite replaces it" in capsys.readouterr().err
    assert (out / "last.pt").read_bytes() == before
    with caplog.at_level(logging.WARNING):
        assert train(out, "--method", "kd", "loss.T=4", "--resume", epochs=2, labels=(demo_bank,)) == 0
    assert [r["epoch"] for r in read_metrics(out)] == [0, 1]
    assert "from the first resumed step this run uses: epochs 1 -> 2" in caplog.text


def test_resume_from_a_checkpoint_that_does_not_fit(train, tmp_path, demo_bank, capsys):
    """``--resume PATH`` of another architecture's run, or of a best.pt (weights only), is one line, exit 2."""
    other = tmp_path / "other"
    assert train(other, "--student", "democnn", labels=(demo_bank,)) == 0
    capsys.readouterr()
    out = tmp_path / "new"
    for path, words in ((other / "best.pt", "not a training checkpoint"),
                        (other / "last.pt", "trained with another configuration")):
        assert train(out, "--resume", str(path), labels=(demo_bank,)) == 2
        err = capsys.readouterr().err.strip()
        assert words in err and len(err.splitlines()) == 1, err


def test_resume_applies_new_optimizer_settings_and_schedule(train, tmp_path, demo_bank, caplog):
    """Issue 21, point 3 (kind 1): a resumed run trains with the optimizer settings and schedule its config.yaml
    records, from its first step, and says which changed; the first step's lr is the schedule's (not the
    checkpoint's stored lr)."""
    out = tmp_path / "run"
    common = ("--method", "kd", "max_steps_per_epoch=2", "sched.name=step", "sched.step_size=1", "sched.gamma=0.5")
    assert train(out, *common, "--lr", "0.1", "--momentum", "0.9", labels=(demo_bank,), epochs=2) == 0
    with caplog.at_level(logging.WARNING):
        assert train(out, *common, "--lr", "0.02", "--momentum", "0.5", "--wd", "0.001", "--resume",
                     labels=(demo_bank,), epochs=3) == 0
    assert "optim.lr 0.1 -> 0.02" in caplog.text and "optim.momentum 0.9 -> 0.5" in caplog.text
    assert "optim.weight_decay 0.0001 -> 0.001" in caplog.text
    rows = read_metrics(out)
    assert [r["lr_first"] for r in rows] == pytest.approx([0.1, 0.05, 0.02 * 0.25])  # epoch 2: the new lr's schedule
    state = torch.load(out / "last.pt", map_location="cpu", weights_only=True)
    g = state["optimizer"]["param_groups"][0]
    assert g["momentum"] == 0.5 and g["weight_decay"] == 0.001
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["optim"]["lr"] == 0.02 and saved["optim"]["momentum"] == 0.5
    # a changed schedule: constant from the resumed step (a stored lr of 1e11 would not matter either)
    state["optimizer"]["param_groups"][0]["lr"] = 1e11
    torch.save(state, out / "last.pt")
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert train(out, "--method", "kd", "max_steps_per_epoch=2", "sched.name=constant", "--lr", "0.02",
                     "--momentum", "0.5", "--wd", "0.001", "--resume", labels=(demo_bank,), epochs=4) == 0
    assert "sched.name 'step' -> 'constant'" in caplog.text
    assert read_metrics(out)[-1]["lr_first"] == pytest.approx(0.02)
    assert read_metrics(out)[-1]["lr_last"] == pytest.approx(0.02)


def test_resume_refuses_optimizer_changes_it_cannot_apply(train, tmp_path, demo_bank, capsys):
    """Issue 21, point 3 (kind 2): another optimizer, or other parameter groups (no_wd_bn_bias), cannot continue
    the stored optimizer state: one line naming the key, exit 2, checkpoint untouched."""
    out = tmp_path / "run"
    assert train(out, "--method", "kd", "max_steps_per_epoch=1", labels=(demo_bank,)) == 0
    before = (out / "last.pt").read_bytes()
    capsys.readouterr()
    for key, extra in (("optim.name", ("--opt", "adamw")), ("optim.no_wd_bn_bias", ("optim.no_wd_bn_bias=true",))):
        assert train(out, "--method", "kd", "max_steps_per_epoch=1", *extra, "--resume", labels=(demo_bank,),
                     epochs=2) == 2
        err = capsys.readouterr().err.strip()
        assert f"{key} " in err and len(err.splitlines()) == 1, err
        assert (out / "last.pt").read_bytes() == before


def test_resume_from_a_moved_copy_of_the_data(train, tmp_path, demo_root, demo_bank, capsys, caplog):
    """Issue 21, point 3: data is identified by its fingerprint: a copy at another path resumes (the move is
    logged), other data at the old path's place is refused in one line."""
    out = tmp_path / "run"
    assert train(out, "--method", "kd", "max_steps_per_epoch=1", labels=(demo_bank,)) == 0
    copy = tmp_path / "scratch" / "data"
    shutil.copytree(demo_root, copy)
    with caplog.at_level(logging.INFO):
        assert train(out, "--method", "kd", "max_steps_per_epoch=1", "--resume", labels=(demo_bank,), epochs=2,
                     data=copy) == 0
    assert "data moved" in caplog.text and "same data fingerprint" in caplog.text
    assert [r["epoch"] for r in read_metrics(out)] == [0, 1]
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["data"] == str(copy)
    # other content: one training image gone (a bank would no longer match either: a run without one)
    out2 = tmp_path / "ce"
    assert train(out2, "--method", "ce", "max_steps_per_epoch=1", data=copy) == 0
    victim = sorted((copy / "train").rglob("*.jpg"))[0]
    victim.unlink()
    capsys.readouterr()
    assert train(out2, "--method", "ce", "max_steps_per_epoch=1", "--resume", epochs=2, data=copy) == 2
    err = capsys.readouterr().err.strip()
    assert "data fingerprint differs" in err and len(err.splitlines()) == 1, err
