"""Rebuilding the teacher inputs of stored bank rows from what the bank records, by view policy.

A bank row's inputs are determined by the manifest (which file), the preprocessing records (per teacher branch)
and the stored view parameters (``views`` [N, V, 5] boxes; policies that store more read their own arrays from
the bank). ``labels check`` (:mod:`pipeline.bank.check`) feeds what a replay function yields to the bank's
teachers and compares with the stored rows.

The registry maps a view-policy kind to a replay function, so a new policy (mixed views, label maps) plugs in
with one call, :func:`register_replay`, in the module that defines it:

    register_replay("mixed", replay_mixed, accepts=lambda policy: "mixup" in policy or "cutmix" in policy)

Built in: ``center`` (the preset's eval transform, NaN boxes) and ``rrc`` / ``rrc+flip`` (the stored crop boxes
and flips, replayed by the loaders' ``views`` mode exactly as the dump fed them).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from pipeline.data.batch import Batch
from pipeline.data.loaders import load_batches
from pipeline.data.manifest import Manifest
from pipeline.data.presets import Preprocess
from pipeline.errors import UsageError


@dataclass(frozen=True)
class ReplayRequest:
    """What a replay function gets.

    ``bank``: the :class:`pipeline.bank.reader.LabelBank` (for policies that store more than boxes);
    ``manifest``: the dataset the bank describes (validated); ``rows`` [K] int64 sample indices, sorted;
    ``views`` [K, V, 5] float32 the stored view records of those rows (``(y, x, h, w, flip)``, NaN = eval
    transform); ``view_record``: ``attrs["views"]``; ``branches``: the distinct preprocessing records, in
    branch order; ``loader``: ``dali`` or ``torch``; ``device``, ``batch_size``, ``workers``: how to load;
    ``amp``: the dump autocast its teachers (CUDA only).
    """

    bank: Any
    manifest: Manifest
    rows: np.ndarray
    views: np.ndarray
    view_record: dict[str, Any]
    branches: Sequence[Preprocess]
    loader: str
    device: str = "cpu"
    batch_size: int = 32
    workers: int = 1
    amp: bool = False


# A replay function yields batches whose ``inputs()`` are one tensor per branch, [b, 3, H, W] (one view) or
# [b, V, 3, H, W], and whose ``index`` [b] are ``rows`` in order.
ReplayFn = Callable[[ReplayRequest], Iterator[Batch]]

_REPLAYS: list[tuple[str, ReplayFn, Callable[[str], bool]]] = []


def register_replay(policy_kind: str, fn: ReplayFn, accepts: Callable[[str], bool] | None = None) -> None:
    """Register ``fn`` as the replay of view policy ``policy_kind`` (and of every policy string ``accepts``
    returns True for: parameterized policies such as ``rrc+flip+mixup(0.8)``). A kind registered twice raises
    ValueError (two modules claiming one policy is a bug)."""
    if any(kind == policy_kind for kind, _, _ in _REPLAYS):
        raise ValueError(f"a replay for view policy kind '{policy_kind}' is already registered")
    _REPLAYS.append((policy_kind, fn, accepts or (lambda policy: policy == policy_kind)))


def replay_kinds() -> list[str]:
    """The registered view-policy kinds, in registration order."""
    return [kind for kind, _, _ in _REPLAYS]


def replay_for(policy: str) -> ReplayFn:
    """The replay function of view policy ``policy`` (exact kind first, then the first that accepts it);
    UsageError naming the known kinds when none does."""
    for kind, fn, _ in _REPLAYS:
        if kind == policy:
            return fn
    for _, fn, accepts in _REPLAYS:
        if accepts(policy):
            return fn
    raise UsageError(f"no replay is registered for view policy '{policy}' (known: {', '.join(replay_kinds())}): "
                     "this version cannot rebuild that bank's inputs")


def replay_inputs(req: ReplayRequest) -> Iterator[Batch]:
    """The batches of ``req.rows``' rebuilt inputs (the replay of ``req.view_record["policy"]``)."""
    return replay_for(str(req.view_record.get("policy", "center")))(req)


def _replay_center(req: ReplayRequest) -> Iterator[Batch]:
    """The preset's eval transform (what a ``center`` bank's single NaN view means)."""
    return load_batches(req.loader, req.manifest, req.rows, list(req.branches), "eval", req.batch_size,
                        req.workers, req.device)


def _replay_boxes(req: ReplayRequest) -> Iterator[Batch]:
    """The stored crop boxes and flips, through the loaders' ``views`` mode (what the dump ran)."""
    return load_batches(req.loader, req.manifest, req.rows, list(req.branches), "views", req.batch_size,
                        req.workers, req.device, boxes=np.ascontiguousarray(req.views, np.float32))


register_replay("center", _replay_center)
register_replay("rrc", _replay_boxes)
register_replay("rrc+flip", _replay_boxes)
