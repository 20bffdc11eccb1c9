"""Helpers of the stage-2 tests (imported by the test modules of this folder; not a test module)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[2]

# Settings shared by the resume tests: sl_enc (draws noise from the global torch RNG and has parameters of its
# own), a step schedule whose lr halves every epoch (independent of the total epoch count, so a 2-epoch run
# resumed to 3 epochs follows the same lr as a 3-epoch run), nesterov momentum, augmentation on.
RESUME_ARGS = ["--method", "sl_enc", "max_steps_per_epoch=3", "sched.name=step", "sched.step_size=1", "sched.gamma=0.5", "optim.nesterov=true"]


def demo_args(data: Path, out: Path, *extra: str, epochs: int = 1, labels: tuple = ()) -> list[str]:
    args = ["--student", "democnn_s", "--data", str(data), "--preset", "demo", "--batch-size", "32",
            "--epochs", str(epochs), "--output-dir", str(out), "--workers", "1"]
    for b in labels:
        args += ["--labels", str(b)]
    return args + list(extra)


def read_metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]


def subprocess_env(**extra: str) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["OMP_NUM_THREADS"] = "1"
    env.update(extra)
    return env


def model_state(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


def assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    diff = [k for k in a if not torch.equal(a[k], b[k])]
    assert not diff, f"tensors differ: {diff[:5]}"


def np_metrics(logits: np.ndarray, labels: np.ndarray, bins: int = 15) -> dict:
    """Reference: top-1/top-5 in percent, mean NLL, ECE with equal-width bins (lo, hi] (Guo et al. 2017)."""
    z = logits.astype(np.float64)
    n, c = z.shape
    shifted = z - z.max(axis=1, keepdims=True)
    logp = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    p = np.exp(logp)
    ranks = np.argsort(-z, axis=1, kind="stable")
    top1 = 100.0 * np.mean(ranks[:, 0] == labels)
    top5 = 100.0 * np.mean([labels[i] in ranks[i, :5] for i in range(n)])
    nll = float(-logp[np.arange(n), labels].mean())
    conf, correct = p.max(axis=1), (p.argmax(axis=1) == labels)
    ece = 0.0
    edges = np.linspace(0.0, 1.0, bins + 1)
    for lo, hi in zip(edges[:-1], edges[1:]):
        inb = (conf > lo) & (conf <= hi)
        if inb.any():
            ece += inb.mean() * abs(correct[inb].mean() - conf[inb].mean())
    return {"top1": top1, "top5": top5, "nll": nll, "ece": ece}


def val_logits(model_path: Path, demo_root: Path) -> tuple[np.ndarray, np.ndarray]:
    """A saved democnn_s student's val logits [N, C] in sample order, and the labels [N]."""
    from pipeline.data.dali import build_pipeline, iterate
    from pipeline.data import build_manifest
    from pipeline.data.presets import get_preset
    from pipeline.models import create_model

    m = create_model("democnn_s", 10, None)
    m.load_state_dict(model_state(model_path))
    m.eval()
    manifest = build_manifest(demo_root, "val")
    order = np.arange(len(manifest))
    out = np.zeros((len(manifest), 10), np.float32)
    with torch.no_grad():
        for b in iterate(build_pipeline(manifest, order, get_preset("demo"), "eval", 50, 1), len(order), 50):
            out[b.index.numpy()] = m(b.images).numpy()
    return out, manifest.labels.astype(np.int64)


def eval_numpy(model_path: Path, demo_root: Path) -> dict:
    """Evaluate a saved student on the whole val split independently of stage 2's evaluate()."""
    from pipeline.data.dali import build_pipeline, iterate
    from pipeline.data import build_manifest
    from pipeline.data.presets import get_preset
    from pipeline.models import create_model

    m = create_model("democnn_s", 10, None)
    m.load_state_dict(model_state(model_path))
    m.eval()
    manifest = build_manifest(demo_root, "val")
    order = np.arange(len(manifest))
    logits, idx = [], []
    with torch.no_grad():
        for b in iterate(build_pipeline(manifest, order, get_preset("demo"), "eval", 50, 1), len(order), 50):
            logits.append(m(b.images).numpy())
            idx.append(b.index.numpy())
    idx = np.concatenate(idx)
    assert sorted(idx.tolist()) == list(range(len(manifest)))
    return np_metrics(np.concatenate(logits), manifest.labels[idx].astype(np.int64))


def assert_metrics_match(row: dict, want: dict) -> None:
    """A metrics.jsonl row equals an independent evaluation (top-1/top-5 in percent, NLL, ECE)."""
    import pytest

    assert row["top1"] == pytest.approx(want["top1"], abs=1e-6)
    assert row["top5"] == pytest.approx(want["top5"], abs=1e-6)
    assert row["nll"] == pytest.approx(want["nll"], rel=1e-4)
    assert row["ece"] == pytest.approx(want["ece"], abs=1e-4)


def kill_once_started(cmd: list[str], env: dict, cwd: Path, log: Path, marker: str = "epoch 1:",
                      timeout_s: float = 240) -> int:
    """Run ``cmd`` with stderr to ``log``, SIGKILL it as soon as ``marker`` appears there; -> its return code
    (-SIGKILL). Fails the test when the process ends first or the marker never comes."""
    with open(log, "w") as err:
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=err, cwd=cwd)
        deadline = time.time() + timeout_s
        try:
            while marker not in log.read_text():
                assert proc.poll() is None, log.read_text()[-2000:]
                assert time.time() < deadline, f"'{marker}' never came"
                time.sleep(0.02)
            proc.send_signal(signal.SIGKILL)
        finally:
            proc.kill()
            proc.wait()
    return proc.returncode


def nobn_cnn(num_classes: int = 10) -> torch.nn.Module:
    """A small CNN without batch norm (no batch statistics): its gradient over a batch is the mean of per-sample
    gradients, so 2 ranks x batch b and 1 rank x batch 2b train it alike (``--student s2_helpers:nobn_cnn``)."""
    nn = torch.nn
    return nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, stride=2, padding=1),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, num_classes))
