"""A user's own data without silent surprises (issue 14): one test per numbered point, on generated data.

Each test reproduces what a user would type and checks the one-line message (exit code 2), the warning, or the
corrected behaviour; RELIABILITY.md lists them."""

from __future__ import annotations

import json
import logging
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from PIL import Image

from pipeline.data import build_manifest
from pipeline.dump_logits import main as dump
from pipeline.errors import UsageError
from pipeline.train_student import main as train
from rel_helpers import REPO, env, train_args


def _err(capsys) -> str:
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 1, err
    return err[0]


def _tiny_dump(root: Path, out: Path | None, *extra: str) -> list[str]:
    args = ["--teacher", "democnn_s", "--weights", "none", "--data", str(root), "--preset", "tiny",
            "--batch-size", "4", "--workers", "1", *extra]
    return args + (["--out", str(out)] if out is not None else [])


# --- 1. stale file lists --------------------------------------------------------------------------------------
def test_1_stale_list_is_refused_naming_the_difference(image_tree: Path, capsys):
    from pipeline.data.__main__ import main as data

    assert data(["list", str(image_tree)]) == 0
    assert build_manifest(image_tree, "train").layout == "filelist"  # an up-to-date list is used
    new = image_tree / "train" / "apple" / "zz_added.jpg"
    Image.fromarray(np.zeros((12, 12, 3), np.uint8)).save(new)
    with pytest.raises(UsageError, match=r"disagrees with the folders.*1 image\(s\).*not listed \(first: "
                                         r"train/apple/zz_added.jpg\)"):
        build_manifest(image_tree, "train")
    capsys.readouterr()
    assert dump(_tiny_dump(image_tree, image_tree.parent / "b.zarr")) == 2
    assert "zz_added.jpg" in _err(capsys)
    folder = build_manifest(image_tree, "train", layout="imagefolder")
    listed = build_manifest(image_tree, "train", layout="filelist")
    assert len(folder) == len(listed) + 1 and "train/apple/zz_added.jpg" in folder.files
    new.unlink()
    (image_tree / listed.files[0]).unlink()  # a listed file removed
    with pytest.raises(UsageError, match=r"1 listed file\(s\) are not in the folders"):
        build_manifest(image_tree, "train")


# --- 2. preset from the layout and the bank --------------------------------------------------------------------
def _cifar(root: Path, n: int = 24) -> Path:
    rng = np.random.default_rng(0)
    root.mkdir(parents=True)
    for b, k in [(f"data_batch_{i}", n) for i in range(1, 6)] + [("test_batch", n)]:
        d = {"data": rng.integers(0, 256, (k, 3072), dtype=np.uint8), "labels": [i % 10 for i in range(k)]}
        (root / b).write_bytes(pickle.dumps(d))
    (root / "batches.meta").write_bytes(pickle.dumps({"label_names": [f"c{i}" for i in range(10)]}))
    return root


def test_2_preset_defaults_to_the_layout_then_the_bank(tmp_path: Path, capsys, caplog):
    root = _cifar(tmp_path / "cifar-10-batches-py")
    bank = tmp_path / "c.zarr"
    assert dump(["--teacher", "resnet20", "--weights", "none", "--data", str(root), "--batch-size", "40",
                 "--workers", "1", "--out", str(bank)]) == 0
    assert zarr.open_group(str(bank), mode="r").attrs["preprocessing"]["name"] == "cifar"
    run = tmp_path / "r"
    args = ["--method", "kd", "--student", "resnet20", "--data", str(root), "--labels", str(bank), "--epochs", "1",
            "--batch-size", "40", "--workers", "1", "max_steps_per_epoch=1"]
    assert train([*args, "--output-dir", str(run)]) == 0
    assert json.loads((run / "final.json").read_text())["preset"] == "cifar"  # from the bank
    with caplog.at_level(logging.WARNING):
        assert train([*args, "--output-dir", str(tmp_path / "r2"), "--preset", "tiny"]) == 0
    assert any("differs from the preprocessing the bank was dumped with (cifar)" in r.getMessage()
               for r in caplog.records)


# --- 3. the cache is found by the data, not by folder name or working directory --------------------------------
def test_3_cache_found_by_fingerprint(image_tree: Path, tmp_path: Path, monkeypatch, capsys):
    cache = tmp_path / "cache"
    monkeypatch.setenv("KD_CACHE", str(cache))
    capsys.readouterr()
    assert dump(_tiny_dump(image_tree, None)) == 0
    first = capsys.readouterr().out.strip().splitlines()[-1]
    renamed = tmp_path / "elsewhere" / "my-copy"
    shutil.copytree(image_tree, renamed)
    monkeypatch.chdir(tmp_path / "elsewhere")
    assert dump(_tiny_dump(Path("my-copy"), None)) == 0  # other folder name, other working directory
    assert capsys.readouterr().out.strip().splitlines()[-1] == first  # the same bank, reused
    assert len(list(cache.glob("*/*.zarr"))) == 1
    run = tmp_path / "run"
    assert train(["--method", "kd", "--student", "democnn_s", "--teacher", "democnn_s", "--teacher-weights", "none",
                  "--data", "my-copy", "--preset", "tiny", "--epochs", "1", "--batch-size", "8", "--workers", "1",
                  "--output-dir", str(run), "max_steps_per_epoch=1"]) == 0
    assert json.loads((run / "final.json").read_text())["bank"] == first
    import yaml

    assert yaml.safe_load((run / "config.yaml").read_text())["banks"] == [first]  # the lookup's result, recorded


# --- 5. self-describing runs ------------------------------------------------------------------------------------
def test_5_config_yaml_holds_resolved_loss_and_output_dir(demo_root: Path, demo_bank: Path, tmp_path: Path,
                                                           monkeypatch):
    import yaml

    monkeypatch.chdir(tmp_path)
    assert train(train_args(demo_root, Path("rel-out"), "loss.T=3", labels=[demo_bank], method="wsld")) == 0
    cfg = yaml.safe_load((tmp_path / "rel-out" / "config.yaml").read_text())
    assert cfg["loss"] == {"alpha": 2.5, "T": 3.0} and cfg["output_dir"] == "rel-out"
    assert cfg["preset"] == "demo" and cfg["loader"] in ("dali", "torch")
    assert train(["--method", "ce", "--student", "democnn_s", "--data", str(demo_root), "--epochs", "1",
                  "--batch-size", "32", "--workers", "1", "max_steps_per_epoch=1", "--seed", "3"]) == 0
    assert (tmp_path / "runs" / "ce-democnn_s-seed3" / "config.yaml").is_file()  # the default, written out


# --- 6. options never ignored without a word ---------------------------------------------------------------------
def test_6_labels_with_live_teacher_is_refused(demo_root: Path, demo_bank: Path, tmp_path: Path, capsys):
    assert train(train_args(demo_root, tmp_path / "r", "--live-teacher", "democnn_s", labels=[demo_bank])) == 2
    assert "--live-teacher runs a teacher instead of reading a bank" in _err(capsys)
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("views", [2, 1])
def test_6_view_bank_without_replay_warns(demo_root: Path, demo_bank: Path, tmp_path: Path, caplog, capsys,
                                          views: int):
    """A bank of random-crop views (several, or one rrc view) read without --replay-views says so; a center bank
    does not."""
    bank = tmp_path / "v.zarr"
    assert dump(["--teacher", "democnn_s", "--weights", "none", "--data", str(demo_root), "--preset", "demo",
                 "--views", str(views), "--view-policy", "rrc", "--batch-size", "50", "--workers", "1", "--out",
                 str(bank)]) == 0
    with caplog.at_level(logging.WARNING):
        assert train(train_args(demo_root, tmp_path / "r", labels=[bank])) == 0
    said = [r.getMessage() for r in caplog.records if "without --replay-views" in r.getMessage()]
    assert len(said) == 1 and f"stores {views} random-crop view(s) per image" in said[0]
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert train(train_args(demo_root, tmp_path / "c", labels=[demo_bank])) == 0
    assert not [r for r in caplog.records if "--replay-views" in r.getMessage()]


def test_6_broken_pipe_is_quiet(demo_bank: Path):
    """``python -m pipeline.labels info BANK | head -0``: the reader went away; no traceback, exit 0."""
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.labels", "info", str(demo_bank), "--json"], cwd=REPO,
                            env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 0 and "Traceback" not in err and "BrokenPipe" not in err, err


# --- 7. a GIF named .jpg -----------------------------------------------------------------------------------------
def test_7_gif_named_jpg_is_named_and_skippable(image_tree: Path, tmp_path: Path, capsys):
    gif = image_tree / "train" / "mango" / "img_4.jpg"
    Image.fromarray(np.zeros((12, 12, 3), np.uint8)).save(gif, format="GIF")
    capsys.readouterr()
    assert dump(_tiny_dump(image_tree, tmp_path / "a.zarr")) == 2
    err = _err(capsys)
    assert "train/mango/img_4.jpg" in err and "GIF image, a format DALI cannot decode" in err
    assert dump(_tiny_dump(image_tree, tmp_path / "b.zarr", "--skip-corrupt")) == 0
    m = build_manifest(image_tree, "train")
    skipped = zarr.open_group(str(tmp_path / "b.zarr"), mode="r")["skipped"][:]
    assert np.flatnonzero(skipped).tolist() == [m.files.index("train/mango/img_4.jpg")]
    from pipeline.data.__main__ import main as data

    assert data(["pack", str(image_tree), "-o", str(tmp_path / "sh"), "--workers", "1", "-q"]) == 0
    capsys.readouterr()
    assert data(["verify", str(tmp_path / "sh")]) == 1
    assert "GIF image" in capsys.readouterr().err


# --- 8. a damaged image in stage 2 --------------------------------------------------------------------------------
def _demo_copy(demo_root: Path, tmp_path: Path) -> Path:
    data = tmp_path / "data"
    shutil.copytree(demo_root, data)
    return data


def test_8_truncated_val_jpeg_named_before_training_or_skipped(demo_root: Path, demo_bank: Path, tmp_path: Path,
                                                               capsys):
    data = _demo_copy(demo_root, tmp_path)
    bad = sorted((data / "val").rglob("*.jpg"))[7]
    bad.write_bytes(bad.read_bytes()[:200])
    capsys.readouterr()
    assert train(train_args(data, tmp_path / "r", method="ce")) == 2
    err = _err(capsys)
    assert str(bad.relative_to(data)) in err and "truncated JPEG" in err and "--skip-corrupt" in err
    assert train(train_args(data, tmp_path / "r2", "--skip-corrupt", method="ce")) == 0
    rows = [json.loads(x) for x in (tmp_path / "r2" / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["val_n"] == len(build_manifest(data, "val")) - 1


_BREAK_DURING_TRAINING = r"""
import sys
from pathlib import Path
import stage2_student_train.run as run
real = run._save_last
def save_then_break(r, epoch, best):
    real(r, epoch, best)
    Path(sys.argv[1]).write_bytes(Path(sys.argv[1]).read_bytes()[:200])  # the file breaks after the pre-scan
run._save_last = save_then_break
from pipeline.train_student import main
sys.exit(main(sys.argv[2:]))
"""


def test_8_image_broken_during_training_keeps_the_epoch(demo_root: Path, tmp_path: Path):
    """A val image that breaks after the pre-scan (seen by evaluation): one line naming it, exit 2, and the
    epoch's training is already in last.pt; with the file fixed, --resume evaluates that epoch (the evaluation that
    failed) and continues after it."""
    data = _demo_copy(demo_root, tmp_path)
    bad = sorted((data / "val").rglob("*.jpg"))[3]
    good = bad.read_bytes()
    args = train_args(data, tmp_path / "r", "--loader", "torch", method="ce")
    proc = subprocess.run([sys.executable, "-c", _BREAK_DURING_TRAINING, str(bad), *args], cwd=REPO, env=env(),
                          capture_output=True, text=True, timeout=300)
    errs = [x for x in proc.stderr.splitlines() if x.startswith("error:")]
    assert proc.returncode == 2 and len(errs) == 1 and bad.name in errs[0], proc.stderr[-2000:]
    state = torch.load(tmp_path / "r" / "last.pt", weights_only=True)
    assert state["epoch"] == 0
    bad.write_bytes(good)
    assert train([*args, "--resume", "--epochs", "2"]) == 0
    rows = [json.loads(x) for x in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [0, 1] and rows[0]["val_n"] == rows[1]["val_n"]


# --- 10. EXIF-rotated JPEGs in multi-view banks --------------------------------------------------------------------
def test_10_exif_rotated_views_keep_the_policy_aspect(tmp_path: Path):
    """A 300x100 JPEG with orientation 6 decodes as 100x300 (DALI and torchvision rotate it): boxes are sampled
    in the decoded frame, so every crop keeps the policy's aspect range [3/4, 4/3] (sampled in the stored frame,
    they came out near 0.2)."""
    from pipeline.data import layout_of
    from pipeline.data.loaders import load_batches
    from pipeline.data.presets import get_preset
    from stage1_teacher_logits.views import ViewSampler

    d = tmp_path / "exif" / "train" / "a"
    d.mkdir(parents=True)
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (100, 300, 3), dtype=np.uint8)).save(
        d / "r.jpg", exif=exif.tobytes())
    m = build_manifest(tmp_path / "exif", "train")
    assert layout_of(m).image_size(m, 0) == (300, 100)  # decoded frame: height 300, width 100
    assert tuple(layout_of(m).load_tensor(m, 0).shape[-2:]) == (300, 100)
    boxes = ViewSampler("rrc", 32, 0, get_preset("imagenet")).boxes(m, np.array([0]))[0]
    aspect = (boxes[:, 3] * 100) / (boxes[:, 2] * 300)  # width / height in decoded pixels
    assert (aspect > 0.73).all() and (aspect < 1.37).all(), aspect
    dali = next(iter(load_batches("dali", m, np.array([0]), get_preset("tiny"), "eval", 1, 1)))
    assert dali.images.shape == (1, 3, 16, 16)


# --- 11. a prime number of images keeps the batch size -----------------------------------------------------------
_SPY_BATCHES = r"""
import json, sys
import pipeline.models.ensemble as ens
sizes = []
real = ens.TeacherEnsemble.forward
def spy(self, images):
    sizes.append(int((images if hasattr(images, "shape") else images[0]).shape[0]))  # a tensor per branch
    return real(self, images)
ens.TeacherEnsemble.forward = spy
from pipeline.dump_logits import main
rc = main(sys.argv[1:])
print("SIZES" + json.dumps({"rc": rc, "sizes": sizes}))
"""


def test_11_prime_dataset_keeps_the_batch_size(image_tree: Path, tmp_path: Path):
    for f in sorted(p for p in (image_tree / "train").rglob("*") if p.is_file())[:5]:
        f.unlink()
    n = len(build_manifest(image_tree, "train"))
    assert n == 13
    proc = subprocess.run([sys.executable, "-c", _SPY_BATCHES,
                           *_tiny_dump(image_tree, tmp_path / "p.zarr", "--batch-size", "8")], cwd=REPO, env=env(),
                          capture_output=True, text=True, timeout=300)
    line = [x for x in proc.stdout.splitlines() if x.startswith("SIZES")]
    assert line, proc.stderr[-2000:]
    res = json.loads(line[0][5:])
    assert res["rc"] == 0 and res["sizes"] == [8, 8]  # 13 = 8 + 5 (+ 3 padding rows dropped), not 13 x 1


# --- 12, 13. messages that say what to do ------------------------------------------------------------------------
def test_12_differing_classes_are_named(image_tree: Path, tmp_path: Path, capsys):
    (image_tree / "val" / "zebra").rename(image_tree / "val" / "zebu")
    assert train(["--method", "ce", "--student", "democnn_s", "--data", str(image_tree), "--preset", "tiny",
                  "--output-dir", str(tmp_path / "r")]) == 2
    err = _err(capsys)
    assert "only in train: zebra" in err and "only in val: zebu" in err


def test_13_bare_commands_say_how_to_run(capsys):
    assert dump(["--teacher", "resnet34"]) == 2
    err = _err(capsys)
    assert "--data ROOT" in err and "make demo" in err and "--data data/fashion-mnist" in err
    assert train(["--method", "wsld"]) == 2
    err = _err(capsys)
    assert "--data ROOT" in err and "make demo" in err and "python -m pipeline.train_student --method wsld" in err
