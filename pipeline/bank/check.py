"""``labels check``: are a bank's stored rows what its teachers give on the inputs it records?

For K sampled rows, the inputs are rebuilt from what the bank stores (manifest, preprocessing records, view
parameters: :mod:`pipeline.bank.replay`), the teachers from the bank's own records
(:func:`pipeline.models.teachers.teachers_from_records`), and each teacher's live output is compared with the
stored row in the stored format's terms (TinyViT's ``--check-saved-logits``, with no training run needed):

| format | compared (stored vs live) | per-value tolerance (before the compute slack) |
|---|---|---|
| dense | logits | half a unit in the last place of the bank dtype (float16: 2^-11 relative) |
| int8 | max-shifted logits, decoded ``-(q + 128) * scale`` | one quantization step ``scale`` (rounding is half a step; the argmax nudge and the float16 rounding of the step add up to another half) plus the float16 rounding of the shift |
| topk | the K stored log-probabilities at their classes, the true class's, the tail statistics F(1/T_g), and the kept set (no live class outside it may beat the smallest kept one) | half a float16 ulp of each stored value |
| sampled | those of topk, the drawn classes' log-probabilities and ``logsumexp`` | as topk; ``logsumexp`` float32 |
| embeddings | ``features`` (float16/float32) or ``features_q * features_scale`` (int8) | half an ulp, or one step ``scale`` |

Compute slack: the live forward pass runs other batches than the dump did (other batch sizes and neighbours),
so float32 results may differ in the last bits: ``eps = rtol * max |z|`` per vector (a vector's own scale, so a
random-init teacher's tiny logits are checked as tightly as a trained one's), with ``rtol =``
:data:`SAME_LOADER_RTOL` when the check uses the dump's loader on the CPU (below float16's own rounding, 2^-12
relative; the measured difference is 0 to 1e-6), :data:`CUDA_RTOL` on CUDA (TF32 convolutions and algorithms that
depend on the batch size), and :data:`OTHER_LOADER_RTOL` with another loader or device than the dump's (DALI vs
torch, CPU vs GPU decoding resample the images themselves differently: docs/GPU.md measures max |dz| 0.06 at logit
std 4.1, < 0.5% of the largest logit); a check that passes there says the rows are right up to that loader
difference, not bit for bit. A log-probability moves by at most ``2 eps`` when every logit moves by ``eps``. The
sampled classes' draws are not redrawn (a draw near a CDF boundary flips with the last bit); each drawn class's
stored log-probability is checked.

Reported per teacher: max |Δ| in the format's terms (logits, or log-probabilities at T = 1 for top-k and sampled),
the worst ratio |Δ| / tolerance, KL(stored ‖ live) at T = 1 of the stored T = 1 reconstruction (mean and max
over vectors) and top-1 agreement. ``check_bank`` returns a :class:`CheckReport`; ``labels check`` exits 0 when
every ratio is <= 1, 1 otherwise, 2 on bad input (UsageError/BankError: missing data root, a dataset that does
not match, teacher weights that cannot be loaded, an incomplete bank).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from pipeline import storage
from pipeline.bank.compact import decode, decode_int8, tail_stats
from pipeline.bank.features import decode_features
from pipeline.bank.reader import LabelBank, damaged, require_chunks, teacher_preprocessing
from pipeline.bank import views as _views  # noqa: F401  (registers the replay of policies with parameters)
from pipeline.bank.replay import ReplayRequest, replay_inputs
from pipeline.data import Manifest, build_manifest
from pipeline.data.loaders import dali_available, resolve_loader
from pipeline.data.presets import Preprocess
from pipeline.errors import BankError, UsageError
from pipeline.models.teachers import teachers_from_records

log = logging.getLogger(__name__)

SAME_LOADER_RTOL = 1e-4  # float32 recomputation in other batches on the CPU (measured: 0 to 1e-6)
CUDA_RTOL = 2e-3  # the same on CUDA: TF32 convolutions, batch-size dependent algorithms
OTHER_LOADER_RTOL = 2e-2  # resampling differences between loaders/devices (docs/GPU.md: < 0.5% measured)


@dataclass
class TeacherCheck:
    """One teacher's comparison: ``max_delta`` (max |stored - live| in the format's terms), ``tolerance`` (the
    tolerance at that value), ``worst`` (max |Δ| / tolerance over all compared values; > 1 fails), ``kl_mean`` /
    ``kl_max`` (KL(stored ‖ live) at T = 1), ``top1`` (agreement in %), ``bad`` [(row, view)] beyond tolerance."""

    name: str
    max_delta: float = 0.0
    tolerance: float = 0.0
    worst: float = 0.0
    kl_mean: float = 0.0
    kl_max: float = 0.0
    top1: float = 100.0
    bad: list[tuple[int, int]] = field(default_factory=list)
    features_worst: float | None = None


@dataclass
class CheckReport:
    """What ``labels check`` found: the bank, its format, the rows and views compared, the loader and device of
    the check and of the dump, the relative compute slack used, and one :class:`TeacherCheck` per teacher."""

    path: str
    format: str
    rows: list[int]
    num_views: int
    loader: str
    dump_loader: str
    rtol: float
    teachers: list[TeacherCheck]

    @property
    def ok(self) -> bool:
        return all(t.worst <= 1.0 and (t.features_worst or 0.0) <= 1.0 for t in self.teachers)

    def lines(self) -> list[str]:
        """The report as printed by ``labels check``."""
        head = (f"{'OK' if self.ok else 'FAIL'} {self.path}: {self.format} bank, {len(self.rows)} rows x "
                f"{self.num_views} views, loader {self.loader} (dump: {self.dump_loader}), compute slack rtol "
                f"{self.rtol:g}")
        out = [head]
        for k, t in enumerate(self.teachers):
            feat = "" if t.features_worst is None else f"  embeddings worst {t.features_worst:.3g}"
            out.append(f"teacher {k} {t.name}: max |dz| {t.max_delta:.3g} (tolerance there {t.tolerance:.3g}, worst "
                       f"{t.worst:.3g} of tolerance)  KL(stored||live) mean {t.kl_mean:.3g} max {t.kl_max:.3g}  "
                       f"top-1 agreement {t.top1:.2f}%{feat}")
            if t.bad:
                shown = ", ".join(f"row {r} view {v}" for r, v in t.bad[:5])
                out.append(f"  beyond tolerance: {shown}" + (f" (+{len(t.bad) - 5} more)" if len(t.bad) > 5 else ""))
        return out


def check_bank(path: str, rows: int = 64, seed: int = 0, device: str = "cpu", loader: str = "auto",
               data: str | None = None, batch_size: int | None = None) -> CheckReport:
    """Compare ``rows`` sampled rows (seeded by ``seed``) of the bank at ``path`` with its teachers run live.

    ``loader``: ``auto`` = the loader that made the bank (where installed); ``data``: the dataset root (default:
    the one recorded in the bank). Raises UsageError / BankError on bad input (see the module docstring)."""
    if rows < 1:
        raise UsageError(f"--rows {rows}: give the number of rows to check, >= 1")
    if seed < 0:
        raise UsageError(f"--seed {seed}: give a seed >= 0")
    if device not in ("cpu", "cuda"):
        raise UsageError(f"--device {device}: valid are cpu and cuda")
    if device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: this machine has no usable CUDA device; check with --device cpu")
    bank = LabelBank(path)
    bank.require_complete()
    attrs = bank.attrs
    if bank.format == "labelmap":
        raise UsageError(f"{path} is a label-map bank: check it with python -m pipeline.labels map-check {path} "
                         "(its pooled labels against the teachers run live on random crops)")
    _refuse_combinations(path, attrs)
    manifest = _manifest(bank, data)
    picked = sample_rows(bank.skipped(), rows, seed)
    made_by, chosen_loader = _replay_loader(attrs, loader)
    if "view_params" in bank.group and chosen_loader != made_by:  # refused before the looser tolerance is announced
        fix = ("check it with that loader (--loader auto)" if loader not in ("auto", "", None)
               else "it is not installed here: check it where it is")
        raise UsageError(f"{path} stores augmented views, dumped with the {made_by} loader: {fix}; RandAugment, "
                         "erasing and mixing amplify the loaders' resampling differences beyond a tolerance that "
                         "would still catch a wrong bank")
    rtol = _replay_rtol(attrs, chosen_loader, device)
    require_chunks(bank, [*bank.payload_arrays, "labels", "views", "view_params", "view_partner",
                          *((bank.feature_meta or {}).get("arrays") or [])])
    pres = [Preprocess.from_record(p) for p in teacher_preprocessing(attrs)]
    branches = list(dict.fromkeys(pres))
    model = teachers_from_records(attrs.get("teachers") or [], bank.num_classes, attrs.get("class_maps"), device,
                                  [branches.index(p) for p in pres])
    if bank.feature_meta:
        model.enable_features([p.crop for p in pres])
    stored = read_rows(bank, picked)
    cfg = attrs.get("config") or {}
    req = ReplayRequest(bank, manifest, picked, stored["views"], attrs.get("views") or {"policy": "center"},
                        branches, chosen_loader, device, int(batch_size or cfg.get("batch_size") or 32), 1,
                        bool((attrs.get("preprocessing") or {}).get("teacher_amp")))
    live, feats = run_live(model, req, bank.shape)
    checks = compare(bank, stored, live, rtol, picked)
    if feats is not None:
        for t, c in enumerate(compare_features(bank, stored, feats, rtol)):
            checks[t].features_worst = c
    return CheckReport(path, bank.format, picked.tolist(), bank.num_views, chosen_loader,
                       str(attrs.get("loader", "dali")), rtol, checks)


def _refuse_combinations(path: str, attrs: dict[str, Any]) -> None:
    """UsageError for banks made by ``labels ensemble`` whose rows are no teacher's logits: a mean (one combined
    teacher) or a stack of compact banks (their max-shifted T = 1 reconstructions)."""
    members = ", ".join(s.get("path", "?") for s in attrs.get("sources") or [])
    if any(t.get("weights") == "ensemble" for t in attrs.get("teachers") or []):
        raise UsageError(f"{path} is a {(attrs.get('ensemble') or {}).get('mode', 'mean')} ensemble made by labels "
                         f"ensemble (one combined teacher, not a model): check its member banks ({members})")
    if "ensemble" in attrs and any(s.get("format", "dense") != "dense" for s in attrs.get("sources") or []):
        raise UsageError(f"{path} stacks the T = 1 reconstructions of compact banks (not the teachers' logits): "
                         f"check its member banks ({members})")


def _manifest(bank: LabelBank, data: str | None) -> Manifest:
    """The dataset the bank describes: ``data`` or the root recorded in its config; refused (one line) when
    missing or when it is not the dataset the bank was dumped from."""
    cfg = bank.attrs.get("config") or {}
    root = data or cfg.get("data") or _source_root(bank.attrs)
    if not root:
        raise UsageError(f"{bank.path} records no dataset root: pass --data ROOT")
    if not storage.exists(root):
        raise UsageError(f"dataset root {root} not found: pass --data ROOT where the bank's data lives now")
    ds = bank.attrs.get("dataset") or {}
    manifest = build_manifest(root, ds.get("split") or cfg.get("split", "train"), layout=ds.get("layout") or "auto")
    bank.validate(manifest)
    return manifest


def _source_root(attrs: dict[str, Any]) -> str | None:
    """The dataset root recorded by the first source bank of a bank made by the bank tools (``sources``), if
    that bank is still there."""
    for src in attrs.get("sources") or []:
        try:
            root = (LabelBank(src.get("path", "")).attrs.get("config") or {}).get("data")
        except BankError:
            continue
        if root:
            return str(root)
    return None


def _replay_loader(attrs: dict[str, Any], loader: str) -> tuple[str, str]:
    """(the loader the bank was dumped with, the loader to replay with: ``auto`` gives the bank's own where
    installed)."""
    made_by = str(attrs.get("loader", "dali"))
    if loader in ("auto", "", None):
        loader = made_by if made_by != "dali" or dali_available() else "torch"
    return made_by, resolve_loader(loader)


def _replay_rtol(attrs: dict[str, Any], chosen: str, device: str) -> float:
    """The compute slack ``rtol`` of a check replayed with loader ``chosen`` on ``device``: the tight one only with
    the dump's loader and device (a warning says when it is loosened)."""
    made_by = str(attrs.get("loader", "dali"))
    dump_device = (attrs.get("config") or {}).get("device", "cpu")
    same_rtol = CUDA_RTOL if device == "cuda" else SAME_LOADER_RTOL
    if chosen == made_by and device == dump_device:
        return same_rtol
    log.warning("checking with the %s loader on %s, the bank was dumped with %s on %s: images are resampled "
                "differently, so the check allows rtol %g instead of %g (docs/GPU.md)", chosen, device, made_by,
                dump_device, OTHER_LOADER_RTOL, same_rtol)
    return OTHER_LOADER_RTOL


def sample_rows(skipped: np.ndarray, k: int, seed: int) -> np.ndarray:
    """``k`` distinct non-skipped row indices drawn with ``np.random.default_rng(seed)`` (all of them when there
    are fewer), sorted -> [k] int64. BankError when every row is skipped."""
    candidates = np.flatnonzero(~np.asarray(skipped, bool))
    if len(candidates) == 0:
        raise BankError("every row of the bank is skipped: nothing to check")
    if k >= len(candidates):
        return candidates.astype(np.int64)
    return np.sort(np.random.default_rng(seed).choice(candidates, size=k, replace=False)).astype(np.int64)


def read_rows(bank: LabelBank, rows: np.ndarray) -> dict[str, np.ndarray]:
    """The stored arrays (payload, ``labels``, ``views``, embeddings) at ``rows`` [K] (sorted), each read one
    row chunk at a time -> {name: [K, ...]}."""
    names = list(bank.payload_arrays) + ["labels", "views"] + list((bank.feature_meta or {}).get("arrays") or [])
    names += [n for n in ("view_params", "view_partner") if n in bank.group]  # read by the replay: checked here
    step = bank.rows_per_chunk
    out: dict[str, list[np.ndarray]] = {name: [] for name in names}
    for j in np.unique(rows // step):
        sel = rows[rows // step == j]
        lo, hi = int(sel[0]), int(sel[-1]) + 1
        for name in names:
            try:
                out[name].append(bank.read_rows(name, lo, hi)[sel - lo])
            except (ValueError, OSError) as e:  # zarr: a failed CRC32C checksum or an undecodable chunk
                raise damaged(bank.path, f"array '{name}' rows {lo}..{hi - 1} cannot be read "
                                     f"({' '.join(str(e).split())[:80]})") from None
    return {name: np.concatenate(parts) for name, parts in out.items()}


@torch.inference_mode()
def run_live(model: torch.nn.Module, req: ReplayRequest,
             shape: tuple[int, int, int, int]) -> tuple[np.ndarray, np.ndarray | None]:
    """The teachers on the replayed inputs -> (logits [K, T, V, C] float32, embeddings [K, T, V, D] float32 or
    None), rows in ``req.rows`` order."""
    _, t, v, c = shape
    logits, feats, seen = [], [], []
    for batch in replay_inputs(req):
        inputs = [x.to(req.device) for x in batch.inputs()]
        b = len(batch.index)
        flat = [x.flatten(0, 1) if x.ndim == 5 else x for x in inputs]
        with torch.autocast("cuda", enabled=req.amp and req.device == "cuda"):  # as the dump ran them
            out = model(flat)
        logits.append(out.float().reshape(b, v, t, c).transpose(1, 2).cpu())
        if model.features is not None:
            feats.append(model.features.float().reshape(b, v, t, -1).transpose(1, 2).cpu())
        seen.append(batch.index.cpu())
    if not seen or not torch.equal(torch.cat(seen), torch.from_numpy(req.rows)):
        raise BankError("internal error: the replay did not yield the requested rows in order")
    return torch.cat(logits).numpy(), (torch.cat(feats).numpy() if feats else None)


def _half_ulp(x: np.ndarray, dtype: str) -> np.ndarray:
    """Half a unit in the last place of ``x`` in ``dtype`` (the rounding error of storing x) as float64."""
    a = np.abs(np.nan_to_num(np.asarray(x, np.float64), posinf=0.0, neginf=0.0))
    return np.spacing(a.astype(dtype)).astype(np.float64) / 2


def _slack(live: np.ndarray, rtol: float) -> np.ndarray:
    """The compute slack per vector: ``rtol * max |z|`` (max |z| taken as at least 1e-3) -> [..., 1] float64."""
    return rtol * np.maximum(1e-3, np.abs(live).max(axis=-1, keepdims=True)).astype(np.float64)


def _log_softmax(z: np.ndarray) -> np.ndarray:
    return torch.log_softmax(torch.from_numpy(np.ascontiguousarray(z, np.float32)), dim=-1).numpy()


def compare(bank: LabelBank, stored: dict[str, np.ndarray], live: np.ndarray, rtol: float,
            rows: np.ndarray) -> list[TeacherCheck]:
    """Per teacher, stored rows vs live logits ``live`` [K, T, V, C] in the bank format's terms (``rows`` [K]:
    the bank rows compared, named in ``bad``)."""
    dtype = str(bank.attrs.get("dtype", "float16"))
    zr = live.astype(dtype).astype(np.float32)  # what the dump rounded to before storing or encoding
    eps = _slack(live, rtol)
    parts = _FORMAT_DELTAS[bank.format](stored, zr, eps, dtype)
    recon = _reconstruction(bank, stored)
    kl, agree = _kl_top1(recon, live)
    checks = []
    for t, rec in enumerate(bank.teachers or [{"name": f"teacher{t}"} for t in range(bank.num_teachers)]):
        check = TeacherCheck(str(rec.get("name", rec.get("arch", t))), kl_mean=float(kl[:, t].mean()),
                             kl_max=float(kl[:, t].max()), top1=float(100 * agree[:, t].mean()))
        worst_vec, check.worst = np.zeros(kl[:, t].shape), -1.0
        for delta, tol in parts:  # each [K, T, V, n]
            d, tl = delta[:, t], np.broadcast_to(tol, delta.shape)[:, t]
            ratio = np.where(np.isfinite(d), d / np.maximum(tl, 1e-30), np.inf)
            if ratio.size and ratio.max() > check.worst:
                at = np.unravel_index(int(np.argmax(ratio)), ratio.shape)
                check.worst, check.max_delta, check.tolerance = float(ratio[at]), float(d[at]), float(tl[at])
            if ratio.size:
                worst_vec = np.maximum(worst_vec, ratio.max(axis=-1) if ratio.shape[-1] else 0)
        check.worst = max(check.worst, 0.0)
        k, v = np.unravel_index(np.flatnonzero(worst_vec.ravel() > 1), worst_vec.shape)
        check.bad = [(int(rows[a]), int(b)) for a, b in zip(k, v)]
        checks.append(check)
    return checks


def _dense_deltas(stored, zr, eps, dtype):
    s = stored["logits"].astype(np.float32)
    return [(np.abs(s - zr).astype(np.float64), _half_ulp(s, dtype) + eps)]


def _int8_deltas(stored, zr, eps, dtype):
    d = decode_int8(stored["q"], stored["scale"])
    shifted = zr - zr.max(axis=-1, keepdims=True)
    step = stored["scale"].astype(np.float64)[..., None]
    shift = 2 * _half_ulp(np.abs(zr).max(axis=-1, keepdims=True), dtype)
    return [(np.abs(d - shifted).astype(np.float64), step + shift + 2 * eps)]


def _topk_deltas(stored, zr, eps, dtype):
    lp = _log_softmax(zr)
    c = lp.shape[-1]
    idx = stored["topk_indices"].astype(np.int64)
    vals = stored["topk_values"].astype(np.float32)
    lab = np.broadcast_to(stored["labels"].astype(np.int64)[:, None, None], lp.shape[:-1])
    out = [_at(vals, lp, np.maximum(idx, 0), eps)]
    target = stored["target_logprob"].astype(np.float32)[..., None]
    out.append(_at(target, lp, lab[..., None], eps))
    kept = np.zeros(lp.shape, bool)
    np.put_along_axis(kept, np.maximum(idx, 0), True, axis=-1)
    np.put_along_axis(kept, lab[..., None], True, axis=-1)
    tail = stored["tail_lse"].astype(np.float32)
    out.append((np.abs(tail - tail_stats(lp, kept)).astype(np.float64), _lp_tolerance(tail, eps)))
    if vals.shape[-1] and vals.shape[-1] < c:  # no live class outside the kept set beats the smallest kept one
        outside = np.where(kept, -np.inf, lp).max(axis=-1, keepdims=True)
        low = vals.min(axis=-1, keepdims=True)
        out.append((np.maximum(outside - low, 0).astype(np.float64), _lp_tolerance(low, 2 * eps)))
    return out


def _sampled_deltas(stored, zr, eps, dtype):
    out = _topk_deltas(stored, zr, eps, dtype)
    lp = _log_softmax(zr)
    out.append(_at(stored["sample_logprob"].astype(np.float32), lp, stored["sample_indices"].astype(np.int64), eps))
    lse = torch.logsumexp(torch.from_numpy(zr), dim=-1).numpy()[..., None]
    s = stored["logsumexp"].astype(np.float32)[..., None]
    out.append((np.abs(s - lse).astype(np.float64), _half_ulp(s, "float32") + eps))
    return out


def _at(values: np.ndarray, lp: np.ndarray, idx: np.ndarray, eps: np.ndarray):
    """|stored log-probabilities ``values`` - live ``lp`` at ``idx``| and its tolerance (float16 rounding of the
    stored value, 2 eps: a log-probability moves by at most twice the logits' move, and a few float32 ulps of the
    log-softmax itself)."""
    live = np.take_along_axis(lp, idx, axis=-1)
    return np.abs(values - live).astype(np.float64), _lp_tolerance(values, eps)


def _lp_tolerance(values: np.ndarray, eps: np.ndarray) -> np.ndarray:
    """Tolerance of stored float16 log-probability statistics: half a float16 ulp, ``2 eps``, 4 float32 ulps."""
    return _half_ulp(values, "float16") + 2 * eps + 8 * _half_ulp(values, "float32")


_FORMAT_DELTAS = {"dense": _dense_deltas, "int8": _int8_deltas, "topk": _topk_deltas, "sampled": _sampled_deltas}


def _reconstruction(bank: LabelBank, stored: dict[str, np.ndarray]) -> np.ndarray:
    """The stored rows as logits at T = 1 [K, T, V, C] float32 (what the tools and stage 2 densify)."""
    if bank.format == "dense":
        return stored["logits"].astype(np.float32)
    arrays = {name: stored[name] for name in bank.payload_arrays}
    return decode(arrays, bank.format, bank.num_classes, stored["labels"])


def _kl_top1(stored: np.ndarray, live: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """KL(softmax(stored) ‖ softmax(live)) [K, T, V] float64 and top-1 agreement [K, T, V] bool, at T = 1."""
    ls = torch.log_softmax(torch.from_numpy(np.ascontiguousarray(stored)).double(), -1)
    ll = torch.log_softmax(torch.from_numpy(np.ascontiguousarray(live)).double(), -1)
    kl = (ls.exp() * (ls - ll)).sum(-1).clamp_min(0).numpy()
    return kl, (ls.argmax(-1) == ll.argmax(-1)).numpy()


def compare_features(bank: LabelBank, stored: dict[str, np.ndarray], live: np.ndarray, rtol: float) -> list[float]:
    """Per teacher, the worst |stored - live| / tolerance of the stored embeddings ([K, T, V, D]): half an ulp of
    the stored dtype (float16/float32) or one step ``scale`` (int8), plus the compute slack."""
    meta = bank.feature_meta or {}
    fmt = meta.get("format", "float16")
    s = decode_features({name: stored[name] for name in meta.get("arrays", [])}, fmt)
    eps = _slack(live, rtol)
    if fmt == "int8":
        tol = stored["features_scale"].astype(np.float64)[..., None] + eps
    else:
        tol = _half_ulp(s, fmt) + eps
    ratio = np.abs(s - live) / tol
    return [float(ratio[:, t].max()) for t in range(ratio.shape[1])]
