"""The label bank (issue 2, point 4): schema and attrs, codecs, dtypes, metrics recomputed independently,
cache key, writer and reader contracts."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import zarr

import pipeline
from pipeline.bank.identity import bank_key, cache_root, default_bank_path
from pipeline.bank.reader import LabelBank, verify_bank
from pipeline.bank.schema import ARRAYS, DEFAULT_ROWS_PER_CHUNK, SCHEMA_VERSION
from pipeline.bank.writer import create_bank, done_flags, mark_complete, write_chunk
from pipeline.data import build_manifest
from pipeline.data.presets import get_preset
from pipeline.dump_logits import main
from pipeline.errors import BankError


def peaked_checkpoint(path: Path, seed: int = 1, num_classes: int = 10) -> Path:
    """A democnn_s checkpoint with non-default BN statistics and a scaled classifier (peaked, varied logits)."""
    from pipeline.models import create_model

    torch.manual_seed(seed)
    m = create_model("democnn_s", num_classes)
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.running_mean.uniform_(-0.2, 0.2)
                mod.running_var.uniform_(0.05, 0.3)
        m.fc.weight.mul_(20)
        m.fc.bias.uniform_(-1, 1)
    torch.save({"model": m.state_dict()}, path)
    return path


@pytest.fixture(scope="module")
def ckpt_banks(demo_root: Path, tmp_path_factory) -> dict:
    """fp16 and float32 banks of a peaked checkpoint teacher over the demo val split (100 samples)."""
    d = tmp_path_factory.mktemp("bankmod")
    ckpt = peaked_checkpoint(d / "teacher.pt")
    base = ["--teacher", "democnn_s", "--weights", str(ckpt), "--data", str(demo_root), "--split", "val",
            "--preset", "demo", "--batch-size", "16", "--rows-per-chunk", "32"]
    out = {"ckpt": ckpt}
    for dtype in ("float16", "float32"):
        path = d / f"{dtype}.zarr"
        args = base + ["--out", str(path)] + (["--dtype", dtype] if dtype == "float32" else [])
        assert main(args) == 0
        out[dtype] = path
    return out


def numpy_metrics(logits: np.ndarray, labels: np.ndarray, bins: int = 15) -> dict:
    """Independent float64 reference: top-1/top-5 (%), NLL, 15-bin ECE."""
    z = logits.astype(np.float64)
    zmax = z.max(axis=1, keepdims=True)
    logp = z - zmax - np.log(np.exp(z - zmax).sum(axis=1, keepdims=True))
    p = np.exp(logp)
    n = len(labels)
    top5 = np.argsort(-z, axis=1, kind="stable")[:, :5]
    conf, pred = p.max(axis=1), p.argmax(axis=1)
    ece = 0.0
    b = np.minimum((conf * bins).astype(int), bins - 1)
    for k in range(bins):
        sel = b == k
        if sel.any():
            ece += sel.sum() / n * abs((pred[sel] == labels[sel]).mean() - conf[sel].mean())
    return {"top1": 100.0 * (pred == labels).mean(), "top5": 100.0 * (top5 == labels[:, None]).any(1).mean(),
            "nll": float(-logp[np.arange(n), labels].mean()), "ece": ece, "n": n}


def test_attrs_complete(ckpt_banks: dict, demo_root: Path):
    path = ckpt_banks["float16"]
    g = zarr.open_group(str(path), mode="r")
    a = dict(g.attrs)
    m = build_manifest(demo_root, "val")
    assert a["schema_version"] == SCHEMA_VERSION == 1
    assert a["format"] == "dense" and a["dtype"] == "float16" and a["complete"] is True
    assert a["shape"] == [100, 1, 1, 10] and a["rows_per_chunk"] == 32
    sha = hashlib.sha256(Path(ckpt_banks["ckpt"]).read_bytes()).hexdigest()
    assert a["teachers"] == [{"name": "democnn_s", "arch": "democnn_s", "weights": str(ckpt_banks["ckpt"]),
                              "sha256": sha}]
    ds = a["dataset"]
    assert ds["fingerprint"] == m.fingerprint and ds["classes"] == list(m.classes)
    assert ds["classes"][:2] == ["Ankle_boot", "Bag"]  # sorted, not Fashion-MNIST label order
    assert (ds["num_samples"], ds["num_classes"], ds["split"], ds["layout"]) == (100, 10, "val", "imagefolder")
    assert ds["name"] == demo_root.name
    pre = get_preset("demo").to_dict()
    assert {k: a["preprocessing"][k] for k in pre} == pre and a["preprocessing"]["teacher_amp"] is False
    assert a["views"] == {"policy": "center", "num_views": 1}
    assert set(a["metrics"]) == {"0:democnn_s"}
    assert set(a["metrics"]["0:democnn_s"]) >= {"top1", "top5", "nll", "ece"}
    created = dt.datetime.fromisoformat(a["created"])
    assert abs((dt.datetime.now(dt.timezone.utc) - created).total_seconds()) < 3600
    assert a["package_version"] == pipeline.__version__
    assert a["config"]["weights"] == [str(ckpt_banks["ckpt"])] and a["config"]["rows_per_chunk"] == 32
    assert len(a["key"]) == 64
    # arrays per the contract
    assert set(ARRAYS) <= set(g.array_keys())
    assert g["logits"].shape == (100, 1, 1, 10) and g["logits"].dtype == np.float16
    assert g["labels"].dtype == np.int32 and g["labels"][:].tolist() == m.labels.tolist()
    assert g["views"].shape == (100, 1, 5) and np.isnan(g["views"][:]).all()  # center policy: NaN boxes
    assert g["skipped"][:].sum() == 0 and g["done"].shape == (4,) and g["done"][:].all()


def test_every_array_has_blosc_and_crc32c(ckpt_banks: dict):
    for path in (ckpt_banks["float16"], ckpt_banks["float32"]):
        for name in ARRAYS:
            meta = json.loads((Path(path) / name / "zarr.json").read_text())  # read the stored metadata itself
            codecs = [c["name"] for c in meta["codecs"]]
            assert "blosc" in codecs and "crc32c" in codecs, (name, codecs)
            assert codecs[-1] == "crc32c"  # checksum over the compressed bytes
            blosc = next(c for c in meta["codecs"] if c["name"] == "blosc")
            assert blosc["configuration"]["cname"] == "zstd"


def test_fp16_default_float32_on_request(ckpt_banks: dict):
    h = LabelBank(ckpt_banks["float16"])
    f = LabelBank(ckpt_banks["float32"])
    assert h.attrs["key"] != f.attrs["key"]
    lh, lf = h.read_logits(), f.read_logits()
    assert lh.dtype == np.float16 and lf.dtype == np.float32
    np.testing.assert_array_equal(lh, lf.astype(np.float16))  # the fp16 bank is the float32 logits rounded
    assert np.abs(lf).max() > 1.0  # peaked teacher: not a trivially small range
    # load() gives the same values as a tensor
    t = h.load()
    assert t.dtype == torch.float16 and tuple(t.shape) == h.shape
    np.testing.assert_array_equal(t.numpy(), lh)
    np.testing.assert_array_equal(h.load(torch.float32).numpy(), lh.astype(np.float32))


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_metrics_equal_independent_recomputation(ckpt_banks: dict, dtype: str):
    bank = LabelBank(ckpt_banks[dtype])
    logits = bank.read_logits()[:, 0, 0]
    labels = bank.labels()
    ref = numpy_metrics(logits, labels)
    got = bank.attrs["metrics"]["0:democnn_s"]
    assert got["n"] == 100
    assert 0 < ref["top5"] < 100 and ref["nll"] > 0.1  # a non-degenerate teacher
    for k in ("top1", "top5"):
        assert got[k] == pytest.approx(ref[k], abs=1e-9), k
    for k in ("nll", "ece"):
        assert got[k] == pytest.approx(ref[k], rel=1e-5, abs=1e-5), k


def test_demo_bank_contract(demo_bank: Path, demo_root: Path):
    bank = LabelBank(demo_bank)
    assert bank.complete and bank.shape == (300, 1, 1, 10) and bank.attrs["rows_per_chunk"] == 64
    m = build_manifest(demo_root, "train")
    bank.validate(m)
    assert verify_bank(demo_bank) == []
    # chunk files on disk: one per row chunk (300 / 64 -> 5), not one per sample
    files = [p for p in (Path(demo_bank) / "logits" / "c").rglob("*") if p.is_file()]
    assert len(files) == 5


def test_validate_refuses_other_dataset(demo_bank: Path, demo_root: Path, tmp_path: Path):
    bank = LabelBank(demo_bank)
    val = build_manifest(demo_root, "val")
    with pytest.raises(BankError, match="num_samples"):
        bank.validate(val)
    copy = tmp_path / "fm"
    shutil.copytree(demo_root, copy)
    victim = sorted((copy / "train" / "Bag").iterdir())[0]
    victim.rename(victim.with_name("zzz_" + victim.name))  # same count and classes, different list
    with pytest.raises(BankError, match="fingerprint"):
        bank.validate(build_manifest(copy, "train"))


def test_reader_errors(tmp_path: Path, demo_bank: Path):
    with pytest.raises(BankError, match="not found"):
        LabelBank(tmp_path / "nope.zarr")
    zarr.open_group(str(tmp_path / "plain.zarr"), mode="w").attrs["x"] = 1
    with pytest.raises(BankError, match="schema_version"):
        LabelBank(tmp_path / "plain.zarr")
    copy = tmp_path / "v2.zarr"
    shutil.copytree(demo_bank, copy)
    zarr.open_group(str(copy), mode="r+").attrs["schema_version"] = 2
    with pytest.raises(BankError, match="schema_version 2"):
        LabelBank(copy)


# --- writer ---------------------------------------------------------------------------------------------------


def test_writer_chunks_done_and_complete(tmp_path: Path):
    path = tmp_path / "w.zarr"
    g = create_bank(path, {"key": "k" * 64, "metrics": {}}, (10, 2, 1, 3), "float16", 4)
    assert g["logits"].chunks == (4, 2, 1, 3) and g["done"].shape == (3,)
    assert not LabelBank(path).complete and done_flags(g).tolist() == [False, False, False]
    with pytest.raises(BankError, match="not done"):
        mark_complete(g, {})
    rng = np.random.default_rng(0)
    full = rng.normal(size=(10, 2, 1, 3)).astype(np.float32)
    with pytest.raises(BankError, match="does not fit"):
        write_chunk(g, 0, full[:3], np.zeros(3), np.zeros((3, 1, 5)), np.zeros(3, bool))  # a partial middle chunk
    for j, (s, e) in enumerate([(0, 4), (4, 8), (8, 10)]):
        write_chunk(g, j, full[s:e], np.arange(s, e) % 3, np.zeros((e - s, 1, 5)), np.zeros(e - s, bool))
        assert done_flags(g)[: j + 1].all() and not done_flags(g)[j + 1:].any()
    mark_complete(g, {"metrics": {"m": 1}})
    bank = LabelBank(path)
    assert bank.complete and bank.attrs["metrics"] == {"m": 1}
    np.testing.assert_array_equal(bank.read_logits(), full.astype(np.float16))
    assert bank.labels().tolist() == [0, 1, 2, 0, 1, 2, 0, 1, 2, 0]
    assert verify_bank(path) == []
    # rows_per_chunk larger than N: one chunk
    g2 = create_bank(tmp_path / "small.zarr", {}, (3, 1, 1, 2), "float32", DEFAULT_ROWS_PER_CHUNK)
    assert g2["logits"].chunks[0] == 3 and g2.attrs["rows_per_chunk"] == 3


# --- cache key ------------------------------------------------------------------------------------------------


def test_bank_key_sensitivity_and_default_path(tmp_path: Path, monkeypatch):
    t = [{"name": "resnet34", "arch": "resnet34", "weights": "DEFAULT"}]
    pre = get_preset("imagenet").to_dict()
    views = {"policy": "center", "num_views": 1}
    k = bank_key(t, "f" * 64, pre, views, "float16")
    assert k == bank_key([dict(t[0])], "f" * 64, dict(pre), dict(views), "float16") and len(k) == 64
    variants = [
        bank_key([{**t[0], "weights": "IMAGENET1K_V1"}], "f" * 64, pre, views, "float16"),
        bank_key([{**t[0], "weights": "x.pt", "sha256": "a" * 64}], "f" * 64, pre, views, "float16"),
        bank_key([{**t[0], "weights": "x.pt", "sha256": "b" * 64}], "f" * 64, pre, views, "float16"),
        bank_key([{**t[0], "weights": "none", "init_seed": 1}], "f" * 64, pre, views, "float16"),
        bank_key(t, "e" * 64, pre, views, "float16"),
        bank_key(t, "f" * 64, get_preset("cifar").to_dict(), views, "float16"),
        bank_key(t, "f" * 64, pre, {"policy": "rrc", "num_views": 4, "seed": 0}, "float16"),
        bank_key(t, "f" * 64, pre, views, "float32"),
        bank_key(t + t, "f" * 64, pre, views, "float16"),
    ]
    assert len(set(variants + [k])) == len(variants) + 1
    a = {"name": "a", "arch": "resnet18", "weights": "none"}
    b = {"name": "b", "arch": "resnet34", "weights": "none"}
    assert bank_key([a, b], "f", pre, views, "float16") != bank_key([b, a], "f", pre, views, "float16")
    assert bank_key([{**a, "name": "renamed"}], "f", pre, views, "float16") == bank_key([a], "f", pre, views, "float16")
    monkeypatch.setenv("KD_CACHE", str(tmp_path / "cache"))
    assert cache_root() == tmp_path / "cache"
    assert default_bank_path("imagenet", "train", [a, b], k) == \
        tmp_path / "cache" / "imagenet-train" / f"resnet18+resnet34-{k[:8]}.zarr"
    monkeypatch.delenv("KD_CACHE")  # a per-user cache, never relative to the working directory
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root() == tmp_path / "xdg" / "offline-kd" / "label_banks"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert cache_root() == Path.home() / ".cache" / "offline-kd" / "label_banks"


def test_dense_key_unchanged_and_compact_formats_keyed():
    """A dense bank's key is what it was before compact dumps existed (existing caches stay valid: the value was
    recorded before the change); the compact format enters only a compact bank's key."""
    from pipeline.bank.identity import compact_record, format_suffix

    args = ([{"name": "x", "arch": "resnet34", "weights": "DEFAULT"}], "fp-1", {"name": "imagenet", "crop": 224},
            {"policy": "center", "num_views": 1}, "float16")
    assert bank_key(*args) == "b16ca2f4f24372b027d0b47065be1769f7b408fa44fac61d1d1ad0af517b63c4"
    assert bank_key(*args, compact_record("dense")) == bank_key(*args)
    keys = {bank_key(*args, compact_record("topk", 10)), bank_key(*args, compact_record("topk", 5)),
            bank_key(*args, compact_record("int8")), bank_key(*args)}
    assert len(keys) == 4
    assert (format_suffix("dense"), format_suffix("topk", 10), format_suffix("int8")) == ("", "-top10", "-int8")
