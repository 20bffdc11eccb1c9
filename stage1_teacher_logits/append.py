"""Appending views: ``dump_logits --append-views SRC --views V'`` writes the V'-view bank of SRC's teachers and data,
copying SRC's V stored views (logits, boxes, embeddings) instead of recomputing them and running the teachers on the
V' - V new views only. SRC is only read.

Why the copy is exact: a sample's view boxes are drawn in order from ``np.random.default_rng([view_seed, index])``
(:mod:`stage1_teacher_logits.views`), so the first V of V' boxes are SRC's V boxes (checked chunk by chunk), and a
teacher's output for one image does not depend on the other images of its batch (eval mode; the dump already relies
on it: any ``--batch-size`` gives the same bank). The result has the key, the path and the bytes of a direct V'-view
dump (tested), so it is resumable like any dump (a killed append rerun with the same command writes the missing
chunks) and the same command twice is a no-op.

Everything that defines the bank comes from SRC's recorded config (teachers, weights, data, preset, views policy and
seed, dtype, embeddings, ...); a flag given on the command line overrides it, and the new bank must then still be
SRC's bank with more views, else a one-line error names the field. Dense banks only: a compact bank's chunk sums
(its fidelity record) need every view's dense logits; append to the dense bank, then ``labels compact``.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from pipeline import storage
from pipeline.bank.reader import LabelBank, require_chunks
from pipeline.config import RESUME_MATCH, from_dict, keys_where, to_dict
from pipeline.errors import BankError, UsageError

log = logging.getLogger(__name__)

# keys taken from SRC's recorded config when the command line leaves them at their default (beside the identity)
_ALSO_FROM_SRC = ("rows_per_chunk", "skip_corrupt")


def append_config(cfg: Any) -> Any:
    """The DumpConfig of the appended bank: ``cfg`` (``append_views`` = SRC, ``views`` = V') with every key it
    leaves at its default taken from SRC's recorded config. UsageError (one line) when SRC is not a complete dense
    bank with random views, when V' <= V, when ``--out`` is SRC, for another loader than SRC's, or for a compact
    ``--format`` (the appended bank is dense: SRC's views are copied as stored; ``labels compact`` compacts it)."""
    src = LabelBank(cfg.append_views)
    src.require_complete()
    require_chunks(src, ["logits", "labels", "views", "skipped", "view_params", "view_partner",
                         *((src.feature_meta or {}).get("arrays") or [])])  # a lost chunk would be copied as data
    if src.format == "labelmap":
        raise UsageError(f"--append-views {src.path}: a label-map bank stores maps, not views (stage 2 pools every "
                         "fresh crop from them); append views to a dense bank with random views")
    if src.format != "dense":
        raise UsageError(f"--append-views {src.path}: a {src.format} bank; append views to the dense bank it was made "
                         "from (or dump one), then python -m pipeline.labels compact")
    if cfg.format != "dense":  # SRC's views are copied as stored dense logits; the encoders take a whole batch's
        raise UsageError(f"--append-views writes a dense bank (SRC's views are copied as stored): drop --format "
                         f"{cfg.format}, then python -m pipeline.labels compact OUT -o COMPACT with the format's flags")
    views = src.attrs.get("views") or {}
    if views.get("policy", "center") == "center":
        raise UsageError(f"--append-views {src.path}: its view policy is 'center' (one eval view); dump a bank with "
                         "--view-policy rrc or rrc+flip first")
    if cfg.views <= src.num_views:
        raise UsageError(f"--append-views {src.path} holds {src.num_views} views: give --views V' > {src.num_views}")
    if cfg.out and storage.absolute(cfg.out) == storage.absolute(src.path):
        raise UsageError(f"--out {cfg.out} is SRC itself: the appended bank is a new bank (SRC is only read); give "
                         "another --out or none (the cache)")
    rec = src.attrs.get("config") or {}
    merged, defaults = to_dict(cfg), to_dict(type(cfg)())
    for k in (*keys_where(type(cfg), resume=RESUME_MATCH), *_ALSO_FROM_SRC):
        if k != "views" and k in rec and merged[k] == defaults[k]:
            merged[k] = rec[k]
    for k in ("teacher", "weights"):  # checked before the teachers are built (a checkpoint of another model fails)
        if k in rec and list(merged[k] or []) != list(rec[k] or []):
            raise UsageError(f"--append-views {src.path}: --{k} {' '.join(map(str, merged[k]))} is not the bank's "
                             f"({' '.join(map(str, rec[k]))}); the appended bank has SRC's teachers: drop --{k} (other "
                             "teachers make another bank: dump it)")
    if merged["preset"] == "auto":
        merged["preset"] = _recorded_preset(src.attrs)
    made_by = str(src.attrs.get("loader", "dali"))
    if cfg.loader not in ("auto", made_by):
        raise UsageError(f"--append-views {src.path} was dumped with the {made_by} loader: append with it (the "
                         "loaders resample slightly differently)")
    merged["loader"] = made_by
    log.info("--append-views: copying the %d views of %s, computing views %d..%d", src.num_views, src.path,
             src.num_views, cfg.views - 1)
    return from_dict(type(cfg), merged)


def _recorded_preset(attrs: dict[str, Any]) -> str:
    """The ``--preset`` that gives SRC's preprocessing again: the name when SRC was dumped with ``--preset NAME``,
    ``train-size`` for timm teachers at their training size, else ``auto``."""
    sources = [str(s) for s in attrs.get("preprocessing_source") or []]
    if sources and all(s.startswith("--preset ") for s in sources):
        return sources[0][len("--preset "):]
    return "train-size" if any("training input size" in s for s in sources) else "auto"


class ViewPrefix:
    """SRC's stored views, copied into the appended bank's chunks: ``num_views`` V, ``fill(buf)`` puts SRC's rows
    of a chunk buffer's range in its first V view slots, ``check(buf)`` refuses a full buffer whose first V boxes
    are not SRC's, ``new(boxes)`` the boxes the teachers still run on."""

    def __init__(self, path: str):
        self.bank = LabelBank(path)
        self.num_views = self.bank.num_views
        self._src_views: dict[int, np.ndarray] = {}  # SRC's boxes of the chunks being filled, by first row
        self._src_params: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # and its view parameters and partners

    def same_bank(self, spec: Any, fingerprint: str) -> None:
        """UsageError naming the first field in which the bank being written (``spec``: its BankSpec) is not SRC's
        bank with more views."""
        a = self.bank.attrs
        keyed = ("arch", "weights", "sha256", "init_seed")
        fields = {
            "teachers": ([{k: t.get(k) for k in keyed} for t in a.get("teachers", [])],
                         [{k: t.get(k) for k in keyed} for t in spec.teachers]),
            "preprocessing": (a.get("preprocessing"), spec.preprocessing),
            "views": ({k: v for k, v in (a.get("views") or {}).items() if k != "num_views"},
                      {k: v for k, v in spec.views.items() if k != "num_views"}),
            "dtype": (a.get("dtype"), spec.dtype),
            "class_maps": (a.get("class_maps"), [list(m) if m is not None else None for m in spec.class_maps]
                           if spec.class_maps else None),
            "features": ((a.get("features") or {}).get("dims"), list(spec.feature_dims) if spec.feature_dims else None),
            "dataset fingerprint": ((a.get("dataset") or {}).get("fingerprint"), fingerprint),
        }
        for name, (have, want) in fields.items():
            if have != want:
                raise UsageError(f"--append-views {self.bank.path}: field '{name}' of the new bank differs from the "
                                 f"bank's ({str(want)[:80]} vs {str(have)[:80]}): drop the flag that changes it, or "
                                 "dump a new bank")

    def new(self, boxes: np.ndarray) -> np.ndarray:
        """The boxes [P, V' - V, 5] of the views still to compute, of boxes [P, V', 5]."""
        return np.ascontiguousarray(boxes[:, self.num_views:])

    def fill(self, buf: Any) -> None:
        """Copy SRC's rows [buf.start, buf.start + r) into the first V view slots of ``buf`` (a
        :class:`stage1_teacher_logits.writer.ChunkBuffer` of V' views: its dense ``arrays["logits"]``
        [r, T, V', C] in the bank dtype, ``views`` [r, V', 5], ``features`` [r, T, V', D] when the bank stores
        embeddings); the producer then puts the new views from slot V on."""
        start, stop = buf.start, buf.start + len(buf.labels)
        v, v_all = self.num_views, buf.views.shape[1]
        src = self.bank.read_rows("logits", start, stop).astype(str(self.bank.attrs["dtype"]), copy=False)
        logits = np.full(src.shape[:2] + (v_all,) + src.shape[3:], np.nan, src.dtype)
        logits[:, :, :v] = src
        buf.arrays["logits"] = logits
        buf.views[:, :v] = self._src_views[start] = self.bank.read_rows("views", start, stop)
        if buf.params is not None:  # a policy with stored parameters: the draws now must be SRC's (checked)
            self._src_params[start] = (self.bank.read_rows("view_params", start, stop),
                                       self.bank.read_rows("view_partner", start, stop))
        if self.bank.attrs.get("features"):
            f = self.bank.read_features(start, stop)
            buf.features = np.full(f.shape[:2] + (v_all,) + f.shape[3:], np.nan, np.float32)
            buf.features[:, :, :v] = f

    def check(self, buf: Any) -> None:
        """BankError unless the boxes drawn now for a full chunk buffer begin with SRC's stored ones (the view
        seed and the image sizes are what they were)."""
        src = self._src_views.pop(buf.start)
        now = buf.views[:, :self.num_views]
        bad = ~((now == src) | (np.isnan(now) & np.isnan(src))).all(axis=(1, 2))
        if buf.start in self._src_params:
            params, partners = self._src_params.pop(buf.start)
            drawn = buf.params[:, :self.num_views]
            bad |= ~((drawn == params) | (np.isnan(drawn) & np.isnan(params))).all(axis=(1, 2))
            bad |= ~(buf.partners[:, :self.num_views] == partners).all(axis=1)
        if bad.any():
            raise BankError(f"--append-views {self.bank.path}: the stored views (boxes, parameters, partners) of "
                            f"sample {buf.start + int(np.flatnonzero(bad)[0])} are not the first views the view seed "
                            "draws now (another image size, view seed or version): dump a new bank")


def first_view(prefix: ViewPrefix | None) -> int:
    """The first view slot the teachers compute: 0, or V with ``--append-views``."""
    return 0 if prefix is None else prefix.num_views
