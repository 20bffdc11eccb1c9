"""Writing a label bank chunk by chunk, resumably.

A chunk's data arrays are written first and its ``done`` flag last, so a crash at any point leaves either
a finished chunk or one that the next run rewrites. Each writer (rank) owns whole row chunks. The
``complete`` attr is set once, by rank 0, after every chunk is done; a complete bank is read-only.
"""

from __future__ import annotations

import datetime as _dt
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from pipeline import __version__
from pipeline import storage
from pipeline.bank.schema import SCHEMA_VERSION, create_bank_arrays
from pipeline.errors import BankError

log = logging.getLogger(__name__)

_WRITE_ALL = {"array.write_empty_chunks": True}


def create_bank(path: str | Path, attrs: dict[str, Any], shape: tuple[int, int, int, int], dtype: str,
                rows_per_chunk: int) -> zarr.Group:
    """Create an empty, incomplete bank at ``path`` with ``attrs`` (shape, chunking, version added)."""
    n, t, v, c = shape
    # Local paths: build the bank aside and rename it into place, so that a kill during creation never leaves
    # a bank without its attrs (which a rerun would refuse as "a different bank"). URL stores are created in place.
    local = not storage.is_url(path)
    build: str | Path = path
    if local:
        build = Path(path).with_name(f".{Path(path).name}.creating-{os.getpid()}")
        for stale in Path(path).parent.glob(f".{Path(path).name}.creating-*"):  # left by a killed creator
            storage.remove(stale)
    g = zarr.open_group(str(build), mode="w", storage_options=storage.storage_options(path))
    create_bank_arrays(g, n, t, v, c, dtype, rows_per_chunk)
    full = {
        **attrs,
        "schema_version": SCHEMA_VERSION,
        "format": "dense",
        "shape": [n, t, v, c],
        "dtype": dtype,
        "rows_per_chunk": int(g["logits"].chunks[0]),
        "complete": False,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "package_version": __version__,
    }
    g.attrs.update(full)
    if not local:
        return g
    storage.remove(path)  # mode "w": replace what is there
    storage.rename(build, path)
    return zarr.open_group(str(path), mode="r+")


def done_flags(g: zarr.Group) -> np.ndarray:
    """Per-chunk done flags; an unreadable flag (killed mid-write) counts as not done."""
    arr = g["done"]
    try:
        return np.asarray(arr[:], dtype=bool)
    except Exception:
        out = np.zeros(arr.shape[0], bool)
        for j in range(arr.shape[0]):
            try:
                out[j] = bool(arr[j])
            except Exception:
                out[j] = False
        return out


def write_chunk(g: zarr.Group, j: int, logits: np.ndarray, labels: np.ndarray, views: np.ndarray,
                skipped: np.ndarray) -> None:
    """Write row chunk ``j`` (logits [r, T, V, C], labels [r], views [r, V, 5], skipped [r]), then mark it done."""
    r = g["logits"].chunks[0]
    s = j * r
    e = s + len(labels)
    if e > g["logits"].shape[0] or (e - s != r and e != g["logits"].shape[0]):
        raise BankError(f"chunk {j} write of {len(labels)} rows does not fit the bank layout")
    with zarr.config.set(_WRITE_ALL):
        g["logits"][s:e] = logits.astype(g["logits"].dtype, copy=False)
        g["labels"][s:e] = labels.astype(np.int32, copy=False)
        g["views"][s:e] = views.astype(np.float32, copy=False)
        g["skipped"][s:e] = skipped.astype(bool, copy=False)
        g["done"][j] = True


def mark_complete(g: zarr.Group, extra: dict[str, Any]) -> None:
    """Set the final attrs (teacher metrics, ...) and ``complete = True`` in one attrs write."""
    done = done_flags(g)
    if not done.all():
        raise BankError(f"cannot mark bank complete: chunks {np.flatnonzero(~done).tolist()[:10]} are not done")
    g.attrs.update({**extra, "complete": True})
