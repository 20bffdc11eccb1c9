"""The rest of a modern recipe in stage 2 (issue 25 point 6, issue 24 point 3): model EMA, gradient clipping and
gradient accumulation in the one step object (:class:`stage2_student_train.step.TrainStep`), from timm.

- accumulation of 2 x B/2 is one update of B (a student without BN: its gradient is the mean of per-sample ones),
  in one process and on 2 gloo ranks with ``no_sync`` (slow);
- EMA equals the hand computation after an update; clipping bounds the update as each mode says;
- EMA, clipping and accumulation resume bit-exactly (2 epochs = 1 epoch + --resume 1), the EMA evaluated and saved;
- every recipe in configs/ loads, with every key declared and valid.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import kd_losses
from pipeline.config import RESUME_APPLY, RESUME_MATCH, keys_where, resolve
from pipeline.data.batch import Batch
from s2_helpers import REPO, assert_same_state, demo_args, nobn_cnn, read_metrics
from stage2_student_train.config import OptimConfig, TrainConfig
from stage2_student_train.inputs import check_config
from stage2_student_train.optim import build_ema, build_optimizer
from stage2_student_train.step import TrainModule, TrainStep

STUDENT = "s2_helpers:nobn_cnn"


def _data(n: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 16, 16, generator=g), torch.randint(0, 10, (n,), generator=g)


def _step(model: nn.Module, targets: torch.Tensor, **kw) -> TrainStep:
    crit = kd_losses.build_loss("ce", num_classes=10)
    opt = build_optimizer([model], OptimConfig(name="sgd", lr=0.5, momentum=0.9, weight_decay=0.0))
    return TrainStep(TrainModule(model, crit), opt, targets, **kw)


def _batch(images: torch.Tensor, idx: torch.Tensor) -> Batch:
    return Batch(images[idx], idx)


def _params(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def test_accumulating_two_halves_is_one_update_of_the_whole_batch():
    images, targets = _data(32)
    torch.manual_seed(0)
    one, two = nobn_cnn(), nobn_cnn()
    two.load_state_dict(one.state_dict())
    whole = _step(one, targets)
    halves = _step(two, targets, accum_steps=2)
    for k in range(2):  # two updates: momentum carries the first into the second
        idx = torch.arange(16 * k, 16 * k + 16)
        list(whole.steps([_batch(images, idx)], 0))
        list(halves.steps([_batch(images, idx[:8]), _batch(images, idx[8:])], 0))
    assert whole.updates == halves.updates == 2
    for a, b in zip(one.parameters(), two.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert any(not torch.equal(a, b) for a, b in zip(_params(one), _params(nobn_cnn())))  # it trained


def test_short_last_group_is_the_mean_of_its_own_micro_batches():
    """An epoch of 3 micro-batches with accum_steps=2: the last update averages 1 micro-batch, not half of it."""
    images, targets = _data(24)
    torch.manual_seed(0)
    a, b = nobn_cnn(), nobn_cnn()
    b.load_state_dict(a.state_dict())
    acc = _step(a, targets, accum_steps=2)
    ref = _step(b, targets)
    list(acc.steps([_batch(images, torch.arange(i * 8, i * 8 + 8)) for i in range(3)], 0))
    list(ref.steps([_batch(images, torch.arange(0, 16)), _batch(images, torch.arange(16, 24))], 0))
    assert acc.updates == ref.updates == 2
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_ema_after_one_update_is_the_hand_computation():
    """ModelEmaV3 with a constant decay: ema = decay * ema + (1 - decay) * model, parameters and BN statistics."""
    from pipeline.models import create_model

    images, targets = _data(8)
    torch.manual_seed(0)
    model = create_model("democnn_s", 10)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ema = build_ema(model, 0.75)
    step = _step(model, targets, ema=ema)
    step.train()
    list(step.steps([_batch(images, torch.arange(8))], 0))
    after = model.state_dict()
    got = ema.module.state_dict()
    floats = [k for k, v in after.items() if v.is_floating_point()]
    assert any("running_mean" in k for k in floats)
    for k in floats:
        torch.testing.assert_close(got[k], 0.75 * before[k] + 0.25 * after[k], rtol=1e-6, atol=1e-7, msg=k)
    assert build_ema(model, 0.0) is None


def test_next_batch_is_prepared_before_the_loop_reads_the_current_step():
    """One-ahead: the soft labels of batch i + 1 are gathered right after step i is queued, before the loop's host
    reads of step i (log_every=1 here); images arrive in the student's dtype and memory format."""
    from stage2_student_train.loop import train_one_epoch

    images, targets = _data(24)
    events: list[str] = []

    class Source:
        def __call__(self, batch):
            events.append(f"gather {int(batch['index'][0]) // 8}")
            assert batch["image"].dtype == torch.float64
            assert batch["image"].is_contiguous(memory_format=torch.channels_last)
            return {}

    class Spy(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = kd_losses.build_loss("ce", num_classes=10)

        def forward(self, logits, batch):
            events.append(f"step {int(batch['index'][0]) // 8}")
            return self.inner(logits, batch)

    model = nobn_cnn().double().to(memory_format=torch.channels_last)
    opt = build_optimizer([model], OptimConfig(name="sgd", lr=0.1))
    step = TrainStep(TrainModule(model, Spy()), opt, targets, label_source=Source(), channels_last=True)
    stats = train_one_epoch(step, [_batch(images, torch.arange(i * 8, i * 8 + 8)) for i in range(3)], 0, log_every=1,
                            on_step=lambda i, parts: events.append(f"read {i}"))
    assert events == ["gather 0", "step 0", "gather 1", "read 0", "step 1", "gather 2", "read 1", "step 2", "read 2"]
    assert step.updates == 3 and stats["train_loss"] > 0


@pytest.mark.parametrize("mode, value", [("norm", 1e-3), ("value", 1e-4), ("agc", 1e-3)])
def test_clipping_bounds_the_update(mode, value):
    """Plain SGD (no momentum, lr 1): the update is minus the clipped gradient. norm: its 2-norm is the threshold;
    value: no entry exceeds it; agc: each unit's update is at most value x its weight's norm (timm's unitwise)."""
    images, targets = _data(8)
    torch.manual_seed(0)
    model = nobn_cnn()
    crit = kd_losses.build_loss("ce", num_classes=10)
    opt = build_optimizer([model], OptimConfig(name="sgd", lr=1.0, momentum=0.0, weight_decay=0.0))
    step = TrainStep(TrainModule(model, crit), opt, targets, clip_grad=value, clip_mode=mode)
    before = _params(model)
    list(step.steps([_batch(images, torch.arange(8))], 0))
    deltas = [b - p.detach() for b, p in zip(before, model.parameters())]
    if mode == "norm":
        total = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(d) for d in deltas]))
        assert total.item() == pytest.approx(value, rel=1e-4)
    elif mode == "value":
        assert max(d.abs().max().item() for d in deltas) == pytest.approx(value, rel=1e-4)
    else:
        w = before[-2]  # the classifier's weight [10, 16]: unitwise norms over its rows
        ratio = deltas[-2].norm(dim=1) / w.norm(dim=1).clamp_min(1e-3)
        assert ratio.max().item() <= value * (1 + 1e-4) and ratio.max().item() > 0


def _resume_args(*extra: str) -> list[str]:
    return ["--method", "kd", "--student", STUDENT, "max_steps_per_epoch=3", "optim.accum_steps=2",
            "optim.clip_grad=0.05", "optim.clip_mode=norm", "ema_decay=0.8", "sched.name=cosine",
            "sched.warmup_epochs=0.5", *extra]


def _state(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def test_ema_clipping_accumulation_resume_bit_exact(train, tmp_path, demo_bank, capsys):
    """3 micro-batches per epoch (2 updates, the second a short group), clipping active, EMA on: 2 epochs in one
    run equal 1 epoch + --resume to 2, in the model, loss, EMA and optimizer states and the metrics. Resuming with
    another accumulation or EMA decay is refused in one line (clipping may change: applied from the next step)."""
    full, part = tmp_path / "full", tmp_path / "part"
    assert train(full, *_resume_args(), epochs=2, labels=(demo_bank,)) == 0
    assert train(part, *_resume_args(), epochs=1, labels=(demo_bank,)) == 0
    capsys.readouterr()
    for arg, msg in (("optim.accum_steps=3", "optim.accum_steps 2 -> 3"), ("ema_decay=0.9", "ema_decay 0.8 -> 0.9")):
        assert train(part, *_resume_args(arg), "--resume", epochs=2, labels=(demo_bank,)) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and msg in err[0], err
    assert {"optim.clip_grad", "optim.clip_mode"} <= set(keys_where(TrainConfig, resume=RESUME_APPLY))
    assert {"optim.accum_steps", "ema_decay"} <= set(keys_where(TrainConfig, resume=RESUME_MATCH))
    torch.rand(5)  # the resumed run must not depend on the global RNG's state
    assert train(part, *_resume_args(), "--resume", epochs=2, labels=(demo_bank,)) == 0
    a, b = _state(full / "last.pt"), _state(part / "last.pt")
    for key in ("model", "criterion", "ema"):
        assert_same_state(a[key], b[key])
    assert not all(torch.equal(a["ema"][k], a["model"][k]) for k in a["model"])  # the EMA is its own average
    mom = [[s["momentum_buffer"] for _, s in sorted(x["optimizer"]["state"].items())] for x in (a, b)]
    assert all(torch.equal(x, y) for x, y in zip(*mom))
    ra, rb = read_metrics(full), read_metrics(part)
    keys = ("top1", "ema_top1", "ema_nll", "train_loss", "lr_first", "lr_last")
    assert [{k: r[k] for k in keys} for r in ra] == [{k: r[k] for k in keys} for r in rb]
    assert (full / "ema_best.pt").is_file() and _state(full / "ema_best.pt")["top1"] == max(r["ema_top1"] for r in ra)
    assert a["ema_best_top1"] == max(r["ema_top1"] for r in ra)
    final = json.loads((full / "final.json").read_text())
    assert final["ema_top1"] == ra[-1]["ema_top1"] and final["ema_best_top1"] == a["ema_best_top1"]
    assert final["global_batch_size"] == 32 * 2  # images per optimizer update: batch x accum_steps x processes


def test_bad_recipe_values_are_one_line_errors(train, tmp_path, demo_bank, capsys):
    """Through the keys and timm's flags (``--grad-accum-steps`` = ``--accum-steps``, ``--model-ema-decay``,
    ``--clip-grad``)."""
    for args, msg in ((["--grad-accum-steps", "0"], "optim.accum_steps=0 must be >= 1"),
                      (["--model-ema-decay", "1"], "ema_decay=1.0 must be in [0, 1)"),
                      (["optim.clip_mode=max"], "optim.clip_mode=max must be one of norm, value, agc"),
                      (["--clip-grad", "-1"], "optim.clip_grad=-1.0 must be >= 0")):
        assert train(tmp_path / args[0], *args, labels=(demo_bank,)) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and msg in err[0], (args, err)


def test_accumulating_more_steps_than_an_epoch_warns(train, tmp_path, demo_bank, caplog):
    with caplog.at_level("WARNING"):
        assert train(tmp_path / "r", "--accum-steps", "5", "max_steps_per_epoch=2", labels=(demo_bank,)) == 0
    warned = [r.getMessage() for r in caplog.records if "--accum-steps 5 exceeds" in r.getMessage()]
    assert len(warned) == 1 and "the 2 steps of an epoch" in warned[0]


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_recipe_in_configs_loads(path):
    """Every key of every recipe exists (unknown keys are errors), its values pass the run's checks, its loss
    hyperparameters are the method's."""
    cfg = resolve(TrainConfig, path)
    check_config(replace(cfg, data="data", device="cpu", amp="none" if cfg.amp == "fp16" else cfg.amp))
    kd_losses.get_spec(cfg.method).resolved_hparams(cfg.loss)
    if path.name == "imagenet_deit_style_kd.yaml":
        o = cfg.optim
        assert (o.name, o.clip_grad, o.accum_steps, cfg.sched.name, cfg.ema_decay) == ("adamw", 1.0, 2, "cosine",
                                                                                       0.99996)
        assert cfg.sched.warmup_epochs > 0 and cfg.teacher and not cfg.live_teacher


@pytest.mark.slow
def test_two_ranks_accumulating_with_no_sync_train_what_one_rank_trains_with_the_full_batch(train, tmp_path,
                                                                                              demo_root, demo_bank):
    """2 gloo ranks x batch 4 x accum_steps 2 (the first micro-batch without all-reduce) = 1 rank x batch 16."""
    from test_s2_ddp_equivalence import _torchrun

    common = ["--method", "kd", "--student", STUDENT, "--no-augment", "--lr", "0.05", "sched.name=constant"]
    one = tmp_path / "one"
    assert train(one, *common, "max_steps_per_epoch=3", "--batch-size", "16", labels=(demo_bank,)) == 0
    two = tmp_path / "two"
    args = demo_args(demo_root, two, *common, "max_steps_per_epoch=6", "optim.accum_steps=2", labels=(demo_bank,))
    args[args.index("--batch-size") + 1] = "4"
    proc, _ = _torchrun(tmp_path, args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = _state(one / "last.pt"), _state(two / "last.pt")
    for k in a["model"]:
        torch.testing.assert_close(a["model"][k], b["model"][k], rtol=1e-4, atol=1e-5, msg=k)
    assert json.loads((two / "final.json").read_text())["world_size"] == 2

