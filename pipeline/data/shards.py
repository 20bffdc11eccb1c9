"""Packed tar shards (webdataset layout): the on-disk format, the ``shards`` manifest and the DALI reader.

A pack directory (written by ``python -m pipeline.data pack``, see :mod:`pipeline.data.prepare`) holds::

    shards.json                 per split: the source manifest (classes, files, labels), its fingerprint, the
                                pack transform (resize/quality, or none = original bytes) and the shard list
    <split>-000000.tar          webdataset members per sample i (key ``%08d`` of the global sample index):
                                  <key>.<jpg|png|...>  the image (original bytes unless the pack re-encoded it)
                                  <key>.cls            the true class as decimal text (webdataset convention)
                                  <key>.index          the global sample index, 4-byte little-endian int32
    <split>-000000.idx          the same shard in DALI's webdataset index format (``v1.2``), so
                                ``fn.readers.webdataset(paths=..., index_paths=...)`` streams it directly
    <split>-000000.json         the shard's member table (image offset, size, crc32, extension per sample);
                                written last, it is also the "this shard is finished" marker for resume

Shard k holds a contiguous range of global indices ``[first, first + count)`` in manifest order; the reader
loads every member table once into flat arrays (shard, offset, size, crc32 per global index).

Identity: ``shard_manifest`` returns the ORIGINAL relative paths as ``files`` (layout ``shards``), so a pack
of unmodified bytes has the same fingerprint as the folder it came from: a bank dumped from the folder is
valid for the shards and vice versa. A pack that re-encoded images (``--resize-shorter`` / ``--quality``)
gets its own fingerprint: sha256 over the source fingerprint and the canonical transform record
(``Manifest.transform``).

Reader design (why not ``fn.readers.webdataset`` for training): every stage hands the reader an explicit,
ordered array of global indices (the trainer's seeded per-epoch permutation, the dump's chunk order, a rank's
share of either). That exact order is what makes view replay (per-sample crop boxes aligned with the reader),
bit-exact resume and identical folder/shard banks possible. DALI's webdataset reader can only stream shards
sequentially (optionally through a shuffle buffer whose order is not the trainer's), so it cannot honour an
arbitrary order. :func:`shard_reader` therefore uses ``fn.external_source`` fed by a Python callable that
``pread``s each member by (shard, offset, size) in exactly ``order``, checks its crc32 (a flipped byte in a
JPEG usually still decodes, silently), and pads the last batch by repeating the last sample like the file
reader's ``pad_last_batch=True``. The callback costs ~7 us per sample (measured: pread + crc32 + wrapping)
next to ~1.5 ms of decoding an ImageNet JPEG; the dump's chunk order reads each shard front to back, a
shuffled epoch does one positioned read per sample (no per-file open/stat, which is what makes 1.28M small
files slow on network storage). The shards stay DALI-native (``.idx`` files, the index in ``<key>.index``)
for tools that want to stream them with :func:`webdataset_reader`; ``bench/data_prep.py`` measures both.

Corrupt data is named, never silent: a member whose bytes changed (crc32), a truncated or replaced shard
(size differs from the index) or a missing member table raises :class:`ShardError` (a ``UsageError``: one
line, exit 2) naming the shard and member. An image that was already undecodable in the source is packed
as is; :func:`find_corrupt` / :func:`describe_sample` locate it for the stage-1 corrupt-file handling.
"""

from __future__ import annotations

import json
import os
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.data.manifest import Manifest, canonical_transform
from pipeline.errors import UsageError

SHARDS_JSON = "shards.json"
FORMAT = "kd-webdataset-shards"
VERSION = 1
TAR_BLOCK = 512
# Image member extensions by content (DALI decodes by content; the extension is for tools and ext= lists).
IMAGE_EXTS = ("jpg", "png", "bmp", "tiff", "webp", "jpeg", "tif", "pnm", "jp2")
WDS_IMAGE_EXT = ";".join(IMAGE_EXTS)


class ShardError(UsageError):
    """A pack is missing, incomplete, corrupt or does not match what its index says (names shard and member)."""


def pad_block(n: int) -> int:
    return -n % TAR_BLOCK


def sample_key(i: int) -> str:
    return f"{i:08d}"


# ----------------------------------------------------------------------------------------------- index files
_INDEX: dict[str, tuple[tuple[int, int], dict]] = {}


def read_index(root: str | Path) -> dict:
    """Parse ``root/shards.json`` (ShardError if missing or not a pack). Cached per file mtime and size (an
    ImageNet index lists 1.28M paths); callers must not modify the returned dict."""
    p = Path(root) / SHARDS_JSON
    try:
        st = p.stat()
        hit = _INDEX.get(str(p.resolve()))
        if hit is not None and hit[0] == (st.st_mtime_ns, st.st_size):
            return hit[1]
        d = json.loads(p.read_text())
    except FileNotFoundError:
        raise ShardError(f"no {SHARDS_JSON} in {root}: not a packed dataset") from None
    except (OSError, ValueError) as e:
        raise ShardError(f"cannot read {p}: {e}") from None
    if not isinstance(d, dict) or d.get("format") != FORMAT:
        raise ShardError(f"{p} is not a shard index (format {d.get('format') if isinstance(d, dict) else None!r})")
    if d.get("version") != VERSION:
        raise ShardError(f"{p}: unsupported pack version {d.get('version')} (this code reads {VERSION})")
    _INDEX[str(p.resolve())] = ((st.st_mtime_ns, st.st_size), d)
    return d


def split_entry(root: str | Path, split: str, index: dict | None = None) -> dict:
    """The finished split ``split`` of the pack at ``root``."""
    index = index if index is not None else read_index(root)
    splits = index.get("splits", {})
    if split not in splits:
        packed = ", ".join(sorted(splits)) or "none"
        raise ShardError(f"{Path(root) / SHARDS_JSON} holds no split '{split}' (packed: {packed})")
    e = splits[split]
    if not e.get("complete"):
        raise ShardError(f"split '{split}' of {root} is not completely packed: "
                         "re-run the same pack command to finish it")
    return e


def shard_manifest(root: str | Path, split: str, name: str | None = None) -> Manifest:
    """The manifest of split ``split`` of a pack (called by :func:`pipeline.data.manifest.build_manifest`).

    ``name`` defaults to the source dataset's name (also when ``build_manifest`` passed the pack directory's
    own name), so the default bank location of a pack is the one of its source folder.
    """
    root = Path(root)
    e = split_entry(root, split)
    if name is None or name == root.resolve().name:
        name = e.get("name") or root.resolve().name
    files = tuple(e["files"])
    labels = np.asarray(e["labels"], np.int32)
    if len(files) != len(labels) or len(files) != e.get("num_samples"):
        raise ShardError(f"{root / SHARDS_JSON}: split '{split}' lists {len(files)} files, {len(labels)} labels, "
                         f"num_samples {e.get('num_samples')}")
    m = Manifest(str(root), files, labels, tuple(e["classes"]), name, split, "shards",
                 canonical_transform(e.get("transform")))
    if m.fingerprint != e.get("fingerprint"):
        raise ShardError(f"{root / SHARDS_JSON}: split '{split}' fingerprint {str(e.get('fingerprint'))[:16]} does not "
                         f"match its files/labels/classes ({m.fingerprint[:16]}): the index was edited or is corrupt")
    return m


@dataclass
class MemberTable:
    """Where every sample's image member lives: shard position, data offset, size, crc32 (global index order)."""

    root: Path
    split: str
    shards: list[dict]          # shards.json records (tar, idx, table, first, count, size)
    firsts: list[int]
    shard_of: np.ndarray        # [N] int32
    offset: np.ndarray          # [N] int64 byte offset of the image data in its tar
    size: np.ndarray            # [N] int64
    crc32: np.ndarray           # [N] uint32
    ext: list[str]              # [N]

    def locate(self, i: int) -> tuple[dict, int, int, int]:
        k = int(self.shard_of[i])
        return self.shards[k], int(self.offset[i]), int(self.size[i]), int(self.crc32[i])

    def member_name(self, i: int) -> str:
        return f"{sample_key(i)}.{self.ext[i]}"


def read_shard_table(root: Path, rec: dict) -> dict:
    """One shard's member table (``<shard>.json``), checked against its shards.json record."""
    p = root / rec["table"]
    try:
        t = json.loads(p.read_text())
    except FileNotFoundError:
        raise ShardError(f"{rec['tar']}: member table {p.name} is missing (re-run pack to rebuild the shard)") from None
    except (OSError, ValueError) as e:
        raise ShardError(f"{rec['tar']}: cannot read member table {p.name}: {e}") from None
    m = t.get("members", {})
    n = rec["count"]
    if (t.get("first"), t.get("count"), t.get("size")) != (rec["first"], n, rec.get("size", t.get("size"))) or any(
            len(m.get(k, ())) != n for k in ("ext", "offset", "size", "crc32")):
        raise ShardError(f"{rec['tar']}: member table {p.name} does not match {SHARDS_JSON} "
                         f"(first/count/size {t.get('first')}/{t.get('count')}/{t.get('size')} vs "
                         f"{rec['first']}/{n}/{rec.get('size')})")
    return t


_TABLES: dict[tuple[str, str], tuple[tuple[int, int] | None, MemberTable]] = {}


def member_table(root: str | Path, split: str) -> MemberTable:
    """Load (and cache per shards.json mtime) the member table of a finished split."""
    root = Path(root)
    key = (str(root.resolve()), split)
    try:
        st = (root / SHARDS_JSON).stat()
        mtime = (st.st_mtime_ns, st.st_size)
    except OSError:
        mtime = None
    hit = _TABLES.get(key)
    if hit is not None and hit[0] == mtime:
        return hit[1]
    e = split_entry(root, split)
    n = int(e["num_samples"])
    shard_of = np.empty(n, np.int32)
    offset = np.empty(n, np.int64)
    size = np.empty(n, np.int64)
    crc = np.empty(n, np.uint32)
    ext: list[str] = [""] * n
    expect = 0
    for k, rec in enumerate(e["shards"]):
        if rec["first"] != expect:
            raise ShardError(f"{root / SHARDS_JSON}: shard {rec['tar']} starts at sample {rec['first']}, "
                             f"expected {expect}")
        t = read_shard_table(root, rec)
        a, b = rec["first"], rec["first"] + rec["count"]
        shard_of[a:b] = k
        offset[a:b] = t["members"]["offset"]
        size[a:b] = t["members"]["size"]
        crc[a:b] = np.asarray(t["members"]["crc32"], np.uint64).astype(np.uint32)
        ext[a:b] = t["members"]["ext"]
        expect = b
    if expect != n:
        raise ShardError(f"{root / SHARDS_JSON}: shards of split '{split}' hold {expect} samples, manifest has {n}")
    table = MemberTable(root, split, list(e["shards"]), [r["first"] for r in e["shards"]], shard_of, offset, size,
                        crc, ext)
    _TABLES[key] = (mtime, table)
    return table


class ShardFiles:
    """Open tar shards lazily (one fd each) and read checked members: ``read(i) -> bytes``."""

    def __init__(self, table: MemberTable):
        self.table = table
        self.fds: dict[int, int] = {}

    def _fd(self, k: int) -> int:
        fd = self.fds.get(k)
        if fd is None:
            rec = self.table.shards[k]
            p = self.table.root / rec["tar"]
            try:
                fd = os.open(p, os.O_RDONLY)
            except OSError as e:
                raise ShardError(f"cannot open shard {p}: {e.strerror}") from None
            actual = os.fstat(fd).st_size
            if actual != rec["size"]:
                os.close(fd)
                what = "truncated" if actual < rec["size"] else "longer than packed"
                raise ShardError(f"shard {p} is {actual} bytes, its index says {rec['size']} ({what}); "
                                 f"run python -m pipeline.data verify {self.table.root}")
            self.fds[k] = fd
        return fd

    def read(self, i: int) -> bytes:
        t = self.table
        if not 0 <= i < len(t.shard_of):
            raise ShardError(f"sample index {i} out of range for {t.root} split '{t.split}' "
                             f"({len(t.shard_of)} samples)")
        k = int(t.shard_of[i])
        rec, off, size, crc = t.locate(i)
        data = os.pread(self._fd(k), size, off)
        if len(data) != size:
            raise ShardError(f"shard {t.root / rec['tar']}: member {t.member_name(i)} (sample {i}) is truncated "
                             f"({len(data)} of {size} bytes)")
        if zlib.crc32(data) != crc:
            raise ShardError(f"shard {t.root / rec['tar']}: member {t.member_name(i)} (sample {i}) is corrupt "
                             f"(crc32 mismatch); run python -m pipeline.data verify {t.root}")
        return data

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


def read_sample(manifest: Manifest, i: int) -> bytes:
    """The checked encoded bytes of sample ``i`` of a ``shards`` manifest (for corrupt-file searches, tools)."""
    files = ShardFiles(member_table(manifest.root, manifest.split))
    try:
        return files.read(int(i))
    finally:
        files.close()


def describe_sample(manifest: Manifest, i: int) -> str:
    """``SHARDS/<shard>.tar member <key>.<ext> (<original relpath>)``: where sample ``i`` of a pack lives."""
    t = member_table(manifest.root, manifest.split)
    return f"{t.root / t.shards[int(t.shard_of[i])]['tar']} member {t.member_name(i)} ({manifest.files[i]})"


def peek(manifest: Manifest, i: int, head: int, tail: int) -> tuple[bytes, bytes]:
    """The first ``head`` and last ``tail`` bytes of sample ``i``'s image member (b"", b"" when unreadable)."""
    t = member_table(manifest.root, manifest.split)
    rec, off, size, _ = t.locate(int(i))
    try:
        fd = os.open(t.root / rec["tar"], os.O_RDONLY)
    except OSError:
        return b"", b""
    try:
        return os.pread(fd, min(head, size), off), os.pread(fd, min(tail, size), off + max(0, size - tail))
    finally:
        os.close(fd)


# ------------------------------------------------------------------------------------------------ DALI reader
class ShardSource:
    """``fn.external_source`` callable (batch mode): encoded images as uint8 arrays and [1] int32 indices,
    exactly in ``order``; after the end, batches repeat the last sample (like ``pad_last_batch=True``)."""

    def __init__(self, manifest: Manifest, order: np.ndarray, batch_size: int):
        self.order = np.asarray(order, np.int64)
        if len(self.order) == 0:
            raise UsageError("empty sample list")
        n = len(manifest)
        if self.order.min() < 0 or self.order.max() >= n:
            raise UsageError(f"sample indices out of range [0, {n}) for {manifest.root} split '{manifest.split}'")
        self.batch_size = batch_size
        self.files = ShardFiles(member_table(manifest.root, manifest.split))
        self.pos = 0

    def __call__(self) -> tuple[list[np.ndarray], list[np.ndarray]]:
        idx = self.order[self.pos:self.pos + self.batch_size]
        if len(idx) < self.batch_size:
            last = self.order[-1] if len(idx) == 0 else idx[-1]
            idx = np.concatenate([idx, np.full(self.batch_size - len(idx), last, np.int64)])
        self.pos += self.batch_size
        images = [np.frombuffer(self.files.read(int(i)), np.uint8) for i in idx]
        return images, [np.array([i], np.int32) for i in idx]


def shard_reader(manifest: Manifest, order: np.ndarray, name: str | None = None):
    """DALI graph fragment (inside a pipeline definition): ``(encoded images, index)`` of ``order``.

    The index output is int32 of shape [1] per sample, like ``readers.file`` labels. ``name`` is accepted for
    symmetry with the file reader but not used: a multi-output external source cannot be named.
    """
    from nvidia.dali import fn, types
    from nvidia.dali.pipeline import Pipeline

    pipe = Pipeline.current()
    if pipe is None:
        raise UsageError("shard_reader must be called inside a DALI pipeline definition")
    src = ShardSource(manifest, order, pipe.max_batch_size)
    images, index = fn.external_source(source=src, num_outputs=2, batch=True, dtype=[types.UINT8, types.INT32],
                                       ndim=[1, 1])
    return images, index


def webdataset_reader(root: str | Path, split: str, shard_ids: list[int] | None = None, name: str = "Reader"):
    """DALI graph fragment streaming whole shards with ``fn.readers.webdataset`` (sequential, no exact order):
    ``(encoded images, index)``. For tools and benchmarks; the stages use :func:`shard_reader`."""
    from nvidia.dali import fn, types

    root = Path(root)
    e = split_entry(root, split)
    recs = [e["shards"][k] for k in (shard_ids if shard_ids is not None else range(len(e["shards"])))]
    images, index = fn.readers.webdataset(
        paths=[str(root / r["tar"]) for r in recs], index_paths=[str(root / r["idx"]) for r in recs],
        ext=[WDS_IMAGE_EXT, "index"], dtypes=[types.UINT8, types.INT32], random_shuffle=False,
        pad_last_batch=True, name=name,
    )
    return images, index
