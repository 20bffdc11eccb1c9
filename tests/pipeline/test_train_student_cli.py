"""``python -m pipeline.train_student`` (issue 4, points 1 and 7, Bad input): --labels, --teacher finding the cached
bank by key, several --labels on the T axis, --config plus dotted overrides, methods without a bank; an existing
run directory and unknown method / student / config key are one-line refusals with exit code 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from pipeline.train_student import main

REPO = Path(__file__).resolve().parents[2]


def _args(data: Path, out: Path, *extra: str, student: str = "democnn_s") -> list[str]:
    return ["--student", student, "--data", str(data), "--preset", "demo", "--batch-size", "32", "--epochs", "1",
            "--workers", "1", "--output-dir", str(out), "max_steps_per_epoch=2", *extra]


def _final(out: Path) -> dict:
    return json.loads((out / "final.json").read_text())


def _rows(out: Path) -> list[dict]:
    return [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines() if l.strip()]


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.replace("\r", "\n").strip().splitlines()
    err = [l for l in err if l.strip()]
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_labels_path(tmp_path, demo_root, demo_bank):
    out = tmp_path / "r"
    assert main(["--method", "kd", "--labels", str(demo_bank), *_args(demo_root, out)]) == 0
    f = _final(out)
    assert f["bank"] == str(demo_bank) and f["teacher"] == "democnn_s" and f["method"] == "kd"


@pytest.mark.parametrize("weights", ["checkpoint", "none"])
def test_teacher_finds_cached_bank(tmp_path, demo_root, monkeypatch, capsys, weights):
    """Dump into $KD_CACHE with the stage-1 CLI, then train with only --teacher (+ --teacher-weights)."""
    from pipeline.dump_logits import main as dump
    from pipeline.models import create_model

    monkeypatch.setenv("KD_CACHE", str(tmp_path / "cache"))
    if weights == "checkpoint":
        torch.manual_seed(3)
        w = str(tmp_path / "t.pt")
        torch.save(create_model("democnn_s", 10).state_dict(), w)
    else:
        w = "none"
    capsys.readouterr()
    assert dump(["--teacher", "democnn_s", "--weights", w, "--data", str(demo_root), "--split", "train",
                 "--preset", "demo", "--batch-size", "64"]) == 0
    bank = capsys.readouterr().out.strip().splitlines()[-1]
    assert Path(bank).is_dir() and Path(bank).is_relative_to(tmp_path / "cache")
    out = tmp_path / "r"
    assert main(["--method", "wsld", "--teacher", "democnn_s", "--teacher-weights", w, *_args(demo_root, out)]) == 0
    assert _final(out)["bank"] == bank
    # another teacher has no bank: a one-line refusal that says how to make one
    capsys.readouterr()
    assert main(["--method", "wsld", "--teacher", "democnn", "--teacher-weights", w,
                 *_args(demo_root, tmp_path / "r2")]) == 2
    msg = _one_error_line(capsys)
    assert f"no bank of democnn (weights {w}) for" in msg and "python -m pipeline.dump_logits --teacher democnn" in msg
    # a misspelt teacher is an unknown model, not a bank to dump
    assert main(["--method", "wsld", "--teacher", "democnn_x", *_args(demo_root, tmp_path / "r4")]) == 2
    typo = _one_error_line(capsys)
    assert "unknown model 'democnn_x'" in typo and "dump_logits" not in typo
    if weights == "none":  # the printed command makes exactly the bank the lookup wanted
        cmd = msg.split("make it with python -m pipeline.dump_logits ", 1)[1].split(" (or give", 1)[0].split()
        assert dump(cmd) == 0
        assert main(["--method", "wsld", "--teacher", "democnn", "--teacher-weights", w,
                     *_args(demo_root, tmp_path / "r3")]) == 0


def test_several_labels_are_the_teacher_axis(tmp_path, demo_root, demo_bank):
    from pipeline.dump_logits import main as dump

    second = tmp_path / "second.zarr"
    assert dump(["--teacher", "democnn_s", "--weights", "none", "--seed", "5", "--data", str(demo_root),
                 "--split", "train", "--preset", "demo", "--batch-size", "64", "--out", str(second)]) == 0
    out = tmp_path / "r"
    assert main(["--method", "sl_kd", "--labels", str(demo_bank), "--labels", str(second),
                 *_args(demo_root, out)]) == 0
    f = _final(out)
    assert f["bank"] == f"{demo_bank},{second}" and f["teacher"] == "democnn_s+democnn_s"
    assert yaml.safe_load((out / "config.yaml").read_text())["banks"] == [str(demo_bank), str(second)]


def test_config_yaml_and_dotted_overrides(tmp_path, demo_root, demo_bank):
    """Defaults < YAML < CLI flags < key=value overrides; overrides may sit between flags."""
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({
        "method": "kd", "loss": {"T": 2.0, "alpha": 0.5}, "student": "democnn_s", "preset": "demo", "epochs": 5,
        "batch_size": 64, "optim": {"name": "sgd", "lr": 0.2, "momentum": 0.8},
        "sched": {"name": "cosine", "step_size": 1, "gamma": 0.5}}))
    out = tmp_path / "r"
    rc = main(["--config", str(recipe), "loss.T=3", "--labels", str(demo_bank), "--data", str(demo_root),
               "--epochs", "2", "--batch-size", "32", "--lr", "0.3", "optim.lr=0.05", "--output-dir", str(out),
               "sched.name=step", "max_steps_per_epoch=2", "loss.alpha=1e-1", "--workers", "1"])
    assert rc == 0
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["loss"]["T"] == 3 and float(saved["loss"]["alpha"]) == 0.1
    assert saved["epochs"] == 2 and saved["batch_size"] == 32  # CLI flags over YAML
    assert saved["optim"] == {**saved["optim"], "lr": 0.05, "momentum": 0.8}  # override over --lr over YAML
    assert saved["sched"]["name"] == "step"
    assert [r["lr_first"] for r in _rows(out)] == pytest.approx([0.05, 0.05 * 0.5])  # step: x0.5 per epoch
    # the hparams the loss is built with: numbers, whatever YAML made of "1e-1"
    from pipeline.config import resolve
    from stage2_student_train import TrainConfig
    from stage2_student_train.run import build_criterion

    crit = build_criterion(resolve(TrainConfig, out / "config.yaml"), 10)
    assert crit.hparams == {"T": 3, "alpha": 0.1} and isinstance(crit.hparams["alpha"], float)


@pytest.mark.parametrize("method", ["ce", "ls", "tfkd_reg"])
def test_methods_without_teacher_need_no_bank(tmp_path, demo_root, method):
    out = tmp_path / method
    assert main(["--method", method, *_args(demo_root, out)]) == 0
    f = _final(out)
    assert f["bank"] is None and f["teacher"] is None and f["method"] == method


def test_existing_run_dir_needs_resume_or_overwrite(tmp_path, demo_root, capsys):
    out = tmp_path / "r"
    assert main(["--method", "ce", *_args(demo_root, out)]) == 0
    first = _final(out)
    capsys.readouterr()
    assert main(["--method", "ce", *_args(demo_root, out)]) == 2
    msg = _one_error_line(capsys)
    assert str(out) in msg and "--resume" in msg and "--overwrite" in msg
    assert _final(out) == first  # untouched
    (out / "stale.txt").write_text("old")
    assert main(["--method", "ls", "--overwrite", *_args(demo_root, out)]) == 0
    assert not (out / "stale.txt").exists() and _final(out)["method"] == "ls"
    assert [r["epoch"] for r in _rows(out)] == [0]


@pytest.mark.parametrize(("extra", "student", "words"), [
    (["--method", "kdd"], "democnn_s", ["unknown loss 'kdd'", "valid:", "kd", "wsld", "sl_enc"]),
    (["--method", "ce"], "resnet1", ["unknown model 'resnet1'", "valid:", "resnet18", "democnn_s"]),
    (["--method", "ce", "optim.lrr=0.1"], "democnn_s", ["unknown config key 'optim.lrr'", "optim.lr"]),
    (["--method", "ce", "epoch=3"], "democnn_s", ["unknown config key 'epoch'", "epochs"]),
    (["--method", "kd", "loss.temperature=4"], "democnn_s", ["temperature", "valid:", "T"]),
    (["--method", "ce", "sched.name=poly"], "democnn_s", ["unknown schedule 'poly'", "cosine"]),
    (["--method", "ce", "optim.name=lamb"], "democnn_s", ["unknown optimizer 'lamb'", "adamw"]),
])
def test_unknown_names_are_one_line_exit_2(tmp_path, demo_root, capsys, extra, student, words):
    capsys.readouterr()
    assert main([*extra, *_args(demo_root, tmp_path / "r", student=student)]) == 2
    msg = _one_error_line(capsys)
    for w in words:
        assert w in msg, msg
    assert not (tmp_path / "r" / "metrics.jsonl").exists()


@pytest.mark.parametrize(("extra", "words"), [
    (["--lr", "-1"], "optim.lr=-1.0 must be > 0"),
    (["--wd", "-0.1"], "optim.weight_decay=-0.1 must be >= 0"),
    (["optim.momentum=1.5"], "optim.momentum=1.5 must be in [0, 1)"),
    (["optim.name=adamw", "optim.betas=[0.9, 1.2]"], "optim.betas=[0.9, 1.2] must be two in [0, 1)"),
    (["sched.warmup_epochs=-1"], "sched.warmup_epochs=-1.0 must be >= 0"),
    (["sched.min_lr_factor=2"], "sched.min_lr_factor=2.0 must be in [0, 1]"),
    (["sched.gamma=0"], "sched.gamma=0.0 must be > 0"),
    (["sched.step_size=0"], "sched.step_size=0 must be >= 1"),
    (["eval_every=0"], "eval_every=0 must be >= 1"),
    (["--epochs", "0"], "epochs=0 must be >= 1"),
    (["-b", "-4"], "batch_size=-4 must be >= 1"),
    (["-j", "-2"], "workers=-2 must be >= 0"),
    (["loss.T=0"], "'kd': T=0 is outside (0, inf)"),
    (["loss.alpha=-0.5"], "'kd': alpha=-0.5 is outside [0, 1]"),
    (["--replay-views", "--no-augment"], "--replay-views trains on the bank's stored augmented views"),
])
def test_values_a_run_cannot_use_are_one_line_exit_2(tmp_path, demo_root, demo_bank, capsys, extra, words):
    """Out-of-range numbers (torch's own ValueError would be a traceback at build time, a negative weight decay or
    a zero temperature would train silently wrong) and conflicting flags are refused before any output."""
    capsys.readouterr()
    assert main(["--method", "kd", "--labels", str(demo_bank), *_args(demo_root, tmp_path / "r"), *extra]) == 2
    msg = _one_error_line(capsys)
    assert words in msg, msg
    assert not (tmp_path / "r").exists()


def test_teacher_beside_labels_must_name_the_banks_teacher(tmp_path, demo_root, demo_bank, capsys, caplog):
    """--teacher beside --labels is checked against the bank's teachers, not dropped: another teacher (or
    --teacher-weights without --teacher) is one line, exit 2, before any output; the bank's own teacher passes."""
    for extra, words in ((["--teacher", "resnet8"], "--teacher resnet8 is not what the bank(s) of --labels hold "
                          "(democnn_s (none))"),
                         (["--teacher", "democnn_s", "--teacher-weights", "DEFAULT"], "is not what the bank(s)"),
                         (["--teacher-weights", "none"], "no --teacher is given")):
        assert main(["--method", "kd", "--labels", str(demo_bank), *extra, *_args(demo_root, tmp_path / "r")]) == 2
        assert words in _one_error_line(capsys)
        assert not (tmp_path / "r").exists()
    assert main(["--method", "kd", "--labels", str(demo_bank), "--teacher", "democnn_s", "--teacher-weights", "none",
                 *_args(demo_root, tmp_path / "r")]) == 0
    cfg = yaml.safe_load((tmp_path / "r" / "config.yaml").read_text())
    assert cfg["teacher"] == ["democnn_s"] and cfg["banks"] == [str(demo_bank)]
    # a method without a teacher says it does not read the bank, and the run records none
    with caplog.at_level("WARNING"):
        assert main(["--method", "ce", "--labels", str(demo_bank), *_args(demo_root, tmp_path / "ce")]) == 0
    assert "method 'ce' uses no teacher: the bank given (--labels/--teacher) is not read" in caplog.text
    assert yaml.safe_load((tmp_path / "ce" / "config.yaml").read_text())["banks"] == []


def test_real_process_exit_code(tmp_path, demo_root):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "pipeline.train_student", "--method", "nope",
                           *_args(demo_root, tmp_path / "r")], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2
    lines = [l for l in proc.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: unknown loss 'nope'; valid: ce,")


# --- torchvision references' habits (issue 14) ---------------------------------------------------------------
def test_torchvision_flag_aliases(tmp_path, demo_root):
    """--model, --data-path, -j, -b, --opt, --wd, --momentum, --lr-scheduler, --lr-step-size, --lr-gamma,
    --lr-warmup-epochs and --label-smoothing land on the same config keys as ours."""
    import yaml

    out = tmp_path / "tv"
    assert main(["--model", "democnn_s", "--data-path", str(demo_root), "-j", "1", "-b", "16", "--opt", "adamw",
                 "--wd", "0.01", "--momentum", "0.8", "--lr-scheduler", "steplr", "--lr-step-size", "7",
                 "--lr-gamma", "0.5", "--lr-warmup-epochs", "0.5", "--label-smoothing", "0.2", "--epochs", "1",
                 "--output-dir", str(out), "max_steps_per_epoch=1"]) == 0
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert (cfg["student"], cfg["data"], cfg["workers"], cfg["batch_size"]) == ("democnn_s", str(demo_root), 1, 16)
    assert cfg["optim"]["name"] == "adamw" and cfg["optim"]["weight_decay"] == 0.01 and cfg["optim"]["momentum"] == 0.8
    assert (cfg["sched"]["name"], cfg["sched"]["step_size"], cfg["sched"]["gamma"], cfg["sched"]["warmup_epochs"]) \
        == ("step", 7, 0.5, 0.5)
    assert cfg["method"] == "ls" and cfg["loss"]["eps"] == 0.2
    assert main(["--method", "kd", "--label-smoothing", "0.1", "--data", str(demo_root)]) == 2


def test_resume_from_a_file_and_test_only(tmp_path, demo_root, demo_bank, capsys, caplog):
    first = tmp_path / "first"
    assert main(["--method", "kd", "--labels", str(demo_bank), *_args(demo_root, first)]) == 0
    # --resume PATH: continue that checkpoint's run for one more epoch in its folder
    capsys.readouterr()
    assert main(["--method", "kd", "--labels", str(demo_bank), "--student", "democnn_s", "--data", str(demo_root),
                 "--preset", "demo", "--batch-size", "32", "--epochs", "2", "--workers", "1",
                 "--resume", str(first / "last.pt"), "max_steps_per_epoch=2"]) == 0
    rows = [json.loads(x) for x in (first / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [0, 1]
    # --test-only: evaluate that checkpoint, print and write its metrics, train nothing
    capsys.readouterr()
    assert main(["--test-only", "--resume", str(first / "best.pt"), "--student", "democnn_s", "--data",
                 str(demo_root), "--batch-size", "50", "--workers", "1", "--output-dir", str(tmp_path / "t")]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    written = json.loads((tmp_path / "t" / "test.json").read_text())
    assert printed == written and written["n"] == 100 and written["preset"] == "demo"
    best = max(r["top1"] for r in rows)
    assert written["top1"] == pytest.approx(best, abs=1e-6)
    assert not (tmp_path / "t" / "last.pt").exists()
    # training flags beside --test-only are named, not silently ignored; the evaluation is the same
    with caplog.at_level("WARNING"):
        assert main(["--test-only", "--resume", str(first / "best.pt"), "--student", "democnn_s", "--data",
                     str(demo_root), "--batch-size", "50", "--workers", "1", "--output-dir", str(tmp_path / "t2"),
                     "--epochs", "5", "--method", "wsld", "--lr", "0.3", "loss.T=2"]) == 0
    assert "these training settings change nothing: epochs, loss.T, method, optim.lr" in caplog.text
    assert json.loads((tmp_path / "t2" / "test.json").read_text())["top1"] == written["top1"]


@pytest.mark.parametrize("entry", ["pipeline.train_student", "pipeline.dump_logits"])
def test_every_option_has_help_with_its_default(entry):
    import argparse
    import importlib

    from pipeline.data.presets import PRESETS

    parser = importlib.import_module(entry).build_parser()
    text = parser.format_help()
    for name in PRESETS:
        assert name in text  # preset choices come from the registry
    missing = []
    for a in parser._actions:
        if not a.option_strings or isinstance(a, argparse._HelpAction):
            continue
        takes_value = a.nargs != 0
        if not a.help or (takes_value and "default" not in a.help and a.dest not in ("config", "resume")):
            missing.append(a.option_strings[0])
    assert not missing, missing
