"""Teachers and students from timm and torchvision, each with its own preprocessing; ImageNet-class subsets
(issue 15). Everything runs offline: random inits and local checkpoint files, never a download."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from PIL import Image

from pipeline.bank.reader import LabelBank
from tests.conftest import make_image_tree
from pipeline.data import build_manifest
from pipeline.dump_logits import main as dump
from pipeline.models import create_model

WNIDS = ("n01440764", "n01531178", "n04592741")  # tench, goldfinch, wing


def _dump(root: Path, out: Path, *extra: str) -> int:
    return dump(["--data", str(root), "--batch-size", "6", "--workers", "1", "--out", str(out), *extra])


@pytest.fixture(scope="module")
def photo_tree(tmp_path_factory) -> Path:
    return make_image_tree(tmp_path_factory.mktemp("zoo") / "tree", per_class=4, sizes=((180, 240), (230, 200)))


def test_timm_teacher_records_timms_preprocessing(photo_tree: Path, tmp_path: Path):
    """No --preset: the bank records timm's eval data config of the tag as timm's validate.py resolves it (the
    test-time size: 224 px, crop_pct 0.95 -> resize 235, bicubic; the tag trains at 176), and its logits are those
    of the model on timm's own eval transform (PIL) of each image."""
    import timm

    out = tmp_path / "t.zarr"
    assert _dump(photo_tree, out, "--teacher", "timm/resnet10t.c3_in1k", "--weights", "none", "--loader",
                 "torch") == 0
    pre = zarr.open_group(str(out), mode="r").attrs["preprocessing"]
    torch.manual_seed(0)
    model = create_model("timm/resnet10t.c3_in1k", 3, "none").eval()
    cfg = timm.data.resolve_data_config({}, model=model, use_test_size=True)
    assert (pre["crop"], pre["resize"], pre["interpolation"], pre["crop_mode"]) == (224, 235, "bicubic", "center")
    assert tuple(pre["mean"]) == cfg["mean"] and tuple(pre["std"]) == cfg["std"] and pre["name"] == \
        "timm/resnet10t.c3_in1k"
    m = build_manifest(photo_tree, "train")
    tf = timm.data.create_transform(**cfg)
    with torch.no_grad():
        ref = model(torch.stack([tf(Image.open(photo_tree / f).convert("RGB")) for f in m.files])).numpy()
    bank = LabelBank(out).read_logits()[:, 0, 0]
    assert np.corrcoef(bank.ravel(), ref.ravel())[0, 1] > 0.999  # measured 0.99988 (tensor vs PIL resampling)


def test_torchvision_weights_preprocessing():
    from pipeline.data.presets import weights_preprocess

    p = weights_preprocess("resnet50", "IMAGENET1K_V2")
    assert (p.resize, p.crop, p.interpolation) == (232, 224, "bilinear")
    q = weights_preprocess("efficientnet_b0", "DEFAULT")
    assert (q.resize, q.crop, q.interpolation) == (256, 224, "bicubic")
    assert weights_preprocess("resnet50", "none") is None and weights_preprocess("democnn", "x.pt") is None


def test_timm_student_trains_from_a_bank(demo_root: Path, demo_bank: Path, tmp_path: Path):
    from pipeline.train_student import main as train

    out = tmp_path / "s"
    assert train(["--method", "wsld", "--student", "timm/resnet10t", "--labels", str(demo_bank), "--data",
                  str(demo_root), "--batch-size", "16", "--epochs", "1", "--workers", "1", "--output-dir", str(out),
                  "max_steps_per_epoch=2"]) == 0
    final = json.loads((out / "final.json").read_text())
    assert final["student"] == "timm/resnet10t" and final["preset"] == "demo" and np.isfinite(final["nll"])


def test_1000_class_checkpoint_on_wnid_folders(tmp_path: Path):
    """Folders named by three ImageNet wnids and a 1000-class checkpoint: the bank holds the teacher's logits of
    exactly those classes, in the dataset's order, against the same model run independently."""
    from pipeline.data.dali import build_pipeline, iterate
    from pipeline.data.presets import get_preset

    root = make_image_tree(tmp_path / "inet", classes=WNIDS, per_class=3, sizes=((40, 52),))
    torch.manual_seed(5)
    net = create_model("resnet18", 1000, "none").eval()
    ckpt = tmp_path / "r18.pt"
    torch.save({"model": net.state_dict()}, ckpt)
    out = tmp_path / "b.zarr"
    assert _dump(root, out, "--teacher", "resnet18", "--weights", str(ckpt), "--preset", "tiny") == 0
    from timm.data import ImageNetInfo

    idx = [list(ImageNetInfo().label_names()).index(w) for w in WNIDS]  # the wnids' ImageNet indices, from timm
    bank = LabelBank(out)
    assert bank.shape == (9, 1, 1, 3) and bank.attrs["class_maps"] == [idx] and idx[0] == 0
    m = build_manifest(root, "train")
    (b,) = iterate(build_pipeline(m, np.arange(9), get_preset("tiny"), "eval", 9, 1), 9, 9)
    with torch.no_grad():
        ref = net(b.images)[:, idx].numpy()
    np.testing.assert_allclose(bank.read_logits()[b.index.numpy(), 0, 0], ref, rtol=2e-3, atol=2e-3)


def test_unknown_wnid_and_wrong_class_map_are_one_line_errors(tmp_path: Path, capsys):
    root = make_image_tree(tmp_path / "inet", classes=("n01440764", "cats"), per_class=2, sizes=((30, 30),))
    torch.manual_seed(5)
    ckpt = tmp_path / "r18.pt"
    torch.save(create_model("resnet18", 1000, "none").state_dict(), ckpt)
    common = ["--teacher", "resnet18", "--weights", str(ckpt), "--preset", "tiny"]
    capsys.readouterr()
    assert _dump(root, tmp_path / "a.zarr", *common) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "class folder 'cats' is not an ImageNet-1k wnid" in err[0] and "--class-map" in err[0]
    cmap = tmp_path / "map.txt"
    cmap.write_text("n01440764 0\ncats 1000\n")  # out of range for 1000 outputs
    assert _dump(root, tmp_path / "b.zarr", *common, "--class-map", str(cmap)) == 2
    assert "maps class 'cats' to output 1000, but resnet18 has 1000 outputs" in capsys.readouterr().err
    cmap.write_text("n01440764 0\n")
    assert _dump(root, tmp_path / "c.zarr", *common, "--class-map", str(cmap)) == 2
    assert "does not map dataset class 'cats'" in capsys.readouterr().err
    cmap.write_text("n01440764 0\ncats 281\n")  # 281: tabby cat
    assert _dump(root, tmp_path / "d.zarr", *common, "--class-map", str(cmap)) == 0
    assert LabelBank(tmp_path / "d.zarr").attrs["class_maps"] == [[281, 0]]  # classes sorted: cats, n01440764
    assert not (tmp_path / "a.zarr").exists() and not (tmp_path / "b.zarr").exists()


def test_ensemble_with_different_preprocessing_equals_single_banks_stacked(photo_tree: Path, tmp_path: Path):
    """Two timm teachers wanting 176 px (bicubic, crop_pct 0.875) and 224 px (crop_pct 0.95) at their training size
    (``--preset train-size``): one decode, two branches, one bank whose T slots equal the two single-teacher banks
    (each dumped on its own)."""
    a, b = "timm/resnet10t.c3_in1k", "timm/resnet18.a1_in1k"
    ens, size = tmp_path / "ens.zarr", ("--preset", "train-size")
    assert _dump(photo_tree, ens, "--teacher", a, "--weights", "none", "--teacher", b, "--weights", "none",
                 *size) == 0
    assert _dump(photo_tree, tmp_path / "a.zarr", "--teacher", a, "--weights", "none", *size) == 0
    assert _dump(photo_tree, tmp_path / "b.zarr", "--teacher", b, "--weights", "none", "--seed", "1", *size) == 0
    both = LabelBank(ens)
    pre = both.attrs["preprocessing"]
    assert [p["crop"] for p in pre["per_teacher"]] == [176, 224]
    assert all("training input size" in src for src in both.attrs["preprocessing_source"])
    za, zb = LabelBank(tmp_path / "a.zarr").read_logits(), LabelBank(tmp_path / "b.zarr").read_logits()
    np.testing.assert_array_equal(both.read_logits(), np.concatenate([za, zb], axis=1))


def test_a_users_callable_as_teacher(photo_tree: Path, tmp_path: Path, monkeypatch):
    """``--teacher module.path:function``: the user's factory, called with num_classes."""
    (tmp_path / "my_nets.py").write_text(
        "import torch.nn as nn\n"
        "def tiny(num_classes):\n"
        "    return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, num_classes))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    out = tmp_path / "u.zarr"
    assert _dump(photo_tree, out, "--teacher", "my_nets:tiny", "--weights", "none", "--preset", "tiny") == 0
    bank = LabelBank(out)
    assert bank.teachers[0]["arch"] == "my_nets:tiny" and bank.shape[-1] == 3
    sys.modules.pop("my_nets", None)


def test_wsld_file_list_with_its_own_class_order(tmp_path: Path, capsys):
    """The WSLD release's layout: ``train_list.txt`` of ``relpath label`` numbering the wnids in directory-listing
    order (not sorted). A 1000-class teacher is mapped by wnid, so label k gets its own class's logit."""
    from timm.data import ImageNetInfo

    root = make_image_tree(tmp_path / "wsld", classes=WNIDS, per_class=2, sizes=((40, 52),))
    order = [WNIDS[2], WNIDS[0], WNIDS[1]]  # label 0 = the third wnid, ...
    lines = [f"{w}/{f.name} {k}" for k, w in enumerate(order) for f in sorted((root / "train" / w).iterdir())]
    (root / "train_list.txt").write_text("\n".join(lines) + "\n")
    m = build_manifest(root, "train")
    assert m.layout == "filelist" and m.classes == tuple(order)
    torch.manual_seed(5)
    ckpt = tmp_path / "r18.pt"
    torch.save(create_model("resnet18", 1000, "none").state_dict(), ckpt)
    out = tmp_path / "b.zarr"
    assert _dump(root, out, "--teacher", "resnet18", "--weights", str(ckpt), "--preset", "tiny") == 0
    names = list(ImageNetInfo().label_names())
    assert LabelBank(out).attrs["class_maps"] == [[names.index(w) for w in order]]
