"""Stage 1's bank formats: what the producer stores for a batch of teacher logits, encoded on their device.

A format is an encoder registered by name (:func:`register_encoder`); the dump picks the one named by the bank's
``format`` attr, so a new format plugs in without editing the loop (``labelmap`` did: :class:`LabelMapEncoder`).
An encoder has two methods:

- ``encode(x, labels, skipped, rows, fidelity)``: on the teachers' device, x [b, T, V, C] float32 logits (a map
  model: [b, T, S·S, C]; with ``--append-views``, dense, only the new views) of bank rows ``rows`` [b] (numpy),
  labels [b], skipped [b] bool (their vectors must be stored as NaN), fidelity [b] bool (the rows of the
  chunk's fidelity sample, :func:`pipeline.bank.compact.fidelity_rows_mask`) -> {name: tensor
  [b, ...]}: arrays of the bank written at these rows, and per-row records (names starting with ``_``) that
  stay on the host until the chunk is complete. Only these tensors cross to the host.
- ``finish(records, labels)``: {name: numpy [r, ...]} of the whole chunk (row order) and its labels [r] ->
  {array name: value of the chunk's row in that per-chunk array} (``chunk_sums``, ``metric_sums``), written
  before the chunk's done flag.

Both must be deterministic per row (resume after a kill stores the same bytes).
"""

from __future__ import annotations

from typing import Any, Callable, Protocol

import numpy as np
import torch

from pipeline.bank import encoding as en
from pipeline.bank.labelmap import encode_chunk as encode_map_chunk


class ChunkEncoder(Protocol):
    def encode(self, x: torch.Tensor, labels: torch.Tensor, skipped: torch.Tensor, rows: np.ndarray,
               fidelity: torch.Tensor) -> dict[str, torch.Tensor]: ...

    def finish(self, records: dict[str, np.ndarray], labels: np.ndarray) -> dict[str, np.ndarray]: ...


EncoderFactory = Callable[[dict[str, Any]], ChunkEncoder]
_ENCODERS: dict[str, EncoderFactory] = {}


def register_encoder(name: str, factory: EncoderFactory) -> None:
    """Make ``factory(attrs) -> ChunkEncoder`` the encoder of banks whose ``format`` attr is ``name`` (``attrs``:
    the bank's attrs: shape, dtype, format parameters). Registering a name again replaces it."""
    _ENCODERS[name] = factory


def encoder_for(attrs: dict[str, Any]) -> ChunkEncoder:
    """The encoder of a bank with these attrs. ValueError for a format nothing registered."""
    fmt = attrs.get("format", "dense")
    if fmt not in _ENCODERS:
        raise ValueError(f"no stage-1 encoder registered for format {fmt!r}; registered: {', '.join(_ENCODERS)}")
    return _ENCODERS[fmt](attrs)


class DenseEncoder:
    """``dense``: the logits rounded to the bank dtype (half the bytes of float32 cross for float16). A bank with
    ``metric_sums`` (every dump since issue 24) also gets the teachers' metric states of view 0 as stored
    (:func:`pipeline.bank.encoding.metric_rows` on the device, [b, E, 6] per batch; summed per chunk by
    :meth:`finish`), so the dump's ``metrics`` need no read-back of the bank. With ``--append-views`` the batches
    hold only the new views: view 0 then comes from the source bank's rows already in the chunk buffer, and
    :meth:`finish` measures it there."""

    def __init__(self, attrs: dict[str, Any]):
        self.dtype = torch.float16 if attrs["dtype"] == "float16" else torch.float32
        self.views = int(attrs["shape"][2])
        self.metric_sums = bool(attrs.get("metric_sums"))

    def encode(self, x: torch.Tensor, labels: torch.Tensor, skipped: torch.Tensor, rows: np.ndarray,
               fidelity: torch.Tensor) -> dict[str, torch.Tensor]:
        z = x.to(self.dtype).masked_fill(skipped.to(x.device)[:, None, None, None], float("nan"))
        out = {"logits": z}
        if self.metric_sums and x.shape[2] == self.views:  # all views: view 0 is here
            out["_metrics"] = en.metric_rows(z[:, :, 0], labels, skipped)
        return out

    def finish(self, records: dict[str, np.ndarray], labels: np.ndarray) -> dict[str, np.ndarray]:
        if not self.metric_sums:
            return {}
        rows = records.get("_metrics")
        if rows is None:  # appended views: view 0 was copied from the source bank
            z = torch.from_numpy(np.ascontiguousarray(records["logits"][:, :, 0]))
            skipped = ~torch.isfinite(z.float()).reshape(len(z), -1).all(1)
            rows = en.metric_rows(z, torch.from_numpy(labels.astype(np.int64)), skipped).numpy()
        return {"metric_sums": en.metric_sums(rows)}


class CompactEncoder:
    """``topk``, ``sampled``, ``int8``: :func:`pipeline.bank.encoding.encode_rows` on the device, the chunk's
    fidelity and metric sums (``chunk_sums``) reduced from its per-row records."""

    def __init__(self, attrs: dict[str, Any]):
        self.fmt, self.k, self.dtype = attrs["format"], attrs.get("topk"), attrs["dtype"]
        self.samples, self.seed = attrs.get("samples"), int(attrs.get("sample_seed", 0))
        self.t = int(attrs["shape"][1])

    def encode(self, x: torch.Tensor, labels: torch.Tensor, skipped: torch.Tensor, rows: np.ndarray,
               fidelity: torch.Tensor) -> dict[str, torch.Tensor]:
        return en.encode_rows(x, labels, skipped, self.fmt, self.k, self.dtype, fidelity, samples=self.samples,
                              seed=self.seed, rows=rows)

    def finish(self, records: dict[str, np.ndarray], labels: np.ndarray) -> dict[str, np.ndarray]:
        return {"chunk_sums": en.chunk_sums(records, self.t)}


class LabelMapEncoder:
    """``labelmap`` (issue 26): x [b, T, S·S, C] (the map model's cells on the view axis) rounded to the bank
    dtype, skipped rows NaN, then :func:`pipeline.bank.labelmap.encode_chunk` per batch (float16, int8 with a
    per-cell scale, or top-k per cell: each cell is encoded on its own, so per batch = per chunk, bit for bit).
    The rounded cells cross to the host (the encoding is numpy); no per-chunk arrays."""

    def __init__(self, attrs: dict[str, Any]):
        lm = attrs["label_map"]
        self.size, self.map_dtype, self.k = int(lm["size"]), lm["map_dtype"], lm["topk"]
        self.dtype = torch.float16 if attrs["dtype"] == "float16" else torch.float32

    def encode(self, x: torch.Tensor, labels: torch.Tensor, skipped: torch.Tensor, rows: np.ndarray,
               fidelity: torch.Tensor) -> dict[str, torch.Tensor]:
        z = x.to(self.dtype).masked_fill(skipped.to(x.device)[:, None, None, None], float("nan"))
        out = encode_map_chunk(z.cpu().numpy(), skipped.cpu().numpy(), self.size, self.map_dtype, self.k)
        return {name: torch.from_numpy(a) for name, a in out.items()}

    def finish(self, records: dict[str, np.ndarray], labels: np.ndarray) -> dict[str, np.ndarray]:
        return {}


register_encoder("dense", DenseEncoder)
for _fmt in ("topk", "sampled", "int8"):
    register_encoder(_fmt, CompactEncoder)
register_encoder("labelmap", LabelMapEncoder)
