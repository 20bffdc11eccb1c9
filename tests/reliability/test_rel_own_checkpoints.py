"""A user's own checkpoints and runs (issue 23): no silent wrong preprocessing, errors that name the cause, banks
that explain themselves. One test per numbered point of the issue, each over the whole kind of its example, on
real data (the embedded Fashion-MNIST subset, generated trees), real checkpoints trained or saved here, real
timm configs; RELIABILITY.md, section 12, lists them."""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.bank.reader import LabelBank
from pipeline.data import build_manifest
from pipeline.data.presets import PRESETS, Preprocess, teacher_preprocess, weights_preprocess
from pipeline.dump_logits import main as dump
from pipeline.labels import main as labels
from pipeline.models import create_model
from pipeline.train_student import main as train
from rel_helpers import REPO, assert_one_line_error, dump_args, env, train_args
from tests.conftest import make_image_tree


def _warnings(caplog, word: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING and word in r.getMessage()]


@pytest.fixture(scope="module")
def self_teacher(demo_root: Path, tmp_path_factory) -> Path:
    """A democnn_s trained here with plain cross-entropy (2 epochs, --preset demo): its run directory."""
    out = tmp_path_factory.mktemp("self_teacher") / "teacher-ce"
    assert train(["--method", "ce", "--student", "democnn_s", "--data", str(demo_root), "--preset", "demo",
                  "--batch-size", "32", "--epochs", "2", "--workers", "1", "--output-dir", str(out)]) == 0
    return out


# --- 1. a checkpoint of this project carries its preprocessing -------------------------------------------------
def test_1_self_teacher_bank_has_the_teachers_own_accuracy(self_teacher: Path, demo_root: Path, tmp_path: Path):
    """The Tf-KD self-teacher flow without --preset: the bank of the teacher's checkpoint on val has the accuracy
    stage 2's --test-only measures for that checkpoint (same preprocessing, recorded with its source). Before:
    ImageNet's 256/224 for a model trained at 32 px."""
    best = self_teacher / "best.pt"
    assert train(["--test-only", "--resume", str(best), "--student", "democnn_s", "--data", str(demo_root),
                  "--workers", "1", "--output-dir", str(tmp_path / "t")]) == 0
    test = json.loads((tmp_path / "t" / "test.json").read_text())
    bank = tmp_path / "self.zarr"
    assert dump(["--teacher", "democnn_s", "--weights", str(best), "--data", str(demo_root), "--split", "val",
                 "--workers", "1", "--out", str(bank)]) == 0
    a = LabelBank(bank).attrs
    assert a["preprocessing"]["name"] == "demo" and test["preset"] == "demo"
    assert a["preprocessing_source"] == [f"checkpoint {best} (trained with preprocessing 'demo')"]
    top1 = a["metrics"]["0:democnn_s"]["top1"]
    assert abs(top1 - test["top1"]) <= 2 * 100 / test["n"] + 1e-6, (top1, test["top1"])  # fp16 argmax ties
    assert test["top1"] > 20  # a trained teacher (10 classes), so equal accuracies are not both chance


def test_1_every_kind_of_checkpoint_gets_its_own_preprocessing(self_teacher: Path, demo_root: Path, tmp_path: Path):
    """last.pt and best.pt (a preprocessing record), a checkpoint of an older version (only its config's preset),
    one trained with a preprocessing that is no preset (the record itself, also for --test-only), a bare state dict
    (the layout's default), and --preset (wins)."""
    m = build_manifest(demo_root, "val")
    for name in ("best.pt", "last.pt"):
        pre, src = teacher_preprocess("democnn_s", str(self_teacher / name), "auto", m)
        assert pre == PRESETS["demo"] and src.startswith(f"checkpoint {self_teacher / name}")
    state = torch.load(self_teacher / "best.pt", weights_only=True)
    old = tmp_path / "old.pt"
    torch.save({k: v for k, v in state.items() if k != "preprocessing"}, old)
    assert teacher_preprocess("democnn_s", str(old), "auto", m)[0] == PRESETS["demo"]
    mine = Preprocess("mine", 36, 30, (0.3, 0.3, 0.3), (0.3, 0.3, 0.3), "pad_crop", interpolation="bicubic")
    custom = tmp_path / "custom.pt"
    torch.save({**state, "preprocessing": mine.to_dict(), "config": {**state["config"], "preset": "mine"}}, custom)
    assert teacher_preprocess("democnn_s", str(custom), "auto", m)[0] == mine
    bank = tmp_path / "custom.zarr"
    assert dump(["--teacher", "democnn_s", "--weights", str(custom), "--data", str(demo_root), "--split", "val",
                 "--workers", "1", "--out", str(bank)]) == 0
    assert Preprocess.from_record(LabelBank(bank).attrs["preprocessing"]) == mine
    assert train(["--test-only", "--resume", str(custom), "--student", "democnn_s", "--data", str(demo_root),
                  "--workers", "1", "--output-dir", str(tmp_path / "t")]) == 0
    assert json.loads((tmp_path / "t" / "test.json").read_text())["preset"] == "mine"
    bare = tmp_path / "bare.pt"
    torch.save(state["model"], bare)
    pre, src = teacher_preprocess("democnn_s", str(bare), "auto", m)
    assert pre == PRESETS["imagenet"] and "imagefolder layout's default" in src
    assert teacher_preprocess("democnn_s", str(best := self_teacher / "best.pt"), "tiny", m) == \
        (PRESETS["tiny"], "--preset tiny") and best.is_file()


# --- 2. auto never upscales far beyond the images silently -----------------------------------------------------
def test_2_auto_preset_far_above_the_image_size_warns(self_teacher: Path, tmp_path: Path, caplog):
    """20 px images: the layout's default (224 px) and a timm teacher's config (224 px) each warn once, naming the
    sizes and the presets that fit; --preset imagenet (asked for) and a checkpoint trained at 32 px do not."""
    root = make_image_tree(tmp_path / "small", classes=tuple(f"c{i}" for i in range(10)), per_class=1,
                           sizes=((20, 20), (26, 20)))  # 10 classes, as the checkpoint
    common = ["--data", str(root), "--batch-size", "6", "--workers", "1"]
    cases = [(["--teacher", "democnn_s", "--weights", "none"], "'imagenet' crops 224 px"),
             (["--teacher", "timm/resnet10t.c3_in1k", "--weights", "none"], "'timm/resnet10t.c3_in1k' crops 224 px"),
             (["--teacher", "democnn_s", "--weights", "none", "--preset", "imagenet"], None),
             (["--teacher", "democnn_s", "--weights", str(self_teacher / "best.pt")], None)]
    for k, (args, said) in enumerate(cases):
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            assert dump([*args, *common, "--out", str(tmp_path / f"{k}.zarr")]) == 0
        got = _warnings(caplog, "upscaled")
        if said is None:
            assert got == [], got
            continue
        assert len(got) == 1 and said in got[0] and "the images are about 20 px" in got[0], got
        assert "--preset NAME; presets that fit: cifar (32 px), demo (32 px), demo_rrc (32 px), tiny (16 px)" \
            in got[0], got[0]
    # stage 2 without a bank (no teacher's preprocessing to follow) says the same of the layout's default
    make_image_tree(root, classes=tuple(f"c{i}" for i in range(10)), per_class=1, sizes=((20, 20),), split="val")
    for k, (extra, said) in enumerate((((), True), (("--preset", "tiny"), False))):
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            assert train(["--method", "ce", "--student", "democnn_s", *common, "--epochs", "1",
                          "max_steps_per_epoch=1", "--output-dir", str(tmp_path / f"s{k}"), *extra]) == 0
        got = _warnings(caplog, "upscaled")
        assert len(got) == int(said) and all("'imagenet' crops 224 px (from the imagefolder layout's default)" in g
                                             for g in got), got


# --- 3. checkpoint load failures ------------------------------------------------------------------------------
class _RunsCode:
    """Pickles as a call of os.getcwd: a global weights_only refuses to run."""

    def __reduce__(self):
        return (os.getcwd, ())


def _bad_checkpoints(tmp_path: Path) -> list[tuple[Path, list[str]]]:
    torch.manual_seed(0)
    sd = create_model("democnn_s", 10, "none").state_dict()
    cases = {
        "blocked": ({"model": sd, "args": _RunsCode()}, ["needs posix.getcwd", "weights_only=True", "re-save",
                                                         "['model']"]),
        "namespace_in_model": ({"model": {**sd, "extra": argparse.Namespace(a=1)}},
                               ["'model' entry is not a state dict of tensors", "does not load", "re-save"]),
        "missing_key": ({"model": {k: v for k, v in sd.items() if k != "fc.bias"}},
                        ["1 key(s) of the model missing from the checkpoint (fc.bias)", "name the architecture"]),
        "other_arch": (create_model("resnet8", 10, "none").state_dict(),
                       ["does not fit democnn_s with 10 classes", "missing from the checkpoint", "unexpected key",
                        "name the architecture"]),
        "other_shape": ({k: (v[:, :2] if k == "features.0.weight" and v.ndim == 4 else v) for k, v in sd.items()},
                        ["tensor(s) of another shape", "checkpoint [", "model ["]),
        "no_state_dict": ({"epoch": 3, "optimizer": {}}, ["holds no state dict: a dict with keys 'epoch', "
                                                          "'optimizer'", "torch.save(model.state_dict()"]),
        "not_torch": (b"\x1b[31mnot a torch file\x1b[0m " * 40, ["not a PyTorch checkpoint (UnpicklingError: "
                                                                "Unsupported operand 27)", "written by torch.save"]),
        "empty": (b"", ["the file is empty"]),
        "truncated": (None, ["a truncated or damaged torch.save archive", "failed finding central directory",
                             "copy it again"]),
    }
    out = []
    for name, (obj, words) in cases.items():
        p = tmp_path / f"{name}.pt"
        if obj is None:  # a checkpoint cut short (an interrupted copy)
            torch.save(sd, p)
            p.write_bytes(p.read_bytes()[:3000])
        else:
            p.write_bytes(obj) if isinstance(obj, bytes) else torch.save(obj, p)
        out.append((p, words))
    return out


def test_3_checkpoint_failures_are_one_clean_line_with_cause_and_fix(demo_root: Path, tmp_path: Path, capsys):
    """Each way a checkpoint can fail to load: exit 2, one line, no terminal escapes, no word cut, the cause and a
    fix. A torchvision-reference checkpoint ({model, optimizer, lr_scheduler, epoch, args: Namespace}) loads its
    model entry (args are never run) and gives the bank of the same weights saved bare."""
    sd = create_model("democnn_s", 10, "none").state_dict()
    first = sd.get("features.0.weight")
    assert first is not None and first.ndim == 4, list(sd)[:4]  # the shape case edits this tensor
    for path, words in _bad_checkpoints(tmp_path):
        capsys.readouterr()
        assert dump(["--teacher", "democnn_s", "--weights", str(path), "--data", str(demo_root), "--preset", "demo",
                     "--out", str(tmp_path / "x.zarr")]) == 2, path
        line = assert_one_line_error(capsys.readouterr().err, str(path), *words)
        assert "\x1b" not in line and "\t" not in line, line
        assert not (tmp_path / "x.zarr").exists()
    tvref, bare = tmp_path / "tvref.pth", tmp_path / "bare.pth"
    torch.save({"model": sd, "optimizer": {"state": {}}, "lr_scheduler": {"last_epoch": 3}, "epoch": 3,
                "args": argparse.Namespace(model="democnn_s", lr=0.1, data_path="/data")}, tvref)
    torch.save(sd, bare)
    for w in (tvref, bare):
        assert dump(["--teacher", "democnn_s", "--weights", str(w), "--data", str(demo_root), "--split", "val",
                     "--preset", "demo", "--workers", "1", "--out", str(tmp_path / f"{w.stem}.zarr")]) == 0
    np.testing.assert_array_equal(LabelBank(tmp_path / "tvref.zarr").read_logits(),
                                  LabelBank(tmp_path / "bare.zarr").read_logits())


# --- 4. timm teachers at their test-time size ----------------------------------------------------------------
TAGS = ("resnet10t.c3_in1k", "resnet50.a1_in1k", "convnext_tiny.fb_in22k_ft_in1k",
        "vit_tiny_patch16_224.augreg_in21k_ft_in1k", "efficientnet_b0.ra_in1k")


def test_4_timm_teachers_use_the_registered_test_size(tmp_path: Path):
    """For tags with and without a registered test size: auto is what timm's validate.py resolves (test size and
    crop_pct), --preset train-size the training config; the bank records it and says which."""
    import timm
    from timm.data import resolve_data_config

    for tag in TAGS:
        cfg = timm.models.get_pretrained_cfg(tag).to_dict()
        for test_size in (True, False):
            want = resolve_data_config({}, pretrained_cfg=cfg, use_test_size=test_size)
            p = weights_preprocess(f"timm/{tag}", "none", test_size=test_size)
            size = want["input_size"][-1]
            assert (p.crop, p.resize, p.interpolation, p.mean, p.std) == (
                size, math.floor(size / want["crop_pct"]), want["interpolation"], want["mean"], want["std"]), tag
    assert (weights_preprocess("timm/resnet10t.c3_in1k", "none").crop,
            weights_preprocess("timm/resnet10t.c3_in1k", "none", test_size=False).crop) == (224, 176)
    root = make_image_tree(tmp_path / "photos", per_class=1, sizes=((230, 250),))
    for preset, crop, said in (("auto", 224, "test-time"), ("train-size", 176, "training")):
        out = tmp_path / f"{preset}.zarr"
        assert dump(["--teacher", "timm/resnet10t.c3_in1k", "--weights", "none", "--data", str(root), "--preset",
                     preset, "--batch-size", "3", "--workers", "1", "--out", str(out)]) == 0
        a = LabelBank(out).attrs
        assert a["preprocessing"]["crop"] == crop and said in a["preprocessing_source"][0], a["preprocessing_source"]


# --- 5. the report of a folder of runs ---------------------------------------------------------------------------
def test_5_report_takes_a_folder_of_runs(self_teacher: Path, tmp_path: Path, capsys):
    """``make demo`` leaves runs in runs/demo/<run>: ``report runs/*`` (= runs/demo) and ``report runs/demo`` list
    them; a run directory itself still works; a folder with no runs at any of those levels is one line."""
    from pipeline.report import main as report

    runs = tmp_path / "runs" / "demo"
    runs.mkdir(parents=True)
    shutil.copytree(self_teacher, runs / "teacher-ce")
    shutil.copytree(self_teacher, runs / "student-ce")
    (runs / "unfinished").mkdir()
    for argv in ([str(p) for p in sorted((tmp_path / "runs").glob("*"))], [str(runs)],
                 [str(runs / "teacher-ce"), str(runs / "student-ce")]):
        capsys.readouterr()
        assert report(argv) == 0
        rows = [line.split()[0] for line in capsys.readouterr().out.splitlines()[1:] if line.strip()]
        assert rows == ["student-ce", "teacher-ce"], (argv, rows)
    assert report([str(runs / "unfinished")]) == 2
    assert "no finished runs" in capsys.readouterr().err


# --- 6. output path errors name the cause ----------------------------------------------------------------------
def _cannot_write(argv: list[str]) -> str:
    """Run a dump in a child that obeys file modes although root (no DAC override), return its stderr."""
    prefix: list[str] = []
    if os.geteuid() == 0:
        if not shutil.which("setpriv"):
            pytest.skip("running as root without setpriv: cannot make a folder unwritable")
        prefix = ["setpriv", "--bounding-set", "-dac_override,-dac_read_search", "--inh-caps",
                  "-dac_override,-dac_read_search"]
        if subprocess.run([*prefix, "true"], capture_output=True).returncode != 0:
            pytest.skip("setpriv cannot drop capabilities here")
    r = subprocess.run([*prefix, sys.executable, "-m", "pipeline.dump_logits", *argv], cwd=REPO, env=env(),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr[-2000:]
    return r.stderr


def test_6_output_path_errors_name_the_real_cause(demo_root: Path, tmp_path: Path, capsys):
    """A file in the way (parent or grandparent of --out), a folder that takes no files (/proc), a folder without
    write permission, a read-only file system, and stage 2's --output-dir under a file: each is one line naming
    that cause. Before: "another dump is writing ... remove a stale lock" and "File exists ... rerun to resume"."""
    (tmp_path / "afile").write_text("x")
    cases = [(tmp_path / "afile" / "b.zarr", f"{tmp_path / 'afile'} is a file, not a folder"),
             (tmp_path / "afile" / "sub" / "b.zarr", f"{tmp_path / 'afile'} is a file, not a folder"),
             (Path("/proc/offline-kd-test.zarr"), "/proc takes no new files")]
    for out, cause in cases:
        capsys.readouterr()
        assert dump(dump_args(demo_root, out)) == 2
        line = assert_one_line_error(capsys.readouterr().err, f"cannot write the bank {out}", cause, "--out")
        assert "lock" not in line and "resume" not in line.split(cause)[0], line
    assert (tmp_path / "afile").read_text() == "x"
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        err = _cannot_write(dump_args(demo_root, locked / "b.zarr"))
        assert_one_line_error(err, "permission denied: this user cannot create files in", str(locked))
    finally:
        locked.chmod(0o755)
    capsys.readouterr()
    assert train(train_args(demo_root, tmp_path / "afile" / "run", method="ce")) == 2
    assert_one_line_error(capsys.readouterr().err, "--output-dir", f"{tmp_path / 'afile'} is a file, not a folder")
    ro = tmp_path / "ro"
    ro.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,ro", "tmpfs", str(ro)], capture_output=True)
    if r.returncode != 0:
        pytest.skip("cannot mount a read-only tmpfs here (the other cases ran)")
    try:
        assert dump(dump_args(demo_root, ro / "b.zarr")) == 2
        assert_one_line_error(capsys.readouterr().err, f"{ro} is on a read-only file system")
    finally:
        subprocess.run(["umount", "-l", str(ro)], capture_output=True)


# --- 7. the missing-bank hint ------------------------------------------------------------------------------------
def _dump_command(msg: str) -> list[str]:
    return msg.split("make it with python -m pipeline.dump_logits ", 1)[1].split(" (or give", 1)[0].split()


def test_7_missing_bank_hint_lists_cached_banks_and_prints_a_working_command(
        self_teacher: Path, demo_root: Path, tmp_path: Path, monkeypatch, capsys):
    """--teacher without --teacher-weights for a model with no named weights: the hint lists the cached bank of
    that teacher (with its checkpoint) and the flags that use it, and never --weights DEFAULT; with a checkpoint
    that has no bank, the printed command (the user's own flags) makes the bank that the same run then finds."""
    monkeypatch.setenv("KD_CACHE", str(tmp_path / "cache"))
    best, last = self_teacher / "best.pt", self_teacher / "last.pt"
    assert dump(["--teacher", "democnn_s", "--weights", str(best), "--data", str(demo_root), "--batch-size", "64",
                 "--workers", "1"]) == 0
    capsys.readouterr()
    assert train(["--method", "kd", "--teacher", "democnn_s", *train_args(demo_root, tmp_path / "r0")[4:]]) == 2
    msg = assert_one_line_error(capsys.readouterr().err, "cached banks of democnn_s on this data:",
                                f"(weights {best})", f"use one with --teacher-weights {best}",
                                "--weights CHECKPOINT.pt", "democnn_s has no named weights")
    assert "DEFAULT" not in msg, msg
    assert train(["--method", "kd", "--teacher", "democnn_s", "--teacher-weights", str(best),
                  *train_args(demo_root, tmp_path / "r1")[4:]]) == 0
    copy = tmp_path / "elsewhere" / "teacher.pt"  # the same checkpoint at another path (or relative): same teacher
    copy.parent.mkdir()
    shutil.copy(best, copy)
    monkeypatch.chdir(copy.parent)
    assert train(["--method", "kd", "--teacher", "democnn_s", "--teacher-weights", "teacher.pt",
                  *train_args(demo_root, tmp_path / "r1b")[4:]]) == 0
    capsys.readouterr()
    user = ["--method", "kd", "--teacher", "democnn_s", "--teacher-weights", str(last),
            *train_args(demo_root, tmp_path / "r2")[4:]]
    assert train(user) == 2
    msg = assert_one_line_error(capsys.readouterr().err, f"no bank of democnn_s (weights {last})")
    cmd = _dump_command(msg)
    assert cmd[:4] == ["--teacher", "democnn_s", "--weights", str(last)] and "--preset" in cmd, cmd
    assert dump(cmd) == 0
    assert train(user) == 0
    capsys.readouterr()
    assert train(["--method", "kd", "--teacher", "resnet18", *train_args(demo_root, tmp_path / "r3")[4:]]) == 2
    assert "--teacher resnet18 --weights DEFAULT" in capsys.readouterr().err  # named weights exist for resnet18


# --- 8. an explicit --loader other than the cached bank's ------------------------------------------------------
def test_8_an_explicit_other_loader_is_reported_or_dumped_again(demo_root: Path, tmp_path: Path, caplog):
    out = tmp_path / "b.zarr"
    assert dump(dump_args(demo_root, out)) == 0
    assert LabelBank(out).attrs["loader"] == "dali"
    before = (out / "zarr.json").stat().st_mtime_ns
    for loader, said in (("auto", False), ("dali", False), ("torch", True)):
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            assert dump(dump_args(demo_root, out, "--loader", loader)) == 0
        got = _warnings(caplog, "loader")
        assert bool(got) == said, (loader, got)
    assert "dumped with the dali loader although --loader torch was asked for" in got[0] and "--overwrite" in got[0]
    assert "docs/GPU.md" in got[0] and LabelBank(out).attrs["loader"] == "dali"
    assert (out / "zarr.json").stat().st_mtime_ns == before  # reused, untouched
    assert dump(dump_args(demo_root, out, "--loader", "torch", "--overwrite")) == 0
    assert LabelBank(out).attrs["loader"] == "torch" and LabelBank(out).complete
    caplog.clear()
    with caplog.at_level(logging.WARNING):  # the torch bank, asked for again: nothing to say
        assert dump(dump_args(demo_root, out, "--loader", "torch")) == 0
    assert _warnings(caplog, "loader") == []


# --- 9. banks that explain themselves ----------------------------------------------------------------------------
WNIDS = ("n01440764", "n01531178", "n04592741")


def test_9_labels_info_shows_classes_outputs_preprocessing_views_loader_embeddings(
        self_teacher: Path, demo_root: Path, tmp_path: Path, capsys):
    """One-to-one, a wnid subset of a 1000-class teacher and a --class-map bank (and one with embeddings): the
    bank stores every class's teacher output; info (text and JSON) shows the classes (abbreviated when many),
    the outputs, each teacher's weights and preprocessing with its source, views, loader, embeddings."""
    demo = tmp_path / "demo.zarr"
    assert dump(["--teacher", "democnn_s", "--weights", str(self_teacher / "best.pt"), "--data", str(demo_root),
                 "--features", "--workers", "1", "--out", str(demo)]) == 0
    root = make_image_tree(tmp_path / "inet", classes=(*WNIDS, "cats"), per_class=1, sizes=((30, 30),))
    torch.manual_seed(5)
    ckpt = tmp_path / "c1000.pt"
    torch.save(create_model("democnn_s", 1000, "none").state_dict(), ckpt)
    cmap = tmp_path / "map.txt"
    cmap.write_text("".join(f"{w} {i}\n" for i, w in enumerate(WNIDS)) + "cats 281\n")
    mapped = tmp_path / "mapped.zarr"
    assert dump(["--teacher", "democnn_s", "--weights", str(ckpt), "--data", str(root), "--preset", "tiny",
                 "--class-map", str(cmap), "--workers", "1", "--out", str(mapped)]) == 0
    subset = tmp_path / "subset.zarr"
    shutil.rmtree(root / "train" / "cats")
    assert dump(["--teacher", "democnn_s", "--weights", str(ckpt), "--data", str(root), "--preset", "tiny",
                 "--workers", "1", "--out", str(subset)]) == 0
    from timm.data import ImageNetInfo

    inet = list(ImageNetInfo().label_names())
    m = build_manifest(demo_root, "train")
    for bank, classes, index in ((demo, list(m.classes), list(range(10))),
                                 (mapped, ["cats", *WNIDS], [281, 0, 1, 2]),
                                 (subset, list(WNIDS), [inet.index(w) for w in WNIDS])):
        assert LabelBank(bank).attrs["class_index"] == [index]
        capsys.readouterr()
        assert labels(["info", str(bank), "--json"]) == 0
        info = json.loads(capsys.readouterr().out)
        t = info["teachers"][0]
        assert info["classes"] == classes and t["class_index"] == index and info["loader"] == "dali"
        assert t["weights"] in (str(ckpt), str(self_teacher / "best.pt")) and "sha256" in t
        assert t["preprocessing"]["crop"] in (16, 32) and t["preprocessing"]["source"]
        assert info["views"]["policy"] == "center" and info["format"] == "dense"
        assert (info["embeddings"] is not None) == (bank == demo)
        assert labels(["info", str(bank)]) == 0
        text = capsys.readouterr().out
        assert "loader      dali" in text and "views       center, 1 per image" in text
        assert ("embeddings  float16" in text) == (bank == demo) and "preprocessing '" in text
        if bank == demo:
            assert f"classes     {', '.join(m.classes[:6])}, ..., {', '.join(m.classes[-2:])} (10)" in text
            assert "one to one with the classes" in text and "(from checkpoint" in text
        else:
            pairs = ", ".join(f"{c} -> {i}" for c, i in zip(classes, index))
            assert f"class -> teacher output: {pairs}" in text, text
            assert "(from --preset tiny)" in text


# --- 10. the smaller ones -----------------------------------------------------------------------------------------
def test_10_crd_default_nce_k_names_the_key(demo_root: Path, tmp_path: Path, capsys):
    """CRD's default nce_k (16384) on 300 samples: one line naming loss.nce_k= and a value that fits; a range
    error of any loss names its loss.<key>= too."""
    bank = tmp_path / "f.zarr"
    assert dump(dump_args(demo_root, bank, "--features")) == 0
    capsys.readouterr()
    assert train(train_args(demo_root, tmp_path / "r", labels=[bank], method="crd")) == 2
    assert_one_line_error(capsys.readouterr().err, "nce_k=16384", "pass loss.nce_k=K with K at most 299",
                          "loss.nce_k=299")
    assert train(train_args(demo_root, tmp_path / "r2", "loss.T=0", labels=[bank], method="kd")) == 2
    assert_one_line_error(capsys.readouterr().err, "T=0 is outside (0, inf); pass loss.T=VALUE in (0, inf)")


def test_10_default_workers_fit_the_cores(demo_root: Path, demo_bank: Path, tmp_path: Path, monkeypatch):
    """No -j: as many loader workers as the cores of this process (per local rank), at most 4, so the torch
    loader never starts more workers than cores (PyTorch's warning); -j N wins."""
    from pipeline.distributed import cores_per_local_rank
    from stage2_student_train.config import TrainConfig
    from stage2_student_train.inputs import check_config

    cfg = TrainConfig(data=str(demo_root))
    assert check_config(cfg).workers == min(4, cores_per_local_rank())
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(len(os.sched_getaffinity(0))))
    assert check_config(cfg).workers == 1
    assert check_config(TrainConfig(data=str(demo_root), workers=3)).workers == 3
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    args = train_args(demo_root, tmp_path / "r", labels=[demo_bank])
    j = args.index("--workers")
    del args[j:j + 2]  # the default
    with _no_worker_warning():
        assert train([*args, "--loader", "torch"]) == 0
    import yaml

    saved = yaml.safe_load((tmp_path / "r" / "config.yaml").read_text())
    assert saved["workers"] == min(4, cores_per_local_rank())


class _no_worker_warning:
    """Context: fails when PyTorch warns that a DataLoader starts more workers than the machine suggests."""

    def __enter__(self):
        import warnings

        self._ctx = warnings.catch_warnings(record=True)
        self.caught = self._ctx.__enter__()
        warnings.simplefilter("always")
        return self

    def __exit__(self, *exc):
        self._ctx.__exit__(*exc)
        said = [str(w.message) for w in self.caught if "worker processes in total" in str(w.message)]
        assert not said, said
        return False


def test_10_ensemble_of_banks_with_other_preprocessing_warns_and_records_each(demo_root: Path, tmp_path: Path,
                                                                              caplog):
    a, b = tmp_path / "a.zarr", tmp_path / "b.zarr"
    assert dump(dump_args(demo_root, a)) == 0
    assert dump([x if x != "demo" else "tiny" for x in dump_args(demo_root, b)]) == 0  # --preset tiny
    for mode in ("stack", "mean-logits"):
        out = tmp_path / f"{mode}.zarr"
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            assert labels(["ensemble", str(a), str(b), "-o", str(out), "--mode", mode, "--no-progress"]) == 0
        got = _warnings(caplog, "different preprocessing")
        assert len(got) == 1 and "'demo' (crop 32)" in got[0] and "'tiny' (crop 16)" in got[0], got
        attrs = LabelBank(out).attrs
        if mode == "stack":
            assert [p["crop"] for p in attrs["preprocessing"]["per_teacher"]] == [32, 16]
            assert attrs["class_index"] == [list(range(10))] * 2
        else:
            assert attrs["preprocessing"]["crop"] == 32 and attrs["class_index"] == [list(range(10))]
    caplog.clear()
    with caplog.at_level(logging.WARNING):  # the same preprocessing: nothing to say
        assert labels(["ensemble", str(a), str(a), "-o", str(tmp_path / "same.zarr"), "--no-progress"]) == 0
    assert _warnings(caplog, "different preprocessing") == []


def test_10_labels_stats_without_plots(demo_bank: Path, tmp_path: Path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert labels(["stats", str(demo_bank), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "samples 300" in out and "top1" in out and "wrote" not in out
    assert list(tmp_path.iterdir()) == []
