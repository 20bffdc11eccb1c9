"""Stage 1 for ``--format labelmap`` (issue 26): the map model, the region each map covers, the bank's map attrs.

The dump itself is the ordinary one (:mod:`stage1_teacher_logits.dump`: chunked, checksummed, resumable,
torchrun-sharded); these pieces plug into it at the places marked ``# label maps`` there:

- :func:`build_map_model`: the teacher ensemble as a :class:`pipeline.models.label_map.LabelMapEnsemble`
  (``[B, T, S·S, C]`` per batch: the writer buffers the cells as views and
  :func:`pipeline.bank.labelmap.encode_chunk` stores them as ``[N, T, S, S, C]``);
- :class:`MapRegion`: what the teachers see (``eval``: the preset's eval transform, exactly a center bank's
  input; ``full``: the whole image squashed to the input size, a box replay of (0, 0, 1, 1)) and what the bank
  records per sample (the region box in ``views`` and the decoded size in ``image_size``);
- :func:`map_attrs`: the ``label_map`` attr.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch

from pipeline.bank.labelmap import map_arrays, map_record, region_box
from pipeline.data import Manifest, layout_of
from pipeline.data.presets import Preprocess
from pipeline.errors import UsageError
from pipeline.models.ensemble import TeacherEnsemble
from pipeline.models.label_map import LabelMapEnsemble


def build_map_model(ensemble: TeacherEnsemble, names: Sequence[str], size: int | None,
                    pres: Sequence[Preprocess]) -> LabelMapEnsemble:
    """The map model of the dump's teachers (UsageError for an unsupported head, teachers with different
    preprocessing, or native sizes that differ without ``--map-size``)."""
    if len({(p.resize, p.crop, p.crop_mode) for p in pres}) > 1:
        raise UsageError("--format labelmap needs one region for every teacher: the teachers here take different "
                         "input sizes; give --preset NAME (one preprocessing for all) or dump one map bank each")
    return LabelMapEnsemble(ensemble, names, size, [p.crop for p in pres])


def map_attrs(model: LabelMapEnsemble, region: str, map_dtype: str, k: int | None) -> dict[str, Any]:
    """``attrs["label_map"]``: the key's record (size, region, map dtype, K), the arrays, each teacher's
    native size and map kind, the cell order and the region's meaning."""
    rec = map_record(model.size, region, map_dtype, k)
    return {**rec, "arrays": list(map_arrays(map_dtype, k)), "native": model.native, "kinds": model.kinds,
            "cells": "row-major [y, x]; cell (y, x) covers [x/S, (x+1)/S) x [y/S, (y+1)/S) of the region",
            "region_box": "views[:, 0] = (y, x, h, w) of the region in fractions of the decoded image"}


class MapRegion:
    """The view sampler of a map dump: ``mode`` and ``boxes`` for the loader, :meth:`recorded` for the bank."""

    def __init__(self, region: str, preset: Preprocess):
        self.region, self.preset = region, preset

    @property
    def mode(self) -> str:
        return "eval" if self.region == "eval" else "views"

    def boxes(self, manifest: Manifest, order: np.ndarray) -> np.ndarray | None:
        """None (eval transform) or the whole image [len(order), 1, 5] = (0, 0, 1, 1, no flip)."""
        if self.region == "eval":
            return None
        return np.tile(np.array([[[0, 0, 1, 1, 0]]], np.float32), (len(order), 1, 1))

    def batches(self, loader: str, manifest: Manifest, order: np.ndarray, preprocess: Any, batch_size: int,
                workers: int, device: str, seed: int, hw_decoder_load: float = 0.65, new_views: Any = None):
        """``(boxes, None, None, batches)`` as :meth:`stage1_teacher_logits.views.ViewSampler.batches`: the mapped
        region of every sample through the loader (no stored view parameters; ``new_views`` unused: maps have
        one region per image)."""
        from pipeline.data.loaders import load_batches

        boxes = self.boxes(manifest, order)
        it = load_batches(loader, manifest, order, preprocess, self.mode, batch_size, workers, device, seed,
                          boxes=boxes, hw_decoder_load=hw_decoder_load)
        return boxes, None, None, it

    def recorded(self, manifest: Manifest, order: np.ndarray,
                 boxes: np.ndarray | None) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """What the bank stores for samples ``order``: the region boxes [len, 1, 5] and ``image_size`` [len, 2]."""
        layout = layout_of(manifest)
        sizes = np.array([layout.image_size(manifest, int(i)) for i in order], np.int32).reshape(len(order), 2)
        regions = np.zeros((len(order), 1, 5), np.float32)
        for k, (h, w) in enumerate(sizes):
            regions[k, 0, :4] = region_box(int(h), int(w), self.preset, self.region)
        return regions, {"image_size": sizes}


# --- labels map-check ----------------------------------------------------------------------------------------
def _kl_top1(real: torch.Tensor, pooled: torch.Tensor) -> dict[str, float]:
    """real, pooled [K, C] logits -> mean KL(p_real^T || p_pooled^T) at T = 1 and 4, top-1 agreement (%)."""
    out = {}
    for temp in (1.0, 4.0):
        lp, lq = torch.log_softmax(real / temp, -1), torch.log_softmax(pooled / temp, -1)
        out[f"kl_t{temp:g}"] = float((lp.exp() * (lp - lq)).sum(-1).mean())
    out["top1_agreement"] = float((real.argmax(-1) == pooled.argmax(-1)).float().mean() * 100)
    return out


def map_check(path: str, rows: int = 64, seed: int = 0, device: str = "cpu", data: str | None = None,
              batch_size: int = 32) -> dict[str, Any]:
    """How far pooled map labels are from the teacher's real output on random crops (issue 26).

    ``rows`` random samples of the map bank at ``path`` (not skipped) each get a fresh random-resized crop + flip
    (:func:`pipeline.bank.map_pool.crop_boxes` with ``seed``, the preset's scale and ratio); the teachers are
    rebuilt exactly as the dump built them (its recorded config; ``data`` overrides the dataset root) and run on
    the crops, and each crop's label is pooled from the map over its box. -> per teacher (``"<t>:<arch>"``):
    ``pooled`` (KL at T = 1 and 4 of the real output against the pooled label, top-1 agreement %) and, for
    comparison, ``whole`` (the same against the map's mean: one label per image, what a center bank gives every
    crop), and ``rows``. Raises BankError for a bank that is not a complete label-map bank, UsageError for bad
    arguments."""
    from dataclasses import replace as dc_replace

    from pipeline.bank.labelmap import read_maps, require_map_bank
    from pipeline.bank.map_pool import crop_boxes, map_boxes, pool
    from pipeline.bank.reader import LabelBank
    from pipeline.config import from_dict
    from pipeline.data import build_manifest
    from pipeline.data.loaders import load_batches
    from stage1_teacher_logits.dump import BankDump, DumpConfig

    if seed < 0:
        raise UsageError(f"--seed {seed}: give a seed >= 0")
    if device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: this machine has no usable CUDA device; check with --device cpu")
    bank = LabelBank(path)
    lm = require_map_bank(bank.attrs, path)
    bank.require_complete()
    if rows < 1:
        raise UsageError(f"--rows {rows}: give K >= 1 random crops")
    cfg = from_dict(DumpConfig, bank.attrs["config"])
    cfg = dc_replace(cfg, data=data or cfg.data, device=device, out=path, workers=1)
    manifest = build_manifest(cfg.data, cfg.split, layout=cfg.layout)
    bank.validate(manifest)
    dump = BankDump(cfg, manifest)
    model = dump.build_teachers()
    rng = np.random.default_rng(seed)
    ok = np.flatnonzero(~bank.skipped())
    idx = np.sort(rng.choice(ok, size=min(rows, len(ok)), replace=False))
    sizes = np.asarray(bank.group["image_size"][:])[idx]
    crops = crop_boxes(seed, 0, idx, sizes, dump.preset.scale, dump.preset.ratio)
    real = []
    for b in load_batches(dump.loader, manifest, idx, dump.branches, "views", batch_size, 1, device, seed,
                          boxes=crops[:, None, :]):
        real.append(model.ensemble([x.to(device) for x in b.inputs()]).float().cpu())
    real_t = torch.cat(real)  # [K, T, C]
    maps = torch.from_numpy(np.stack([read_maps(bank.group, int(i), int(i) + 1)[0] for i in idx]))
    regions = torch.from_numpy(np.asarray(bank.group["views"][:])[idx, 0, :4])
    pooled = pool(maps, map_boxes(torch.from_numpy(crops), regions, int(lm["size"])))
    whole = maps.mean(dim=(2, 3))
    out: dict[str, Any] = {"rows": len(idx), "map": {k: lm[k] for k in ("size", "region", "map_dtype", "topk")}}
    for t, rec in enumerate(bank.teachers):
        out[f"{t}:{rec.get('arch')}"] = {"kind": lm["kinds"][t], "pooled": _kl_top1(real_t[:, t], pooled[:, t]),
                                         "whole": _kl_top1(real_t[:, t], whole[:, t])}
    return out


def _add_map_check(p: Any) -> None:
    p.add_argument("bank", help="a label-map bank (dump_logits --format labelmap)")
    p.add_argument("--rows", type=int, default=64, help="random crops checked (default: 64)")
    p.add_argument("--seed", type=int, default=0, help="seed of the rows and crops (default: 0)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="where the teachers run (default: cpu)")
    p.add_argument("--data", default=None, help="dataset root, when it moved since the dump (default: the dump's)")
    p.add_argument("--json", action="store_true", help="print JSON")


def _run_map_check(args: Any) -> int:
    import json

    res = map_check(args.bank, args.rows, args.seed, args.device, args.data)
    if args.json:
        print(json.dumps(res, indent=2))
        return 0
    m = res["map"]
    print(f"map         {m['size']}x{m['size']} cells, region {m['region']}, "
          + (f"top-{m['topk']} per cell" if m["topk"] else m["map_dtype"]) + f"; {res['rows']} random crops")
    for name, r in res.items():
        if isinstance(r, dict) and "pooled" in r:
            for what, s in (("pooled", r["pooled"]), ("whole", r["whole"])):
                print(f"{name:<12}{what:<7} KL T=1 {s['kl_t1']:.4g}  KL T=4 {s['kl_t4']:.4g}  top-1 agreement "
                      f"{s['top1_agreement']:.1f}%  ({r['kind']})")
    return 0


def register(commands: dict) -> None:
    """Add ``map-check`` to ``python -m pipeline.labels``'s commands (name -> (add_arguments, run, help))."""
    commands["map-check"] = (_add_map_check, _run_map_check,
                             "label-map bank: pooled labels vs the teacher's real output on K random crops (KL at "
                             "T = 1, 4; top-1 agreement), per teacher")
