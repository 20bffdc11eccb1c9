"""Dask plumbing of the bank tools: schedulers, dask views of banks, chunk-aligned block jobs, atomic outputs.

Execution model: every job is one dask task per **output row chunk** (or shard, when the output is sharded).
A task receives the dask blocks of its input rows (``da.from_zarr`` arrays rechunked so that one block is
exactly one output row chunk), computes, writes every output array of that row range itself, and returns a
small float64 vector of statistics (metrics, fidelity sums) that a tree reduction adds up. Two tasks never
write into the same chunk or shard file (concurrent writes into one shard lose data: docs/DESIGN.md, "Measured facts"), and an
output's chunk is computed once however many arrays and statistics come out of it.
"""

from __future__ import annotations

import logging
import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import dask
import dask.array as da
import numpy as np
import zarr

from pipeline import storage
from pipeline.errors import BankError, UsageError

log = logging.getLogger(__name__)

SCHEDULERS = ("threads", "sync", "local-cluster", "tcp://HOST:PORT")
# dask.distributed comm protocols a scheduler address may use
SCHEDULER_PROTOCOLS = ("tcp", "tls", "inproc", "ucx", "ws", "wss")


# --- schedulers ---------------------------------------------------------------------------------------------
@contextmanager
def scheduler(spec: str | None) -> Iterator[Any]:
    """Yield a ``dask.distributed.Client`` (``tcp://…``, ``local-cluster``) or None (``threads``, ``sync``).

    ``local-cluster`` starts ``LocalCluster(n_workers=2, threads_per_worker=1, processes=True)``: the caller's
    ``__main__`` needs the ``if __name__ == "__main__"`` guard (``pipeline.labels`` has it).
    """
    spec = (spec or "threads").strip()
    if spec in ("threads", "sync", "synchronous"):
        with dask.config.set(scheduler="sync" if spec != "threads" else "threads"):
            yield None
        return
    from distributed import Client, LocalCluster

    if spec == "local-cluster":
        with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, \
                Client(cluster) as client:
            log.info("dask LocalCluster: %s (2 worker processes)", cluster.scheduler_address)
            yield client
        return
    if spec.split(":", 1)[0] in SCHEDULER_PROTOCOLS and ":" in spec:
        try:
            client = Client(spec, timeout=15)
        except (OSError, TimeoutError) as e:
            msg = " ".join(str(e).split())[:160]
            raise UsageError(f"cannot connect to the dask scheduler at {spec}: {msg}") from None
        try:
            log.info("dask cluster %s: %d workers", spec, len(client.scheduler_info().get("workers", {})))
            yield client
        finally:
            client.close()
        return
    raise UsageError(f"unknown --scheduler '{spec}'; valid: {', '.join(SCHEDULERS)}")


def compute(objs: Sequence[Any], client: Any = None, progress: bool = True, desc: str = "") -> list[Any]:
    """Compute dask collections on the active scheduler, with a progress bar on stderr for long jobs.

    On failure, tasks still in flight are waited for (threads) or cancelled and waited for (cluster) before the
    exception propagates, so that the caller's clean-up of a temporary output is not raced by late writes.
    """
    if client is not None:
        futures = client.compute(list(objs))
        try:
            if progress:
                from distributed import progress as dprogress

                dprogress(futures)
                print(file=sys.stderr)
            return client.gather(futures)
        except BaseException:
            keys = {k for o in objs for k in o.__dask_graph__().keys()}
            _settle_cluster(client, futures, keys)
            raise
    if dask.config.get("scheduler", None) in ("sync", "synchronous", "single-threaded"):
        return list(dask.compute(*objs))
    from concurrent.futures import ThreadPoolExecutor

    pool = ThreadPoolExecutor(max_workers=os.cpu_count() or 1)
    try:
        if progress:
            from dask.diagnostics import ProgressBar

            if desc:
                log.info("%s", desc)
            with ProgressBar(minimum=2.0, dt=0.5, out=sys.stderr):
                return list(dask.compute(*objs, scheduler="threads", pool=pool))
        return list(dask.compute(*objs, scheduler="threads", pool=pool))
    finally:
        pool.shutdown(wait=True, cancel_futures=True)  # no task of this job still writes after we return


def _settle_cluster(client: Any, futures: list, keys: set, timeout: float = 60.0) -> None:
    """Cancel a failed job's futures and wait until no worker still executes one of its tasks (``keys``)."""
    import time

    try:
        client.cancel(futures)

        def executing(dask_worker, keys=keys) -> int:
            return sum(1 for ts in dask_worker.state.executing if ts.key in keys)

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and sum(client.run(executing).values()) > 0:
            time.sleep(0.1)
    except Exception as e:  # best effort: the cluster may be gone
        log.debug("could not settle cluster after failure: %s", e)


# --- dask views of banks ------------------------------------------------------------------------------------
def _decode_block(*blocks: np.ndarray, fmt: str, names: tuple[str, ...], num_classes: int) -> np.ndarray:
    """One row block of a compact bank's arrays (every one 4-D: per-vector arrays [r, T, V, 1], then the labels
    [r, 1, 1, 1]) -> float32 logits [r, T, V, C]."""
    from pipeline.bank.compact import decode

    *payload, labels = blocks
    arrays = {nm: (b[..., 0] if nm in _PER_VECTOR else b) for nm, b in zip(names, payload)}
    return decode(arrays, fmt, num_classes, labels.reshape(-1))


_PER_VECTOR = ("scale", "target_logprob")  # compact arrays with one value per (sample, teacher, view)


def logits_array(bank, rows: int | None = None) -> da.Array:
    """float32 dask array [N, T, V, C] of ``bank``'s logits (compact formats decoded per block); row blocks of
    ``rows`` (default: the bank's chunk rows), one block over the other axes."""
    g = bank.group
    n, t, v, c = bank.shape
    if bank.format == "dense":
        x = da.from_zarr(g["logits"]).astype(np.float32)
    elif bank.format == "labelmap":
        raise BankError(f"label bank {bank.path} is a label map (format labelmap): the bank tools read dense and "
                        "compact banks; use labels info / verify / map-check on it")
    else:
        names = tuple(bank.attrs.get("compact_arrays") or ())
        if not names or any(nm not in g for nm in names):
            raise BankError(f"label bank {bank.path} (format {bank.format}) lacks its compact arrays")
        arrs = []
        for nm in names:
            a = da.from_zarr(g[nm])
            arrs.append(a[..., None] if a.ndim == 3 else a)
        arrs.append(da.from_zarr(g["labels"])[:, None, None, None])  # top-k reconstruction needs the true class
        r0 = arrs[0].chunks[0]
        arrs = [a.rechunk({0: r0}) for a in arrs]
        x = da.map_blocks(_decode_block, *arrs, fmt=bank.format, names=names, num_classes=c, dtype=np.float32,
                          chunks=(r0, (t,), (v,), (c,)), meta=np.empty((0, 0, 0, 0), np.float32))
    return x.rechunk((rows or bank.rows_per_chunk, t, v, c))


def rows_array(arr: zarr.Array, rows: int) -> da.Array:
    """A per-row zarr array as dask, row blocks of ``rows``."""
    x = da.from_zarr(arr)
    return x.rechunk((rows,) + tuple(x.shape[1:]))


# --- chunk-aligned block jobs ---------------------------------------------------------------------------------
class Output:
    """Picklable handle of an output group: tasks (threads or cluster workers) open it by path and write whole
    row chunks with ``write_empty_chunks`` on (a chunk equal to the fill value is still stored, so
    ``verify_bank`` finds every chunk)."""

    def __init__(self, path: str):
        self.path = str(path)
        self._g = None

    def __getstate__(self):
        return {"path": self.path, "_g": None}

    def array(self, name: str) -> zarr.Array:
        if self._g is None:
            self._g = zarr.open_group(self.path, mode="r+")
        return self._g[name].with_config({"write_empty_chunks": True})

    def write(self, name: str, start: int, stop: int, value: np.ndarray) -> None:
        a = self.array(name)
        a[start:stop] = np.asarray(value).astype(a.dtype, copy=False)


def block_rows(arr: zarr.Array) -> int:
    """Rows written by one task: the shard's rows when the array is sharded, else the chunk's."""
    shards = getattr(arr, "shards", None)
    return int((shards or arr.chunks)[0])


def check_aligned(x: da.Array, rows: int, n: int) -> None:
    """Every dask row block must cover whole output chunks (all but the last exactly ``rows``)."""
    sizes = x.chunks[0]
    if any(s != rows for s in sizes[:-1]) or sum(sizes) != n or any(len(c) != 1 for c in x.chunks[1:]):
        raise RuntimeError(f"internal error: dask blocks {x.chunks} not aligned to output chunks of {rows} rows")


def _sum(*vs: np.ndarray) -> np.ndarray:
    out = np.array(vs[0], dtype=np.float64, copy=True)
    for v in vs[1:]:
        out += v
    return out


def tree_sum(parts: list, every: int = 8):
    """Pairwise-ish reduction of delayed vectors (bounded memory per task)."""
    if not parts:
        return dask.delayed(np.zeros)(0)
    while len(parts) > 1:
        parts = [dask.delayed(_sum, pure=True)(*parts[i:i + every]) for i in range(0, len(parts), every)]
    return parts[0]


def block_job(fn: Callable[..., np.ndarray], inputs: dict[str, da.Array], rows: int, n: int,
              **kwargs: Any):
    """One delayed ``fn(start, stop, **blocks, **kwargs) -> float64 vector`` per row block; their tree sum.

    ``inputs`` are dask arrays with N rows; each is rechunked to row blocks of ``rows`` (aligned to the output
    chunks) and one block over the other axes.
    """
    blocks = {}
    for name, x in inputs.items():
        x = x.rechunk((rows,) + tuple(x.shape[1:]))
        check_aligned(x, rows, n)
        blocks[name] = x.to_delayed().reshape(-1)
    nb = len(next(iter(blocks.values())))
    parts = []
    for i in range(nb):
        s, e = i * rows, min(n, (i + 1) * rows)
        parts.append(dask.delayed(fn, pure=False)(s, e, **{k: b[i] for k, b in blocks.items()}, **kwargs))
    return tree_sum(parts)


# --- atomic outputs -----------------------------------------------------------------------------------------
def check_output(out: str, overwrite: bool) -> str:
    out = str(out).rstrip("/") or str(out)
    if not out:
        raise UsageError("no output given: use -o OUT")
    if storage.exists(out) and not overwrite:
        raise UsageError(f"{out} already exists; use --overwrite to replace it")
    if not storage.parent_exists(out):
        raise UsageError(f"output directory {Path(out).parent} does not exist")
    return out


@contextmanager
def atomic_output(out: str, overwrite: bool) -> Iterator[str]:
    """Yield ``<out>.tmp-<pid>`` to build the output in; rename it to ``out`` only when the body succeeds.

    On any exception (or KeyboardInterrupt) the temporary output is removed and ``out`` is left untouched:
    an interrupted job never leaves a half-built output under the final name.
    """
    out = check_output(out, overwrite)
    tmp = f"{out}.tmp-{os.getpid()}"
    storage.remove(tmp)
    ok = False
    try:
        yield tmp
        ok = True
    finally:
        if not ok:
            storage.remove(tmp)
    old = None
    if storage.exists(out):  # --overwrite: move the old one aside first, so `out` is always a whole output
        old = f"{out}.old-{os.getpid()}"
        storage.remove(old)
        storage.rename(out, old)
    try:
        storage.rename(tmp, out)
    except BaseException:
        if old is not None:
            storage.rename(old, out)
        storage.remove(tmp)
        raise
    if old is not None:
        storage.remove(old)


def job_error(what: str, e: BaseException) -> BankError:
    """A failed dask job as a one-line BankError (corrupt or unreadable input chunk, disk full, ...)."""
    msg = " ".join(str(e).split())[:240]
    return BankError(f"{what} failed, nothing written: {type(e).__name__}: {msg} "
                     "(`python -m pipeline.labels verify BANK` locates a corrupt input chunk)")
