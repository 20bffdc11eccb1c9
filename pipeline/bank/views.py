"""A bank's stored views rebuilt as images: what the teachers saw when the rows were dumped.

:func:`rebuild_inputs` reads each requested (sample, view)'s stored box and flip, and for a policy with stored
parameters its ``view_params`` row and ``view_partner`` (the partner's own stored view, then the mix), and runs
the chosen loader on them; no random number is drawn. ``labels check`` (and tests) feed the result to the live
teachers and compare with the stored rows.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from pipeline.data.loaders import load_batches, load_mixed_batches
from pipeline.data.manifest import Manifest
from pipeline.data.presets import Preprocess
from pipeline.bank.replay import register_replay
from pipeline.errors import BankError, UsageError


def stored_views(group: Any, samples: np.ndarray, views: np.ndarray) -> dict[str, np.ndarray | None]:
    """The stored view records of (``samples`` [K], ``views`` [K]): ``boxes`` [K, 1, 5], and for a policy with
    parameters ``params`` [K, 1, A], ``partners`` [K, 1], ``partner_boxes`` [K, 1, 5], ``partner_params`` [K, 1, A]
    (the partner's own view of the same index); None where the bank has none."""
    boxes = np.stack([group["views"][int(i), int(v)] for i, v in zip(samples, views)])[:, None]
    out: dict[str, np.ndarray | None] = {"boxes": boxes, "params": None, "partners": None}
    if "view_params" in group:
        out["params"] = np.stack([group["view_params"][int(i), int(v)] for i, v in zip(samples, views)])[:, None]
        partners = np.array([int(group["view_partner"][int(i), int(v)]) for i, v in zip(samples, views)], np.int64)
        out["partners"] = partners[:, None].astype(np.int32)
        safe = np.maximum(partners, 0)
        out["partner_boxes"] = np.stack([group["views"][int(j), int(v)] for j, v in zip(safe, views)])[:, None]
        out["partner_params"] = np.stack([group["view_params"][int(j), int(v)] for j, v in zip(safe, views)])[:, None]
    return out


def rebuild_inputs(bank_group: Any, manifest: Manifest, rows: np.ndarray, preset: Preprocess,
                   loader: str = "torch") -> torch.Tensor:
    """The images [K, 3, crop, crop] float32 (normalized) behind bank rows ``rows`` [K] (row = sample·V + view, the
    numbering of :class:`pipeline.bank.resident.ResidentBank`), rebuilt with ``loader`` (``dali`` or ``torch``)
    from the stored views: the eval transform for a center bank, the stored box and flip, and the stored
    augmentations and mixing for a policy with parameters.

    Raises:
        BankError: a row outside the bank.
    """
    num_views = int(bank_group["views"].shape[1])
    rows = np.asarray(rows, np.int64)
    n = int(bank_group["labels"].shape[0])
    if len(rows) == 0 or rows.min() < 0 or rows.max() >= n * num_views:
        raise BankError(f"rows must lie in [0, {n * num_views}) (sample * {num_views} + view)")
    samples, views = rows // num_views, rows % num_views
    rec = stored_views(bank_group, samples, views)
    boxes = rec["boxes"]
    k = len(rows)
    if np.isnan(boxes).all():  # center policy: the preset's eval transform
        it = load_batches(loader, manifest, samples, preset, "eval", k, 1, "cpu")
    elif rec["params"] is None or (rec["partners"] < 0).all():
        it = load_batches(loader, manifest, samples, preset, "views", k, 1, "cpu", boxes=boxes, params=rec["params"])
    else:
        it = load_mixed_batches(loader, manifest, samples, preset, k, 1, "cpu", boxes, rec["params"],
                                rec["partners"], rec["partner_boxes"], rec["partner_params"])
    return torch.cat([b.images for b in it])


def _replay_with_params(req: Any) -> Any:
    """The :mod:`pipeline.bank.replay` function of policies with stored parameters (augmentations, Mixup, CutMix):
    every view of ``req.rows`` rebuilt from its stored box, parameter row and partner (the partner's own stored
    view of the same index), through the loaders exactly as the dump fed them."""
    rows, v = np.asarray(req.rows, np.int64), int(req.views.shape[1])
    rec = stored_views(req.bank.group, np.repeat(rows, v), np.tile(np.arange(v), len(rows)))
    shaped = {k: (a.reshape(len(rows), v, *a.shape[2:]) if a is not None else None) for k, a in rec.items()}
    branches = list(req.branches)
    if (shaped["partners"] < 0).all():
        return load_batches(req.loader, req.manifest, rows, branches, "views", req.batch_size, req.workers,
                            req.device, boxes=shaped["boxes"], params=shaped["params"])
    return load_mixed_batches(req.loader, req.manifest, rows, branches, req.batch_size, req.workers, req.device,
                              shaped["boxes"], shaped["params"], shaped["partners"], shaped["partner_boxes"],
                              shaped["partner_params"])


def _stores_params(policy: str) -> bool:
    from pipeline.data.policy import parse_view_policy

    try:
        return parse_view_policy(policy).stores_params
    except UsageError:  # not a policy this version parses: replay_for names the known kinds
        return False


register_replay("augmenting", _replay_with_params, accepts=_stores_params)
