"""Training infrastructure (issue 4, point 5; issue 25 point 6: from timm): SGD (momentum, nesterov) and AdamW,
step / multistep / cosine schedules with linear warm-up (lr at known steps, and timm's schedulers equal to the
schedule's definition, :func:`lr_factor`, at every update), no weight decay for BN and bias, and the same through the
CLI."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

from pipeline.errors import UsageError
from pipeline.models import create_model
from s2_helpers import read_metrics
from stage2_student_train.config import OptimConfig, ScheduleConfig
from stage2_student_train.optim import build_optimizer, build_scheduler, param_groups


def lr_factor(step: int, steps_per_epoch: int, epochs: int, cfg: ScheduleConfig) -> float:
    """The schedules' definition (this project's own scheduler before timm's): the multiplier of the base lr at
    global update ``step`` (0-based)."""
    e = step / max(steps_per_epoch, 1)
    warm = cfg.warmup_epochs
    if warm > 0 and e < warm:
        return cfg.warmup_start_factor + (1.0 - cfg.warmup_start_factor) * e / warm
    epoch = int(e)
    if cfg.name == "step":
        return cfg.gamma ** (epoch // max(cfg.step_size, 1))
    if cfg.name == "multistep":  # from the milestone's first update on (timm's own convention: one update earlier)
        return cfg.gamma ** sum(epoch >= m for m in cfg.milestones)
    if cfg.name == "cosine":
        t = min(max(e - warm, 0.0) / max(epochs - warm, 1e-8), 1.0)
        return cfg.min_lr_factor + (1 - cfg.min_lr_factor) * 0.5 * (1 + math.cos(math.pi * t))
    return 1.0


def scheduled_factor(step: int, steps_per_epoch: int, epochs: int, cfg: ScheduleConfig) -> float:
    """The lr factor timm's scheduler (build_scheduler) sets for update ``step``."""
    m = nn.Linear(1, 1)
    opt = torch.optim.SGD(m.parameters(), lr=1.0)
    build_scheduler(opt, steps_per_epoch, epochs, cfg, 1.0).step_update(step)
    return opt.param_groups[0]["lr"]


def test_sgd_nesterov_and_adamw():
    m = create_model("democnn_s", 10)
    sgd = build_optimizer([m], OptimConfig(name="sgd", lr=0.2, momentum=0.9, nesterov=True, weight_decay=1e-4))
    assert type(sgd) is torch.optim.SGD
    assert sgd.param_groups[0]["nesterov"] is True and sgd.param_groups[0]["momentum"] == 0.9
    assert sgd.param_groups[0]["lr"] == 0.2 and sgd.param_groups[0]["weight_decay"] == 1e-4
    plain = build_optimizer([m], OptimConfig(name="sgd", nesterov=False))
    assert plain.param_groups[0]["nesterov"] is False
    adamw = build_optimizer([m], OptimConfig(name="adamw", lr=1e-3, weight_decay=0.05, betas=(0.8, 0.99)))
    assert type(adamw) is torch.optim.AdamW
    g = adamw.param_groups[0]
    assert g["lr"] == 1e-3 and g["weight_decay"] == 0.05 and tuple(g["betas"]) == (0.8, 0.99)
    with pytest.raises(UsageError, match="unknown optimizer 'lamb'; valid: sgd, adamw"):
        build_optimizer([m], OptimConfig(name="lamb"))


def test_nesterov_step_matches_the_formula():
    """One parameter, two steps: v = mu*v + g; nesterov update = g + mu*v (torch's convention)."""
    p = nn.Parameter(torch.tensor([1.0]))
    mod = nn.Module()
    mod.p = p
    opt = build_optimizer([mod], OptimConfig(name="sgd", lr=0.1, momentum=0.5, nesterov=True, weight_decay=0.0))
    x, v = 1.0, 0.0
    for g in (2.0, 3.0):
        p.grad = torch.tensor([g])
        opt.step()
        v = 0.5 * v + g
        x -= 0.1 * (g + 0.5 * v)
    assert p.item() == pytest.approx(x, rel=1e-6)


def test_no_weight_decay_for_bn_and_bias():
    m = create_model("democnn_s", 10)
    groups = param_groups([m], 0.5, no_wd_bn_bias=True)
    assert [g["weight_decay"] for g in groups] == [0.5, 0.0]
    decay, no_decay = ({id(p) for p in g["params"]} for g in groups)
    bn_or_bias = set()
    for mod in m.modules():
        if isinstance(mod, nn.modules.batchnorm._BatchNorm):
            bn_or_bias |= {id(mod.weight), id(mod.bias)}
        elif getattr(mod, "bias", None) is not None:
            bn_or_bias.add(id(mod.bias))
    assert bn_or_bias and no_decay == bn_or_bias
    assert decay == {id(p) for p in m.parameters()} - bn_or_bias
    assert len(param_groups([m], 0.5, no_wd_bn_bias=False)) == 1
    # functional: zero gradients, so only weight decay moves parameters
    opt = build_optimizer([m], OptimConfig(lr=0.1, momentum=0.0, weight_decay=0.5, no_wd_bn_bias=True))
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    for p in m.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    for n, p in m.named_parameters():
        if id(p) in bn_or_bias:
            assert torch.equal(p.detach(), before[n]), n
        else:
            torch.testing.assert_close(p.detach(), before[n] * (1 - 0.1 * 0.5))


@pytest.mark.parametrize(("cfg", "epochs", "points"), [
    # step: x0.1 every 30 epochs (10 steps per epoch)
    (ScheduleConfig(name="step", step_size=30, gamma=0.1), 90,
     [(0, 1.0), (299, 1.0), (300, 0.1), (599, 0.1), (600, 0.01), (899, 0.01)]),
    # multistep with CIFAR milestones, gamma 0.2
    (ScheduleConfig(name="multistep", milestones=(60, 120, 160), gamma=0.2), 200,
     [(0, 1.0), (599, 1.0), (600, 0.2), (1200, 0.04), (1600, 0.008), (1999, 0.008)]),
    # linear warm-up over 5 epochs from 0.1, then step
    (ScheduleConfig(name="step", step_size=30, gamma=0.1, warmup_epochs=5, warmup_start_factor=0.1), 90,
     [(0, 0.1), (25, 0.55), (49, 0.1 + 0.9 * 4.9 / 5), (50, 1.0), (300, 0.1)]),
    # cosine after 2 warm-up epochs over 10 epochs: 1 at the end of warm-up, 1/2 half-way, min_lr at the end
    (ScheduleConfig(name="cosine", warmup_epochs=2, warmup_start_factor=0.0), 10,
     [(0, 0.0), (10, 0.5), (20, 1.0), (60, 0.5), (40, 0.5 * (1 + math.cos(math.pi / 4))), (100, 0.0)]),
    (ScheduleConfig(name="cosine", min_lr_factor=0.1), 10, [(0, 1.0), (50, 0.55), (100, 0.1), (120, 0.1)]),
    # fractional warm-up (half an epoch), then multistep
    (ScheduleConfig(name="multistep", milestones=(1,), warmup_epochs=0.5, warmup_start_factor=0.2), 3,
     [(0, 0.2), (2, 0.2 + 0.8 * 0.4), (5, 1.0), (9, 1.0), (10, 0.1)]),
    (ScheduleConfig(name="constant", warmup_epochs=1, warmup_start_factor=0.5), 3, [(0, 0.5), (5, 0.75), (10, 1.0), (29, 1.0)]),
])
def test_lr_at_known_steps(cfg, epochs, points):
    for step, want in points:
        assert lr_factor(step, 10, epochs, cfg) == pytest.approx(want, abs=1e-12), (cfg.name, step)
        assert scheduled_factor(step, 10, epochs, cfg) == pytest.approx(want, abs=1e-12), (cfg.name, step)


@pytest.mark.parametrize("cfg", [
    ScheduleConfig(name="step", step_size=2, gamma=0.1),
    ScheduleConfig(name="step", step_size=2, warmup_epochs=1.5, warmup_start_factor=0.1),
    ScheduleConfig(name="multistep", milestones=(1, 3), gamma=0.2),
    ScheduleConfig(name="multistep", milestones=(1,), warmup_epochs=0.5, warmup_start_factor=0.2),
    ScheduleConfig(name="cosine", warmup_epochs=2, warmup_start_factor=0.0),
    ScheduleConfig(name="cosine", warmup_epochs=0.3, min_lr_factor=0.05),
    ScheduleConfig(name="constant", warmup_epochs=1, warmup_start_factor=0.5),
])
@pytest.mark.parametrize("updates_per_epoch", [1, 3, 7])
def test_timm_schedule_equals_the_definition_at_every_update(cfg, updates_per_epoch):
    """The whole lr sequence of timm's scheduler, stepped per update, is lr_factor's (multistep included: timm
    decays at bisect_right(milestones, u + 1), so the milestones go in as m * U + 1)."""
    m = nn.Linear(1, 1)
    opt = torch.optim.SGD(m.parameters(), lr=0.4)
    sched = build_scheduler(opt, updates_per_epoch, 5, cfg, 0.4)
    for u in range(5 * updates_per_epoch + 3):
        sched.step_update(u)
        assert opt.param_groups[0]["lr"] == pytest.approx(0.4 * lr_factor(u, updates_per_epoch, 5, cfg),
                                                          rel=1e-12, abs=1e-15), (cfg, u)


def test_scheduler_applies_the_factor_every_step():
    m = create_model("democnn_s", 10)
    opt = build_optimizer([m], OptimConfig(lr=0.4, no_wd_bn_bias=True))
    cfg = ScheduleConfig(name="cosine", warmup_epochs=1, warmup_start_factor=0.25)
    sched = build_scheduler(opt, 4, 3, cfg, 0.4)
    for step in range(12):
        for g in opt.param_groups:  # every group (decay and no-decay) follows the schedule
            assert g["lr"] == pytest.approx(0.4 * lr_factor(step, 4, 3, cfg), abs=1e-12)
        opt.step()
        sched.step_update(step + 1)
    with pytest.raises(UsageError, match="unknown schedule 'poly'; valid: step, multistep, cosine, constant"):
        build_scheduler(opt, 4, 3, ScheduleConfig(name="poly"), 0.4)


def test_cli_adamw_multistep_warmup_no_wd(train, tmp_path, demo_bank):
    """Through the CLI: the optimizer, its groups and the per-epoch lr are what the config says."""
    out = tmp_path / "adamw"
    assert train(out, "optim.name=adamw", "--lr", "0.01", "optim.weight_decay=0.05", "optim.no_wd_bn_bias=true",
                 "sched.name=multistep", "sched.milestones=[1,2]", "sched.gamma=0.1", "sched.warmup_epochs=0.5",
                 "max_steps_per_epoch=2", epochs=3, labels=(demo_bank,)) == 0
    state = torch.load(out / "last.pt", map_location="cpu", weights_only=True)
    groups = state["optimizer"]["param_groups"]
    assert [g["weight_decay"] for g in groups] == [0.05, 0.0] and "betas" in groups[0]
    assert all("exp_avg" in s for s in state["optimizer"]["state"].values())
    cfg = ScheduleConfig(name="multistep", milestones=(1, 2), gamma=0.1, warmup_epochs=0.5)
    rows = read_metrics(out)
    # the lr each epoch trained at: its first step 2e and its last step 2e + 1
    assert [r["lr_first"] for r in rows] == pytest.approx([0.01 * lr_factor(2 * e, 2, 3, cfg) for e in range(3)],
                                                          rel=1e-9)
    assert [r["lr_last"] for r in rows] == pytest.approx([0.01 * lr_factor(2 * e + 1, 2, 3, cfg)
                                                          for e in range(3)], rel=1e-9)
    assert [r["lr_first"] for r in rows] == pytest.approx([0.01 * 0.1, 0.001, 0.0001])
