"""Teachers (issue 2, point 3): checkpoints in every wrapping give the in-memory model's logits, eval mode with
frozen BN, ensembles on the T axis, and bad names that exit 2 without leaving a bank behind."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from pipeline.data.dali import build_pipeline, iterate
from pipeline.data import build_manifest
from pipeline.data.presets import get_preset
from pipeline.dump_logits import main
from pipeline.models.teachers import TeacherEnsemble, TeacherSpec, build_teachers, parse_teachers

REPO = Path(__file__).resolve().parents[2]


def _dump(tree: Path, out: Path, teachers: list[tuple[str, str]], *extra: str) -> list[str]:
    args = ["--data", str(tree), "--preset", "tiny", "--batch-size", "6", "--rows-per-chunk", "6", "--workers", "1",
            "--out", str(out), *extra]
    for name, w in teachers:
        args += ["--teacher", name, "--weights", w]
    return args


def _reference_logits(model: torch.nn.Module, tree: Path, batch_size: int = 6) -> np.ndarray:
    """The in-memory model (eval mode) on the same DALI eval batches, rows in manifest order, as fp16."""
    m = build_manifest(tree, "train")
    pipe = build_pipeline(m, np.arange(len(m)), get_preset("tiny"), "eval", batch_size, 1, "cpu")
    out = np.zeros((len(m), model.fc.out_features), np.float32)
    model.eval()
    with torch.no_grad():
        for b in iterate(pipe, len(m), batch_size):
            out[b.index.numpy()] = model(b.images).numpy()
    return out.astype(np.float16)


def test_checkpoint_wrappings_match_in_memory_model(image_tree: Path, tmp_path: Path, make_ckpt):
    ref = None
    keys = set()
    for wrap in ("bare", "model", "state_dict"):
        path, model = make_ckpt("democnn_s", 3, seed=1, wrap=wrap, prefix="module.")
        stored = torch.load(path, weights_only=True)
        stored = stored if wrap == "bare" else stored[wrap]
        assert all(k.startswith("module.") for k in stored)
        out = tmp_path / f"{wrap}.zarr"
        assert main(_dump(image_tree, out, [("democnn_s", str(path))])) == 0
        g = zarr.open_group(str(out), mode="r")
        if ref is None:
            ref = _reference_logits(model, image_tree)
            assert np.abs(ref.astype(np.float32)).max() > 1  # peaked: a wrong load would show
        np.testing.assert_array_equal(g["logits"][:, 0, 0], ref, err_msg=wrap)
        t = dict(g.attrs)["teachers"][0]
        assert t["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest() and t["weights"] == str(path)
        keys.add(dict(g.attrs)["key"])
    assert len(keys) == 3  # different files -> different sha256 -> different banks


def test_eval_mode_bn_buffers_unchanged(make_ckpt):
    path, model = make_ckpt("democnn_s", 3, seed=1)
    ens = build_teachers(parse_teachers(["democnn_s"], [str(path)]), 3, "cpu")
    before = {k: v.clone() for k, v in ens.state_dict().items()}
    assert any("running_mean" in k for k in before) and any("num_batches_tracked" in k for k in before)
    ens.train()  # teachers refuse to leave eval mode
    assert not any(m.training for m in ens.modules())
    x = torch.randn(8, 3, 16, 16)
    y_all = ens(x)
    assert y_all.shape == (8, 1, 3) and not y_all.requires_grad
    y_half = torch.cat([ens(x[:3]), ens(x[3:])])
    after = ens.state_dict()
    for k, v in before.items():
        assert torch.equal(v, after[k]), k  # running stats and counters untouched
    torch.testing.assert_close(y_all, y_half)  # per-sample outputs: no batch statistics
    torch.testing.assert_close(y_all[:, 0], model(x))


def test_dump_is_batch_independent_eval_mode(image_tree: Path, tmp_path: Path, make_ckpt):
    """A teacher in train mode (batch-statistics BN) would give batch-dependent logits; the dump does not."""
    path, _ = make_ckpt("democnn_s", 3, seed=1)
    a, b = tmp_path / "b6.zarr", tmp_path / "b2.zarr"
    assert main(_dump(image_tree, a, [("democnn_s", str(path))])) == 0
    assert main(_dump(image_tree, b, [("democnn_s", str(path))]) + ["--batch-size", "2"]) == 0
    la = zarr.open_group(str(a), mode="r")["logits"][:]
    lb = zarr.open_group(str(b), mode="r")["logits"][:]
    np.testing.assert_allclose(la.astype(np.float32), lb.astype(np.float32), rtol=2e-3, atol=2e-3)


def test_ensemble_on_t_axis_equals_single_banks(image_tree: Path, tmp_path: Path, make_ckpt):
    pa, _ = make_ckpt("democnn_s", 3, seed=1)
    pb, _ = make_ckpt("resnet8", 3, seed=2)
    ens, sa, sb = tmp_path / "ens.zarr", tmp_path / "a.zarr", tmp_path / "b.zarr"
    assert main(_dump(image_tree, ens, [("democnn_s", str(pa)), ("resnet8", str(pb))])) == 0
    assert main(_dump(image_tree, sa, [("democnn_s", str(pa))])) == 0
    assert main(_dump(image_tree, sb, [("resnet8", str(pb))])) == 0
    ge, ga, gb = (zarr.open_group(str(p), mode="r") for p in (ens, sa, sb))
    assert ge["logits"].shape == (18, 2, 1, 3)
    np.testing.assert_array_equal(ge["logits"][:, 0], ga["logits"][:, 0])
    np.testing.assert_array_equal(ge["logits"][:, 1], gb["logits"][:, 0])
    assert not np.array_equal(ge["logits"][:, 0], ge["logits"][:, 1])
    ae = dict(ge.attrs)
    assert [t["arch"] for t in ae["teachers"]] == ["democnn_s", "resnet8"]
    assert [t["sha256"] for t in ae["teachers"]] == [hashlib.sha256(p.read_bytes()).hexdigest() for p in (pa, pb)]
    assert set(ae["metrics"]) == {"0:democnn_s", "1:resnet8", "ensemble"}
    assert ae["metrics"]["0:democnn_s"] == dict(ga.attrs)["metrics"]["0:democnn_s"]
    assert ae["metrics"]["1:resnet8"] == dict(gb.attrs)["metrics"]["0:resnet8"]
    # ensemble metric: mean of the two teachers' stored logits
    mean = ge["logits"][:, :, 0].astype(np.float32).mean(axis=1)
    labels = ge["labels"][:]
    assert ae["metrics"]["ensemble"]["top1"] == pytest.approx(100 * (mean.argmax(1) == labels).mean())
    # teacher order is the T axis: swapping it is a different bank
    swapped = tmp_path / "swapped.zarr"
    assert main(_dump(image_tree, swapped, [("resnet8", str(pb)), ("democnn_s", str(pa))])) == 0
    gs = zarr.open_group(str(swapped), mode="r")
    assert dict(gs.attrs)["key"] != ae["key"]
    np.testing.assert_array_equal(gs["logits"][:, 0], ge["logits"][:, 1])


def test_random_init_teachers_seeded_per_position():
    specs = parse_teachers(["democnn_s", "democnn_s"], ["none", "none"], seed=5)
    assert [s.identity()["init_seed"] for s in specs] == [5, 6]
    ens = build_teachers(specs, 3, "cpu", seed=5)
    w0, w1 = (m.fc.weight for m in ens.models)
    assert not torch.equal(w0, w1)
    again = build_teachers(parse_teachers(["democnn_s", "democnn_s"], ["none", "none"], seed=5), 3, "cpu", seed=5)
    assert torch.equal(again.models[1].fc.weight, w1)
    assert "init_seed" not in TeacherSpec("resnet18", "DEFAULT", 0).identity()
    assert isinstance(ens, TeacherEnsemble)


@pytest.mark.parametrize("teachers, weights, match", [
    (["resnet19"], ["none"], "unknown model 'resnet19'; valid: "),
    (["resnet18"], ["IMAGENET1K_V9"], "unknown weights 'IMAGENET1K_V9' for resnet18; valid: DEFAULT, none"),
    (["democnn_s"], ["DEFAULT"], "no named weights"),
    (["democnn_s"], ["/nonexistent/dir/teacher.pth"], "weights file not found: /nonexistent/dir/teacher.pth"),
    (["democnn_s", "resnet8"], ["none"], "2 --teacher flags but 1 --weights"),
    (["democnn_s"], ["WRONG_ARCH"], "does not fit democnn_s"),
])
def test_bad_teacher_exit_2_no_bank(image_tree: Path, tmp_path: Path, make_ckpt, monkeypatch, capsys,
                                    teachers, weights, match):
    if weights == ["WRONG_ARCH"]:
        weights = [str(make_ckpt("resnet8", 3, seed=2)[0])]
    cache = tmp_path / "cache"
    monkeypatch.setenv("KD_CACHE", str(cache))
    args = ["--data", str(image_tree), "--preset", "tiny"]
    for t in teachers:
        args += ["--teacher", t]
    for w in weights:
        args += ["--weights", w]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and match in err
    assert not cache.exists()  # nothing created under the default location
    out = tmp_path / "explicit.zarr"
    assert main(args + ["--out", str(out)]) == 2
    capsys.readouterr()
    assert not out.exists() and not Path(str(out) + ".lock").exists()


def test_unknown_teacher_subprocess_one_line(image_tree: Path, tmp_path: Path):
    out = tmp_path / "b.zarr"
    env = {**os.environ, "KD_CACHE": str(tmp_path / "cache")}
    r = subprocess.run([sys.executable, "-m", "pipeline.dump_logits", "--teacher", "no_such_net", "--weights", "none",
                        "--data", str(image_tree), "--out", str(out)], cwd=REPO, env=env, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "unknown model 'no_such_net'" in lines[0] and "resnet18" in lines[0]
    assert "Traceback" not in r.stderr and r.stdout == ""
    assert not out.exists() and not (tmp_path / "cache").exists()
