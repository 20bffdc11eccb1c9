"""``python -m pipeline.labels check`` (issue 25, point 3): every bank kind that exists (dense center, dense
views, top-k, sampled, int8, an ensemble with embeddings) passes against its teachers run live; a tampered
stored value, view box or flip fails with exit 1 naming the row; bad input exits 2 with one line."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from pipeline.bank.check import sample_rows
from pipeline.bank.replay import register_replay, replay_for, replay_kinds
from pipeline.dump_logits import main as dump_main
from pipeline.errors import UsageError
from pipeline.labels import main

# the first of the 24 rows `labels check --rows 24` samples (seed 0) in the 300-row demo banks: tampered below
ROW = int(sample_rows(np.zeros(300, bool), 24, 0)[0])
TWO_TEACHERS = ["--teacher", "democnn_s", "--teacher", "democnn", "--weights", "none", "--weights", "none"]


def _dump(root: Path, out: Path, *extra: str) -> Path:
    rc = dump_main(["--data", str(root), "--split", "train", "--preset", "demo_rrc", "--batch-size", "32",
                    "--rows-per-chunk", "64", "--out", str(out), *extra])
    assert rc == 0
    return out


@pytest.fixture(scope="module")
def banks(demo_root: Path, tmp_path_factory) -> dict[str, Path]:
    """Two views (rrc+flip) of two random-init teachers, dense with embeddings, and the three compact formats."""
    d = tmp_path_factory.mktemp("check_banks")
    views = ["--views", "2", "--view-policy", "rrc+flip"]
    return {
        "views": _dump(demo_root, d / "views.zarr", *TWO_TEACHERS, *views, "--features"),
        "topk": _dump(demo_root, d / "topk.zarr", *TWO_TEACHERS, *views, "--format", "topk", "--topk", "3"),
        "sampled": _dump(demo_root, d / "sampled.zarr", "--teacher", "democnn_s", "--weights", "none", *views,
                         "--format", "sampled", "--topk", "2", "--samples", "3"),
        "int8": _dump(demo_root, d / "int8.zarr", "--teacher", "democnn_s", "--weights", "none", *views,
                      "--format", "int8", "--features"),
    }


def _check(bank: Path, capsys, *extra: str) -> tuple[int, str]:
    rc = main(["check", str(bank), "--rows", "24", *extra])
    captured = capsys.readouterr()
    return rc, captured.out + captured.err


def _tampered(src: Path, tmp_path: Path, array: str, edit) -> Path:
    """A copy of ``src`` whose row ``ROW`` of ``array`` went through ``edit`` (in place on a numpy copy)."""
    dst = tmp_path / "tampered.zarr"
    shutil.copytree(src, dst)
    g = zarr.open_group(str(dst), mode="r+")
    rows = np.asarray(g[array][ROW:ROW + 1])
    edit(rows)
    g[array][ROW:ROW + 1] = rows
    return dst


def test_center_bank_passes(demo_bank: Path, capsys):
    rc, out = _check(demo_bank, capsys, "--json")
    assert rc == 0, out
    rep = json.loads(out[out.index("{"):])
    assert rep["ok"] and rep["format"] == "dense" and rep["num_views"] == 1 and len(rep["rows"]) == 24
    t = rep["teachers"][0]
    assert t["worst"] <= 1 and t["top1"] == 100.0 and t["kl_max"] < 1e-6


@pytest.mark.parametrize("kind", ["views", "topk", "sampled", "int8"])
def test_clean_banks_pass(banks: dict[str, Path], kind: str, capsys):
    rc, out = _check(banks[kind], capsys)
    assert rc == 0, out
    assert out.startswith(f"OK {banks[kind]}: {'dense' if kind == 'views' else kind} bank, 24 rows x 2 views")
    assert out.count("teacher ") == (1 if kind in ("sampled", "int8") else 2)
    if kind in ("views", "int8"):
        assert "embeddings worst" in out


def test_tampered_logit_row_fails(banks: dict[str, Path], tmp_path: Path, capsys):
    def edit(a):
        a[0, 1] += np.float16(0.01)  # teacher 1 only, every view

    bank = _tampered(banks["views"], tmp_path, "logits", edit)
    rc, out = _check(bank, capsys)
    assert rc == 1 and out.startswith("FAIL")
    lines = out.splitlines()
    assert "beyond tolerance" not in lines[2]  # teacher 0 is untouched
    assert f"row {ROW} view 0, row {ROW} view 1" in out


@pytest.mark.parametrize("column,change", [(0, 0.05), (4, None)])
def test_tampered_view_box_or_flip_fails(banks: dict[str, Path], tmp_path: Path, capsys, column: int, change):
    def edit(a):
        old = a[0, 1, column]
        a[0, 1, column] = 1 - old if change is None else old - change if old >= change else old + change

    bank = _tampered(banks["views"], tmp_path, "views", edit)
    rc, out = _check(bank, capsys)
    assert rc == 1 and f"row {ROW} view 1" in out, out


def test_tampered_compact_values_fail(banks: dict[str, Path], tmp_path: Path, capsys):
    def nudge_topk(a):
        a[0, 0, 0, 1] += np.float16(0.02)

    def nudge_q(a):
        a[0, 0, 1, 2] = a[0, 0, 1, 2] + 3 if a[0, 0, 1, 2] < 120 else a[0, 0, 1, 2] - 3

    rc, out = _check(_tampered(banks["topk"], tmp_path / "a", "topk_values", nudge_topk), capsys)
    assert rc == 1 and f"row {ROW} view 0" in out
    rc, out = _check(_tampered(banks["int8"], tmp_path / "b", "q", nudge_q), capsys)
    assert rc == 1 and f"row {ROW} view 1" in out


def test_other_loader_uses_the_loader_tolerance(banks: dict[str, Path], capsys):
    rc, out = _check(banks["views"], capsys, "--loader", "torch", "--json")
    if json.loads(out[out.index("{"):])["dump_loader"] == "torch":
        pytest.skip("the bank was dumped with the torch loader (no DALI here)")
    assert rc == 0 and json.loads(out[out.index("{"):])["rtol"] == pytest.approx(2e-2)


def test_bad_inputs_exit_2(banks: dict[str, Path], demo_root: Path, image_tree: Path, tmp_path: Path, capsys):
    data = tmp_path / "data"
    shutil.copytree(demo_root, data)
    ckpt = tmp_path / "teacher.pt"
    torch.manual_seed(0)
    from pipeline.models.registry import create_model

    torch.save(create_model("democnn_s", 10).state_dict(), ckpt)
    bank = _dump(data, tmp_path / "ckpt.zarr", "--teacher", "democnn_s", "--weights", str(ckpt))
    assert _check(bank, capsys)[0] == 0
    cases = [
        (lambda: ckpt.write_bytes(ckpt.read_bytes() + b"x"), "changed since the bank was dumped"),
        (lambda: ckpt.unlink(), "weights file not found"),
        (lambda: shutil.move(str(data), str(tmp_path / "moved")), "not found: pass --data ROOT"),
    ]
    for change, message in cases:
        change()
        rc, out = _check(bank, capsys)
        assert rc == 2 and message in out and len(out.strip().splitlines()) == 1, out
    # another dataset than the bank's; no rows; an incomplete bank
    rc, out = _check(banks["views"], capsys, "--data", str(image_tree))
    assert rc == 2 and "does not match the dataset" in out
    rc, out = _check(banks["views"], capsys, "--rows", "0")
    assert rc == 2 and "--rows 0" in out
    copy = tmp_path / "incomplete.zarr"
    shutil.copytree(banks["views"], copy)
    zarr.open_group(str(copy), mode="r+").attrs["complete"] = False
    rc, out = _check(copy, capsys)
    assert rc == 2 and "incomplete" in out


def test_unknown_policy_exits_2_and_registry(banks: dict[str, Path], tmp_path: Path, capsys):
    copy = tmp_path / "mixed.zarr"
    shutil.copytree(banks["views"], copy)
    g = zarr.open_group(str(copy), mode="r+")
    g.attrs["views"] = {**g.attrs["views"], "policy": "rrc+flip+warp(3)"}
    rc, out = _check(copy, capsys)
    assert rc == 2 and "no replay is registered for view policy 'rrc+flip+warp(3)'" in out
    with pytest.raises(ValueError):
        register_replay("rrc", replay_for("rrc"))
    assert replay_kinds()[:3] == ["center", "rrc", "rrc+flip"]
    with pytest.raises(UsageError):
        replay_for("autoaug")


def test_teachers_from_records_rebuild_the_dump_teachers(banks: dict[str, Path]):
    """A random init comes back from its recorded seed: the same weights as the dump's ensemble."""
    from pipeline.bank.reader import LabelBank
    from pipeline.models.teachers import build_teachers, parse_teachers, teachers_from_records

    attrs = LabelBank(banks["views"]).attrs
    rebuilt = teachers_from_records(attrs["teachers"], 10, attrs.get("class_maps"))
    dumped = build_teachers(parse_teachers(["democnn_s", "democnn"], ["none", "none"]), 10)
    for a, b in zip(rebuilt.state_dict().values(), dumped.state_dict().values()):
        assert torch.equal(a, b)


def test_tool_ensembles(banks: dict[str, Path], tmp_path: Path, capsys):
    """A stacked ensemble (labels ensemble --mode stack) holds real teachers: it is checked like a dump; a mean
    ensemble holds one combined teacher: exit 2 naming its member banks."""
    stack, mean, mixed = tmp_path / "stack.zarr", tmp_path / "mean.zarr", tmp_path / "mixed.zarr"
    assert main(["ensemble", str(banks["views"]), str(banks["views"]), "-o", str(stack), "--mode", "stack"]) == 0
    assert main(["ensemble", str(banks["views"]), "-o", str(mean), "--mode", "mean-logits"]) == 0
    assert main(["ensemble", str(banks["views"]), str(banks["int8"]), "-o", str(mixed), "--mode", "stack"]) == 0
    capsys.readouterr()
    rc, out = _check(stack, capsys)
    assert rc == 0 and out.count("teacher ") == 4, out
    for bank in (mean, mixed):  # a combined teacher; int8 reconstructions (max-shifted) instead of logits
        rc, out = _check(bank, capsys)
        assert rc == 2 and "check its member banks" in out and str(banks["views"]) in out, out


def test_class_mapped_teacher(demo_root: Path, tmp_path: Path, capsys):
    """A 12-output checkpoint teacher mapped onto the 10 classes by --class-map: rebuilt from the bank's own
    class maps (the map file is not needed any more), it passes; a tampered stored map fails."""
    from pipeline.data import build_manifest
    from pipeline.models.registry import create_model

    torch.manual_seed(1)
    ckpt = tmp_path / "t12.pt"
    torch.save(create_model("democnn_s", 12).state_dict(), ckpt)
    classes = build_manifest(demo_root, "train").classes
    cmap = tmp_path / "map.json"
    cmap.write_text(json.dumps({c: 11 - k for k, c in enumerate(classes)}))
    bank = _dump(demo_root, tmp_path / "mapped.zarr", "--teacher", "democnn_s", "--weights", str(ckpt),
                 "--class-map", str(cmap))
    cmap.unlink()
    rc, out = _check(bank, capsys)
    assert rc == 0, out
    g = zarr.open_group(str(bank), mode="r+")
    maps = g.attrs["class_maps"]
    g.attrs["class_maps"] = [m[::-1] for m in maps]
    rc, out = _check(bank, capsys)
    assert rc == 1 and out.startswith("FAIL"), out


def test_augmented_and_mixed_views_pass_and_a_tampered_parameter_fails(demo_root: Path, tmp_path: Path, capsys):
    """Views with stored parameters (RandAugment, erasing, Mixup/CutMix with partners) replay through the
    registered replay of augmenting policies: the clean bank passes; changing one stored lambda fails."""
    policy = "rrc+flip+randaug(2,9)+erasing(0.25)+mixup(0.8)+cutmix(1.0)"
    bank = _dump(demo_root, tmp_path / "mixed.zarr", "--teacher", "democnn_s", "--weights", "none", "--views", "2",
                 "--view-policy", policy, "--loader", "torch")
    rc, out = _check(bank, capsys)
    assert rc == 0, out
    lam = list(zarr.open_group(str(bank), mode="r").attrs["views"]["params_columns"]).index("lam")

    def edit(a):
        assert 0 < a[0, 1, lam] < 1  # timm's Mixup mixes every view (mix probability 1)
        a[0, 1, lam] = 1.0 - a[0, 1, lam] if abs(a[0, 1, lam] - 0.5) > 0.05 else a[0, 1, lam] + 0.2

    rc, out = _check(_tampered(bank, tmp_path, "view_params", edit), capsys)
    assert rc == 1 and f"row {ROW} view 1" in out, out
