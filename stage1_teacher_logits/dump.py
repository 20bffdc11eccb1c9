"""Stage 1: run teachers over a dataset with DALI and store their logits in a label bank.

Resumable (chunks marked done are skipped; an interrupted dump re-run with the same command writes only the
missing chunks and produces the same bytes), shardable over torchrun ranks (each rank owns whole row chunks),
content-addressed (the same command twice is a no-op that prints the bank path).
"""

from __future__ import annotations

import logging
import math
import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from pipeline.bank.key import bank_key, default_bank_path
from pipeline.bank.reader import _is_url, open_group
from pipeline.bank.schema import DEFAULT_ROWS_PER_CHUNK
from pipeline.bank.writer import create_bank, done_flags, mark_complete, remove_bank, write_chunk
from pipeline.config import to_dict
from pipeline.data.dali import build_pipeline, iterate
from pipeline.data.manifest import Manifest, build_manifest
from pipeline.data.presets import get_preset
from pipeline.distributed import DistInfo, barrier, broadcast_object, init_distributed
from pipeline.errors import BankError, UsageError
from pipeline.metrics import MetricAccumulator
from stage1_teacher_logits.teachers import build_teachers, parse_teachers
from stage1_teacher_logits.views import ViewSampler, view_policy_record

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DumpConfig:
    """Everything that defines a dump (stored in the bank's attrs as ``config``)."""

    teacher: tuple[str, ...] = ()
    weights: tuple[str, ...] = ()
    data: str = ""
    split: str = "train"
    preset: str = "imagenet"
    device: str = "cpu"
    batch_size: int = 128
    workers: int = 2
    out: str | None = None
    overwrite: bool = False
    dtype: str = "float16"
    rows_per_chunk: int = DEFAULT_ROWS_PER_CHUNK
    skip_corrupt: bool = False
    views: int = 1
    view_policy: str = "center"
    view_seed: int = 0
    seed: int = 0
    amp: bool = False


def _check(cfg: DumpConfig) -> None:
    if not cfg.data:
        raise UsageError("no dataset given: use --data ROOT")
    if cfg.dtype not in ("float16", "float32"):
        raise UsageError(f"unknown dtype '{cfg.dtype}'; valid: float16, float32")
    if cfg.device not in ("cpu", "cuda"):
        raise UsageError(f"unknown device '{cfg.device}'; valid: cpu, cuda")
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda but no CUDA device is available")
    if cfg.batch_size < 1 or cfg.rows_per_chunk < 1 or cfg.workers < 1 or cfg.views < 1:
        raise UsageError("batch_size, rows_per_chunk, workers and views must be >= 1")


def _effective_batch(batch_size: int, rows_per_chunk: int) -> int:
    """Largest batch <= batch_size dividing the chunk, so batches never straddle chunks (bit-exact resume)."""
    b = min(batch_size, rows_per_chunk)
    while rows_per_chunk % b:
        b -= 1
    if b != batch_size:
        log.info("batch size %d -> %d so that it divides rows_per_chunk=%d", batch_size, b, rows_per_chunk)
    return b


def find_corrupt(manifest: Manifest, order: np.ndarray, start: int, known: set[int] = frozenset()) -> int | None:
    """First position >= start in ``order`` whose file cannot be read or decoded (None if all decode),
    ignoring samples already in ``known`` (skipped ones)."""
    from PIL import Image

    if manifest.layout == "cifar":
        return None
    if manifest.layout == "shards":
        from pipeline.data.shards import find_corrupt as shard_find_corrupt

        return shard_find_corrupt(manifest, order, start, known)
    root = Path(manifest.root)
    for pos in range(start, len(order)):
        if int(order[pos]) in known:
            continue
        p = root / manifest.files[int(order[pos])]
        try:
            if p.stat().st_size == 0:
                return pos
            with Image.open(p) as im:
                im.load()
        except Exception:
            return pos
    return None


def malformed(path: Path) -> bool:
    """Cheap structural check (no decode): empty file, unknown signature, or a JPEG/PNG without its end marker.

    Truncated and non-image files are caught here before DALI sees them (DALI 2.4's CPU decoder has been seen
    to crash, not raise, on some truncated JPEGs)."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 4:
                return True
            f.seek(-12, 2)
            tail = f.read()
    except OSError:
        return True
    if head[:2] == b"\xff\xd8":  # JPEG: must end with EOI (allow trailing padding bytes)
        return b"\xff\xd9" not in tail
    if head[:8] == b"\x89PNG\r\n\x1a\n":
        return b"IEND" not in tail
    return head[:2] not in (b"BM", b"II", b"MM") and head[:4] not in (b"RIFF", b"GIF8")


def malformed_positions(manifest: Manifest, order: np.ndarray, threads: int = 8) -> list[int]:
    """Positions in ``order`` whose files fail :func:`malformed` (threaded: cheap even on network storage)."""
    if manifest.layout not in ("imagefolder", "filelist"):
        return []  # arrays need no check; shards carry per-member checksums checked by their reader
    from concurrent.futures import ThreadPoolExecutor

    from PIL import Image

    def bad(i: int) -> bool:
        path = root / manifest.files[int(i)]
        if not malformed(path):
            return False
        try:  # e.g. trailing bytes after a JPEG's end marker: only a failed full decode condemns a file
            with Image.open(path) as im:
                im.load()
            return False
        except Exception:
            return True

    root = Path(manifest.root)
    with ThreadPoolExecutor(threads) as ex:
        flags = list(ex.map(bad, order, chunksize=256))
    return [p for p, b in enumerate(flags) if b]


def resolve_bank_path(cfg: DumpConfig, manifest: Manifest, teachers: list[dict], preprocessing: dict,
                      views: dict) -> tuple[str, str]:
    key = bank_key(teachers, manifest.fingerprint, preprocessing, views, cfg.dtype)
    path = cfg.out or str(default_bank_path(manifest.name, manifest.split, teachers, key))
    return path, key


def run_dump(cfg: DumpConfig) -> str:
    """Dump (or resume, or reuse) the bank described by ``cfg``; returns its path."""
    _check(cfg)
    info = init_distributed(cfg.device)
    manifest = build_manifest(cfg.data, cfg.split)
    preset = get_preset(cfg.preset)
    specs = parse_teachers(cfg.teacher, cfg.weights, cfg.seed)
    teachers = [s.identity() for s in specs]
    preprocessing = {**preset.to_dict(), "teacher_amp": cfg.amp and cfg.device == "cuda"}
    views = view_policy_record(cfg.view_policy, cfg.views, cfg.view_seed, preset)
    path, key = resolve_bank_path(cfg, manifest, teachers, preprocessing, views)
    # Build the teachers before touching the bank: a bad name or checkpoint must not leave a bank behind.
    model = build_teachers(specs, manifest.num_classes, cfg.device, cfg.seed)

    with _io_errors(path), ExitStack() as stack:
        status = None
        if info.is_main:
            status = _prepare_bank(cfg, manifest, teachers, preprocessing, views, path, key, stack)
        status = broadcast_object(status, info)
        if status == "complete":
            log.info("bank already complete: %s", path)
            return path
        if isinstance(status, str) and status.startswith("error:"):
            raise BankError(status[len("error:"):])
        barrier(info)
        _dump_chunks(cfg, info, manifest, model, path)
        barrier(info)
        if info.is_main:
            g = open_group(path, "r+")
            metrics = teacher_metrics(g, teachers)
            mark_complete(g, {"metrics": metrics})
            log.info("bank complete: %s  %s", path, metrics)
        barrier(info)
    return path


def _prepare_bank(cfg: DumpConfig, manifest: Manifest, teachers: list[dict], preprocessing: dict, views: dict,
                  path: str, key: str, stack: ExitStack) -> str:
    """Rank 0: lock, then reuse / resume / create the bank. Returns 'complete', 'resume', 'new' or 'error:...'."""
    if not _is_url(path):
        from filelock import FileLock, Timeout

        Path(path).parent.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(path) + ".lock")
        try:
            lock.acquire(timeout=0)
        except Timeout:
            return f"error:another dump is writing {path} (lock {path}.lock held); wait for it or remove a stale lock"
        stack.callback(lock.release)
    exists = (not _is_url(path) and Path(path).exists()) or (_is_url(path) and _url_exists(path))
    if exists:
        try:
            attrs = dict(open_group(path, "r").attrs)
        except BankError:
            attrs = {}
        if attrs.get("key") == key:
            if attrs.get("complete"):
                return "complete"
            log.info("resuming incomplete bank %s", path)
            return "resume"
        if not cfg.overwrite:
            return (f"error:{path} holds a different bank (key {str(attrs.get('key'))[:8]} != {key[:8]}); "
                    "use --overwrite to replace it or --out to write elsewhere")
        log.warning("overwriting %s", path)
        remove_bank(path)
    n, t = len(manifest), len(teachers)
    attrs = {
        "key": key,
        "teachers": teachers,
        "dataset": manifest.describe(),
        "preprocessing": preprocessing,
        "views": views,
        "config": to_dict(cfg),
        "metrics": {},
    }
    create_bank(path, attrs, (n, t, cfg.views, manifest.num_classes), cfg.dtype, cfg.rows_per_chunk)
    return "new"


def _url_exists(url: str) -> bool:
    import fsspec

    fs, p = fsspec.core.url_to_fs(url)
    return fs.exists(p)


def _dump_chunks(cfg: DumpConfig, info: DistInfo, manifest: Manifest, model, path: str) -> None:
    """This rank's share: every not-done chunk j with j % world_size == rank."""
    g = open_group(path, "r+")
    rows = g["logits"].chunks[0]
    n = len(manifest)
    n_chunks = math.ceil(n / rows)
    done = done_flags(g)
    mine = [j for j in range(n_chunks) if j % info.world_size == info.rank and not done[j]]
    if not mine:
        return
    bs = _effective_batch(cfg.batch_size, rows)
    sampler = ViewSampler(cfg.view_policy, cfg.views, cfg.view_seed, get_preset(cfg.preset))
    order = np.concatenate([np.arange(j * rows, min(n, (j + 1) * rows)) for j in mine])
    chunk_of_pos = np.concatenate([np.full(min(n, (j + 1) * rows) - j * rows, j) for j in mine])
    skip: set[int] = set()
    suspect = frozenset(int(order[p]) for p in malformed_positions(manifest, order))
    pbar = tqdm(total=len(order), desc=f"dump rank {info.rank}", unit="img", disable=not info.is_main,
                mininterval=1.0)
    pos = 0
    t0 = time.time()
    try:
        while pos < len(order):
            pos = _run_from(cfg, g, manifest, model, sampler, order, chunk_of_pos, pos, bs, rows, skip, pbar, suspect)
    finally:
        pbar.close()  # ends the progress line, so an error message starts on its own line
    log.info("rank %d dumped %d samples in %.1fs", info.rank, len(order), time.time() - t0)


def _run_from(cfg, g, manifest, model, sampler, order, chunk_of_pos, pos, bs, rows, skip, pbar,
              suspect: frozenset[int] = frozenset()) -> int:
    """Run one pipeline from position ``pos`` (a chunk start) to the end; on a decode error find the file,
    then raise (or, with skip_corrupt, record it and return the start of the failing chunk to restart).

    ``suspect``: samples whose files failed the structural pre-scan; the pipeline stops before the first one
    not yet skipped, which is then handled exactly like a decode error (they never reach DALI)."""
    first = next((p for p in range(pos, len(order)) if int(order[p]) in suspect and int(order[p]) not in skip), None)
    if first is not None:
        bad_start = _chunk_start(chunk_of_pos, first)
        if bad_start > pos:  # dump the clean chunks before the suspect file's chunk
            _run_from(cfg, g, manifest, model, sampler, order[:bad_start], chunk_of_pos[:bad_start], pos, bs, rows,
                      skip, pbar, suspect)
        idx = int(order[first])
        fname = Path(manifest.root) / manifest.files[idx]
        if not cfg.skip_corrupt:
            raise BankError(f"cannot decode {fname} (sample {idx}): empty, truncated or not an image; "
                            "fix or remove it, or pass --skip-corrupt")
        log.warning("skipping corrupt file %s (sample %d)", fname, idx)
        skip.add(idx)
        return bad_start
    sub = order[pos:].copy()
    for k, i in enumerate(sub):  # skipped samples: a stand-in keeps batch composition aligned to chunks
        if int(i) in skip:
            sub[k] = _stand_in(sub, k, skip)
    boxes = sampler.boxes(manifest, sub)
    pipe = build_pipeline(manifest, sub, sampler.preset, sampler.mode, bs, cfg.workers, cfg.device, cfg.seed,
                          boxes=boxes)
    t, v, c = g["logits"].shape[1:]
    cur = None
    buf = None
    done_pos = pos
    it = iterate(pipe, len(sub), bs, cfg.device)
    while True:
        try:
            batch = next(it)
        except StopIteration:
            break
        except RuntimeError as e:
            if "pipeline" not in str(e).lower():
                raise
            chunk_start = _chunk_start(chunk_of_pos, done_pos)
            bad = find_corrupt(manifest, order, done_pos, skip)
            if bad is None:
                raise BankError(f"decoding failed after sample {int(order[done_pos])}: {' '.join(str(e).split())[:200]}") from None
            idx = int(order[bad])
            fname = Path(manifest.root) / manifest.files[idx]
            if not cfg.skip_corrupt:
                # DALI prefetch can fail before the chunks ahead of the bad file were written: finish those
                # clean chunks first, so every chunk before the bad file's chunk is done.
                bad_start = _chunk_start(chunk_of_pos, bad)
                if bad_start > chunk_start:
                    del it, pipe
                    _run_from(cfg, g, manifest, model, sampler, order[:bad_start], chunk_of_pos[:bad_start],
                              chunk_start, bs, rows, skip, pbar, suspect)
                raise BankError(f"cannot decode {fname} (sample {idx}); fix or remove it, or pass --skip-corrupt") from None
            log.warning("skipping corrupt file %s (sample %d)", fname, idx)
            skip.add(idx)
            pbar.update(chunk_start - done_pos)
            return chunk_start
        images = batch.images.to(cfg.device, non_blocking=True)
        with torch.autocast("cuda", enabled=cfg.amp and cfg.device == "cuda"):
            if images.ndim == 5:  # [B, V, 3, H, W] -> run every view
                b_, v_ = images.shape[:2]
                out = model(images.flatten(0, 1)).reshape(b_, v_, t, c).transpose(1, 2)
            else:
                out = model(images)[:, :, None, :]
        out = out.float().cpu().numpy()
        index = batch.index.numpy()
        _check_finite(out, index, skip, manifest, g["logits"].dtype)
        for k in range(len(index)):
            p = done_pos + k
            j = int(chunk_of_pos[p])
            if cur != j:
                if buf is not None:
                    _flush(g, cur, buf, skip)
                cur, buf = j, _new_buf(g, j, rows, t, v, c)
            r = int(order[p]) - j * rows
            buf["logits"][r] = out[k]
            buf["labels"][r] = manifest.labels[int(order[p])]
            buf["views"][r] = boxes[p - pos] if boxes is not None else np.nan
            if p + 1 == len(chunk_of_pos) or chunk_of_pos[p + 1] != j:  # chunk filled: write it now, so a
                _flush(g, cur, buf, skip)                                # later decode error cannot lose it
                cur, buf = None, None
        done_pos += len(index)
        pbar.update(len(index))
        pbar.set_postfix_str(f"chunk {int(chunk_of_pos[done_pos - 1])}")
    if buf is not None:
        _flush(g, cur, buf, skip)
    return len(order)


def _chunk_start(chunk_of_pos: np.ndarray, p: int) -> int:
    j = chunk_of_pos[min(p, len(chunk_of_pos) - 1)]
    return int(np.flatnonzero(chunk_of_pos == j)[0])


def _stand_in(sub: np.ndarray, k: int, skip: set[int]) -> int:
    for d in range(1, len(sub)):
        for q in (k - d, k + d):
            if 0 <= q < len(sub) and int(sub[q]) not in skip:
                return int(sub[q])
    raise BankError("every sample is corrupt")


def _new_buf(g, j: int, rows: int, t: int, v: int, c: int) -> dict[str, np.ndarray]:
    n = g["logits"].shape[0]
    r = min(n, (j + 1) * rows) - j * rows
    return {"logits": np.full((r, t, v, c), np.nan, np.float32), "labels": np.full(r, -1, np.int32),
            "views": np.full((r, v, 5), np.nan, np.float32), "start": j * rows}


def _flush(g, j: int, buf: dict, skip: set[int]) -> None:
    start = buf["start"]
    r = len(buf["labels"])
    skipped = np.array([(start + k) in skip for k in range(r)], bool)
    buf["logits"][skipped] = np.nan
    if (buf["labels"][~skipped] < 0).any():
        raise BankError(f"internal error: chunk {j} incomplete at flush")
    write_chunk(g, j, buf["logits"], buf["labels"], buf["views"], skipped)


def _check_finite(out: np.ndarray, index: np.ndarray, skip: set[int], manifest: Manifest,
                  dtype: np.dtype | str = np.float32) -> None:
    bad = ~np.isfinite(out.reshape(len(out), -1)).all(axis=1)
    for k in np.flatnonzero(bad):
        i = int(index[k])
        if i not in skip:
            raise BankError(f"teacher produced non-finite logits for sample {i} ({manifest.files[i]}); "
                            "nothing was marked done for its chunk")
    # finite in float32 but beyond the bank dtype's range (|x| > 65504 in float16): would be stored as inf
    with np.errstate(over="ignore"):
        over = ~np.isfinite(out.astype(dtype).reshape(len(out), -1)).all(axis=1)
    for k in np.flatnonzero(over):
        i = int(index[k])
        if i not in skip:
            raise BankError(f"teacher logits of sample {i} ({manifest.files[i]}) reach "
                            f"{float(np.abs(out[k]).max()):.4g}, beyond the range of {np.dtype(dtype).name}: dump "
                            "with --dtype float32; nothing was marked done for its chunk")


@contextmanager
def _io_errors(path: str):
    """An OSError while writing the bank (disk full, read-only or missing folder, permissions) -> a one-line
    BankError; nothing is marked complete, and the same command resumes once the cause is fixed."""
    try:
        yield
    except OSError as e:
        raise BankError(f"I/O error on label bank {path}: {' '.join(str(e).split())}; the bank is not complete: "
                        "fix the cause (free space, permissions) and rerun the same command to resume") from None


def teacher_metrics(g, teachers: list[dict]) -> dict[str, dict[str, float]]:
    """Top-1/top-5/NLL/ECE of each teacher (and their mean-logit ensemble) on view 0, read back from the bank."""
    n, t = g["logits"].shape[:2]
    rows = g["logits"].chunks[0]
    accs = [MetricAccumulator() for _ in range(t + (1 if t > 1 else 0))]
    for s in range(0, n, rows):
        logits = torch.from_numpy(np.asarray(g["logits"][s:s + rows, :, 0]).astype(np.float32))
        labels = torch.from_numpy(np.asarray(g["labels"][s:s + rows]).astype(np.int64))
        keep = ~torch.from_numpy(np.asarray(g["skipped"][s:s + rows]))
        logits, labels = logits[keep], labels[keep]
        for k in range(t):
            accs[k].update(logits[:, k], labels)
        if t > 1:
            accs[t].update(logits.mean(1), labels)
    names = [f"{k}:{tt['name']}" for k, tt in enumerate(teachers)] + (["ensemble"] if t > 1 else [])
    return {name: {k: round(v, 6) for k, v in a.compute().items()} for name, a in zip(names, accs)}
