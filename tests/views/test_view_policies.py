"""Modern recipes offline (issue 25): view policies with RandAugment / TrivialAugment / AutoAugment, random
erasing, Mixup and CutMix, their parameters stored per view and replayed exactly."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from pipeline.bank.identity import view_record
from pipeline.bank.views import rebuild_inputs
from pipeline.data import build_manifest, layout_of
from pipeline.data.augment import apply_op, augment_view, mix_views, replay_view
from pipeline.data.loaders import load_batches
from pipeline.data.policy import (MIX_CUTMIX, MIX_MIXUP, OP_NAMES, PARAM_COLUMNS, draw_params, parse_view_policy,
                                  partner_permutation)
from pipeline.data.presets import get_preset
from pipeline.distributed import torchrun_args
from pipeline.dump_logits import main as dump_main
from pipeline.errors import UsageError
from pipeline.models.ensemble import build_ensemble
from stage1_teacher_logits.views import ViewSampler

REPO = Path(__file__).resolve().parents[2]
FULL = "rrc+flip+randaug(2,9)+erasing(0.25)+mixup(0.8)+cutmix(1.0)"
PRESET = get_preset("demo")


def _dump_args(root: Path, out: Path, policy: str = FULL, batch: int = 8, loader: str = "torch") -> list[str]:
    return ["--teacher", "democnn_s", "--weights", "none", "--data", str(root), "--split", "val", "--preset", "demo",
            "--batch-size", str(batch), "--rows-per-chunk", "40", "--views", "2", "--view-policy", policy,
            "--loader", loader, "--workers", "1", "--out", str(out)]


def _arrays(path: Path) -> dict[str, np.ndarray]:
    g = zarr.open_group(str(path), mode="r")
    return {k: g[k][:] for k in ("logits", "labels", "views", "view_params", "view_partner")}


@pytest.fixture(scope="module")
def mixed_bank(demo_root, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("mixed") / "b8.zarr"
    assert dump_main(_dump_args(demo_root, out)) == 0
    return out


# --- syntax -------------------------------------------------------------------------------------------------
def test_policy_syntax_canonical_and_errors():
    p = parse_view_policy(FULL)
    assert (p.geometry, p.augment, p.num_ops, p.magnitude, p.erasing, p.mixup, p.cutmix) == \
        ("rrc+flip", "randaug", 2, 9, 0.25, 0.8, 1.0)
    assert str(p) == "rrc+flip+randaug(2,9)+erasing(0.25)+mixup(0.8)+cutmix(1)"
    assert p.columns()[:len(PARAM_COLUMNS)] == list(PARAM_COLUMNS) and p.num_params == 14
    assert str(parse_view_policy("rrc+trivialaug+cutmix")) == "rrc+trivialaug+cutmix(1)"
    assert parse_view_policy("rrc+autoaug").op_slots == 2
    for old in ("center", "rrc", "rrc+flip"):
        assert str(parse_view_policy(old)) == old and not parse_view_policy(old).stores_params
    for bad in ("rrc+foo", "center+randaug", "rrc+mixup+erasing", "rrc+randaug(2)", "flip+rrc", "rrc+randaug+autoaug",
                "rrc+erasing(2)"):
        with pytest.raises(UsageError) as e:
            parse_view_policy(bad)
        assert "\n" not in str(e.value) and ("syntax" in str(e.value) or "range" in str(e.value))


def test_old_policies_keep_their_record():
    """Banks of the old policies keep their keys: the record is what it was."""
    assert view_record("rrc+flip", 4, 5, PRESET) == {"policy": "rrc+flip", "num_views": 4, "seed": 5,
                                                      "scale": list(PRESET.scale), "ratio": list(PRESET.ratio)}
    assert view_record("center", 1, 0, PRESET) == {"policy": "center", "num_views": 1}
    rec = view_record(FULL, 2, 0, PRESET)
    assert rec["policy"] == str(parse_view_policy(FULL)) and len(rec["params_columns"]) == 14


# --- draws ------------------------------------------------------------------------------------------------
def test_params_depend_only_on_seed_index_view():
    p = parse_view_policy(FULL)
    a = draw_params(p, 3, 17, 1, 32)
    np.testing.assert_array_equal(a, draw_params(p, 3, 17, 1, 32))
    assert not np.array_equal(a, draw_params(p, 3, 17, 0, 32))
    assert not np.array_equal(a, draw_params(p, 4, 17, 1, 32))
    s = ViewSampler(FULL, 2, 3, PRESET)
    np.testing.assert_array_equal(s.params(np.array([5, 17, 9]))[1], s.params(np.array([17]))[0])
    perm = partner_permutation(3, 1, 100)
    assert sorted(perm) == list(range(100))
    np.testing.assert_array_equal(s.partners(np.array([4, 2]), 100)[:, 1], perm[[4, 2]])
    assert (ViewSampler("rrc+randaug", 2, 3, PRESET).partners(np.arange(4), 100) == -1).all()


def test_draws_follow_torchvision_tables_and_timm_mixing():
    import torchvision.transforms.v2 as T

    rows = np.stack([draw_params(parse_view_policy(FULL), 0, i, 0, 32) for i in range(400)])
    ops = rows[:, 10::2].astype(int)
    assert set(ops.ravel()) <= {OP_NAMES.index(n) for n in T.RandAugment._AUGMENTATION_SPACE}
    for op, mag in zip(ops.ravel(), rows[:, 11::2].ravel()):
        fn, signed = T.RandAugment._AUGMENTATION_SPACE[OP_NAMES[op]]
        mags = fn(31, 32, 32)
        expect = 0.0 if mags is None else float(mags[9])
        assert abs(abs(mag) - abs(expect)) < 1e-5 and (signed or mag >= 0)
    kinds = rows[:, 4]
    assert set(kinds) == {MIX_MIXUP, MIX_CUTMIX} and 0.35 < (kinds == MIX_CUTMIX).mean() < 0.65  # switch 0.5
    cut = rows[kinds == MIX_CUTMIX]
    np.testing.assert_allclose(cut[:, 5], 1 - cut[:, 8] * cut[:, 9], atol=1e-6)  # λ = 1 - clipped box area
    erased = ~np.isnan(rows[:, 0])
    assert 0.15 < erased.mean() < 0.35
    area = rows[erased, 2] * rows[erased, 3]
    assert area.min() >= 0.02 - 0.01 and area.max() <= 0.33 + 0.02
    auto = np.stack([draw_params(parse_view_policy("rrc+autoaug"), 0, i, 0, 32) for i in range(50)])
    assert (auto[:, 10::2] == -1).any() and (auto[:, 10::2] >= 0).any()  # AutoAugment's op probabilities


# --- exact replay -------------------------------------------------------------------------------------------
def _forced_rows(policy: str) -> list[np.ndarray]:
    """One row per op of the policy's table (op slot 0 forced), plus erasing, mixup and cutmix rows."""
    import torchvision.transforms.v2 as T

    p = parse_view_policy(policy)
    base = draw_params(p, 0, 0, 0, PRESET.crop)
    space = {"randaug": T.RandAugment, "trivialaug": T.TrivialAugmentWide, "autoaug": T.AutoAugment}[p.augment]
    out = []
    for k, name in enumerate(space._AUGMENTATION_SPACE):
        row = base.copy()
        fn, signed = space._AUGMENTATION_SPACE[name]
        mags = fn(10, PRESET.crop, PRESET.crop)
        mag = 0.0 if mags is None else float(mags[5 + k % 3])
        row[10:12] = (OP_NAMES.index(name), -mag if signed else mag)
        out.append(row)
    return out


@pytest.mark.parametrize("policy", ["rrc+flip+randaug(2,9)+erasing(0.25)", "rrc+trivialaug+erasing(1)",
                                    "rrc+autoaug+erasing(0.5)"])
def test_every_op_replays_exactly_per_loader(demo_root, policy):
    """Stored row -> the same image twice, and the torch loader's view equals the stage-2 replay on the decoded
    image bit for bit; DALI twice gives the same image and stays within the loaders' resampling tolerance."""
    m = build_manifest(demo_root, "val")
    rows = np.stack(_forced_rows(policy))
    k = len(rows)
    order = np.arange(k) % len(m)
    s = ViewSampler("rrc+flip", 1, 0, PRESET)
    boxes = s.boxes(m, order)
    params = rows[:, None]
    torch1 = torch.cat([b.images for b in load_batches("torch", m, order, PRESET, "views", 8, 1, "cpu", boxes=boxes,
                                                       params=params)])
    torch2 = torch.cat([b.images for b in load_batches("torch", m, order, PRESET, "views", 8, 0, "cpu", boxes=boxes,
                                                       params=params)])
    assert torch.equal(torch1, torch2)
    layout = layout_of(m)
    for j in range(k):
        img = layout.load_tensor(m, int(order[j]))
        assert torch.equal(replay_view(img, boxes[j, 0], rows[j], PRESET), torch1[j]), OP_NAMES[int(rows[j, 10])]
    dali1 = torch.cat([b.images for b in load_batches("dali", m, order, PRESET, "views", 8, 1, "cpu", boxes=boxes,
                                                      params=params)])
    dali2 = torch.cat([b.images for b in load_batches("dali", m, order, PRESET, "views", 5, 1, "cpu", boxes=boxes,
                                                      params=params)])
    assert torch.equal(dali1, dali2)
    # resampling differs slightly between loaders; ops on uint8 can move a pixel by a step of the image
    assert (dali1 - torch1).abs().mean() < 0.1


def test_mixing_hand_built():
    x, y = torch.zeros(2, 3, 4, 4), torch.ones(2, 3, 4, 4)
    rows = np.full((2, 10), np.nan, np.float32)
    rows[0, 4:6] = (MIX_MIXUP, 0.25)
    rows[1, 4:10] = (MIX_CUTMIX, 0.75, 0.0, 0.5, 0.5, 0.5)
    out = mix_views(x, y, rows)
    assert torch.allclose(out[0], torch.full((3, 4, 4), 0.75))
    assert out[1, :, :2, 2:].eq(1).all() and out[1].sum() == 3 * 4
    assert torch.equal(apply_op(torch.arange(48, dtype=torch.uint8).view(3, 4, 4), -1, 3.0),
                       torch.arange(48, dtype=torch.uint8).view(3, 4, 4))
    erased = augment_view(torch.full((3, 4, 4), 128, dtype=torch.uint8),
                          np.array([0.25, 0.25, 0.5, 0.5, 0, 1] + [np.nan] * 4, np.float32), PRESET)
    assert erased[:, 1:3, 1:3].eq(0).all() and erased[:, 0].ne(0).all()


# --- the dump -------------------------------------------------------------------------------------------------
def test_mixed_bank_layout_and_live_teacher(mixed_bank, demo_root):
    """Stored arrays; the stored logits of mixed views equal the live teacher on the rebuilt image (both
    loaders: torch made the bank, bit-level replay; DALI within the loaders' tolerance)."""
    g = zarr.open_group(str(mixed_bank), mode="r")
    n = g["labels"].shape[0]
    assert g["view_params"].shape == (n, 2, 14) and g["view_partner"].shape == (n, 2)
    assert g["view_params"].chunks[0] == g["labels"].chunks[0] == g["view_partner"].chunks[0]
    assert g.attrs["views"]["params_columns"] == parse_view_policy(FULL).columns()
    partner = g["view_partner"][:]
    assert ((partner >= 0) & (partner < n)).all()
    m = build_manifest(demo_root, "val")
    rows = np.arange(0, 2 * n, 7)
    teacher = build_ensemble(["democnn_s"], [None], 10)
    stored = g["logits"][:][:, 0].reshape(2 * n, 10)[rows].astype(np.float32)
    for loader, tol in (("torch", 2e-3), ("dali", 2e-2)):
        with torch.no_grad():
            live = teacher(rebuild_inputs(g, m, rows, PRESET, loader))[:, 0].numpy()
        assert np.abs(live - stored).max() < tol, loader
    kinds = g["view_params"][:][..., 4].reshape(-1)[rows]
    assert (kinds == MIX_MIXUP).any() and (kinds == MIX_CUTMIX).any()


def test_partners_independent_of_batch_size(mixed_bank, demo_root, tmp_path):
    out = tmp_path / "b5.zarr"
    assert dump_main(_dump_args(demo_root, out, batch=5)) == 0
    a, b = _arrays(mixed_bank), _arrays(out)
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


@pytest.mark.slow
def test_partners_independent_of_world_size(mixed_bank, demo_root, tmp_path):
    out = tmp_path / "dist.zarr"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    cmd = [sys.executable, *torchrun_args(2), "-m", "pipeline.dump_logits", *_dump_args(demo_root, out)]
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = _arrays(mixed_bank), _arrays(out)
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


@pytest.mark.slow
def test_policy_enters_the_key(demo_root, tmp_path):
    a, b = tmp_path / "a.zarr", tmp_path / "b.zarr"
    assert dump_main(_dump_args(demo_root, a, "rrc+trivialaug")) == 0
    assert dump_main(_dump_args(demo_root, b, "rrc+trivialaug+erasing(0.5)")) == 0
    ga, gb = zarr.open_group(str(a), mode="r"), zarr.open_group(str(b), mode="r")
    assert ga.attrs["key"] != gb.attrs["key"]
    assert (ga["view_partner"][:] == -1).all() and np.isnan(ga["view_params"][:][..., 0]).all()
    assert dump_main(_dump_args(demo_root, a, "rrc+bogus")) == 2


# --- stage 2 ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def mixed_train_bank(demo_root, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("mixed_train") / "train.zarr"
    args = _dump_args(demo_root, out, batch=30)
    args[args.index("val")] = "train"
    assert dump_main(args + ["--rows-per-chunk", "100"]) == 0
    return out


def test_stage2_replays_mixed_views_and_targets(mixed_bank, demo_root):
    """Stage 2's replay (the label source's stored parameters through the loader) rebuilds the images the
    stored logits were computed on, and the batch gets the mixed-label entries of the replayed views."""
    from pipeline.bank.reader import LabelBank
    from pipeline.data.loaders import load_mixed_batches
    from stage2_student_train.label_sources import BankLabelSource, view_choice

    bank = LabelBank(mixed_bank)
    m = build_manifest(demo_root, "val")
    src = BankLabelSource([bank], replay_seed=3)
    teacher = build_ensemble(["democnn_s"], [None], 10)
    order = np.random.default_rng(0).permutation(len(m))[:40]
    g = zarr.open_group(str(mixed_bank), mode="r")
    partner, params, labels = g["view_partner"][:], g["view_params"][:], g["labels"][:]
    for epoch in (0, 1):
        batches = load_mixed_batches("torch", m, order, PRESET, 20, 1, "cpu", src.boxes(order, epoch),
                                     **src.view_params(order, epoch))
        for b in batches:
            entries = src({"index": b.index, "epoch": epoch, "image": b.images})
            with torch.no_grad():
                torch.testing.assert_close(entries["teacher_logits"], teacher(b.images), atol=2e-3, rtol=2e-3)
            v = view_choice(b.index, epoch, 3, 2).numpy()
            i = b.index.numpy()
            np.testing.assert_array_equal(entries["label_mix"].numpy(), labels[partner[i, v]])
            np.testing.assert_array_equal(entries["lam"].numpy(), params[i, v, 5])


@pytest.mark.slow
def test_stage2_training_run_and_refusal(mixed_train_bank, demo_root, tmp_path, capsys):
    from pipeline.train_student import main as train_main

    base = ["--method", "kd", "--student", "democnn_s", "--labels", str(mixed_train_bank), "--data", str(demo_root),
            "--preset", "demo", "--epochs", "1", "--batch-size", "32", "--workers", "1", "--loader", "torch",
            "max_steps_per_epoch=3"]
    assert train_main(base + ["--replay-views", "--output-dir", str(tmp_path / "run")]) == 0
    assert train_main(base + ["--output-dir", str(tmp_path / "plain")]) == 2
    assert "--replay-views" in capsys.readouterr().err.strip().splitlines()[-1]


def test_verify_covers_view_parameters(mixed_bank, tmp_path):
    import shutil

    from pipeline.bank.reader import verify_bank

    assert verify_bank(mixed_bank) == []
    copy = tmp_path / "copy.zarr"
    shutil.copytree(mixed_bank, copy)
    for name in ("view_params", "view_partner"):
        chunk = sorted(p for p in (copy / name / "c").rglob("*") if p.is_file())[0]
        chunk.unlink()
    problems = verify_bank(copy)
    assert any("view_params" in p for p in problems) and any("view_partner" in p for p in problems)


def test_bank_tools_carry_view_parameters(mixed_bank, tmp_path):
    """labels compact / ensemble copy view_params and view_partner row for row (without them the copy's views
    would replay unaugmented)."""
    from pipeline.bank.reader import verify_bank
    from pipeline.labels import main as labels_main

    c, e = tmp_path / "c.zarr", tmp_path / "e.zarr"
    assert labels_main(["compact", str(mixed_bank), "-o", str(c), "--topk", "3"]) == 0
    assert labels_main(["ensemble", str(mixed_bank), str(mixed_bank), "-o", str(e)]) == 0
    src = zarr.open_group(str(mixed_bank), mode="r")
    for out in (c, e):
        g = zarr.open_group(str(out), mode="r")
        for name in ("views", "view_params", "view_partner"):
            np.testing.assert_array_equal(g[name][:], src[name][:], err_msg=f"{out.name} {name}")
        assert g.attrs["views"] == src.attrs["views"] and verify_bank(out) == []


def test_rebuild_inputs_center_bank(demo_bank, demo_root):
    """rebuild_inputs serves every bank kind: a center bank's rows through the eval transform give its logits."""
    from pipeline.errors import BankError

    g = zarr.open_group(str(demo_bank), mode="r")
    m = build_manifest(demo_root, "train")
    rows = np.array([0, 17, 299])
    with torch.no_grad():
        live = build_ensemble(["democnn_s"], [None], 10)(rebuild_inputs(g, m, rows, PRESET, "torch"))[:, 0]
    stored = g["logits"][:][rows, 0, 0].astype(np.float32)
    assert np.abs(live.numpy() - stored).max() < 2e-3
    with pytest.raises(BankError):
        rebuild_inputs(g, m, np.array([300]), PRESET)
