"""Stage 1: run teachers over a dataset with DALI and store their logits in a label bank.

Resumable (chunks marked done are skipped; an interrupted dump re-run with the same command writes only the
missing chunks and produces the same bytes), shardable over torchrun ranks (each rank owns whole row chunks),
content-addressed (the same command twice is a no-op that prints the bank path). ``--format topk --topk K`` /
``--format sampled --topk K --samples S`` / ``--format int8`` write a compact bank directly, chunk by chunk (the writer encodes each chunk; no dense array
is written), with the same guarantees.
"""

from __future__ import annotations

import enum
import logging
import math
import queue
import sys
import threading
import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from pipeline import storage
from pipeline.bank.compact import check_format_args
from pipeline.bank.labelmap import MAP_DTYPES, MAP_REGIONS, buffer_shape, check_map_args, chunk_rows, map_metrics, \
    map_record
from pipeline.bank.identity import BankSpec, bank_identity, cached_banks, preprocessing_record, view_record
from pipeline.bank.reader import open_group
from pipeline.bank.schema import DEFAULT_ROWS_PER_CHUNK, FORMATS
from pipeline.bank.stats import entry_names
from pipeline.bank.writer import (chunk_sums_attrs, create_bank, done_flags, mark_complete, remove_partial_writes,
                                  write_chunk)
from pipeline.config import RESUME_MATCH, key, to_dict
from pipeline.data import Manifest, build_manifest, layout_of
from pipeline.data.layouts import SPLITS
from pipeline.data.batch import DecodeError
from pipeline.data.loaders import resolve_loader
from pipeline.data.presets import teacher_preprocess, typical_side, upscale_warning
from pipeline.distributed import DistInfo, barrier, broadcast_object, cleanup, cores_per_local_rank, init_distributed
from pipeline.errors import BankError, UsageError
from pipeline.metrics import MetricAccumulator
from pipeline.models.ensemble import TeacherEnsemble
from pipeline.models.teachers import build_teachers, class_maps_record, parse_teachers, read_class_map
from stage1_teacher_logits.append import ViewPrefix, append_config, first_view
from stage1_teacher_logits.label_maps import MapRegion, build_map_model, map_attrs
from stage1_teacher_logits.views import ViewSampler

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DumpConfig:
    """Everything that defines a dump (stored in the bank's attrs as ``config``). Each key is declared once
    (:func:`pipeline.config.key`): help, flags, and ``resume="match"`` for the keys that enter the bank's identity
    (another value is another bank: a rerun never resumes or reuses a bank made otherwise); the others say how the
    dump runs or where it writes. ``pipeline.dump_logits``'s parser is generated from these declarations."""

    teacher: tuple[str, ...] = key((), help="model name (repeatable: ensemble on the T axis); python -c 'import "
                                            "pipeline.models as m; print(m.available_models())' lists them",
                                   flags=("--teacher",), action="append", resume=RESUME_MATCH,
                                   default_text="none, required")
    weights: tuple[str, ...] = key((), help="per teacher: DEFAULT, a torchvision weights enum name, none, or a "
                                            "checkpoint path", flags=("--weights",), action="append",
                                   resume=RESUME_MATCH, default_text="DEFAULT")
    data: str = key("", help="dataset root (ImageNet folders, *_list.txt, CIFAR pickles, packed shards; `make demo` "
                             "prepares data/fashion-mnist)", flags=("--data", "--data-path"), resume=RESUME_MATCH,
                    default_text="none, required")
    split: str = key("train", help="split", flags=("--split",), choices=SPLITS, resume=RESUME_MATCH)
    layout: str = key("auto", help="dataset layout: auto, imagefolder, filelist, cifar, shards", flags=("--layout",),
                      resume=RESUME_MATCH)
    preset: str = key("auto", help="preprocessing: auto (each teacher's own: what a checkpoint of this project "
                                   "was trained with, a timm tag's pretrained config at its test-time size, a "
                                   "torchvision enum's transforms; else cifar for CIFAR pickles, else imagenet), "
                                   "train-size (auto, but timm models at their training size), or for every "
                                   "teacher one of {presets}", flags=("--preset",), resume=RESUME_MATCH)
    device: str = key("cpu", help="cpu (DALI CPU-only) or cuda (mixed decoding)", flags=("--device",),
                      choices=("cpu", "cuda"))
    batch_size: int = key(128, help="images per teacher batch (batches never straddle chunks: any size gives the "
                                    "same bank)", flags=("--batch-size", "-b"))
    workers: int | None = key(None, help="loader threads/processes", flags=("--workers", "-j"),
                              default_text="the cores available to this process / LOCAL_WORLD_SIZE")
    out: str | None = key(None, help="bank path or fsspec URL", flags=("--out",),
                          default_text="$KD_CACHE, else ~/.cache/offline-kd/label_banks, "
                                       "/<dataset>-<split>/<teachers>-<key8>.zarr")
    overwrite: bool = key(False, help="replace a different bank at --out", flags=("--overwrite",),
                          action="store_true")
    dtype: str = key("float16", help="stored logits; float32 for logits beyond +-65504", flags=("--dtype",),
                     choices=("float16", "float32"), resume=RESUME_MATCH)
    format: str = key("dense", help="dense, topk (with --topk K), sampled (with --topk K --samples S), int8 or "
                                    "labelmap (the classifier at every cell, --map-*): compact banks are written "
                                    "directly, chunk by chunk", flags=("--format",),
                      resume=RESUME_MATCH)
    topk: int | None = key(None, help="K classes kept per vector with --format topk or sampled (plus the true class)",
                           flags=("--topk",), resume=RESUME_MATCH)
    samples: int | None = key(None, help="S classes importance-sampled per vector from the rest of the teacher's "
                                         "distribution with --format sampled", flags=("--samples",),
                              resume=RESUME_MATCH)
    sample_seed: int = key(0, help="seed of the sampled classes (--format sampled; recorded, part of the key)",
                           flags=("--sample-seed",), resume=RESUME_MATCH)
    rows_per_chunk: int = key(DEFAULT_ROWS_PER_CHUNK, help="rows per zarr chunk (the unit of writing and resuming)",
                              flags=("--rows-per-chunk",))
    skip_corrupt: bool = key(False, help="record undecodable images as skipped instead of failing",
                             flags=("--skip-corrupt",), action="store_true")
    views: int = key(1, help="views per image (K)", flags=("--views",), resume=RESUME_MATCH)
    append_views: str = key("", help="a complete dense bank SRC with V random views: write the bank with --views "
                                     "V' > V of SRC's teachers and data, copying SRC's V views and computing only the "
                                     "new ones (SRC is only read; the other keys default to SRC's)",
                            flags=("--append-views",), default_text="none")
    view_policy: str = key("center", help="center, rrc, rrc+flip, or with augmentations, e.g. "
                           "rrc+flip+randaug(2,9)+erasing(0.25)+mixup(0.8)+cutmix(1.0) (README, 'View policies')",
                           flags=("--view-policy",), resume=RESUME_MATCH)
    view_seed: int = key(0, help="seed of the view boxes", flags=("--view-seed",), resume=RESUME_MATCH)
    seed: int = key(0, help="init seed for teachers with --weights none", flags=("--seed",), resume=RESUME_MATCH)
    amp: bool = key(False, help="autocast the teachers (CUDA only)", flags=("--amp",), action="store_true",
                    resume=RESUME_MATCH)
    loader: str = key("auto", help="image loader: dali (NVIDIA DALI, the default where installed) or torch",
                      flags=("--loader",), choices=("auto", "dali", "torch"))
    class_map: str = key("", help="file of 'class_name teacher_index' lines (or JSON): dataset class -> teacher "
                                  "output", flags=("--class-map",), resume=RESUME_MATCH,
                         default_text="one to one, or by ImageNet wnid for 1000-class teachers")
    features: bool = key(False, help="also store each teacher's pooled penultimate embedding (for rkd, pkt, sp, crd, "
                                     "fitnet)", flags=("--features",), action="store_true", resume=RESUME_MATCH)
    # label maps (issue 26): --format labelmap
    map_size: int | None = key(None, help="cells per side of a label map (--format labelmap); resampled from the "
                                          "teacher's last feature map", flags=("--map-size",), resume=RESUME_MATCH,
                               default_text="the teacher's native size at its input size")
    map_region: str = key("eval", help="what a label map covers: eval (the preset's eval resize + center crop, as a "
                                       "center bank) or full (the whole image squashed to the input size, ReLabel's "
                                       "choice)", flags=("--map-region",), choices=MAP_REGIONS, resume=RESUME_MATCH)
    map_dtype: str = key("float16", help="stored label map: float16 or int8 (per-cell scale); --topk K stores the K "
                                         "largest logits per cell instead", flags=("--map-dtype",), choices=MAP_DTYPES,
                         resume=RESUME_MATCH)
    hw_decoder_load: float = key(0.65, help="share of JPEGs DALI's mixed decoding (--device cuda) gives the hardware "
                                            "decoder, in [0, 1]; the rest take the hybrid path, Huffman-decoded on "
                                            "the loader threads", flags=("--hw-decoder-load",))


def _check(cfg: DumpConfig) -> None:
    if not cfg.data:
        raise UsageError("no dataset given: use --data ROOT (ROOT/train/<class>/*.jpg, file lists, CIFAR pickles "
                         "or packed shards); for the embedded demo data run `make demo` first (it writes "
                         "data/fashion-mnist), then e.g. python -m pipeline.dump_logits --teacher democnn --weights "
                         "runs/demo/teacher-ce/best.pt --data data/fashion-mnist --preset demo")
    if cfg.dtype not in ("float16", "float32"):
        raise UsageError(f"unknown dtype '{cfg.dtype}'; valid: float16, float32")
    if cfg.device not in ("cpu", "cuda"):
        raise UsageError(f"unknown device '{cfg.device}'; valid: cpu, cuda")
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda but no CUDA device is available")
    if cfg.batch_size < 1 or cfg.rows_per_chunk < 1 or (cfg.workers is not None and cfg.workers < 1) or cfg.views < 1:
        raise UsageError("batch_size, rows_per_chunk, workers and views must be >= 1")
    if not 0 <= cfg.hw_decoder_load <= 1:
        raise UsageError(f"--hw-decoder-load {cfg.hw_decoder_load} is out of range: give the share of JPEGs for the "
                         "hardware decoder in [0, 1] (default 0.65)")
    if cfg.amp and cfg.device != "cuda":
        raise UsageError("--amp autocasts the teachers on CUDA only (fp16 on a CPU is slower than fp32): drop "
                         "--amp or use --device cuda")
    if cfg.format not in FORMATS:
        raise UsageError(f"unknown --format '{cfg.format}'; valid: {', '.join(FORMATS)}")
    check_map_args(cfg.format, cfg.map_size, cfg.map_region, cfg.map_dtype, cfg.topk)
    if cfg.format == "labelmap":  # label maps: one region per sample, no embeddings
        if cfg.features or cfg.view_policy != "center" or cfg.views != 1:
            raise UsageError("--format labelmap maps one region per image (--map-region): drop --features, --views "
                             "and --view-policy")
        if cfg.samples is not None:
            raise UsageError("--samples applies to --format sampled only, not labelmap")
        return
    check_format_args(cfg.format, cfg.topk, cfg.samples)


def _check_topk(cfg: DumpConfig, num_classes: int) -> None:
    if cfg.format == "labelmap":
        check_map_args(cfg.format, cfg.map_size, cfg.map_region, cfg.map_dtype, cfg.topk, num_classes)
        return
    check_format_args(cfg.format, cfg.topk, cfg.samples, num_classes)


class PrepareStatus(enum.Enum):
    """What :meth:`BankDump.prepare` found at the bank's path."""

    NEW = "new"  # created an empty bank
    RESUME = "resume"  # an incomplete bank of the same key: write its missing chunks
    COMPLETE = "complete"  # the same bank, finished: nothing to do


def run_dump(cfg: DumpConfig) -> str:
    """Dump (or resume, or reuse) the bank described by ``cfg``; returns its path."""
    cfg = append_config(cfg) if cfg.append_views else cfg
    _check(cfg)
    info = init_distributed(cfg.device)
    try:
        return _run_dump(cfg, info)
    finally:  # the process group is shut down on every exit, errors included
        cleanup(info)


def _run_dump(cfg: DumpConfig, info: DistInfo) -> str:
    dump = BankDump(cfg, build_manifest(cfg.data, cfg.split, layout=cfg.layout))
    # Build the teachers before touching the bank: a bad name or checkpoint must not leave a bank behind.
    model = dump.build_teachers()
    if dump.prefix is not None:
        dump.prefix.same_bank(dump.spec, dump.manifest.fingerprint)
    with _io_errors(dump.path), ExitStack() as stack:
        if _prepare_on_rank0(dump, info, stack) is PrepareStatus.COMPLETE:
            log.info("bank already complete: %s", dump.path)
            return dump.path
        barrier(info)
        dump.write_chunks(model, info)
        barrier(info)
        if info.is_main:
            dump.finalize()
        barrier(info)
    return dump.path


def _prepare_on_rank0(dump: "BankDump", info: DistInfo, stack: ExitStack) -> PrepareStatus:
    """Rank 0 prepares; its status (or its error, raised on every rank) reaches all ranks."""
    result: tuple[PrepareStatus | None, str] = (None, "")
    if info.is_main:
        try:
            result = (dump.prepare(stack), "")
        except BankError as e:
            if not info.enabled:
                raise
            result = (None, str(e))
    status, error = broadcast_object(result, info)
    if status is None:
        raise BankError(error)
    return status


class BankDump:
    """One dump: the bank it writes (identity, path, attrs) and its three steps, :meth:`prepare` (rank 0),
    :meth:`write_chunks` (every rank, its own chunks) and :meth:`finalize` (rank 0)."""

    def __init__(self, cfg: DumpConfig, manifest: Manifest):
        _check_topk(cfg, manifest.num_classes)
        self.manifest = manifest
        self.loader = resolve_loader(cfg.loader)
        self.loader_requested = cfg.loader
        self.specs = parse_teachers(cfg.teacher, cfg.weights, cfg.seed)
        # each teacher's preprocessing: --preset, else its checkpoint's, else its weights' own, else the layout's
        self.pre_choices = [teacher_preprocess(s.arch, s.weights, cfg.preset, manifest) for s in self.specs]
        self.teacher_pre = [p for p, _ in self.pre_choices]
        self.branches = list(dict.fromkeys(self.teacher_pre))  # decoded once, preprocessed once per branch
        self.branch_of = [self.branches.index(p) for p in self.teacher_pre]
        self.preset = self.branches[0]
        workers = cfg.workers if cfg.workers is not None else cores_per_local_rank()
        self.cfg = replace(cfg, preset=self.preset.name, loader=self.loader, workers=workers)  # recorded resolved
        self.class_maps: list[list[int] | None] = [None] * len(self.specs)
        self.feature_dims: list[int] | None = None
        self.prefix = ViewPrefix(cfg.append_views) if cfg.append_views else None  # --append-views SRC
        self.label_map: dict | None = None  # label maps: attrs["label_map"], once the map model is built
        self._identify()

    def build_teachers(self) -> TeacherEnsemble:
        """The teachers on the run's device, mapped onto the dataset's classes (their class maps join the
        bank's identity)."""
        cfg = self.cfg
        model = build_teachers(self.specs, self.manifest.classes, cfg.device, cfg.seed,
                               crops=[p.crop for p in self.teacher_pre], branch_of=self.branch_of,
                               class_map=read_class_map(cfg.class_map) if cfg.class_map else None)
        self.class_maps = class_maps_record(model)
        if cfg.features:
            self.feature_dims = model.enable_features([p.crop for p in self.teacher_pre])
        if cfg.format == "labelmap":  # label maps: the classifier at every cell (stage1_teacher_logits/label_maps.py)
            model = build_map_model(model, [s.arch for s in self.specs], cfg.map_size, self.teacher_pre)
            self.label_map = map_attrs(model, cfg.map_region, cfg.map_dtype, cfg.topk)
        self._identify()
        return model

    def _identify(self) -> None:
        cfg = self.cfg
        pre = preprocessing_record(self.preset, cfg.amp and cfg.device == "cuda")
        if len(self.branches) > 1:
            pre["per_teacher"] = [p.to_dict() for p in self.teacher_pre]
        self.spec = BankSpec(
            teachers=tuple(s.identity() for s in self.specs),
            preprocessing=pre,
            views=view_record(cfg.view_policy, cfg.views, cfg.view_seed, self.preset),
            dtype=cfg.dtype,
            format=cfg.format,
            topk=cfg.topk,
            samples=cfg.samples,
            sample_seed=cfg.sample_seed if cfg.format == "sampled" else 0,
            class_maps=tuple(tuple(m) if m is not None else None for m in self.class_maps)
            if any(m is not None for m in self.class_maps) else None,
            feature_dims=tuple(self.feature_dims) if self.feature_dims else None,
            label_map=tuple(sorted(map_record(self.label_map["size"] if self.label_map else cfg.map_size,
                                              cfg.map_region, cfg.map_dtype, cfg.topk).items()))
            if cfg.format == "labelmap" else None,
        )
        ident = bank_identity(self.spec, self.manifest)
        self.key = ident.key
        # the same bank made from this data under another folder name or from another directory: reuse it
        same = [b.path for b in cached_banks() if b.attrs.get("key") == self.key and b.complete]
        self.path = cfg.out or (same[0] if same else str(ident.default_path))

    # --- prepare --------------------------------------------------------------------------------------------
    def prepare(self, stack: ExitStack) -> PrepareStatus:
        """Lock the path (local banks), then reuse, resume or create the bank. Raises BankError when the lock
        is held or a different bank is there (without ``--overwrite``)."""
        path = self.path
        if not storage.is_url(path):
            from filelock import FileLock, Timeout

            problem = storage.folder_problem(Path(path).parent)
            if problem:
                raise BankError(f"cannot write the bank {path}: {problem}; choose another --out (or none: the "
                                "per-user cache), or fix the folder and rerun the same command")
            lock = FileLock(str(path) + ".lock")
            try:
                lock.acquire(timeout=0)
            except Timeout:
                raise BankError(f"another dump is writing {path} (lock {path}.lock held); wait for it or remove "
                                "a stale lock") from None
            stack.callback(lock.release)
        if storage.exists(path):
            try:
                attrs = dict(open_group(path, "r").attrs)
            except BankError:
                attrs = {}
            if attrs.get("key") == self.key and attrs.get("complete") and not self._other_loader(attrs):
                return PrepareStatus.COMPLETE
            if attrs.get("key") == self.key and not attrs.get("complete"):
                if attrs.get("loader", "dali") != self.loader:
                    raise BankError(f"{path} was started with --loader {attrs.get('loader', 'dali')}: resume it with "
                                    "the same loader (resampling differs slightly between loaders)")
                log.info("resuming incomplete bank %s (%d partial chunk writes of the killed run removed)", path,
                         remove_partial_writes(path))
                return PrepareStatus.RESUME
            if attrs.get("key") != self.key and not self.cfg.overwrite:
                raise BankError(f"{path} holds a different bank (key {str(attrs.get('key'))[:8]} != {self.key[:8]}); "
                                "use --overwrite to replace it or --out to write elsewhere")
            log.warning("overwriting %s", path)
            storage.remove(path)
        warning = upscale_warning(self.pre_choices, typical_side(self.manifest))
        if warning:
            log.warning("%s", warning)
        attrs = {"key": self.key, "teachers": list(self.spec.teachers), "dataset": self.manifest.describe(),
                 "preprocessing": self.spec.preprocessing, "views": self.spec.views, "config": to_dict(self.cfg),
                 "loader": self.loader, "metrics": {},
                 # where each teacher's preprocessing came from (not hashed: the values above are)
                 "preprocessing_source": [src for _, src in self.pre_choices]}
        if self.spec.class_maps is not None:
            attrs["class_maps"] = [list(m) if m is not None else None for m in self.spec.class_maps]
        m = self.manifest
        # per teacher, the output feeding each dataset class, one to one included (labels info shows it)
        attrs["class_index"] = [list(c) if c is not None else list(range(m.num_classes)) for c in self.class_maps]
        rows = self.cfg.rows_per_chunk
        if self.label_map:  # label maps: chunks of bounded size
            rows = chunk_rows(rows, len(self.specs), int(self.label_map["size"]), m.num_classes)
        create_bank(path, attrs, (len(m), len(self.specs), self.cfg.views, m.num_classes), self.cfg.dtype,
                    rows, self.cfg.format, self.cfg.topk, self.feature_dims, self.cfg.samples,
                    self.cfg.sample_seed, label_map=self.label_map)
        return PrepareStatus.NEW

    def _other_loader(self, attrs: dict) -> bool:
        """Whether a complete bank of this key was made by another loader than an explicit ``--loader`` asks for
        (the loader is not in the key: both give the same bank up to resampling). Without ``--overwrite`` the bank
        is reused and the user told so; with it, it is dumped again."""
        made_by = attrs.get("loader", "dali")
        if self.loader_requested == "auto" or made_by == self.loader:
            return False
        if self.cfg.overwrite:
            log.warning("--loader %s --overwrite: dumping %s again (it was made with the %s loader)", self.loader,
                        self.path, made_by)
            return True
        log.warning("reusing %s, dumped with the %s loader although --loader %s was asked for: the loaders resample "
                    "slightly differently (docs/GPU.md gives the measured logit difference); add --overwrite to dump "
                    "it again with %s", self.path, made_by, self.loader, self.loader)
        return False

    # --- write ----------------------------------------------------------------------------------------------
    def write_chunks(self, model: TeacherEnsemble, info: DistInfo) -> None:
        """This rank's share: every not-done chunk j with j % world_size == rank."""
        g = open_group(self.path, "r+")
        rows = g["labels"].chunks[0]
        done = done_flags(g)
        mine = [j for j in range(math.ceil(len(self.manifest) / rows))
                if j % info.world_size == info.rank and not done[j]]
        if not mine:
            return
        plan = ChunkPlan(mine, rows, len(self.manifest), self.cfg.batch_size)
        sampler = ViewSampler(self.cfg.view_policy, self.cfg.views, self.cfg.view_seed, self.preset) \
            if self.cfg.format != "labelmap" else MapRegion(self.cfg.map_region, self.preset)  # label maps
        run = _ChunkRun(self, g, model, plan, sampler, info)
        t0 = time.time()
        try:
            run.all()
        finally:
            run.pbar.close()  # ends the progress line, so an error message starts on its own line
            run.writer.close()  # every queued chunk written (or the writer's error raised, unless one is raised)
        log.info("rank %d dumped %d samples in %.1fs", info.rank, plan.num_real, time.time() - t0)

    # --- finalize -------------------------------------------------------------------------------------------
    def finalize(self) -> None:
        """Teacher metrics read back from the bank (dense) or summed from the per-chunk sums stored with the
        chunks (compact: ``metrics`` of what stage 2 reads, ``source_metrics`` of the teachers, ``fidelity``),
        then ``complete = True``."""
        g = open_group(self.path, "r+")
        if self.cfg.format == "dense":
            extra = {"metrics": teacher_metrics(g, list(self.spec.teachers))}
        elif self.cfg.format == "labelmap":  # label maps: metrics of each map's mean over its cells
            extra = {"metrics": map_metrics(g, list(self.spec.teachers))}
        else:
            extra = chunk_sums_attrs(g, entry_names(list(self.spec.teachers), len(self.specs)))
        mark_complete(g, extra)
        log.info("bank complete: %s  %s", self.path, extra)


class ChunkPlan:
    """The order in which one rank feeds its chunks to the teachers.

    Each chunk's rows, in index order, padded to a multiple of the batch size by repeating the chunk's last
    sample: batches never straddle chunks, so a chunk's logits depend only on the chunk (a resumed dump is bit
    for bit an uninterrupted one) and the requested batch size is kept (the padding rows are dropped).

    Attributes: ``order`` [P] sample indices; ``real`` [P] bool (False for padding); ``chunk`` [P] the row chunk
    of each position; ``chunk_start`` / ``chunk_end`` [P] that chunk's first position and one past its last.
    """

    def __init__(self, chunks: list[int], rows: int, n: int, batch_size: int):
        order, real, chunk, start, end = [np.zeros(0, np.int64)], [np.zeros(0, bool)], [np.zeros(0, np.int64)], \
            [np.zeros(0, np.int64)], [np.zeros(0, np.int64)]
        pos = 0
        for j in chunks:
            idx = np.arange(j * rows, min(n, (j + 1) * rows))
            pad = -len(idx) % batch_size
            order += [idx, np.full(pad, idx[-1])]
            real += [np.ones(len(idx), bool), np.zeros(pad, bool)]
            size = len(idx) + pad
            chunk.append(np.full(size, j))
            start.append(np.full(size, pos))
            end.append(np.full(size, pos + size))
            pos += size
        self.order = np.concatenate(order).astype(np.int64)
        self.real = np.concatenate(real)
        self.chunk = np.concatenate(chunk)
        self.chunk_start = np.concatenate(start)
        self.chunk_end = np.concatenate(end)
        self.rows = rows

    def __len__(self) -> int:
        return len(self.order)

    @property
    def num_real(self) -> int:
        return int(self.real.sum())


class _ChunkRun:
    """Runs DALI pipelines over a :class:`ChunkPlan`, writing each chunk as soon as it is full, and handles
    undecodable files: they are found (structural pre-scan, or a full decode after a pipeline error), the clean
    chunks before one are finished, and then the dump stops naming it or, with ``--skip-corrupt``, records it as
    skipped and restarts at its chunk. Skipped samples get a stand-in (a neighbour) so batches keep their
    composition; their rows are NaN and ``skipped`` is set."""

    def __init__(self, dump: BankDump, g, model: TeacherEnsemble, plan: ChunkPlan, sampler: ViewSampler,
                 info: DistInfo):
        self.dump, self.cfg, self.g, self.model, self.plan, self.sampler = dump, dump.cfg, g, model, plan, sampler
        self.manifest = dump.manifest
        self.dump_shape = buffer_shape(dict(g.attrs))  # label maps: the S·S cells on the view axis
        self.layout = layout_of(self.manifest)
        self.skip: set[int] = set()
        real_order = plan.order[plan.real]
        # sample -> why it cannot be decoded: from the pre-scan, then from decode errors
        self.suspect = {int(real_order[p]): r for p, r in self.layout.scan(self.manifest, real_order).items()}
        self.pbar = tqdm(total=plan.num_real, desc=f"dump rank {info.rank}", unit="img", disable=not info.is_main,
                         mininterval=1.0)
        self.writer = _ChunkWriter()
        self.num_rows = int(g["labels"].shape[0])

    def all(self) -> None:
        """Every chunk of the plan (one pipeline per stretch of positions free of known bad files)."""
        plan, pos = self.plan, 0
        while pos < len(plan):
            bad = next((p for p in range(pos, len(plan))
                        if int(plan.order[p]) in self.suspect and int(plan.order[p]) not in self.skip), None)
            stop = int(plan.chunk_start[bad]) if bad is not None else len(plan)
            if stop > pos:
                reached = self._run_pipeline(pos, stop)
                pos = stop if reached is None else reached
                continue
            idx = int(plan.order[bad])  # pos is the start of the bad file's chunk: all before it is written
            where = self.layout.describe_sample(self.manifest, idx)
            if not self.cfg.skip_corrupt:
                raise BankError(f"cannot decode {where} (sample {idx}): {self.suspect[idx]}; "
                                "fix or remove it, or pass --skip-corrupt")
            log.warning("skipping undecodable file %s (sample %d): %s", where, idx, self.suspect[idx])
            self.skip.add(idx)

    def _run_pipeline(self, start: int, stop: int) -> int | None:
        """Positions [start, stop) through one pipeline. Returns None when all were written, or the chunk start
        to resume from after a decode error (the bad file is then added to the suspects)."""
        plan = self.plan
        sub = plan.order[start:stop].copy()
        for k, i in enumerate(sub):
            if int(i) in self.skip:
                sub[k] = _stand_in(sub, k, self.skip)
        prefix = self.dump.prefix  # --append-views: the teachers run on the new views only
        boxes, params, partners, it = self.sampler.batches(
            self.dump.loader, self.manifest, sub, self.dump.branches, self.cfg.batch_size, self.cfg.workers,
            self.cfg.device, self.cfg.seed, self.cfg.hw_decoder_load, None if prefix is None else prefix.new)
        stored, extra = self.sampler.recorded(self.manifest, sub, boxes)  # label maps: regions, image sizes
        t, v, c = self.dump_shape[1:]
        buf: _ChunkBuffer | None = None
        pos = start
        while True:
            try:
                batch = next(it)
            except StopIteration:
                return None
            except DecodeError as e:
                return self._after_decode_error(pos, e)
            out, feats = self._teachers(batch.inputs(), t, c, batch.index.numpy())
            b = len(out)  # batches never straddle chunks (ChunkPlan): positions [pos, pos + b) are in one chunk
            if buf is None:
                buf = _ChunkBuffer(self.num_rows, int(plan.chunk[pos]), plan.rows, t, v, c, self.cfg.dtype,
                                   max(self.dump.feature_dims) if feats is not None else 0,
                                   params.shape[-1] if params is not None else 0)
                if prefix is not None:
                    prefix.fill(buf)
            real = plan.real[pos:pos + b]
            index = plan.order[pos:pos + b][real]
            rows = slice(pos - start, pos - start + b)
            buf.put_rows(index, out[real], self.manifest.labels[index],
                         stored[rows][real] if stored is not None else None,
                         feats[real] if feats is not None else None,
                         *((params[rows][real], partners[rows][real]) if params is not None else (None, None)),
                         first_view(prefix), {n: a[rows][real] for n, a in extra.items()})
            if pos + b == plan.chunk_end[pos]:  # chunk filled: queue it now, so a later decode error cannot lose it
                if prefix is not None:
                    prefix.check(buf)
                self.writer.submit(self.g, buf, self.skip)
                buf = None
            pos += b
            self.pbar.update(int(plan.real[pos - len(out):pos].sum()))
            self.pbar.set_postfix_str(f"chunk {int(plan.chunk[pos - 1])}")

    def _after_decode_error(self, pos: int, e: DecodeError) -> int:
        """Find the file behind a decode error (the loader names it, or a full decode from ``pos`` finds it),
        make it a suspect, and return the start of the unfinished chunk (its buffered rows are dropped)."""
        plan = self.plan
        chunk_start = int(plan.chunk_start[min(pos, len(plan) - 1)])
        self.pbar.update(-int(plan.real[chunk_start:pos].sum()))
        found = self.layout.find_corrupt(self.manifest, plan.order, pos, self.skip)
        if e.sample is not None and (found is None or int(plan.order[found[0]]) != e.sample):
            found = (next(p for p in range(pos, len(plan)) if int(plan.order[p]) == e.sample), str(e))
        if found is None:
            raise BankError(f"the {self.dump.loader} loader failed on the batch after sample {int(plan.order[pos])} "
                            f"but every file from there decodes with PIL: {e}") from None
        self.suspect[int(plan.order[found[0]])] = found[1]
        return chunk_start

    def _teachers(self, inputs: list[torch.Tensor], t: int, c: int,
                  index: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """One tensor per preprocessing branch, [B, 3, H, W] or [B, V, 3, H, W] -> logits [B, T, V, C] in the bank
        dtype (every view of its branch through each teacher), and with ``--features`` the embeddings [B, T, V, D]
        float32. Finiteness and the dtype's range are checked on the device; only the rounded logits cross to the
        host (half the bytes of float32 for a float16 bank). ``index`` [B]: the batch's samples, for messages."""
        inputs = [x.to(self.cfg.device, non_blocking=True) for x in inputs]
        with torch.autocast("cuda", enabled=self.cfg.amp and self.cfg.device == "cuda"):
            if inputs[0].ndim == 5:
                b_, v_ = inputs[0].shape[:2]
                out = self.model([x.flatten(0, 1) for x in inputs]).reshape(b_, v_, t, c).transpose(1, 2)
                f = self.model.features
                feats = None if f is None else f.reshape(b_, v_, t, -1).transpose(1, 2)
            else:
                out = self.model(inputs)
                out = out[:, :, None, :] if out.ndim == 3 else out  # label maps: [B, T, S·S, C] already
                feats = None if self.model.features is None else self.model.features[:, :, None, :]
        out = out.float()
        if _any_bad(out, self.cfg.dtype):  # the slow, exact path only when a row is bad (one flag crosses)
            _check_finite(out.cpu().numpy(), index, self.skip, self.manifest, self.cfg.dtype)
        if feats is not None and _any_bad(feats.float(), self.cfg.dtype):
            _check_finite(feats.float().cpu().numpy(), index, self.skip, self.manifest, self.cfg.dtype, "embeddings")
        dtype = torch.float16 if self.cfg.dtype == "float16" else torch.float32
        return out.to(dtype).cpu().numpy(), None if feats is None else feats.float().cpu().numpy()


def _stand_in(sub: np.ndarray, k: int, skip: set[int]) -> int:
    for d in range(1, len(sub)):
        for q in (k - d, k + d):
            if 0 <= q < len(sub) and int(sub[q]) not in skip:
                return int(sub[q])
    raise BankError("every sample is corrupt")


def _any_bad(x: torch.Tensor, dtype: str) -> bool:
    """Whether any value of ``x`` is non-finite or beyond the range of the bank ``dtype`` (one flag to the host)."""
    limit = float(np.finfo(np.dtype(dtype)).max)
    return bool((~torch.isfinite(x) | (x.abs() > limit)).any())


class _ChunkWriter:
    """The dump's background writer: complete chunks reach one thread through a bounded queue (2 chunks), which
    encodes, compresses and writes them (:func:`pipeline.bank.writer.write_chunk`: data arrays first, the done
    flag last), so the teachers never wait for zstd and zarr. Chunks are written in the order they were queued;
    a chunk still queued when the process is killed has no done flag, and a rerun writes it (resume stays bit for
    bit). The writer's error (an OSError, a BankError) is raised in the dump's thread at the next submit or at
    :meth:`close`."""

    def __init__(self, depth: int = 2):
        self.queue: queue.Queue = queue.Queue(maxsize=depth)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="bank-writer", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while True:
            item = self.queue.get()
            if item is None:
                return
            if self.error is None:
                g, buf, skip = item
                try:
                    buf.flush(g, skip)
                except BaseException as e:  # noqa: BLE001  (handed to the dump's thread)
                    self.error = e

    def submit(self, g, buf: "_ChunkBuffer", skip: set[int]) -> None:
        self._raise()
        self.queue.put((g, buf, frozenset(skip)))

    def close(self) -> None:
        """Write what is queued, stop the thread; raise the writer's error unless the dump is already failing."""
        if self.thread.is_alive():
            self.queue.put(None)
            self.thread.join()
        if sys.exc_info()[0] is None:
            self._raise()

    def _raise(self) -> None:
        if self.error is not None:
            error, self.error = self.error, None
            raise error


class _ChunkBuffer:
    """The rows of one row chunk, collected in memory (teacher logits [r, T, V, C] in the bank dtype, the rounding
    every bank applies: half the memory of float32 for a chunk of many views) and written (with its done flag)
    once complete; :func:`pipeline.bank.writer.write_chunk` encodes them for a compact bank."""

    def __init__(self, n: int, j: int, rows: int, t: int, v: int, c: int, dtype: str = "float32", d: int = 0,
                 a: int = 0):
        r = min(n, (j + 1) * rows) - j * rows
        self.j, self.start = j, j * rows
        self.logits = np.full((r, t, v, c), np.nan, dtype)
        self.labels = np.full(r, -1, np.int32)
        self.views = np.full((r, v, 5), np.nan, np.float32)
        self.features = np.full((r, t, v, d), np.nan, np.float32) if d else None
        self.params = np.full((r, v, a), np.nan, np.float32) if a else None  # stored view parameters
        self.partners = np.full((r, v), -1, np.int32) if a else None
        self.extra: dict[str, np.ndarray] = {}
        self.rows = r

    def put_rows(self, index: np.ndarray, logits: np.ndarray, labels: np.ndarray, boxes: np.ndarray | None,
                 features: np.ndarray | None = None, params: np.ndarray | None = None,
                 partners: np.ndarray | None = None, first_view: int = 0,
                 extra: dict[str, np.ndarray] | None = None) -> None:
        """Rows of samples ``index`` [b] (in this chunk): logits [b, T, V - first_view, C] of views first_view..,
        labels [b], boxes [b, V, 5] or None (center views: NaN), embeddings [b, T, V - first_view, D] or None, view
        parameters [b, V, A] and partners [b, V] (policies that store them), ``extra``: other per-row arrays of
        the format by name ([b, ...]: a map bank's ``image_size``). ``first_view`` > 0: the earlier view slots were
        filled already (``--append-views``)."""
        r = np.asarray(index, np.int64) - self.start
        for name, arr in (extra or {}).items():
            if name not in self.extra:
                self.extra[name] = np.full((self.rows,) + arr.shape[1:], -1, arr.dtype)
            self.extra[name][r] = arr
        self.logits[r, :, first_view:] = logits
        self.labels[r] = labels
        self.views[r] = boxes if boxes is not None else np.nan
        if self.features is not None:
            self.features[r, :, first_view:] = features
        if self.params is not None:
            self.params[r], self.partners[r] = params, partners

    def flush(self, g, skip: set[int] | frozenset[int]) -> None:
        skipped = np.array([(self.start + k) in skip for k in range(len(self.labels))], bool)
        self.logits[skipped] = np.nan
        if self.features is not None:
            self.features[skipped] = np.nan
        if (self.labels[~skipped] < 0).any():
            raise BankError(f"internal error: chunk {self.j} incomplete at flush")
        write_chunk(g, self.j, self.logits, self.labels, self.views, skipped, self.features, self.params,
                    self.partners, self.extra)


def _check_finite(out: np.ndarray, index: np.ndarray, skip: set[int], manifest: Manifest,
                  dtype: np.dtype | str = np.float32, what: str = "logits") -> None:
    bad = ~np.isfinite(out.reshape(len(out), -1)).all(axis=1)
    for k in np.flatnonzero(bad):
        i = int(index[k])
        if i not in skip:
            raise BankError(f"teacher produced non-finite {what} for sample {i} ({manifest.files[i]}); "
                            "nothing was marked done for its chunk")
    # finite in float32 but beyond the bank dtype's range (|x| > 65504 in float16): would be stored as inf
    with np.errstate(over="ignore"):
        over = ~np.isfinite(out.astype(dtype).reshape(len(out), -1)).all(axis=1)
    for k in np.flatnonzero(over):
        i = int(index[k])
        if i not in skip:
            raise BankError(f"teacher {what} of sample {i} ({manifest.files[i]}) reach "
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
