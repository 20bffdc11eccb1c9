"""Label-map dumps (issue 26): ``dump_logits --format labelmap`` stores the classifier at every cell of the teacher's
last feature map, [N, T, S, S, C] (float16, int8 or per-cell top-k), with the ordinary bank guarantees; the map's
mean over its cells is the teacher's logits on the same image (pool + linear heads), checked against a real dense
center bank of the same teacher; unsupported heads are refused in one line."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from pipeline.bank.labelmap import read_maps
from pipeline.bank.reader import LabelBank, verify_bank
from pipeline.dump_logits import main
from pipeline.labels import main as labels_main
from s1_helpers import REPO, kill_dump_after_chunks

ROW_ARRAYS = ("labels", "views", "skipped", "done", "image_size")
FORMS = {"f16": [], "top3": ["--topk", "3"], "int8": ["--map-dtype", "int8"], "full": ["--map-region", "full"]}


def _base(demo_root: Path, ckpt: Path) -> list[str]:
    return ["--teacher", "democnn_s", "--weights", str(ckpt), "--data", str(demo_root), "--preset", "demo",
            "--batch-size", "32", "--rows-per-chunk", "64", "--workers", "1"]


@pytest.fixture(scope="module")
def map_banks(demo_root: Path, make_ckpt, tmp_path_factory) -> dict[str, Path]:
    """A dense center bank and label-map banks (float16, top-3, int8, full region) of one peaked teacher."""
    d = tmp_path_factory.mktemp("maps")
    ckpt, _ = make_ckpt(num_classes=10, seed=3)
    out = {"dense": d / "dense.zarr"}
    assert main(_base(demo_root, ckpt) + ["--out", str(out["dense"])]) == 0
    for name, extra in FORMS.items():
        out[name] = d / f"{name}.zarr"
        assert main(_base(demo_root, ckpt) + ["--format", "labelmap", *extra, "--out", str(out[name])]) == 0
    return out


def test_map_shapes_dtypes_and_attrs_per_format(map_banks: dict[str, Path]):
    want = {"f16": {"map": ((300, 1, 4, 4, 10), "float16")},
            "top3": {"map_topk_values": ((300, 1, 4, 4, 3), "float16"),
                     "map_topk_indices": ((300, 1, 4, 4, 3), "int16"), "map_tail": ((300, 1, 4, 4), "float16")},
            "int8": {"map_q": ((300, 1, 4, 4, 10), "int8"), "map_center": ((300, 1, 4, 4), "float32"),
                     "map_scale": ((300, 1, 4, 4), "float32")}}
    for name, arrays in want.items():
        g = zarr.open_group(str(map_banks[name]), mode="r")
        a = dict(g.attrs)
        assert a["format"] == "labelmap" and a["shape"] == [300, 1, 1, 10] and a["complete"] is True
        lm = a["label_map"]
        assert lm["size"] == 4 and lm["native"] == [4] and lm["kinds"] == ["pool_linear"]
        assert lm["arrays"] == list(arrays) and lm["region"] == "eval"
        for n, (shape, dtype) in arrays.items():
            assert g[n].shape == shape and str(g[n].dtype) == dtype, n
        assert g["views"].shape == (300, 1, 5) and g["image_size"].shape == (300, 2)
        assert np.array_equal(g["image_size"][:], np.full((300, 2), 28))  # Fashion-MNIST: 28 x 28
        assert np.allclose(g["views"][:, 0], [0, 0, 1, 1, 0])  # demo: resize 32 = crop 32, the whole image
        assert verify_bank(map_banks[name]) == []
    keys = {LabelBank(p).attrs["key"] for p in map_banks.values()}
    assert len(keys) == len(map_banks)  # the map options are in the key


def test_top_k_cells_keep_the_largest_logits_and_the_tail_mass(map_banks: dict[str, Path]):
    dense = read_maps(zarr.open_group(str(map_banks["f16"]), mode="r"), 0, 300)
    top = read_maps(zarr.open_group(str(map_banks["top3"]), mode="r"), 0, 300)
    assert np.array_equal(np.sort(top, -1)[..., -3:], np.sort(dense, -1)[..., -3:])  # the 3 largest, exactly
    lse = lambda x: np.log(np.exp(x.astype(np.float64)).sum(-1))  # noqa: E731
    assert np.allclose(lse(top), lse(dense), atol=2e-3)  # each cell's softmax normaliser kept (tail mass exact)


def test_whole_map_average_equals_the_dense_center_bank(map_banks: dict[str, Path]):
    """Linearity: the classifier's mean over the cells is the classifier of the pooled feature."""
    dense = np.asarray(zarr.open_group(str(map_banks["dense"]), mode="r")["logits"][:, :, 0], np.float32)
    assert np.abs(dense).max() > 1  # a peaked teacher: the check is not trivially small numbers
    for name, tol in (("f16", 2e-2), ("full", 2e-2), ("int8", 5e-2)):
        maps = read_maps(zarr.open_group(str(map_banks[name]), mode="r"), 0, 300)
        err = np.abs(maps.mean(axis=(2, 3)) - dense).max()
        assert err < tol, (name, err)
    m = LabelBank(map_banks["f16"]).attrs["metrics"]["0:democnn_s"]
    d = LabelBank(map_banks["dense"]).attrs["metrics"]["0:democnn_s"]
    assert m["top1"] == d["top1"]


@pytest.mark.slow
def test_map_models_of_torchvision_and_timm_heads():
    from pipeline.models import create_model
    from pipeline.models.label_map import label_map_model

    torch.manual_seed(0)
    x = torch.randn(2, 3, 64, 64)
    for name, kind in (("resnet18", "pool_linear"), ("mobilenet_v2", "pool_linear"), ("timm/resnet10t", "timm_cnn"),
                       ("mobilenet_v3_small", "pool_head")):
        m = create_model(name, 7, "none").eval()
        mm = label_map_model(m, name)
        with torch.no_grad():
            z, maps = m(x), mm(x)
        assert mm.kind == kind and maps.shape == (2, 7, 2, 2), name
        if kind != "pool_head":
            assert torch.allclose(maps.mean((2, 3)), z, atol=1e-5), name
    vit = create_model("timm/vit_tiny_patch16_224", 7, "none").eval()  # TokenLabeling: the patch tokens' labels
    mm = label_map_model(vit)
    with torch.no_grad():
        maps = mm(torch.randn(1, 3, 224, 224))
    assert mm.kind == "timm_vit" and maps.shape == (1, 7, 14, 14)


def test_unsupported_head_is_refused_in_one_line(demo_root: Path, tmp_path: Path, capsys):
    out = tmp_path / "sq.zarr"
    rc = main(["--teacher", "squeezenet1_0", "--weights", "none", "--data", str(demo_root), "--preset", "demo",
               "--format", "labelmap", "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "\n" not in err and "SqueezeNet" in err and "torchvision ResNet" in err, err
    assert not out.exists()
    for extra, word in ((["--map-size", "3"], "--format labelmap"), (["--format", "labelmap", "--views", "2",
                                                                      "--view-policy", "rrc"], "--views"),
                        (["--format", "labelmap", "--topk", "3", "--map-dtype", "int8"], "float16")):
        assert main(["--teacher", "democnn_s", "--weights", "none", "--data", str(demo_root), *extra,
                     "--out", str(out)]) == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and word in err, (extra, err)


def test_sigkill_then_resume_of_a_map_dump_is_bit_identical(demo_root: Path, tmp_path: Path, capsys):
    args = lambda out: ["--teacher", "democnn_s", "--weights", "none", "--data", str(demo_root), "--preset",  # noqa: E731
                        "demo", "--rows-per-chunk", "16", "--batch-size", "8", "--workers", "1", "--format",
                        "labelmap", "--topk", "2", "--out", str(out)]
    killed = tmp_path / "killed.zarr"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    assert kill_dump_after_chunks(args(killed), killed, env) == -signal.SIGKILL, "finished before the kill"
    assert dict(zarr.open_group(str(killed), mode="r").attrs)["complete"] is False
    assert main(args(killed)) == 0
    clean = tmp_path / "clean.zarr"
    assert main(args(clean)) == 0
    a, b = zarr.open_group(str(killed), mode="r"), zarr.open_group(str(clean), mode="r")
    for n in ("map_topk_values", "map_topk_indices", "map_tail") + ROW_ARRAYS:
        assert a[n][:].tobytes() == b[n][:].tobytes(), n
    assert dict(a.attrs)["metrics"] == dict(b.attrs)["metrics"]


def test_map_check_reports_pooled_against_real_crops(map_banks: dict[str, Path], capsys):
    assert labels_main(["map-check", str(map_banks["f16"]), "--rows", "24", "--json"]) == 0
    import json

    res = json.loads(capsys.readouterr().out)
    r = res["0:democnn_s"]
    assert res["rows"] == 24 and r["kind"] == "pool_linear"
    for what in ("pooled", "whole"):
        assert set(r[what]) == {"kl_t1", "kl_t4", "top1_agreement"} and r[what]["kl_t1"] >= 0
    assert labels_main(["map-check", str(map_banks["dense"])]) == 2
    assert "not a label-map bank" in capsys.readouterr().err
    assert labels_main(["check", str(map_banks["f16"])]) == 2  # the stored-vs-live check names map-check
    assert "label-map bank: check it with python -m pipeline.labels map-check" in capsys.readouterr().err


@pytest.mark.slow
def test_torchrun_two_ranks_write_the_single_process_map_bank(demo_root: Path, tmp_path: Path):
    import subprocess
    import sys

    from pipeline.distributed import torchrun_args

    args = lambda out: ["--teacher", "democnn_s", "--weights", "none", "--data", str(demo_root), "--preset",  # noqa: E731
                        "demo", "--rows-per-chunk", "32", "--batch-size", "16", "--workers", "1", "--format",
                        "labelmap", "--map-dtype", "int8", "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    env.pop("WORLD_SIZE", None)
    dist = tmp_path / "dist.zarr"
    r = subprocess.run([sys.executable, *torchrun_args(2), "-m", "pipeline.dump_logits", *args(dist), "-v"],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "rank 0 dumped 160 samples" in r.stdout + r.stderr and "rank 1 dumped 140 samples" in r.stdout + r.stderr
    single = tmp_path / "single.zarr"
    assert main(args(single)) == 0
    a, b = zarr.open_group(str(dist), mode="r"), zarr.open_group(str(single), mode="r")
    for n in ("map_q", "map_center", "map_scale") + ROW_ARRAYS:
        assert a[n][:].tobytes() == b[n][:].tobytes(), n
    assert dict(a.attrs)["metrics"] == dict(b.attrs)["metrics"] and verify_bank(dist) == []
