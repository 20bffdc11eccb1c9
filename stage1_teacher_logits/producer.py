"""Stage 1's producer: loader -> teachers on the device -> the format's encoder on the device -> host buffers ->
the background writer. Per batch: one transfer of the images to the device, one finiteness flag and the encoded
payload back; no per-sample Python.
"""

from __future__ import annotations

from contextlib import contextmanager

import numpy as np
import torch
from tqdm import tqdm

from pipeline.bank.compact import fidelity_rows_mask
from pipeline.data.batch import DecodeError
from pipeline.distributed import DistInfo
from pipeline.errors import BankError
from pipeline.models.ensemble import TeacherEnsemble
from stage1_teacher_logits.append import first_view
from stage1_teacher_logits.encoders import encoder_for
from stage1_teacher_logits.plan import ChunkPlan, ChunkRecovery
from stage1_teacher_logits.writer import ChunkBuffer, ChunkWriter


class Producer:
    """Feeds one rank's :class:`ChunkPlan` through the teachers (``dump``: a
    :class:`stage1_teacher_logits.dump.BankDump`, for its config, manifest, loader and preprocessing branches)
    into the bank ``g``; :class:`ChunkRecovery` decides the stretches and handles undecodable files. ``sampler``
    (a :class:`stage1_teacher_logits.views.ViewSampler`, or a map dump's
    :class:`stage1_teacher_logits.label_maps.MapRegion`) gives the loader's batches and what the bank records
    per row; with ``--append-views`` (``dump.prefix``) each chunk buffer starts with SRC's views and the teachers
    run on the new views only."""

    def __init__(self, dump, g, model: TeacherEnsemble, plan: ChunkPlan, sampler, info: DistInfo):
        self.dump, self.cfg, self.g, self.model, self.plan, self.sampler = dump, dump.cfg, g, model, plan, sampler
        self.manifest, self.prefix = dump.manifest, dump.prefix
        self.t, self.v, self.c = tuple(g.attrs["shape"])[1:]
        self.recovery = ChunkRecovery(plan, self.manifest, self.cfg.skip_corrupt)
        self.encoder = encoder_for(dict(g.attrs))
        self.writer = ChunkWriter(g, self.encoder)
        self.labels = torch.from_numpy(self.manifest.labels.astype(np.int64))
        self.pbar = tqdm(total=plan.num_real, desc=f"dump rank {info.rank}", unit="img", disable=not info.is_main,
                         mininterval=1.0)

    def run(self) -> None:
        try:
            self.recovery.run(self._stretch)
        finally:
            self.pbar.close()  # ends the progress line, so an error message starts on its own line
            self.writer.close()  # every queued chunk written (or the writer's error raised, unless one is raised)

    def _stretch(self, start: int, stop: int, sub: np.ndarray) -> int | None:
        """Positions [start, stop) (samples ``sub``) through one loader. Returns None when all were queued, or the
        chunk start to resume from after a decode error (the bad file is then a suspect)."""
        cfg, prefix = self.cfg, self.prefix
        boxes, params, partners, it = self.sampler.batches(
            self.dump.loader, self.manifest, sub, self.dump.branches, cfg.batch_size, cfg.workers, cfg.device,
            cfg.seed, cfg.hw_decoder_load, None if prefix is None else prefix.new)
        stored, extra = self.sampler.recorded(self.manifest, sub, boxes)  # label maps: regions, image sizes
        buf: ChunkBuffer | None = None
        pos = start
        while True:
            try:
                batch = next(it)
            except StopIteration:
                return None
            except DecodeError as e:
                chunk_start = self.recovery.after_decode_error(pos, e, self.dump.loader)
                self.pbar.update(-int(self.plan.real[chunk_start:pos].sum()))
                return chunk_start
            b = len(batch.index)  # batches never straddle chunks (ChunkPlan): [pos, pos + b) is in one chunk
            if buf is None:
                j = int(self.plan.chunk[pos])
                first, r = self.plan.chunk_rows(j)
                buf = ChunkBuffer(j, first, r, self.v, params.shape[-1] if params is not None else 0)
                if prefix is not None:
                    prefix.fill(buf)
            at = slice(pos - start, pos - start + b)
            self._batch(batch.inputs(), pos, b, buf, None if stored is None else stored[at],
                        {n: a[at] for n, a in extra.items()},
                        None if params is None else (params[at], partners[at]))
            pos += b
            if pos == self.plan.chunk_end[pos - 1]:  # chunk filled: queue it now, so a later error cannot lose it
                if prefix is not None:
                    prefix.check(buf)
                self.writer.submit(buf)
                buf = None
            self.pbar.update(int(self.plan.real[pos - b:pos].sum()))
            self.pbar.set_postfix_str(f"chunk {int(self.plan.chunk[pos - 1])}", refresh=False)

    def _batch(self, inputs: list[torch.Tensor], pos: int, b: int, buf: ChunkBuffer, boxes: np.ndarray | None,
               extra: dict[str, np.ndarray], params: tuple[np.ndarray, np.ndarray] | None) -> None:
        """Teachers and encoder on the device for plan positions [pos, pos + b); the real rows' payload into
        ``buf`` with what the bank records beside it (``boxes`` [b, V, 5] or None, the sampler's ``extra``
        arrays [b, ...], view ``params`` ([b, V, A], partners [b, V]) or None)."""
        plan, dev = self.plan, self.cfg.device
        real = plan.real[pos:pos + b]
        rows = plan.order[pos:pos + b][real]
        skipped = self.recovery.skipped(pos, pos + b)[real]
        x, feats = self._teachers(inputs)
        first, r = plan.chunk_rows(buf.j)
        fid = torch.from_numpy(fidelity_rows_mask(rows, first, r)).to(dev)
        with _one_cpu_thread(dev):
            for what, y in (("logits", x), ("embeddings", feats)):
                if y is not None and _any_bad(y, self.cfg.dtype):  # one flag crosses; the exact path if one is bad
                    _check_finite(y.cpu().numpy(), plan.order[pos:pos + b], self.recovery.skip, self.manifest.files,
                                  self.cfg.dtype, what)
            if not real.all():
                keep = torch.from_numpy(np.flatnonzero(real)).to(dev)
                x = x.index_select(0, keep)
                feats = feats.index_select(0, keep) if feats is not None else None
            out = self.encoder.encode(x, self.labels[rows].to(dev), torch.from_numpy(skipped).to(dev), rows, fid)
        host = {n: a.cpu().numpy() for n, a in out.items()}
        f = None
        if feats is not None:
            f = feats.cpu().numpy()
            f[skipped] = np.nan
        pp = (None, None) if params is None else (params[0][real], params[1][real])
        buf.put(rows, host, self.manifest.labels[rows], boxes[real] if boxes is not None else None, skipped, f,
                *pp, first_view(self.prefix), {n: a[real] for n, a in extra.items()})

    def _teachers(self, inputs: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One tensor per preprocessing branch, [B, 3, H, W] or [B, V, 3, H, W] -> logits [B, T, V, C] float32 on
        the device (a map model: [B, T, S·S, C], the cells on the view axis) (every view of its branch through each teacher), and with ``--features`` the embeddings
        [B, T, V, D] float32."""
        t, c, cfg = self.t, self.c, self.cfg
        inputs = [x.to(cfg.device, non_blocking=True) for x in inputs]
        with torch.autocast("cuda", enabled=cfg.amp and cfg.device == "cuda"):
            if inputs[0].ndim == 5:
                b_, v_ = inputs[0].shape[:2]
                out = self.model([x.flatten(0, 1) for x in inputs]).reshape(b_, v_, t, c).transpose(1, 2)
                f = self.model.features
                feats = None if f is None else f.reshape(b_, v_, t, -1).transpose(1, 2)
            else:
                out = self.model(inputs)
                out = out[:, :, None, :] if out.ndim == 3 else out  # label maps: [B, T, S·S, C] already
                feats = None if self.model.features is None else self.model.features[:, :, None, :]
        return out.float(), None if feats is None else feats.float()


@contextmanager
def _one_cpu_thread(device: str):
    """On a CPU, one intra-op thread for the encoder: a batch's encoding is hundreds of small ops, for which the
    teachers' thread team costs more than it gives (2.9 ms of CPU per top-5 batch of 256 with 1 thread, 139 ms with
    2 on 2 busy cores: the team spins waiting for each other)."""
    if device != "cpu":
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _any_bad(x: torch.Tensor, dtype: str) -> bool:
    """Whether any value of ``x`` is non-finite or beyond the range of the bank ``dtype`` (one flag to the host)."""
    limit = float(np.finfo(np.dtype(dtype)).max)
    return bool((~torch.isfinite(x) | (x.abs() > limit)).any())


def _check_finite(out: np.ndarray, index: np.ndarray, skip: set[int], files: list[str],
                  dtype: np.dtype | str = np.float32, what: str = "logits") -> None:
    """BankError naming the first sample (not skipped) of ``out`` [B, ...] with a non-finite value, or one beyond
    the range of the bank ``dtype``."""
    bad = ~np.isfinite(out.reshape(len(out), -1)).all(axis=1)
    for k in np.flatnonzero(bad):
        i = int(index[k])
        if i not in skip:
            raise BankError(f"teacher produced non-finite {what} for sample {i} ({files[i]}); "
                            "nothing was marked done for its chunk")
    # finite in float32 but beyond the bank dtype's range (|x| > 65504 in float16): would be stored as inf
    with np.errstate(over="ignore"):
        over = ~np.isfinite(out.astype(dtype).reshape(len(out), -1)).all(axis=1)
    for k in np.flatnonzero(over):
        i = int(index[k])
        if i not in skip:
            raise BankError(f"teacher {what} of sample {i} ({files[i]}) reach "
                            f"{float(np.abs(out[k]).max()):.4g}, beyond the range of {np.dtype(dtype).name}: dump "
                            "with --dtype float32; nothing was marked done for its chunk")
