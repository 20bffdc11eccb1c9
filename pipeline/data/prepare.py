"""Dataset preparation (the seeds' ``mk_img_list`` + ``img2lmdb``, done as image lists and DALI-native tar shards).

- :func:`write_list`: ``<split>_list.txt`` (``relpath label``) + ``classes.txt`` from an ImageNet-style folder.
  Paths are relative to ROOT (``train/<class>/<file>``), like the manifest's files, so the file-list layout
  of ROOT has the same fingerprint as its folder layout. ``-o ROOT`` (the default) is the usual use: the
  file-list layout resolves paths relative to the directory holding the list, so lists written elsewhere
  must be moved into ROOT before a stage can read images through them.
- :func:`pack`: tar shards in webdataset layout + ``shards.json`` (format in :mod:`pipeline.data.shards`).
  Contiguous index ranges per shard, one shard per process task, each written to a temporary name and
  renamed, then its ``.idx`` and member table (the completion marker). Re-running the same command keeps
  finished shards (member table present, tar size as recorded) and rewrites the rest.
- :func:`verify`: every member's tar header, size, crc32, ``.cls``/``.index`` members and decodability
  (PIL), the ``.idx`` files, counts and the fingerprint; returns one line per problem naming shard and member.
"""

from __future__ import annotations

import io
import json
import logging
import multiprocessing
import os
import re
import struct
import tarfile
import time
import zlib
from pathlib import Path
from typing import Iterable

import numpy as np

from pipeline.data.layouts import (
    FileListLayout, ImageFolderLayout, build_manifest, image_format, layout_of, structural_problem,
)
from pipeline.data.manifest import Manifest, canonical_transform, transformed_fingerprint
from pipeline.data.shards import (
    FORMAT, IMAGE_EXTS, SHARDS_JSON, TAR_BLOCK, VERSION, ShardError, pad_block, read_index, read_shard_table,
    sample_key, shard_manifest,
)
from pipeline.errors import UsageError

log = logging.getLogger(__name__)

DEFAULT_QUALITY = 90
# Per sample: image header + data (padded) + .cls header + block + .index header + block.
_MEMBER_OVERHEAD = 5 * TAR_BLOCK
_END_OF_ARCHIVE = 2 * TAR_BLOCK


# --------------------------------------------------------------------------------------------------- list
def write_list(root: str | Path, split: str = "train", out: str | Path | None = None) -> dict:
    """Write ``out/<split>_list.txt`` and ``out/classes.txt`` from ``root/<split>/<class>/*``.

    Returns a summary with the folder fingerprint and whether the written list has the same one
    (False only when class names sort differently as path prefixes, e.g. ``a`` and ``a-b``).
    """
    root = Path(root)
    out = Path(out) if out is not None else root
    if not (root / split).is_dir():
        raise UsageError(f"{root / split} is not a folder: list reads ImageNet-style folders ROOT/{split}/<class>/*")
    name = root.resolve().name
    m = ImageFolderLayout().build(root, split, name)
    for f in m.files:
        if "\n" in f or "\r" in f or f != f.strip():
            raise UsageError(f"cannot list {f!r}: file names with newlines or surrounding spaces "
                             "do not fit a list file")
    out.mkdir(parents=True, exist_ok=True)
    classes_txt = "".join(c + "\n" for c in m.classes)
    cpath = out / "classes.txt"
    if cpath.is_file() and cpath.read_text() != classes_txt:
        raise UsageError(f"{cpath} lists other classes than {root / split} (written for another split?); "
                         "remove it or write to another directory")
    lpath = out / f"{split}_list.txt"
    _atomic_write(lpath, "".join(f"{f} {int(y)}\n" for f, y in zip(m.files, m.labels)).encode())
    if not cpath.is_file():
        _atomic_write(cpath, classes_txt.encode())
    listed = FileListLayout().build(out, split, name)
    same = listed.fingerprint == m.fingerprint
    if not same:
        log.warning("the file list of %s sorts samples differently from its folders (class names that are path "
                    "prefixes of each other); its fingerprint differs: banks are not interchangeable", root)
    if out.resolve() != root.resolve():
        log.warning("paths in %s are relative to %s: move the list files into %s to use them as a dataset",
                    lpath, root, root)
    return {"list": str(lpath), "classes": str(cpath), "num_samples": len(m), "num_classes": m.num_classes,
            "fingerprint": m.fingerprint, "same_fingerprint": same}


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# --------------------------------------------------------------------------------------------------- pack
def parse_size(s: str | int) -> int:
    """``"1GB"`` -> 10**9, ``"512MiB"`` -> 512 * 2**20, ``"1000"`` -> 1000 bytes."""
    if isinstance(s, int):
        return s
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmgt]?)(i?)b?\s*", str(s).lower())
    if not m:
        raise UsageError(f"cannot parse size '{s}': use e.g. 1GB, 500MB, 256MiB or a byte count")
    base = 1024 if m.group(3) else 1000
    n = int(float(m.group(1)) * base ** " kmgt".index(m.group(2) or " "))
    if n < 4 * TAR_BLOCK:
        raise UsageError(f"shard size {s} is too small")
    return n


def sniff_ext(data: bytes, rel: str) -> str:
    """Member extension from the content (DALI decodes by content; some ImageNet '.JPEG's are PNG/CMYK)."""
    fmt = image_format(data[:16])
    if fmt is not None:
        return {"jpeg": "jpg"}.get(fmt, fmt)
    ext = Path(rel).suffix.lower().lstrip(".")
    return {"jpeg": "jpg", "tif": "tiff"}.get(ext, ext if ext in IMAGE_EXTS else "jpg")


def _reencode(data: bytes, transform: dict, what: str) -> bytes:
    """Decode, apply EXIF orientation (as DALI's decoder does), RGB, shrink the shorter side, encode JPEG."""
    from PIL import Image, ImageOps

    try:
        with Image.open(io.BytesIO(data)) as im:
            im = ImageOps.exif_transpose(im).convert("RGB")
    except Exception as e:
        raise UsageError(f"cannot decode {what} for re-encoding: {e}") from None
    n = transform.get("resize_shorter")
    if n and min(im.size) > n:
        w, h = im.size
        s = n / min(w, h)
        im = im.resize((max(1, round(w * s)), max(1, round(h * s))), Image.BICUBIC)
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=transform["quality"])
    return buf.getvalue()


def _tar_header(name: str, size: int) -> bytes:
    ti = tarfile.TarInfo(name)
    ti.size, ti.mtime, ti.mode, ti.type, ti.uname, ti.gname = size, 0, 0o644, tarfile.REGTYPE, "", ""
    return ti.tobuf(tarfile.USTAR_FORMAT, "utf-8", "strict")


def shard_size_from_members(last_offset: int, last_size: int) -> int:
    return last_offset + last_size + pad_block(last_size) + _END_OF_ARCHIVE


def _write_shard(task: dict) -> dict:
    """Worker: write one shard (tar to a temp name, rename; then .idx; then the member table). Returns it."""
    out = Path(task["out"])
    src = Path(task["source"])
    transform = task["transform"]
    rec = task["rec"]
    first = rec["first"]
    tar_path = out / rec["tar"]
    tmp = out / f".{rec['tar']}.{os.getpid()}.tmp"
    members: dict[str, list] = {"ext": [], "offset": [], "size": [], "crc32": []}
    idx_lines: list[str] = []
    pos = 0
    src_bytes = 0
    try:
        with open(tmp, "wb", buffering=1 << 20) as f:
            for k, (rel, y) in enumerate(zip(task["files"], task["labels"])):
                i = first + k
                try:
                    data = (src / rel).read_bytes()
                except OSError as e:
                    raise UsageError(f"cannot read {src / rel} (sample {i}): {e.strerror}") from None
                src_bytes += len(data)
                if transform:
                    data = _reencode(data, transform, f"{src / rel} (sample {i})")
                ext = sniff_ext(data, rel)
                key = sample_key(i)
                line = []
                for e, payload in ((ext, data), ("cls", str(int(y)).encode()), ("index", struct.pack("<i", i))):
                    f.write(_tar_header(f"{key}.{e}", len(payload)))
                    pos += TAR_BLOCK
                    line.append(f"{e} {pos} {len(payload)} {key}.{e}")
                    if e == ext:
                        members["ext"].append(ext)
                        members["offset"].append(pos)
                        members["size"].append(len(payload))
                        members["crc32"].append(zlib.crc32(data))
                    f.write(payload)
                    f.write(b"\0" * pad_block(len(payload)))
                    pos += len(payload) + pad_block(len(payload))
                idx_lines.append(" ".join(line))
            f.write(b"\0" * _END_OF_ARCHIVE)
            pos += _END_OF_ARCHIVE
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, tar_path)
    finally:
        if tmp.exists():
            tmp.unlink()
    _atomic_write(out / rec["idx"], (f"v1.2 {len(idx_lines)}\n" + "\n".join(idx_lines) + "\n").encode())
    table = {"tar": rec["tar"], "first": first, "count": rec["count"], "size": pos, "source_bytes": src_bytes,
             "members": members}
    _atomic_write(out / rec["table"], json.dumps(table, separators=(",", ":")).encode())
    return table


def _plan(manifest: Manifest, limit: int, transform: dict | None, split: str) -> list[dict]:
    """Contiguous index ranges whose (estimated) tar size stays under ``limit`` (at least one sample each)."""
    root = Path(manifest.root)
    sizes = np.empty(len(manifest), np.int64)
    for i, f in enumerate(manifest.files):
        try:
            sizes[i] = os.stat(root / f).st_size
        except OSError as e:
            raise UsageError(f"cannot read {root / f} (sample {i}): {e.strerror}") from None
    if transform:  # estimate the re-encoded size from a deterministic sample of images
        probe = np.unique(np.linspace(0, len(manifest) - 1, min(32, len(manifest))).astype(int))
        out = sum(len(_reencode((root / manifest.files[i]).read_bytes(), transform, manifest.files[i])) for i in probe)
        sizes = (sizes * (out / max(1, int(sizes[probe].sum())))).astype(np.int64)
    est = sizes + (-sizes % TAR_BLOCK) + _MEMBER_OVERHEAD
    plan: list[dict] = []
    start, acc = 0, _END_OF_ARCHIVE
    for i, s in enumerate(est.tolist()):
        if acc + s > limit and i > start:
            plan.append(_shard_rec(split, len(plan), start, i - start))
            start, acc = i, _END_OF_ARCHIVE
        acc += s
    plan.append(_shard_rec(split, len(plan), start, len(manifest) - start))
    return plan


def _shard_rec(split: str, k: int, first: int, count: int) -> dict:
    stem = f"{split}-{k:06d}"
    return {"tar": f"{stem}.tar", "idx": f"{stem}.idx", "table": f"{stem}.json", "first": first, "count": count}


def _finished(out: Path, rec: dict) -> dict | None:
    """The member table of a finished shard (table written, tar of the recorded size, .idx present), else None."""
    try:
        t = json.loads((out / rec["table"]).read_text())
        ok = (t.get("first"), t.get("count")) == (rec["first"], rec["count"]) and \
            (out / rec["tar"]).stat().st_size == t["size"] and (out / rec["idx"]).is_file()
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return t if ok else None


def _update_index(out: Path, split: str, entry: dict | None) -> None:
    """Read-modify-write shards.json under a lock (several splits may be packed into one directory)."""
    from filelock import FileLock

    with FileLock(str(out / ".shards.json.lock")):
        p = out / SHARDS_JSON
        index = _fresh_index(out) if p.is_file() else {"format": FORMAT, "version": VERSION, "splits": {}}
        if entry is None:
            index["splits"].pop(split, None)
        else:
            index["splits"][split] = entry
        _atomic_write(p, json.dumps(index, separators=(",", ":")).encode())


def _fresh_index(out: Path) -> dict:
    """A private (uncached, mutable) copy of ``out/shards.json``, validated like :func:`read_index`."""
    read_index(out)
    return json.loads((out / SHARDS_JSON).read_text())


def _remove_split_files(out: Path, split: str) -> None:
    for p in out.iterdir():
        if re.fullmatch(rf"\.?{re.escape(split)}-\d{{6}}\.(tar|idx|json)(\.\d+\.tmp)?", p.name):
            p.unlink()


def pack(root: str | Path, out: str | Path, split: str = "train", shard_size: str | int = "1GB",
         resize_shorter: int | None = None, quality: int | None = None, workers: int | None = None,
         overwrite: bool = False, progress: bool = True) -> dict:
    """Pack split ``split`` of the dataset at ``root`` into tar shards under ``out`` (resumable). Returns a summary."""
    from filelock import FileLock, Timeout
    from tqdm import tqdm

    root, out = Path(root), Path(out)
    if (root / SHARDS_JSON).is_file():
        raise UsageError(f"{root} is already a pack")
    if not root.is_dir():
        raise UsageError(f"dataset root not found: {root}")
    if out.resolve() == root.resolve() or out.resolve().is_relative_to((root / split).resolve()):
        raise UsageError("write the shards outside the dataset root and its split folder (-o SHARDS)")
    if resize_shorter is not None and resize_shorter < 1 or quality is not None and not 1 <= quality <= 100:
        raise UsageError("--resize-shorter must be >= 1 and --quality in 1..100")
    workers = workers or os.cpu_count() or 1
    if workers < 1:
        raise UsageError("--workers must be >= 1")
    limit = parse_size(shard_size)
    manifest = build_manifest(root, split)
    if not layout_of(manifest).packable:
        raise UsageError(f"cannot pack the {manifest.layout} layout of {root}: pack reads image folders or file lists")
    transform = None
    if resize_shorter or quality:
        transform = {"format": "jpeg", "quality": quality or DEFAULT_QUALITY, "resize_shorter": resize_shorter,
                     "filter": "bicubic", "exif_transpose": True}
    out.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(out / f".{split}.pack.lock"))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise UsageError(f"another pack of split '{split}' is writing {out} (lock {lock.lock_file})") from None
    try:
        return _pack_locked(manifest, root, out, split, limit, transform, workers, overwrite, progress, tqdm)
    finally:
        lock.release()


def _pack_locked(manifest, root, out, split, limit, transform, workers, overwrite, progress, tqdm) -> dict:
    t0 = time.time()
    params = {"source_fingerprint": manifest.fingerprint, "transform": transform, "shard_size": limit}
    entry = None
    if (out / SHARDS_JSON).is_file():
        entry = _fresh_index(out).get("splits", {}).get(split)
    if entry is not None and {k: entry.get(k) for k in params} != params:
        if not overwrite:
            raise UsageError(f"{out} holds a different pack of split '{split}' (other source, transform or shard "
                             "size); use --overwrite to replace it or -o to write elsewhere")
        log.warning("replacing split '%s' in %s", split, out)
        _update_index(out, split, None)
        _remove_split_files(out, split)
        entry = None
    if entry is None:
        entry = {
            **params, "complete": False, "name": manifest.name, "source": str(root.resolve()),
            "source_layout": manifest.layout,
            "fingerprint": transformed_fingerprint(manifest.fingerprint, canonical_transform(transform)),
            "num_samples": len(manifest), "num_classes": manifest.num_classes, "classes": list(manifest.classes),
            "files": list(manifest.files), "labels": manifest.labels.tolist(),
            "shards": _plan(manifest, limit, transform, split),
        }
        _update_index(out, split, entry)
    for p in out.glob(f".{split}-*.tmp"):  # leftovers of a killed run
        p.unlink()
    tables: dict[int, dict] = {}
    todo = []
    for k, rec in enumerate(entry["shards"]):
        t = _finished(out, rec)
        if t is not None:
            tables[k] = t
        else:
            todo.append(k)
    kept = len(tables)
    if todo:
        log.info("packing %d of %d shards of %s/%s into %s (%d kept)", len(todo), len(entry["shards"]), root, split,
                 out, kept)
    tasks = [{"out": str(out), "source": str(root), "transform": transform, "rec": entry["shards"][k],
              "files": manifest.files[entry["shards"][k]["first"]:][:entry["shards"][k]["count"]],
              "labels": manifest.labels[entry["shards"][k]["first"]:][:entry["shards"][k]["count"]].tolist()}
             for k in todo]
    pbar = tqdm(total=len(manifest), initial=sum(t["count"] for t in tables.values()), unit="img",
                desc=f"pack {split}", disable=not progress, mininterval=1.0)
    written = 0
    by_tar = {rec["tar"]: k for k, rec in enumerate(entry["shards"])}
    for t in _run_tasks(_write_shard, tasks, workers):
        tables[by_tar[t["tar"]]] = t
        written += t["source_bytes"]
        pbar.update(t["count"])
    pbar.close()
    for k, rec in enumerate(entry["shards"]):
        rec["size"] = tables[k]["size"]
        rec["source_bytes"] = tables[k]["source_bytes"]
    entry["total_bytes"] = sum(r["size"] for r in entry["shards"])
    entry["complete"] = True
    _update_index(out, split, entry)
    dt = time.time() - t0
    return {"out": str(out), "split": split, "num_samples": len(manifest), "shards": len(entry["shards"]),
            "written_shards": len(todo), "kept_shards": kept, "bytes": entry["total_bytes"],
            "source_bytes_written": written, "seconds": dt, "fingerprint": entry["fingerprint"],
            "source_fingerprint": manifest.fingerprint}


def _run_tasks(fn, tasks: list, workers: int) -> Iterable:
    """fn over tasks, in-process for one worker, else a spawn pool (safe next to DALI/torch threads)."""
    if not tasks:
        return
    if workers == 1 or len(tasks) == 1:
        for t in tasks:
            yield fn(t)
        return
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(min(workers, len(tasks))) as pool:
        yield from pool.imap_unordered(fn, tasks, chunksize=1)


# ------------------------------------------------------------------------------------------------- verify
def _verify_shard(task: dict) -> tuple[str, list[str]]:
    """Check one shard fully; returns (tar name, problems). Stops listing after 20 problems per shard."""
    root = Path(task["root"])
    rec = task["rec"]
    tar = rec["tar"]
    try:
        t = read_shard_table(root, rec)
    except ShardError as e:
        return tar, [str(e)]
    try:
        fh = open(root / tar, "rb")
    except OSError as e:
        return tar, [f"{tar}: cannot open: {e.strerror}"]
    errs: list[str] = []
    with fh:
        actual = os.fstat(fh.fileno()).st_size
        if actual != rec["size"]:
            errs.append(f"{tar}: {actual} bytes, index says {rec['size']} "
                        f"({'truncated' if actual < rec['size'] else 'extra bytes'})")
        idx_lines: list[str] = []
        pos = 0
        for k in range(rec["count"]):
            if len(errs) >= 20:
                errs.append(f"{tar}: (more problems not listed)")
                break
            line, pos = _verify_sample(fh, task, t["members"], k, errs)
            idx_lines.append(line)
        if not errs:
            fh.seek(pos)
            if fh.read(_END_OF_ARCHIVE) != b"\0" * _END_OF_ARCHIVE:
                errs.append(f"{tar}: no end-of-archive blocks after the last member")
    try:
        want = f"v1.2 {rec['count']}\n" + "\n".join(idx_lines) + "\n"
        got = (root / rec["idx"]).read_text()
        if not errs and got != want:
            errs.append(f"{rec['idx']}: DALI index does not match {tar}")
    except OSError as e:
        errs.append(f"{rec['idx']}: cannot read: {e.strerror}")
    return tar, errs


def _verify_sample(fh, task: dict, m: dict, k: int, errs: list[str]) -> tuple[str, int]:
    """Check the three members of the shard's k-th sample (headers, sizes, crc32, ``.cls``, ``.index``, decode),
    appending problems to ``errs``. Returns (its DALI index line, '' when unreadable; the byte after it)."""
    rec, tar, labels = task["rec"], task["rec"]["tar"], task["labels"]
    i = rec["first"] + k
    key = sample_key(i)
    where = f"(sample {i}, {task['files'][k]})"
    pos = m["offset"][k] - TAR_BLOCK
    line, payloads = [], {}
    for e, size in ((m["ext"][k], m["size"][k]), ("cls", len(str(labels[k]))), ("index", 4)):
        name = f"{key}.{e}"
        fh.seek(pos)
        try:
            ti = tarfile.TarInfo.frombuf(fh.read(TAR_BLOCK), "utf-8", "surrogateescape")
        except tarfile.TarError as ex:
            errs.append(f"{tar}: member {name} {where}: bad tar header at byte {pos} ({ex or 'truncated'})")
            return "", pos
        if ti.name != name or ti.size != size:
            errs.append(f"{tar}: member {name} {where}: header at byte {pos} says {ti.name!r}, {ti.size} bytes")
            return "", pos
        data = fh.read(size)
        if len(data) != size:
            errs.append(f"{tar}: member {name} {where}: truncated ({len(data)} of {size} bytes)")
            return "", pos
        payloads[e] = data
        line.append(f"{e} {pos + TAR_BLOCK} {size} {name}")
        pos += TAR_BLOCK + size + pad_block(size)
    img, name = payloads[m["ext"][k]], f"{key}.{m['ext'][k]}"
    if zlib.crc32(img) != m["crc32"][k]:
        errs.append(f"{tar}: member {name} {where}: crc32 mismatch (bytes changed after packing)")
    if payloads["cls"] != str(labels[k]).encode():
        errs.append(f"{tar}: member {key}.cls {where}: {payloads['cls']!r} != label {labels[k]}")
    if struct.unpack("<i", payloads["index"])[0] != i:
        errs.append(f"{tar}: member {key}.index {where}: {struct.unpack('<i', payloads['index'])[0]} != {i}")
    reason, confirm = structural_problem(img[:16], img[-12:])
    if reason is not None and not confirm:  # a GIF or a non-image: DALI cannot decode it whatever PIL says
        errs.append(f"{tar}: member {name} {where}: {reason}")
    elif task["decode"]:
        from PIL import Image

        try:
            with Image.open(io.BytesIO(img)) as im:
                im.load()
        except Exception as ex:
            errs.append(f"{tar}: member {name} {where}: does not decode ({' '.join(str(ex).split())[:120]})")
    return " ".join(line), pos


def verify(root: str | Path, splits: list[str] | None = None, decode: bool = True, source: str | Path | None = None,
           workers: int = 1, progress: bool = False) -> tuple[list[str], dict]:
    """Check a pack. Returns (problems, summary); no problems means every member is intact."""
    from tqdm import tqdm

    root = Path(root)
    if not (root / SHARDS_JSON).is_file():
        raise UsageError(f"no {SHARDS_JSON} in {root}: not a packed dataset")
    try:
        index = read_index(root)
    except ShardError as e:
        return [str(e)], {}
    errs: list[str] = []
    summary: dict = {}
    names = splits or sorted(index.get("splits", {}))
    if not names:
        return [f"{root / SHARDS_JSON} holds no splits"], {}
    for split in names:
        entry = index.get("splits", {}).get(split)
        if entry is None:
            errs.append(f"{root / SHARDS_JSON}: no split '{split}'")
            continue
        if not entry.get("complete"):
            errs.append(f"split '{split}': pack not finished (re-run the pack command)")
            continue
        try:
            m = shard_manifest(root, split)
        except ShardError as e:
            errs.append(str(e))
            continue
        counted = sum(r["count"] for r in entry["shards"])
        if counted != len(m) or [r["first"] for r in entry["shards"]] != \
                list(np.cumsum([0] + [r["count"] for r in entry["shards"]])[:-1]):
            errs.append(f"split '{split}': shards hold {counted} samples in non-contiguous ranges or != {len(m)}")
            continue
        if source is not None:
            src = build_manifest(source, split)
            if src.fingerprint != entry.get("source_fingerprint"):
                errs.append(f"split '{split}': source {source} has fingerprint {src.fingerprint[:16]}, "
                            f"the pack was made from {str(entry.get('source_fingerprint'))[:16]}")
        tasks = [{"root": str(root), "rec": r, "decode": decode, "files": m.files[r["first"]:][:r["count"]],
                  "labels": m.labels[r["first"]:][:r["count"]].tolist()} for r in entry["shards"]]
        pbar = tqdm(total=len(tasks), unit="shard", desc=f"verify {split}", disable=not progress)
        for _, e in _run_tasks(_verify_shard, tasks, workers):
            errs.extend(e)
            pbar.update(1)
        pbar.close()
        summary[split] = {"num_samples": len(m), "shards": len(entry["shards"]), "fingerprint": m.fingerprint,
                          "transform": entry.get("transform")}
    return errs, summary
