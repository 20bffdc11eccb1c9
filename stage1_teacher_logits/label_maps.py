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

    def recorded(self, manifest: Manifest, order: np.ndarray,
                 boxes: np.ndarray | None) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """What the bank stores for samples ``order``: the region boxes [len, 1, 5] and ``image_size`` [len, 2]."""
        layout = layout_of(manifest)
        sizes = np.array([layout.image_size(manifest, int(i)) for i in order], np.int32).reshape(len(order), 2)
        regions = np.zeros((len(order), 1, 5), np.float32)
        for k, (h, w) in enumerate(sizes):
            regions[k, 0, :4] = region_box(int(h), int(w), self.preset, self.region)
        return regions, {"image_size": sizes}
