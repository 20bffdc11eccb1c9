"""The measurements of the offline-vs-live suite that training runs cannot give: step times of plain CE, KD from
the bank and KD from a live teacher in one interleaved measurement (one process, one thread, rounds alternating,
so a load change hits all three alike), and the bank-vs-live exactness of the per-step losses."""

from __future__ import annotations

import statistics
import time
from typing import Any

import numpy as np
import torch

import kd_losses


def step_times(bank_path: str, teacher: tuple[str, str], student: str, batch: int, rounds: int = 5,
               reps: int = 5, size: int = 32) -> dict[str, Any]:
    """Median seconds per training step (forward, backward, SGD) of ``student`` with ``ce``, ``kd`` from the bank
    and ``kd`` from the live teacher (``teacher``: arch, checkpoint), on [batch, 3, size, size] tensors."""
    from pipeline.bank.reader import LabelBank
    from pipeline.models import create_model
    from pipeline.models.teachers import parse_teachers
    from stage2_student_train.label_sources import BankLabelSource, LiveTeacherLabelSource

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        bank = BankLabelSource([LabelBank(bank_path)])
        live = LiveTeacherLabelSource(parse_teachers([teacher[0]], [teacher[1]]), bank.residents[0].shape[3], "cpu",
                                      crop=size)
        c = bank.residents[0].shape[3]
        torch.manual_seed(0)
        model = create_model(student, c)
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        losses = {"ce": kd_losses.build_loss("ce", num_classes=c), "kd": kd_losses.build_loss("kd", num_classes=c)}
        x = torch.randn(batch, 3, size, size)
        b0 = {"image": x, "label": torch.randint(0, c, (batch,)), "epoch": 0,
              "index": torch.randint(0, bank.num_samples, (batch,))}

        def step(variant: str) -> float:
            t0 = time.perf_counter()
            b = dict(b0)
            if variant != "ce":
                b.update((bank if variant == "bank" else live)(b))
            out = losses["ce" if variant == "ce" else "kd"](model(x), b)
            opt.zero_grad(set_to_none=True)
            out["loss"].backward()
            opt.step()
            return time.perf_counter() - t0

        for v in ("ce", "bank", "live"):
            step(v)
        times: dict[str, list[float]] = {"ce": [], "bank": [], "live": []}
        for _ in range(rounds):
            for v in times:
                times[v].append(statistics.median(step(v) for _ in range(reps)))
        med = {v: statistics.median(t) for v, t in times.items()}
        return {"ms": {v: 1000 * t for v, t in med.items()}, "bank_over_ce": med["bank"] / med["ce"],
                "live_over_bank": med["live"] / med["bank"], "batch": batch, "size": size, "rounds": rounds}
    finally:
        torch.set_num_threads(threads)


def exactness(data: str, bank_path: str, teacher: tuple[str, str], preset: str, batches: int = 4,
              batch: int = 128) -> dict[str, float]:
    """Bank vs live teacher on the same eval-transform batches: max |logit difference|, and the max relative
    difference of the per-step ``kd`` and ``wsld`` losses of a fixed random student."""
    from pipeline.bank.reader import LabelBank
    from pipeline.data import build_manifest
    from pipeline.data.loaders import load_batches
    from pipeline.data.presets import get_preset
    from pipeline.models import create_model
    from pipeline.models.teachers import parse_teachers
    from stage2_student_train.label_sources import BankLabelSource, LiveTeacherLabelSource
    from stage2_student_train.loop import make_batch

    m = build_manifest(data, "train")
    bank = BankLabelSource([LabelBank(bank_path)])
    live = LiveTeacherLabelSource(parse_teachers([teacher[0]], [teacher[1]]), m.classes, "cpu",
                                  crop=get_preset(preset).crop)
    torch.manual_seed(0)
    student = create_model("democnn_s", m.num_classes).eval()
    targets = torch.from_numpy(m.labels.astype(np.int64))
    order = np.random.default_rng(0).permutation(len(m))[: batches * batch]
    worst = {"logits_abs": 0.0, "kd_rel": 0.0, "wsld_rel": 0.0}
    fns = {k: kd_losses.build_loss(k, num_classes=m.num_classes) for k in ("kd", "wsld")}
    with torch.no_grad():
        for b in load_batches("dali", m, order, get_preset(preset), "eval", batch, 1, "cpu", 0):
            bt = make_batch(b, targets, "cpu", 0, False)
            zb, zl = bank(bt)["teacher_logits"], live(bt)["teacher_logits"]
            worst["logits_abs"] = max(worst["logits_abs"], float((zb - zl).abs().max()))
            s = student(bt["image"])
            for k, fn in fns.items():
                lb = float(fn(s, {**bt, "teacher_logits": zb})["loss"])
                ll = float(fn(s, {**bt, "teacher_logits": zl})["loss"])
                worst[f"{k}_rel"] = max(worst[f"{k}_rel"], abs(lb - ll) / max(abs(ll), 1e-12))
    return worst
