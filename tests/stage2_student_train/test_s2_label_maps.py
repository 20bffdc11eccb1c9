"""Stage 2 from a label map (issue 26): the RoIAlign convention on hand-computed values (non-square boxes, so an x/y
swap fails), clipping to the mapped region, flips, region-exact CutMix on a hand-built pair, fresh crops per
epoch, and short training runs from a real map bank."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.bank.map_pool import crop_boxes, map_boxes, pool, sub_crops
from pipeline.train_student import main
from s2_helpers import demo_args, read_metrics
from stage2_student_train.map_labels import cutmix_box, cutmix_logits

S = 4


def _ramp() -> torch.Tensor:
    """[1, 1, 4, 4, 2]: channel 0 = 10·y + x, channel 1 = x (cell (y, x))."""
    y, x = torch.meshgrid(torch.arange(S, dtype=torch.float32), torch.arange(S, dtype=torch.float32), indexing="ij")
    return torch.stack([10 * y + x, x], dim=-1)[None, None]


def test_roi_align_convention_on_hand_computed_non_square_boxes():
    m = _ramp()
    # x1, y1, x2, y2 in cells: 4 wide, 2 high -> rows 0-1, every column: mean(10y + x) = 5 + 1.5
    assert pool(m, torch.tensor([[0.0, 0.0, 4.0, 2.0]]))[0, 0, 0].item() == pytest.approx(6.5)
    # swapped (2 wide, 4 high) gives 15.5: the test tells the orders apart
    assert pool(m, torch.tensor([[0.0, 0.0, 2.0, 4.0]]))[0, 0, 0].item() == pytest.approx(15.5)
    # the whole map [0, S]^2 averages every cell exactly (aligned=True: cell centres at k + 0.5)
    assert torch.allclose(pool(m, torch.tensor([[0.0, 0.0, 4.0, 4.0]]))[0, 0], m.mean((1, 2, 3))[0])
    # fractional box x in [0.5, 2.5], y in [1, 3]: 2 x 2 bilinear samples at x = 0.5, 1.5 (between cells) and
    # y = 1, 2 (cell centres after the half-cell shift): mean x = 1.0, mean y = 1.5 -> 16.0 and 1.0
    assert pool(m, torch.tensor([[0.5, 1.0, 2.5, 3.0]]))[0, 0].tolist() == pytest.approx([16.0, 1.0])


def test_crop_boxes_map_into_the_region_and_are_clipped():
    region = torch.tensor([[0.25, 0.0, 0.5, 1.0]])  # the map covers rows 0.25-0.75 of the image, every column
    crop = torch.tensor([[0.25, 0.5, 0.25, 0.25, 0.0]])  # y 0.25-0.5, x 0.5-0.75 of the image
    assert map_boxes(crop, region, S)[0].tolist() == pytest.approx([2.0, 0.0, 3.0, 2.0])
    outside = torch.tensor([[0.0, 0.0, 0.2, 0.5, 0.0]])  # above the region: the region's top border cells
    box = map_boxes(outside, region, S)[0]
    assert box[1] == 0 and box[3] - box[1] < 0.01 and box[0] == 0 and box[2] == pytest.approx(2.0)
    assert pool(_ramp(), box[None])[0, 0].tolist() == pytest.approx([0.5, 0.5], abs=1e-3)  # row 0, columns 0-1


def test_flip_mirrors_the_map_for_regions_inside_a_crop():
    m = torch.randn(2, 1, S, S, 3)
    crops = torch.tensor([[0.0, 0.0, 1.0, 1.0, 0.0], [0.0, 0.0, 1.0, 1.0, 1.0]])
    region = torch.tensor([[0.0, 0.0, 1.0, 1.0]] * 2)
    whole = pool(m, map_boxes(crops, region, S))
    assert torch.allclose(whole, m.mean((2, 3)), atol=1e-6)  # a flip leaves a whole crop's label unchanged
    cut = (0.0, 0.0, 0.5, 0.25)  # top half, left quarter of what the student sees
    got = pool(m, map_boxes(sub_crops(crops, cut), region, S))
    box = torch.tensor([[0.0, 0.0, 1.0, 2.0]])  # x 0-1 cells, y 0-2 cells
    assert torch.allclose(got[0], pool(m[:1], box)[0], atol=1e-6)
    assert torch.allclose(got[1], pool(m[1:].flip(3), box)[0], atol=1e-6)  # the mirrored map, same box
    assert not torch.allclose(got[1], pool(m[1:], box)[0], atol=1e-3)


def test_region_exact_cutmix_on_a_hand_built_pair():
    """Sample 0's map says class 0 on its left half and class 1 on its right; sample 1's map says class 2
    everywhere. Pasting sample 1's right half into sample 0 leaves sample 0 its left half (class 0 only):
    region-exact, where ReLabel's whole-crop blend would keep half of sample 0's class-1 evidence."""
    m = torch.zeros(2, 1, S, S, 3)
    m[0, 0, :, :2, 0] = 8.0
    m[0, 0, :, 2:, 1] = 8.0
    m[1, 0, :, :, 2] = 8.0
    crops = torch.tensor([[0.0, 0.0, 1.0, 1.0, 0.0]] * 2)
    region = torch.tensor([[0.0, 0.0, 1.0, 1.0]] * 2)
    cut = (0.0, 0.5, 1.0, 1.0)  # the right half
    z, r = cutmix_logits(m, crops, region, cut, torch.tensor([1, 0]))
    assert r == pytest.approx(0.5)
    assert z[0, 0].tolist() == pytest.approx([4.0, 0.0, 4.0], abs=1e-5)  # own left half + partner's right half
    assert z[1, 0].tolist() == pytest.approx([0.0, 4.0, 4.0], abs=1e-5)  # own left (class 2) + sample 0's right
    blend = 0.5 * pool(m, map_boxes(crops, region, S))[0] + 0.5 * pool(m, map_boxes(crops, region, S))[1]
    assert blend[0].tolist() == pytest.approx([2.0, 2.0, 4.0], abs=1e-5)  # the whole-crop blend differs
    # flipped sample 0: the student's right half shows the map's left half, so the pasted box hides class 0
    z_flip, _ = cutmix_logits(m, torch.tensor([[0.0, 0.0, 1.0, 1.0, 1.0], [0.0, 0.0, 1.0, 1.0, 0.0]]), region, cut,
                              torch.tensor([1, 0]))
    assert z_flip[0, 0].tolist() == pytest.approx([0.0, 4.0, 4.0], abs=1e-5)


def test_cutmix_box_area_is_lambda():
    rng = np.random.default_rng(0)
    for _ in range(20):
        (t, l_, b, r), lam = cutmix_box(rng, 1.0, 32, 24)
        assert 0 <= t <= b <= 1 and 0 <= l_ <= r <= 1
        assert lam == pytest.approx(1 - (b - t) * (r - l_))


def test_fresh_crops_per_seed_epoch_and_sample():
    idx, size = np.arange(6), np.tile([[40, 60]], (6, 1))
    a = crop_boxes(0, 0, idx, size, (0.08, 1.0), (3 / 4, 4 / 3))
    assert np.array_equal(a, crop_boxes(0, 0, idx, size, (0.08, 1.0), (3 / 4, 4 / 3)))
    assert np.array_equal(a[3:], crop_boxes(0, 0, idx[3:], size[3:], (0.08, 1.0), (3 / 4, 4 / 3)))  # per sample
    assert not np.allclose(a, crop_boxes(0, 1, idx, size, (0.08, 1.0), (3 / 4, 4 / 3)))  # a new epoch, new crops
    assert ((a[:, 0] + a[:, 2] <= 1 + 1e-6) & (a[:, 1] + a[:, 3] <= 1 + 1e-6)).all() and set(a[:, 4]) <= {0.0, 1.0}


@pytest.fixture(scope="module")
def map_bank(demo_root: Path, tmp_path_factory) -> Path:
    from pipeline.dump_logits import main as dump

    out = tmp_path_factory.mktemp("mapbank") / "top3.zarr"
    assert dump(["--teacher", "democnn_s", "--weights", "none", "--data", str(demo_root), "--preset", "demo",
                 "--batch-size", "32", "--rows-per-chunk", "64", "--workers", "1", "--format", "labelmap",
                 "--topk", "3", "--out", str(out)]) == 0
    return out


def test_map_source_pools_each_batch_crop(map_bank: Path, demo_root: Path):
    from pipeline.bank.labelmap import read_maps
    from pipeline.bank.reader import LabelBank
    from pipeline.data.presets import get_preset
    from stage2_student_train.map_labels import MapLabelSource

    bank = LabelBank(map_bank)
    src = MapLabelSource(bank, get_preset("demo_rrc"), seed=5)
    order = np.arange(300)
    boxes = src.boxes(order, epoch=2)
    assert boxes.shape == (300, 1, 5)
    index = torch.tensor([3, 17, 250])
    got = src({"index": index, "epoch": 2, "image": torch.zeros(3, 3, 32, 32), "label": torch.zeros(3).long()})
    maps = torch.from_numpy(np.stack([read_maps(bank.group, i, i + 1)[0] for i in index.tolist()]))
    regions = torch.from_numpy(np.asarray(bank.group["views"][:])[index.numpy(), 0, :4])
    want = pool(maps, map_boxes(torch.from_numpy(boxes[index.numpy(), 0]), regions, 4))
    assert got.keys() == {"teacher_logits"} and torch.allclose(got["teacher_logits"], want, atol=1e-6)


def test_training_from_a_map_with_random_crops_and_cutmix(map_bank: Path, demo_root: Path, tmp_path: Path, capsys):
    for name, extra in (("map", []), ("cutmix", ["--cutmix", "1.0"])):
        out = tmp_path / name
        args = demo_args(demo_root, out, labels=(map_bank,))
        args[args.index("demo")] = "demo_rrc"
        assert main(["--method", "kd", *args, *extra, "max_steps_per_epoch=3"]) == 0
        row = read_metrics(out)[-1]
        assert np.isfinite(row["train_loss"]) and row["train_kd"] > 0
    final = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert final["bank"] == str(map_bank)


@pytest.mark.parametrize("val_preset", ["demo_rrc", "demo"])
def test_a_map_run_reports_teacher_agreement_from_a_val_bank(map_bank: Path, demo_root: Path, tmp_path: Path,
                                                             monkeypatch, val_preset):
    """A label map has teachers, so evaluation compares the student with them on val, from a cached val bank of
    the same teachers and eval transform (the map arm of the results had no agreement or KL): ``demo`` and
    ``demo_rrc`` differ only in training augmentation, so either's val bank serves."""
    from pipeline.dump_logits import main as dump

    monkeypatch.setenv("KD_CACHE", str(tmp_path / "cache"))
    assert dump(["--teacher", "democnn_s", "--weights", "none", "--data", str(demo_root), "--split", "val",
                 "--preset", val_preset, "--batch-size", "32", "--workers", "1"]) == 0
    out = tmp_path / "map"
    args = demo_args(demo_root, out, labels=(map_bank,))
    args[args.index("demo")] = "demo_rrc"
    assert main(["--method", "kd", *args, "max_steps_per_epoch=2"]) == 0
    row = read_metrics(out)[-1]
    assert 0 <= row["teacher_agreement"] <= 100 and row["teacher_kl"] > 0


def test_cutmix_and_map_refusals_are_one_line(map_bank: Path, demo_bank: Path, demo_root: Path, tmp_path: Path,
                                              capsys):
    cases = [(["--method", "kd", "--cutmix", "1", *demo_args(demo_root, tmp_path / "a", labels=(demo_bank,))],
              "label-map"),
             (["--method", "ce", "--cutmix", "1", *demo_args(demo_root, tmp_path / "b")], "drop --cutmix"),
             (["--method", "kd", *demo_args(demo_root, tmp_path / "c", labels=(map_bank,))], "rrc"),
             (["--method", "kd", "--replay-views", *demo_args(demo_root, tmp_path / "d", labels=(map_bank,))],
              "--replay-views"),
             (["--method", "kd", *demo_args(demo_root, tmp_path / "e", labels=(map_bank,)), "--preset", "demo_rrc",
               "--no-augment"], "drop --no-augment")]  # never silently ignored: a map's crops are its point
    for argv, word in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and word in err, (argv, err)


def test_mixed_hard_label_cross_entropy_follows_the_contract():
    import torch.nn.functional as F

    from kd_losses._common import cross_entropy

    z, y, y2 = torch.randn(4, 5), torch.tensor([0, 1, 2, 3]), torch.tensor([4, 4, 0, 1])
    lam = torch.tensor([1.0, 0.25, 0.5, 0.0])
    want = (lam * F.cross_entropy(z, y, reduction="none") + (1 - lam) * F.cross_entropy(z, y2, reduction="none")).mean()
    assert torch.allclose(cross_entropy(z, y, {"label_mix": y2, "lam": lam}), want)
    assert torch.allclose(cross_entropy(z, y, {}), F.cross_entropy(z, y))
