"""Label sources: where a batch's teacher entries (``teacher_logits`` [B, T, C]) come from.

Three implementations of one :class:`LabelSource` protocol (a batch's teacher entries are either
``teacher_logits`` [B, T, C] -- dense and int8 banks, a live teacher -- or ``teacher_target``, a
:class:`kd_losses.targets.SparseTarget` -- top-k and sampled banks, whose losses build the target at their own
temperature; a method that cannot be correct from a format is refused before training, in one line):

- :class:`BankLabelSource`: one or more label banks held in memory (compact banks compact) and gathered by
  sample index, only the batch's rows densified (the point of this project: no per-step zarr reads, no teacher
  model);
- :class:`LiveTeacherLabelSource`: a teacher ensemble run on every batch (comparisons only);
- :class:`NoLabelSource`: methods without a teacher (``ce``, ``ls``, ``tfkd_reg``).

The training loop calls ``batch.update(source(batch))`` and knows nothing else about them. Stage 2 never imports
stage 1 and, with a bank, never builds a teacher model. See docs/DESIGN.md, "Label sources".
"""

from __future__ import annotations

import logging
import os
from typing import Any, Callable, Protocol, Sequence, runtime_checkable

import numpy as np
import torch

import kd_losses
from pipeline.bank.identity import cache_root, cached_banks, teacher_match
from pipeline.bank.reader import LabelBank, require_chunks
from pipeline.bank.resident import FeatureResident, check_host_memory, feature_nbytes, load_residents
from pipeline.data import Manifest
from pipeline.data.presets import resolve_preset
from pipeline.errors import BankError, UsageError
from pipeline.models.teachers import TeacherSpec, build_teachers, parse_teachers

log = logging.getLogger(__name__)


@runtime_checkable
class LabelSource(Protocol):
    """What stage 2 needs from a source of soft labels.

    Attributes:
        teachers: identity records of the teachers on the T axis (bank attrs, or built from the live specs).
        paths: the banks read ([] for a live teacher or none).
        bank_keys: their identities (the ``key`` attr: what made them, not where they are), in the same order.
        skipped: [N] bool, samples without soft labels (excluded from training), or None.
        num_views: V, views stored per sample (1 for live teachers and none).
        stores_views: whether the source stores random-crop views (boxes) that ``--replay-views`` replays (a bank
            dumped with ``--view-policy rrc``, even with one view); False for a center-crop bank, live or none.
        preprocessing: the bank's ``preprocessing`` attr (how its teachers saw the images), or None.
        feature_dim: D of the ``teacher_features`` it adds (built with ``features=True``), else None.
        draws_crops: whether the source draws each epoch's training crops itself (:meth:`boxes`, replayed by the
            loader): a label-map bank (:class:`stage2_student_train.map_labels.MapLabelSource`).
    """

    teachers: list[dict[str, Any]]
    paths: list[str]
    bank_keys: list[str]
    skipped: np.ndarray | None
    num_views: int
    stores_views: bool
    preprocessing: dict[str, Any] | None
    feature_dim: int | None
    draws_crops: bool

    def boxes(self, order: np.ndarray, epoch: int) -> np.ndarray:
        """Crop boxes [len(order), 1, 5] (y, x, h, w, flip) of the view each sample replays in ``epoch``;
        UsageError when the source stores no views."""
        ...

    def view_params(self, order: np.ndarray, epoch: int) -> dict[str, np.ndarray] | None:
        """For a bank whose view policy stores parameters (:mod:`pipeline.data.policy`): the replayed views'
        ``params`` [len(order), 1, A], ``partners`` [len(order), 1] and the partners' own ``partner_boxes``
        [.., 1, 5] and ``partner_params`` [.., 1, A] (what :func:`pipeline.data.loaders.load_mixed_batches`
        takes); None otherwise."""
        ...

    def __call__(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Entries to add to ``batch`` (which holds ``image`` [B, 3, H, W], ``index`` [B], ``epoch``):
        ``{"teacher_logits": [B, T, C] float32}`` or ``{"teacher_target": SparseTarget}`` (top-k and sampled
        banks), and ``"teacher_features": [B, T, D]`` float32 when built with ``features=True``, on the images'
        device; or ``{}``."""
        ...


VIEW_ORDERS = ("cycle", "hash")


def view_choice(index: torch.Tensor, epoch: int, seed: int, num_views: int, order: str = "cycle") -> torch.Tensor:
    """Which stored view sample ``index`` uses in ``epoch`` -> [B] int64 in [0, num_views).

    ``order`` (``view_order``): ``cycle``: view ``(epoch + offset(i)) mod V``, ``offset(i)`` a seeded hash of the
    sample (not of the epoch): every sample sees a different view each epoch and all V of them in V consecutive
    epochs (its views in turn, then again from its offset: with V < E epochs views repeat, and the run warns),
    while one batch mixes view slots; ``hash``: a seeded hash of (sample, epoch), drawn independently each epoch
    (every view gets used on average, repeats are possible; the order before ``view_order`` existed). CPU tensors
    are hashed through numpy (15 us instead of 50 us per 256-row batch), with the same int64 arithmetic."""
    if order not in VIEW_ORDERS:
        raise UsageError(f"unknown view order '{order}'; valid: {', '.join(VIEW_ORDERS)}")
    on_cpu = index.device.type == "cpu"
    x = index.numpy().astype(np.int64) if on_cpu else index.to(torch.int64)
    if order == "hash":
        v = _view_hash(x, epoch, seed, num_views)
    else:
        v = (_view_hash(x, -1, seed, num_views) + epoch) % num_views
    return torch.from_numpy(v) if on_cpu else v


def _view_hash(x, epoch: int, seed: int, num_views: int):
    """The hash of :func:`view_choice` on an int64 numpy array or torch tensor (wrapping multiplication,
    arithmetic shifts, floor modulo: the same on both). ``epoch = -1`` hashes the sample and seed only."""
    x = x * 0x9E3779B1 + (epoch + 1) * 0x85EBCA77 + (seed + 1) * 0xC2B2AE3D
    x = (x ^ (x >> 15)) * 0x2C1B3C6D
    x = x ^ (x >> 12)
    return x % num_views


class NoLabelSource:
    """Methods without a teacher: adds nothing to the batch."""

    draws_crops = False

    def __init__(self) -> None:
        self.teachers: list[dict[str, Any]] = []
        self.paths: list[str] = []
        self.bank_keys: list[str] = []
        self.skipped: np.ndarray | None = None
        self.num_views = 1
        self.stores_views = False
        self.preprocessing: dict[str, Any] | None = None
        self.feature_dim: int | None = None

    def boxes(self, order: np.ndarray, epoch: int) -> np.ndarray:
        raise UsageError("--replay-views needs a bank with stored views (dump with --views K --view-policy rrc)")

    def view_params(self, order: np.ndarray, epoch: int) -> dict[str, np.ndarray] | None:
        return None

    def __call__(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        return {}


class BankLabelSource:
    """Teacher logits of one or more banks held in memory (:mod:`pipeline.bank.resident`: dense banks in their
    dtype, compact banks compact), gathered by ``batch['index']`` and densified to [B, T, C] float32 on the
    batch's device (several banks: concatenated on T); with ``replay_seed`` the view of each sample follows
    :func:`view_choice` in ``view_order``, else view 0.

    Attributes: ``residents`` (one :class:`pipeline.bank.resident.ResidentBank` per bank), ``num_samples``,
    ``num_views``, ``skipped``, ``teachers``, ``paths``; ``views``: the first bank's boxes [N, V, 5], read from
    the bank when accessed (None without stored views). The boxes are not held: :meth:`boxes` reads the one
    box per sample an epoch replays, chunk by chunk (20 B per sample and view would be half a top-10 bank).
    """

    draws_crops = False

    def __init__(self, banks: list[LabelBank], device: str = "cpu", replay_seed: int | None = None,
                 progress: bool = False, features: bool = False, items: Sequence[tuple[str, int]] = (),
                 view_order: str = "cycle"):
        """``features``: also hold the banks' stored embeddings and add ``teacher_features`` [B, T, D] (every
        bank's zero-padded to the widest D); a bank without them is a one-line UsageError. ``items``: the run's
        other host allocations, checked with the banks (``pipeline.bank.resident.check_host_memory``)."""
        first = banks[0]
        for b in banks[1:]:
            for what, a, c in (("num_samples", b.num_samples, first.num_samples),
                               ("num_views", b.num_views, first.num_views),
                               ("num_classes", b.num_classes, first.num_classes)):
                if a != c:
                    raise BankError(f"banks {first.path} and {b.path} differ in field '{what}' ({c} vs {a})")
        self.paths = [b.path for b in banks]
        self.bank_keys = [str(b.attrs.get("key", "")) for b in banks]
        self.feature_residents: list[FeatureResident] = []
        self.feature_dim: int | None = None
        reserve = 0
        if features:
            lacking = [b.path for b in banks if not b.feature_meta]
            if lacking:
                raise UsageError(f"this method needs the teachers' stored embeddings; {lacking[0]} has none: dump "
                                 "it again with --features")
            reserve = sum(feature_nbytes(b) for b in banks)
        kinds = {_target_kind(b) for b in banks}
        if len(kinds) > 1:
            raise UsageError(f"banks {', '.join(self.paths)} hold targets of different kinds ({', '.join(sorted(kinds))}):"
                             " stack banks of one kind on the teacher axis (dense/int8, or top-k / sampled with the "
                             "same K and S)")
        self.residents = load_residents(banks, device, progress, reserve=reserve, items=items)
        if features:
            self.feature_residents = load_residents(banks, device, progress, kind=FeatureResident)
            self.feature_dim = max(r.dim for r in self.feature_residents)
        self.device = device
        self.num_samples = first.num_samples
        self.num_views = first.num_views
        self._views_bank = first if first.num_views > 1 or _has_boxes(first) else None
        self.stores_views = self._views_bank is not None
        self.skipped = np.logical_or.reduce([b.skipped() for b in banks])
        self.teachers = [t for b in banks for t in b.teachers]
        self.preprocessing = first.attrs.get("preprocessing")
        self.replay_seed = replay_seed
        self.view_order = view_order
        self._mix = _mix_arrays(first) if replay_seed is not None else None

    @property
    def views(self) -> torch.Tensor | None:
        """[N, V, 5] crop boxes of the first bank (read now), or None when it stores no views."""
        return None if self._views_bank is None else torch.from_numpy(self._views_bank.views())

    @property
    def rows_device(self) -> str:
        """Where the soft labels are held: ``cuda`` (GPU memory) or ``cpu`` (host memory)."""
        return str(torch.device(self.residents[0].device).type)

    def boxes(self, order: np.ndarray, epoch: int) -> np.ndarray:
        if self._views_bank is None:
            raise UsageError("--replay-views needs a bank with stored views (dump with --views K --view-policy rrc)")
        idx = np.asarray(order, np.int64)
        v = view_choice(torch.from_numpy(idx), epoch, self.replay_seed or 0, self.num_views, self.view_order).numpy()
        return self._read_chosen("views", idx, v)[:, None, :]

    def view_params(self, order: np.ndarray, epoch: int) -> dict[str, np.ndarray] | None:
        bank = self._views_bank
        if bank is None or "view_params" not in bank.group:
            return None
        idx = np.asarray(order, np.int64)
        v = view_choice(torch.from_numpy(idx), epoch, self.replay_seed or 0, self.num_views, self.view_order).numpy()
        partners = self._read_chosen("view_partner", idx, v)
        safe = np.maximum(partners, 0).astype(np.int64)
        return {"params": self._read_chosen("view_params", idx, v)[:, None], "partners": partners[:, None],
                "partner_boxes": self._read_chosen("views", safe, v)[:, None],
                "partner_params": self._read_chosen("view_params", safe, v)[:, None]}

    def _read_chosen(self, name: str, idx: np.ndarray, v: np.ndarray) -> np.ndarray:
        """``name``[idx[k], v[k]] for every k of a per-(sample, view) array of the first bank, read chunk by chunk
        (the array is not held)."""
        bank = self._views_bank
        step = max(1, bank.rows_per_chunk)
        arr = bank.group[name]
        out = np.empty((len(idx), *arr.shape[2:]), arr.dtype)
        by_row = np.argsort(idx, kind="stable")
        bounds = np.searchsorted(idx[by_row], np.arange(0, self.num_samples + step, step))
        for j in range(len(bounds) - 1):
            sel = by_row[bounds[j]:bounds[j + 1]]
            if len(sel):
                s = j * step
                chunk = bank.read_rows(name, s, min(self.num_samples, s + step))
                out[sel] = chunk[idx[sel] - s, v[sel]]
        return out

    def __call__(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        index = batch["index"]
        view = None
        if self.replay_seed is not None and self.num_views > 1:
            view = view_choice(index, batch["epoch"], self.replay_seed, self.num_views, self.view_order)
        image = batch.get("image")
        target = image.device if image is not None else torch.device(self.device)
        out = [r.target(index, view, target) for r in self.residents]
        if "teacher_target" in out[0]:
            from kd_losses.targets import SparseTarget

            entries: dict[str, Any] = {"teacher_target": SparseTarget.cat([o["teacher_target"] for o in out])}
        else:
            logits = [o["teacher_logits"] for o in out]
            entries = {"teacher_logits": logits[0] if len(logits) == 1 else torch.cat(logits, dim=1)}
        if self._mix is not None:
            entries.update(_mix_entries(self._mix, index, view, target))
        if batch.get("index_mix") is not None and "teacher_logits" in entries:  # --mix-labels blend
            other = [r.target(batch["index_mix"], view, target)["teacher_logits"] for r in self.residents]
            entries["teacher_logits"] = blend_logits(entries["teacher_logits"], torch.cat(other, dim=1),
                                                     batch["lam"].to(target))
        if self.feature_residents:
            f = [r.gather(index, view, target) for r in self.feature_residents]
            f = [torch.nn.functional.pad(x, (0, self.feature_dim - x.shape[-1])) for x in f]
            entries["teacher_features"] = f[0] if len(f) == 1 else torch.cat(f, dim=1)
        return entries


def _target_kind(bank: LabelBank) -> str:
    """What a bank's batches carry: ``logits`` (dense, int8) or its sparse format with K and S."""
    if bank.format in ("topk", "sampled"):
        return f"{bank.format} K={bank.attrs.get('topk')} S={bank.attrs.get('samples') or 0}"
    return "logits"


def blend_logits(z1: torch.Tensor, z2: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    """FKD / ReLabel's approximate soft label of a mixed image: the two images' T = 1 teacher distributions
    blended by λ, as logits (log-probabilities) [B, T, C]: ``log(lam·softmax(z1) + (1 − lam)·softmax(z2))``;
    ``lam`` [B]. A loss at temperature T softens this blend (not the blend of the softened ones)."""
    w = lam.to(z1.dtype).clamp(0, 1)[:, None, None]
    a = torch.log_softmax(z1, dim=-1) + torch.log(w)
    b = torch.log_softmax(z2, dim=-1) + torch.log1p(-w)
    return torch.logaddexp(a, b)


def _mix_arrays(bank: LabelBank) -> tuple[torch.Tensor, torch.Tensor] | None:
    """A mixing bank's per (sample, view) partner class [N, V] int64 (its own class where unmixed) and λ [N, V]
    float32 (8 B per view held, 16 B while building), or None for a bank without mixed views."""
    if "view_partner" not in bank.group:
        return None
    partner = bank.read_rows("view_partner", 0, bank.num_samples).astype(np.int64)
    if (partner < 0).all():
        return None
    labels = bank.labels().astype(np.int64)
    lam = bank.read_rows("view_params", 0, bank.num_samples)[..., 5].astype(np.float32)
    own = np.broadcast_to(labels[:, None], partner.shape)
    return torch.from_numpy(np.where(partner >= 0, labels[np.maximum(partner, 0)], own)), torch.from_numpy(lam)


def _mix_entries(mix: tuple[torch.Tensor, torch.Tensor], index: torch.Tensor, view: torch.Tensor | None,
                 device: torch.device) -> dict[str, torch.Tensor]:
    """``label_mix`` [B] int64 and ``lam`` [B] float32 of the replayed views (the mixed-label contract of
    :func:`kd_losses._common.cross_entropy`)."""
    label_mix, lam = mix
    v = view if view is not None else torch.zeros_like(index)
    return {"label_mix": label_mix[index, v].to(device), "lam": lam[index, v].to(device)}


def _has_boxes(bank: LabelBank) -> bool:
    return bank.attrs.get("views", {}).get("policy", "center") != "center"


class LiveTeacherLabelSource:
    """Runs a teacher ensemble on each batch's images (eval mode, inference mode) -> [B, T, C]."""

    draws_crops = False

    def __init__(self, specs: Sequence[TeacherSpec], classes: Sequence[str] | int, device: str, seed: int = 0,
                 crop: int = 224, features: bool = False, amp: str = "none"):
        """``classes``: the dataset's class names (or their number): pretrained teachers are mapped onto them;
        ``crop``: the input size (to count a pretrained teacher's outputs); ``features``: also add the teachers'
        embeddings (``teacher_features`` [B, T, D], zero-padded to the widest); ``amp``: ``none``, ``bf16`` or
        ``fp16``: the teachers run under the run's autocast (their outputs are returned in float32)."""
        self.model = build_teachers(list(specs), classes, device, seed, crops=[crop] * len(specs))
        self.autocast = (torch.device(device).type, {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp))
        self.feature_dim = max(self.model.enable_features([crop] * len(specs))) if features else None
        self.teachers = [s.identity() for s in specs]
        self.paths: list[str] = []
        self.bank_keys: list[str] = []
        self.skipped: np.ndarray | None = None
        self.num_views = 1
        self.stores_views = False
        self.preprocessing: dict[str, Any] | None = None

    def boxes(self, order: np.ndarray, epoch: int) -> np.ndarray:
        raise UsageError("--replay-views replays a bank's stored views; a live teacher has none")

    def view_params(self, order: np.ndarray, epoch: int) -> dict[str, np.ndarray] | None:
        return None

    def __call__(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        device_type, dtype = self.autocast
        with torch.autocast(device_type, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            entries = {"teacher_logits": self.model(batch["image"]).float()}
            if self.feature_dim is not None:
                entries["teacher_features"] = self.model.features.float()
        return {k: v.clone() for k, v in entries.items()}


def find_bank(manifest: Manifest, specs: Sequence[TeacherSpec], replay_views: bool = False,
              preset: str = "auto", weights_given: bool = True, data: str | None = None) -> str:
    """The cached bank of teachers ``specs`` on this data: a complete bank in the cache whose dataset fingerprint
    and teacher identities match (wherever the data lives and whatever its folder is called). Among several,
    ``replay_views`` wants stored views; otherwise a plain dump (one center view, dense) is preferred. None, or
    several equally good: a one-line UsageError (:func:`missing_bank_hint`, or the candidates).

    ``weights_given``: whether the user named the weights (``--teacher-weights``); ``data``: ``--data`` as given
    (for the hint's command)."""
    want = [teacher_match(s.identity()) for s in specs]
    on_data = [b for b in cached_banks() if b.complete and b.fingerprint == manifest.fingerprint]
    found = [b for b in on_data if [teacher_match(t) for t in b.attrs.get("teachers", [])] == want]
    if replay_views:
        found = [b for b in found if b.attrs.get("views", {}).get("policy", "center") != "center"]
    elif len(found) > 1:
        plain = [b for b in found if b.attrs.get("views", {}).get("policy") == "center"
                 and b.attrs.get("format", "dense") == "dense"]
        found = plain or found
    if len(found) == 1:
        return found[0].path
    if found:
        raise UsageError(f"several banks match --teacher {' '.join(s.arch for s in specs)}: "
                         f"{', '.join(b.path for b in found)}; choose one with --labels")
    raise UsageError(missing_bank_hint(manifest, specs, on_data, replay_views, preset, weights_given, data))


def missing_bank_hint(manifest: Manifest, specs: Sequence[TeacherSpec], on_data: Sequence[Any],
                      replay_views: bool, preset: str, weights_given: bool, data: str | None) -> str:
    """The message for a ``--teacher`` lookup that found no bank: the cached banks of the same teacher names on this
    data (``on_data``: complete banks with its fingerprint), with their weights and how to use one; then the dump
    command that makes the wanted bank, built from the user's own flags. A model without named weights gets a
    placeholder checkpoint, never ``--weights DEFAULT`` (which would fail)."""
    from pipeline.models.registry import check_model_name, has_named_weights

    archs = [s.arch for s in specs]
    for arch in archs:  # a typo is not a missing bank: never suggest dumping a model that does not exist
        check_model_name(arch)
    same_names = [b for b in on_data if [t.get("arch") for t in b.attrs.get("teachers", [])] == archs]
    msg = f"no bank of {' + '.join(archs)}"
    msg += f" (weights {', '.join(str(s.weights) for s in specs)})" if weights_given else ""
    msg += f" for {manifest.root} ({manifest.split}) in {cache_root()}"
    if same_names:
        listed = "; ".join(f"{b.path} (weights {', '.join(str(t.get('weights')) for t in b.attrs['teachers'])})"
                           for b in same_names[:4]) + ("; ..." if len(same_names) > 4 else "")
        flags = " ".join(f"--teacher-weights {t.get('weights')}" for t in same_names[0].attrs["teachers"])
        msg += f"; cached banks of {' + '.join(archs)} on this data: {listed}: use one with {flags} or --labels PATH"

    def weights_of(s: TeacherSpec) -> str:
        if weights_given or has_named_weights(s.arch):
            return str(s.weights)
        return "CHECKPOINT.pt"  # no named weights: the user's checkpoint file

    teachers = " ".join(f"--teacher {s.arch} --weights {weights_of(s)}" for s in specs)
    views = " --views 8 --view-policy rrc+flip" if replay_views else ""
    preset_flag = f" --preset {preset}" if preset != "auto" else ""
    placeholder = "" if all(weights_of(s) != "CHECKPOINT.pt" for s in specs) else \
        f" ({' + '.join(archs)} has no named weights: CHECKPOINT.pt is your teacher's checkpoint file)"
    msg += (f"; make it with python -m pipeline.dump_logits {teachers} --data {data or manifest.root} "
            f"--split {manifest.split}{preset_flag}{views}{placeholder} (or give --labels PATH)")
    return msg


def _check_teachers_agree(cfg: Any, banks: list[LabelBank]) -> None:
    """``--teacher`` (and ``--teacher-weights``) beside ``--labels``: they must name the banks' teachers, in order
    (arch; with weights given, weights and checkpoint sha256 too); else a one-line UsageError."""
    have = [t for b in banks for t in b.teachers]
    if cfg.teacher_weights:
        specs = parse_teachers(cfg.teacher, cfg.teacher_weights, cfg.seed, ("--teacher", "--teacher-weights"))
        agree = [teacher_match(s.identity()) for s in specs] == [teacher_match(t) for t in have]
    else:
        agree = list(cfg.teacher) == [t.get("arch") for t in have]
    if not agree:
        held = " + ".join(f"{t.get('arch')} ({t.get('weights')})" for t in have)
        raise UsageError(f"--teacher {' '.join(cfg.teacher)} is not what the bank(s) of --labels hold ({held}): "
                         "drop --teacher/--teacher-weights (--labels gives the bank), or give that teacher's bank")


RunItems = Callable[[int | None, int | None, int], list[tuple[str, int]]]


def build_label_source(cfg: Any, train: Manifest, run_items: RunItems | None = None) -> LabelSource:
    """The label source a run needs: bank(s) in memory, a live teacher, or none (``cfg``: a TrainConfig).

    ``run_items(num_teachers, teacher_dim, crop)``: the run's other large host allocations on this node
    (``stage2_student_train.memory.run_items``), checked with the banks before they are read (one line when the
    run does not fit)."""
    def items(banks: list[LabelBank]) -> list[tuple[str, int]]:
        if run_items is None:
            return []
        dims = [max(b.feature_meta["dims"]) for b in banks if b.feature_meta]
        pre = (banks[0].attrs.get("preprocessing") or {}) if banks else {}
        crop = int(pre.get("crop") or resolve_preset(cfg.preset, train).crop)
        return run_items(sum(b.num_teachers for b in banks) or None, max(dims) if dims else None, crop)

    if cfg.cutmix and (cfg.live_teacher or not kd_losses.needs_teacher(cfg.method)):
        raise UsageError(f"--cutmix mixes the soft labels of a label-map bank (--format labelmap); method "
                         f"'{cfg.method}'{' with --live-teacher' if cfg.live_teacher else ''} reads none: drop --cutmix")
    if cfg.live_teacher or not kd_losses.needs_teacher(cfg.method):
        check_host_memory([], 0, items([]))
    if cfg.live_teacher:
        specs = parse_teachers(cfg.live_teacher, cfg.live_teacher_weights, cfg.seed,
                               ("--live-teacher", "--live-teacher-weights"))
        crop = resolve_preset(cfg.preset, train).crop
        return LiveTeacherLabelSource(specs, train.classes, cfg.device, cfg.seed, crop, amp=cfg.amp,
                                      features=kd_losses.needs_features(cfg.method))
    if not kd_losses.needs_teacher(cfg.method):
        if cfg.banks or cfg.teacher:
            log.warning("method '%s' uses no teacher: the bank given (--labels/--teacher) is not read",
                        cfg.method)
        return NoLabelSource()
    paths = list(cfg.banks)
    if not paths:
        if not cfg.teacher:
            raise UsageError(f"method '{cfg.method}' needs soft labels: give --labels BANK or --teacher NAME")
        specs = parse_teachers(cfg.teacher, cfg.teacher_weights, cfg.seed, ("--teacher", "--teacher-weights"))
        paths = [find_bank(train, specs, cfg.replay_views, cfg.preset, bool(cfg.teacher_weights), cfg.data)]
    banks = [LabelBank(p) for p in paths]
    if cfg.banks and cfg.teacher:
        _check_teachers_agree(cfg, banks)
    if cfg.mix_labels:
        _check_blend(banks)
    if any(b.format == "labelmap" for b in banks) or cfg.cutmix:  # label maps (stage2_student_train/map_labels.py)
        return build_map_source(cfg, train, banks, items(banks))
    for b in banks:
        b.validate(train)
        made_by = b.attrs.get("loader", "dali")
        if made_by != cfg.loader:
            log.warning("bank %s was dumped with the %s loader and this run decodes with %s: resampling differs "
                        "slightly (docs/GPU.md gives the measured logit difference)", b.path, made_by, cfg.loader)
        if cfg.replay_views and b.num_views == 1 and not _has_boxes(b):
            raise UsageError(f"--replay-views needs a bank with stored views; {b.path} has only the center view")
        if cfg.replay_views:  # a lost chunk would replay NaN boxes / parameters, or partners -1 read as "not mixed"
            require_chunks(b, ("views", "view_params", "view_partner"))
        if not cfg.replay_views and "view_params" in b.group:
            raise UsageError(f"{b.path} stores augmented views ({b.attrs['views']['policy']}): its soft labels are "
                             "the teachers' on those images; train with --replay-views")
    for b in banks:
        try:
            kd_losses.check_teacher_format(cfg.method, b.format, sum(x.num_teachers for x in banks))
        except ValueError as e:
            raise UsageError(f"{e} (bank {b.path})") from None
    src = BankLabelSource(banks, cfg.device, replay_seed=cfg.seed if cfg.replay_views else None,
                          progress=int(os.environ.get("RANK", "0")) == 0, features=kd_losses.needs_features(cfg.method),
                          items=items(banks), view_order=cfg.view_order)
    if cfg.replay_views and src.num_views < cfg.epochs and int(os.environ.get("RANK", "0")) == 0:
        log.warning("%d stored views for %d epochs: each sample's views repeat (view order %s); dump more with "
                    "python -m pipeline.dump_logits --append-views %s --views %d", src.num_views, cfg.epochs,
                    cfg.view_order, paths[0], cfg.epochs)
    log.info("soft labels from %s: %s", ", ".join(paths),
             ", ".join(f"{r.format} [N, T, V, C] = {list(r.shape)} ({r.nbytes / 1e9:.3g} GB on {r.device})"
                       for r in src.residents))
    return src



def _check_blend(banks: list[LabelBank]) -> None:
    """``--mix-labels blend``: UsageError for banks whose stored labels cannot be blended (a label map mixes
    region-exact with ``--cutmix``; top-k and sampled targets are not logits); else the approximation warning."""
    if any(b.format == "labelmap" for b in banks):
        raise UsageError("--mix-labels blend blends stored whole-image labels; a label-map bank mixes region-exact "
                         "with --cutmix ALPHA instead")
    sparse = [b for b in banks if b.format in ("topk", "sampled")]
    if sparse:
        raise UsageError(f"--mix-labels blend blends dense logits; {sparse[0].path} is a {sparse[0].format} bank: "
                         "use a dense or int8 bank")
    log.warning("--mix-labels blend: Mixup/CutMix targets blended from the two images' stored soft labels by "
                "lambda (FKD/ReLabel); approximate, the teacher's output on a mixed image is not the blend of its "
                "outputs (exact: dump with a mixing --view-policy and train with --replay-views)")


def build_map_source(cfg: Any, train: Manifest, banks: list[LabelBank], items: Sequence[tuple[str, int]] = ()) -> Any:
    """A :class:`stage2_student_train.map_labels.MapLabelSource` for one label-map bank (one-line UsageError for
    several banks, a bank of another format with ``--cutmix``, ``--replay-views``, or a method that cannot read
    logits)."""
    from stage2_student_train.map_labels import MapLabelSource

    if len(banks) != 1 or banks[0].format != "labelmap":
        raise UsageError("--cutmix and label-map banks take exactly one label-map bank (--labels BANK, dumped with "
                         f"--format labelmap); got {', '.join(f'{b.path} ({b.format})' for b in banks)}")
    bank = banks[0]
    if cfg.replay_views:
        raise UsageError(f"{bank.path} is a label-map bank: every epoch draws fresh crops; drop --replay-views")
    bank.validate(train)
    try:
        kd_losses.check_teacher_format(cfg.method, "dense", bank.num_teachers)
    except ValueError as e:
        raise UsageError(f"{e} (bank {bank.path})") from None
    arrays = bank.attrs["label_map"]["arrays"] + ["views", "image_size"]
    check_host_memory([], sum(int(bank.group[n].nbytes) for n in arrays), items)
    preset = resolve_preset(cfg.preset, train, bank.attrs.get("preprocessing"))
    src = MapLabelSource(bank, preset, cfg.seed, cfg.cutmix)
    log.info("soft labels pooled from the label map %s: %s (%.3g GB on the host)", bank.path,
             {k: v for k, v in bank.attrs["label_map"].items() if k in ("size", "region", "map_dtype", "topk")},
             src.nbytes / 1e9)
    return src


def _once_per_image(teacher: Callable[[dict[str, Any]], torch.Tensor],
                    n: int) -> Callable[[dict[str, Any]], torch.Tensor]:
    """``teacher`` (batch -> [B, T, C]) run once per val image: the teacher is frozen and the eval view fixed, so
    its logits of image i are kept (on the batch's device, n x T x C float32) at the first evaluation and gathered
    by ``batch['index']`` at every later one (a live-teacher run evaluated the teacher on the whole val split
    every epoch: 40% of its time on the demo data)."""
    kept: dict[str, torch.Tensor] = {}
    have = torch.zeros(n, dtype=torch.bool)

    def logits(batch: dict[str, Any]) -> torch.Tensor:
        idx = batch["index"].cpu()
        if "logits" in kept and bool(have[idx].all()):
            return kept["logits"][idx.to(kept["logits"].device)].to(batch["image"].device)
        out = teacher(batch)
        if "logits" not in kept:
            kept["logits"] = out.new_zeros((n, *out.shape[1:]))
        kept["logits"][idx.to(out.device)] = out.detach()
        have[idx] = True
        return out

    return logits


def _same_eval_input(record: dict[str, Any], preset_name: str) -> bool:
    """Whether a bank dumped with preprocessing ``record`` saw the val images as the run's preset evaluates them
    (same name, or the same eval transform: resize, crop, mode, interpolation, normalization; presets that differ
    only in training augmentation, such as ``demo`` and ``demo_rrc``, share val banks)."""
    from pipeline.data.presets import PRESETS, Preprocess

    if not isinstance(record, dict):
        return False
    if record.get("name") == preset_name:
        return True
    if preset_name not in PRESETS or "crop" not in record:
        return False
    return Preprocess.from_record(record).eval_transform() == PRESETS[preset_name].eval_transform()


def val_teacher(source: LabelSource, val: Manifest, preset_name: str, device: str,
                data_flag: str = "ROOT") -> Callable[[dict[str, Any]], torch.Tensor] | None:
    """What evaluation compares the student with: batch -> the teachers' logits [B, T, C] on the val images, or
    None (no teacher, or no val bank: logged with the dump command that makes one).

    A live teacher runs on each val image once (its logits are kept for later evaluations). Banks and label maps:
    a complete cached bank of the val split (dataset fingerprint) whose teachers are the training banks' (arch,
    weights, checkpoint sha256, in order), dumped with the run's preprocessing and the eval transform (center
    view), preferring dense; its rows are gathered by the val samples' indices (compact banks: their T = 1
    reconstruction)."""
    if isinstance(source, LiveTeacherLabelSource):
        return _once_per_image(lambda batch: source(batch)["teacher_logits"], len(val))
    if not source.teachers:  # no teacher (a bank or label map has its teachers' identities)
        return None
    want = [teacher_match(t) for t in source.teachers]
    found = [b for b in cached_banks() if b.complete and b.fingerprint == val.fingerprint
             and [teacher_match(t) for t in b.attrs.get("teachers", [])] == want
             and b.attrs.get("views", {}).get("policy", "center") == "center"
             and _same_eval_input(b.attrs.get("preprocessing") or {}, preset_name)]
    if not found:
        weights = " ".join(f"--teacher {t.get('arch')} --weights {t.get('weights')}" for t in source.teachers)
        log.info("no val bank of the teachers in %s: teacher agreement and KL are n/a; make one with python -m "
                 "pipeline.dump_logits %s --data %s --split %s --preset %s", cache_root(), weights, data_flag,
                 val.split, preset_name)
        return None
    found.sort(key=lambda b: b.attrs.get("format", "dense") != "dense")
    residents = load_residents([LabelBank(found[0].path)], device)
    log.info("teacher agreement and KL on %s from %s", val.split, found[0].path)

    def logits(batch: dict[str, Any]) -> torch.Tensor:
        dev = batch["image"].device
        return torch.cat([r.gather(batch["index"], None, dev) for r in residents], dim=1)

    return logits
