"""``python -m pipeline.data pack``: webdataset shards with the folder's identity, read in any exact order."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.data.__main__ import main
from pipeline.data.dali import build_pipeline, iterate
from pipeline.data import build_manifest
from pipeline.data.presets import get_preset
from pipeline.data.shards import ShardError, member_table, read_index


def _read_all(manifest, order, preset="demo", mode="eval", bs=16):
    pipe = build_pipeline(manifest, np.asarray(order), get_preset(preset), mode, bs, 1, "cpu", 0)
    batches = list(iterate(pipe, len(order), bs))
    return torch.cat([b.images for b in batches]), torch.cat([b.index for b in batches])


def test_pack_roundtrip_same_samples_order_fingerprint(demo_root: Path, demo_shards: Path):
    for split in ("train", "val"):
        folder = build_manifest(demo_root, split)
        packed = build_manifest(demo_shards, split)
        assert packed.layout == "shards" and folder.layout == "imagefolder"
        assert packed.files == folder.files and packed.classes == folder.classes
        np.testing.assert_array_equal(packed.labels, folder.labels)
        assert packed.fingerprint == folder.fingerprint
        assert packed.name == folder.name  # the source's name: same default bank location
    folder = build_manifest(demo_root, "train")
    entry = read_index(demo_shards)["splits"]["train"]
    assert len(entry["shards"]) > 2 and sum(r["count"] for r in entry["shards"]) == 300
    rec = entry["shards"][1]  # webdataset layout, original bytes, the global index carried in <key>.index
    with tarfile.open(demo_shards / rec["tar"]) as tf:
        names = tf.getnames()
        i = rec["first"]
        assert names[:3] == [f"{i:08d}.jpg", f"{i:08d}.cls", f"{i:08d}.index"]
        assert tf.extractfile(names[0]).read() == (demo_root / folder.files[i]).read_bytes()
        assert tf.extractfile(names[1]).read() == str(int(folder.labels[i])).encode()
        assert int.from_bytes(tf.extractfile(names[2]).read(), "little") == i


def test_reader_honours_exact_order_and_pads(demo_root: Path, demo_shards: Path):
    folder, packed = build_manifest(demo_root, "train"), build_manifest(demo_shards, "train")
    order = np.random.default_rng(3).permutation(len(folder))[:53]  # across shards, 53 % 16 != 0
    order[7] = order[6]  # repeats are allowed (replay / padding by the caller)
    a_img, a_idx = _read_all(folder, order)
    b_img, b_idx = _read_all(packed, order)
    np.testing.assert_array_equal(b_idx.numpy(), order)
    assert torch.equal(a_idx, b_idx) and torch.equal(a_img, b_img)


def test_pack_tree_png_and_grayscale(image_tree: Path, tree_shards: Path):
    folder, packed = build_manifest(image_tree, "train"), build_manifest(tree_shards, "train")
    assert packed.fingerprint == folder.fingerprint
    table = member_table(tree_shards, "train")
    png = [i for i, f in enumerate(folder.files) if f.endswith(".png")]
    assert png and all(table.ext[i] == "png" for i in png)
    order = np.arange(len(folder))[::-1].copy()
    a, b = _read_all(folder, order, "tiny", bs=5), _read_all(packed, order, "tiny", bs=5)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_bank_from_shards_identical_to_bank_from_folder(demo_bank: Path, demo_shards: Path, tmp_path: Path):
    from pipeline.bank.reader import open_group
    from pipeline.dump_logits import main as dump

    out = tmp_path / "from-shards.zarr"
    rc = dump(["--teacher", "democnn_s", "--weights", "none", "--data", str(demo_shards), "--split", "train",
               "--preset", "demo", "--batch-size", "32", "--rows-per-chunk", "64", "--out", str(out)])
    assert rc == 0
    a, b = open_group(demo_bank, "r"), open_group(out, "r")
    assert a.attrs["dataset"]["fingerprint"] == b.attrs["dataset"]["fingerprint"]
    assert a.attrs["key"] == b.attrs["key"]
    assert b.attrs["dataset"]["layout"] == "shards"
    np.testing.assert_array_equal(np.asarray(a["logits"][:]), np.asarray(b["logits"][:]))
    np.testing.assert_array_equal(np.asarray(a["labels"][:]), np.asarray(b["labels"][:]))


def test_train_student_one_epoch_from_shards(demo_shards: Path, tmp_path: Path):
    ts = pytest.importorskip("pipeline.train_student")
    rc = ts.main(["--method", "ce", "--student", "democnn_s", "--data", str(demo_shards), "--preset", "demo",
                  "--epochs", "1", "--batch-size", "32", "--output-dir", str(tmp_path / "run"), "--device", "cpu"])
    assert rc == 0
    final = json.loads((tmp_path / "run" / "final.json").read_text())
    assert final


def _mtimes(d: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in d.iterdir() if p.suffix in (".tar", ".json", ".idx")}


def test_pack_resume_keeps_finished_rewrites_partial(image_tree: Path, tree_shards: Path, capsys):
    entry = read_index(tree_shards)["splits"]["train"]
    recs = entry["shards"]
    assert len(recs) >= 4
    original = {r["tar"]: (tree_shards / r["tar"]).read_bytes() for r in recs}
    before = _mtimes(tree_shards)
    # simulate a run killed mid-way: one tar half written, one shard without its member table (killed between
    # rename and table), a stale temp file, and the index not yet marked complete
    t1 = tree_shards / recs[1]["tar"]
    t1.write_bytes(t1.read_bytes()[: t1.stat().st_size // 2])
    (tree_shards / recs[2]["table"]).unlink()
    (tree_shards / f".{recs[3]['tar']}.999.tmp").write_bytes(b"partial")
    index = read_index(tree_shards)
    index["splits"]["train"]["complete"] = False
    (tree_shards / "shards.json").write_text(json.dumps(index))
    with pytest.raises(ShardError, match="not completely packed"):
        build_manifest(tree_shards, "train")
    assert main(["pack", str(image_tree), "-o", str(tree_shards), "--shard-size", "12KB", "--workers", "1", "-q"]) == 0
    assert "2 written" in capsys.readouterr().out
    after = _mtimes(tree_shards)
    rewritten = {n for n in before if before[n] != after[n]}
    assert {recs[1]["tar"], recs[2]["tar"], recs[2]["table"]} <= rewritten
    assert not any(n.startswith(recs[k]["tar"][:-4]) for k in (0, 3) for n in rewritten)
    assert not list(tree_shards.glob(".*.tmp"))
    assert {r["tar"]: (tree_shards / r["tar"]).read_bytes() for r in recs} == original  # deterministic bytes
    assert main(["verify", str(tree_shards)]) == 0
    # the same command once more does nothing
    assert main(["pack", str(image_tree), "-o", str(tree_shards), "--shard-size", "12KB", "--workers", "1", "-q"]) == 0
    assert f"0 written, {len(recs)} kept" in capsys.readouterr().out


def test_pack_refuses_other_parameters(image_tree: Path, tree_shards: Path, capsys):
    assert main(["pack", str(image_tree), "-o", str(tree_shards), "--shard-size", "1GB", "-q"]) == 2
    assert "different pack" in capsys.readouterr().err
    assert main(["pack", str(image_tree), "-o", str(tree_shards), "--shard-size", "1GB", "--overwrite", "-q",
                 "--workers", "1"]) == 0
    assert len(read_index(tree_shards)["splits"]["train"]["shards"]) == 1
    assert len(list(tree_shards.glob("train-*.tar"))) == 1
    assert main(["pack", str(tree_shards), "-o", str(image_tree / "x")]) == 2  # a pack is not a source


def test_resized_pack_has_own_fingerprint(image_tree: Path, tmp_path: Path):
    import io

    from PIL import Image

    from pipeline.data.shards import read_sample

    out = tmp_path / "resized"
    assert main(["pack", str(image_tree), "-o", str(out), "--resize-shorter", "20", "--quality", "80", "-q",
                 "--workers", "1"]) == 0
    folder, packed = build_manifest(image_tree, "train"), build_manifest(out, "train")
    assert packed.files == folder.files and packed.fingerprint != folder.fingerprint
    assert packed.describe()["pack_transform"]["resize_shorter"] == 20
    q = tmp_path / "q-only"
    assert main(["pack", str(image_tree), "-o", str(q), "--quality", "80", "-q", "--workers", "1"]) == 0
    assert build_manifest(q, "train").fingerprint not in (folder.fingerprint, packed.fingerprint)
    table = member_table(out, "train")
    assert set(table.ext) == {"jpg"}  # PNGs re-encoded too
    for i in range(len(folder)):
        with Image.open(io.BytesIO(read_sample(packed, i))) as im, Image.open(image_tree / folder.files[i]) as src:
            assert im.mode == "RGB" and min(im.size) == min(20, min(src.size))
    assert main(["verify", str(out)]) == 0


def test_shards_stream_through_dali_webdataset_reader(image_tree: Path, tree_shards: Path):
    """The pack is DALI-native: readers.webdataset with the written .idx files yields every sample (PNG members
    included) with its global index from the ``.index`` member, bytes identical to the source files."""
    from nvidia.dali import pipeline_def

    from pipeline.data.shards import webdataset_reader

    folder = build_manifest(image_tree, "train")
    n = len(folder)

    @pipeline_def
    def wds():
        return webdataset_reader(tree_shards, "train")

    pipe = wds(batch_size=n, num_threads=1, device_id=None)
    pipe.build()
    raw, idx = pipe.run()
    assert np.asarray(idx.as_tensor()).ravel().tolist() == list(range(n))
    for i in range(n):
        assert np.asarray(raw[i]).tobytes() == (image_tree / folder.files[i]).read_bytes()
