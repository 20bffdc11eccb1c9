"""Reading a label bank: open, validate against a dataset, load into memory, verify every chunk.

Stage 2 loads the bank into memory once, in its own format (:mod:`pipeline.bank.resident`, through the checked
reads here), and gathers by index: per-batch random zarr reads run at ~5k rows/s, an in-memory gather at ~1M
rows/s (docs/DESIGN.md, "Measured facts"). :meth:`LabelBank.read_logits` / :meth:`LabelBank.load` reconstruct
dense logits of any format (tools, verify).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zarr

from pipeline import storage
from pipeline.bank.schema import ARRAYS, FORMATS, SCHEMA_VERSION
from pipeline.errors import BankError, NotABankError

log = logging.getLogger(__name__)


def damaged(path: str, what: str) -> BankError:
    """The error for a damaged bank (one place for its wording): ``what`` is wrong, and the fix. A dump reuses a
    complete bank of its key, so the fix removes the bank first (``dump_logits --overwrite`` also replaces a
    complete bank with missing chunk files, but not one whose chunks fail their checksums)."""
    return BankError(f"label bank {path} is damaged: {what}; run python -m pipeline.labels verify {path}, then "
                     "remove the bank and dump it again")


def open_group(path: str | Path, mode: str = "r") -> zarr.Group:
    """Open a zarr group at a local path or fsspec URL; a missing or non-zarr path is a BankError."""
    if not storage.is_url(path) and not Path(path).exists():
        raise NotABankError(f"label bank not found: {path}")
    try:
        return storage.open_zarr_group(path, mode)
    except zarr.errors.GroupNotFoundError:
        raise NotABankError(f"{path} is not a label bank (no zarr group there): give the --out folder of a "
                        "python -m pipeline.dump_logits run") from None
    except Exception as e:
        raise BankError(f"cannot open label bank {path}: {type(e).__name__}: {' '.join(str(e).split())[:200]}") from None


class LabelBank:
    """A read view of a bank. ``logits`` are raw (temperature is applied by the losses)."""

    def __init__(self, path: str | Path):
        self.path = str(path)
        self.group = open_group(path, "r")
        self.attrs: dict[str, Any] = dict(self.group.attrs)
        version = self.attrs.get("schema_version")
        if version is None:
            raise NotABankError(f"{path} is not a label bank (no schema_version attr)")
        if version != SCHEMA_VERSION:
            raise BankError(f"{path}: unknown schema_version {version!r} (this version reads {SCHEMA_VERSION})")
        self.format = self.attrs.get("format", "dense")
        if self.format not in FORMATS:
            raise BankError(f"label bank {path} has unknown format {self.format!r} (this version reads "
                            f"{', '.join(FORMATS)})")
        if self.format == "topk" and "target_logprob" not in self.attrs.get("compact_arrays", []):
            src = (self.attrs.get("sources") or [{}])[0].get("path", "SRC")
            raise BankError(f"label bank {path} is a top-k bank of an older layout (no target_logprob): rebuild it "
                            f"with python -m pipeline.labels compact {src} -o OUT --topk {self.attrs.get('topk', 'K')}")

    # --- shape -------------------------------------------------------------------------------------------
    @property
    def shape(self) -> tuple[int, int, int, int]:
        """(N, T, V, C)."""
        return tuple(self.attrs["shape"])  # type: ignore[return-value]

    @property
    def num_samples(self) -> int:
        return self.shape[0]

    @property
    def num_teachers(self) -> int:
        return self.shape[1]

    @property
    def num_views(self) -> int:
        return self.shape[2]

    @property
    def num_classes(self) -> int:
        return self.shape[3]

    @property
    def rows_per_chunk(self) -> int:
        """Rows per chunk of every per-row array (attrs; the ``labels`` array's chunking if attrs lack it)."""
        r = self.attrs.get("rows_per_chunk")
        return int(r) if r else int(self.group["labels"].chunks[0])

    @property
    def complete(self) -> bool:
        return bool(self.attrs.get("complete", False))

    @property
    def teachers(self) -> list[dict[str, Any]]:
        return list(self.attrs.get("teachers", []))

    # --- checks ------------------------------------------------------------------------------------------
    def require_complete(self) -> None:
        if not self.complete:
            raise BankError(f"label bank {self.path} is incomplete (field 'complete' is false): finish the dump first")

    def validate(self, manifest) -> None:
        """Refuse a bank that does not describe ``manifest`` exactly; the error names the field."""
        self.require_complete()
        ds = self.attrs.get("dataset", {})
        want = manifest.describe()
        for field in ("num_samples", "num_classes", "classes", "fingerprint"):
            if ds.get(field) != want[field]:
                got, exp = ds.get(field), want[field]
                if field == "classes":
                    got, exp = f"{len(got or [])} names", f"{len(exp)} names (first difference at "
                    diff = next((i for i, (a, b) in enumerate(zip(ds.get(field) or [], want[field])) if a != b), None)
                    exp += f"{diff})" if diff is not None else "end)"
                made_on = f"{(self.attrs.get('config') or {}).get('data') or ds.get('name', '?')} ({ds.get('split', '?')})"
                raise BankError(
                    f"label bank {self.path} does not match the dataset: field '{field}' is {got} in the bank, "
                    f"{exp} in {manifest.root} ({manifest.split}); the bank was dumped from {made_on}: give that "
                    f"--data, or dump a bank of this dataset"
                )

    # --- data --------------------------------------------------------------------------------------------
    def labels(self) -> np.ndarray:
        return self._read_whole("labels")

    def skipped(self) -> np.ndarray:
        return self._read_whole("skipped") if "skipped" in self.group else np.zeros(self.num_samples, bool)

    def views(self) -> np.ndarray:
        return self._read_whole("views")

    def _read_whole(self, name: str) -> np.ndarray:
        """A whole (small) array; a missing array or an unreadable chunk is a BankError naming it."""
        if name not in self.group:
            raise damaged(self.path, f"array '{name}' is missing")
        arr = self.group[name]
        try:
            return np.asarray(arr[:])
        except Exception as e:  # checksum mismatch, truncated chunk: find the chunk to name it
            step = arr.chunks[0]
            bad = next((j for j, s in enumerate(range(0, arr.shape[0], step)) if not _readable(arr, s, s + step)), "?")
            raise damaged(self.path, f"array '{name}' chunk {bad} unreadable "
                            f"({type(e).__name__})") from None

    def _check_readable(self, name: str) -> None:
        """Every chunk of ``name`` decodes (read chunk by chunk, nothing kept); BankError naming the first that
        does not."""
        if name not in self.group:
            raise damaged(self.path, f"array '{name}' is missing")
        arr = self.group[name]
        step = arr.chunks[0]
        for j, s in enumerate(range(0, arr.shape[0], step)):
            if not _readable(arr, s, s + step):
                raise damaged(self.path, f"array '{name}' chunk {j} unreadable")

    def read_logits(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Dense logits rows [start, stop) as [n, T, V, C] (compact formats reconstructed; a label map: the mean
        of its cells, [n, T, 1, C])."""
        stop = self.num_samples if stop is None else stop
        if self.format == "dense":
            return np.asarray(self.group["logits"][start:stop])
        if self.format == "labelmap":
            from pipeline.bank.labelmap import read_maps

            return read_maps(self.group, start, stop).mean(axis=(2, 3))[:, :, None, :]
        from pipeline.bank.compact import reconstruct  # bank-tools issue

        return reconstruct(self, start, stop)

    @property
    def feature_meta(self) -> dict[str, Any] | None:
        """``attrs["features"]`` (format, per-teacher dims, arrays) of a bank that stores embeddings, else None."""
        return self.attrs.get("features")

    def read_features(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Embeddings of rows [start, stop) as [n, T, V, D] float32 (BankError when the bank stores none)."""
        from pipeline.bank.features import decode_features

        meta = self.feature_meta
        if not meta:
            raise BankError(f"label bank {self.path} stores no embeddings: dump it with --features")
        stop = self.num_samples if stop is None else stop
        return decode_features({name: self.read_rows(name, start, stop) for name in meta["arrays"]}, meta["format"])

    @property
    def payload_arrays(self) -> list[str]:
        """The arrays that hold the labels: ``["logits"]`` or the compact arrays."""
        if self.format == "labelmap":
            return list(self.attrs["label_map"]["arrays"])
        return ["logits"] if self.format == "dense" else list(self.attrs.get("compact_arrays", []))

    def check_row_arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """(labels [N], skipped [N]) after refusing a damaged ``labels``, ``views``, ``skipped`` or ``done`` array
        (stage 2 takes true classes from the manifest, and views only when replaying them, but a damaged one of
        these is a damaged bank) and a missing payload array."""
        skipped = self.skipped()
        labels = self.labels()
        self._check_readable("views")
        missing = np.flatnonzero(labels < 0)  # a missing labels chunk reads back as the fill value -1
        if len(missing):
            chunk = int(missing[0]) // max(1, self.rows_per_chunk)
            lost = "" if _chunk_exists(self.group, "labels", (chunk,)) else f" (its chunk file {chunk} is missing)"
            raise damaged(self.path, f"array 'labels' has no value in rows {missing[:5].tolist()}{lost}")
        if "done" in self.group:
            undone = np.flatnonzero(~self._read_whole("done").astype(bool))
            if len(undone):
                raise damaged(self.path, f"array 'done' marks chunks {undone[:5].tolist()} not done")
        for name in self.payload_arrays:
            if name not in self.group:
                raise damaged(self.path, f"array '{name}' of its format ({self.format}) is missing")
        return labels, skipped

    def read_rows(self, name: str, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) of array ``name``; an unreadable chunk is a BankError naming it."""
        try:
            return np.asarray(self.group[name][start:stop])
        except Exception as e:  # checksum mismatch, truncated chunk, ...: never train on a damaged bank
            step = max(1, self.rows_per_chunk)
            raise damaged(self.path, f"array '{name}' rows {start}-{stop - 1} (chunk "
                            f"{start // step}) unreadable ({type(e).__name__})") from None

    def refuse_bad_rows(self, bad: np.ndarray, start: int, what: str = "logits") -> None:
        """BankError when ``bad`` [r] (rows of a chunk starting at ``start`` that are not finite, or hold a fill
        value, and are not skipped) has any True: a missing chunk file reads back as its fill value."""
        if bad.any():
            chunk = start // max(1, self.rows_per_chunk)
            rows = (start + np.flatnonzero(bad)[:5]).tolist()
            for name in what.split("/"):  # a lost chunk file reads back as fill values: name the cause
                if name in self.group and not _chunk_exists(self.group, name, (chunk, *(0,) * (self.group[name].ndim - 1))):
                    raise damaged(self.path, f"array '{name}' chunk file {chunk} (rows {start}-{start + len(bad) - 1}) is missing")
            raise damaged(self.path, f"non-finite {what} in rows {rows} (chunk {chunk})")

    def missing_row_chunks(self, name: str) -> list[int]:
        """Row chunks of ``name`` whose chunk file is not stored (for arrays whose fill value is a valid value,
        such as int8 ``q``: zarr would silently return the fill)."""
        arr = self.group[name]
        rest = (0,) * (arr.ndim - 1)
        return [j for j in range(math.ceil(arr.shape[0] / arr.chunks[0]))
                if not _chunk_exists(self.group, name, (j, *rest))]

    def load(self, dtype: torch.dtype = torch.float16) -> torch.Tensor:
        """The whole bank in memory, dense: [N, T, V, C] tensor, read chunk by chunk (compact formats
        reconstructed). Stage 2 holds banks through :mod:`pipeline.bank.resident` instead (compact stays compact)."""
        n = self.num_samples
        out = torch.empty(self.shape, dtype=dtype)
        step = max(1, self.rows_per_chunk)
        _, skipped = self.check_row_arrays()
        name = "/".join(self.payload_arrays)
        for s in range(0, n, step):
            try:
                rows = self.read_logits(s, min(n, s + step))
            except BankError:
                raise
            except Exception as e:  # checksum mismatch, truncated chunk, ...: never train on a damaged bank
                raise damaged(self.path, f"array '{name}' rows {s}-{min(n, s + step) - 1} (chunk "
                                f"{s // step}) unreadable ({type(e).__name__})") from None
            self.refuse_bad_rows(~np.isfinite(rows.reshape(len(rows), -1)).all(axis=1) & ~skipped[s:s + len(rows)], s)
            out[s:s + step] = torch.from_numpy(np.ascontiguousarray(rows))
        return out


def _readable(arr: zarr.Array, start: int, stop: int) -> bool:
    try:
        arr[start:stop]
        return True
    except Exception:
        return False


def _chunk_keys(arr: zarr.Array) -> list[tuple[int, ...]]:
    grid = [math.ceil(s / c) for s, c in zip(arr.shape, arr.chunks)]
    return [tuple(int(x) for x in idx) for idx in np.ndindex(*grid)]


def _extra_arrays(bank: "LabelBank") -> list[str]:
    """The arrays a bank of this format and policy holds beyond :data:`ARRAYS` (every chunk of each is written)."""
    extra = [*bank.attrs.get("compact_arrays", []), "chunk_sums"] if bank.format not in ("dense", "labelmap") else []
    if bank.attrs.get("metric_sums"):  # a dense dump's per-chunk teacher metric states
        extra = ["metric_sums"]
    if bank.format == "labelmap":  # label maps: the map arrays and image sizes (pipeline/bank/labelmap.py)
        extra = [*bank.attrs["label_map"]["arrays"], "image_size"]
    extra += list((bank.feature_meta or {}).get("arrays", []))
    if bank.attrs.get("views", {}).get("params_columns"):  # an augmenting view policy's parameters and partners
        extra += ["view_params", "view_partner"]
    return extra


def missing_chunk_files(bank: "LabelBank") -> dict[str, list[str]]:
    """Per array of a complete bank whose every chunk is written (the payload, ``labels``, ``views`` and the
    format's own arrays), the keys (``"3/0/0/0"``) of chunk files not stored: a cheap damage check (one existence
    test per chunk, no decoding; :func:`verify_bank` also decodes and checksums). ``{}`` for a healthy or an
    incomplete bank (whose unwritten chunks are expected)."""
    if not bank.complete:
        return {}
    payload = ["logits"] if bank.format == "dense" else []  # compact and map payloads are in _extra_arrays
    lost = {name: _missing_keys(bank.group, name) for name in (*payload, "labels", "views", *_extra_arrays(bank))}
    return {name: keys for name, keys in lost.items() if keys}


def _missing_keys(g: zarr.Group, name: str) -> list[str]:
    """Keys (``"3/0/0/0"``) of the chunk files of ``g[name]`` not stored; [] for an array ``g`` lacks."""
    if name not in g:
        return []
    return ["/".join(map(str, idx)) for idx in _chunk_keys(g[name]) if not _chunk_exists(g, name, idx)]


def verify_bank(path: str | Path) -> list[str]:
    """Read every chunk of every array; return the problems found (empty list = healthy).

    Checks: schema version, shapes against attrs, every logits/labels/views chunk (and view_params/view_partner
    of an augmenting view policy) present and passing its CRC32C checksum, every row chunk marked done, the complete flag, labels in range, no non-finite logits
    outside skipped rows.

    Raises :class:`~pipeline.errors.NotABankError` when ``path`` holds no bank (missing, or a folder a dump did not
    write): nothing there is damaged, and removing it would be the wrong fix.
    """
    problems: list[str] = []
    try:
        bank = LabelBank(path)
    except NotABankError:
        raise
    except BankError as e:
        return [str(e)]
    g = bank.group
    n, t, v, c = bank.shape
    expected = {"logits": (n, t, v, c), "labels": (n,), "views": (n, v, 5), "skipped": (n,)}
    if bank.format != "dense":
        expected.pop("logits")
    extra = _extra_arrays(bank)
    num_params = len(bank.attrs.get("views", {}).get("params_columns", []))
    if num_params:
        expected.update(view_params=(n, v, num_params), view_partner=(n, v))
    for name in (*ARRAYS, *extra):
        if name not in g:
            if name == "logits" and bank.format != "dense":
                continue
            problems.append(f"array '{name}' is missing")
            continue
        arr = g[name]
        if name in expected and tuple(arr.shape) != expected[name]:
            problems.append(f"array '{name}' has shape {tuple(arr.shape)}, attrs say {expected[name]}")
            continue
        required = name in ("logits", "labels", "views") or name in extra
        for idx in _chunk_keys(arr):
            sl = tuple(slice(i * ch, min((i + 1) * ch, s)) for i, ch, s in zip(idx, arr.chunks, arr.shape))
            key = "/".join(map(str, idx))
            try:
                if required and not _chunk_exists(g, name, idx):
                    problems.append(f"array '{name}' chunk {key} is missing")
                    continue
                arr[sl]
            except Exception as e:
                problems.append(f"array '{name}' chunk {key} is corrupt: {type(e).__name__}: {' '.join(str(e).split())[:120]}")
    if "done" in g and "done" not in [p.split("'")[1] for p in problems if "'" in p]:
        try:
            done = np.asarray(g["done"][:])
            if not done.all():
                problems.append(f"chunks not done: {np.flatnonzero(~done).tolist()[:20]}")
        except Exception:
            pass
    if not bank.complete:
        problems.append("bank is not marked complete")
    if not problems:
        labels = bank.labels()
        if labels.min(initial=0) < 0 or labels.max(initial=0) >= c:
            problems.append("labels out of range")
        skipped = bank.skipped()
        step = bank.rows_per_chunk
        for s in range(0, n, step):
            rows = bank.read_logits(s, min(n, s + step))
            bad = ~np.isfinite(rows.reshape(len(rows), -1)).all(axis=1) & ~skipped[s:s + len(rows)]
            if bad.any():
                problems.append(f"non-finite logits in rows {(s + np.flatnonzero(bad)).tolist()[:10]}")
                break
    return problems


def require_chunks(bank: "LabelBank", names: list[str] | tuple[str, ...]) -> None:
    """BankError (one line, naming ``labels verify``) unless every chunk file of the arrays ``names`` of ``bank`` is
    stored. A lost chunk reads back as the array's fill value (NaN boxes and parameters, partner -1 = "not
    mixed", NaN logits), which the readers would otherwise take for data. Checks existence only (one listing per
    chunk, no decoding); arrays the bank does not have are skipped."""
    for name in names:
        keys = _missing_keys(bank.group, name)
        if keys:
            raise damaged(bank.path, f"array '{name}' chunk file {keys[0]} is missing")


def _chunk_exists(g: zarr.Group, name: str, idx: tuple[int, ...]) -> bool:
    """Whether the chunk file of ``g[name]`` at grid ``idx`` is stored (zarr silently returns fill values otherwise)."""
    import asyncio

    arr = g[name]
    key = f"{name}/" + arr.metadata.encode_chunk_key(idx)
    store = g.store_path.store
    prefix = g.store_path.path
    full = f"{prefix}/{key}" if prefix else key
    return bool(asyncio.run(store.exists(full)))


def class_index(attrs: dict) -> list[list[int]]:
    """Per teacher, the teacher output that feeds each dataset class: ``class_index`` as dumps record it, else
    (older banks) from ``class_maps`` (null = one to one)."""
    t, c = attrs["shape"][1], attrs["shape"][3]
    if attrs.get("class_index"):
        return [list(m) for m in attrs["class_index"]]
    maps = attrs.get("class_maps") or [None] * t
    return [list(m) if m is not None else list(range(c)) for m in maps]


def teacher_preprocessing(attrs: dict) -> list[dict]:
    """Per teacher, its preprocessing record (``per_teacher`` when the teachers' differ) and, for banks that record
    it, where it came from (``source``)."""
    pre = attrs.get("preprocessing") or {}
    t = attrs["shape"][1]
    records = pre.get("per_teacher") or [{k: v for k, v in pre.items() if k != "per_teacher"}] * t
    sources = attrs.get("preprocessing_source") or [None] * t
    return [{**r, **({"source": src} if src else {})} for r, src in zip(records, sources)]
