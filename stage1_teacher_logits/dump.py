"""Stage 1: run teachers over a dataset with DALI and store their logits in a label bank.

Resumable (chunks marked done are skipped; an interrupted dump re-run with the same command writes only the
missing chunks and produces the same bytes), shardable over torchrun ranks (each rank owns whole row chunks),
content-addressed (the same command twice is a no-op that prints the bank path). ``--format topk --topk K`` /
``--format sampled --topk K --samples S`` / ``--format int8`` write a compact bank directly, chunk by chunk (the format's encoder, stage1_teacher_logits/encoders.py, encodes each batch; no dense array
is written), with the same guarantees.
"""

from __future__ import annotations

import enum
import logging
import math
import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from pipeline import storage
from pipeline.bank.compact import check_format_args
from pipeline.bank.labelmap import MAP_DTYPES, MAP_REGIONS, check_map_args, chunk_rows, map_metrics, map_record
from pipeline.bank.identity import BankSpec, bank_identity, cached_banks, preprocessing_record, view_record
from pipeline.bank.reader import LabelBank, missing_chunk_files, open_group
from pipeline.bank.schema import DEFAULT_ROWS_PER_CHUNK, FORMATS
from pipeline.bank.stats import entry_names
from pipeline.bank.writer import (chunk_sums_attrs, create_bank, done_flags, mark_complete, metric_sums_attrs,
                                  remove_partial_writes)
from pipeline.config import RESUME_MATCH, key, to_dict
from pipeline.data import Manifest, build_manifest
from pipeline.data.layouts import SPLITS
from pipeline.data.loaders import resolve_loader
from pipeline.data.presets import teacher_preprocess, typical_side, upscale_warning
from pipeline.distributed import DistInfo, barrier, broadcast_object, cleanup, cores_per_local_rank, init_distributed
from pipeline.errors import BankError, UsageError
from pipeline.metrics import teacher_metrics_of
from pipeline.models.ensemble import TeacherEnsemble
from pipeline.models.teachers import build_teachers, class_maps_record, parse_teachers, read_class_map
from stage1_teacher_logits.append import ViewPrefix, append_config
from stage1_teacher_logits.label_maps import MapRegion, build_map_model, map_attrs
from stage1_teacher_logits.plan import ChunkPlan
from stage1_teacher_logits.producer import Producer
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
    for name in ("batch_size", "rows_per_chunk", "workers", "views"):
        value = getattr(cfg, name)
        if value is not None and value < 1:
            raise UsageError(f"{name}={value} must be >= 1")
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
            if cfg.overwrite:
                log.warning("--overwrite replaces a different bank only: %s already holds this one, complete, and is "
                            "reused; to dump it again, remove it first", dump.path)
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
                try:
                    lost = missing_chunk_files(LabelBank(path))  # existence only: one listing per chunk
                except BankError:  # readers name what they refuse; the dump reuses the bank as before
                    lost = {}
                if not lost:
                    return PrepareStatus.COMPLETE
                name, keys = next(iter(lost.items()))
                what = f"array '{name}' misses chunk file(s) {', '.join(keys[:3])}"
                if not self.cfg.overwrite:
                    raise BankError(f"{path} holds this bank, complete but damaged ({what}); rerun with --overwrite "
                                    "to dump it again")
                log.warning("%s is damaged (%s): dumping it again (--overwrite)", path, what)
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
                    self.cfg.sample_seed, label_map=self.label_map, metric_sums=self.cfg.format == "dense")
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
        t0 = time.time()
        with _teacher_threads(self.cfg):
            Producer(self, g, model, plan, sampler, info).run()
        log.info("rank %d dumped %d samples in %.1fs", info.rank, plan.num_real, time.time() - t0)

    # --- finalize -------------------------------------------------------------------------------------------
    def finalize(self) -> None:
        """Teacher metrics summed from the per-chunk sums stored with the chunks (dense: ``metric_sums``; compact:
        ``chunk_sums``: ``metrics`` of what stage 2 reads, ``source_metrics`` of the teachers, ``fidelity``), or
        read back from the bank (a dense bank begun before ``metric_sums``; label maps), then ``complete =
        True``."""
        g = open_group(self.path, "r+")
        names = entry_names(list(self.spec.teachers), len(self.specs))
        if self.cfg.format == "dense" and "metric_sums" in g:
            extra = metric_sums_attrs(g, names)
        elif self.cfg.format == "dense":
            extra = {"metrics": teacher_metrics(g, list(self.spec.teachers))}
        elif self.cfg.format == "labelmap":  # label maps: metrics of each map's mean over its cells
            extra = {"metrics": map_metrics(g, list(self.spec.teachers))}
        else:
            extra = chunk_sums_attrs(g, names)
        mark_complete(g, extra)
        log.info("bank complete: %s  %s", self.path, extra)


@contextmanager
def _teacher_threads(cfg: DumpConfig):
    """On a CPU, the teachers get this rank's share of the cores (``--workers``, default the cores per local
    rank; the loader's threads default to the same), not torch's default of every core of the node (torchrun
    ranks would oversubscribe it); restored afterwards."""
    if cfg.device != "cpu":
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(max(1, int(cfg.workers or cores_per_local_rank())))
    try:
        yield
    finally:
        torch.set_num_threads(before)


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
    return teacher_metrics_of(g, teachers, lambda s, e: g["logits"][s:e, :, 0])
