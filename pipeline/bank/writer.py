"""Writing a label bank chunk by chunk, resumably, dense, compact or label maps.

A chunk's data arrays are written first and its ``done`` flag last, so a crash at any point leaves either
a finished chunk or one that the next run rewrites. Each writer (rank) owns whole row chunks. The
``complete`` attr is set once, by rank 0, after every chunk is done; a complete bank is read-only.

:func:`write_rows` writes one chunk as already encoded (the dump's background writer: stage 1's encoders,
``stage1_teacher_logits/encoders.py``, encode each batch on the teachers' device) with its per-chunk arrays
(``chunk_sums[j]``), view parameters and partners, and the format's extra per-row arrays, the done flag last.
:func:`write_chunk` takes a chunk's logits instead and encodes them first (tools, tests, benches): a compact bank
(``topk`` / ``sampled`` / ``int8``) rounds them to the bank dtype (what a dense bank would store) and encodes them
(:func:`pipeline.bank.compact.encode_chunk`, shared with ``labels compact``) with the chunk's fidelity/metric sums;
a map bank encodes its cells (:func:`pipeline.bank.labelmap.encode_chunk`). No dense array is ever written for
them."""

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
from pipeline.bank import compact as cp
from pipeline.bank import features as fe
from pipeline.bank.labelmap import encode_chunk as encode_map_chunk
from pipeline.bank.schema import (SCHEMA_VERSION, TAIL_TEMPERATURES, TOPK_TAILS, compact_array_specs, compressors,
                                  create_bank_arrays)
from pipeline.errors import BankError

log = logging.getLogger(__name__)

_WRITE_ALL = {"array.write_empty_chunks": True}


def format_attrs(fmt: str, shape: tuple[int, int, int, int], k: int | None = None, samples: int | None = None,
                 sample_seed: int = 0, metric_sums: bool = False) -> dict[str, Any]:
    """The attrs that describe a bank's format: ``format`` and, for compact banks, ``compact_arrays``, ``topk``,
    ``tail`` and ``tail_temperatures`` (top-k, sampled), ``samples`` and ``sample_seed`` (sampled),
    ``chunk_sums_layout`` and ``raw_bytes_per_vector``; a dense bank with ``metric_sums``: ``metric_sums: true``
    (its per-chunk teacher metric states, :func:`pipeline.bank.schema.create_bank_arrays`)."""
    if fmt in ("dense", "labelmap"):
        return {"format": fmt, **({"metric_sums": True} if metric_sums and fmt == "dense" else {})}
    out: dict[str, Any] = {"format": fmt, "compact_arrays": list(compact_array_specs(fmt, shape, k, samples)),
                           "chunk_sums_layout": {n: list(v) for n, v in cp.sums_layout(shape[1]).items()},
                           "raw_bytes_per_vector": cp.raw_bytes_per_vector(fmt, shape[3], k, samples)}
    if fmt in ("topk", "sampled"):
        out.update({"topk": int(k), "tail": TOPK_TAILS[0], "tail_temperatures": list(TAIL_TEMPERATURES)})
    if fmt == "sampled":
        out.update({"samples": int(samples), "sample_seed": int(sample_seed)})
    return out


def create_bank(path: str | Path, attrs: dict[str, Any], shape: tuple[int, int, int, int], dtype: str,
                rows_per_chunk: int, fmt: str = "dense", k: int | None = None,
                feature_dims: list[int] | None = None, samples: int | None = None, sample_seed: int = 0,
                label_map: dict[str, Any] | None = None, metric_sums: bool = False) -> zarr.Group:
    """Create an empty, incomplete bank at ``path`` with ``attrs`` (shape, format, chunking, version added).

    ``dtype``: the logits dtype (dense: stored; compact: what the logits are rounded to before encoding).
    ``fmt``/``k``/``samples``/``sample_seed``: ``dense``, ``topk`` with K, ``sampled`` with K, S and a seed, or
    ``int8``. ``feature_dims``: the teachers' embedding widths
    when the bank stores embeddings (:mod:`pipeline.bank.features`). ``label_map``: a map bank's
    ``attrs["label_map"]`` (``fmt`` ``labelmap``, :mod:`pipeline.bank.labelmap`). ``metric_sums`` (dense, the
    dump): a ``metric_sums`` array [n_chunks, E·49] for the teachers' metric states of each chunk, summed by the
    dump's writer (:func:`metric_sums_attrs`) instead of reading the bank back.
    """
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
    num_params = len(attrs.get("views", {}).get("params_columns", []))
    width = cp.sums_width(t) if fmt not in ("dense", "labelmap") else (cp.metric_width(t) if metric_sums else 0)
    create_bank_arrays(g, n, t, v, c, dtype, rows_per_chunk, fmt, k, width, samples, num_params, label_map)
    feats: dict[str, Any] = {}
    if feature_dims:
        ffmt = fe.feature_format(fmt, dtype)
        r = int(g["labels"].chunks[0])
        for name, (fshape, dt, fill) in fe.feature_array_specs(ffmt, n, t, v, max(feature_dims)).items():
            g.create_array(name, shape=fshape, chunks=(r,) + tuple(fshape[1:]), dtype=dt,
                           compressors=compressors(dt), fill_value=fill)
        feats = {"features": fe.features_attr(ffmt, feature_dims, n, t, v)}
    full = {
        **attrs,
        "schema_version": SCHEMA_VERSION,
        **format_attrs(fmt, shape, k, samples, sample_seed, metric_sums),
        **feats,
        **({"label_map": label_map} if label_map else {}),
        "shape": [n, t, v, c],
        "dtype": dtype,
        "rows_per_chunk": int(g["labels"].chunks[0]),
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


def remove_partial_writes(path: str | Path) -> int:
    """Delete the ``*.partial`` files a killed writer left in a local bank -> how many.

    zarr's ``LocalStore`` (3.1.x) writes every chunk file to ``<key>.<uuid>.partial`` and renames it into place, so
    a SIGKILL mid-write leaves that temporary file beside the chunks (never a torn chunk file). They are garbage:
    a resumed dump rewrites the chunk (its done flag is not set), and the leftover would only take disk space and
    confuse tools listing chunk files. URL stores write whole objects and are left alone."""
    if storage.is_url(path) or not Path(path).is_dir():
        return 0
    stale = list(Path(path).rglob("*.partial"))
    for f in stale:
        f.unlink(missing_ok=True)
    return len(stale)


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
                skipped: np.ndarray, features: np.ndarray | None = None, params: np.ndarray | None = None,
                partners: np.ndarray | None = None, extra: dict[str, np.ndarray] | None = None) -> None:
    """Write row chunk ``j`` (logits [r, T, V, C], labels [r], views [r, V, 5], skipped [r], the embeddings
    [r, T, V, D] of a bank that stores them, ``params`` [r, V, A] / ``partners`` [r, V] of a view policy with
    stored parameters; ``extra``: other per-row arrays of the format, by name), then mark it done.

    Compact banks: the logits are rounded to the bank dtype, encoded, and stored with the chunk's sums. Map
    banks: logits [r, T, S·S, C] (cells on the view axis), encoded by :func:`pipeline.bank.labelmap.encode_chunk`;
    ``views`` [r, 1, 5] the mapped regions. The write itself is :func:`write_rows`."""
    fmt = g.attrs.get("format", "dense")
    per_chunk: dict[str, np.ndarray] = {}
    if fmt == "dense":
        arrays = {"logits": logits}
    elif fmt == "labelmap":
        lm = g.attrs["label_map"]
        arrays = encode_map_chunk(logits, np.asarray(skipped, bool), int(lm["size"]), lm["map_dtype"], lm["topk"])
    else:
        s = j * g["labels"].chunks[0]
        arrays, sums = cp.encode_chunk(logits, np.asarray(labels), np.asarray(skipped, bool), fmt,
                                       g.attrs.get("topk"), g.attrs["dtype"], samples=g.attrs.get("samples"),
                                       seed=int(g.attrs.get("sample_seed", 0)), start=s)
        per_chunk = {"chunk_sums": sums}
    write_rows(g, j, arrays, labels, views, skipped, features, per_chunk, params, partners, extra)


def write_rows(g: zarr.Group, j: int, arrays: dict[str, np.ndarray], labels: np.ndarray, views: np.ndarray,
               skipped: np.ndarray, features: np.ndarray | None = None,
               per_chunk: dict[str, np.ndarray] | None = None, params: np.ndarray | None = None,
               partners: np.ndarray | None = None, extra: dict[str, np.ndarray] | None = None) -> None:
    """Write row chunk ``j`` as encoded (``arrays``: {bank array: [r, ...]}, e.g. ``logits``, a compact format's
    or a map's arrays; ``per_chunk``: {array: its row j}, e.g. ``chunk_sums``), labels [r], views [r, V, 5] (only
    the bank's view slots are stored: a map bank keeps 1 region), skipped [r], the embeddings [r, T, V, D] float32
    of a bank that stores them, ``params`` [r, V, A] / ``partners`` [r, V] of a view policy with stored parameters,
    ``extra``: other per-row arrays of the format by name (a map bank's ``image_size``); the ``done`` flag last.
    BankError when the rows do not fit the bank's layout or an array the bank stores is missing."""
    r = g["labels"].chunks[0]
    s = j * r
    e = s + len(labels)
    n = g["labels"].shape[0]
    if e > n or (e - s != r and e != n):
        raise BankError(f"chunk {j} write of {len(labels)} rows does not fit the bank layout")
    with zarr.config.set(_WRITE_ALL):
        for name, a in arrays.items():
            g[name][s:e] = a.astype(g[name].dtype, copy=False)
        for name, a in (per_chunk or {}).items():
            g[name][j] = a
        meta = g.attrs.get("features")
        if meta:
            if features is None:
                raise BankError(f"chunk {j}: this bank stores embeddings and none were given")
            for name, a in fe.encode_features(np.asarray(features, np.float32), meta["format"]).items():
                g[name][s:e] = a
        for name, a in (extra or {}).items():
            g[name][s:e] = a
        g["labels"][s:e] = labels.astype(np.int32, copy=False)
        g["views"][s:e] = views[:, :g["views"].shape[1]].astype(np.float32, copy=False)  # a map bank: 1 region
        if "view_params" in g:
            if params is None or partners is None:
                raise BankError(f"chunk {j}: this bank stores view parameters and none were given")
            g["view_params"][s:e] = params.astype(np.float32, copy=False)
            g["view_partner"][s:e] = partners.astype(np.int32, copy=False)
        g["skipped"][s:e] = skipped.astype(bool, copy=False)
        g["done"][j] = True


def chunk_sums_attrs(g: zarr.Group, names: list[str]) -> dict[str, Any]:
    """``fidelity``, ``metrics`` (of the reconstruction, what stage 2 reads) and ``source_metrics`` (of the
    logits before encoding) of a compact bank, from the per-chunk sums its writers stored (``names``: the
    metric entries, :func:`pipeline.bank.stats.entry_names`)."""
    from pipeline.bank import stats as st

    sums = np.asarray(g["chunk_sums"][:], np.float64)
    if not np.isfinite(sums).all():
        bad = np.flatnonzero(~np.isfinite(sums).all(axis=1))
        raise BankError(f"label bank is damaged: array 'chunk_sums' has no value for chunks {bad[:10].tolist()}")
    total = sums.sum(axis=0)
    lay = {k: slice(*v) for k, v in cp.sums_layout(int(g.attrs["shape"][1])).items()}
    return {"fidelity": cp.fidelity_from_sums(total[lay["fidelity"]], g.attrs.get("format", "topk")),
            "metrics": st.metrics_from_states(total[lay["metrics"]], names),
            "source_metrics": st.metrics_from_states(total[lay["source_metrics"]], names)}


def metric_sums_attrs(g: zarr.Group, names: list[str]) -> dict[str, Any]:
    """``metrics`` of a dense bank from the per-chunk metric states its dump stored (``metric_sums``, view 0 as
    stored: the logits rounded to the bank dtype). BankError when a chunk has none (a damaged bank)."""
    from pipeline.bank import stats as st

    sums = np.asarray(g["metric_sums"][:], np.float64)
    if not np.isfinite(sums).all():
        bad = np.flatnonzero(~np.isfinite(sums).all(axis=1))
        raise BankError(f"label bank is damaged: array 'metric_sums' has no value for chunks {bad[:10].tolist()}; "
                        "a rerun cannot repair a chunk marked done: run python -m pipeline.labels verify on it, "
                        "remove the bank folder and dump it again")
    return {"metrics": st.metrics_from_states(sums.sum(axis=0), names)}


def mark_complete(g: zarr.Group, extra: dict[str, Any]) -> None:
    """Set the final attrs (teacher metrics, ...) and ``complete = True`` in one attrs write."""
    done = done_flags(g)
    if not done.all():
        raise BankError(f"cannot mark bank complete: chunks {np.flatnonzero(~done).tolist()[:10]} are not done")
    g.attrs.update({**extra, "complete": True})
