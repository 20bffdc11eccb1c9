"""``python -m pipeline.dump_logits`` end to end (issue 2, points 2, 5, 9): layouts through the dump, real ImageNet
JPEGs with the imagenet preset, reuse by content key, KD_CACHE, --out/--overwrite, corrupt inputs."""

from __future__ import annotations

import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from PIL import Image

from pipeline.bank.reader import LabelBank, verify_bank
from pipeline.data import build_manifest
from pipeline.data.presets import get_preset
from pipeline.dump_logits import main


def _args(data: Path, *extra: str, teacher: str = "democnn_s", weights: str = "none", preset: str = "tiny",
          rows: int = 4, batch: int = 4) -> list[str]:
    return ["--teacher", teacher, "--weights", weights, "--data", str(data), "--preset", preset,
            "--rows-per-chunk", str(rows), "--batch-size", str(batch), "--workers", "1", *extra]


def _run(capsys, argv: list[str]) -> tuple[int, str, str]:
    rc = main(argv)
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


# --- reuse and cache ------------------------------------------------------------------------------------------


def test_same_command_twice_is_a_noop(image_tree: Path, tmp_path: Path, capsys, file_mtimes):
    out = tmp_path / "bank.zarr"
    rc, first, err = _run(capsys, _args(image_tree, "--out", str(out)))
    assert rc == 0, err
    assert first.strip() == str(out)
    before = file_mtimes(out)
    assert any(k.startswith("logits/c/") for k in before)
    rc, second, _ = _run(capsys, _args(image_tree, "--out", str(out)))
    assert rc == 0 and second == first
    assert file_mtimes(out) == before  # nothing rewritten, nothing added or removed
    # the batch size and thread count are not part of what the bank is: still the same bank
    rc, third, _ = _run(capsys, _args(image_tree, "--out", str(out), batch=2) + ["--workers", "2"])
    assert rc == 0 and third == first and file_mtimes(out) == before


@pytest.mark.parametrize(("flags", "says"), [(["--views", "0"], "views=0 must be >= 1"),
                                             (["--rows-per-chunk", "-3"], "rows_per_chunk=-3 must be >= 1"),
                                             (["--workers", "0"], "workers=0 must be >= 1")])
def test_counts_below_one_name_the_flag(image_tree: Path, tmp_path: Path, capsys, flags, says):
    rc, _, err = _run(capsys, _args(image_tree, "--out", str(tmp_path / "b.zarr")) + flags)
    assert rc == 2 and says in err and not (tmp_path / "b.zarr").exists(), err


def test_kd_cache_default_location(image_tree: Path, tmp_path: Path, capsys, monkeypatch, make_ckpt):
    cache = tmp_path / "kd_cache"
    monkeypatch.setenv("KD_CACHE", str(cache))
    monkeypatch.chdir(tmp_path)  # the ./label_banks fallback must not be used
    rc, out, err = _run(capsys, _args(image_tree))
    assert rc == 0, err
    path = Path(out.strip())
    key = dict(zarr.open_group(str(path), mode="r").attrs)["key"]
    assert path == cache / "tree-train" / f"democnn_s-{key[:8]}.zarr" and path.is_dir()
    assert not (tmp_path / "label_banks").exists()
    rc, again, _ = _run(capsys, _args(image_tree))
    assert again == out
    # different weights (checkpoints, or init seeds for random weights) -> different key and path
    paths = {path}
    for extra, weights in (([], str(make_ckpt("democnn_s", 3, seed=1)[0])),
                           ([], str(make_ckpt("democnn_s", 3, seed=7)[0])),
                           (["--seed", "3"], "none")):
        rc, o, err = _run(capsys, _args(image_tree, *extra, weights=weights))
        assert rc == 0, err
        paths.add(Path(o.strip()))
    assert len(paths) == 4 and all(p.parent == cache / "tree-train" for p in paths)
    keys = {dict(zarr.open_group(str(p), mode="r").attrs)["key"] for p in paths}
    assert len(keys) == 4
    logits = [zarr.open_group(str(p), mode="r")["logits"][:] for p in sorted(paths)]
    assert all(not np.array_equal(logits[0], x) for x in logits[1:])
    # the val split is another bank folder
    rc, o, _ = _run(capsys, _args(image_tree, "--split", "val"))
    assert Path(o.strip()).parent == cache / "tree-val"


def test_out_with_different_key_refused_unless_overwrite(image_tree: Path, tmp_path: Path, capsys, file_mtimes,
                                                          make_ckpt):
    out = tmp_path / "shared.zarr"
    ckpt, _ = make_ckpt("democnn_s", 3, seed=1)
    assert _run(capsys, _args(image_tree, "--out", str(out)))[0] == 0
    before = file_mtimes(out)
    key_before = dict(zarr.open_group(str(out), mode="r").attrs)["key"]
    rc, stdout, err = _run(capsys, _args(image_tree, "--out", str(out), weights=str(ckpt)))
    assert rc == 2 and stdout == ""
    assert str(out) in err and "--overwrite" in err and err.count("\n") == 1
    assert file_mtimes(out) == before  # the existing bank is untouched
    rc, stdout, err = _run(capsys, _args(image_tree, "--out", str(out), "--overwrite", weights=str(ckpt)))
    assert rc == 0, err
    attrs = dict(zarr.open_group(str(out), mode="r").attrs)
    assert attrs["key"] != key_before and attrs["teachers"][0]["weights"] == str(ckpt) and attrs["complete"]
    # a non-bank directory at --out is refused as well
    other = tmp_path / "not_a_bank"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    rc, _, err = _run(capsys, _args(image_tree, "--out", str(other)))
    assert rc == 2 and (other / "keep.txt").read_text() == "mine"


# --- layouts through the dump ---------------------------------------------------------------------------------


def _write_cifar10(root: Path, per_batch: int, test: int) -> dict:
    rng = np.random.default_rng(0)
    root.mkdir(parents=True)
    out = {}
    for b, n in [(f"data_batch_{i}", per_batch) for i in range(1, 6)] + [("test_batch", test)]:
        out[b] = {"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                  "labels": [int(x) for x in rng.integers(0, 10, n)]}
        (root / b).write_bytes(pickle.dumps(out[b]))
    (root / "batches.meta").write_bytes(pickle.dumps({"label_names": [f"c{k}" for k in range(10)]}))
    return out


def test_cifar_arrays_dump_rows_match_model(tmp_path: Path, capsys, make_ckpt):
    w = _write_cifar10(tmp_path / "cifar-10-batches-py", per_batch=3, test=11)
    ckpt, model = make_ckpt("democnn_s", 10, seed=4)
    out = tmp_path / "c.zarr"
    rc, _, err = _run(capsys, _args(tmp_path / "cifar-10-batches-py", "--split", "val", "--out", str(out),
                                    weights=str(ckpt), preset="cifar", rows=4, batch=4))
    assert rc == 0, err
    bank = LabelBank(out)
    assert bank.shape == (11, 1, 1, 10) and bank.attrs["dataset"]["layout"] == "cifar"
    assert bank.labels().tolist() == w["test_batch"]["labels"]
    # cifar preset on 32x32 arrays: resize and crop are identities; only normalisation remains
    p = get_preset("cifar")
    x = torch.from_numpy(w["test_batch"]["data"].reshape(-1, 3, 32, 32).astype(np.float32))
    x = (x - 255 * torch.tensor(p.mean)[:, None, None]) / (255 * torch.tensor(p.std)[:, None, None])
    with torch.no_grad():
        ref = model(x).numpy()
    np.testing.assert_allclose(bank.read_logits()[:, 0, 0].astype(np.float32), ref, rtol=2e-3, atol=2e-3)
    assert verify_bank(out) == []


def test_filelist_dump(tmp_path: Path, capsys):
    root = tmp_path / "fl"
    rng = np.random.default_rng(0)
    rows = [(f"img/{k:03d}.jpg", k % 2) for k in (5, 2, 7, 0, 3)]
    for rel, _ in rows:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (21, 19, 3), dtype=np.uint8)).save(root / rel)
    (root / "train_list.txt").write_text("".join(f"{r} {y}\n" for r, y in rows))
    (root / "classes.txt").write_text("even\nodd\n")
    out = tmp_path / "fl.zarr"
    rc, _, err = _run(capsys, _args(root, "--out", str(out), rows=2, batch=2))
    assert rc == 0, err
    bank = LabelBank(out)
    m = build_manifest(root, "train")
    assert bank.labels().tolist() == m.labels.tolist() == [0, 0, 1, 1, 1]
    assert bank.attrs["dataset"]["classes"] == ["even", "odd"] and bank.attrs["dataset"]["layout"] == "filelist"
    assert np.isfinite(bank.read_logits()).all()


def test_foolbox_imagenet_jpegs_resnet18(foolbox_dir: Path, tmp_path: Path, capsys):
    """20 real ImageNet photographs (one 1024x683) through the imagenet preset and a torchvision resnet18."""
    import torchvision.transforms as T

    from pipeline.data.dali import build_pipeline, iterate
    from pipeline.models.teachers import build_teachers, parse_teachers

    root = tmp_path / "imnet"
    for f in sorted(foolbox_dir.glob("imagenet_*.jpg")):
        d = root / "val" / f"n{int(f.stem.split('_')[2]):08d}"
        d.mkdir(parents=True, exist_ok=True)
        shutil.copy(f, d / f.name)
    m = build_manifest(root, "val")
    assert len(m) == 20 and m.num_classes == 19  # class 609 appears twice
    out = tmp_path / "r18.zarr"
    rc, _, err = _run(capsys, _args(root, "--split", "val", "--out", str(out), teacher="resnet18",
                                    preset="imagenet", rows=10, batch=10) + ["--workers", "2"])
    assert rc == 0, err
    bank = LabelBank(out)
    assert bank.complete and bank.shape == (20, 1, 1, 19)
    logits = bank.read_logits()[:, 0, 0]
    assert np.isfinite(logits).all()
    # rows are the right images: the same seeded resnet18 on the same DALI eval batches
    model = build_teachers(parse_teachers(["resnet18"], ["none"]), 19, "cpu")
    pipe = build_pipeline(m, np.arange(20), get_preset("imagenet"), "eval", 10, 2, "cpu")
    p = get_preset("imagenet")
    tv = T.Compose([T.Resize(256), T.CenterCrop(224), T.ToTensor(), T.Normalize(p.mean, p.std)])
    for k, b in enumerate(iterate(pipe, 20, 10)):
        assert tuple(b.images.shape) == (10, 3, 224, 224) and b.index.tolist() == list(range(10 * k, 10 * k + 10))
        if k == 1:  # one batch is enough to pin rows to images (and keeps the test short)
            ref = model(b.images)[:, 0].numpy()
            np.testing.assert_allclose(logits[b.index.numpy()].astype(np.float32), ref, rtol=2e-3, atol=2e-3)
        # and DALI's preprocessing is torchvision's up to resampling detail
        for img, i in zip(b.images, b.index.tolist()):
            t = tv(Image.open(root / m.files[i]).convert("RGB"))
            assert (img - t).abs().mean().item() < 0.1, m.files[i]


# --- corrupt input --------------------------------------------------------------------------------------------


def _corrupt(path: Path, kind: str) -> None:
    data = path.read_bytes()
    if kind == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif kind == "zero_bytes":
        path.write_bytes(b"")
    else:
        path.write_text("this is a text file, not a JPEG\n" * 10)


@pytest.mark.parametrize("kind", ["truncated", "zero_bytes", "text"])
def test_corrupt_image(image_tree: Path, tmp_path: Path, capsys, kind: str):
    clean = tmp_path / "clean_tree" / "tree"
    shutil.copytree(image_tree, clean)
    m = build_manifest(image_tree, "train")
    bad_index = m.files.index("train/mango/img_3.jpg")
    assert bad_index == 9  # chunks of 2 rows: chunk 4 holds it; chunks 0-3 precede it
    bad = image_tree / m.files[bad_index]
    _corrupt(bad, kind)
    out = tmp_path / "bank.zarr"
    args = _args(image_tree, "--out", str(out), rows=2, batch=2)
    rc, stdout, err = _run(capsys, args)
    assert rc == 2 and stdout == ""
    errors = [ln for ln in err.splitlines() if ln.startswith("error:")]  # the rest is the progress bar
    assert len(errors) == 1 and str(bad) in errors[0] and "--skip-corrupt" in errors[0]
    g = zarr.open_group(str(out), mode="r")
    done = g["done"][:]
    assert done[:4].all() and not done[4:].any()  # everything before the bad file's chunk is kept
    assert dict(g.attrs)["complete"] is False
    kept = {k: v for k, v in _chunk_mtimes(out).items() if int(k.split("/")[2]) < 4}
    # --skip-corrupt: the same bank completes, the bad index recorded as skipped with NaN logits
    rc, stdout, err = _run(capsys, args + ["--skip-corrupt"])
    assert rc == 0, err
    assert stdout.strip() == str(out)
    assert {k: v for k, v in _chunk_mtimes(out).items() if k in kept} == kept  # done chunks not rewritten
    bank = LabelBank(out)
    assert bank.complete and np.flatnonzero(bank.skipped()).tolist() == [bad_index]
    logits = bank.read_logits()
    assert np.isnan(logits[bad_index]).all() and np.isfinite(np.delete(logits, bad_index, axis=0)).all()
    assert bank.labels().tolist() == m.labels.tolist()  # the skipped row keeps its true label
    assert bank.attrs["metrics"]["0:democnn_s"]["n"] == len(m) - 1
    assert verify_bank(out) == []
    # the other rows equal a clean dump of the remaining files
    (clean / m.files[bad_index]).unlink()
    clean_out = tmp_path / "clean.zarr"
    assert _run(capsys, _args(clean, "--out", str(clean_out), rows=2, batch=2))[0] == 0
    ref = LabelBank(clean_out).read_logits()
    np.testing.assert_allclose(np.delete(logits, bad_index, axis=0).astype(np.float32), ref.astype(np.float32),
                               rtol=2e-3, atol=2e-3)


def _chunk_mtimes(bank: Path) -> dict[str, int]:
    return {str(p.relative_to(bank)): p.stat().st_mtime_ns
            for name in ("logits", "labels", "skipped", "done") for p in (bank / name / "c").rglob("*") if p.is_file()}
