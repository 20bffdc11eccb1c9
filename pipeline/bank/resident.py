"""Label banks held in memory for stage 2: compact banks stay compact, only gathered rows are densified.

A :class:`ResidentBank` holds one bank's label payload, read chunk by chunk straight into preallocated arrays,
one row per (sample, view) (views moved next to the sample axis, so that a gather is a copy of whole rows):

| format | resident arrays (rows = N * V) | bytes per (sample, view) |
|---|---|---|
| dense | ``logits`` [N*V, T, C] in the bank's dtype (float16 or float32: never narrowed) | T * C * 2 (or 4) |
| topk  | ``packed`` [N*V, T, B] uint8: per vector the T = 1 reconstruction's ``fill`` (float32, :func:`pipeline.bank.compact.topk_fill`), the K+1 kept classes (int16/int32: the top K, then the true class), their log-probabilities (float16) and the tail statistics ``tail_lse`` (G float16), padded to 4 bytes | T * (4 (K+1) + 4 + 2G) (int16) |
| sampled | ``packed`` as topk, with the S drawn classes after the kept ones (indices, then log-probabilities) | T * (4 (K+1+S) + 4 + 2G) |
| int8  | ``q`` [N*V, T, C] int8, ``scale`` [N*V, T] float16 | T * (C + 2) |

:meth:`ResidentBank.gather` takes sample indices [B] (and the view of each, or view 0), gathers their payload
rows where the arrays live, moves them to the requested device and densifies them there to [B, T, C] float32,
bit for bit what :meth:`pipeline.bank.reader.LabelBank.read_logits` reconstructs (logits at T = 1: right for
tools and T = 1 only). Training reads :meth:`ResidentBank.target` instead: ``{"teacher_logits": [B, T, C]}`` for
dense and int8 banks, ``{"teacher_target": SparseTarget}`` for top-k and sampled ones (the gathered payload rows
as they are, turned into a target at each loss's temperature by :mod:`kd_losses.targets`). The arrays live on the
training device when they fit in a quarter of its free memory (on every rank: one copy per GPU), else on the host:
there, under torchrun, once per node (local rank 0 decompresses the bank into a file under ``/dev/shm`` that every
process of the node maps; :func:`_node_shared_arrays`), and rows bound for a GPU go through two small pinned
staging buffers per array (:class:`_Staging`), never a pinned copy of the whole bank. No code here names a device
type other than through ``torch.device``.

:func:`load_residents` checks the memory first: the host bytes of the banks (once per node) plus the run's other
large allocations on this node (every process's loss memories and image batches, given by stage 2) are compared
with the memory available (``MemAvailable`` from ``/proc/meminfo`` x :data:`MEMORY_FRACTION`, or
``$KD_MEMORY_BUDGET_GB``), and a run that does not fit is refused in one line that lists what takes the memory and
what to change.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import tempfile
import uuid
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from tqdm import tqdm

from pipeline.bank import compact as cp
from pipeline.bank.reader import LabelBank, damaged
from pipeline.bank.schema import TAIL_TEMPERATURES, index_dtype
from pipeline.distributed import barrier, broadcast_object, current_info, gather_objects, local_world_size
from pipeline.errors import BankError

log = logging.getLogger(__name__)

BUDGET_ENV = "KD_MEMORY_BUDGET_GB"
MEMORY_FRACTION = 0.8  # of MemAvailable: the rest is left to the data pipeline, the model and the allocator
DEVICE_FRACTION = 0.25  # of the training device's free memory a bank may take (the rest is for training)
PROGRESS_MIN_CHUNKS = 32


# --- memory ---------------------------------------------------------------------------------------------------
def available_host_bytes() -> int | None:
    """``MemAvailable`` of ``/proc/meminfo`` (Linux), else free physical pages; None when unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def host_budget() -> tuple[int | None, str]:
    """(bytes the resident banks may take on the host, how that was decided)."""
    env = os.environ.get(BUDGET_ENV)
    if env:
        try:
            return int(float(env) * 1e9), f"${BUDGET_ENV}"
        except ValueError:
            raise BankError(f"${BUDGET_ENV}={env!r} is not a number of GB") from None
    avail = available_host_bytes()
    if avail is None:
        return None, "unknown"
    return int(avail * MEMORY_FRACTION), f"{MEMORY_FRACTION:.0%} of MemAvailable {avail / 1e9:.1f} GB"


def dense_nbytes(bank: LabelBank) -> int:
    """Bytes of the bank's dense logits [N, T, V, C] in its dtype."""
    return math.prod(bank.shape) * np.dtype(bank.attrs.get("dtype", "float16")).itemsize


def bytes_per_vector(fmt: str, num_classes: int, k: int | None = None, samples: int | None = None,
                     dtype: str = "float16") -> int:
    """Resident bytes of one (sample, teacher, view) vector of a ``fmt`` bank (see the module table)."""
    if fmt in ("topk", "sampled"):
        return _sparse_offsets(int(k), int(samples or 0), num_classes)[-1]
    if fmt == "int8":
        return num_classes + 2
    return num_classes * np.dtype(dtype).itemsize


def resident_nbytes(bank: LabelBank) -> int:
    """Bytes a :class:`ResidentBank` of ``bank`` holds (see the module table)."""
    n, t, v, c = bank.shape
    return n * v * t * bytes_per_vector(bank.format, c, bank.attrs.get("topk"), bank.attrs.get("samples"),
                                        bank.attrs.get("dtype", "float16"))


def _gb(x: float) -> str:
    return f"{x / 1e9:.3g} GB"


def check_host_memory(banks: list[LabelBank], reserve: int = 0, items: Sequence[tuple[str, int]] = ()) -> None:
    """Refuse, in one line, banks whose resident size (plus ``reserve`` bytes: their embeddings, when loaded too)
    and the run's other host allocations on this node (``items``: (what, bytes), e.g. every process's CRD
    memories) do not fit in the host budget (:func:`host_budget`). The line lists what takes the memory."""
    budget, how = host_budget()
    labels = sum(resident_nbytes(b) for b in banks) + reserve
    need = labels + sum(n for _, n in items)
    if budget is None or need <= budget:
        return
    parts = ([f"label banks {_gb(labels)} (one copy per node)"] if banks else []) + \
        [f"{what} {_gb(n)}" for what, n in items if n]
    what = f"this run needs {_gb(need)} of host memory on this node ({', '.join(parts)}), more than {_gb(budget)} " \
           f"({how})"
    others = "fewer processes per node, a smaller batch, a smaller loss.feat_dim (CRD)"
    dense = [b for b in banks if b.format == "dense"]
    if dense:
        b = max(dense, key=dense_nbytes)
        fix = (f"label bank {b.path} is {_gb(dense_nbytes(b))} of dense {b.attrs.get('dtype')} logits [N, T, V, C] = "
               f"{list(b.shape)}: dump it with --format topk --topk 10, or compact it: python -m pipeline.labels "
               f"compact {b.path} -o OUT --topk 10")
    elif banks:
        fix = "use a smaller --topk, fewer views, or a machine with more memory"
    else:
        fix = f"use {others}, or a machine with more memory"
    if banks and labels < need / 2:  # the other allocations weigh more than the banks: name their fix first
        fix = f"use {others}; or: {fix}"
    raise BankError(f"{what}; {fix}")


# --- resident banks -------------------------------------------------------------------------------------------
class ResidentBank:
    """One bank's labels in memory, gathered and densified by row. Subclasses define the resident arrays
    (:meth:`_layout`), how a chunk of the stored arrays becomes resident rows (:meth:`_convert`), and how
    gathered rows become float32 logits (:meth:`_densify`).

    Attributes: ``path``; ``format``; ``shape`` (N, T, V, C); ``device`` (where the arrays live); ``arrays``
    {name: tensor [N*V, ...]}; ``nbytes``.
    """

    format = ""

    def __init__(self, bank: LabelBank, device: str | torch.device = "cpu", progress: bool = False,
                 share: bool = False, staging: str | torch.device | None = None):
        """``device``: where the arrays live; ``share``: host arrays are one copy per node, shared by the node's
        processes (:func:`_node_shared_arrays`; a collective: every rank of the run constructs its resident
        together); ``staging``: the accelerator that gathered host rows go to, through pinned per-batch staging
        buffers (the arrays themselves are never pinned)."""
        self._check_format(bank)
        self.path = bank.path
        self.shape: tuple[int, int, int, int] = bank.shape
        self.device = torch.device(device)
        n, t, v, c = self.shape
        labels, skipped = bank.check_row_arrays()
        self._check_files(bank)
        shapes = {name: ((n * v, *shape), dtype) for name, (shape, dtype) in self._layout(bank).items()}
        self.shared = share and self.device.type == "cpu"
        if self.shared:
            self.arrays = _node_shared_arrays(self, bank, shapes, labels, skipped, progress)
        else:
            self.arrays = {name: torch.empty(shape, dtype=dtype, device=self.device)
                           for name, (shape, dtype) in shapes.items()}
            self._load(bank, labels, skipped, progress)
        # CPU gather through numpy, each (sample, view) row as one opaque item (a memcpy per row: 1.3x faster than
        # numpy's fancy indexing of fp16 rows); torch's advanced indexing on CPU goes through its thread pool and
        # ran 10x slower on a busy 2-core machine (bench/stage2.py)
        self._host = {k: _row_items(a.numpy()) for k, a in self.arrays.items()} if self.device.type == "cpu" else None
        self._staging = _Staging(torch.device(staging)) if (
            staging is not None and torch.device(staging).type == "cuda" and self._host is not None) else None

    def _load(self, bank: LabelBank, labels: np.ndarray, skipped: np.ndarray, progress: bool) -> None:
        """Read the bank chunk by chunk into ``self.arrays`` (refusing damaged rows)."""
        n, v = self.shape[0], self.shape[2]
        starts = range(0, n, max(1, bank.rows_per_chunk))
        # a bar for long loads only (ImageNet: 313 chunks); closed on errors, so an error starts its own line
        with tqdm(total=len(starts), desc=f"load {self.format} bank", unit="chunk", mininterval=1.0,
                  disable=not progress or len(starts) < PROGRESS_MIN_CHUNKS) as bar:
            names = self._payload(bank)
            for s in starts:
                e = min(n, s + starts.step)
                raw = {name: bank.read_rows(name, s, e) for name in names}
                rows = self._convert(raw, labels[s:e])
                bank.refuse_bad_rows(rows.pop("_bad") & ~skipped[s:e], s, "/".join(names))
                for name, a in rows.items():
                    self.arrays[name][s * v:e * v].copy_(torch.from_numpy(np.ascontiguousarray(a)))
                bar.update()

    @property
    def nbytes(self) -> int:
        return sum(a.numel() * a.element_size() for a in self.arrays.values())

    def _check_format(self, bank: LabelBank) -> None:
        if bank.format != self.format:
            raise ValueError(f"{type(self).__name__} holds {self.format} banks, not {bank.format}")

    def _payload(self, bank: LabelBank) -> list[str]:
        """The stored arrays this resident reads."""
        return bank.payload_arrays

    def _check_files(self, bank: LabelBank) -> None:
        """Refuse payload chunks that are not stored when the fill value cannot reveal them (int8 ``q``)."""

    def _layout(self, bank: LabelBank) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        raise NotImplementedError

    def _convert(self, raw: dict[str, np.ndarray], labels: np.ndarray) -> dict[str, np.ndarray]:
        """Stored arrays of rows [s, e) -> resident rows [(e - s) * V, ...] and ``_bad`` [e - s] (rows holding
        non-finite values or fill values)."""
        raise NotImplementedError

    def _densify(self, rows: dict[str, torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    def gather(self, index: torch.Tensor, view: torch.Tensor | None = None,
               device: str | torch.device | None = None) -> torch.Tensor:
        """Logits of samples ``index`` [B] (int) on views ``view`` [B] (None: view 0) -> [B, T, C] float32 on
        ``device`` (default: where the arrays live); only these B rows are densified."""
        return self._densify(self._gather_rows(index, view, device))

    def _gather_rows(self, index: torch.Tensor, view: torch.Tensor | None,
                     device: str | torch.device | None) -> dict[str, torch.Tensor]:
        """The payload rows of samples ``index`` on ``view``, on ``device``: {name: [B, ...]} (host rows bound for
        a GPU through the pinned staging buffers)."""
        v = self.shape[2]
        device = self.device if device is None else torch.device(device)
        if self._host is not None:
            rows_np = index.cpu().numpy().astype(np.int64, copy=False)
            if v > 1:
                rows_np = rows_np * v + (0 if view is None else view.cpu().numpy())
            if self._staging is not None and device.type == "cuda":
                return self._staging.gather(self._host, rows_np, device)
            part = {k: torch.from_numpy(items[rows_np].view(dt).reshape((len(rows_np),) + shape))
                    for k, (items, dt, shape) in self._host.items()}
        else:
            rows = index.to(self.device, torch.int64)
            if v > 1:
                rows = rows * v + (0 if view is None else view.to(self.device, torch.int64))
            part = {k: a[rows] for k, a in self.arrays.items()}
        return {k: a.to(device, non_blocking=True) for k, a in part.items()}

    def target(self, index: torch.Tensor, view: torch.Tensor | None = None,
               device: str | torch.device | None = None) -> dict[str, Any]:
        """The batch entries a loss reads for samples ``index`` [B] on views ``view``: ``{"teacher_logits":
        [B, T, C] float32}`` (formats that store every class); sparse formats override it."""
        return {"teacher_logits": self.gather(index, view, device)}


class _Staging:
    """Pinned per-batch buffers for host-resident rows bound for a CUDA device: rows are gathered straight into a
    pinned buffer (``np.take(..., out=)``) and copied asynchronously; two buffers per array alternate, and a buffer
    is reused only after its previous copy finished (a CUDA event), so a gather never overwrites rows in flight."""

    SLOTS = 2

    def __init__(self, device: torch.device):
        self.device = device
        self.buffers: dict[tuple[str, int], torch.Tensor] = {}
        self.events: dict[int, Any] = {}
        self.turn = 0

    def gather(self, host: dict[str, tuple[np.ndarray, np.dtype, tuple[int, ...]]], rows: np.ndarray,
               device: torch.device) -> dict[str, torch.Tensor]:
        slot = self.turn % self.SLOTS
        self.turn += 1
        if slot in self.events:
            self.events[slot].synchronize()
        out = {}
        for k, (items, dt, shape) in host.items():
            width = items.dtype.itemsize
            buf = self.buffers.get((k, slot))
            if buf is None or buf.numel() < len(rows) * width:
                buf = torch.empty(max(len(rows), 1) * width, dtype=torch.uint8, pin_memory=True)
                self.buffers[(k, slot)] = buf
            staged = buf[: len(rows) * width].numpy().view(items.dtype)
            np.take(items, rows, out=staged)
            host_rows = torch.from_numpy(staged.view(dt).reshape((len(rows),) + shape))
            out[k] = host_rows.to(device, non_blocking=True)
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(device))
        self.events[slot] = event
        return out


SHARE_ENV = "KD_SHARE_DIR"  # where node-shared bank copies are written (default: /dev/shm, else the temp dir)


def _share_dirs() -> list[Path]:
    """Candidate folders of node-shared bank copies, in order of preference: ``$KD_SHARE_DIR``, then ``/dev/shm``
    (memory) and the temporary directory (a file whose pages the page cache holds once for every process)."""
    env = os.environ.get(SHARE_ENV)
    dirs = [Path(env)] if env else []
    return dirs + [p for p in (Path("/dev/shm"), Path(tempfile.gettempdir())) if p.is_dir()]


def _free_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def _node_shared_arrays(res: "ResidentBank", bank: LabelBank, shapes: dict[str, tuple[tuple[int, ...], torch.dtype]],
                        labels: np.ndarray, skipped: np.ndarray, progress: bool) -> dict[str, torch.Tensor]:
    """One decompressed copy of the bank's resident arrays per node: local rank 0 reads the bank into ``.npy``
    files in the first share folder with room for them (:func:`_share_dirs`; never a full tmpfs, where writing
    would crash), every other process of the node maps the same files, and local rank 0 removes the files once all
    have mapped them (the mappings stay valid; nothing is left behind). A collective of the whole run: a damaged
    bank is the same one-line BankError on every rank."""
    info = current_info()
    token = broadcast_object(uuid.uuid4().hex[:12] if info.is_main else None, info)
    tag = hashlib.sha1(f"{bank.path}|{res.format}".encode()).hexdigest()[:12]
    names = {k: f"offline-kd-{token}-{tag}-{k}.npy" for k in shapes}
    np_dtype = {k: torch.empty(0, dtype=dt).numpy().dtype for k, (_, dt) in shapes.items()}
    creator = int(os.environ.get("LOCAL_RANK", "0")) == 0
    error, arrays = None, {}
    if creator:
        need = sum(math.prod(shape) * np_dtype[k].itemsize for k, (shape, _) in shapes.items())
        folder = next((d for d in _share_dirs() if _free_bytes(d) > 1.1 * need + 2**26), None)
        try:
            if folder is None:
                raise BankError(f"label bank {bank.path}: no folder has {_gb(need)} free for the copy shared by this "
                                f"node's processes (tried {', '.join(map(str, _share_dirs()))}); set ${SHARE_ENV} "
                                "to a local folder with room, or use a compact bank (--format topk)")
            tmp = {k: folder / f".{n}.tmp" for k, n in names.items()}
            res.arrays = {k: torch.from_numpy(np.lib.format.open_memmap(tmp[k], "w+", np_dtype[k], shapes[k][0]))
                          for k in shapes}
            res._load(bank, labels, skipped, progress)
            for k, t in res.arrays.items():
                t.numpy().base.flush() if hasattr(t.numpy().base, "flush") else None
                os.replace(tmp[k], folder / names[k])
            arrays = res.arrays
        except BankError as e:
            error = str(e)
            for p in (folder.glob(f".offline-kd-{token}-*") if folder else ()):
                p.unlink(missing_ok=True)
    errors = [e for e in gather_objects(error, info) if e]
    if errors:
        raise BankError(errors[0])
    if not creator:
        found = {k: next((d / n for d in _share_dirs() if (d / n).is_file()), None) for k, n in names.items()}
        missing = [names[k] for k, p in found.items() if p is None]
        if missing:
            raise BankError(f"label bank {bank.path}: the copy shared by this node's processes is not where local "
                            f"rank 0 wrote it ({missing[0]}; ${SHARE_ENV} must be the same on every process)")
        arrays = {k: torch.from_numpy(np.load(p, mmap_mode="r+")) for k, p in found.items()}
    barrier(info)
    if creator:
        for n in names.values():
            for d in _share_dirs():
                (d / n).unlink(missing_ok=True)
    log.info("label bank %s: one %s copy on this node, shared by its %d processes", bank.path,
             _gb(sum(a.numel() * a.element_size() for a in arrays.values())), local_world_size())
    return arrays


def _row_items(a: np.ndarray) -> tuple[np.ndarray, np.dtype, tuple[int, ...]]:
    """A C-contiguous [R, ...] array as R opaque items (numpy void), with what turns gathered items back."""
    flat = np.ascontiguousarray(a).reshape(len(a), -1)
    return flat.view(np.dtype((np.void, flat.shape[1] * a.itemsize))).reshape(len(a)), a.dtype, a.shape[1:]


def _sparse_offsets(k: int, s: int, c: int) -> tuple[int, int, int, int, int]:
    """Byte offsets in a packed top-k / sampled vector (the fill is bytes [0, 4)): start of the K+1+S indices,
    start of their values, start of the G tail statistics, their end, the row width (padded to 4 bytes, so the
    float32 fill stays aligned)."""
    k1, isz = k + 1 + s, np.dtype(index_dtype(c)).itemsize
    vals = 4 + isz * k1
    tail = vals + 2 * k1
    end = tail + 2 * len(TAIL_TEMPERATURES)
    return 4, vals, tail, end, -(-end // 4) * 4


def _rows_first(a: np.ndarray) -> np.ndarray:
    """[r, T, V, ...] -> [r * V, T, ...] (a sample's views become consecutive rows)."""
    a = np.swapaxes(a, 1, 2)
    return a.reshape((a.shape[0] * a.shape[1],) + a.shape[2:])


def _not_finite(a: np.ndarray) -> np.ndarray:
    return ~np.isfinite(a.reshape(len(a), -1)).all(axis=1)


class DenseResident(ResidentBank):
    """``logits`` [N*V, T, C] in the bank's dtype; densify = cast to float32."""

    format = "dense"

    def _layout(self, bank):
        n, t, v, c = self.shape
        return {"logits": ((t, c), _torch_dtype(bank.attrs.get("dtype", "float16")))}

    def _convert(self, raw, labels):
        x = raw["logits"]
        return {"logits": _rows_first(x), "_bad": _not_finite(x)}

    def _densify(self, rows):
        return rows["logits"].float()


class TopKResident(ResidentBank):
    """One packed row per vector (one random access per gathered row: three separate arrays cost 3x the cache
    misses, 77 vs 17 us per 256-row batch on a 20M-row bank): ``[fill f32 | K+1 indices | K+1 values f16 |
    G tail f16 | pad]`` (the top K, then the true class). :meth:`target` hands the gathered rows to the losses as a
    :class:`kd_losses.targets.SparseTarget`; densify (``gather``, the T = 1 reconstruction) = the fill broadcast to
    [B, T, C], then one scatter of the K+1 kept log-probabilities (the true class written twice, with the same
    value, when it is in the top K). A bank of the first layout (``tail`` "uniform": no tail statistics) is refused:
    its targets would be re-softened at T > 1."""

    format = "topk"

    def _check_format(self, bank: LabelBank) -> None:
        super()._check_format(bank)
        if "tail_lse" not in bank.attrs.get("compact_arrays", []):
            src = (bank.attrs.get("sources") or [{}])[0].get("path", "SRC")
            raise BankError(f"label bank {bank.path} is a top-k bank with a uniform tail (no tail statistics), which "
                            f"teaches a near-uniform target at T > 1: rebuild it with python -m pipeline.labels "
                            f"compact {src} -o OUT --topk {bank.attrs.get('topk', 'K')} (or dump it again)")

    def _layout(self, bank):
        n, t, v, c = self.shape
        self._idx_dtype = index_dtype(c)
        self._k = int(bank.attrs["topk"])
        self._s = int(bank.attrs.get("samples") or 0)
        self._temps = tuple(float(x) for x in bank.attrs.get("tail_temperatures", TAIL_TEMPERATURES))
        self._offsets = _sparse_offsets(self._k, self._s, c)
        return {"packed": ((t, self._offsets[-1]), torch.uint8)}

    def _fill(self, raw: dict[str, np.ndarray], labels: np.ndarray) -> np.ndarray:
        return cp.topk_fill(raw["topk_values"], raw["topk_indices"], raw["target_logprob"], labels, self.shape[3],
                            raw["tail_lse"])

    def _sampled(self, raw: dict[str, np.ndarray]) -> tuple[list[np.ndarray], list[np.ndarray]]:
        return [], []

    def _convert(self, raw, labels):
        vals, idx, tgt, tail = raw["topk_values"], raw["topk_indices"], raw["target_logprob"], raw["tail_lse"]
        fill = self._fill(raw, labels)
        lab = np.broadcast_to(labels.astype(idx.dtype).reshape(-1, 1, 1, 1), tgt.shape + (1,))
        s_idx, s_val = self._sampled(raw)
        all_idx = np.concatenate([idx, lab, *s_idx], axis=-1)
        bad = (_not_finite(vals) | _not_finite(tgt) | np.isnan(tail.reshape(len(tail), -1)).any(axis=1)
               | (all_idx.reshape(len(idx), -1) < 0).any(axis=1))
        for a in s_val:
            bad |= _not_finite(a)
        o_idx, o_val, o_tail, o_end, width = self._offsets
        out = np.zeros((len(vals) * self.shape[2], self.shape[1], width), np.uint8)
        out[..., :o_idx].view(np.float32)[..., 0] = _rows_first(fill)
        out[..., o_idx:o_val].view(self._idx_dtype)[...] = _rows_first(all_idx)
        out[..., o_val:o_tail].view(np.float16)[...] = _rows_first(
            np.concatenate([vals, tgt[..., None], *s_val], axis=-1))
        out[..., o_tail:o_end].view(np.float16)[...] = _rows_first(tail)
        return {"packed": out, "_bad": bad}

    def _unpack(self, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        o_idx, o_val, o_tail, o_end, _ = self._offsets
        fill = g[..., :o_idx].view(torch.float32)[..., 0]
        indices = g[..., o_idx:o_val].view(_torch_dtype(self._idx_dtype)).long()
        values = g[..., o_val:o_tail].view(torch.float16).float()
        tail = g[..., o_tail:o_end].view(torch.float16).float()
        return fill, indices, values, tail

    def _densify(self, rows):
        fill, indices, values, _ = self._unpack(rows["packed"])
        b, t = fill.shape
        out = fill.unsqueeze(-1).expand(b, t, self.shape[3]).contiguous()
        return out.scatter_(2, indices, values)

    def target(self, index, view=None, device=None):
        from kd_losses.targets import SparseTarget

        rows = self._gather_rows(index, view, device)
        _, indices, values, tail = self._unpack(rows["packed"])
        k1 = self._k + 1
        extra = {} if not self._s else {"sample_index": indices[..., k1:], "sample_logprob": values[..., k1:],
                                         "sample_temperature": cp.SAMPLE_TEMPERATURE}
        return {"teacher_target": SparseTarget(self.format, indices[..., :k1], values[..., :k1], tail, self.shape[3],
                                               self._temps, **extra)}


class SampledResident(TopKResident):
    """A sampled bank (:mod:`pipeline.bank.compact`): the top-k row with the S drawn classes appended (indices
    after the kept ones, log-probabilities after theirs); the T = 1 reconstruction stores the drawn classes too."""

    format = "sampled"

    def _fill(self, raw, labels):
        return cp.sampled_fill(raw, labels, self.shape[3])

    def _sampled(self, raw):
        return [raw["sample_indices"]], [raw["sample_logprob"]]


class Int8Resident(ResidentBank):
    """``q`` [N*V, T, C] int8 and ``scale`` [N*V, T] float16; densify = ``-(q + 128) * scale``."""

    format = "int8"

    def _check_files(self, bank):
        _require_chunks(bank, "q")

    def _layout(self, bank):
        n, t, v, c = self.shape
        return {"q": ((t, c), torch.int8), "scale": ((t,), torch.float16)}

    def _convert(self, raw, labels):
        return {"q": _rows_first(raw["q"]), "scale": _rows_first(raw["scale"]), "_bad": _not_finite(raw["scale"])}

    def _densify(self, rows):
        return -(rows["q"].float() + 128.0) * rows["scale"].float().unsqueeze(-1)


def _require_chunks(bank: LabelBank, array: str) -> None:
    """BankError when a chunk of ``array`` is missing (zarr would read it as fill values: zeros, silently)."""
    missing = bank.missing_row_chunks(array)
    if missing:
        raise damaged(bank.path, f"array '{array}' chunk file {missing[0]} is missing")


RESIDENTS: dict[str, type[ResidentBank]] = {c.format: c for c in (DenseResident, TopKResident, SampledResident,
                                                                   Int8Resident)}


class FeatureResident(ResidentBank):
    """A bank's stored embeddings (:mod:`pipeline.bank.features`): ``features`` [N*V, T, D] (float16/32) or
    ``features_q`` int8 [N*V, T, D] + ``features_scale`` [N*V, T] float16; :meth:`gather` -> [B, T, D] float32."""

    format = "features"

    def _check_format(self, bank: LabelBank) -> None:
        if not bank.feature_meta:
            raise BankError(f"label bank {bank.path} stores no embeddings: dump it with --features")
        self._fmt = bank.feature_meta["format"]

    def _payload(self, bank: LabelBank) -> list[str]:
        return list(bank.feature_meta["arrays"])

    def _check_files(self, bank: LabelBank) -> None:
        if self._fmt == "int8":
            _require_chunks(bank, "features_q")

    def _layout(self, bank):
        n, t, v, c = self.shape
        d = max(bank.feature_meta["dims"])
        self.dim = d
        if self._fmt == "int8":
            return {"features_q": ((t, d), torch.int8), "features_scale": ((t,), torch.float16)}
        return {"features": ((t, d), _torch_dtype(self._fmt))}

    def _convert(self, raw, labels):
        if self._fmt == "int8":
            return {"features_q": _rows_first(raw["features_q"]), "features_scale": _rows_first(raw["features_scale"]),
                    "_bad": _not_finite(raw["features_scale"])}
        return {"features": _rows_first(raw["features"]), "_bad": _not_finite(raw["features"])}

    def _densify(self, rows):
        if self._fmt == "int8":
            return rows["features_q"].float() * rows["features_scale"].float().unsqueeze(-1)
        return rows["features"].float()


def feature_nbytes(bank: LabelBank) -> int:
    """Bytes a :class:`FeatureResident` of ``bank`` holds."""
    n, t, v, _ = bank.shape
    meta = bank.feature_meta or {}
    if not meta:
        return 0
    d = max(meta["dims"])
    return n * v * t * (d + 2 if meta["format"] == "int8" else d * np.dtype(meta["format"]).itemsize)


def _torch_dtype(name: str) -> torch.dtype:
    return {"float16": torch.float16, "float32": torch.float32, "int16": torch.int16, "int32": torch.int32}[str(name)]


def load_residents(banks: list[LabelBank], device: str | torch.device = "cpu", progress: bool = False,
                   kind: type[ResidentBank] | None = None, reserve: int = 0,
                   items: Sequence[tuple[str, int]] = ()) -> list[ResidentBank]:
    """Every bank resident, placed: on ``device`` when it is an accelerator and the bank fits in
    :data:`DEVICE_FRACTION` of its free memory on every rank (``$KD_DEVICE_BANK_FRACTION`` overrides the
    fraction; 0 keeps banks on the host), else on the host, once per node under torchrun (``$KD_NODE_SHARE=0``:
    a private copy per process, as before; for comparisons). The host share is
    checked against the memory budget before anything is read (:func:`check_host_memory`, with ``reserve`` bytes
    more and the run's other allocations ``items``). ``kind``: :class:`FeatureResident` for the banks'
    embeddings (checked with the labels, through ``reserve``); default: their labels in their own format. Under
    torchrun every rank must call it together (placement and node sharing are agreed collectively)."""
    dev = torch.device(device)
    info = current_info(dev.type)
    place: list[Any] = []
    if dev.type == "cuda":
        free = min(gather_objects(torch.cuda.mem_get_info(dev)[0], info))  # every rank decides alike
        fraction = float(os.environ.get("KD_DEVICE_BANK_FRACTION", DEVICE_FRACTION))
        used = 0
        for b in banks:
            need = feature_nbytes(b) if kind is FeatureResident else resident_nbytes(b)
            on_device = used + need <= fraction * free
            used += need if on_device else 0
            place.append(dev if on_device else torch.device("cpu"))
    else:
        place = [dev] * len(banks)
    if kind is not FeatureResident:
        check_host_memory([b for b, p in zip(banks, place) if p.type == "cpu"], reserve, items)
    share = info.enabled and local_world_size() > 1 and os.environ.get("KD_NODE_SHARE", "1") != "0"
    out = []
    for b, p in zip(banks, place):
        r = (kind or RESIDENTS[b.format])(b, p, progress=progress, share=share and p.type == "cpu",
                                           staging=dev if p.type == "cpu" else None)
        log.info("label bank %s resident on %s: %s %s (%s dense)", b.path, p, b.format, _gb(r.nbytes),
                 _gb(dense_nbytes(b)))
        out.append(r)
    return out
