"""``python -m pipeline.data verify`` and the readers: corrupt or truncated shards are named, never silent."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from pipeline.data.__main__ import main
from pipeline.data.dali import build_pipeline, iterate
from pipeline.data import build_manifest
from pipeline.data.presets import get_preset
from pipeline.data.shards import ShardError, member_table


def _flip(path: Path, offset: int, n: int = 3) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(n)
        f.seek(offset)
        f.write(bytes(x ^ 0x5A for x in b))


def _read(shards: Path, order) -> None:
    m = build_manifest(shards, "train")
    pipe = build_pipeline(m, np.asarray(order), get_preset("tiny"), "eval", 4, 1, "cpu", 0)
    for _ in iterate(pipe, len(order), 4):
        pass


def test_verify_ok(demo_root: Path, demo_shards: Path, capsys):
    assert main(["verify", str(demo_shards), "--source", str(demo_root), "--workers", "2"]) == 0
    out = capsys.readouterr().out
    assert "train: 300 samples" in out and "val: 100 samples" in out


def test_flipped_bytes_in_member(tree_shards: Path, capsys):
    table = member_table(tree_shards, "train")
    i = 9
    rec, off, size, _ = table.locate(i)
    member = table.member_name(i)
    _flip(tree_shards / rec["tar"], off + size // 2)  # inside the JPEG data: usually still decodes
    assert main(["verify", str(tree_shards)]) == 1
    err = capsys.readouterr().err
    assert rec["tar"] in err and member in err and "crc32 mismatch" in err
    _read(tree_shards, [0, 1])  # members before it are fine
    with pytest.raises(ShardError, match=f"{rec['tar']}: member {member} \\(sample {i}\\) is corrupt"):
        _read(tree_shards, list(range(len(table.shard_of))))


def test_corrupt_member_named_by_dump(tree_shards: Path, tmp_path: Path, capsys):
    from pipeline.dump_logits import main as dump

    table = member_table(tree_shards, "train")
    rec, off, size, _ = table.locate(4)
    _flip(tree_shards / rec["tar"], off + 40)
    rc = dump(["--teacher", "democnn_s", "--weights", "none", "--data", str(tree_shards), "--preset", "tiny",
               "--batch-size", "4", "--rows-per-chunk", "8", "--out", str(tmp_path / "b.zarr")])
    assert rc == 2
    err = capsys.readouterr().err
    assert rec["tar"] in err and table.member_name(4) in err and "Traceback" not in err


def test_truncated_shard(tree_shards: Path, capsys):
    table = member_table(tree_shards, "train")
    rec = table.shards[-1]
    last = rec["first"] + rec["count"] - 1
    _, off, size, _ = table.locate(last)
    p = tree_shards / rec["tar"]
    p.write_bytes(p.read_bytes()[:off + size // 2])  # cut inside the last image
    assert main(["verify", str(tree_shards), "--no-decode"]) == 1
    err = capsys.readouterr().err
    assert f"{rec['tar']}: {off + size // 2} bytes, index says {rec['size']} (truncated)" in err
    assert f"{rec['tar']}: member {table.member_name(last)} (sample {last}," in err  # the member cut off
    with pytest.raises(ShardError, match=f"{rec['tar']} is \\d+ bytes, its index says \\d+ \\(truncated\\)"):
        _read(tree_shards, [last])


def test_broken_header_and_missing_table(tree_shards: Path, capsys):
    table = member_table(tree_shards, "train")
    rec, off, _, _ = table.locate(5)
    _flip(tree_shards / rec["tar"], off - 512 + 2)  # the member's tar header (name field)
    other = table.shards[0] if table.shards[0] is not rec else table.shards[-1]
    (tree_shards / other["table"]).unlink()
    assert main(["verify", str(tree_shards)]) == 1
    err = capsys.readouterr().err
    assert f"{rec['tar']}: member {table.member_name(5)}" in err
    assert f"{other['tar']}: member table {other['table']} is missing" in err


def test_index_tampering_and_source_mismatch(image_tree: Path, tree_shards: Path, tmp_path: Path, capsys):
    p = tree_shards / "shards.json"
    index = json.loads(p.read_text())
    index["splits"]["train"]["labels"][0] = 2
    p.write_text(json.dumps(index))
    assert main(["verify", str(tree_shards)]) == 1
    assert "fingerprint" in capsys.readouterr().err
    index["splits"]["train"]["labels"][0] = 0
    p.write_text(json.dumps(index))
    assert main(["verify", str(tree_shards)]) == 0
    (image_tree / "train" / "apple" / "img_0.jpg").unlink()
    assert main(["verify", str(tree_shards), "--source", str(image_tree)]) == 1
    assert "the pack was made from" in capsys.readouterr().err
    assert main(["verify", str(tmp_path)]) == 2  # not a pack: usage error


def test_undecodable_source_image_is_found(image_tree: Path, tmp_path: Path, capsys):
    """A source file that never decoded is packed as is (original bytes); verify and the corrupt-sample search
    of the shards layout name it (the stage-1 dump's search reads pack members, not root/relpath)."""
    from pipeline.data import layout_of
    from pipeline.data.prepare import pack

    m = build_manifest(image_tree, "train")
    bad = m.files.index("train/mango/img_3.jpg")
    (image_tree / m.files[bad]).write_text("this is a text file, not a JPEG\n" * 10)
    out = tmp_path / "sh"
    pack(image_tree, out, "train", shard_size="12KB", workers=1, progress=False)
    packed = build_manifest(out, "train")
    order = np.arange(len(m))
    lay = layout_of(packed)
    assert lay.find_corrupt(packed, order, 0)[0] == bad
    assert lay.find_corrupt(packed, order, 0, {bad}) is None and lay.find_corrupt(packed, order, bad + 1) is None
    assert lay.scan(packed, order) == {bad: "not an image (no known signature)"}
    where = lay.describe_sample(packed, bad)
    assert f"member {bad:08d}.jpg (train/mango/img_3.jpg)" in where
    assert main(["verify", str(out)]) == 1
    assert f"member {bad:08d}.jpg (sample {bad}, train/mango/img_3.jpg): not an image" in capsys.readouterr().err
