"""Check the GPU paths in one short run (issue 13), on data it generates, with whichever loader is installed.

    python bench/gpu_check.py                    # --device cuda, full size (at most ~5 minutes on one GPU)
    python bench/gpu_check.py --device cpu --size small   # the same flow on CPU at toy sizes (run by a test)
    python bench/gpu_check.py --write            # also write the "GPU check" section of BENCHMARKS.md

Checks, each a row of the printed table (PASS / FAIL / n/a with the figure behind it):

1. stage 1 on the device vs on the CPU, same teacher and loader: same rows in the same order, logits equal
   within fp16 tolerance (DALI ``mixed`` decoding on CUDA when DALI is installed);
2. stage 2 from that bank on the device with the bank held on the device: fp32, bf16 autocast, fp16 autocast +
   GradScaler (CUDA only), channels_last: every loss finite;
3. bank vs live teacher on the device: per-batch KD/WSLD losses equal within fp16 tolerance (eval transform);
4. a 1-process ``torchrun`` through both stages (NCCL + gloo on CUDA, gloo on CPU);
5. figures: dump images/s; student step time with the bank vs plain CE vs a live ResNet-34 teacher (ratios,
   interleaved rounds); DALI ``mixed`` decode rate when DALI is there; the torch loader's nvJPEG decode rate;
6. the torch loader's nvJPEG path vs its CPU path on the generated val images: pixel difference (normalized
   units) and the teacher's logit difference (TF32 off), measured (n/a on CPU).

Each check is independent: it makes what it needs (the generated data, the training bank: built once, on first
use, by whichever check asks first), so an exception in one is a FAIL row and the others still run
(``--fail-check NAME`` injects a failure into one, for the test of that). Exactness comparisons run with TF32
off; comparisons across decoders use bounds set from the decoders' measured difference (docs/GPU.md).

Needs only torch, torchvision, zarr, numcodecs, numpy and this project (dask, timm and DALI optional).
Exit code 1 when a check fails.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline.config import from_dict  # noqa: E402


@dataclass(frozen=True)
class Size:
    train: int  # training images (10 classes)
    val: int
    px: tuple[int, int]  # generated image size range
    preset: str
    batch: int
    steps: int  # optimizer steps per training check
    step_px: int  # image size of the step-time figure
    rounds: int
    reps: int  # steps per timing (their median is one round's figure)


WORKERS = min(4, os.cpu_count() or 1)  # loader threads / processes

SIZES = {
    "full": Size(train=2048, val=256, px=(192, 320), preset="imagenet", batch=64, steps=20, step_px=224, rounds=6,
                 reps=5),
    "small": Size(train=64, val=32, px=(24, 40), preset="tiny", batch=16, steps=2, step_px=32, rounds=1,
                  reps=2),
}


@dataclass
class Row:
    check: str
    status: str  # PASS, FAIL or n/a
    detail: str
    seconds: float


class Check:
    def __init__(self, device: str, size: Size, work: Path, loader: str):
        from pipeline.data.loaders import resolve_loader

        self.device, self.size, self.work, self.loader = device, size, work, resolve_loader(loader)
        self.rows: list[Row] = []
        self.figures: dict[str, Any] = {"device": _device_name(device), "loader": self.loader}
        self.data: Path | None = None
        self._bank: str | None = None

    def ensure_data(self) -> None:
        """The generated data and teacher checkpoint, made on first use (every check calls this)."""
        if self.data is None:
            self.make_data()

    @property
    def bank(self) -> str:
        """The training split's bank on the device, dumped on first use (so no check depends on another's
        success)."""
        if self._bank is None:
            self.ensure_data()
            self._bank = self._dump("train", self.device, self.work / "train.zarr")
        return self._bank

    def checks(self, device: str) -> dict[str, Callable[[], tuple[bool | None, str]]]:
        """Every check by its row name, in the order they run."""
        return {"generate data and teacher": self.make_data,
                f"stage 1 on {device} == on cpu": self.dump_matches_cpu, "stage 1 rate": self.dump_rate,
                f"stage 2 from the bank on {device}": self.train_variants,
                "stage 2 with the bank on the host (staging)": self.host_bank_staging,
                "bank == live teacher": self.bank_equals_live, "torchrun, 1 process, both stages": self.torchrun,
                "step time: bank vs CE vs live ResNet-34": self.step_ratios,
                "teacher only: ResNet-50 bf16": self.teacher_rate, "DALI mixed decode": self.dali_decode,
                "torch nvJPEG decode": self.nvjpeg_decode, "torch nvJPEG vs CPU torch path": self.nvjpeg_vs_cpu}

    def run(self, name: str, fn: Callable[[], tuple[bool | None, str]]) -> None:
        t0 = time.time()
        try:
            ok, detail = fn()
        except Exception as e:  # noqa: BLE001  (a failed check is a row, the others still run)
            ok, detail = False, f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"
        status = "n/a" if ok is None else ("PASS" if ok else "FAIL")
        self.rows.append(Row(name, status, detail, time.time() - t0))
        print(f"[{status}] {name}: {detail} ({time.time() - t0:.1f}s)", flush=True)

    # --- data ----------------------------------------------------------------------------------------------
    def make_data(self) -> tuple[bool, str]:
        from PIL import Image

        rng = np.random.default_rng(0)
        root = self.work / "data"
        for split, n in (("train", self.size.train), ("val", self.size.val)):
            for i in range(n):
                c = i % 10
                h, w = (int(x) for x in rng.integers(*self.size.px, size=2))
                # photo-like: smooth colour fields plus mild noise (JPEG decoders differ mostly in chroma
                # upsampling, which per-pixel noise images exaggerate: 8 gray levels on average, measured)
                coarse = Image.fromarray(rng.integers(0, 255, (max(h // 24, 2), max(w // 24, 2), 3), dtype=np.uint8))
                img = np.asarray(coarse.resize((w, h), Image.BICUBIC)).astype(np.int16)
                img = np.clip(img + rng.integers(-6, 7, img.shape), 0, 255).astype(np.uint8)
                img[: h // 3, :, c % 3] = 25 * c  # class-dependent structure
                d = root / split / f"class{c}"
                d.mkdir(parents=True, exist_ok=True)
                Image.fromarray(img).save(d / f"{i:05d}.jpg", quality=90)
        torch.manual_seed(0)
        from pipeline.models import create_model

        teacher = create_model("resnet18", 10, "none")
        self.teacher = self.work / "teacher.pt"
        torch.save({"model": teacher.state_dict()}, self.teacher)
        self.data = root
        return True, f"{self.size.train} + {self.size.val} JPEGs, 10 classes, {self.size.px} px; resnet18 teacher"

    # --- 1: stage 1 on the device vs CPU ---------------------------------------------------------------------
    def _dump(self, split: str, device: str, out: Path, **extra: Any) -> str:
        from stage1_teacher_logits.dump import DumpConfig, run_dump

        self.ensure_data()
        cfg = from_dict(DumpConfig, {"teacher": ["resnet18"], "weights": [str(self.teacher)], "data": str(self.data),
                                     "split": split, "preset": self.size.preset, "device": device,
                                     "batch_size": self.size.batch, "workers": WORKERS, "loader": self.loader,
                                     "out": str(out), "rows_per_chunk": 512, **extra})
        return run_dump(cfg)

    def dump_matches_cpu(self) -> tuple[bool, str]:
        import zarr

        with _no_tf32():  # an exactness comparison: the device's convolutions in full float32
            dev = self._dump("val", self.device, self.work / "val-dev.zarr")
        cpu = self._dump("val", "cpu", self.work / "val-cpu.zarr")
        a, b = zarr.open_group(dev, mode="r"), zarr.open_group(cpu, mode="r")
        same_rows = np.array_equal(a["labels"][:], b["labels"][:])
        za, zb = a["logits"][:].astype(np.float32), b["logits"][:].astype(np.float32)
        dz = np.abs(za - zb)
        agree = float((za[:, 0, 0].argmax(1) == zb[:, 0, 0].argmax(1)).mean())
        # on CUDA the torch loader decodes with nvJPEG and resamples in float32 (the CPU: libjpeg-turbo, uint8),
        # so logits differ by the decoders' difference, not by rounding: bounded relative to the logits' spread
        rel = float(dz.mean() / max(float(zb.std()), 1e-6))
        ok = same_rows and agree >= 0.99 and rel < 0.05
        return ok, (f"same rows {same_rows}, mean |dz| {dz.mean():.2e} = {rel:.3f} logit std (limit 0.05), max "
                    f"|dz| {dz.max():.2e}, top-1 agreement {agree:.4f} (limit 0.99)")

    def dump_rate(self) -> tuple[bool, str]:
        self.ensure_data()
        t0 = time.time()
        path = self._dump("train", self.device, self.work / "train-rate.zarr")
        rate = self.size.train / (time.time() - t0)
        self._bank = self._bank or path  # the training bank, unless a check already made one
        self.figures["dump_images_per_s"] = round(rate, 1)
        return True, f"{rate:.0f} img/s (resnet18, {self.size.preset} preset, batch {self.size.batch}, incl. start-up)"

    # --- 2: stage 2 from the bank on the device --------------------------------------------------------------
    def _train(self, out: Path, **extra: Any) -> dict:
        from stage2_student_train import TrainConfig, run_training

        cfg = {"method": "kd", "student": "resnet18", "banks": [self.bank], "data": str(self.data),
               "preset": self.size.preset, "device": self.device, "epochs": 1, "batch_size": self.size.batch,
               "workers": WORKERS, "max_steps_per_epoch": self.size.steps, "output_dir": str(out), "overwrite": True,
               "loader": self.loader, "optim": {"lr": 0.01}, "log_every": 1}
        for k, v in extra.items():
            cfg[k] = v
        return run_training(from_dict(TrainConfig, cfg))

    def train_variants(self) -> tuple[bool, str]:
        from pipeline.bank.reader import LabelBank
        from stage2_student_train.label_sources import BankLabelSource

        held = BankLabelSource([LabelBank(self.bank)], self.device).rows_device
        results = []
        variants = {"fp32": {}, "bf16": {"amp": "bf16"}, "fp16+GradScaler": {"amp": "fp16"},
                    "channels_last+bf16": {"channels_last": True, "amp": "bf16"}}
        ok = held == self.device
        for name, extra in variants.items():
            if name.startswith("fp16") and self.device != "cuda":
                results.append(f"{name} n/a on cpu")
                continue
            final = self._train(self.work / f"run-{name}", **extra)
            losses = [json.loads(x)["train_loss"] for x in
                      (self.work / f"run-{name}" / "metrics.jsonl").read_text().splitlines()]
            finite = all(np.isfinite(losses)) and np.isfinite(final["nll"])
            ok = ok and finite
            results.append(f"{name} loss {losses[-1]:.3f}{'' if finite else ' NOT FINITE'}")
        return ok, f"bank rows held on {held}; " + "; ".join(results)

    def host_bank_staging(self) -> tuple[bool, str]:
        """A bank kept on the host ($KD_DEVICE_BANK_FRACTION=0): rows reach the device through the pinned staging
        buffers; they equal the device-resident gather, over enough batches to reuse both buffers, and a short
        training run from it stays finite."""
        from pipeline.bank.reader import LabelBank
        from stage2_student_train.label_sources import BankLabelSource

        on_dev = BankLabelSource([LabelBank(self.bank)], self.device)
        os.environ["KD_DEVICE_BANK_FRACTION"] = "0"
        try:
            on_host = BankLabelSource([LabelBank(self.bank)], self.device)
            held = on_host.rows_device
            rng = np.random.default_rng(0)
            same = True
            for _ in range(8):
                index = torch.from_numpy(rng.integers(0, self.size.train, self.size.batch))
                batch = {"index": index, "image": torch.zeros(1, device=self.device), "epoch": 0}
                a, b = on_dev(batch)["teacher_logits"], on_host(batch)["teacher_logits"]
                same = same and a.device == b.device and torch.equal(a, b)
            final = self._train(self.work / "run-host-bank")
        finally:
            del os.environ["KD_DEVICE_BANK_FRACTION"]
        ok = held == "cpu" and same and bool(np.isfinite(final["nll"]))
        return ok, f"bank rows held on {held}; 8 gathers equal the device-resident ones: {same}; run nll {final['nll']:.3f}"

    # --- 3: bank vs live teacher -----------------------------------------------------------------------------
    def bank_equals_live(self) -> tuple[bool, str]:
        import kd_losses
        from pipeline.bank.reader import LabelBank
        from pipeline.data import build_manifest
        from pipeline.data.loaders import load_batches
        from pipeline.data.presets import get_preset
        from pipeline.models.teachers import parse_teachers
        from stage2_student_train.label_sources import BankLabelSource, LiveTeacherLabelSource
        from stage2_student_train.loop import make_batch

        bank = BankLabelSource([LabelBank(self.bank)], self.device)
        m = build_manifest(self.data, "train")
        targets = torch.from_numpy(m.labels.astype(np.int64))
        live = LiveTeacherLabelSource(parse_teachers(["resnet18"], [str(self.teacher)]), 10, self.device)
        torch.manual_seed(0)
        from pipeline.models import create_model

        student = create_model("resnet18", 10).to(self.device).eval()
        losses = {k: kd_losses.build_loss(k, num_classes=10) for k in ("kd", "wsld")}
        order = np.random.default_rng(0).permutation(len(m))[: 4 * self.size.batch]
        worst = 0.0
        for b in load_batches(self.loader, m, order, get_preset(self.size.preset), "eval", self.size.batch,
                              WORKERS, self.device, 0):
            batch = make_batch(b, targets, self.device, 0, False)
            zb, zl = bank(batch)["teacher_logits"], live(batch)["teacher_logits"]
            torch.testing.assert_close(zb, zl, rtol=2.0 ** -8, atol=2e-3)
            with torch.no_grad():
                s = student(batch["image"])
                for fn in losses.values():
                    lb, ll = fn(s, {**batch, "teacher_logits": zb}), fn(s, {**batch, "teacher_logits": zl})
                    worst = max(worst, abs(float(lb["loss"]) - float(ll["loss"])) / max(abs(float(ll["loss"])), 1e-6))
        return worst < 2e-3, f"max relative per-batch loss difference {worst:.2e} (kd, wsld; limit 2e-3)"

    # --- 4: torchrun ------------------------------------------------------------------------------------------
    def torchrun(self) -> tuple[bool, str]:
        self.ensure_data()
        env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               "OMP_NUM_THREADS": "2"}
        base = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1", "-m"]
        common = ["--data", str(self.data), "--preset", self.size.preset, "--device", self.device,
                  "--batch-size", str(self.size.batch), "--loader", self.loader]
        bank = self.work / "torchrun.zarr"
        dump = subprocess.run([*base, "pipeline.dump_logits", "--teacher", "resnet18", "--weights", str(self.teacher),
                               "--split", "val", *common, "--out", str(bank)], env=env, capture_output=True,
                              text=True, timeout=600)
        train = subprocess.run([*base, "pipeline.train_student", "--method", "wsld", "--student", "resnet18",
                                "--labels", str(bank), *common, "--epochs", "1",
                                "--output-dir", str(self.work / "torchrun-run"), "--overwrite",
                                "max_steps_per_epoch=2", "train_split=val"], env=env, capture_output=True,
                               text=True, timeout=600)
        ok = dump.returncode == 0 and train.returncode == 0
        backend = "cpu:gloo,cuda:nccl" if self.device == "cuda" else "gloo"
        tail = "" if ok else " | " + " ".join((dump.stderr + train.stderr).split())[-300:]
        return ok, f"dump rc {dump.returncode}, train rc {train.returncode} (process group {backend}){tail}"

    # --- 5: step-time ratios, DALI decode ---------------------------------------------------------------------
    def step_ratios(self) -> tuple[bool, str]:
        import kd_losses
        from pipeline.bank.reader import LabelBank
        from pipeline.models import create_model
        from pipeline.models.teachers import parse_teachers
        from stage2_student_train.label_sources import BankLabelSource, LiveTeacherLabelSource

        dev, bs, px, c = self.device, self.size.batch, self.size.step_px, 10
        bank = BankLabelSource([LabelBank(self.bank)], dev)
        live = LiveTeacherLabelSource(parse_teachers(["resnet34"], ["none"]), c, dev)
        torch.manual_seed(0)
        student = create_model("resnet18", c).to(dev)
        opt = torch.optim.SGD(student.parameters(), lr=0.01, momentum=0.9)
        ce, kd = kd_losses.build_loss("ce", num_classes=c), kd_losses.build_loss("kd", num_classes=c)
        x = torch.randn(bs, 3, px, px, device=dev)
        batch = {"image": x, "label": torch.randint(0, c, (bs,), device=dev),
                 "index": torch.randint(0, self.size.train, (bs,)), "epoch": 0}

        def step(variant: str) -> float:
            _sync(dev)
            t0 = time.perf_counter()
            b = dict(batch)
            if variant != "ce":
                b.update((bank if variant == "bank" else live)(b))
            out = (ce if variant == "ce" else kd)(student(x), b)
            opt.zero_grad(set_to_none=True)
            out["loss"].backward()
            opt.step()
            _sync(dev)
            return time.perf_counter() - t0

        for v in ("ce", "bank", "live"):
            for _ in range(min(3, self.size.reps)):
                step(v)
        times: dict[str, list[float]] = {"ce": [], "bank": [], "live": []}
        for _ in range(self.size.rounds):
            for v in times:
                times[v].append(statistics.median(step(v) for _ in range(self.size.reps)))
        med = {v: statistics.median(t) for v, t in times.items()}
        self.figures.update({"step_ms": {v: round(1000 * t, 2) for v, t in med.items()},
                             "bank_over_ce": round(med["bank"] / med["ce"], 3),
                             "live_over_bank": round(med["live"] / med["bank"], 3)})
        return True, (f"ResNet-18 step at {px}px batch {bs}: CE {1000 * med['ce']:.1f} ms, bank "
                      f"{1000 * med['bank']:.1f} ms ({med['bank'] / med['ce']:.3f}x CE), live ResNet-34 "
                      f"{1000 * med['live']:.1f} ms ({med['live'] / med['bank']:.2f}x bank)")

    def teacher_rate(self) -> tuple[bool | None, str]:
        """The teacher alone: a torchvision ResNet-50 forward, bf16 autocast, channels_last, batch 256 at 224 px on
        a resident batch (images/s; what stage 1's pipeline should approach: dump >= 0.8 x min(decode, teacher))."""
        if self.device != "cuda":
            return None, f"needs CUDA (device {self.device})"
        import torchvision

        model = torchvision.models.resnet50().to("cuda", memory_format=torch.channels_last).eval()
        x = torch.randn(256, 3, 224, 224, device="cuda").contiguous(memory_format=torch.channels_last)
        with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
            for _ in range(3):
                model(x)
            _sync("cuda")
            t0 = time.perf_counter()
            reps = 10
            for _ in range(reps):
                model(x)
            _sync("cuda")
        rate = reps * 256 / (time.perf_counter() - t0)
        self.figures["teacher_resnet50_bf16_images_per_s"] = round(rate, 1)
        return True, f"{rate:.0f} img/s (ResNet-50 forward, bf16, channels_last, batch 256, 224 px)"

    def dali_decode(self) -> tuple[bool | None, str]:
        if self.loader != "dali" or self.device != "cuda":
            return None, f"needs DALI and CUDA (loader {self.loader}, device {self.device})"
        from pipeline.data import build_manifest
        from pipeline.data.loaders import load_batches
        from pipeline.data.presets import get_preset

        self.ensure_data()
        m = build_manifest(self.data, "train")
        order = np.arange(len(m))
        for _ in load_batches("dali", m, order[: 4 * self.size.batch], get_preset(self.size.preset), "eval",
                              self.size.batch, WORKERS, "cuda"):
            pass
        _sync("cuda")
        t0 = time.perf_counter()
        n = sum(len(b.index) for b in load_batches("dali", m, order, get_preset(self.size.preset), "eval",
                                                 self.size.batch, WORKERS, "cuda"))
        _sync("cuda")
        rate = n / (time.perf_counter() - t0)
        self.figures["dali_mixed_decode_images_per_s"] = round(rate, 1)
        return True, f"{rate:.0f} img/s decode + resize + crop ({self.size.px} px JPEGs, mixed, 4 threads)"


    def nvjpeg_decode(self) -> tuple[bool | None, str]:
        """Decode-only rate of ``--loader torch --device cuda`` (nvJPEG + GPU resize/crop/normalize); the warm-up
        pass starts the persistent workers the timed pass reuses."""
        if self.device != "cuda":
            return None, f"needs CUDA (device {self.device})"
        from pipeline.data import build_manifest
        from pipeline.data.loaders import load_batches
        from pipeline.data.presets import get_preset

        self.ensure_data()
        m, p, bs = build_manifest(self.data, "train"), get_preset(self.size.preset), self.size.batch
        order = np.arange(len(m))
        for _ in load_batches("torch", m, order[: 4 * bs], p, "eval", bs, WORKERS, "cuda"):
            pass
        _sync("cuda")
        t0 = time.perf_counter()
        n = sum(len(b.index) for b in load_batches("torch", m, order, p, "eval", bs, WORKERS, "cuda"))
        _sync("cuda")
        rate = n / (time.perf_counter() - t0)
        self.figures["torch_nvjpeg_decode_images_per_s"] = round(rate, 1)
        return True, (f"{rate:.0f} img/s decode + resize + crop + normalize ({self.size.px} px JPEGs, nvJPEG, "
                      f"{WORKERS} workers reading bytes)")

    def nvjpeg_vs_cpu(self) -> tuple[bool | None, str]:
        """The torch loader on CUDA (nvJPEG, float resampling on the GPU) vs on the CPU (libjpeg-turbo, uint8):
        same samples, then the measured pixel and logit differences (figures for docs/GPU.md). Fails only on a
        structural difference: other indices or shapes, non-finite pixels, or a mean pixel difference of 0.05
        or more (a wrong crop or flip is several times that)."""
        if self.device != "cuda":
            return None, f"needs CUDA (device {self.device})"
        from pipeline.data import build_manifest
        from pipeline.data.loaders import load_batches
        from pipeline.data.presets import get_preset
        from pipeline.models import create_model

        self.ensure_data()
        m, p, bs = build_manifest(self.data, "val"), get_preset(self.size.preset), self.size.batch
        order = np.arange(len(m))
        gpu = list(load_batches("torch", m, order, p, "eval", bs, WORKERS, "cuda"))
        cpu = list(load_batches("torch", m, order, p, "eval", bs, WORKERS, "cpu"))
        same = [b.index.tolist() for b in gpu] == [b.index.tolist() for b in cpu]
        xg, xc = torch.cat([b.images for b in gpu]), torch.cat([b.images for b in cpu]).to("cuda")
        if not same or xg.shape != xc.shape:
            return False, f"other samples or shapes: {tuple(xg.shape)} vs {tuple(xc.shape)}, same indices {same}"
        d = (xg - xc).abs()
        teacher = create_model("resnet18", 10, "none")
        teacher.load_state_dict(torch.load(self.teacher, map_location="cpu")["model"])
        teacher = teacher.to("cuda").eval()
        with _no_tf32(), torch.no_grad():
            zg = torch.cat([teacher(x) for x in xg.split(bs)])
            zc = torch.cat([teacher(x) for x in xc.split(bs)])
        dz = (zg - zc).abs()
        agree = float((zg.argmax(1) == zc.argmax(1)).float().mean())
        level = 1 / (255 * min(p.std))
        fig = {"pixel_mean": float(d.mean()), "pixel_max": float(d.max()), "logit_mean": float(dz.mean()),
               "logit_max": float(dz.max()), "logit_std": float(zc.std()), "top1_agreement": agree, "n": len(order)}
        self.figures["torch_nvjpeg_vs_cpu"] = {k: round(v, 5) if isinstance(v, float) else v for k, v in fig.items()}
        ok = bool(torch.isfinite(xg).all()) and fig["pixel_mean"] < 0.05 and agree >= 0.99
        return ok, (f"{len(order)} val JPEGs: pixels mean {fig['pixel_mean']:.4f}, max {fig['pixel_max']:.3f} "
                    f"(normalized; one gray level is {level:.4f} at most); resnet18 logits mean |dz| "
                    f"{fig['logit_mean']:.4f}, max {fig['logit_max']:.4f} (logit std {fig['logit_std']:.2f}), "
                    f"top-1 agreement {agree:.4f}")


@contextlib.contextmanager
def _no_tf32():
    """TF32 off for matmuls and cuDNN convolutions (restored after): exactness comparisons in float32."""
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name(0)
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def _injected() -> tuple[bool, str]:
    raise RuntimeError("failure injected by --fail-check")


def markdown(check: Check, args: argparse.Namespace, seconds: float) -> str:
    lines = [f"Command: `python bench/gpu_check.py --device {args.device} --size {args.size}` on "
             f"{check.figures['device']}, torch {torch.__version__}, loader {check.loader}; {seconds:.0f} s in all.",
             "", "| check | result | detail | s |", "|---|---|---|---|"]
    lines += [f"| {r.check} | {r.status} | {r.detail} | {r.seconds:.1f} |" for r in check.rows]
    lines += ["", "Figures: `" + json.dumps(check.figures) + "`"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--size", default=None, choices=sorted(SIZES), help="default: full on cuda, small on cpu")
    p.add_argument("--loader", default="auto", choices=["auto", "dali", "torch"])
    p.add_argument("--work", default=None, help="scratch directory (default: a temporary one, removed)")
    p.add_argument("--write", action="store_true", help="write the 'GPU check' section of BENCHMARKS.md")
    p.add_argument("--fail-check", default=None, metavar="NAME",
                   help="make the check NAME raise (for the test that the others still run)")
    args = p.parse_args(argv)
    args.size = args.size or ("full" if args.device == "cuda" else "small")
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but no CUDA device is available", file=sys.stderr)
        return 2
    work = Path(args.work or tempfile.mkdtemp(prefix="gpu_check-"))
    work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("KD_CACHE", str(work / "cache"))
    t0 = time.time()
    check = Check(args.device, SIZES[args.size], work, args.loader)
    try:
        for name, fn in check.checks(args.device).items():
            check.run(name, _injected if name == args.fail_check else fn)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    seconds = time.time() - t0
    md = markdown(check, args, seconds)
    print("\n" + md)
    if args.write:
        from benchmd import write_section  # bench/ is on sys.path when run as a script

        write_section("GPU check (bench/gpu_check.py)", md)
    return 1 if any(r.status == "FAIL" for r in check.rows) else 0


if __name__ == "__main__":
    sys.exit(main())
